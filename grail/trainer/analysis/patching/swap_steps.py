"""The steps a :class:`~.swaps.SelectPatch` is made of, one chunk or slice of a tensor at a time.

:class:`SwapSteps`, a base class of :class:`~.swaps.SelectPatch`, holds them: the flat views of
a parameter and its snapshot, the reused buffers, one chunk's mask (with the counts taken while
computing it), the XOR swap of the entries a mask selects, the compiled swap of a slice from one
mask to another, and the record of each step (``_Patched``) that switching and undoing read
back. How the steps make a patch (enter, switch, undo) is described in :mod:`.swaps`.

Example:
    >>> import torch
    >>> p, s = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    >>> m = torch.tensor([-1, 0], dtype=torch.int32)  # -1: swap the entry
    >>> SwapSteps._xor_swap(p, s, m, torch.empty(8, dtype=torch.uint8))
    >>> p.tolist(), s.tolist()
    ([3.0, 2.0], [1.0, 4.0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..core.scratch import ScratchBuffers
from ..core.snapshot import ParameterDelta, float32_delta_
from ..core.stats import chunk_numel
from ..ops.masks import DropSpec, Mask, unpack_mask

__all__ = ["SwapSteps"]


@dataclass
class _Patched:
    name: str
    start: int
    stop: int
    index: torch.Tensor | None = None  # fallback path: positions written ...
    saved: torch.Tensor | None = None  # ... and their original values
    packed: tuple[torch.Tensor, torch.Tensor] | None = None  # the swap mask, 1 bit an entry
    drop: Mask | None = None  # the mask in place (recomputed to undo where not packed)
    fused: bool = False  # the whole tensor, swapped by the compiled kernel (masks recomputed)


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class SwapSteps:
    """The per-chunk and per-slice steps of a select patch (see module docstring)."""

    delta: ParameterDelta
    count_dropped: bool
    count_changed: bool
    _scratch: ScratchBuffers
    _dropped: list[torch.Tensor]
    _changed: list[torch.Tensor]

    def _views(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.delta.new.data[name]
        s = self.delta.old.data[name]
        if not p.is_contiguous():
            raise RuntimeError(f"parameter {name} is not contiguous; cannot patch it in place")
        return p.view(-1), s.view(-1)

    def _buffers(self, device: torch.device, n: int) -> tuple[torch.Tensor, ...]:
        """float32 delta, two int32 masks and a raw byte buffer (8 bytes an entry: any
        parameter dtype) for ``n`` entries (reused)."""
        get = self._scratch.get
        return (
            get(device, n),
            get(device, n, torch.int32, slot="before"),
            get(device, n, torch.int32, slot="after"),
            get(device, 8 * n, torch.uint8),
        )

    def _mask(
        self,
        name: str,
        start: int,
        pc: torch.Tensor,
        sd: torch.Tensor,
        drop: Mask,
        out: torch.Tensor,
        count: bool = False,
    ) -> torch.Tensor:
        """int32 mask in ``out``, -1 where ``drop`` drops the entry (changed or not)."""
        d = self._buffers(pc.device, pc.numel())[0]
        info = self.delta.shard(name)
        counting = count and info.owner
        abs_bits = None
        if drop.uses_delta or (counting and self.count_changed):
            float32_delta_(d, pc, sd)
            abs_bits = d.abs_().view(torch.int32)
        m = drop(name, info.offset + start, abs_bits, out)
        # int32 sums: exact (a chunk has < 2^31 entries), and no int64 copy of the mask
        if counting and self.count_dropped:
            self._dropped.append(-m.sum(dtype=torch.int32))
        if counting and self.count_changed and abs_bits is not None:
            # changed iff |d| > 0 (NaN included): the sign bit of -bits
            changed = abs_bits.neg_().bitwise_right_shift_(31)
            self._changed.append(-changed.sum(dtype=torch.int32))
        return m

    def _fused_swap(
        self,
        name: str,
        start: int,
        stop: int,
        before: DropSpec | None,
        after: DropSpec | None,
        count: bool,
    ) -> bool:
        """Entries ``start:stop`` of a tensor from mask ``before`` to ``after`` in one compiled
        pass (:func:`~grail.trainer.analysis.kernels.select_swap`); ``False``: nothing was
        done."""
        if before is None or after is None:
            return False
        p, s = self._views(name)
        info = self.delta.shard(name)
        count = count and info.owner
        changed = count and self.count_changed
        counts = kernels.select_swap(
            p[start:stop], s[start:stop], before, after, name, info.offset + start, changed
        )
        if counts is None:
            return False
        if count and self.count_dropped:
            self._dropped.append(counts[0])
        if changed:
            self._changed.append(counts[1])
        return True

    def _chunk_records(self, rec: _Patched) -> list[_Patched]:
        """A fused record as the eager path's chunk records in the same state (masks
        recomputed), for when the kernel cannot take it further."""
        step = chunk_numel(self.delta.new.data[rec.name].device)
        return [
            _Patched(rec.name, start, min(start + step, rec.stop), drop=rec.drop)
            for start in range(rec.start, rec.stop, step)
        ]

    def _current_mask(
        self, rec: _Patched, pc: torch.Tensor, sd: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """The mask a swapped chunk is in: unpacked, or recomputed (``|delta|`` is unchanged)."""
        if rec.packed is not None:
            return unpack_mask(rec.packed, out)
        assert rec.drop is not None
        return self._mask(rec.name, rec.start, pc, sd, rec.drop, out)

    @staticmethod
    def _xor_swap(pc: torch.Tensor, sd: torch.Tensor, m: torch.Tensor, raw: torch.Tensor) -> None:
        itype = _INT_VIEW[pc.element_size()]
        pi, si = pc.view(itype), sd.view(itype)
        x = raw[: pc.numel() * pc.element_size()].view(itype)
        torch.bitwise_xor(pi, si, out=x)
        x.bitwise_and_(m if itype == torch.int32 else m.to(itype))
        pi.bitwise_xor_(x)
        si.bitwise_xor_(x)

    def _spec(self, name: str, start: int, stop: int, drop: Mask | None) -> DropSpec | None:
        """The spec of ``drop`` on local entries ``start:stop`` of ``name`` (``None``: none, or
        no mask)."""
        if drop is None:
            return None
        return drop.spec_for(name, self.delta.shard(name).offset + start, stop - start)

    def _rec_spec(self, rec: _Patched, drop: Mask | None = None) -> DropSpec | None:
        """The spec over a record's entries of ``drop`` (default: the mask it is in)."""
        return self._spec(rec.name, rec.start, rec.stop, drop if drop is not None else rec.drop)
