"""Where metrics go in a custom training loop: a tiny protocol and two adapters.

A sink is anything with ``log(metrics, step, histograms=None)`` and ``close()``
(:class:`MetricSink`). The manager returns plain dicts (and keeps the histograms of the last
measurement in ``manager.last_histograms``); a sink only writes them somewhere::

    sink = JsonlSink("runs/analysis.jsonl")
    metrics = analyzer.on_optimizer_step(model, inputs=batch)
    sink.log(metrics, step, histograms=analyzer.last_histograms)  # {} steps are skipped

:class:`JsonlSink` writes one JSON object per measurement,
``{"step": int, "time": unix seconds, "metrics": {key: float}}``, appends to an existing run
log, and flushes after every line, so a crash loses at most the line being written;
:func:`read_jsonl` reads such a file back and skips a record cut off by a crash.
:class:`WandbSink` forwards to a wandb run (``wandb`` is imported only when it is used).

Training comes first: once constructed, a sink never raises into the training loop because
of a value (NaN, Inf, an empty or huge histogram) or because its backend failed (disk full, a
wandb error). The failure is logged once per sink and kind as a warning and the measurement
is dropped; the loop goes on. Mistakes that can be seen up front raise at construction.

Decisions where the design is silent:

* Non-finite values are written as JSON ``null`` (strict JSON that every reader accepts) and
  read back as ``nan``. A value that is not a number at all is written as ``null`` too (with
  one warning).
* An empty ``metrics`` dict is not written: a loop may call ``log`` on every step.
* A sink never modifies existing bytes. An existing non-empty file is appended to only if its
  first line is a ``{"step", "time", "metrics"}`` record (or one cut off by a crash);
  anything else (a checkpoint passed by mistake, another program's log) is refused at
  construction and left byte-identical. If the file does not end in a newline (a crash cut
  its last line), a newline is written before the next record: the partial line stays where
  it is, and :func:`read_jsonl` skips it.
* Histograms (``manager.last_histograms``) are the protocol's optional third argument,
  ``name -> sampled values``; :class:`WandbSink` logs them as ``wandb.Histogram``,
  :class:`JsonlSink` ignores them (a JSON line holds scalars). Only finite values reach the
  backend (:func:`finite_values`); a histogram with none left is skipped.
* Sinks write on whichever process calls them; in a multi-process loop call them on rank 0.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    >>> with JsonlSink(path) as sink:
    ...     sink.log({"param_change/norm_l2": 0.5}, step=10)
    ...     sink.log({}, step=11)
    >>> [(r["step"], r["metrics"]) for r in read_jsonl(path)]
    [(10, {'param_change/norm_l2': 0.5})]
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from ..core.logonce import LogOnce

__all__ = ["ClosingSink", "JsonlSink", "MetricSink", "WandbSink", "finite_values", "read_jsonl"]

_S = TypeVar("_S", bound="ClosingSink")

logger = logging.getLogger(__name__)

#: How every line written by :class:`JsonlSink` starts (``json.dumps`` keeps key order).
_RECORD_START = '{"step"'
#: A first line longer than this is not read to the end when checking an existing file.
_MAX_FIRST_LINE = 64 * 2**20


#: What every sink appends to its failure warnings (each is said once per sink and kind).
FAILURE_SUFFIX = " (further such failures are not logged)"


@runtime_checkable
class MetricSink(Protocol):
    """Anything that accepts a metrics dict at a step; implement both methods to add your own.

    Every sink of this package, the framework callbacks' output included, follows it.
    """

    def log(
        self,
        metrics: Mapping[str, float],
        step: int,
        histograms: Mapping[str, Any] | None = None,
    ) -> None:
        """Record ``metrics`` measured at optimizer step ``step``, and ``histograms`` (name ->
        sampled values, e.g. ``manager.last_histograms``) where the backend can show them. An
        empty ``metrics`` (a step without a measurement) records nothing."""

    def close(self) -> None:
        """Flush and release resources; calling it twice is harmless."""


def finite_values(values: Any) -> np.ndarray | None:
    """The finite entries of ``values`` (array, tensor or sequence) as a flat numpy array.

    ``None`` when nothing finite is left or ``values`` is not numeric: such a histogram is
    skipped rather than handed to a backend that raises on it (``wandb.Histogram`` does on
    NaN and Inf).

    >>> finite_values([1.0, float("nan"), float("inf"), 2.0]).tolist()
    [1.0, 2.0]
    >>> finite_values([]) is None
    True
    """
    try:
        if hasattr(values, "detach"):  # a torch tensor, without importing torch here
            values = values.detach()
            if values.is_floating_point():
                values = values.float()  # bf16/fp16 have no numpy equivalent to view
            values = values.cpu().numpy()
        arr = np.asarray(values).reshape(-1)
        if arr.dtype.kind not in "fiub":
            arr = arr.astype(np.float64)
    except (TypeError, ValueError, RuntimeError):
        return None
    if arr.dtype.kind == "f":
        arr = arr[np.isfinite(arr)]
    return arr if arr.size else None


def _json_value(value: Any, warn: LogOnce, key: str) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        warn.warning("value", "metric %r is not a number (%r); written as null", key, value)
        return None
    return v if math.isfinite(v) else None


class ClosingSink:
    """``with sink:`` closes the sink on exit (for sinks that hold a file or a writer)."""

    def close(self) -> None:  # the sink's own
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlSink(ClosingSink):
    """Append one JSON line per measurement to ``path`` (see module docstring).

    Args:
        path: the file; parent directories are created; an existing run log is appended to.
        fsync: also ``os.fsync`` after every line (survives power loss, not only a crash).

    Raises:
        ValueError: ``path`` exists, is not empty and is not a JSONL run log (its first line
            is not a ``{"step", "time", "metrics"}`` record); the file is left untouched.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync
        self._warn = LogOnce(logger, suffix=FAILURE_SUFFIX)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._needs_newline = _check_run_log(self.path)
        self._file: Any = open(self.path, "ab")  # noqa: SIM115 - kept open until close()

    def log(
        self,
        metrics: Mapping[str, float],
        step: int,
        histograms: Mapping[str, Any] | None = None,
    ) -> None:
        """Write ``{"step", "time", "metrics"}`` as one line and flush; ``{}`` writes nothing.

        A failed write is logged (once) and the record dropped; it never raises into training,
        nor does a call after :meth:`close` (dropped, with one warning).
        """
        if not metrics:
            return
        if self._file is None:
            self._warn.warning("closed", "JsonlSink(%r) is closed; metrics of step %s and later "
                               "are dropped", self.path, step)
            return
        record = {
            "step": int(step),
            "time": time.time(),
            "metrics": {str(k): _json_value(v, self._warn, str(k)) for k, v in metrics.items()},
        }
        line = json.dumps(record, allow_nan=False) + "\n"
        if self._needs_newline:
            line = "\n" + line
        try:
            self._file.write(line.encode("utf-8"))
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        except (OSError, ValueError) as err:
            # Part of the line may be on disk: start the next record on a fresh line.
            self._needs_newline = True
            self._warn.warning("write", "JsonlSink could not write to %s: %s", self.path, err)
        else:
            self._needs_newline = False

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as err:
                self._warn.warning("close", "JsonlSink could not close %s: %s", self.path, err)
            self._file = None

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r})"


