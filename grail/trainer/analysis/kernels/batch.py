"""What the compiled batches share: pooling small tensors, all-or-nothing slices, flushing, and
the masked rerun of the rare rows with non-finite values."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .policy import Kernel, settings, slices

__all__ = ["Batch", "Groups"]

Groups = tuple[int, ...]


class _Pool:
    """Small tensors waiting to be concatenated into one kernel call, per key."""

    def __init__(self) -> None:
        self.parts: dict[tuple[Any, ...], list[tuple[torch.Tensor, ...]]] = {}
        self.numel: dict[tuple[Any, ...], int] = {}

    def put(self, key: tuple[Any, ...], tensors: tuple[torch.Tensor, ...]) -> bool:
        """Queue ``tensors``; ``True`` when the key's queue is full and should be flushed."""
        self.parts.setdefault(key, []).append(tensors)
        self.numel[key] = self.numel.get(key, 0) + tensors[0].numel()
        return self.numel[key] >= settings.pool_flush

    def take(self, key: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        """The queued tensors of ``key`` concatenated (one copy of small tensors)."""
        parts = self.parts.pop(key)
        del self.numel[key]
        return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))


class Batch:
    """What the batches share: one row per kernel call, kept with the call's arguments for the
    rare masked rerun; small tensors queued per pool key and computed in one call, large ones
    in equal slices (all or nothing). Pool keys are ``(groups, meta, ...)`` (``meta``: what a
    row carries besides its groups); a subclass names its kernels (looked up when called: module
    globals), derives the constants of a call from its pool key, and lays out its rows."""

    def __init__(self, min_numel: int | None) -> None:
        self._min = settings.min_numel if min_numel is None else min_numel
        self._raw: list[torch.Tensor] = []
        self._inputs: list[tuple[torch.Tensor, ...]] = []  # each row's kernel arguments
        self._groups: list[Groups] = []
        self._meta: list[Any] = []
        self._pool = _Pool()

    def _fast(self) -> tuple[Kernel, Callable[..., torch.Tensor]]:
        """The kernel that assumes finite values, and its plain function."""
        raise NotImplementedError

    def _masked(self) -> tuple[Kernel, Callable[..., torch.Tensor]]:
        """The kernel that masks non-finite values, and its plain function."""
        raise NotImplementedError

    def _consts(self, pool_key: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        """The packed constants of the calls for ``pool_key``."""
        raise NotImplementedError

    def _push(
        self, raw: torch.Tensor, args: tuple[torch.Tensor, ...], key: Groups, meta: Any
    ) -> None:
        self._raw.append(raw)
        self._inputs.append(args)
        self._groups.append(key)
        self._meta.append(meta)

    def _take(self, data: tuple[torch.Tensor, ...], pool_key: tuple[Any, ...]) -> bool:
        """Pool ``data`` (small) or compute it now (large); ``False``: the caller goes eager."""
        kernel, consts = self._fast()[0], self._consts(pool_key)
        n = data[0].numel()
        if n < settings.pool_numel:
            if not kernel.ready(*data, *consts):
                return False
            if self._pool.put(pool_key, data):
                self._flush(pool_key)
            return True
        outs = []
        for sl in slices(n):
            args = (*(a[sl] for a in data), *consts)
            out = kernel(*args)
            if out is None:
                return False
            outs.append((out, args))
        for out, args in outs:  # only once every slice succeeded
            self._push(out, args, pool_key[0], pool_key[1])
        return True

    def _flush(self, pool_key: tuple[Any, ...]) -> None:
        kernel, fn = self._fast()
        args = (*self._pool.take(pool_key), *self._consts(pool_key))
        out = kernel(*args)
        if out is None:  # the compiler failed after accepting: the same code, eager
            out = fn(*args)
        self._push(out, args, pool_key[0], pool_key[1])

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every pool flushed: the rows stacked and each row's entry count, or ``None``."""
        for pool_key in list(self._pool.parts):
            self._flush(pool_key)
        if not self._raw:
            return None
        counts = torch.tensor([a[0].numel() for a in self._inputs], dtype=torch.float64)
        return torch.stack(self._raw), counts

    def _reruns(self, raw: torch.Tensor, checked: list[int]) -> list[tuple[int, torch.Tensor]]:
        """``(row, masked row)`` for the rows with a non-finite value in a ``checked`` column
        (the float64 sums, finite exactly when every input value is)."""
        kernel, fn = self._masked()
        out = []
        for i in (~torch.isfinite(raw[:, checked]).all(1)).nonzero().flatten().tolist():
            masked = kernel(*self._inputs[i])
            out.append((i, fn(*self._inputs[i]) if masked is None else masked))
        return out

