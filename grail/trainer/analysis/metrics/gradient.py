r"""What the gradients looked like at a measurement step: ``gradient/*``.

Read from ``p.grad`` of every trainable parameter (``requires_grad``; frozen parameters never
have one) right after ``optimizer.step()`` and before ``zero_grad``, i.e. the gradient the
optimizer just used (after clipping and loss-scale unscaling, summed over accumulation steps).
With :math:`g` the entries of all gradients that are present (non-finite entries are counted in
``nonfinite_count`` and excluded from every other statistic except the denominators of ratios):

=========================  =======================================================================
key                        definition
=========================  =======================================================================
``norm_l2``                :math:`\lVert g\rVert_2`, after any clipping
``norm_l1``                :math:`\sum|g|`
``norm_max``               :math:`\max|g|`
``mean`` / ``std``         mean and population standard deviation of the entries
``sparsity_at_{T}``        fraction of entries with :math:`|g| \le T`
``nonfinite_count``        number of NaN/Inf entries
``missing_ratio``          fraction of trainable entries whose parameter has no gradient
                           (``p.grad is None``: unused in the forward, or already zeroed)
``num_params``             number of entries with a gradient
=========================  =======================================================================

Per layer (``gradient/layer_{i}/...``, ``gradient_track_per_layer``) and per component
(``gradient/component/{c}/...``, ``gradient_track_components``) the keys are ``norm_l2``,
``mean_abs``, ``sparsity_at_{T}`` and ``missing_ratio``; a group is reported when it has a
trainable entry. Groups come from :mod:`~grail.trainer.analysis.core.naming`.

Sparse gradients (``nn.Embedding(sparse=True)``) are coalesced (duplicate indices summed, as the
optimizer sees them) and their implicit zeros count as entries equal to zero. Complex gradients
are read as pairs of reals.

With ``histogram_samples > 0`` the computer returns a
:class:`~grail.trainer.analysis.metrics.base.MetricResult` whose ``histograms`` are
``{"gradient/abs_grad": |g| at up to histogram_samples positions}`` (see
:class:`HistogramSample`: positions are drawn over every trainable entry, those without a gradient
and non-finite values are left out) and reports ``histogram_nonfinite``, the number of sampled
values left out because they were NaN/Inf; otherwise it returns a plain ``dict``.

With the compiled kernels, a computer holding an
:class:`~grail.trainer.analysis.metrics.optimizer_pass.OptimizerPass` (as
``ModelAnalysisManager.create`` builds it when the Adam family is on too) reads each gradient
once for both families: whichever of the two runs first computes the joint rows, and this
computer takes the gradient's half from the measurement's context.

Decisions: when no parameter has a gradient (called after ``zero_grad(set_to_none=True)``) the
computer returns ``{}`` and logs one info message, rather than reporting zero norms. Under
DeepSpeed ZeRO the reduced gradient is read from the engine's partitions (ZeRO-3) or fragments
(ZeRO-1/2) of it, which exist only between ``engine.backward()`` and ``engine.step()``: called
after ``engine.step()`` (as the HF Trainer's callbacks are) the family is skipped the same way.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.metrics.base import AnalysisContext
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> model.weight.grad = torch.tensor([[0.0, -3.0]])
    >>> m = GradientSparsityMetrics(thresholds=[0.0]).compute(context=AnalysisContext(model=model))
    >>> m["gradient/norm_l2"], m["gradient/sparsity_at_0e+00"], m["gradient/missing_ratio"]
    (3.0, 0.5, 0.0)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .. import kernels
from ..config import AnalysisConfig, format_threshold
from ..core.distributed import LocalGrad, all_reduce_, local_grad
from ..core.layout import LE
from ..core.naming import ParameterNaming, group_prefix, group_rows
from ..core.snapshot import collect_parameters
from ..core.stats import StreamingStats, Summary
from .base import AnalysisContext, MetricComputer, MetricResult
from .optimizer_pass import OptimizerPass, real_view

__all__ = ["GradientSparsityMetrics", "HistogramSample", "real_view"]

logger = logging.getLogger(__name__)


class HistogramSample:
    """Values at ``size`` positions drawn uniformly (with replacement) from a set of tensors.

    The positions are global flat indices into the concatenation of the tensors (global shapes,
    so sharding does not change them), drawn once from a ``torch.Generator`` seeded with ``seed``:
    the global RNG is neither read nor advanced. When the tensors hold ``size`` entries or fewer,
    every entry is taken once. Each rank fills the positions inside its local shards;
    :meth:`result` sums over ranks (one collective, whose size depends only on ``size`` and the
    global shapes), so every rank gets the whole sample.

    A position that no rank filled (a tensor without a gradient or optimizer state) is left out,
    and so is a non-finite value (histogram loggers reject them); :attr:`nonfinite` counts the
    non-finite values left out.

    >>> tensors = [torch.arange(3.0), torch.tensor([10.0, float("nan"), 12.0, 13.0, 14.0])]
    >>> s = HistogramSample(4, [t.numel() for t in tensors], seed=0)
    >>> for i, t in enumerate(tensors):
    ...     s.fill(i, 0, t.numel(), lambda pos, t=t: t[pos])
    >>> s.result().tolist(), s.nonfinite
    ([0.0, 12.0, 14.0], 1)
    """

    def __init__(self, size: int, numels: Sequence[int], seed: int = 0) -> None:
        total = int(sum(numels))
        if total <= size:
            pos = torch.arange(total, dtype=torch.int64)
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            pos = torch.randint(total, (size,), generator=gen, dtype=torch.int64).sort().values
        self._pos = pos
        starts = torch.tensor([0, *np.cumsum(numels).tolist()], dtype=torch.int64)
        self._starts = starts
        self._bounds = torch.searchsorted(pos, starts).tolist()
        # row 0: the values, row 1: 1 where this rank filled the slot (summed in one reduction)
        self._slots = torch.zeros(2, pos.numel(), dtype=torch.float64)
        self.nonfinite = 0

    def fill(
        self,
        index: int,
        offset: int,
        numel: int,
        values_at: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Fill the positions of tensor ``index`` held locally (flat ``offset .. offset+numel``)
        with ``values_at(local flat positions)``."""
        lo, hi = self._bounds[index], self._bounds[index + 1]
        if lo == hi:
            return
        local = self._pos[lo:hi] - (self._starts[index] + offset)
        keep = (local >= 0) & (local < numel)
        if not bool(keep.any()):
            return
        slots = torch.arange(lo, hi)[keep]
        self._slots[0, slots] = values_at(local[keep]).detach().double().cpu()
        self._slots[1, slots] = 1.0

    def result(self) -> np.ndarray:
        """The finite sampled values as a float32 numpy array (collective in a process group);
        sets :attr:`nonfinite`."""
        all_reduce_(self._slots, "sum")
        values = self._slots[0][self._slots[1] > 0].float()
        finite = torch.isfinite(values)
        self.nonfinite = int(values.numel() - int(finite.sum()))
        return values[finite].numpy()


