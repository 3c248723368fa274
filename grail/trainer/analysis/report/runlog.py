"""Reading a training run logged as JSON lines, for ``grail-analysis plot``.

Example:
    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    >>> with open(path, "w") as f:
    ...     _ = f.write(json.dumps({"step": 10, "time": 0.0, "metrics": {"a/b": 1.0}}) + "\\n")
    ...     _ = f.write('{"step": 20, "ti')  # cut off by a crash
    >>> [r["step"] for r in read_run_log(path)]
    [10]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..offline.checkpoint import CheckpointError

__all__ = ["has_values", "read_run_log"]


def read_run_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL training log written by ``JsonlSink`` (``{"step", "time", "metrics"}``).

    Reads with :func:`~grail.trainer.analysis.integrations.sinks.read_jsonl` (a truncated last
    line is skipped, ``null`` values read as ``nan``) and turns every problem - a missing file, a
    bad line, a line that is not such a record, a metric value that is not a number or ``null``
    - into a one-line ``CheckpointError``.
    """
    from ..integrations.sinks import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    try:
        _check_first_line(path)
        records = read_jsonl(path)
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    except ValueError as err:
        raise CheckpointError(str(err).splitlines()[0][:300]) from None
    except (AttributeError, TypeError):  # a JSON line that is not an object
        msg = f"{path} holds lines that are not {{step, metrics}} records"
        raise CheckpointError(msg) from None
    return _checked(path, records)


def _check_first_line(path: Path) -> None:
    """A file whose first line is not a JSON object is not a run log.

    ``read_jsonl`` skips an unparsable last line as cut off by a crash, so a one-line text file
    would otherwise read as an empty log, with a misleading warning.
    """
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                if not line.lstrip().startswith("{"):
                    raise CheckpointError(f"{path} is not a JSON-lines run log (line {number} "
                                          f"starts with {line.strip()[:20]!r}, not '{{')")
                return


def _checked(path: Path, records: list[Any]) -> list[dict[str, Any]]:
    for i, r in enumerate(records, start=1):
        ok = isinstance(r, dict) and isinstance(r.get("metrics"), dict)
        if not ok or isinstance(r.get("step"), bool) or not isinstance(r.get("step"), int):
            raise CheckpointError(f"{path}: record {i} is not a {{step, time, metrics}} object")
        for key, value in r["metrics"].items():
            if not isinstance(value, (int, float)):  # JsonlSink writes numbers and null only
                shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
                raise CheckpointError(
                    f"{path}: record {i} has a non-numeric value for {key!r} ({shown})"
                )
    return records


def has_values(records: list[dict[str, Any]]) -> bool:
    """Whether any record holds a finite metric value (``null`` reads as NaN)."""
    return any(math.isfinite(v) for r in records for v in r["metrics"].values())
