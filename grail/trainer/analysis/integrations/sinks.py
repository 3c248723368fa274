"""Where metrics go in a custom training loop: a tiny protocol and two adapters.

A sink is anything with ``log(metrics, step)`` and ``close()`` (:class:`MetricSink`). The
manager returns plain dicts; a sink only writes them somewhere::

    sink = JsonlSink("runs/analysis.jsonl")
    metrics = analyzer.on_optimizer_step(model, inputs=batch)
    sink.log(metrics, step)          # empty dicts (non-measurement steps) are skipped

:class:`JsonlSink` writes one JSON object per measurement,
``{"step": int, "time": unix seconds, "metrics": {key: float}}``, appends to an existing file,
and flushes after every line, so a crash loses at most the line being written;
:func:`read_jsonl` reads such a file back and tolerates a truncated last line.
:class:`WandbSink` forwards to a wandb run (``wandb`` is imported only when it is used).

Decisions where the design is silent:

* Non-finite values are written as JSON ``null`` (strict JSON that every reader accepts) and
  read back as ``nan``.
* An empty ``metrics`` dict is not written: a loop may call ``log`` on every step.
* Opening a file whose last line was cut off by a crash drops that partial line first, so
  the next record starts on a line of its own and the file stays readable.
* Histograms (``manager.last_histograms``) are passed as an optional ``histograms=`` keyword;
  :class:`WandbSink` logs them as ``wandb.Histogram``, :class:`JsonlSink` ignores them (a JSON
  line holds scalars).
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
from typing import Any, Protocol, runtime_checkable

__all__ = ["JsonlSink", "MetricSink", "WandbSink", "read_jsonl"]

logger = logging.getLogger(__name__)


@runtime_checkable
class MetricSink(Protocol):
    """Anything that accepts a metrics dict at a step; implement both methods to add your own."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` measured at optimizer step ``step``."""

    def close(self) -> None:
        """Flush and release resources; calling it twice is harmless."""


def _json_value(value: Any) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


class JsonlSink:
    """Append one JSON line per measurement to ``path`` (see module docstring).

    Args:
        path: the file; parent directories are created; an existing file is appended to.
        fsync: also ``os.fsync`` after every line (survives power loss, not only a crash).
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file: Any = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def log(
        self,
        metrics: Mapping[str, float],
        step: int,
        histograms: Mapping[str, Any] | None = None,
    ) -> None:
        """Write ``{"step", "time", "metrics"}`` as one line and flush; ``{}`` writes nothing."""
        if not metrics:
            return
        if self._file is None:
            raise ValueError(f"JsonlSink({self.path!r}) is closed")
        record = {
            "step": int(step),
            "time": time.time(),
            "metrics": {str(k): _json_value(v) for k, v in metrics.items()},
        }
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r})"


def _drop_partial_last_line(path: str) -> None:
    """Cut a trailing line without its newline (a write interrupted by a crash)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan backwards in blocks for the last newline.
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            idx = block.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        logger.warning("%s ended with a partial line (%d bytes); dropping it", path, size - keep)
        f.truncate(keep)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records written by :class:`JsonlSink`, in file order; ``null`` values become ``nan``.

    A last line that does not parse (the process died while writing it) is skipped with a
    warning; a bad line anywhere else raises ``ValueError`` naming the line number.
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
            if number == len(lines):
                logger.warning("%s: skipping truncated last line %d", path, number)
                break
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

    wandb requires steps that never decrease within a run.
    """

    def __init__(self, run: Any = None, *, prefix: str = "") -> None:
        self.run = run
        self.prefix = prefix
        self._wandb = _import_wandb()

    def _run(self) -> Any:
        run = self.run if self.run is not None else self._wandb.run
        if run is None:
            raise RuntimeError(
                "WandbSink has no run: call wandb.init() first or pass WandbSink(run=...)"
            )
        return run

    def log(
        self,
        metrics: Mapping[str, float],
        step: int,
        histograms: Mapping[str, Any] | None = None,
    ) -> None:
        """Log ``metrics`` (and ``histograms`` as ``wandb.Histogram``) at ``step``."""
        payload: dict[str, Any] = {f"{self.prefix}{k}": float(v) for k, v in metrics.items()}
        for name, values in (histograms or {}).items():
            payload[f"{self.prefix}{name}"] = self._wandb.Histogram(values)
        if payload:
            self._run().log(payload, step=int(step))

    def close(self) -> None:
        """Nothing to release: the run belongs to the caller (call ``run.finish()``)."""

    def __repr__(self) -> str:
        return f"WandbSink(run={self.run!r}, prefix={self.prefix!r})"


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "WandbSink needs the wandb package: pip install 'grail-analysis[wandb]'"
        ) from err
    return wandb
