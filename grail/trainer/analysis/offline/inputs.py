"""What the multi-checkpoint commands record about their inputs: paths, formats, SHA-256.

:func:`hash_files` starts hashing every file of some checkpoints in a background thread (the
main thread streams the tensors meanwhile) and :func:`describe` writes one checkpoint's entry:
``{"path", "format", "tensors", "files": [{"file", "bytes", "sha256"}]}`` (no ``sha256`` when
hashing is off), the same fields as ``grail-analysis diff`` records.

Example:
    >>> import hashlib, os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from grail.trainer.analysis.offline.checkpoint import open_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_file({"w": torch.zeros(2)}, path)
    >>> ckpt = open_checkpoint(path)
    >>> with hash_files([ckpt]) as hashes:
    ...     entry = describe(ckpt, hashes.result(), path)
    >>> with open(path, "rb") as fh:
    ...     digest = hashlib.sha256(fh.read()).hexdigest()
    >>> entry["format"], entry["files"][0]["sha256"] == digest
    ('safetensors', True)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint

__all__ = ["Hashes", "describe", "hash_files"]


_HASH_BLOCK = 1 << 20


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class Hashes:
    """The pending hashes of :func:`hash_files`; :meth:`result` waits for them."""

    def __init__(self, future: Future[dict[Path, str]] | None) -> None:
        self._future = future

    def result(self) -> dict[Path, str] | None:
        """``file -> hex SHA-256``, or None when hashing is off."""
        return self._future.result() if self._future is not None else None


@contextmanager
def hash_files(checkpoints: Sequence[Checkpoint], enabled: bool = True) -> Iterator[Hashes]:
    """Hash every file of ``checkpoints`` in a background thread while the block runs."""
    files = list(dict.fromkeys(f for c in checkpoints for f in c.files))
    if not enabled:
        yield Hashes(None)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield Hashes(pool.submit(lambda: {f: sha256(f) for f in files}))


def describe(ckpt: Checkpoint, hashes: dict[Path, str] | None, given: str) -> dict[str, Any]:
    """One checkpoint's entry in the ``inputs`` record (module docstring)."""
    files = []
    for f in ckpt.files:
        entry: dict[str, Any] = {"file": f.name, "bytes": f.stat().st_size}
        if hashes is not None:
            entry["sha256"] = hashes[f]
        files.append(entry)
    return {"path": given, "format": ckpt.format, "tensors": len(ckpt.specs), "files": files}
