r"""Is Adam doing sign descent? The normalised update from the optimizer state: ``adam_sign/*``.

For every parameter with Adam state (``exp_avg`` :math:`m`, ``exp_avg_sq`` :math:`v` - or
``max_exp_avg_sq`` when the group has ``amsgrad`` - and ``step`` :math:`t`) and its param group's
``betas`` :math:`(\beta_1, \beta_2)`, ``eps`` :math:`\epsilon` and ``lr`` :math:`\eta`, the
bias-corrected normalised update is

.. math:: u = \frac{m / (1-\beta_1^t)}{\sqrt{v} / \sqrt{1-\beta_2^t} + \epsilon}
            = \frac{m \cdot s}{\sqrt{v} + \epsilon \sqrt{1-\beta_2^t}}, \qquad
          s = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}

so that the step Adam just took is :math:`-\eta u` (plus AdamW's decoupled weight decay, which is
not part of :math:`u`). It is evaluated in float32 in the second form (one division instead of
three; it differs from torch's own evaluation by a few units in the last place) by
:func:`~grail.trainer.analysis.kernels.adam_u` on the compiled and on the eager path (whose
``torch.sqrt`` is not always correctly rounded on CPU: one unit in the last place apart).
Over all entries with state (non-finite :math:`u` are counted in ``nonfinite_count`` and kept in
the denominators of the fractions):

========================  ========================================================================
key                       definition
========================  ========================================================================
``mean_abs_u``            mean of :math:`|u|`
``frac_near_one``         fraction with :math:`1 - \tau \le |u| \le 1 + \tau`
                          (``adam_sign_tolerance`` :math:`\tau`, default 0.1): coordinates in
                          the sign-descent regime
``frac_small``            fraction with :math:`|u| < 0.1`: noise-dominated coordinates
``sign_agreement``        among entries where the current gradient :math:`g` (``p.grad``,
                          negated for ``maximize``) and :math:`m` are both non-zero, the fraction
                          with :math:`\mathrm{sign}(g) = \mathrm{sign}(m)`; NaN when there is no
                          such pair (no gradients)
``update_to_weight``      :math:`\lVert \eta u\rVert_2 / \lVert W\rVert_2` with the current
                          (post-step) weights; 0 when :math:`\lVert W\rVert_2 = 0`, NaN when a
                          weight is NaN or infinite
``nonfinite_count``       number of non-finite :math:`u`
``num_params``            number of entries with Adam state
``histogram_nonfinite``   with ``histogram_samples > 0``: sampled :math:`u` left out of the
                          histogram because they were NaN/Inf
========================  ========================================================================

Per component (``adam_sign/component/{c}/...``, ``adam_sign_track_components``) the first five
keys are reported for each group that has Adam state.

Reading the numbers: if the gradient of a coordinate is pure noise with mean zero, :math:`m`
averages it away while :math:`\sqrt{v}` keeps its scale, and :math:`E|u|` is about 0.18 for the
default betas; ``frac_small`` is then large. :math:`|u|` approaches 1 only when the gradient's
mean dominates its spread, so ``frac_near_one`` tracks the fraction of coordinates whose gradient
signal-to-noise ratio is about 2 or more, where Adam behaves like sign descent (Balles & Hennig,
2018, "Dissecting Adam"). ``sign_agreement`` near 0.5 means the current gradient is uncorrelated
with the momentum; note that :math:`m` already contains the current gradient with weight
:math:`1-\beta_1`, which biases it slightly above 0.5.

Optimizers are recognised by their state, not their class: ``torch.optim.Adam``/``AdamW`` (single
tensor, ``foreach`` and ``fused``), ``amsgrad``, ``SparseAdam``, and wrappers exposing ``state``
and ``param_groups`` (e.g. accelerate's). Adam variants with the same state layout (``NAdam``,
``RAdam``) get the Adam-normalised update of their moments, not their own step. Without such
state (SGD, Adafactor, no optimizer passed) the computer returns ``{}`` and logs one info message.
DeepSpeed's ZeRO optimizers (stages 1-3, and its bf16 optimizer) are read through the pieces of
state each rank holds (:func:`~grail.trainer.analysis.core.zero.state_pieces`: the fp32
``exp_avg``/``exp_avg_sq`` partitions, with the compute weights and gradient entries they belong
to) and reduced like any other statistic.
Not supported: ``ZeroRedundancyOptimizer`` (state on one rank per parameter) and 8-bit
optimizers (quantised state under other names, so they are skipped like SGD).
The arithmetic runs in float32 on the stored state, whatever its dtype. On CPU, with
``fused=True`` (the default), every statistic of a tensor comes from one compiled loop
(:mod:`~grail.trainer.analysis.kernels`); when this computer and a
:class:`~.gradient.GradientSparsityMetrics` hold the same
:class:`~.optimizer_pass.OptimizerPass` (both built from one config), both families are computed
in the same loop, reading each gradient once, by whichever of them runs first.

With ``histogram_samples > 0`` the computer returns a :class:`~.base.MetricResult` whose
``histograms`` are ``{"adam_sign/u": u at up to histogram_samples positions}`` (see
:class:`~.gradient.HistogramSample`; finite values only, positions without Adam state left
out), else a plain ``dict``.

Decisions: under a process group a rank without Adam state still takes part in the reduction of
the statistics; the family is skipped (``{}`` on every rank) when no entry with state is counted
anywhere.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.metrics.base import AnalysisContext
    >>> model = torch.nn.Linear(4, 1, bias=False)
    >>> model.weight.data.fill_(1.0)  # doctest: +ELLIPSIS
    tensor(...)
    >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
    >>> model.weight.grad = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    >>> opt.step()
    >>> m = AdamSignDescentMetrics().compute(context=AnalysisContext(model=model, optimizer=opt))
    >>> round(m["adam_sign/mean_abs_u"], 4), m["adam_sign/frac_near_one"]
    (1.0, 1.0)
    >>> m["adam_sign/sign_agreement"], round(m["adam_sign/update_to_weight"], 3)
    (1.0, 0.105)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import kernels
from ..config import AnalysisConfig
from ..core.distributed import local_tensor, shard_info
from ..core.naming import ParameterNaming, group_prefix, group_rows
from ..core.scratch import ScratchBuffers
from ..core.snapshot import collect_parameters
from ..core.stats import StreamingStats, Summary, chunk_numel
from .base import AnalysisContext, MetricComputer, MetricResult
from .gradient import HistogramSample
from .optimizer_pass import (
    OptimizerPass,
    adam_entries,
    adam_inputs,
    bias_corrections,
    held,
    real_view,
    u_bounds,
    u_constants,
)

__all__ = ["AdamSignDescentMetrics", "adam_entries", "bias_corrections", "u_constants"]

logger = logging.getLogger(__name__)

_EXTRAS = ("sign_sum", "sign_nonzero", "w_sq", "lr_u_sq")


class AdamSignDescentMetrics(MetricComputer):
    """Statistics of Adam's normalised update (see module docstring for every key)."""

    name = "adam_sign"

    def __init__(
        self,
        tolerance: float = 0.1,
        track_components: bool = False,
        component_map: Mapping[str, str] | None = None,
        histogram_samples: int = 0,
        trainable_only: bool = False,
        histogram_seed: int = 0,
        fused: bool | str = "auto",
        optimizer_pass: OptimizerPass | None = None,
    ) -> None:
        self.tolerance = float(tolerance)
        self.fused = fused
        self.track_components = track_components
        self.component_map = dict(component_map or {})
        self.histogram_samples = histogram_samples
        self.trainable_only = trainable_only
        self.histogram_seed = histogram_seed
        #: the pass shared with the gradient family (see module docstring), or None
        self.optimizer_pass = optimizer_pass
        # |u| < 1 - tol and |u| < 0.1 as exact counts of |u| <= t: the largest double below.
        self._small, self._lo, self._hi = u_bounds(self.tolerance)
        self._naming: tuple[tuple[str, ...], ParameterNaming] | None = None
        self._scratch = ScratchBuffers(chunk_numel)

    @classmethod
    def from_config(
        cls, config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
    ) -> AdamSignDescentMetrics:
        return cls(
            tolerance=config.adam_sign_tolerance,
            track_components=config.adam_sign_track_components,
            component_map=config.component_map,
            histogram_samples=config.histogram_samples,
            trainable_only=config.trainable_only,
            fused=config.fused_kernels,
            optimizer_pass=OptimizerPass.from_config(config),
        )

    def requires_model(self) -> bool:
        return True

    def requires_optimizer(self) -> bool:
        return True

    def compute(
        self, delta: Any = None, context: AnalysisContext | None = None, **kwargs: Any
    ) -> dict[str, float] | MetricResult:
        # Scratch buffers live for one measurement only: between measurements the analysis
        # holds nothing but the snapshot (GPU memory belongs to training).
        try:
            return self._compute(delta=delta, context=context, **kwargs)
        finally:
            self._scratch.clear()

    @kernels.timed()  # the work the kernels replace, for the "auto" policy
    def _compute(
        self, delta: Any = None, context: AnalysisContext | None = None, **kwargs: Any
    ) -> dict[str, float] | MetricResult:
        model = context.model if context is not None else None
        optimizer = context.optimizer if context is not None else None
        if model is None:
            return self.skip("no model passed")
        params = collect_parameters(model, self.trainable_only)
        # Whether there is anything to report is decided after the reduction below, from every
        # rank's counts: a rank without Adam state (no optimizer, SGD) still takes part in it,
        # so no rank is left alone in a collective.
        entries = adam_entries(optimizer, params) if optimizer is not None else []
        names = [n for n, _ in params]
        if self._naming is None or self._naming[0] != tuple(names):
            self._naming = (tuple(names), ParameterNaming(names, self.component_map))
        groups, rows = group_rows(self._naming[1], names, False, self.track_components)
        if entries:
            device = local_tensor(entries[0][2]["exp_avg"]).device
        else:
            device = local_tensor(params[0][1]).device if params else torch.device("cpu")
        stats = StreamingStats(self._thresholds(), groups, extra_sums=_EXTRAS, device=device)
        numel = sum(p.numel() for _, p, _, _ in entries)
        fused = kernels.use("adam", numel, self.fused, context.step)
        batch = kernels.AdamBatch(stats.thresholds_f32) if fused else None
        # rows the pass shared with the gradient family computed, with their inputs
        shared = self._shared_rows(context, stats) if batch is not None else {}
        for name, p, st, group in entries:
            if held(p)[2].owner:
                self._update(stats, p, st, group, rows[name], batch, shared.pop(name, None))
        if batch is not None:
            sums, maxes, extras, batch_groups = batch.rows()
            stats.accumulate_rows(sums, maxes, batch_groups, extras)
        stats.all_reduce()
        results = stats.results()
        if results[0].count + results[0].nonfinite == 0:
            if optimizer is None:
                return self.skip("no optimizer passed to on_optimizer_step")
            if not entries:
                return self.skip(
                    f"{type(optimizer).__name__} holds no Adam state (exp_avg, exp_avg_sq, step) "
                    "for the model's parameters"
                )
            return self.skip("the rank that counts these parameters holds no Adam state for them")
        out = self._finalize(results, groups)
        if self.histogram_samples > 0:
            sample = self._histogram(params, entries)
            histograms = {"adam_sign/u": sample.result()}
            out["adam_sign/histogram_nonfinite"] = float(sample.nonfinite)
            return MetricResult(out, histograms)
        return out

    def _thresholds(self) -> list[float]:
        return [self._small, self._lo, self._hi]

    def _shared_rows(
        self, context: AnalysisContext | None, stats: StreamingStats
    ) -> dict[str, tuple[Any, ...]]:
        """This family's rows of the pass shared with the gradient family (``{}`` without
        one): ``{name: (row, m, v, g, w, scale, shift)}``."""
        shared = self.optimizer_pass
        if shared is None or context is None:
            return {}
        mine = (tuple(stats.thresholds_f32), self.trainable_only)
        if (shared.u_thresholds, shared.trainable_only) != mine:
            return {}  # declared for another configuration: its rows are not this computer's
        return shared.rows(context).adam

    def _update(
        self,
        stats: StreamingStats,
        p: torch.Tensor,
        st: dict[str, Any],
        group: dict[str, Any],
        rows: list[int],
        batch: kernels.AdamBatch | None = None,
        handoff: tuple[Any, ...] | None = None,
    ) -> None:
        """Feed one parameter to ``stats``, or to ``batch`` when its kernels take it.
        ``handoff`` is ``(row, m, v, g, w, scale, shift)`` from the pass shared with the
        gradient family."""
        sign = -1.0 if group.get("maximize") else 1.0
        if batch is not None and handoff is not None:
            raw, *inputs = handoff
            if batch.add(*inputs, rows, sign, float(group["lr"]), raw):
                return
        m, v, bc1, bc2s, eps = adam_inputs(st, group)
        lr_sq = float(group["lr"]) ** 2
        w, grad, _ = held(p)
        w = real_view(w).reshape(-1)
        dense = grad is not None and grad.layout == torch.strided
        g = real_view(grad).reshape(-1) if dense else None
        scale, shift = u_constants(bc1, bc2s, eps)
        lr = float(group["lr"])
        if (
            batch is not None
            and g is not None
            and batch.add(m, v, g, w, scale, shift, rows, sign, lr)
        ):
            return
        a_buf = self._scratch.get(m.device, chunk_numel(m.device), slot="a")
        b_buf = self._scratch.get(m.device, chunk_numel(m.device), slot="b")
        zero = torch.zeros((), dtype=torch.float32, device=m.device)
        step = chunk_numel(m.device)
        for start in range(0, m.numel(), step):
            stop = min(start + step, m.numel())
            a, b = a_buf[: stop - start], b_buf[: stop - start]
            mc, vc = m[start:stop], v[start:stop]
            # u = (m * scale) / (sqrt(v) + shift), as kernels.adam_u, computed in b
            torch.sqrt(_f32(vc, b), out=b).add_(shift)
            torch.div(torch.mul(_f32(mc, a), scale, out=a), b, out=b)
            sums, maxes = stats.moments(b)
            s_sum = s_nonzero = zero
            if g is not None:
                # sign(g) sign(m) is +1 (agree), -1 (disagree) or 0: its sum and its sum of
                # squares give both counts. NaN is zeroed; on CPU only when it occurs (the
                # check is free there), on accelerators always (no host sync).
                prod = torch.sign(_f32(g[start:stop], a), out=a)
                prod.mul_(torch.sign(_f32(mc, b), out=b))
                if prod.is_cpu:
                    s_sum = prod.sum()
                    if not bool(torch.isfinite(s_sum)):
                        s_sum = prod.nan_to_num_(nan=0.0).sum()
                else:
                    s_sum = prod.nan_to_num_(nan=0.0).sum()
                s_sum, s_nonzero = s_sum * sign, torch.dot(prod, prod)
            wf = _f32(w[start:stop], a)
            w_sq = torch.dot(wf, wf)  # float32 dot of one chunk: relative error ~1e-7
            extras = [s_sum, s_nonzero, w_sq, sums[stats.column("sum_sq")] * lr_sq]
            stats.accumulate(sums, maxes, rows, extras)
        if grad is not None and not dense:
            s_sum, s_nonzero = _sparse_sign_terms(grad, st["exp_avg"])
            stats.add("sign_sum", s_sum * sign, rows)
            stats.add("sign_nonzero", s_nonzero, rows)

    def _histogram(
        self,
        params: list[tuple[str, torch.Tensor]],
        entries: list[tuple[str, torch.Tensor, Any, Any]],
    ) -> HistogramSample:
        """Positions over every analysed parameter (the same on every rank, whatever each rank's
        optimizer holds); the owner of a position fills it if it holds Adam state there."""
        infos = [shard_info(p) for _, p in params]
        sample = HistogramSample(
            self.histogram_samples, [i.global_numel for i in infos], self.histogram_seed
        )
        index = {name: i for i, (name, _) in enumerate(params)}
        for name, p, st, group in entries:
            i = index[name]
            info = held(p)[2]  # a DeepSpeed piece sits elsewhere than the parameter's copy
            if not info.owner:
                continue
            m, v, bc1, bc2s, eps = adam_inputs(st, group)
            scale, shift = u_constants(bc1, bc2s, eps)

            def u_at(pos: torch.Tensor, m=m, v=v, scale=scale, shift=shift) -> torch.Tensor:
                pos = pos.to(m.device)
                return kernels.adam_u(m[pos], v[pos], scale, shift)

            sample.fill(i, info.offset, m.numel(), u_at)
        return sample

    def _finalize(self, results: list[Summary], groups: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for group, r in zip(groups, results, strict=True):
            total = r.count + r.nonfinite
            if total == 0:
                continue
            p = "adam_sign/" if group == "all" else group_prefix("adam_sign", group)
            out[p + "mean_abs_u"] = r.mean_abs
            out[p + "frac_near_one"] = (r.le[self._hi] - r.le[self._lo]) / total
            out[p + "frac_small"] = r.le[self._small] / total
            nonzero = r.extra["sign_nonzero"]  # no non-zero pair: NaN keeps the key stable
            out[p + "sign_agreement"] = (
                (r.extra["sign_sum"] + nonzero) / (2.0 * nonzero) if nonzero > 0 else math.nan
            )
            w_sq = r.extra["w_sq"]
            # A NaN or Inf weight gives NaN (not a reassuring 0); only an all-zero weight gives 0.
            ratio = math.sqrt(r.extra["lr_u_sq"] / w_sq) if w_sq else 0.0
            out[p + "update_to_weight"] = ratio if math.isfinite(w_sq) else math.nan
            if group == "all":
                out[p + "nonfinite_count"] = float(r.nonfinite)
                out[p + "num_params"] = float(total)
        return out


def _f32(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``x`` if it is float32, else ``x`` copied into the float32 buffer ``buf``."""
    return x if x.dtype == torch.float32 else buf.copy_(x)


def _sparse_sign_terms(grad: torch.Tensor, exp_avg: torch.Tensor) -> tuple[float, float]:
    """``(sum sign(g) sign(m), number of non-zero pairs)`` over a sparse gradient's entries."""
    grad = grad.to_sparse_coo().coalesce()
    m = local_tensor(exp_avg)
    m_at = m[tuple(grad.indices().to(m.device))]  # (nnz, *dense dims): m where g is stored
    prod = torch.sign(real_view(grad.values()).float()) * torch.sign(real_view(m_at).float())
    prod = prod.nan_to_num_(nan=0.0)
    return float(prod.sum()), float(prod.abs().sum())
