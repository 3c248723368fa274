r"""Would LoRA at rank r have produced the same model? ``lowrank/*`` (and sparse at equal budget).

**Matrices.** Every analysed 2-D parameter (``nn.Linear``, GPT-2's ``Conv1D``, fused projections)
except embeddings and the output head, unless ``include_embeddings``: parameters owned by an
``nn.Embedding``/``nn.EmbeddingBag``, by the module ``model.get_output_embeddings()`` returns, or
sharing storage with one of those (tied heads). Without a model (offline) a name rule stands in:
the owning module's last name contains ``embed`` or is ``lm_head``, ``wte`` or ``wpe``. Matrices
with a non-finite update are left out.

**Spectrum** (:mod:`~grail.trainer.analysis.ops.spectrum`: float32 on the delta's device, one matrix
materialised at a time; weighted by :math:`E_i = \lVert\Delta_i\rVert_F^2`, see
:func:`~grail.trainer.analysis.ops.spectrum.aggregate_spectra`):

===================================  ==============================================================
``lowrank/energy_at_r{r}``           share of the update's energy kept by rank-r truncations
``lowrank/stable_rank``              :math:`E`-weighted mean of :math:`E_i / \sigma_{i,1}^2`
``lowrank/effective_rank``           :math:`E`-weighted mean of exp(entropy of normalised
                                     :math:`\sigma^2`)
``lowrank/rank_for_energy_0.9``      :math:`E`-weighted mean of the smallest rank keeping 90%
``lowrank/param_ratio_at_r{r}``      :math:`\sum_i r(m_i+n_i) / \sum_i m_i n_i` (LoRA's trainable
                                     parameters; above 1 when r exceeds what a matrix needs)
``lowrank/num_matrices``             matrices analysed; ``randomized_matrices`` of them by the
                                     range finder; ``nonfinite_matrices`` left out
===================================  ==============================================================

With ``track_components`` the first five repeat as ``lowrank/component/{c}/...``. A zero update
has no spectrum: its ratios are NaN, never a reassuring 1.

**Output quality** (inputs given and ``quality`` on; the machinery, inputs handling and
invariants of :mod:`~grail.trainer.analysis.metrics.sparse_quality`):

======================================  =========================================================
``lowrank/kl_at_r{r}``                  mean KL(P_full || P_r) over tokens, with
                                        :math:`W_{old} + U_r\Sigma_rV_r^\top` in every matrix
                                        (all other parameters keep their full update)
``lowrank/top1_agree_at_r{r}``          fraction of tokens whose argmax agrees
``sparse/kl_at_budget_r{r}``            the same for the update keeping exactly the
                                        :math:`k = \min(N, \sum_i r(m_i+n_i))` largest
                                        :math:`|\Delta|` over these matrices jointly
``sparse/top1_agree_at_budget_r{r}``    its top-1 agreement
``lowrank/nonfinite``                   token positions dropped for non-finite logits
======================================  =========================================================

Truncation factors are computed once per matrix and measurement; only they are kept
(:math:`r_{max}(m+n)` floats per matrix, on the delta's device), and
:class:`~grail.trainer.analysis.patching.swaps.ModulePatch` writes
:math:`W_{old} + \mathrm{left}_{:,:r}\mathrm{right}_{:r}` just before a module runs. The budget
mask is exact, ties included (:mod:`~grail.trainer.analysis.ops.budget`). The range finder's seed
mixes ``sparse_quality_seed``, the step and the parameter name, so results do not depend on the
order of matrices; its Gaussian draws come from a generator on the matrix's device, so a CPU and a
CUDA run agree to the range finder's accuracy, not bit for bit.

**Distributed** (DDP, FSDP2, DeepSpeed ZeRO-1/2/3): every rank returns the same numbers, equal
to one process analysing the unsharded model. Each matrix is decomposed once, on rank
``i mod world`` (a sharded one is gathered there first), and its spectrum and factors are
broadcast (:mod:`~grail.trainer.analysis.ops.sharded_spectrum`). Under FSDP2 each rank patches
its own rows, :math:`W_{old,local} + \mathrm{left}_{rows,:r}\mathrm{right}_{:r}`, under ZeRO-3
its own flat partition (of the rows it spans). The budget mask is the global
one, whatever the sharding. KL and top-1 agreement are averaged over the compared tokens of all
ranks (with the same batch on every rank: that batch's values).

Cost: besides the spectra, ``1 + 2 len(ranks)`` forward passes (the full model, then per rank the
truncated and the budget-sparse one) against sparse quality's 3 with its defaults; see the
low-rank benchmark in ``benchmarks/README.md``.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    >>> old = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.add_(torch.ones(4, 1) @ torch.ones(1, 6))
    >>> m = LowRankMetrics(ranks=[1, 2]).compute(old.compute_delta(ParameterSnapshot.live(model)))
    >>> m["lowrank/energy_at_r1"], m["lowrank/param_ratio_at_r1"], m["lowrank/rank_for_energy_0.9"]
    (1.0, 0.4166666666666667, 1.0)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..config import AnalysisConfig
from ..core.distributed import local_tensor
from ..core.engines import unwrap_model
from ..core.naming import ParameterNaming
from ..core.snapshot import ParameterDelta, collect_parameters
from ..ops.budget import exact_budget_drops, subset_delta
from ..ops.comparisons import Comparisons
from ..ops.masks import mix_seed
from ..ops.sharded_spectrum import sharded_spectra
from ..ops.spectrum import Spectrum, aggregate_spectra, matrix_spectrum, spectrum_layout
from ..patching.forward import PreparedInputs, agree_across_ranks, prepare_inputs, run_forward
from ..patching.swaps import ModulePatch, SelectPatch, analysis_mode
from .base import AnalysisContext, MetricComputer
from .sparse_quality import shared_reference

__all__ = ["LowRankMetrics", "low_rank_targets"]

logger = logging.getLogger(__name__)

_HEAD_NAMES = ("lm_head", "wte", "wpe")


def _embedding_names(model: nn.Module, names: list[str]) -> set[str]:
    model = unwrap_model(model)
    owned: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            owned += list(module.parameters(recurse=False))
    get_head = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_head):
        try:
            head = get_head()
        except (NotImplementedError, AttributeError):
            head = None
    if isinstance(head, nn.Module):
        owned += list(head.parameters(recurse=False))
    ids = {id(p) for p in owned}
    # Local storage: an empty shard (a rank holding no rows) has no address worth comparing.
    ptrs = {local_tensor(p).data_ptr() for p in owned if local_tensor(p).numel()}
    params = dict(collect_parameters(model))
    out = set()
    for n in names:
        p = params.get(n)
        if p is None:
            continue
        local = local_tensor(p)
        if id(p) in ids or (local.numel() and local.data_ptr() in ptrs):
            out.add(n)
    return out


def low_rank_targets(
    delta: ParameterDelta, model: nn.Module | None = None, include_embeddings: bool = False
) -> list[str]:
    """Names of the 2-D matrices the low-rank analysis covers (rule in the module docstring)."""
    names = [n for n in delta.names if len(delta.shard(n).global_shape) == 2]
    if include_embeddings:
        return names
    if model is not None:
        skip = _embedding_names(model, names)
    else:
        owner = {n: n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n in names}
        skip = {n for n, o in owner.items() if "embed" in o.lower() or o in _HEAD_NAMES}
    return [n for n in names if n not in skip]


def spectrum_options(config: AnalysisConfig) -> dict[str, Any]:
    """The decomposition settings both spectral families (``lowrank/*``, ``principal/*``) take
    from ``config``: which matrices, exact or randomized, the seed and the component names."""
    return {
        "include_embeddings": config.low_rank_include_embeddings,
        "exact_max_dim": config.low_rank_exact_max_dim,
        "oversampling": config.low_rank_oversampling,
        "power_iterations": config.low_rank_power_iterations,
        "component_map": config.component_map,
        "seed": config.sparse_quality_seed,
    }


def check_method(method: str) -> str:
    """``method`` if it names a decomposition (``"gram"`` or ``"svd"``), else ValueError."""
    if method not in ("gram", "svd"):
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    return method


class LowRankMetrics(MetricComputer):
    """Spectrum of every matrix update and output quality at rank r (see module docstring)."""

    name = "lowrank"

    def __init__(
        self,
        ranks: Sequence[int] = (1, 8, 64),
        include_embeddings: bool = False,
        exact_max_dim: int = 2048,
        oversampling: int = 8,
        power_iterations: int = 2,
        quality: bool = True,
        track_components: bool = False,
        component_map: dict[str, str] | None = None,
        seed: int = 0,
        max_tokens: int = 4096,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        method: str = "gram",
        fused: bool | str = "auto",
    ) -> None:
        self.ranks = sorted(int(r) for r in ranks)
        if not self.ranks or self.ranks[0] < 1:
            raise ValueError(f"ranks must be a non-empty list of integers >= 1, got {ranks!r}")
        self.include_embeddings = include_embeddings
        self.exact_max_dim = exact_max_dim
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        self.quality = quality
        self.track_components = track_components
        self.component_map = dict(component_map or {})
        self.seed = seed
        self.max_tokens = max_tokens
        self.output_fn = output_fn
        self.method = check_method(method)
        self.fused = fused

    @classmethod
    def from_config(
        cls, config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
    ) -> LowRankMetrics:
        return cls(
            ranks=config.low_rank_ranks,
            quality=config.low_rank_quality_enabled,
            track_components=config.low_rank_track_components,
            max_tokens=config.sparse_quality_max_tokens,
            **spectrum_options(config),
            output_fn=output_fn,
            fused=config.fused_kernels,
        )

    # --- computation -----------------------------------------------------------------------
    def compute(
        self,
        delta: ParameterDelta | None = None,
        context: AnalysisContext | None = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        if delta is None or len(delta) == 0:
            self.log_once("no parameter delta")
            return {}
        model = unwrap_model(context.model) if context and context.model is not None else None
        names = low_rank_targets(delta, model, self.include_embeddings)
        if not names:
            self.log_once("no 2-D matrices to analyse")
            return {"lowrank/num_matrices": 0.0}
        prepared: PreparedInputs | str = "output quality is disabled"
        if self.quality:
            prepared = (
                prepare_inputs(model, context.inputs, self.max_tokens)
                if model is not None and context is not None
                else "no model in the context"
            )
            # every rank must agree: the factors and the forward passes involve collectives
            prepared = agree_across_ranks(prepared)
        if isinstance(prepared, str):
            self.note_inputs(prepared, "output quality")
        start = time.perf_counter()
        step = context.step if context is not None else 0
        spectra, nonfinite = self._spectra(delta, names, not isinstance(prepared, str), step)
        logger.debug("spectra of %d matrices took %.3fs", len(spectra), time.perf_counter() - start)
        group_of = None
        if self.track_components:
            group_of = ParameterNaming(delta.names, self.component_map).component
        summary = aggregate_spectra(spectra, self.ranks, group_of)
        out = {f"lowrank/{k}": v for k, v in summary.items()}
        out["lowrank/randomized_matrices"] = float(sum(not s.exact for s in spectra.values()))
        out["lowrank/nonfinite_matrices"] = float(len(nonfinite))
        if not isinstance(prepared, str) and spectra:
            assert model is not None and context is not None
            out.update(self._quality(context, model, prepared, delta, spectra))
        return out

    def _spectra(
        self, delta: ParameterDelta, names: list[str], factors: bool, step: int
    ) -> tuple[dict[str, Spectrum], list[str]]:
        """One matrix at a time, each decomposed on one rank and shared (see module docstring)."""
        top = self.ranks[-1]

        def compute(name: str, matrix: torch.Tensor, frob_sq: float) -> Spectrum:
            return matrix_spectrum(
                matrix,
                top,
                exact_max_dim=self.exact_max_dim,
                oversampling=self.oversampling,
                power_iterations=self.power_iterations,
                seed=mix_seed(self.seed, step, name),
                keep_factors=factors,
                frob_sq=frob_sq,
                method=self.method,
            )

        def layout(shape: tuple[int, int]) -> tuple[int, int]:
            return spectrum_layout(
                shape,
                top,
                exact_max_dim=self.exact_max_dim,
                oversampling=self.oversampling,
                keep_factors=factors,
            )

        spectra, nonfinite = sharded_spectra(delta, names, compute, layout)
        if nonfinite:
            self.warn_once("nonfinite", "low-rank analysis leaves out matrices with non-finite "
                           "updates (now %d, first %s); counted in lowrank/nonfinite_matrices",
                           len(nonfinite), nonfinite[0])
        return spectra, nonfinite

    # --- output quality --------------------------------------------------------------------
    def _quality(
        self,
        context: AnalysisContext,
        model: nn.Module,
        prepared: PreparedInputs,
        delta: ParameterDelta,
        spectra: dict[str, Spectrum],
    ) -> dict[str, float]:
        view = subset_delta(delta, list(spectra))
        size = sum(s.shape[0] * s.shape[1] for s in spectra.values())
        budgets = [min(size, sum(r * sum(s.shape) for s in spectra.values())) for r in self.ranks]
        drops = exact_budget_drops(view, budgets)
        with analysis_mode(model):
            # compiled comparisons once they repay compiling them (see kernels.policy)
            fused = kernels.use("rows", delta.numel(), self.fused, getattr(context, "step", None))
            reference = shared_reference(
                context, delta, self.max_tokens, self.output_fn,
                lambda: self._forward(model, prepared), fused=fused,
            )  # fmt: skip
            comparisons = Comparisons(reference)
            for r in self.ranks:
                with ModulePatch(model, self._truncations(delta, spectra, r)):
                    comparisons.add(f"lowrank/{{}}_at_r{r}", self._forward(model, prepared))
            # the equal-budget masks one after the other, without going back to W_new between
            with SelectPatch(view, drops[0], count_dropped=False, count_changed=False) as patch:
                for i, (r, drop) in enumerate(zip(self.ranks, drops, strict=True)):
                    if i:
                        patch.switch(drop)
                    comparisons.add(f"sparse/{{}}_at_budget_r{r}", self._forward(model, prepared))
        results = comparisons.results()  # token-weighted over every rank's batch
        out: dict[str, float] = {}
        nonfinite = comparisons.reference_nonfinite
        for pattern, q in results.items():
            out[pattern.format("kl")] = q["kl"]
            out[pattern.format("top1_agree")] = q["top1_agree"]
            nonfinite = max(nonfinite, q["nonfinite_rows"])  # each includes the reference's
        out["lowrank/nonfinite"] = float(nonfinite)
        return out

    @staticmethod
    def _truncations(
        delta: ParameterDelta, spectra: dict[str, Spectrum], r: int
    ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """``name -> (local -> W_old + left[rows, :r] @ right[:r])`` for matrices of rank > r.

        ``rows`` are the global rows this rank's entries lie in: all of them for a replicated
        matrix, the FSDP2 shard's block for a sharded one, the rows a ZeRO-3 flat partition
        starts and ends in (its first and last row may be partial: the rows are computed whole,
        with the entries outside the partition set to 0, and cut back to the partition).
        """

        def make(name: str, s: Spectrum) -> Callable[[torch.Tensor], torch.Tensor]:
            cols = s.shape[1]
            offset = delta.shard(name).offset
            row0, lead = divmod(offset, cols)

            def value(current: torch.Tensor) -> torch.Tensor:
                n = current.numel()
                if n == 0:  # a rank without entries of this matrix
                    return current
                rows = -(-(lead + n) // cols)
                old = delta.old.data[name].to(current.device).float().reshape(-1)
                if lead or n != rows * cols:  # a flat piece: pad to whole rows
                    padded = torch.zeros(rows * cols, dtype=old.dtype, device=old.device)
                    padded[lead : lead + n] = old
                    old = padded
                left = s.left[row0 : row0 + rows, :r]
                full = torch.addmm(old.view(rows, cols), left, s.right[:r])
                return full.view(-1)[lead : lead + n].view_as(current)

            return value

        return {n: make(n, s) for n, s in spectra.items() if r < s.full_rank}

    def _forward(self, model: nn.Module, prepared: PreparedInputs) -> torch.Tensor:
        return run_forward(model, prepared, self.output_fn)
