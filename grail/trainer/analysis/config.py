"""All options of the analysis in one validated dataclass.

Every field is checked in ``__post_init__``: a bad value raises ``ValueError`` naming the field,
the value and what is allowed, so a typo fails at construction instead of silently producing no
metrics a thousand steps later.

Decisions where the design is silent:

* ``snapshot_device`` accepts any device string ``torch.device`` parses whose type is one of
  ``cpu``, ``cuda``, ``mps``, ``xpu`` (``"cuda:1"`` included). It is not checked for availability
  here: a config is a value that may be written on one machine and used on another.
* Threshold lists are stored sorted and must be unique after formatting with ``f"{t:.0e}"``,
  because that string is part of the metric key. ``-0.0`` is stored as ``+0.0`` (and
  :func:`format_threshold` writes it as ``0e+00``): the two are the same threshold.
* Keep ratios must be unique after formatting with
  :func:`~grail.trainer.analysis.keys.format_keep_ratio` (``keep_0.1``), for
  the same reason; exact duplicates are an error too.
* Error messages show at most ten entries of a long list or mapping, then how many there are;
  the offending entry is always named.
* Upper bounds exist where a typo would stall training rather than fail:
  ``low_rank_power_iterations <= 32``, ``low_rank_oversampling <= 256`` and
  ``histogram_samples <= 10_000_000`` and ``attribution_max_groups <= 256`` (the comments at
  the checks say why).
  ``low_rank_exact_max_dim`` has none: any value above the largest weight dimension already
  means "always exact", so a bound would not catch a typo. ``sparse_quality_max_tokens`` has
  none: the batch given bounds the positions anyway.
* Gradient, Adam, low-rank, principal and attribution metrics default to off: they need the
  optimizer, gradients that are still present, SVDs, or two forwards per group.
  ``comprehensive()`` turns everything on (attribution with component groups).
* ``attribution_groups`` is stored in one order (``component`` before ``layer``); a single string
  is accepted as a one-element list.
* ``drift_enabled`` defaults to off: the base snapshot doubles the analysis' steady-state memory
  (two snapshots instead of one). ``drift_keep_ratios`` may be empty (no masked forwards); the
  drift family reuses ``param_change_thresholds``, ``sparse_quality_include_random``,
  ``sparse_quality_rescale_random``, ``sparse_quality_seed``, ``sparse_quality_max_tokens`` and
  the low-rank options instead of duplicating them.
* ``fused_kernels`` defaults to ``"auto"``: on CPU, parameter change, the gradient and Adam
  statistics and the weight swaps and comparisons of the forward-pass metrics are several times
  cheaper compiled (:mod:`~grail.trainer.analysis.kernels`), but compiling costs seconds (more
  with a cold cache) once per process. ``"auto"`` starts eager and compiles a family once its
  measured eager cost says compiling has paid for itself (:mod:`~.kernels.policy`: never more
  than the eager path over a run's first 10 measurements); ``True`` compiles at the first
  measurement (long runs that know they will repay it); ``False`` never compiles. Models under
  ~17M parameters always stay eager, and a machine without a compiler falls back by itself.
  Only ``True``, ``False`` and ``"auto"`` are accepted (not ``1`` or ``"true"``).
* ``drift_reference_masks`` is checked at construction as far as a config can be without a model:
  each name must read back from a ``drift/overlap/{name}/...`` key, each file must exist and be a
  mask file of ``grail-analysis mask`` (its header is read, not its bits). Whether its names and
  shapes fit the model is checked when the base is taken (``set_base(..., model=...)`` or the
  first ``on_optimizer_step``), with one ``MaskFileError`` naming the parameters that do not fit,
  raised to the caller (:mod:`~.metrics.drift_overlap`). The masks are read only by the drift
  family: giving them with ``drift_enabled=False`` is a ``ValueError``.

Example:
    >>> cfg = AnalysisConfig(interval=10, sparse_quality_thresholds=[1e-6, 1e-4])
    >>> AnalysisConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> AnalysisConfig.minimal().sparse_quality_enabled
    False
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config_checks import (  # the field validators and the bounds they apply
    ATTRIBUTION_GROUP_KINDS,
    MAX_ATTRIBUTION_GROUPS,
    MAX_HISTOGRAM_SAMPLES,
    MAX_OVERSAMPLING,
    MAX_POWER_ITERATIONS,
    _check_bool,
    _check_group_kinds,
    _check_int,
    _check_ranks,
    _check_ratios,
    _check_reference_masks,
    _check_thresholds,
    _fail,
    _short_repr,
)
from .keys import format_threshold  # the key grammar; re-exported

__all__ = [
    "ATTRIBUTION_GROUP_KINDS",
    "MAX_ATTRIBUTION_GROUPS",
    "MAX_HISTOGRAM_SAMPLES",
    "MAX_OVERSAMPLING",
    "MAX_POWER_ITERATIONS",
    "SNAPSHOT_DTYPES",
    "AnalysisConfig",
    "format_threshold",
]

#: Accepted values of ``snapshot_dtype``; "auto" keeps each parameter's own dtype (lossless).
SNAPSHOT_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


@dataclass
class AnalysisConfig:
    """Options of :class:`~grail.trainer.analysis.ModelAnalysisManager` and its computers.

    Example:
        >>> AnalysisConfig(interval=0)
        Traceback (most recent call last):
        ...
        ValueError: AnalysisConfig.interval=0 is invalid: expected an integer >= 1.
    """

    # --- schedule and snapshots -------------------------------------------------------------
    interval: int = 100  # optimizer steps between measurements; first snapshot at step `interval`
    snapshot_device: str = "cpu"  # host memory is plentiful; GPU memory belongs to training
    snapshot_dtype: str = "auto"  # "auto" = each parameter's own dtype: lossless diffs
    trainable_only: bool = False  # True for LoRA/PEFT: frozen base weights would inflate sparsity
    # Optional grouping of derived component names, e.g. {"q_proj": "attn", "k_proj": "attn"}.
    component_map: dict[str, str] = field(default_factory=dict)

    # --- parameter change (param_change/*) ---------------------------------------------------
    param_change_enabled: bool = True
    param_change_thresholds: list[float] = field(default_factory=lambda: [0.0, 1e-8, 1e-6, 1e-4])
    param_change_per_layer: bool = False
    param_change_track_components: bool = False
    param_change_track_sign_flips: bool = False
    # Jaccard overlap of the changed set with the previous interval's (one bit per parameter).
    param_change_track_mask_overlap: bool = False

    # --- sparse-update quality (sparse/*) ----------------------------------------------------
    sparse_quality_enabled: bool = True
    sparse_quality_thresholds: list[float] = field(default_factory=lambda: [1e-6])
    sparse_quality_include_random: bool = True
    sparse_quality_seed: int = 0
    sparse_quality_rescale_random: bool = False  # also report the DARE (1/keep rescaled) mask
    sparse_quality_keep_ratios: list[float] = field(default_factory=list)
    sparse_quality_max_tokens: int = 4096  # positions per analysis forward: bounds its cost

    # --- gradients and optimizer state (gradient/*, adam_sign/*) -----------------------------
    gradient_enabled: bool = False
    gradient_thresholds: list[float] = field(default_factory=lambda: [0.0, 1e-8, 1e-6])
    gradient_track_per_layer: bool = False
    gradient_track_components: bool = False
    adam_sign_enabled: bool = False
    adam_sign_tolerance: float = 0.1  # |u| within this of 1 counts as sign descent
    adam_sign_track_components: bool = False
    histogram_samples: int = 0  # 0 = no histograms; else at most this many sampled values

    # --- low-rank feasibility (lowrank/*) ----------------------------------------------------
    low_rank_enabled: bool = False
    low_rank_ranks: list[int] = field(default_factory=lambda: [1, 8, 64])
    low_rank_include_embeddings: bool = False  # embeddings/output head are rarely LoRA targets
    low_rank_exact_max_dim: int = 2048  # above this min(m, n), a randomized range finder is used
    low_rank_oversampling: int = 8  # extra columns of the randomized range finder
    low_rank_power_iterations: int = 2  # subspace iterations; 2 is plenty for decaying spectra
    low_rank_quality_enabled: bool = True  # forward passes at each rank when inputs are given
    low_rank_track_components: bool = False

    # --- base-anchored drift (drift/*) -------------------------------------------------------
    # Off by default: it holds a second lossless snapshot (the base), as large as the model.
    drift_enabled: bool = False
    # Kept fractions of the whole fine-tune's update (base -> now) whose output KL is reported;
    # [] = no masked forwards (KL to the base only).
    drift_keep_ratios: list[float] = field(default_factory=lambda: [0.01, 0.1])
    # --- output attribution per group (attrib/*) --------------------------------------------
    attribution_enabled: bool = False  # two forwards per group: opt-in
    attribution_groups: list[str] = field(default_factory=lambda: ["component"])  # or "layer"
    attribution_max_groups: int = 16  # bounds the forwards: the largest updates are measured
    # --- principal directions of the weights (principal/*) ---------------------------------
    # Spectral geometry of each 2-D update against the top-k singular directions of the
    # weights (same matrices and spectrum settings as low_rank_*); off by default: it needs
    # the weights' SVDs.
    principal_enabled: bool = False
    principal_ranks: list[int] = field(default_factory=lambda: [1, 8, 64])
    principal_track_components: bool = False
    # Keep W_new's top factors until the next measurement, where they are the reference's: one
    # decomposition per matrix instead of two, for sum k(m+n) floats per matrix on
    # snapshot_device. A one-off comparison (grail-analysis diff) has no next measurement.
    # With drift_enabled it also keeps the base's factors for drift/principal/* (False: none).
    principal_cache_factors: bool = True
    # --- the whole fine-tune against saved changed sets (drift/overlap/*) ----------------------
    # {"name": "path/to/mask.safetensors"} (written by `grail-analysis mask`): the live run's
    # changed set since the base is compared with each saved one at every measurement of
    # drift/* (drift_enabled), under the criterion the mask was written with. Files are checked
    # here (they exist and are mask files) and read lazily, one bit per entry.
    drift_reference_masks: dict[str, str] = field(default_factory=dict)

    # --- execution ---------------------------------------------------------------------------
    # Parameter change, gradient and Adam statistics and the forward-pass metrics' swaps and
    # comparisons on CPU in one compiled loop per tensor (torch.compile). "auto": compile once
    # the measured eager cost repays compiling; True: at the first measurement; False: never.
    fused_kernels: bool | str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (and normalise lists of numbers); ``ValueError``/``TypeError``
        naming the field and what to change. Runs at construction and again when a manager is
        built from the config, so a field set after construction is checked too.

        >>> config = AnalysisConfig()
        >>> config.interval = 0
        >>> config.validate()
        Traceback (most recent call last):
        ...
        ValueError: AnalysisConfig.interval=0 is invalid: expected an integer >= 1.
        """
        _check_int("interval", self.interval, 1)
        if not isinstance(self.snapshot_device, str):
            _fail("snapshot_device", self.snapshot_device, "expected a device string like 'cpu'")
        try:
            dev = torch.device(self.snapshot_device)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in _DEVICE_TYPES:
            _fail(
                "snapshot_device",
                self.snapshot_device,
                f"expected a device of type {', '.join(_DEVICE_TYPES)} (e.g. 'cpu', 'cuda:0')",
            )
        if not isinstance(self.snapshot_dtype, str) or self.snapshot_dtype not in SNAPSHOT_DTYPES:
            _fail("snapshot_dtype", self.snapshot_dtype, f"expected one of {list(SNAPSHOT_DTYPES)}")
        if not isinstance(self.component_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in self.component_map.items()
        ):
            _fail("component_map", self.component_map, "expected a dict of str -> non-empty str")
        for f in dataclasses.fields(self):
            if f.type in ("bool", bool):
                _check_bool(f.name, getattr(self, f.name))
        fused = self.fused_kernels
        if not (isinstance(fused, bool) or (isinstance(fused, str) and fused == "auto")):
            _fail("fused_kernels", self.fused_kernels, 'expected True, False or "auto"')

        self.param_change_thresholds = _check_thresholds(
            "param_change_thresholds", self.param_change_thresholds
        )
        self.sparse_quality_thresholds = _check_thresholds(
            "sparse_quality_thresholds", self.sparse_quality_thresholds, allow_empty=True
        )
        self.sparse_quality_keep_ratios = _check_ratios(
            "sparse_quality_keep_ratios", self.sparse_quality_keep_ratios
        )
        self.drift_keep_ratios = _check_ratios("drift_keep_ratios", self.drift_keep_ratios)
        if self.sparse_quality_enabled and not (
            self.sparse_quality_thresholds or self.sparse_quality_keep_ratios
        ):
            _fail(
                "sparse_quality_thresholds",
                self.sparse_quality_thresholds,
                "sparse quality is enabled but has neither thresholds nor keep ratios; "
                "give one or set sparse_quality_enabled=False",
            )
        _check_int("sparse_quality_seed", self.sparse_quality_seed, 0, 2**63 - 1)
        _check_int("sparse_quality_max_tokens", self.sparse_quality_max_tokens, 1)

        self.gradient_thresholds = _check_thresholds(
            "gradient_thresholds", self.gradient_thresholds
        )
        tol = self.adam_sign_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0.0 < tol < 1.0):
            _fail("adam_sign_tolerance", tol, "expected a number in (0, 1)")
        self.adam_sign_tolerance = float(tol)
        # 10M samples resolve every bin of a histogram holding 1e-4 of the mass to ~3%; more
        # only cost memory (4 bytes a sample, kept between measurements) and logging time.
        _check_int("histogram_samples", self.histogram_samples, 0, MAX_HISTOGRAM_SAMPLES)

        self.low_rank_ranks = _check_ranks("low_rank_ranks", self.low_rank_ranks)
        _check_int("low_rank_exact_max_dim", self.low_rank_exact_max_dim, 1)
        # Halko et al. use 5-10 extra columns; hundreds only widen every sketch (or push it past
        # the matrix size, turning the randomized path into the exact one it exists to avoid).
        _check_int("low_rank_oversampling", self.low_rank_oversampling, 0, MAX_OVERSAMPLING)
        # Each iteration is two passes over every large matrix plus a QR. The error factor
        # (sigma_{k+1} / sigma_k) ** (2q + 1) is about 1e-3 for a 10% spectral gap at q = 32
        # (and the default of 2 suffices for decaying spectra); beyond it the cost keeps
        # growing while the energy fractions, read to a few digits, do not change.
        _check_int(
            "low_rank_power_iterations", self.low_rank_power_iterations, 0, MAX_POWER_ITERATIONS
        )

        self.attribution_groups = _check_group_kinds(
            "attribution_groups", self.attribution_groups
        )
        # Each group costs two forward passes; past a few hundred a measurement takes longer
        # than the training it watches (a layer group per block of an 80-layer model and a
        # dozen components fit well below the bound).
        _check_int(
            "attribution_max_groups", self.attribution_max_groups, 1, MAX_ATTRIBUTION_GROUPS
        )
        self.principal_ranks = _check_ranks("principal_ranks", self.principal_ranks)
        self.drift_reference_masks = _check_reference_masks(
            "drift_reference_masks", self.drift_reference_masks
        )
        if self.drift_reference_masks and not self.drift_enabled:
            raise ValueError(
                "AnalysisConfig.drift_reference_masks are compared by the drift family only, "
                "which is off: set drift_enabled=True, or leave drift_reference_masks empty"
            )

    # --- presets ---------------------------------------------------------------------------
    @classmethod
    def minimal(cls, **overrides: Any) -> AnalysisConfig:
        """Cheapest useful setting: parameter change every 500 steps, no forward passes."""
        base: dict[str, Any] = {
            "interval": 500,
            "param_change_enabled": True,
            "sparse_quality_enabled": False,
        }
        return cls(**{**base, **overrides})

    @classmethod
    def comprehensive(cls, **overrides: Any) -> AnalysisConfig:
        """Everything on, every 50 steps, with per-layer and per-component breakdowns."""
        base: dict[str, Any] = {
            "interval": 50,
            "param_change_per_layer": True,
            "param_change_track_components": True,
            "param_change_track_sign_flips": True,
            "param_change_track_mask_overlap": True,
            "sparse_quality_rescale_random": True,
            "sparse_quality_keep_ratios": [0.01, 0.1],
            "gradient_enabled": True,
            "gradient_track_per_layer": True,
            "gradient_track_components": True,
            "adam_sign_enabled": True,
            "adam_sign_track_components": True,
            "histogram_samples": 10_000,
            "low_rank_enabled": True,
            "low_rank_track_components": True,
            "drift_enabled": True,
            "attribution_enabled": True,
            "principal_enabled": True,
            "principal_track_components": True,
        }
        return cls(**{**base, **overrides})

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (lists and dicts are copies)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalysisConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error that lists the valid ones.

        Raises:
            TypeError: ``data`` is not a mapping (e.g. ``None`` from an empty YAML section).
            ValueError: an unknown key or an invalid value.
        """
        if not isinstance(data, Mapping):
            raise TypeError(
                "AnalysisConfig.from_dict expects a dict of field values (an empty dict for "
                f"the defaults), got {type(data).__name__}."
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted((k for k in data if k not in valid), key=repr)
        if unknown:
            raise ValueError(
                f"AnalysisConfig.from_dict got unknown keys {_short_repr(unknown)}; "
                f"valid keys are {valid}."
            )
        return cls(**data)
