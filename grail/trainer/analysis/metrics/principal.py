r"""Does the update follow the weights' principal directions? ``principal/*``.

**Matrices.** The 2-D weights the low-rank family analyses
(:func:`~grail.trainer.analysis.metrics.low_rank.low_rank_targets`: embeddings and the output
head only with ``include_embeddings``). Each is read as a reference :math:`W` (the interval
snapshot :math:`W_{old}`) and an update :math:`\Delta = W_{new} - W_{old}`.

**Geometry** (:mod:`~grail.trainer.analysis.ops.principal`, one matrix at a time in float32 on the
parameter's device): the top-:math:`k` singular triplets :math:`U_k\Sigma_kV_k^\top` of :math:`W`
and the top-:math:`k` left vectors :math:`U'_k` of :math:`W + \Delta`, exact up to
``exact_max_dim`` and by the seeded randomized range finder above it. With
:math:`E_i = \lVert\Delta_i\rVert_F^2` and :math:`k_i = \min(k, m_i, n_i)`:

=====================================  ============================================================
``principal/energy_in_top{k}``         :math:`\sum_i\lVert U_k^\top\Delta_iV_k\rVert_F^2/\sum_iE_i`:
                                       share of the update's energy in the top-k principal block
``..._random``                         :math:`\sum_iE_ik_i^2/(m_in_i)/\sum_iE_i`: the same for an
                                       isotropic random update
``principal/left_energy_top{k}``       :math:`\sum_i\lVert U_k^\top\Delta_i\rVert_F^2/\sum_iE_i`;
                                       ``_random``: :math:`\sum_iE_ik_i/m_i/\sum_iE_i`
``principal/subspace_overlap_top{k}``  :math:`E`-weighted mean of :math:`\lVert U_k^\top
                                       U'_k\rVert_F^2/k`: mean squared cosine of the principal
                                       angles (1: the top-k subspace did not rotate)
``principal/spectral_drift_top{k}``    :math:`E`-weighted mean of :math:`\lVert\sigma_{1:k}(W +
                                       \Delta)-\sigma_{1:k}(W)\rVert_2/\lVert\sigma_{1:k}(W)
                                       \rVert_2`
``principal/num_matrices``             matrices analysed; ``randomized_matrices`` of them by the
                                       range finder; ``skipped_matrices`` left out (a non-finite
                                       entry, or an all-zero reference)
=====================================  ============================================================

With ``track_components`` the six per-rank keys repeat as ``principal/component/{c}/...``. A
measurement without any change has no weights: its ratios are NaN.

**Cost and the factor cache.** Each matrix needs the factors of :math:`W_{old}` and of
:math:`W_{new}`. The factors of :math:`W_{new}` are kept (a
:class:`~grail.trainer.analysis.ops.principal.FactorCache` on ``cache_device``, by default the
snapshot device: :math:`k(m+n)` float32 numbers per matrix) and, since the snapshot advances to
exactly these weights, they are the next measurement's reference factors: after the first
measurement one decomposition per matrix remains, as in the low-rank family. A hit needs the same
name, ``k`` and :func:`~grail.trainer.analysis.ops.principal.fingerprint` of the float32 matrix,
so a re-baselined, reset or lossy (``snapshot_dtype`` narrower than the weights) snapshot is
simply decomposed again. The range finder's seed mixes ``seed`` and the parameter name only - not
the step - so :math:`W` and :math:`W + \Delta` share their sketch and the cached factors equal a
recomputation. ``cache_factors=False`` (``principal_cache_factors``) keeps nothing and
decomposes both matrices every time: for one-off comparisons.

**A fixed reference** (the whole fine-tune: the base-drift view) is the same computation with a
delta whose ``old`` side is the base snapshot and a cache that ``tracks="reference"``:
:meth:`PrincipalMetrics.measure` takes both, so the base is decomposed once.

**Distributed** (DDP, FSDP2): every rank returns the same numbers, equal to one process. Each
matrix is handled by rank ``i mod world``, which gathers :math:`W_{old}` and :math:`W_{new}` (for
a sharded matrix) and broadcasts the per-matrix numbers
(:mod:`~grail.trainer.analysis.ops.sharded_principal`); its cache entries live on that rank.

Decisions where the specification is silent:

* "Left" and :math:`m` are the stored matrix's rows: output features for ``nn.Linear``, input
  features for GPT-2's ``Conv1D`` (stored transposed), as in the low-rank family.
* ``k`` is capped at :math:`\min(m, n)` per matrix, in the measured values and in ``_random``
  alike, so one list of ranks serves matrices of every size.
* The per-rank keys are NaN when no analysed matrix changed (no weights), never a reassuring 0
  or 1; matrices with a non-finite entry or an all-zero reference are counted, not averaged.
* :math:`\Delta` is ``float32(W_new) - float32(W_old)``: the streamed delta of the other families
  for float32, bfloat16 and float16 weights (float64 weights are rounded first).

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    >>> old = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(1.01)  # along W itself: inside the principal block
    >>> m = PrincipalMetrics(ranks=[4]).compute(old.compute_delta(ParameterSnapshot.live(model)))
    >>> round(m["principal/energy_in_top4"], 4), round(m["principal/energy_in_top4_random"], 4)
    (1.0, 0.6667)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import AnalysisConfig
from ..core.engines import unwrap_model
from ..core.naming import ParameterNaming
from ..core.snapshot import ParameterDelta
from ..ops.masks import mix_seed
from ..ops.principal import FactorCache, Factors, aggregate_principal, top_factors
from ..ops.sharded_principal import principal_geometries
from .base import AnalysisContext, MetricComputer
from .low_rank import check_method, low_rank_targets, spectrum_options

__all__ = ["PrincipalMetrics"]

logger = logging.getLogger(__name__)


class PrincipalMetrics(MetricComputer):
    """Spectral geometry of the update relative to the weights (see module docstring)."""

    name = "principal"

    def __init__(
        self,
        ranks: Sequence[int] = (1, 8, 64),
        include_embeddings: bool = False,
        exact_max_dim: int = 2048,
        oversampling: int = 8,
        power_iterations: int = 2,
        track_components: bool = False,
        component_map: dict[str, str] | None = None,
        seed: int = 0,
        cache_device: str | torch.device = "cpu",
        method: str = "gram",
        cache_factors: bool = True,
    ) -> None:
        self.ranks = sorted({int(r) for r in ranks})
        if not self.ranks or self.ranks[0] < 1:
            raise ValueError(f"ranks must be a non-empty list of integers >= 1, got {ranks!r}")
        self.include_embeddings = include_embeddings
        self.exact_max_dim = exact_max_dim
        self.oversampling = oversampling
        self.power_iterations = power_iterations
        self.track_components = track_components
        self.component_map = dict(component_map or {})
        self.seed = seed
        self.method = check_method(method)
        self.cache_device = torch.device(cache_device)
        self.cache = FactorCache(cache_device, tracks="next") if cache_factors else None

    @classmethod
    def from_config(
        cls, config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
    ) -> PrincipalMetrics:
        return cls(
            ranks=config.principal_ranks,
            track_components=config.principal_track_components,
            cache_device=config.snapshot_device,
            cache_factors=config.principal_cache_factors,
            **spectrum_options(config),
        )

    def compute(
        self,
        delta: ParameterDelta | None = None,
        context: AnalysisContext | None = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        if delta is None or len(delta) == 0:
            return self.skip("no parameter delta")
        model = context.model if context is not None else None
        return self.measure(delta, model, cache=self.cache, context=context)

    def measure(
        self,
        delta: ParameterDelta,
        model: nn.Module | None = None,
        cache: FactorCache | None = None,
        prefix: str = "principal",
        context: AnalysisContext | None = None,
    ) -> dict[str, float]:
        """The keys for ``delta``, whose ``old`` side is the reference, under ``prefix``.

        ``cache`` keeps factors across calls: this computer's own (``tracks="next"``) for the
        interval view, a ``tracks="reference"`` one for a fixed base. Collective under a
        process group: every rank must call it with the same names in the same order.
        """
        model = unwrap_model(model) if model is not None else None
        names = low_rank_targets(delta, model, self.include_embeddings)
        if not names:
            self.log_once("no 2-D matrices to analyse")
            return {f"{prefix}/num_matrices": 0.0}
        # W_new's factors are shared through the measurement's context: the drift view ends at
        # the same live weights as the interval view, so each matrix is decomposed once
        shared = None
        if context is not None and delta.new.is_live:
            shared = context.shared(self._updated_key(), dict)
        geometries, skipped = principal_geometries(
            delta, names, self.ranks, self.factors, cache, updated_by_name=shared
        )
        if skipped:
            self.log_once(
                f"matrices with a non-finite entry or an all-zero reference are left out (first "
                f"{skipped[0]}); counted in {prefix}/skipped_matrices"
            )
        group_of = None
        if self.track_components:
            group_of = ParameterNaming(delta.names, self.component_map).component
        summary = aggregate_principal(geometries, self.ranks, group_of)
        out = {f"{prefix}/{k}": v for k, v in summary.items()}
        out[f"{prefix}/num_matrices"] = float(len(geometries))
        out[f"{prefix}/randomized_matrices"] = float(
            sum(not g.exact for g in geometries.values())
        )
        out[f"{prefix}/skipped_matrices"] = float(len(skipped))
        return out

    def _updated_key(self) -> tuple[Any, ...]:
        """The context key of the live weights' factors under this computer's settings."""
        return ("principal/live_factors", tuple(self.ranks), self.exact_max_dim,
                self.oversampling, self.power_iterations, self.seed, self.method)

    def factors(self, name: str, matrix: torch.Tensor) -> Factors:
        """Top ``max(ranks)`` factors of ``matrix`` (the seed depends on ``name`` only)."""
        return top_factors(
            matrix,
            self.ranks[-1],
            exact_max_dim=self.exact_max_dim,
            oversampling=self.oversampling,
            power_iterations=self.power_iterations,
            seed=mix_seed(self.seed, "principal", name),
            method=self.method,
        )

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.clear()
