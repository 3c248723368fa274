"""Two checkpoints as the two sides of a :class:`ParameterDelta`.

:func:`pair_checkpoints` checks that BASE and TUNED hold the same tensor names and shapes and
builds one lazily loaded :class:`~grail.trainer.analysis.core.snapshot.ParameterSnapshot` per side,
so that the online metric computers run unchanged on checkpoints of any size: ``.data`` is a
:class:`LazyTensors`, a read-only mapping ``name -> tensor`` whose values are loaded on access and
not kept (a one-entry cache covers the repeated reads of one tensor while it is streamed);
``.param_dtypes`` and ``.shards`` come from the headers (one process, unsharded:
``ShardInfo(shape, 0, False, True)``).

Decisions:

* Different names or shapes are an error whose message lists the first few on each side.
* Tensors that are not floating point on either side (step counters, integer masks, quantized
  storage) are skipped with a note, as the online analysis skips them.
* A tensor stored in different dtypes (a bf16 base, an fp32 fine-tune) is compared in float32:
  both sides are exposed as float32 copies and recorded as float32 parameters, so "exactly
  unchanged" means equal as real numbers and the bf16 count rounds both sides; a note says so.
* Names are ordered as the TUNED files store them (file by file, by offset): sequential reads.

Example:
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> save_file({"w": torch.zeros(4)}, os.path.join(d, "a.safetensors"))
    >>> save_file({"w": torch.tensor([0.0, 0.0, 1.0, 0.0])}, os.path.join(d, "b.safetensors"))
    >>> pair = pair_checkpoints(open_checkpoint(os.path.join(d, "a.safetensors")),
    ...                         open_checkpoint(os.path.join(d, "b.safetensors")))
    >>> pair.old.compute_delta(pair.new).statistics()["norm_l1"]
    1.0
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..core.distributed import ShardInfo
from ..core.snapshot import ParameterSnapshot
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint

__all__ = ["CheckpointPair", "LazyTensors", "lazy_snapshot", "open_pair", "pair_checkpoints"]


class LazyTensors(Mapping[str, torch.Tensor]):
    """``name -> tensor`` loaded from ``checkpoint`` on access (see module docstring).

    Args:
        checkpoint: where the tensors live.
        names: the keys, in iteration order.
        device: where loaded tensors are put.
        upcast: names whose tensors are returned as float32 copies.
        cache: how many recently loaded tensors are kept.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        names: Sequence[str],
        device: str | torch.device = "cpu",
        upcast: frozenset[str] = frozenset(),
        cache: int = 1,
    ) -> None:
        self.checkpoint = checkpoint
        self.names = list(names)
        self._keys = set(self.names)
        self.device = torch.device(device)
        self.upcast = upcast
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._size = cache
        self.loads = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._keys:
            raise KeyError(name)
        t = self._cache.get(name)
        if t is not None:
            self._cache.move_to_end(name)
            return t
        t = self.checkpoint.load(name, self.device)
        if name in self.upcast:
            t = t.float()
        self.loads += 1
        self._cache[name] = t
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def clear_cache(self) -> None:
        self._cache.clear()


def _listing(names: Sequence[str], k: int = 3) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def _dtype(d: torch.dtype | None, fallback: str) -> str:
    return str(d).removeprefix("torch.") if d is not None else fallback


@dataclass
class CheckpointPair:
    """BASE and TUNED as lazy snapshots over the tensors that can be compared."""

    base: Checkpoint
    tuned: Checkpoint
    old: ParameterSnapshot
    new: ParameterSnapshot
    names: list[str]
    skipped: list[str] = field(default_factory=list)
    upcast: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def bytes_of(self, name: str) -> int:
        """Bytes read for one compared tensor (both sides)."""
        return self.base.specs[name].nbytes + self.tuned.specs[name].nbytes

    def dtypes(self) -> dict[str, int]:
        """``"bfloat16"`` (or ``"bfloat16 -> float32"`` across sides) -> number of tensors."""
        out: dict[str, int] = {}
        for n in self.names:
            a, b = self.base.specs[n].dtype_name, self.tuned.specs[n].dtype_name
            key = a if a == b else f"{a} -> {b}"
            out[key] = out.get(key, 0) + 1
        return out


def lazy_snapshot(
    checkpoint: Checkpoint,
    names: Sequence[str],
    device: str | torch.device = "cpu",
    upcast: frozenset[str] = frozenset(),
) -> ParameterSnapshot:
    """A snapshot whose tensors are read from ``checkpoint`` when accessed, never all at once."""
    snap = ParameterSnapshot(None, device=device)
    snap.data = LazyTensors(checkpoint, names, device, upcast)  # type: ignore[assignment]
    for n in names:
        spec = checkpoint.specs[n]
        snap.param_dtypes[n] = torch.float32 if n in upcast else spec.dtype  # type: ignore[assignment]
        snap.shards[n] = ShardInfo(spec.shape, 0, False, True)
    try:
        snap.timestamp = max(os.path.getmtime(f) for f in checkpoint.files)
    except OSError:
        snap.timestamp = 0.0
    return snap


def pair_checkpoints(
    base: Checkpoint, tuned: Checkpoint, device: str | torch.device = "cpu"
) -> CheckpointPair:
    """Validate that ``base`` and ``tuned`` match and build the two lazy snapshots."""
    only_base = [n for n in base.specs if n not in tuned.specs]
    only_tuned = [n for n in tuned.specs if n not in base.specs]
    if only_base or only_tuned:
        raise CheckpointError(
            f"parameter names differ: {len(only_base)} only in BASE ({_listing(only_base)}); "
            f"{len(only_tuned)} only in TUNED ({_listing(only_tuned)})"
        )
    shapes = [
        f"{n} {list(base.specs[n].shape)} vs {list(s.shape)}"
        for n, s in tuned.specs.items()
        if s.shape != base.specs[n].shape
    ]
    if shapes:
        raise CheckpointError(f"shapes differ for {len(shapes)} tensors: {_listing(shapes)}")
    names, skipped, upcast = [], [], []
    for n, t in tuned.specs.items():
        b = base.specs[n]
        if not (t.is_floating and b.is_floating):
            skipped.append(f"{n} ({_dtype(b.dtype, b.dtype_name)})")
            continue
        names.append(n)
        if t.dtype != b.dtype:
            upcast.append(n)
    if not names:
        raise CheckpointError("the checkpoints hold no floating-point tensors to compare")
    notes = [*base.notes, *tuned.notes]
    if skipped:
        notes.append(f"skipped {len(skipped)} non-floating tensors: {_listing(skipped)}")
    if upcast:
        first = upcast[0]
        notes.append(
            f"{len(upcast)} tensors are stored in different dtypes (e.g. {first}: "
            f"{_dtype(base.specs[first].dtype, '?')} in BASE, "
            f"{_dtype(tuned.specs[first].dtype, '?')} in TUNED); they are compared in float32"
        )
    up = frozenset(upcast)
    return CheckpointPair(
        base=base,
        tuned=tuned,
        old=lazy_snapshot(base, names, device, up),
        new=lazy_snapshot(tuned, names, device, up),
        names=names,
        skipped=skipped,
        upcast=upcast,
        notes=notes,
    )


def open_pair(base: str, tuned: str, device: str | torch.device = "cpu") -> CheckpointPair:
    """:func:`open_checkpoint` both paths and :func:`pair_checkpoints` them."""
    return pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned), device)