def _is_record(obj: Any) -> bool:
    return isinstance(obj, dict) and {"step", "time", "metrics"} <= obj.keys() and isinstance(
        obj["metrics"], dict
    )


def _is_cut_record(line: str) -> bool:
    """A line that starts like a :class:`JsonlSink` record (and was cut off by a crash)."""
    s = line.strip()
    return bool(s) and (s.startswith(_RECORD_START) or _RECORD_START.startswith(s))


def _check_run_log(path: str) -> bool:
    """Refuse an existing file that is not a run log; return whether it lacks a final newline.

    Only reads: the file is never modified here.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        first = f.read(65536)
        if first.lstrip()[:1] == b"{":  # read on to the end of the line
            while b"\n" not in first and len(first) < _MAX_FIRST_LINE:
                block = f.read(1 << 20)
                if not block:
                    break
                first += block
        f.seek(-1, os.SEEK_END)
        needs_newline = f.read(1) != b"\n"
    line = first.split(b"\n", 1)[0]
    try:
        text = line.decode("utf-8")
        ok = _is_record(json.loads(text))
    except UnicodeDecodeError:
        ok = False
    except json.JSONDecodeError:
        ok = _is_cut_record(text)
    if not ok:
        raise ValueError(
            f"{path} exists and is not a JSONL run log (its first line is not a "
            '{"step", "time", "metrics"} record); JsonlSink only appends to such logs and has '
            "left this file untouched: pick another file name"
        )
    return needs_newline


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records written by :class:`JsonlSink`, in file order; ``null`` values become ``nan``.

    A record cut off by a crash is skipped with a warning: the last line if it does not parse,
    and a line anywhere that starts like a record (``{"step"...``) but does not parse (the
    sink appended after it when the file was reopened). Any other line that does not parse
    raises ``ValueError`` naming the line number.
    """
    with open(os.fspath(path), encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) or _is_cut_record(line):
                logger.warning("%s: skipping line %d, a record cut off mid-write", path, number)
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from err
        metrics = record.get("metrics", {})
        record["metrics"] = {k: math.nan if v is None else v for k, v in metrics.items()}
        records.append(record)
    return records


