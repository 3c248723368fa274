"""Reused scratch buffers: the one cache of temporary tensors that chunked loops write into.

A chunked loop (statistics, deltas, swaps, spectra) needs a few temporaries of one chunk's size
on the device of the data. :class:`ScratchBuffers` keeps one flat buffer per ``(device, dtype,
slot)``: :meth:`ScratchBuffers.get` returns a view of the first ``n`` elements, reallocating
the buffer when a larger ``n`` is asked. ``min_numel`` (a number, or a function of the device
such as :func:`~.stats.chunk_numel`) is the smallest size allocated, so that a small request
followed by chunk-sized ones allocates once.

Memory: each buffer holds the largest ``n`` asked for its key (at least ``min_numel``), never
more; a buffer that grows is dropped from the cache (views already handed out keep their old
storage alive until they go). :meth:`ScratchBuffers.clear` drops every buffer: computers call it
at the end of a measurement, so that between measurements the analysis holds nothing but its
snapshots (device memory belongs to training).

Decisions: ``min_numel`` counts elements of whatever dtype is asked (a byte buffer gets at
least that many bytes, not that many float32s' worth); two calls with the same key return views
of the same storage, so buffers in use at the same time need distinct slots.

Example:
    >>> import torch
    >>> scratch = ScratchBuffers(min_numel=8)
    >>> a = scratch.get("cpu", 3)
    >>> b = scratch.get("cpu", 5, torch.int32, slot="mask")
    >>> a.shape, b.dtype, scratch.nbytes()
    (torch.Size([3]), torch.int32, 64)
    >>> a.data_ptr() == scratch.get("cpu", 8).data_ptr()  # same buffer, no reallocation
    True
    >>> scratch.clear(); scratch.nbytes()
    0
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

__all__ = ["ScratchBuffers"]


class ScratchBuffers:
    """Flat buffers keyed by ``(device, dtype, slot)``, each grown to the largest size asked.

    Args:
        min_numel: smallest number of elements allocated, or a function of the device giving it.
    """

    def __init__(self, min_numel: int | Callable[[torch.device], int] = 0) -> None:
        self._min = min_numel
        self._buffers: dict[tuple[torch.device, torch.dtype, Hashable], torch.Tensor] = {}

    def get(
        self,
        device: torch.device | str,
        n: int,
        dtype: torch.dtype = torch.float32,
        slot: Hashable = 0,
    ) -> torch.Tensor:
        """A 1-D ``dtype`` buffer of ``n`` elements on ``device`` (uninitialised, reused: its
        contents are whatever the last user of this key left)."""
        if not isinstance(device, torch.device):
            device = torch.device(device)
        key = (device, dtype, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            floor = self._min(device) if callable(self._min) else self._min
            buf = None
            self._buffers.pop(key, None)  # the old buffer can be freed before the new one exists
            buf = torch.empty(max(n, floor), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:n]

    def clear(self) -> None:
        """Drop every buffer (views already handed out stay valid)."""
        self._buffers.clear()

    def nbytes(self) -> int:
        """Bytes held by the cached buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def __len__(self) -> int:
        return len(self._buffers)
