"""``grail-analysis diff``: the online metrics on two saved checkpoints, as one JSON document.

:func:`run_diff` builds the run's :class:`~grail.trainer.analysis.config.AnalysisConfig` from
:class:`DiffOptions`, instantiates the computers with the same registry as the online manager,
and feeds them a delta between two lazily loaded checkpoints (:mod:`.pair`). Peak memory
is a few tensors: nothing holds a whole checkpoint. The checkpoint is read once for the
parameter-change metrics, the per-(layer, component) heatmaps and the threshold curve
(:mod:`.stream`); the input files are hashed in a background thread meanwhile.

Parameter change and the principal geometry (``principal/*``: the whole fine-tune, with the
BASE checkpoint as the reference W and dW = TUNED - BASE) always run on the streamed
delta. The low-rank spectra run there too when no prompts are given (``context=None``:
no forward pass). With prompts, sparse quality and low-rank
(spectra and quality) run on the loaded TUNED model instead (:mod:`.quality`). Both
lists of computers come from the registry, from copies of the run's config that switch the
other families off.

Decisions:

* Sparse quality uses the ``--thresholds`` above 0 (threshold 0 keeps the whole update: the tuned
  model itself) and ``--keep-ratios``; parameter change uses every threshold.
* Sign flips are always tracked offline; per-layer and per-component keys follow ``--per-layer``.
* With prompts, ``drift/*`` runs on the loaded model with BASE as its base: the KL between the
  base and the tuned model in both directions (``drift/kl_base_now``, ``drift/kl_now_base``),
  top-1 agreement and the drift statistics, the numbers an online run reports at the step TUNED
  was saved (``drift/cos_interval`` is NaN: there is no interval). ``drift_keep_ratios`` is
  empty: ``sparse/*_at_keep_*`` already answers that question for the pair, and its low-rank part
  is off (``lowrank/*`` is the same pair's).
* Non-finite values are written to ``metrics.json`` as ``null`` (strict JSON).
* With prompts, output attribution (``attrib/*``) runs per component, and per layer too unless
  ``--no-per-layer``, measuring at most ``--attribution-max-groups`` groups (default 16, as
  online: two forwards each); ``metrics.json`` also gets its table under ``"attribution"``
  (one row per group: ``kl_only``, ``kl_without``, ``update_share``, ``param_share``).

Example:
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> a, b = os.path.join(d, "a.safetensors"), os.path.join(d, "b.safetensors")
    >>> save_file({"w": torch.zeros(2, 2)}, a)
    >>> save_file({"w": torch.tensor([[0.5, 0.0], [0.0, 0.0]])}, b)
    >>> doc = run_diff(DiffOptions(a, b, low_rank=False, hash_files=False, progress=False))
    >>> doc["metrics"]["param_change/norm_l1"], doc["metrics"]["param_change/exact_unchanged_ratio"]
    (0.5, 0.75)
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import platform
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import AnalysisConfig
from ..core.naming import ParameterNaming
from ..metrics.attribution import attribution_table
from ..metrics.drift import DriftMetrics
from ..metrics.registry import build_computers
from .checkpoint import CheckpointError
from .inputs import describe, sha256
from .pair import CheckpointPair, open_pair
from .stream import CURVE_THRESHOLDS, CellStats, ObservedDelta, Progress

__all__ = ["DEFAULT_KEEP_RATIOS", "DiffOptions", "build_config", "run_diff", "versions"]

logger = logging.getLogger(__name__)

DEFAULT_KEEP_RATIOS = [0.01, 0.05, 0.1, 0.25, 0.5]


@dataclass
class DiffOptions:
    """Arguments of ``grail-analysis diff`` (see the command's ``--help``)."""

    base: str
    tuned: str
    out: str = "."
    prompts: str | None = None
    thresholds: list[float] = field(default_factory=lambda: [0.0, 1e-8, 1e-6, 1e-4])
    ranks: list[int] = field(default_factory=lambda: [1, 8, 64])
    keep_ratios: list[float] = field(default_factory=lambda: list(DEFAULT_KEEP_RATIOS))
    per_layer: bool = True
    device: str = "cpu"
    max_tokens: int = 4096
    seed: int = 0
    low_rank: bool = True  # when the low-rank computer is installed
    principal: bool = True  # the update against the base's principal directions
    hash_files: bool = True
    progress: bool | None = None  # None: a bar when stderr is a terminal
    tokenizer: str | None = None  # directory of the tokenizer for the prompts (None: TUNED's)
    attribution: bool = True  # attrib/* with prompts: per component, and per layer with per_layer
    attribution_max_groups: int = 16


def low_rank_available() -> bool:
    """True when the low-rank computer is installed with this package."""
    import importlib.util

    return importlib.util.find_spec("grail.trainer.analysis.metrics.low_rank") is not None


# the command-line option behind each config field a user sets through ``diff``
_OPTIONS = {
    "param_change_thresholds": "--thresholds",
    "sparse_quality_thresholds": "--thresholds",
    "sparse_quality_keep_ratios": "--keep-ratios",
    "sparse_quality_max_tokens": "--max-tokens",
    "sparse_quality_seed": "--seed",
    "low_rank_ranks": "--ranks",
    "principal_ranks": "--ranks",
    "attribution_max_groups": "--attribution-max-groups",
}


def build_config(opts: DiffOptions, low_rank: bool | None = None) -> AnalysisConfig:
    """The run's config; a bad value raises ``ValueError`` naming the field and the
    command-line option that set it."""
    try:
        return _build_config(opts, low_rank)
    except ValueError as err:
        message = str(err)
        field = message.removeprefix("AnalysisConfig.").split("=", 1)[0]
        if field in _OPTIONS:
            message = f"{message.rstrip('.')} (set by {_OPTIONS[field]})"
        raise ValueError(message) from err


def _build_config(opts: DiffOptions, low_rank: bool | None) -> AnalysisConfig:
    low_rank = opts.low_rank and (low_rank_available() if low_rank is None else low_rank)
    sparse_thresholds = [t for t in opts.thresholds if t > 0]
    with_prompts = opts.prompts is not None
    return AnalysisConfig(
        interval=1,
        param_change_thresholds=list(opts.thresholds),
        param_change_per_layer=opts.per_layer,
        param_change_track_components=opts.per_layer,
        param_change_track_sign_flips=True,
        sparse_quality_enabled=with_prompts and bool(sparse_thresholds or opts.keep_ratios),
        sparse_quality_thresholds=sparse_thresholds,
        sparse_quality_keep_ratios=list(opts.keep_ratios),
        sparse_quality_seed=opts.seed,
        sparse_quality_max_tokens=opts.max_tokens,
        low_rank_enabled=low_rank,
        low_rank_ranks=list(opts.ranks),
        low_rank_quality_enabled=with_prompts,
        low_rank_track_components=opts.per_layer,
        # With prompts: drift/* with BASE as the base, for KL(P_base || P_tuned) and back; its
        # masked updates would repeat sparse/*_at_keep_* (top-k instead of a threshold).
        drift_enabled=with_prompts,
        drift_keep_ratios=[],
        attribution_enabled=with_prompts and opts.attribution,
        attribution_groups=["component", "layer"] if opts.per_layer else ["component"],
        attribution_max_groups=opts.attribution_max_groups,
        principal_enabled=opts.principal,
        principal_ranks=list(opts.ranks),
        principal_track_components=opts.per_layer,
        # One comparison: no next measurement would reuse cached factors (they would add
        # sum k(m+n) floats per matrix to a budget of a few tensors).
        principal_cache_factors=False,
        # A one-off diff does not amortise seconds of compiling, and the compiler alone holds
        # hundreds of MB of host memory, against a budget of a few tensors.
        fused_kernels=False,
    )


def versions() -> dict[str, str | None]:
    """Python and package versions (None where a package is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "safetensors", "numpy", "grail-analysis"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _run(computers: list[Any], delta: Any, old: Any, new: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for computer in computers:
        with torch.no_grad():
            raw = computer.compute(delta=delta, old_snapshot=old, current_snapshot=new)
        out.update({str(k): float(v) for k, v in (raw or {}).items()})
    return out


def _check_device(device: str) -> None:
    """Only ``cpu`` and ``cuda[:i]``: other backends (meta, mps, ...) fail deep in the metrics."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise CheckpointError(f"unsupported device {device!r} (use cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was given but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CheckpointError(f"--device {device}: there are only {torch.cuda.device_count()} "
                              "CUDA devices")


def run_diff(opts: DiffOptions) -> dict[str, Any]:
    """Compare BASE and TUNED; returns the content of ``metrics.json`` (see module docstring)."""
    start = time.perf_counter()
    _check_device(opts.device)
    config = build_config(opts)
    prompts = batch = None
    if opts.prompts is not None:  # encoded before any weight is read: a bad tokenizer fails fast
        from .quality import prompt_batch, read_prompts

        prompts = read_prompts(opts.prompts)
        batch = prompt_batch(opts.tuned, prompts, opts.max_tokens, opts.tokenizer)
    elif opts.tokenizer is not None:
        raise CheckpointError("--tokenizer needs --prompts (it only encodes the prompts)")
    pair: CheckpointPair = open_pair(opts.base, opts.tuned, opts.device)
    for note in pair.notes:
        logger.info("%s", note)
    # Streamed: parameter change (and the spectra when no model runs); with prompts the
    # forward-pass families run on the loaded model. Both lists come from the registry.
    with_model = prompts is not None
    stream_config = dataclasses.replace(
        config,
        sparse_quality_enabled=False,
        drift_enabled=False,
        attribution_enabled=False,
        low_rank_enabled=config.low_rank_enabled and not with_model,
    )
    stream_phase = build_computers(stream_config)
    model_phase = []
    if with_model:
        model_phase = build_computers(
            dataclasses.replace(config, param_change_enabled=False, principal_enabled=False)
        )
        for computer in model_phase:
            if isinstance(computer, DriftMetrics):
                # BASE -> TUNED is both the pair and the whole fine-tune: drift/lowrank/* and
                # drift/attrib/* would repeat lowrank/* and attrib/* (principal/* runs in the
                # stream phase, so drift/principal/* is off too)
                computer.low_rank = computer.attribution = computer.principal = None
                computer.base_factors = None
    files = [*pair.base.files, *pair.tuned.files]
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing: Future[list[str]] | None = None
        if opts.hash_files:
            hashing = pool.submit(lambda: [sha256(f) for f in files])
        naming = ParameterNaming(pair.names, config.component_map)
        cells = CellStats(naming, sorted({*CURVE_THRESHOLDS, *opts.thresholds}), opts.device)
        progress = Progress(len(pair.names), pair.bytes_of, opts.progress)
        delta = ObservedDelta(pair.old, pair.new, [cells, progress])
        metrics = _run(stream_phase, delta, pair.old, pair.new)
        stream_seconds = progress.close()
        pair.base.close()
        pair.tuned.close()
        if model_phase and batch is not None:
            from .quality import run_model_metrics

            metrics.update(
                run_model_metrics(
                    model_phase, pair.base, opts.tuned, batch, opts.device, opts.tokenizer
                )
            )
        hashes = dict(zip(files, hashing.result(), strict=True)) if hashing else None
    notes = list(pair.notes)
    if opts.low_rank and not low_rank_available():
        notes.append("low-rank metrics are not available in this installation; skipped")
    grid = cells.result()
    extra: dict[str, Any] = {}
    table = attribution_table(metrics)
    if table is not None:
        extra["attribution"] = _finite_table(table)
    return {
        "kind": "grail-analysis diff",
        "metrics": {k: _finite(v) for k, v in sorted(metrics.items())},
        "layer_component": {k: v for k, v in grid.items() if k != "curve"},
        "threshold_curve": grid["curve"],
        "compared": {
            "tensors": len(pair.names),
            "dtypes": pair.dtypes(),
            "skipped": pair.skipped,
            "compared_in_float32": pair.upcast,
        },
        "notes": notes,
        "arguments": asdict(opts),
        "config": config.to_dict(),
        "versions": versions(),
        "inputs": {
            "base": describe(pair.base, hashes, opts.base),
            "tuned": describe(pair.tuned, hashes, opts.tuned),
        },
        "timing": {
            "stream_seconds": stream_seconds,
            "stream_bytes": progress.done_bytes,
            "total_seconds": time.perf_counter() - start,
        },
        "prompts": len(prompts) if prompts is not None else 0,
        **extra,
    }


def _finite_table(table: dict[str, Any]) -> dict[str, Any]:
    """The attribution table with non-finite numbers as ``None`` (strict JSON)."""
    def clean(v: Any) -> Any:
        return _finite(v) if isinstance(v, float) else v

    return {
        **{k: clean(v) for k, v in table.items() if k != "groups"},
        "groups": [{k: clean(v) for k, v in row.items()} for row in table["groups"]],
    }