class WandbSink:
    """Log to a wandb run: ``run.log({prefix + key: value}, step=step)``.

    Args:
        run: a ``wandb`` run; ``None`` uses the active run (``wandb.run``) at each call.
        prefix: prepended to every key (e.g. ``"analysis/"``).

    wandb requires steps that never decrease within a run. Without a run, or when wandb
    fails, the measurement is dropped with one warning (training goes on).
    """

    def __init__(self, run: Any = None, *, prefix: str = "") -> None:
        self.run = run
        self.prefix = prefix
        self._wandb = _import_wandb()
        self._warn = LogOnce(logger, suffix=FAILURE_SUFFIX)

    def log(
        self,
        metrics: Mapping[str, float],
        step: int,
        histograms: Mapping[str, Any] | None = None,
    ) -> None:
        """Log ``metrics`` (and finite ``histograms`` as ``wandb.Histogram``) at ``step``."""
        payload: dict[str, Any] = {}
        for k, v in metrics.items():
            try:
                payload[f"{self.prefix}{k}"] = float(v)
            except (TypeError, ValueError):
                self._warn.warning("value", "metric %r is not a number (%r); not logged", k, v)
        payload.update(wandb_histograms(self._wandb, histograms, self.prefix, self._warn))
        if not payload:
            return
        run = self.run if self.run is not None else self._wandb.run
        if run is None:
            self._warn.warning(
                "no-run",
                "WandbSink has no run, metrics are dropped: call wandb.init() first or pass "
                "WandbSink(run=...)",
            )
            return
        try:
            run.log(payload, step=int(step))
        except Exception as err:  # a logging backend must never stop training
            self._warn.warning("log", "WandbSink: wandb failed to log step %s: %r", step, err)

    def close(self) -> None:
        """Nothing to release: the run belongs to the caller (call ``run.finish()``)."""

    def __repr__(self) -> str:
        return f"WandbSink(run={self.run!r}, prefix={self.prefix!r})"


def wandb_histograms(
    wandb: Any, histograms: Mapping[str, Any] | None, prefix: str, warn: LogOnce
) -> dict[str, Any]:
    """``{prefix + name: wandb.Histogram}`` of the finite values; empty ones are left out.

    ``warn`` (the caller's :class:`~grail.trainer.analysis.core.logonce.LogOnce`) is told about
    a histogram that could not be built.
    """
    out: dict[str, Any] = {}
    for name, values in (histograms or {}).items():
        finite = finite_values(values)
        if finite is None:
            continue
        try:
            out[f"{prefix}{name}"] = wandb.Histogram(finite)
        except Exception as err:  # whatever wandb rejects, the metrics still go out
            warn.warning("histogram", "histogram %r could not be built: %r; skipped", name, err)
    return out


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "WandbSink needs the wandb package: pip install 'grail-analysis[wandb]'"
        ) from err
    return wandb
