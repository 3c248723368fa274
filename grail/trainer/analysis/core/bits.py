"""Sets of entries stored as bits: one bit per entry, eight entries to a byte.

The layout is the one of ``numpy.packbits(..., bitorder="little")``: entry ``i`` of a flat tensor
is bit ``i % 8`` of byte ``i // 8``; the last byte is padded with zeros. It is the on-disk layout
of the mask files of :mod:`.mask_file` and works on any device (plain integer tensor ops).

* :func:`pack_bits` packs a flat boolean (or 0/1) tensor.
* :func:`unpack_bits` unpacks any range ``[start, start + n)`` of a packed set, reading only the
  bytes that cover it, so a piece of a sharded parameter is compared without unpacking the whole
  tensor.
* :func:`popcount` counts the set bits.

Example:
    >>> import torch
    >>> flags = torch.tensor([True, False, True, True, False, False, False, False, True])
    >>> packed = pack_bits(flags)
    >>> packed.tolist()  # bits 0, 2, 3 of byte 0; bit 0 of byte 1
    [13, 1]
    >>> unpack_bits(packed, 4, start=2).tolist()
    [True, True, False, False]
    >>> popcount(packed)
    4
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "packed_size", "popcount", "unpack_bits"]

_SHIFTS: dict[torch.device, torch.Tensor] = {}
_POPCOUNT: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


def packed_size(numel: int) -> int:
    """Bytes that hold ``numel`` bits: ``ceil(numel / 8)``."""
    return -(-numel // 8)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """``ceil(n / 8)`` uint8 bytes holding the flat 0/1 tensor ``flags`` (module docstring)."""
    flat = flags.reshape(-1)
    n = flat.numel()
    padded = torch.zeros(packed_size(n) * 8, dtype=torch.uint8, device=flat.device)
    padded[:n] = flat
    # distinct bits: their sum is their OR and stays below 256
    return (padded.view(-1, 8) << _shifts(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Boolean flags of the entries ``start .. start + n - 1`` of a packed set."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.bool, device=packed.device)
    lo, hi = start // 8, packed_size(start + n)
    if start < 0 or hi > packed.numel():
        raise IndexError(f"entries {start}..{start + n - 1} are outside a packed set of "
                         f"{packed.numel()} bytes")
    part = packed[lo:hi]
    bits = (part.unsqueeze(1) >> _shifts(packed.device)) & 1
    offset = start - 8 * lo
    return bits.reshape(-1)[offset : offset + n].bool()


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits of a uint8 tensor."""
    table = _POPCOUNT.get(packed.device)
    if table is None:
        table = torch.tensor([bin(i).count("1") for i in range(256)], device=packed.device)
        _POPCOUNT[packed.device] = table
    return int(table[packed.reshape(-1).long()].sum())
