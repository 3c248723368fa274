"""Process-group helpers: the only module that issues collectives.

Without an initialised ``torch.distributed`` process group every helper is a no-op (rank 0 of a
world of 1), so single-process code and N-process code run the same path.

Parameters come in three kinds:

* plain tensors, identical on every rank (a single process, DDP, or FSDP2 root parameters that
  are unsharded after a no-grad forward): their statistics are counted once, on rank 0 only,
  then reduced - never ``world_size`` times;
* ``DTensor`` parameters sharded on dim 0 (FSDP2): each rank holds and analyses its local shard;
  the shard's place in the global tensor is described by :class:`ShardInfo`;
* ``DTensor`` parameters that are replicated: treated like plain tensors.

Example:
    >>> import torch
    >>> get_rank(), get_world_size()
    (0, 1)
    >>> all_reduce_(torch.tensor([1.0, 2.0]), "sum")
    tensor([1., 2.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

__all__ = [
    "ShardInfo",
    "all_reduce_",
    "broadcast_",
    "fsdp_units",
    "gather_",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "local_tensor",
    "reshard",
    "shard_info",
    "unsupported_engine",
    "unwrap_model",
]


def is_distributed() -> bool:
    """True when a process group is initialised and has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_DTENSOR: list[type | tuple[()]] = []  # the DTensor class once looked up (() without it)


def _is_dtensor(t: torch.Tensor) -> bool:
    if not _DTENSOR:  # looked up once: this runs several times per parameter and measurement
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch built without distributed
            _DTENSOR.append(())
        else:
            _DTENSOR.append(DTensor)
    return isinstance(t, _DTENSOR[0])


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank's local tensor sits in the global (unsharded) parameter.

    ``offset`` is the flat element offset of the local tensor in the flattened global tensor
    (shards are row blocks of dim 0, hence contiguous in the flat order); ``owner`` is False for a
    replicated copy that another rank (rank 0) counts.
    """

    global_shape: tuple[int, ...]
    offset: int
    sharded: bool
    owner: bool

    @property
    def global_numel(self) -> int:
        n = 1
        for s in self.global_shape:
            n *= s
        return n


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank actually holds (``to_local()`` of a DTensor), detached, no copy.

    ``.data`` is used for plain tensors so that in-place writes by the analysis do not bump the
    parameter's autograd version counter.
    """
    if _is_dtensor(p):
        return p.data.to_local() if isinstance(p, torch.nn.Parameter) else p.to_local()
    return p.data if isinstance(p, torch.nn.Parameter) else p.detach()


def shard_info(p: torch.Tensor) -> ShardInfo:
    """Describe the local part of ``p`` (see :class:`ShardInfo`)."""
    if not _is_dtensor(p):
        return ShardInfo(tuple(p.shape), 0, False, get_rank() == 0 or not is_distributed())
    from torch.distributed.tensor import Replicate, Shard

    placements = p.placements
    global_shape = tuple(p.shape)
    if all(isinstance(pl, Replicate) for pl in placements):
        return ShardInfo(global_shape, 0, False, get_rank() == 0)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise NotImplementedError(
            f"DTensor placements {placements} are not supported; only Shard(0) (FSDP2) and "
            "Replicate are"
        )
    mesh = p.device_mesh
    coord = mesh.get_coordinate()
    local = p.to_local()
    rows = global_shape[0] if global_shape else 1
    world = mesh.size()
    # torch.chunk semantics: every rank but the tail ones holds ceil(rows / world) rows.
    per_rank = -(-rows // world)
    row_start = min((coord[0] if coord else 0) * per_rank, rows)
    row_numel = local[0].numel() if local.dim() > 0 and local.shape[0] > 0 else 0
    if row_numel == 0 and len(global_shape) > 1:
        row_numel = 1
        for s in global_shape[1:]:
            row_numel *= s
    return ShardInfo(global_shape, row_start * max(row_numel, 1), True, True)


def unsupported_engine(model: torch.nn.Module) -> str | None:
    """Name of a sharding engine whose parameters cannot be analysed correctly, else None.

    DeepSpeed ZeRO-3 replaces each parameter's data with an empty placeholder outside its own
    forward; reading it would report an empty model as unchanged.
    """
    for p in model.parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            return "DeepSpeed ZeRO-3"
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


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run analysis forwards through: DDP's wrapped module, else the model.

    Going through DDP's own forward would arm its gradient-synchronisation hooks.
    """
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _on_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the device the group's backend expects (CUDA for nccl, CPU for gloo):
    the tensor itself when it already is there, else a copy."""
    backend = dist.get_backend()
    if backend == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    if backend == "gloo" and tensor.device.type != "cpu":
        return tensor.cpu()
    return tensor


def all_reduce_(tensor: torch.Tensor, op: Literal["sum", "max", "min"]) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over the default group; identity in one process.

    Tensors are reduced on the device the group's backend expects (CPU for gloo, CUDA for nccl)
    and copied back, so callers may keep accumulators wherever is convenient.
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if not is_distributed():
        return tensor
    work = _on_backend_device(tensor)
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]))
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """In-place broadcast from rank ``src``; identity in one process."""
    if not is_distributed():
        return tensor
    work = _on_backend_device(tensor)
    dist.broadcast(work, src=src)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def gather_(tensor: torch.Tensor, dst: int) -> torch.Tensor | None:
    """Stack ``tensor`` from every rank, in rank order, on rank ``dst``; None on the others.

    Every rank passes a tensor of the same shape and dtype. The result has shape
    ``[world_size, *tensor.shape]`` on ``tensor``'s device; in one process it is
    ``tensor.unsqueeze(0)`` (no copy).
    """
    if not is_distributed():
        return tensor.unsqueeze(0)
    work = _on_backend_device(tensor).contiguous()
    out = None
    if get_rank() == dst:
        out = torch.empty((get_world_size(), *work.shape), dtype=work.dtype, device=work.device)
    dist.gather(work, gather_list=list(out.unbind(0)) if out is not None else None, dst=dst)
    return out.to(tensor.device) if out is not None else None
