r"""The output side of ``drift/*``: the base model's logits, masked and truncated whole updates.

Forward passes (all in eval mode under ``no_grad``, weights, flags and RNG states restored
exactly, also when a pass raises; see :mod:`~grail.trainer.analysis.patching.swaps`):

1. the live model's logits ``P_now``: the measurement's shared reference
   (:func:`~.sparse_quality.shared_reference`), so a measurement that also runs ``sparse/*``
   computes it once;
2. the base: every entry of :math:`\Delta_{tot}` dropped by one
   :class:`~grail.trainer.analysis.patching.swaps.SelectPatch` over the base delta (the weights
   are exchanged with the base snapshot and back: no copy). These logits give
   KL(P_now || P_base) and KL(P_base || P_now), both from one pass over the logit differences
   against the reference (no softmax of the base logits:
   :meth:`~grail.trainer.analysis.ops.divergence.LogitsReference.kl_sums_both`); then they are
   released;
3. per kept fraction ``r``: the same patch switched to the exact top-k mask (``k = round(rN)``,
   :func:`~grail.trainer.analysis.ops.budget.exact_budget_drops`), then to the random mask of the
   same budget over the changed entries (``p = min(k, changed) / changed``);
4. after the patch: DARE (``W_base + Delta_tot * m / p``) and the low-rank truncations, each
   written per module by :class:`~grail.trainer.analysis.patching.swaps.ModulePatch`;
5. with an attribution computer: its forwards over the base delta
   (:func:`~.attribution.attribution_metrics`: whole tensors exchanged with the base snapshot),
   against the same reference, under ``drift/attrib/``.

Every comparison, the reverse KL among them, is reduced over ranks in one reduction
(token-weighted over every rank's batch).

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> from grail.trainer.analysis.metrics.base import AnalysisContext
    >>> from grail.trainer.analysis.metrics.drift import DriftMetrics
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    >>> base = ParameterSnapshot(model)
    >>> ctx = AnalysisContext(model=model, inputs=torch.randint(0, 10, (2, 5)), base=base)
    >>> m = DriftMetrics(keep_ratios=[1.0]).compute(
    ...     current_snapshot=ParameterSnapshot.live(model), context=ctx)
    >>> m["drift/kl_base_now"], m["drift/top1_agree"], m["drift/tokens"]  # nothing moved yet
    (0.0, 1.0, 10.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import kernels
from ..core.distributed import all_reduce_
from ..core.snapshot import ParameterDelta
from ..ops.budget import exact_budget_drops
from ..ops.comparisons import Comparisons
from ..ops.divergence import LogitsReference
from ..ops.masks import magnitude_drop, mix_seed, random_drop
from ..ops.spectrum import Spectrum, aggregate_spectra
from ..patching.forward import PreparedInputs, run_forward
from ..patching.swaps import ModulePatch, SelectPatch, analysis_mode
from .attribution import attribution_groups, attribution_metrics
from .base import AnalysisContext
from .sparse_quality import SparseQualityMetrics, format_keep_ratio, shared_reference

if TYPE_CHECKING:
    from .drift import DriftMetrics
    from .low_rank import LowRankMetrics

__all__ = ["drift_outputs", "drift_spectra"]


def drift_spectra(
    low_rank: LowRankMetrics,
    base_delta: ParameterDelta,
    model: nn.Module | None,
    factors: bool,
    step: int,
) -> tuple[dict[str, Spectrum], dict[str, float]]:
    """Spectra of :math:`\\Delta_{tot}`'s matrices (``low_rank``'s settings and rule for which
    matrices; factors kept when truncations will be run) and ``drift/lowrank/energy_at_r{r}``."""
    from .low_rank import low_rank_targets  # only with low_rank_enabled

    names = low_rank_targets(base_delta, model, low_rank.include_embeddings)
    spectra, _ = low_rank._spectra(base_delta, names, factors, step) if names else ({}, [])
    summary = aggregate_spectra(spectra, low_rank.ranks)
    energy = {f"drift/lowrank/energy_at_r{r}": summary[f"energy_at_r{r}"] for r in low_rank.ranks}
    return spectra, energy


def _global(local: int) -> int:
    return int(all_reduce_(torch.tensor([local], dtype=torch.float64), "sum").item())


def drift_outputs(
    computer: DriftMetrics,
    model: nn.Module,
    context: AnalysisContext,
    prepared: PreparedInputs,
    delta: ParameterDelta | None,
    base_delta: ParameterDelta,
    spectra: dict[str, Spectrum],
) -> dict[str, float]:
    """The output keys of ``drift/*`` (see module docstring); ``delta`` is the interval delta
    the shared reference belongs to (``None``: the base delta's)."""
    c = computer
    total = sum(base_delta.shard(n).global_numel for n in base_delta.names)
    budgets = [max(1, min(total, round(r * total))) for r in c.keep_ratios]
    drops = exact_budget_drops(base_delta, budgets) if budgets else []  # collectives
    seed = mix_seed(c.seed, context.step, "drift")
    fused = kernels.use("swap", base_delta.numel(), c.fused, context.step)

    def forward() -> torch.Tensor:
        return run_forward(model, prepared, c.output_fn)

    probs: dict[str, float] = {}
    with analysis_mode(model):
        owner = delta if delta is not None else base_delta
        reference = shared_reference(context, owner, c.max_tokens, c.output_fn, forward, fused)
        comparisons = Comparisons(reference, kl_only=True, top1=True)  # the keys read no more
        everything = magnitude_drop(math.inf)  # every finite entry back to W_base
        with SelectPatch(base_delta, everything, count_dropped=False, fused=fused) as patch:
            base_logits = forward()
            changed = _global(patch.changed_count())
            comparisons.add("base", base_logits, reverse="base_reverse")
            del base_logits
            for r, k, drop in zip(c.keep_ratios, budgets, drops, strict=True):
                label = format_keep_ratio(r)
                patch.switch(drop)
                comparisons.add(label, forward())
                probs[label] = min(k, changed) / changed if changed else 0.0
                if c.include_random:
                    patch.switch(random_drop(probs[label], seed))
                    comparisons.add(f"{label}_random", forward())
        if c.rescale_random:
            for label, p in probs.items():
                if p > 0.0:  # nothing kept: 1/p is undefined, the keys stay NaN
                    with ModulePatch(model, SparseQualityMetrics._dare(base_delta, p, seed)):
                        comparisons.add(f"{label}_dare", forward())
        for r in c.low_rank.ranks if (c.low_rank is not None and spectra) else []:
            with ModulePatch(model, type(c.low_rank)._truncations(base_delta, spectra, r)):
                comparisons.add(f"r{r}", forward())
        attributed = _attribution(c, model, base_delta, reference, forward)
    results = comparisons.results()  # one reduction for every comparison
    out = _keys(c, results, results.pop("base_reverse"), comparisons.reference_rows, spectra)
    out.update(attributed)
    return out


def _attribution(
    c: DriftMetrics,
    model: nn.Module,
    base_delta: ParameterDelta,
    reference: LogitsReference,
    forward: Callable[[], torch.Tensor],
) -> dict[str, float]:
    """``drift/attrib/*``: the attribution computer's groups over the base delta, or ``{}``."""
    a = c.attribution
    if a is None:
        return {}
    groups = attribution_groups(base_delta.names, a.groups, a.component_map)
    return attribution_metrics(
        model,
        base_delta,
        reference,
        groups,
        forward,
        max_groups=a.max_groups,
        family="drift/attrib",
        skip_unchanged=a.skip_unchanged,
        rebind=a.rebind,
        log=c.log_once,
    )


def _keys(
    c: DriftMetrics,
    results: dict[str, dict[str, float]],
    backward: dict[str, float],
    tokens: int,
    spectra: dict[str, Spectrum],
) -> dict[str, float]:
    nan = dict.fromkeys(("kl", "top1_agree"), math.nan)
    out = {
        "drift/kl_base_now": backward["kl"],
        "drift/kl_now_base": results["base"]["kl"],
        "drift/top1_agree": results["base"]["top1_agree"],
        "drift/tokens": float(tokens),
    }
    variants = [""] + (["_random"] if c.include_random else [])
    variants += ["_dare"] if c.rescale_random else []
    for r in c.keep_ratios:
        for v in variants:
            label = f"{format_keep_ratio(r)}{v}"
            q = results.get(label, nan)
            out[f"drift/sparse/kl_at_{label}"] = q["kl"]
            out[f"drift/sparse/top1_agree_at_{label}"] = q["top1_agree"]
    if c.low_rank is not None and spectra:
        for r in c.low_rank.ranks:
            out[f"drift/lowrank/kl_at_r{r}"] = results[f"r{r}"]["kl"]
            out[f"drift/lowrank/top1_agree_at_r{r}"] = results[f"r{r}"]["top1_agree"]
    return out

