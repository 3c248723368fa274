"""The wrappers and sharding engines around a model: the module to run, and what cannot be read.

* :func:`unwrap_model` - the module a DDP wrapper, a DeepSpeed engine or ``torch.compile``
  wraps, which the analysis names parameters by and runs its own forwards through;
* :func:`fsdp_units` and :func:`reshard` - the FSDP2 modules of a model, and putting them back
  in their sharded state;
* :func:`unsupported_engine` - a sharding setup whose parameters cannot be analysed.

The frameworks' classes are looked up when a function is called (DeepSpeed's through
:mod:`.zero`); no collective is issued here (:mod:`.distributed` issues them).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> unwrap_model(model) is model, fsdp_units(model), unsupported_engine(model)
    (True, {}, None)
"""

from __future__ import annotations

import torch

from . import zero

__all__ = ["fsdp_units", "reshard", "unsupported_engine", "unwrap_model"]


def unsupported_engine(model: torch.nn.Module) -> str | None:
    """Name of a sharding setup whose parameters cannot be analysed correctly, else None.

    DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 are supported; ZeRO-3 with parameters offloaded to NVMe
    or with ZeRO++ hierarchical partitioning is not (see :func:`.zero.unsupported`).
    """
    for p in unwrap_model(model).parameters():
        if zero.is_partitioned(p):
            return zero.unsupported(p)
        break
    return None


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return FSDPModule


def reshard(model: torch.nn.Module) -> None:
    """Return every FSDP2 module to its sharded state (no-op for other models).

    After a forward without backward, FSDP2 leaves the root module's parameters unsharded; the
    analysis reshards at the start of a measurement (so snapshots and deltas always see the
    same local shards) and after each of its own forwards (so a forward with patched shards
    leaves no patched unsharded copy behind).
    """
    fsdp = _fsdp_module_type()
    if fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp):
            module.reshard()


def fsdp_units(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``qualified name -> module`` of every FSDP2 module (each manages its own parameters)."""
    fsdp = _fsdp_module_type()
    if fsdp is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, fsdp)}


def _is_compiled(model: torch.nn.Module) -> bool:
    """True for the wrapper ``torch.compile(module)`` returns (``OptimizedModule``)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), torch.nn.Module
    )


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run analysis forwards through: the module a DDP wrapper, a DeepSpeed
    engine or ``torch.compile`` wraps (repeatedly), else the model.

    Going through DDP's own forward would arm its gradient-synchronisation hooks, through the
    engine's its micro-step bookkeeping; DeepSpeed's ZeRO-3 hooks sit on the wrapped module.
    A compiled wrapper names every parameter ``_orig_mod.<name>``, which matches no checkpoint
    or uncompiled run, and an analysis forward through it (eval mode, no grad) would compile a
    second graph: the module it wraps runs them eagerly, with the same parameters.
    """
    from torch.nn.parallel import DistributedDataParallel

    while (
        isinstance(model, DistributedDataParallel) or zero.is_engine(model) or _is_compiled(model)
    ):
        model = model._orig_mod if _is_compiled(model) else model.module
    return model
