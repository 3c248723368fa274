"""``grail-analysis mask``: save the changed set of BASE -> TUNED as a bit-packed mask file.

The set is chosen by exactly one criterion (:class:`~grail.trainer.analysis.core.mask_file.
ChangeCriterion`): ``threshold`` T (:math:`|\\Delta| > T`; T = 0 is "the stored value differs"),
``keep_ratio`` r (the exact global top-k of :math:`|\\Delta|`, :math:`k = \\mathrm{round}(rN)`,
ties broken by position, as ``grail-analysis overlap`` selects it) or ``bf16_view`` (the
bf16-rounded value differs). The delta is streamed chunk by chunk from the lazily read
checkpoints (:mod:`.pair`: the same names, shapes and dtype rules as ``diff``), and the flags go
straight to a :class:`~grail.trainer.analysis.core.mask_file.MaskWriter`: memory is a few
tensors. The input files are hashed in a background thread meanwhile and their SHA-256 recorded
in the file's metadata; read it back with :func:`~grail.trainer.analysis.load_mask`.

Example:
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from grail.trainer.analysis import load_mask
    >>> d = tempfile.mkdtemp()
    >>> a, b = os.path.join(d, "a.safetensors"), os.path.join(d, "b.safetensors")
    >>> save_file({"w": torch.zeros(2, 2)}, a)
    >>> save_file({"w": torch.tensor([[0.5, 0.0], [1e-9, 0.0]])}, b)
    >>> out = os.path.join(d, "mask.safetensors")
    >>> info = run_mask(MaskOptions(a, b, out, threshold=1e-6))
    >>> info["changed"], load_mask(out)["w"].tolist()
    (1, [[True, False], [False, False]])
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.mask_file import ChangeCriterion, MaskFileError, MaskWriter
from ..core.snapshot import ParameterDelta
from ..ops.budget import exact_budget_drops
from ..ops.changed import changed_flags
from .checkpoint import CheckpointError
from .inputs import describe, hash_files
from .overlap import budget
from .pair import open_pair

__all__ = ["MaskOptions", "mask_criterion", "run_mask"]

logger = logging.getLogger(__name__)


@dataclass
class MaskOptions:
    """Arguments of ``grail-analysis mask`` (see the command's ``--help``)."""

    base: str
    tuned: str
    out: str
    threshold: float | None = None
    keep_ratio: float | None = None
    bf16_view: bool = False
    hash_files: bool = True


def mask_criterion(opts: MaskOptions) -> ChangeCriterion:
    """The one criterion the options give (CheckpointError for none or several)."""
    given = [opts.threshold is not None, opts.keep_ratio is not None, opts.bf16_view]
    if sum(given) != 1:
        raise CheckpointError("give exactly one of --threshold T, --keep-ratio R, --bf16-view "
                              "(--threshold 0 keeps every entry whose stored value differs)")
    try:
        if opts.threshold is not None:
            return ChangeCriterion("threshold", opts.threshold)
        if opts.keep_ratio is not None:
            return ChangeCriterion("keep_ratio", opts.keep_ratio)
        return ChangeCriterion("bf16_view")
    except MaskFileError as err:
        raise CheckpointError(str(err)) from None


def run_mask(opts: MaskOptions) -> dict[str, Any]:
    """Write the mask file; returns its metadata plus ``path``, ``tensors``, ``notes`` and
    ``seconds``."""
    start = time.perf_counter()
    criterion = mask_criterion(opts)
    out = Path(opts.out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {out} must end in .safetensors (the mask is a safetensors "
                              "file)")
    if out.is_dir():
        raise CheckpointError(f"--out {out} is a directory; give the file to write")
    target = out.resolve()
    for label, given in (("BASE", opts.base), ("TUNED", opts.tuned)):
        source = Path(given).resolve()
        if target == source or (source.is_dir() and source in target.parents):
            raise CheckpointError(f"--out {out} would overwrite {label} ({given}); write the "
                                  "mask somewhere else")
    pair = open_pair(opts.base, opts.tuned)
    for note in pair.notes:
        logger.info("%s", note)
    delta = ParameterDelta(pair.old, pair.new)
    keep = None
    if criterion.kind == "keep_ratio":
        total = sum(pair.base.specs[n].numel for n in delta.names)
        keep = exact_budget_drops(delta, [budget(criterion.value or 1.0, total)])[0]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create {out.parent}: {err.strerror or err}") from None
    shapes = {n: pair.base.specs[n].shape for n in delta.names}
    with hash_files([pair.base, pair.tuned], opts.hash_files) as hashes:
        writer = MaskWriter(out, shapes, criterion)
        try:
            for c in delta.stream():
                if keep is not None:
                    bits = c.delta.abs().view(torch.int32)
                    flags = keep(c.name, c.start, bits, torch.empty_like(bits)) == 0
                else:
                    flags = changed_flags(criterion, c.old, c.new, c.delta)
                writer.write(c.name, flags)
        except BaseException:
            writer.abort()
            raise
        digests = hashes.result()
        inputs = {"base": describe(pair.base, digests, opts.base),
                  "tuned": describe(pair.tuned, digests, opts.tuned)}
        info = writer.finish(inputs)
    return {**info, "path": str(out), "tensors": len(shapes), "notes": list(pair.notes),
            "seconds": time.perf_counter() - start}
