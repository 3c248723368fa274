r"""How far has the run moved from the base model? ``drift/*``.

Every other family looks at one interval (:math:`W_{new} - W_{old}`). This one looks at the whole
fine-tune so far, :math:`\Delta_{tot} = W_{now} - W_{base}`, where :math:`W_{base}` is the base
snapshot the manager holds (:meth:`~grail.trainer.analysis.ModelAnalysisManager.set_base`; by
default the weights at the first ``on_optimizer_step``). Windows that are each sparse but in
different places add up to a dense update: whether LoRA or a sparse update would do is a question
about :math:`\Delta_{tot}`.

**Statistics** (the parameter-change statistics, computed by the same code on
:math:`\Delta_{tot}`; non-finite entries are excluded from the norms and count as changed):

================================  ==================================================================
``drift/norm_l2``                 :math:`\lVert\Delta_{tot}\rVert_2`
``drift/relative_norm``           :math:`\lVert\Delta_{tot}\rVert_2 / \lVert W_{base}\rVert_2`
``drift/norm_max``                :math:`\max|\Delta_{tot}|`
``drift/exact_unchanged_ratio``   fraction of entries whose stored value equals the base's
``drift/bf16_unchanged_ratio``    fraction equal to the base after rounding both to bfloat16
``drift/changed_ratio_at_{T}``    fraction with :math:`|\Delta_{tot}| > T`
                                  (``param_change_thresholds``)
``drift/cos_interval``            :math:`\cos(W_{now} - W_{prev}, W_{prev} - W_{base})`, with
                                  :math:`W_{prev}` the interval snapshot: does this interval
                                  continue the run's direction? NaN while
                                  :math:`W_{prev} = W_{base}` (or either difference is 0 or
                                  not finite)
================================  ==================================================================

With ``per_layer`` / ``track_components`` the first six repeat as ``drift/layer_{i}/...`` and
``drift/component/{c}/...``.

**Overlap with saved masks** (``drift_reference_masks``, see :mod:`~.drift_overlap`):
``drift/overlap/{name}/jaccard``, ``jaccard_random``, ``overlap_now_in_ref`` and
``overlap_ref_in_now`` compare the changed set of :math:`\Delta_{tot}` (under the mask's own
criterion) with each saved mask; the masks are checked against the model when the base is taken
(:meth:`DriftMetrics.check_base`).

**Outputs** (a model and inputs given; the batch handling, token weighting, padding and
``max_tokens`` cap of :mod:`~.sparse_quality`, see :mod:`~.drift_outputs`):

======================================  ==========================================================
``drift/kl_base_now``                   mean over compared tokens of KL(P_base || P_now)
``drift/kl_now_base``                   mean over compared tokens of KL(P_now || P_base)
``drift/top1_agree``                    fraction of tokens whose argmax agrees (base vs now)
``drift/tokens``                        token positions compared (all ranks)
``drift/sparse/kl_at_keep_{r}``         KL(P_now || P_masked),
                                        :math:`W_{masked} = W_{base} + \Delta_{tot} \odot m`,
                                        :math:`m` keeping exactly :math:`k = round(rN)` entries
                                        of largest :math:`|\Delta_{tot}|` (global top-k, ties in
                                        name then position order, as ``sparse/*_at_budget_*``)
``..._random``, ``..._dare``            a random mask keeping as many changed entries on average
                                        (and rescaled by 1/p, DARE), as in ``sparse/*``
``drift/sparse/top1_agree_at_keep_{r}`` top-1 agreement of the same (and its variants)
``drift/lowrank/energy_at_r{r}``        share of :math:`\Delta_{tot}`'s energy in rank-r
                                        truncations (``low_rank_enabled``)
``drift/lowrank/kl_at_r{r}``            KL(P_now || P_r) with :math:`W_{base}` plus the rank-r
                                        truncation of :math:`\Delta_{tot}` in every matrix (and
                                        ``top1_agree_at_r{r}``)
``drift/attrib/...``                    output attribution of :math:`\Delta_{tot}` per group
                                        (``attribution_enabled``): the keys of
                                        :mod:`~.attribution` with :math:`W_{old} = W_{base}`
======================================  ==========================================================

**Principal geometry of the whole fine-tune** (``principal_enabled``): ``drift/principal/...``
are the keys of :mod:`~.principal` with :math:`W_{ref} = W_{base}` and
:math:`\Delta W = \Delta_{tot}`. The base's top factors are decomposed once per base and kept
(:class:`~grail.trainer.analysis.ops.principal.FactorCache` on ``snapshot_device``,
:math:`k(m+n)+k` numbers per matrix; none with ``principal_cache_factors=False``); later
measurements decompose only :math:`W_{now}`, once per measurement also when ``principal/*``
runs (its :math:`W_{new}` is the same live weights; the factors are shared through the
context). The base's factors are found by a fingerprint of the base matrix, so they survive
``reset()`` (which may keep the base) and a new base simply misses them.
No inputs are needed.

Reading it: ``drift/kl_base_now`` growing while ``sparse/*`` stays small per window means many
small windows adding up; a small ``drift/sparse/kl_at_keep_0.01`` says the whole fine-tune could
have been a 1% sparse update. RL's Razor (Shenfeld et al. 2025) finds forgetting predicted by
KL(fine-tuned || base) on the task's data, not by weight norms.

Cost: the statistics are one streamed pass over :math:`W_{now}` and :math:`W_{base}` (the
compiled parameter-change kernels where they apply). ``cos_interval`` needs no pass of its own
in the steady state:
:math:`\langle a, b\rangle = (\lVert a+b\rVert^2 - \lVert a\rVert^2 - \lVert b\rVert^2)/2` with
:math:`a + b = \Delta_{tot}`; :math:`\lVert a\rVert^2` is shared by ``param_change`` through the
context (:func:`~.parameter_change.update_norm_key`) and :math:`\lVert b\rVert^2` is the previous
measurement's :math:`\lVert\Delta_{tot}\rVert^2` when the interval snapshot holds those weights
losslessly (it is carried in the computer's state, with its step and the base's ``uid``, so a
resumed run reuses it too). Otherwise (the first measurement, a lossy ``snapshot_dtype``,
``param_change`` off, another base) the missing norm is one streamed pass; every rank agrees on
which (one tiny reduction). Accuracy: the three sums carry the statistics' rounding (float64 in
the compiled kernels; float32 chunk sums on the eager path, ~1e-7 relative), so the cosine's
absolute error is about that times
:math:`\lVert a\rVert/\lVert b\rVert + \lVert b\rVert/\lVert a\rVert`.
Outputs: the base logits are computed once and give both KLs (KL(P_base || P_now) in
row blocks, so only a block of base probabilities is held); then one forward per mask.

Decisions where the design is silent: the random masks draw with
``mix_seed(seed, step, "drift")`` (not the interval's masks); a non-finite entry of
:math:`\Delta_{tot}` stays at :math:`W_{now}` in the base forward (its weight is not finite
anyway); keys of the outputs are absent, as for ``sparse/*``, when no inputs are given.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> from grail.trainer.analysis.metrics.base import AnalysisContext
    >>> model = torch.nn.Linear(4, 1, bias=False)
    >>> base = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     model.weight[0, 0] += 0.5
    >>> m = DriftMetrics(thresholds=[0.0]).compute(
    ...     current_snapshot=ParameterSnapshot.live(model), context=AnalysisContext(base=base))
    >>> m["drift/norm_l2"], m["drift/exact_unchanged_ratio"], m["drift/changed_ratio_at_0e+00"]
    (0.5, 0.75, 0.25)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..config import AnalysisConfig, format_threshold
from ..core.distributed import all_reduce_
from ..core.engines import unwrap_model
from ..core.naming import group_prefix
from ..core.snapshot import ParameterDelta, ParameterSnapshot
from ..core.stats import Summary
from ..ops.principal import FactorCache
from ..patching.forward import agree_across_ranks, prepare_inputs
from .base import AnalysisContext, MetricComputer
from .drift_outputs import drift_outputs, drift_spectra
from .drift_overlap import ReferenceMasks
from .parameter_change import ParameterChangeMetrics, update_norm_key

if TYPE_CHECKING:
    from .attribution import AttributionMetrics
    from .low_rank import LowRankMetrics
    from .principal import PrincipalMetrics

__all__ = ["DriftMetrics"]

_NAN = math.nan


class _Statistics(ParameterChangeMetrics):
    """The parameter-change statistics of :math:`\\Delta_{tot}`, under drift's keys."""

    name = "drift"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.total: Summary | None = None  # the "all" group of the last computation

    def _finalize(self, results: list[Summary], groups: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        self.total = results[0] if results else None
        for group, r in zip(groups, results, strict=True):
            total = r.count + r.nonfinite
            if total == 0:
                continue
            p = "drift/" if group == "all" else group_prefix("drift", group)
            base_sq = r.extra["old_sum_sq"]
            out[p + "norm_l2"] = r.norm_l2
            out[p + "relative_norm"] = r.norm_l2 / base_sq**0.5 if base_sq > 0 else 0.0
            out[p + "norm_max"] = r.norm_max
            out[p + "exact_unchanged_ratio"] = r.extra["exact_unchanged"] / total
            out[p + "bf16_unchanged_ratio"] = r.extra["bf16_unchanged"] / total
            for t in self.thresholds:
                out[f"{p}changed_ratio_at_{format_threshold(t)}"] = 1.0 - r.le[t] / total
        return out


def _sum_sq(delta: ParameterDelta) -> torch.Tensor:
    """This rank's float64 sum of squares of ``delta`` (owned entries; NaN if any is not)."""
    acc = torch.zeros((), dtype=torch.float64)
    for c in delta.stream():
        acc += torch.linalg.vector_norm(c.delta, dtype=torch.float64).square().cpu()
    return acc


class DriftMetrics(MetricComputer):
    """Base-anchored statistics and output divergences (see module docstring for every key).

    Args:
        thresholds: ``changed_ratio_at_{T}`` thresholds (``param_change_thresholds``).
        per_layer, track_components, component_map: group keys as for ``param_change``.
        keep_ratios: kept fractions of the masked-update KLs.
        include_random, rescale_random, seed, max_tokens: as for ``sparse/*``.
        low_rank: the low-rank computer whose spectrum settings are used (``None``: no
            ``drift/lowrank/*``).
        output_fn: model output -> logits (see
            :func:`~grail.trainer.analysis.patching.forward.logits_from_output`).
        fused: allow the compiled kernels.
        reference_masks: ``name -> mask file`` of ``drift/overlap/{name}/*``
            (``drift_reference_masks``; see :mod:`~.drift_overlap`), opened lazily here.
        attribution: the attribution computer whose groups and limits give
            ``drift/attrib/*`` (``None``: none).
        principal: the principal-geometry computer whose settings give
            ``drift/principal/*`` (``None``: none); the base's factors are cached here.
    """

    name = "drift"

    def __init__(
        self,
        thresholds: Sequence[float] = (0.0, 1e-8, 1e-6, 1e-4),
        per_layer: bool = False,
        track_components: bool = False,
        component_map: Mapping[str, str] | None = None,
        keep_ratios: Sequence[float] = (0.01, 0.1),
        include_random: bool = True,
        rescale_random: bool = False,
        seed: int = 0,
        max_tokens: int = 4096,
        low_rank: LowRankMetrics | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        fused: bool | str = "auto",
        reference_masks: Mapping[str, str | os.PathLike] | None = None,
        attribution: AttributionMetrics | None = None,
        principal: PrincipalMetrics | None = None,
    ) -> None:
        self.statistics = _Statistics(
            thresholds,
            per_layer=per_layer,
            track_components=track_components,
            component_map=component_map,
            fused=fused,
        )
        self.keep_ratios = sorted(float(r) for r in keep_ratios)
        self.include_random = include_random
        self.rescale_random = rescale_random
        self.seed = seed
        self.max_tokens = max_tokens
        self.low_rank = low_rank
        self.output_fn = output_fn
        self.fused = fused
        self.references = ReferenceMasks(reference_masks) if reference_masks else None
        self.attribution = attribution
        self.principal = principal
        # the base's factors: decomposed once per base (the fingerprint tells bases apart, so
        # they are kept over reset(), which may keep the base); none without principal's cache
        self.base_factors = (
            FactorCache(principal.cache_device, tracks="reference")
            if principal is not None and principal.cache is not None
            else None
        )
        # (step, base identity, ||W_now - W_base||^2) of the last measurement: the next one's
        # ||W_prev - W_base||^2 when the interval snapshot holds those weights losslessly
        self._last_norm: tuple[int, str, float] | None = None

    @classmethod
    def from_config(
        cls, config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
    ) -> DriftMetrics:
        low_rank = None
        if config.low_rank_enabled:
            from .low_rank import LowRankMetrics

            low_rank = LowRankMetrics.from_config(config, output_fn=output_fn)
        attribution = principal = None
        if config.attribution_enabled:
            from .attribution import AttributionMetrics

            attribution = AttributionMetrics.from_config(config, output_fn=output_fn)
        if config.principal_enabled:
            from .principal import PrincipalMetrics

            principal = PrincipalMetrics.from_config(config)
        return cls(
            thresholds=config.param_change_thresholds,
            per_layer=config.param_change_per_layer,
            track_components=config.param_change_track_components,
            component_map=config.component_map,
            keep_ratios=config.drift_keep_ratios,
            include_random=config.sparse_quality_include_random,
            rescale_random=config.sparse_quality_rescale_random,
            seed=config.sparse_quality_seed,
            max_tokens=config.sparse_quality_max_tokens,
            low_rank=low_rank,
            output_fn=output_fn,
            fused=config.fused_kernels,
            reference_masks=config.drift_reference_masks,
            attribution=attribution,
            principal=principal,
        )

    def requires_base(self) -> bool:
        return True

    def check_base(self, base: ParameterSnapshot) -> None:
        """The reference masks must fit the model (``MaskFileError`` otherwise)."""
        if self.references is not None:
            self.references.check(base)

    def reset(self) -> None:
        self._last_norm = None

    def state_dict(self) -> dict[str, Any]:
        """``{"last_norm": [step, base uid, ||W_now - W_base||^2]}`` of the last measurement
        (``{}`` before one): a resumed run reuses it exactly as the uninterrupted run does,
        when its interval snapshot and base are the ones saved with it (same step, same uid)."""
        if self._last_norm is None:
            return {}
        step, uid, norm = self._last_norm
        return {"last_norm": [step, uid, norm]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (``{}`` forgets the carried norm)."""
        last = state.get("last_norm") if state else None
        if last is None:
            self.reset()
            return
        ok = (isinstance(last, (list, tuple)) and len(last) == 3 and isinstance(last[0], int)
              and isinstance(last[1], str) and isinstance(last[2], float))
        if not ok:
            raise ValueError(f"{self.name}: a state must be {{'last_norm': [step, base uid, "
                             f"float]}} as returned by state_dict(); got {state!r}")
        self._last_norm = (last[0], last[1], last[2])

    # --- computation -----------------------------------------------------------------------
    def compute(
        self,
        delta: ParameterDelta | None = None,
        old_snapshot: ParameterSnapshot | None = None,
        current_snapshot: ParameterSnapshot | None = None,
        context: AnalysisContext | None = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        base = context.base if context is not None else None
        if base is None:
            return self.skip("no base snapshot (see ModelAnalysisManager.set_base)")
        assert context is not None
        live = current_snapshot if current_snapshot is not None else delta.new if delta else None
        if live is None:
            return self.skip("no current parameters (current_snapshot) given")
        same = delta is not None and delta.old is base and delta.new is live
        base_delta = delta if same else base.compute_delta(live)
        if len(base_delta) == 0:
            return self.skip("the model has no parameters in common with the base")
        out = self.statistics.compute(base_delta)
        out["drift/cos_interval"] = self._cos_interval(delta, old_snapshot, base, context)
        if self.references is not None:
            out.update(self.references.compute(base_delta, base))
        model = unwrap_model(context.model) if context.model is not None else None
        prepared: Any = "no model in the context"
        if model is not None:  # every rank must agree: forwards and spectra are collectives
            prepared = agree_across_ranks(prepare_inputs(model, context.inputs, self.max_tokens))
        usable = not isinstance(prepared, str)
        if not usable:
            self.note_inputs(prepared, "output metrics")
        spectra: dict[str, Any] = {}
        if self.low_rank is not None:
            spectra, energy = drift_spectra(self.low_rank, base_delta, model, usable, context.step)
            out.update(energy)
        if self.principal is not None:  # collective: every rank measures the same matrices
            out.update(
                self.principal.measure(
                    base_delta,
                    model,
                    cache=self.base_factors,
                    prefix="drift/principal",
                    context=context,
                )
            )
        if usable:
            assert model is not None
            out.update(drift_outputs(self, model, context, prepared, delta, base_delta, spectra))
        return out

    def _cos_interval(
        self,
        delta: ParameterDelta | None,
        old: ParameterSnapshot | None,
        base: ParameterSnapshot,
        context: AnalysisContext,
    ) -> float:
        """``drift/cos_interval`` from three squared norms (see module docstring)."""
        total = self.statistics.total
        s_tot = total.sum_sq if total is not None and total.nonfinite == 0 else _NAN
        key = base.uid
        last, self._last_norm = self._last_norm, None
        if delta is None or old is None or old is base:
            return _NAN  # no interval snapshot, or it is the base: W_prev = W_base
        s_a = context.shared(update_norm_key(delta), lambda: None)
        s_b = None
        if (
            last is not None
            and last[:2] == (context.snapshot_step, key)
            and all(old.is_lossless(n) for n in delta.names)
        ):
            s_b = last[2]
        # which norms to compute is decided by every rank together: computing one is collective
        known = torch.tensor([s_a is not None, s_b is not None], dtype=torch.float64)
        need_a, need_b = (not bool(k) for k in all_reduce_(known, "min").tolist())
        if need_a or need_b:
            local = torch.zeros(2, dtype=torch.float64)
            if need_a:
                local[0] = _sum_sq(delta)
            if need_b:
                local[1] = _sum_sq(base.compute_delta(old))
            s_a_sum, s_b_sum = all_reduce_(local, "sum").tolist()
            s_a = s_a_sum if need_a else s_a
            s_b = s_b_sum if need_b else s_b
        if math.isfinite(s_tot):
            self._last_norm = (context.step, key, s_tot)
        assert s_a is not None and s_b is not None
        if not (s_a > 0 and s_b > 0 and math.isfinite(s_a + s_b + s_tot)):
            return _NAN
        cos = (s_tot - s_a - s_b) / (2.0 * math.sqrt(s_a * s_b))
        return min(1.0, max(-1.0, cos))