class GradientSparsityMetrics(MetricComputer):
    """Streaming statistics of the gradients (see module docstring for every key)."""

    name = "gradient"

    def __init__(
        self,
        thresholds: Sequence[float] = (0.0, 1e-8, 1e-6),
        per_layer: bool = False,
        track_components: bool = False,
        component_map: Mapping[str, str] | None = None,
        histogram_samples: int = 0,
        histogram_seed: int = 0,
        fused: bool | str = "auto",
        optimizer_pass: OptimizerPass | None = None,
    ) -> None:
        self.thresholds = sorted(float(t) for t in thresholds)
        self.fused = fused
        self.per_layer = per_layer
        self.track_components = track_components
        self.component_map = dict(component_map or {})
        self.histogram_samples = histogram_samples
        self.histogram_seed = histogram_seed
        #: the pass shared with the Adam family (see module docstring), or None
        self.optimizer_pass = optimizer_pass
        self._naming: tuple[tuple[str, ...], ParameterNaming] | None = None

    @classmethod
    def from_config(
        cls, config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
    ) -> GradientSparsityMetrics:
        return cls(
            thresholds=config.gradient_thresholds,
            per_layer=config.gradient_track_per_layer,
            track_components=config.gradient_track_components,
            component_map=config.component_map,
            histogram_samples=config.histogram_samples,
            fused=config.fused_kernels,
            optimizer_pass=OptimizerPass.from_config(config),
        )

    def requires_model(self) -> bool:
        return True

    def _groups(self, names: list[str]) -> tuple[list[str], dict[str, list[int]]]:
        key = tuple(names)
        if self._naming is None or self._naming[0] != key:
            self._naming = (key, ParameterNaming(names, self.component_map))
        return group_rows(self._naming[1], names, self.per_layer, self.track_components)

    @kernels.timed()  # the work the kernels replace, for the "auto" policy
    def compute(
        self, delta: Any = None, context: AnalysisContext | None = None, **kwargs: Any
    ) -> dict[str, float] | MetricResult:
        model = context.model if context is not None else None
        if model is None:
            return self.skip("no model passed")
        params = collect_parameters(model, trainable_only=True)
        if not params:
            return self.skip("the model has no trainable parameters")
        groups, rows = self._groups([n for n, _ in params])
        # this rank's pieces: p.grad, or DeepSpeed's partitions/fragments (core.distributed)
        held = {name: local_grad(p) for name, p in params}
        with_grad = [h.grad for h in held.values() if h.grad is not None]
        device = with_grad[0].device if with_grad else torch.device("cpu")
        stats = StreamingStats(self.thresholds, groups, extra_sums=("missing",), device=device)
        numel = sum(g.numel() for g in with_grad)
        fused = kernels.use("moments", numel, self.fused, getattr(context, "step", None))
        batch = kernels.MomentsBatch(stats.thresholds_f32) if fused else None
        shared = self._shared_rows(context, stats) if batch is not None else {}
        for name, _ in params:
            grad, info, held_numel = held[name]
            if not info.owner:
                continue
            if grad is None:
                stats.add("missing", float(held_numel), rows[name])
                continue
            if grad.layout != torch.strided:
                self._update_sparse(stats, grad, rows[name])
                continue
            flat = real_view(grad).reshape(-1)
            raw = shared.pop(name, None)  # this parameter's row from the shared pass
            if batch is None or not batch.add(flat, rows[name], raw):
                stats.update(flat, rows[name])
        if batch is not None:
            sums, maxes, batch_groups = batch.rows()
            stats.accumulate_rows(sums, maxes, batch_groups)
        stats.all_reduce()
        results = stats.results()
        if results[0].count + results[0].nonfinite == 0:
            return self.skip(
                "no parameter has a gradient; call on_optimizer_step after optimizer.step() and "
                "before zero_grad() (under DeepSpeed: between engine.backward() and "
                "engine.step(), which consumes the gradients)"
            )
        out = self._finalize(results, groups)
        if self.histogram_samples > 0:
            sample = self._histogram(params, held)
            histograms = {"gradient/abs_grad": sample.result()}
            out["gradient/histogram_nonfinite"] = float(sample.nonfinite)
            return MetricResult(out, histograms)
        return out

    def _shared_rows(
        self, context: AnalysisContext | None, stats: StreamingStats
    ) -> dict[str, torch.Tensor]:
        """The gradient rows of the pass shared with the Adam family (``{}`` without one)."""
        shared = self.optimizer_pass
        if shared is None or context is None:
            return {}
        if shared.moment_thresholds != tuple(stats.thresholds_f32):
            return {}  # declared for other thresholds: its rows are not this computer's
        return shared.rows(context).moments

    def _update_sparse(self, stats: StreamingStats, grad: torch.Tensor, rows: list[int]) -> None:
        grad = grad.to_sparse_coo().coalesce()
        values = real_view(grad.values())
        stats.update(values, rows)
        implicit = grad.numel() * (2 if grad.is_complex() else 1) - values.numel()
        if implicit > 0:
            # Implicit zeros: count, |0| <= t for every threshold, and 0 folded into max/min.
            cols = stats.layout.moments
            sums = stats.layout.new_sums()
            sums[cols["count"]] = implicit
            sums[cols.span(LE)] = implicit
            stats.accumulate(sums, stats.layout.new_maxes(fill=0.0), rows)

    def _histogram(
        self, params: list[tuple[str, torch.Tensor]], held: dict[str, LocalGrad]
    ) -> HistogramSample:
        """Positions over every trainable parameter (the same on every rank, whatever each rank's
        gradients); the owner of a position fills it if it holds a gradient there."""
        pieces = [held[name] for name, _ in params]
        sample = HistogramSample(
            self.histogram_samples, [h.info.global_numel for h in pieces], self.histogram_seed
        )
        for i, (grad, info, _) in enumerate(pieces):
            if not info.owner or grad is None:
                continue
            if grad.layout == torch.strided:
                flat = grad.abs().reshape(-1) if grad.is_complex() else grad.reshape(-1)
                sample.fill(i, info.offset, flat.numel(), lambda pos, f=flat: f[pos].abs())
            else:
                sample.fill(i, info.offset, grad.numel(), lambda pos, g=grad: _sparse_at(g, pos))
        return sample

    def _finalize(self, results: list[Summary], groups: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for group, r in zip(groups, results, strict=True):
            present = r.count + r.nonfinite
            trainable = present + r.extra["missing"]
            if trainable == 0:
                continue
            missing = r.extra["missing"] / trainable
            if group == "all":
                p = "gradient/"
                five = r.five_numbers()
                for k in ("norm_l2", "norm_l1", "norm_max", "mean", "std"):
                    out[p + k] = five[k]
            else:
                p = group_prefix("gradient", group)
                out[p + "norm_l2"] = r.norm_l2
                out[p + "mean_abs"] = r.mean_abs
            for t in self.thresholds:
                out[f"{p}sparsity_at_{format_threshold(t)}"] = r.fraction_le(t)
            out[p + "missing_ratio"] = missing
            if group == "all":
                out[p + "nonfinite_count"] = float(r.nonfinite)
                out[p + "num_params"] = float(present)
        return out


def _sparse_at(grad: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``|grad|`` of a sparse COO tensor at dense flat positions (implicit entries are 0)."""
    grad = grad.to_sparse_coo().coalesce()
    sparse_shape = grad.shape[: grad.sparse_dim()]
    dense_numel = int(np.prod(grad.shape[grad.sparse_dim() :], dtype=np.int64))
    strides = torch.tensor(
        [int(np.prod(sparse_shape[k + 1 :], dtype=np.int64)) for k in range(len(sparse_shape))],
        dtype=torch.int64,
    )
    linear = (grad.indices().cpu() * strides[:, None]).sum(0)  # sorted: the tensor is coalesced
    values = grad.values().reshape(grad.values().shape[0], -1).abs()
    pos = pos.cpu()
    key, within = pos // dense_numel, pos % dense_numel
    j = torch.searchsorted(linear, key).clamp_(max=max(linear.numel() - 1, 0))
    out = torch.zeros(pos.numel(), dtype=torch.float64)
    if linear.numel():
        found = linear[j] == key
        out[found] = values.cpu()[j[found], within[found]].double()
    return out
