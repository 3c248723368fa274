r"""Would the large changes alone have done the job? ``sparse/*``.

For each magnitude threshold :math:`T` the live model (the full update :math:`W_{new}`) is
compared with the model whose weights are

.. math:: W_T = W_{old} + \Delta \odot [\,|\Delta| > T\,]

(the *magnitude mask*) and with a *random mask* of the same budget: each entry the update
changed is kept with probability :math:`p = \text{kept} / \text{changed}`, so on average it keeps
as many changes as the magnitude mask (entries the update did not touch are identical in every
variant; drawing over all entries would give the random mask far fewer real changes whenever
most entries are unchanged, as in bf16 training). Optionally the random mask is rescaled by
``1/p`` (DARE: :math:`W_{old} + \Delta \odot m / p`). Targets can also be given as kept fractions
(``sparse_quality_keep_ratios``): the global magnitude threshold keeping that fraction is found
exactly, and the fraction actually achieved is reported.

Keys, for a label ``L`` (``1e-06`` for a threshold, ``keep_0.01`` for a kept fraction):

===============================  ===================================================================
``sparse/kl_at_L``               mean over compared tokens of KL(P_full || P_masked)
``sparse/cosine_at_L``           mean cosine similarity of the logit vectors
``sparse/mse_at_L``              mean squared logit difference
``sparse/top1_agree_at_L``       fraction of tokens whose argmax agrees
``sparse/kept_ratio_at_L``       fraction of entries the magnitude mask keeps (``|Δ| > T``)
``sparse/unchanged_ratio_at_L``  fraction left at ``W_old`` by the magnitude mask (``|Δ| <= T``)
``..._random`` / ``..._dare``    the four quality numbers for the random / rescaled random mask
``sparse/threshold_at_keep_r``   the threshold found for a kept fraction ``r``
``sparse/tokens``                number of token positions compared
``sparse/nonfinite``             token positions dropped because some logits were NaN/Inf
===============================  ===================================================================

Reading it: a small ``kl_at_L`` with a small ``kept_ratio_at_L`` means a sparse update of that
density reproduces the fine-tune; if the random mask is nearly as good as the magnitude mask, the
update is redundant rather than concentrated in large entries.

All forward passes run in eval mode under ``no_grad`` on the batch the caller passes (cut to
``max_tokens`` positions); weights, gradients, training flags and RNG states are exactly
restored, also when a pass fails (see :mod:`~grail.trainer.analysis.patching.swaps`).

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> from grail.trainer.analysis.metrics.base import AnalysisContext
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    >>> old = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     _ = model[1].weight.add_(0.01)
    >>> delta = old.compute_delta(ParameterSnapshot.live(model))
    >>> ctx = AnalysisContext(model=model, inputs=torch.randint(0, 10, (2, 5)), step=1)
    >>> m = SparseQualityMetrics(thresholds=[0.0]).compute(delta, context=ctx)
    >>> m["sparse/kl_at_0e+00"], m["sparse/top1_agree_at_0e+00"], m["sparse/tokens"]
    (0.0, 1.0, 10.0)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import kernels
from ..config import AnalysisConfig, format_threshold
from ..core.distributed import all_reduce_
from ..core.engines import unwrap_model
from ..core.snapshot import ParameterDelta
from ..keys import format_keep_ratio  # the key grammar; re-exported here
from ..ops.comparisons import Comparisons
from ..ops.divergence import LogitsReference
from ..ops.masks import (
    keep_ratio_thresholds,
    keep_threshold_bits,
    magnitude_drop,
    mix_seed,
    random_bits,
    random_drop,
)
from ..patching.forward import PreparedInputs, agree_across_ranks, prepare_inputs, run_forward
from ..patching.swaps import ModulePatch, SelectPatch, analysis_mode
from .base import AnalysisContext, MetricComputer

__all__ = ["SparseQualityMetrics", "format_keep_ratio", "shared_reference"]

logger = logging.getLogger(__name__)

_QUALITY = ("kl", "cosine", "mse", "top1_agree")


class SparseQualityMetrics(MetricComputer):
    """Output quality of magnitude- and random-masked updates (see module docstring)."""

    name = "sparse"

    def __init__(
        self,
        thresholds: Sequence[float] = (1e-6,),
        include_random: bool = True,
        seed: int = 0,
        rescale_random: bool = False,
        keep_ratios: Sequence[float] = (),
        max_tokens: int = 4096,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        fused: bool | str = "auto",
    ) -> None:
        self.thresholds = sorted(float(t) for t in thresholds)
        self.include_random = include_random
        self.seed = seed
        self.rescale_random = rescale_random
        self.keep_ratios = sorted(float(r) for r in keep_ratios)
        self.max_tokens = max_tokens
        self.output_fn = output_fn
        self.fused = fused

    @classmethod
    def from_config(
        cls, config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
    ) -> SparseQualityMetrics:
        return cls(
            thresholds=config.sparse_quality_thresholds,
            include_random=config.sparse_quality_include_random,
            seed=config.sparse_quality_seed,
            rescale_random=config.sparse_quality_rescale_random,
            keep_ratios=config.sparse_quality_keep_ratios,
            max_tokens=config.sparse_quality_max_tokens,
            output_fn=output_fn,
            fused=config.fused_kernels,
        )

    def requires_model(self) -> bool:
        return True

    def requires_inputs(self) -> bool:
        return True

    # --- masks -----------------------------------------------------------------------------
    def _targets(self, delta: ParameterDelta) -> list[tuple[str, float]]:
        """``(label, threshold)`` for every configured threshold and kept fraction."""
        targets = [(format_threshold(t), t) for t in self.thresholds]
        if self.keep_ratios:
            found = keep_ratio_thresholds(
                lambda: (c.delta for c in delta.stream()),
                self.keep_ratios,
                reduce=lambda t: all_reduce_(t, "sum"),
                device=next(iter(delta.new.data.values())).device,
            )
            targets += [(format_keep_ratio(r), found[r]) for r in self.keep_ratios]
        return targets

    @staticmethod
    def _global_count(delta: ParameterDelta, local: int | None = None) -> int:
        """Sum over ranks of ``local`` (default: this rank's owned entries)."""
        if local is None:
            local = sum(delta.new.data[n].numel() for n in delta.names if delta.shard(n).owner)
        return int(all_reduce_(torch.tensor([local], dtype=torch.float64), "sum").item())

    @staticmethod
    def _dare(
        delta: ParameterDelta, keep_prob: float, seed: int
    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        def make(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
            def value(current: torch.Tensor) -> torch.Tensor:
                old = delta.old.data[name].to(current.device).float().view_as(current)
                bits = random_bits(
                    current.numel(), seed, name, delta.shard(name).offset, current.device
                ).view_as(current)
                scaled = old + (current.float() - old) / keep_prob
                return torch.where(bits < keep_threshold_bits(keep_prob), scaled, old)

            return value

        return {name: make(name) for name in delta.names}

    # --- computation -----------------------------------------------------------------------
    def compute(
        self,
        delta: ParameterDelta | None = None,
        context: AnalysisContext | None = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        if delta is None or len(delta) == 0:
            return self.skip("no parameter delta")
        if context is None or context.model is None:
            return self.skip("no model in the context")
        model = unwrap_model(context.model)
        prepared = agree_across_ranks(prepare_inputs(model, context.inputs, self.max_tokens))
        if isinstance(prepared, str):
            return self.skip_inputs(prepared)
        targets = self._targets(delta)
        total = self._global_count(delta)
        seed = mix_seed(self.seed, context.step)
        # compiled swaps and comparisons (kernels.select_swap, kernels.compare_rows) once they
        # repay compiling them (SelectPatch and LogitsReference time their work for the policy)
        fused = kernels.use("swap", delta.numel(), self.fused, context.step)
        rows = kernels.use("rows", delta.numel(), self.fused, context.step)
        out: dict[str, float] = {}
        with analysis_mode(model):
            comparisons = Comparisons(self._reference(context, model, prepared, delta, rows))
            changed: int | None = None  # the same for every threshold: counted once
            for label, threshold in targets:
                counting = changed is None
                drop = magnitude_drop(threshold)
                with SelectPatch(delta, drop, count_changed=counting, fused=fused) as patch:
                    comparisons.add(label, self._forward(model, prepared))
                    dropped = self._global_count(delta, patch.dropped_count())
                    if changed is None:
                        changed = self._global_count(delta, patch.changed_count())
                    # Equal budget: as many kept changes as the magnitude mask, on average.
                    # Entries the update did not touch are identical either way, so only
                    # changed ones draw.
                    prob = min(1.0, (total - dropped) / changed) if changed else 0.0
                    if self.include_random:  # straight from one mask to the other
                        patch.switch(random_drop(prob, seed))
                        comparisons.add(f"{label}_random", self._forward(model, prepared))
                keep = 1.0 - dropped / total if total else 0.0
                out[f"sparse/kept_ratio_at_{label}"] = keep
                out[f"sparse/unchanged_ratio_at_{label}"] = 1.0 - keep
                if label.startswith("keep_"):
                    out[f"sparse/threshold_at_{label}"] = threshold
                if self.rescale_random and prob > 0.0:
                    with ModulePatch(model, self._dare(delta, prob, seed)):
                        comparisons.add(f"{label}_dare", self._forward(model, prepared))
        results = comparisons.results()  # token-weighted over every rank's batch
        # every comparison drops the reference's bad rows too: report the worst comparison
        nonfinite = comparisons.reference_nonfinite
        for label, _ in targets:
            variants = [label, f"{label}_random"] if self.include_random else [label]
            if self.rescale_random:
                variants.append(f"{label}_dare")
            for variant in variants:
                # nothing kept: 1/keep rescaling is undefined; keys stay stable as NaN
                q = results.get(variant, dict.fromkeys(_QUALITY, math.nan))
                nonfinite = max(nonfinite, int(q.get("nonfinite_rows", 0)))
                out.update({f"sparse/{k}_at_{variant}": q[k] for k in _QUALITY})
        out["sparse/tokens"] = float(comparisons.reference_rows)
        out["sparse/nonfinite"] = float(nonfinite)
        return out

    def _forward(self, model: torch.nn.Module, prepared: PreparedInputs) -> torch.Tensor:
        return run_forward(model, prepared, self.output_fn)

    def _reference(
        self,
        context: AnalysisContext,
        model: torch.nn.Module,
        prepared: PreparedInputs,
        delta: ParameterDelta,
        fused: bool | kernels.Use = False,
    ) -> LogitsReference:
        """The full update's logits, shared with the other computers of this measurement that
        prepare the same batch (see :func:`shared_reference`)."""
        return shared_reference(
            context,
            delta,
            self.max_tokens,
            self.output_fn,
            lambda: self._forward(model, prepared),
            fused=fused,
        )


def shared_reference(
    context: AnalysisContext,
    delta: ParameterDelta,
    max_tokens: int,
    output_fn: Callable[[Any], torch.Tensor] | None,
    forward: Callable[[], torch.Tensor],
    fused: bool | kernels.Use = False,
) -> LogitsReference:
    """:class:`LogitsReference` of ``forward()`` (the unpatched model on the prepared batch),
    computed once per measurement: the sparse and low-rank computers share it instead of running
    the same forward pass twice.

    One entry per token cap and output function, tied to ``delta``: a context reused with
    another delta (other weights) recomputes and replaces it. The entry lives as long as the
    context, i.e. one measurement; it holds two logits-sized tensors, less than the peak of
    either computer (reference plus a patched variant plus comparison buffers). ``fused``
    compares through the compiled kernel (the first computer to ask decides for both).
    """
    key = ("reference_logits", max_tokens, output_fn)
    owner, reference = context.shared(key, lambda: (delta, LogitsReference(forward(), fused)))
    if owner is not delta:
        owner, reference = delta, LogitsReference(forward(), fused)
        context.share(key, (owner, reference))
    return reference
