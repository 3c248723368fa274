"""Whole parameters exchanged with their snapshot for a forward pass, and exchanged back.

:class:`TensorExchange` is the whole-tensor counterpart of
:class:`~grail.trainer.analysis.patching.swaps.SelectPatch`: no mask, no per-entry work. Within
the context, :meth:`TensorExchange.toggle` moves a set of parameters between ``W_new`` (the live
values) and ``W_old`` (the snapshot's); a parameter toggled an odd number of times reads
``W_old``. On exit - also when a forward pass raised - every parameter reads ``W_new`` again and
the snapshot holds ``W_old``, bit for bit.

Each tensor is moved one of two ways:

* **Rebind** (plain parameters whose snapshot tensor has the same device, dtype, shape and
  strides, e.g. a CPU model with its CPU snapshot): the parameter is pointed at the snapshot's
  storage (``param.data = snapshot``) and back at its own afterwards. Nothing is copied or
  written; a toggle costs O(1) per tensor. The live view ``delta.new`` keeps reading ``W_new``
  meanwhile.
* **Value exchange** (everything else: FSDP2 shards, a CPU snapshot of a GPU model, or
  ``rebind=False``): the values are exchanged chunk by chunk through one reused chunk-sized
  buffer (``tmp <- p; p <- s; s <- tmp``), an involution. When the snapshot's dtype differs from
  the parameter's (a lossy ``snapshot_dtype``, or an offline base stored in a wider dtype), the
  parameter's values are saved while it is toggled - one copy of that tensor, as
  :class:`~grail.trainer.analysis.patching.swaps.SelectPatch` saves dropped values - and the
  snapshot's are written, rounded to the parameter's dtype; the snapshot is left alone.

Decisions: rebinding assumes that the forward pass reads each parameter through its
``nn.Parameter`` (true of every ``torch.nn`` layer and of transformers models); a model that
keeps a private alias of a weight's storage can pass ``rebind=False``. A parameter that is not
contiguous cannot be exchanged by value and raises ``RuntimeError``, as in ``SelectPatch``.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> old = ParameterSnapshot(model)
    >>> w_old = model[1].weight.detach().clone()
    >>> with torch.no_grad():
    ...     _ = model[1].weight.add_(1.0)
    >>> w_new = model[1].weight.detach().clone()
    >>> delta = old.compute_delta(ParameterSnapshot.live(model))
    >>> with TensorExchange(model, delta) as exchange:
    ...     exchange.toggle(["1.weight"])
    ...     torch.equal(model[1].weight, w_old)
    True
    >>> torch.equal(model[1].weight, w_new), torch.equal(old.data["1.weight"], w_old)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core.engines import unwrap_model
from ..core.snapshot import ParameterDelta
from ..core.stats import chunk_numel

__all__ = ["TensorExchange"]


class TensorExchange:
    """Toggle whole parameters between ``W_new`` and ``W_old`` (see module docstring).

    Args:
        model: the live model whose parameters ``delta.new`` views.
        delta: ``W_new - W_old``; ``delta.old`` is the snapshot values are exchanged with.
        rebind: point plain parameters at the snapshot's storage where possible (O(1)) instead
            of exchanging values.
    """

    def __init__(self, model: nn.Module, delta: ParameterDelta, *, rebind: bool = True) -> None:
        self.delta = delta
        self.rebind = rebind
        self._params = dict(unwrap_model(model).named_parameters())
        self._toggled: set[str] = set()
        self._saved: dict[str, torch.Tensor] = {}  # dtype mismatch: the live values, while old
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def toggled(self) -> frozenset[str]:
        """Names that currently read ``W_old``."""
        return frozenset(self._toggled)

    def __enter__(self) -> TensorExchange:
        self.delta.old.synchronize()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """Every parameter back to ``W_new`` (and the snapshot to ``W_old``)."""
        # sorted: the same order on every rank (value exchanges issue no collective, but the
        # order should not depend on set iteration)
        self.toggle(sorted(self._toggled))

    def toggle(self, names: Iterable[str]) -> None:
        """Move each of ``names`` to the other side: ``W_new -> W_old`` or back."""
        for name in names:
            self._move(name)
            self._toggled ^= {name}

    # --- one tensor ----------------------------------------------------------------------------
    def _move(self, name: str) -> None:
        new = self.delta.new.data[name]
        old = self.delta.old.data[name]
        param = self._params.get(name)
        if self.rebind and param is not None and _can_rebind(param, new, old):
            # toggled: the parameter reads the snapshot's storage; back: its own (the live view)
            param.data = new if name in self._toggled else old
        elif new.dtype != old.dtype:
            saved = self._saved.pop(name, None)
            if saved is None:
                self._saved[name] = new.clone()
                new.copy_(old)
            else:
                new.copy_(saved)
        else:
            self._exchange_values(name, new, old)

    def _buffer(self, device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
        key = (device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, chunk_numel(device)), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:n]

    def _exchange_values(self, name: str, new: torch.Tensor, old: torch.Tensor) -> None:
        if not (new.is_contiguous() and old.is_contiguous()):
            raise RuntimeError(f"parameter {name} is not contiguous; cannot exchange it in place")
        p, s = new.view(-1), old.view(-1)
        step = chunk_numel(p.device)
        done = 0
        try:
            for start in range(0, p.numel(), step):
                stop = min(start + step, p.numel())
                tmp = self._buffer(p.device, p.dtype, stop - start)
                _swap_chunk(p[start:stop], s[start:stop], tmp)
                done = stop
        except BaseException:
            # the chunks already exchanged go back: the tensor stays whole on its previous side
            for start in range(0, done, step):
                stop = min(start + step, done)
                tmp = self._buffer(p.device, p.dtype, stop - start)
                _swap_chunk(p[start:stop], s[start:stop], tmp)
            raise


def _can_rebind(param: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> bool:
    """A plain tensor parameter that ``new`` views, with a snapshot tensor of the same layout."""
    data = param.data
    return (
        type(data) is torch.Tensor
        and data.data_ptr() in (new.data_ptr(), old.data_ptr())
        and old.device == data.device
        and old.dtype == data.dtype
        and old.shape == data.shape
        and old.stride() == data.stride()
    )


def _swap_chunk(p: torch.Tensor, s: torch.Tensor, tmp: torch.Tensor) -> None:
    """Exchange the values of ``p`` and ``s`` (same dtype and size) through ``tmp``."""
    tmp.copy_(p)
    p.copy_(s)  # across devices: a blocking copy, so ``s`` is read before it is overwritten
    s.copy_(tmp)
