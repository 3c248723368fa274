"""Arbitrary new values for a forward pass, written per module and restored bit for bit.

:class:`ModulePatch` serves the variants that cannot be reached by swapping entries with the
snapshot (DARE rescaling, low-rank truncations). Each parameter is written just before its
owning module runs and restored right after (forward pre-hook and an always-called forward
hook), so at most one module's parameters are saved at any time - O(largest module), not a clone
of the model. Parameters shared by several modules (tied embeddings) are patched for the whole
pass with a saved copy. So are DeepSpeed ZeRO-3 partitions: DeepSpeed gathers (prefetches)
parameters ahead of the module that uses them and keeps small ones gathered, so a per-module
hook would come too late; the saved copies are this rank's partitions, 1/world of the model.
An FSDP2-sharded parameter is hooked on the FSDP unit that manages it, ahead of the unit's own
all-gather, and patched in its local shard.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    >>> before = model[0].weight.detach().clone()
    >>> with torch.no_grad(), ModulePatch(model, {"0.weight": lambda w: 2 * w}):
    ...     out = model(torch.eye(2))
    >>> torch.equal(out, 2 * torch.eye(2) @ before.T), torch.equal(model[0].weight, before)
    (True, True)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core import zero
from ..core.distributed import local_tensor, shard_info
from ..core.engines import fsdp_units, unwrap_model
from ..core.snapshot import collect_parameters

__all__ = ["ModulePatch"]

logger = logging.getLogger(__name__)
_MISSED: set[str] = set()  # parameters already warned about (once per process)


def _local_attr(module: nn.Module, attr: str) -> torch.Tensor:
    return local_tensor(getattr(module, attr))


def _local_parameter(model: nn.Module, name: str) -> torch.Tensor:
    return local_tensor(model.get_parameter(name))


class ModulePatch:
    """Within the context, parameter ``name`` reads as ``values[name](local_tensor)`` while its
    owning module runs (see module docstring).

    Args:
        model: the module whose forward will run.
        values: ``name -> fn(current local tensor) -> new values`` (cast to the tensor's dtype).
    """

    def __init__(
        self, model: nn.Module, values: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    ) -> None:
        self.model = unwrap_model(model)
        self.values = values
        self._handles: list[Any] = []
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls: dict[str, int] = dict.fromkeys(values, 0)
        self._hooked: set[str] = set()

    def _targets(self) -> dict[str, tuple[nn.Module | None, Callable[[], torch.Tensor]]]:
        """``name -> (module to hook or None for the whole pass, current local tensor)``.

        Plain parameters are hooked on their owning module; one shared by several modules is
        patched for the whole pass. An FSDP2-sharded parameter is hooked on the FSDP unit that
        manages it, ahead of the unit's own all-gather, and patched in its local shard.
        """
        by_id: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in self.model.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    by_id.setdefault(id(p), []).append((module, attr))
        params = dict(collect_parameters(self.model))
        units = fsdp_units(self.model)
        out: dict[str, tuple[nn.Module | None, Callable[[], torch.Tensor]]] = {}
        for name in self.values:
            if name not in params:
                continue
            if zero.is_partitioned(params[name]):  # ZeRO-3: the whole pass (module docstring)
                out[name] = (None, functools.partial(_local_parameter, self.model, name))
                continue
            if shard_info(params[name]).sharded and units:
                unit = max(
                    (u for u in units if not u or name.startswith(u + ".")), key=len, default=None
                )
                if unit is not None:
                    get = functools.partial(_local_parameter, self.model, name)
                    out[name] = (units[unit], get)
                    continue
            owners = by_id.get(id(params[name]), [])
            module, attr = owners[0] if owners else (None, "")
            get = (
                functools.partial(_local_attr, module, attr)
                if module is not None
                else (functools.partial(_local_parameter, self.model, name))
            )
            out[name] = (module if len(owners) == 1 else None, get)
        return out

    def _write(self, name: str, t: torch.Tensor) -> None:
        if name in self._saved:
            return  # already patched (a shared parameter, or a re-entrant module)
        new = self.values[name](t)
        self._saved[name] = (t, t.clone())
        t.copy_(new.to(t.dtype))
        self.calls[name] += 1

    def _put_back(self, name: str) -> None:
        entry = self._saved.pop(name, None)
        if entry is not None:
            entry[0].copy_(entry[1])

    def __enter__(self) -> ModulePatch:
        try:
            for name, (module, get) in self._targets().items():
                if module is None:  # shared or unowned: patch for the whole pass
                    self._write(name, get())
                else:
                    self._hook(module, name, get)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _hook(self, module: nn.Module, name: str, get: Callable[[], torch.Tensor]) -> None:
        def pre(mod: nn.Module, args: Any) -> None:
            self._write(name, get())

        def post(mod: nn.Module, args: Any, output: Any) -> None:
            self._put_back(name)

        self._handles.append(module.register_forward_pre_hook(pre, prepend=True))
        self._handles.append(module.register_forward_hook(post, always_call=True))
        self._hooked.add(name)

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name in list(self._saved):
            self._put_back(name)
        missed = sorted(n for n, c in self.calls.items() if c == 0 and n in self._hooked)
        if exc[0] is None and missed and not _MISSED.issuperset(missed):
            _MISSED.update(missed)
            logger.warning(
                "per-module patches were never applied to %d parameters (%s%s): their owning "
                "modules did not run in this forward, so if a parent reads them directly "
                "(e.g. F.linear(x, child.weight)) the patched numbers do not reflect them",
                len(missed),
                ", ".join(missed[:3]),
                ", ..." if len(missed) > 3 else "",
            )
