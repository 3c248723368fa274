r"""How much, where and how sparsely the weights moved: ``param_change/*``.

With :math:`\Delta = W_{new} - W_{old}` over all analysed entries (non-finite deltas are counted
in ``nonfinite_count`` and excluded from every other statistic except the denominators of the
ratios):

==============================  ====================================================================
key                             definition
==============================  ====================================================================
``norm_l2``                     :math:`\lVert\Delta\rVert_2`
``norm_l1``                     :math:`\sum|\Delta|`
``norm_max``                    :math:`\max|\Delta|`
``mean`` / ``std``              mean and population standard deviation of the entries
``min`` / ``max``               extreme entries
``relative_norm``               :math:`\lVert\Delta\rVert_2 / \lVert W_{old}\rVert_2`
``sparsity_at_{T}``             fraction of entries with :math:`|\Delta| \le T`
``changed_ratio_at_{T}``        ``1 - sparsity_at_{T}``
``exact_unchanged_ratio``       fraction whose stored value is equal before and after (in the
                                snapshot's dtype; +0 and -0 count as equal)
``bf16_unchanged_ratio``        fraction equal after rounding both sides to bfloat16: what a bf16
                                run would call unchanged
``sign_flip_ratio``             fraction with :math:`\mathrm{sign}(W_{new})\,\mathrm{sign}(W_{old})`
                                negative (``param_change_track_sign_flips``)
``nonfinite_count``             number of NaN/Inf deltas
``num_params``                  number of entries analysed
==============================  ====================================================================

Per layer (``param_change/layer_{i}/...``) and per component (``param_change/component/{c}/...``)
the keys are ``mean_abs_delta``, ``norm_l2``, ``relative_norm``, ``sparsity`` (=
``exact_unchanged_ratio`` of the group) and ``sparsity_at_{T}``. Groups come from
:mod:`~grail.trainer.analysis.core.naming`.

Reading it: a bf16 model trained with a small learning rate shows a high
``exact_unchanged_ratio`` because updates below about 2^-9 of a weight are rounded away; if
``bf16_unchanged_ratio`` of an fp32 run is high but ``exact_unchanged_ratio`` is near 0, the
apparent sparsity is rounding, not a sparse update.

On CPU, when the kernels run (``fused``, see :mod:`~grail.trainer.analysis.kernels.policy`) and
the snapshot is lossless, each parameter is computed in one compiled loop
(:class:`~grail.trainer.analysis.kernels.ChangeBatch`, float64 sums); other snapshots, devices
and layouts take the chunked eager path, and so does a delta whose
:attr:`~grail.trainer.analysis.core.snapshot.ParameterDelta.kernel_streamable` is False (one
that observes its stream, or reads its tensors lazily from a checkpoint). Both paths give the
same numbers (tested).

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> model = torch.nn.Linear(3, 1, bias=False)
    >>> old = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     model.weight[0, 0] += 1e-3
    >>> m = ParameterChangeMetrics(thresholds=[1e-4]).compute(
    ...     old.compute_delta(ParameterSnapshot.live(model)))
    >>> m["param_change/sparsity_at_1e-04"], m["param_change/exact_unchanged_ratio"]
    (0.6666666666666666, 0.6666666666666666)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .. import kernels
from ..config import AnalysisConfig, format_threshold
from ..core.naming import ParameterNaming, group_prefix, group_rows
from ..core.scratch import ScratchBuffers
from ..core.snapshot import DeltaChunk, ParameterDelta
from ..core.stats import StreamingStats, Summary, chunk_numel, count_zeros
from .base import MetricComputer

__all__ = ["ParameterChangeMetrics", "update_norm_key"]

_EXTRAS = ("old_sum_sq", "exact_unchanged", "bf16_unchanged", "sign_flips")


def update_norm_key(delta: ParameterDelta) -> tuple[str, ParameterDelta]:
    """Key under which :class:`ParameterChangeMetrics` shares the squared L2 norm of ``delta``
    (summed over ranks) in the measurement's context, when every entry is finite:
    ``drift/cos_interval`` reads it instead of passing over the update again."""
    return ("param_change/sum_sq", delta)


class ParameterChangeMetrics(MetricComputer):
    """Streaming statistics of the parameter update (see module docstring for every key)."""

    name = "param_change"

    def __init__(
        self,
        thresholds: Sequence[float] = (0.0, 1e-8, 1e-6, 1e-4),
        per_layer: bool = False,
        track_components: bool = False,
        track_sign_flips: bool = False,
        component_map: Mapping[str, str] | None = None,
        fused: bool | str = "auto",
    ) -> None:
        self.thresholds = sorted(float(t) for t in thresholds)
        self.fused = fused
        self.per_layer = per_layer
        self.track_components = track_components
        self.track_sign_flips = track_sign_flips
        self.component_map = dict(component_map or {})
        self._naming: tuple[tuple[str, ...], ParameterNaming] | None = None
        self._scratch = ScratchBuffers(chunk_numel)

    @classmethod
    def from_config(
        cls, config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
    ) -> ParameterChangeMetrics:
        return cls(
            thresholds=config.param_change_thresholds,
            per_layer=config.param_change_per_layer,
            track_components=config.param_change_track_components,
            track_sign_flips=config.param_change_track_sign_flips,
            component_map=config.component_map,
            fused=config.fused_kernels,
        )

    # --- grouping --------------------------------------------------------------------------
    def _groups(self, names: list[str]) -> tuple[list[str], dict[str, list[int]]]:
        key = tuple(names)
        if self._naming is None or self._naming[0] != key:
            self._naming = (key, ParameterNaming(names, self.component_map))
        return group_rows(self._naming[1], names, self.per_layer, self.track_components)

    # --- computation -----------------------------------------------------------------------
    def compute(self, delta: ParameterDelta | None = None, **kwargs: Any) -> dict[str, float]:
        # Scratch buffers live for one measurement only: between measurements the analysis
        # holds nothing but the snapshot (GPU memory belongs to training).
        try:
            return self._compute(delta=delta, **kwargs)
        finally:
            self._scratch.clear()

    @kernels.timed()  # the work the kernels replace, for the "auto" policy
    def _compute(self, delta: ParameterDelta | None = None, **kwargs: Any) -> dict[str, float]:
        if delta is None or len(delta) == 0:
            return {}
        groups, rows = self._groups(delta.names)
        device = next(iter(delta.new.data.values())).device
        stats = StreamingStats(
            sorted({0.0, *self.thresholds}), groups=groups, extra_sums=_EXTRAS, device=device
        )
        eager = delta.names
        # The kernels read whole tensors from the snapshots instead of streaming them: only a
        # delta that says so (not an observed or lazily loaded one) goes to them.
        whole = delta.kernel_streamable
        numel = sum(delta.new.shards[n].global_numel for n in delta.names) if whole else 0
        step = getattr(kwargs.get("context"), "step", None)
        if kernels.use("change", numel, self.fused if whole else False, step):
            batch = kernels.ChangeBatch(stats.thresholds_f32)
            eager = [n for n in delta.names if not self._take(batch, delta, n, rows[n])]
            sums, maxes, extras, batch_groups = batch.rows()
            if not self.track_sign_flips:
                extras["sign_flips"].zero_()
            stats.accumulate_rows(sums, maxes, batch_groups, extras)
        for chunk in delta.stream(eager):
            self._update(stats, chunk, rows[chunk.name], delta)
        stats.all_reduce()
        results = stats.results()
        context = kwargs.get("context")
        if context is not None and results[0].nonfinite == 0:
            context.share(update_norm_key(delta), results[0].sum_sq)
        return self._finalize(results, groups)

    @staticmethod
    def _take(
        batch: kernels.ChangeBatch, delta: ParameterDelta, name: str, rows: list[int]
    ) -> bool:
        """Give one parameter to the compiled kernels: lossless snapshot, same device; a
        parameter another rank counts is 'taken' (skipped) as :meth:`ParameterDelta.stream`
        skips it."""
        if not delta.new.shards[name].owner:
            return True
        new, old = delta.new.data[name], delta.old.data[name]
        if not (delta.old.is_lossless(name) and new.is_contiguous() and old.is_contiguous()):
            return False
        bf16_param = delta.new.param_dtypes[name] == torch.bfloat16
        return batch.add(new.view(-1), old.view(-1), rows, bf16_param)

    def _update(
        self, stats: StreamingStats, c: DeltaChunk, rows: list[int], delta: ParameterDelta
    ) -> None:
        n = c.delta.numel()
        if n == 0:
            return
        sums, maxes = stats.moments(c.delta)
        scratch, device = self._scratch, c.delta.device
        a, b = scratch.get(device, n, slot="a"), scratch.get(device, n, slot="b")
        old32 = c.old if c.old.dtype == torch.float32 else a.copy_(c.old)
        old_sum_sq = torch.mul(old32, old32, out=b).sum()
        if c.lossless:
            # The float32 delta of a lossless snapshot is exact, so it is zero iff the stored
            # values are equal: the chunk's threshold-0 count is the exact-unchanged count.
            exact = sums[stats.column(0.0)]
        else:
            a.copy_(c.new.to(c.old.dtype)).sub_(c.old)
            exact = count_zeros(a, b)
        if c.lossless and delta.new.param_dtypes[c.name] == torch.bfloat16:
            bf16 = exact
        else:
            # Round both sides to bf16 and compare bit patterns: int16 arithmetic is cheap and
            # a wrapped difference is zero iff the patterns are equal.
            nb = scratch.get(device, n, torch.bfloat16, slot="new")
            ob = scratch.get(device, n, torch.bfloat16, slot="old")
            i16 = scratch.get(device, n, torch.int16)
            nb.copy_(c.new)
            ob.copy_(c.old)
            diff = torch.sub(nb.view(torch.int16), ob.view(torch.int16), out=i16)
            bf16 = n - diff.sign_().abs_().sum(dtype=torch.int32).float()
        if self.track_sign_flips:
            a.copy_(c.new).sign_()
            b.copy_(c.old).sign_()
            flips = -a.mul_(b).clamp_(max=0).nan_to_num_(nan=0.0).sum()
        else:
            flips = old_sum_sq.new_zeros(())
        extras = {
            "old_sum_sq": old_sum_sq,
            "exact_unchanged": exact,
            "bf16_unchanged": bf16,
            "sign_flips": flips,
        }
        stats.accumulate(sums, maxes, rows, {k: e.double() for k, e in extras.items()})

    def _finalize(self, results: list[Summary], groups: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for group, r in zip(groups, results):
            total = r.count + r.nonfinite
            if total == 0:
                continue
            exact = r.extra["exact_unchanged"]
            rel = r.norm_l2 / r.extra["old_sum_sq"] ** 0.5 if r.extra["old_sum_sq"] > 0 else 0.0
            if group == "all":
                p = "param_change/"
                out.update({p + k: v for k, v in r.five_numbers().items()})
                out[p + "relative_norm"] = rel
                for t in self.thresholds:
                    sp = r.le[t] / total
                    out[f"{p}sparsity_at_{format_threshold(t)}"] = sp
                    out[f"{p}changed_ratio_at_{format_threshold(t)}"] = 1.0 - sp
                out[p + "exact_unchanged_ratio"] = exact / total
                out[p + "bf16_unchanged_ratio"] = r.extra["bf16_unchanged"] / total
                if self.track_sign_flips:
                    out[p + "sign_flip_ratio"] = r.extra["sign_flips"] / total
                out[p + "nonfinite_count"] = float(r.nonfinite)
                out[p + "num_params"] = float(total)
            else:
                p = group_prefix("param_change", group)
                out[p + "mean_abs_delta"] = r.mean_abs
                out[p + "norm_l2"] = r.norm_l2
                out[p + "relative_norm"] = rel
                out[p + "sparsity"] = exact / total
                for t in self.thresholds:
                    out[f"{p}sparsity_at_{format_threshold(t)}"] = r.le[t] / total
        return out
