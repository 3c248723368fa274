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

import json
import logging
import math
from pathlib import Path
from typing import Any

from .offline import CheckpointError

__all__ = ["read_run_log"]

logger = logging.getLogger(__name__)


def read_run_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL training log (``{"step", "time", "metrics"}`` per line).

    Uses :func:`grail.trainer.analysis.integrations.sinks.read_jsonl` when that module is
    installed; otherwise an equivalent reader: blank lines are ignored, a last line that does not
    parse (a write cut off by a crash) is skipped, any other bad line raises ``CheckpointError``
    naming its number, and ``null`` metric values read as ``nan``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    try:
        from .integrations.sinks import read_jsonl
    except ImportError:
        read_jsonl = None
    try:
        if read_jsonl is not None:
            return _checked(path, read_jsonl(path))
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    except ValueError as err:
        raise CheckpointError(str(err).splitlines()[0][:300]) from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: skipping truncated last line %d", path, number)
                break
            raise CheckpointError(f"{path}: line {number} is not valid JSON") from None
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
            metrics = record["metrics"]
            record["metrics"] = {k: math.nan if v is None else v for k, v in metrics.items()}
        records.append(record)
    return _checked(path, records)


def _checked(path: Path, records: list[Any]) -> list[dict[str, Any]]:
    for i, r in enumerate(records, start=1):
        ok = isinstance(r, dict) and isinstance(r.get("metrics"), dict)
        if not ok or isinstance(r.get("step"), bool) or not isinstance(r.get("step"), int):
            raise CheckpointError(f"{path}: record {i} is not a {{step, time, metrics}} object")
    return records
