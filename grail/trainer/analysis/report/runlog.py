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

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..offline.checkpoint import CheckpointError, check_labels, number_repeats

__all__ = ["has_values", "read_run_log", "run_labels"]

logger = logging.getLogger(__name__)


def read_run_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL training log written by ``JsonlSink`` (``{"step", "time", "metrics"}``).

    Reads with :func:`~grail.trainer.analysis.integrations.sinks.read_jsonl` (a truncated last
    line is skipped, ``null`` values read as ``nan``) and turns every problem - a missing file, a
    bad line, a line that is not such a record, a metric value that is not a number or ``null``
    - into a one-line ``CheckpointError``.

    A log appended to by a resumed run (``JsonlSink`` appends) holds a step again, or an earlier
    one: the resumed run re-measured from there, so the earlier records from that step on are
    replaced by the later ones, with one warning; the records come out in increasing steps.
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
    return _latest_timeline(path, _checked(path, records))


def _latest_timeline(path: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with every record a later one re-measured (its step or a later one, written
    before a resumed run's) left out: the run as its last segment left it."""
    kept: list[dict[str, Any]] = []
    replaced = 0
    for record in records:
        while kept and kept[-1]["step"] >= record["step"]:
            kept.pop()
            replaced += 1
        kept.append(record)
    if replaced:
        logger.warning("%s: %d record%s replaced by records of the same or earlier steps logged "
                       "after them (a resumed run appended to the log); plotting the later ones",
                       path, replaced, "" if replaced == 1 else "s")
    return kept


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


def run_labels(paths: Sequence[str | Path], given: Sequence[str] | None = None) -> list[str]:
    """Legend labels of the runs: ``given`` (checked), else the file stems made distinct.

    Stems that clash get the folders that tell them apart prepended (``runs/a/x/analysis.jsonl``
    and ``runs/b/x/analysis.jsonl`` become ``a/analysis`` and ``b/analysis``); the same file given
    twice gets ``#2``. A wrong number of labels, an empty
    one or a repeated one is a one-line ``CheckpointError``.

    >>> run_labels(["runs/a/x/analysis.jsonl", "runs/b/x/analysis.jsonl", "bf16.jsonl"])
    ['a/analysis', 'b/analysis', 'bf16']
    >>> run_labels(["x.jsonl", "x.jsonl"])
    ['x', 'x #2']
    """
    if given is not None:
        return check_labels(given, len(paths), "run logs")
    parts = [Path(p).with_suffix("").parts or (str(p),) for p in paths]
    labels = [pp[-1] for pp in parts]
    for stem in {lab for lab in labels if labels.count(lab) > 1}:
        group = [i for i, lab in enumerate(labels) if lab == stem]
        dirs = [parts[i][:-1] for i in group]
        lead = _common_length(dirs)
        tail = _common_length([d[lead:][::-1] for d in dirs])
        for i, d in zip(group, dirs, strict=True):
            labels[i] = "/".join([*d[lead:len(d) - tail], stem])
    return number_repeats(labels)


def _common_length(seqs: Sequence[Sequence[str]]) -> int:
    """Length of the longest common prefix of ``seqs``."""
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n
