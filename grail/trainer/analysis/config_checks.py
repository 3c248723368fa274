"""The validators of :class:`~grail.trainer.analysis.config.AnalysisConfig`'s fields and the
bounds of the integer fields whose cost grows with their value.

Every check raises one ``ValueError`` that names the field, shows the value (long lists cut to
their first entries) and says what is accepted, so that a configuration mistake fails at
construction with a message that says what to change.

Example:
    >>> _check_ranks("principal_ranks", [8, 1])
    [1, 8]
    >>> _check_int("interval", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: AnalysisConfig.interval=0 is invalid: expected an integer >= 1.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .keys import format_keep_ratio, format_threshold

# Upper bounds of integer fields whose cost grows with the value (see the checks for why).
MAX_POWER_ITERATIONS = 32
MAX_OVERSAMPLING = 256
MAX_HISTOGRAM_SAMPLES = 10_000_000
MAX_ATTRIBUTION_GROUPS = 256
ATTRIBUTION_GROUP_KINDS = ("component", "layer")

_SHOWN = 10  # entries of a list or mapping shown in an error message


def _short_repr(value: Any) -> str:
    """``repr(value)``, with a long list, tuple or dict cut to its first entries and its size."""
    if isinstance(value, (list, tuple)) and len(value) > _SHOWN:
        head = ", ".join(repr(v) for v in value[:_SHOWN])
        return f"[{head}, ...] ({len(value)} values)"
    if isinstance(value, dict) and len(value) > _SHOWN:
        head = ", ".join(f"{k!r}: {v!r}" for k, v in list(value.items())[:_SHOWN])
        return f"{{{head}, ...}} ({len(value)} entries)"
    return repr(value)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"AnalysisConfig.{name}={_short_repr(value)} is invalid: {allowed}.")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "expected True or False")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        _fail(name, value, f"expected an integer {rng}")


def _check_thresholds(name: str, values: Any, allow_empty: bool = False) -> list[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)):
        _fail(name, values, "expected a list of finite numbers >= 0")
    out: list[float] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            _fail(name, values, f"every threshold must be a finite number >= 0 (got {v!r})")
        out.append(float(v) + 0.0)  # -0.0 is +0.0: its key would read "-0e+00"
    if not out and not allow_empty:
        _fail(name, values, "expected at least one threshold")
    seen: dict[str, float] = {}
    for v in sorted(set(out)):
        key = format_threshold(v)
        if key in seen:
            _fail(
                name,
                values,
                f"thresholds {seen[key]!r} and {v!r} both format as {key!r} in metric keys; "
                "keep one of them",
            )
        seen[key] = v
    return sorted(set(out))


def _check_ratios(name: str, values: Any) -> list[float]:
    if not isinstance(values, (list, tuple)):
        _fail(name, values, "expected a list of fractions in (0, 1]")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < v <= 1.0):
            _fail(name, values, f"every keep ratio must be in (0, 1] (got {v!r})")
        out.append(float(v))
    if len(set(out)) != len(out):
        dup = next(v for v in out if out.count(v) > 1)
        _fail(name, values, f"keep ratios must be unique ({dup!r} is given twice)")
    if out:
        seen: dict[str, float] = {}
        for v in sorted(out):
            key = format_keep_ratio(v)
            if key in seen:
                _fail(
                    name,
                    values,
                    f"keep ratios {seen[key]!r} and {v!r} both format as {key!r} in metric "
                    "keys; keep one of them",
                )
            seen[key] = v
    return sorted(out)


def _check_group_kinds(name: str, values: Any) -> list[str]:
    if isinstance(values, str):
        values = [values]
    allowed = list(ATTRIBUTION_GROUP_KINDS)
    if not isinstance(values, (list, tuple)) or not values:
        _fail(name, values, f"expected a non-empty list of group kinds from {allowed}")
    for v in values:
        if v not in ATTRIBUTION_GROUP_KINDS:
            _fail(name, values, f"every group kind must be one of {allowed} (got {v!r})")
    if len(set(values)) != len(values):
        _fail(name, values, "group kinds must be unique")
    return [k for k in ATTRIBUTION_GROUP_KINDS if k in values]  # one order: configs compare equal


def _check_ranks(name: str, values: Any) -> list[int]:
    if not isinstance(values, (list, tuple)) or not values:
        _fail(name, values, "expected a non-empty list of integers >= 1")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _fail(name, values, f"every rank must be an integer >= 1 (got {v!r})")
    if len(set(values)) != len(values):
        _fail(name, values, "ranks must be unique")
    return sorted(int(v) for v in values)


def _check_reference_masks(name: str, value: Any) -> dict[str, str]:
    """``{reference name: mask file}``: names that read back from ``drift/overlap/{name}/...``
    keys, files that exist and are mask files (their header is read; shapes are checked against
    the model when the analysis first meets it)."""
    from .core.mask_file import load_mask
    from .keys import metric_key

    if not isinstance(value, dict):
        _fail(name, value, "expected a dict of reference name -> mask file path")
    out: dict[str, str] = {}
    for ref, path in value.items():
        if not isinstance(ref, str) or not ref:
            _fail(name, value, f"reference names must be non-empty strings (got {ref!r})")
        try:
            metric_key("drift/overlap", "jaccard", reference=ref)
        except ValueError:
            _fail(name, value, f"reference name {ref!r} cannot be part of a metric key "
                  "(no '/' or whitespace, not 'component' or 'layer_<i>'); rename it")
        if any(c.isspace() for c in ref):
            _fail(name, value, f"reference name {ref!r} contains whitespace; rename it")
        if not isinstance(path, (str, os.PathLike)):
            _fail(name, value, f"the mask of {ref!r} must be a path (got {path!r})")
        try:
            load_mask(path)
        except ValueError as err:  # MaskFileError: missing, not a mask file, damaged
            _fail(name, value, f"{err}")
        out[ref] = os.fspath(path)
    return out
