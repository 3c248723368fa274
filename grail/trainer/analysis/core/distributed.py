"""Process-group helpers: the only module that issues collectives.

Without an initialised ``torch.distributed`` process group every helper is a no-op (rank 0 of a
world of 1), so single-process code and N-process code run the same path.

Parameters come in four kinds:

* plain tensors, identical on every rank (a single process, DDP, or FSDP2 root parameters that
  are unsharded after a no-grad forward): their statistics are counted once, on rank 0 only,
  then reduced - never ``world_size`` times;
* ``DTensor`` parameters sharded on dim 0 (FSDP2): each rank holds and analyses its local shard;
  the shard's place in the global tensor is described by :class:`ShardInfo`;
* ``DTensor`` parameters that are replicated: treated like plain tensors;
* DeepSpeed ZeRO-3 parameters (placeholders whose data is this rank's flat partition
  ``ds_tensor``, see :mod:`.zero`): each rank analyses the valid part of its partition, a
  contiguous flat piece at ``offset = rank * partition size``. ZeRO-1/2 parameters are whole on
  every rank (replicated); only their gradients and optimizer state are partitioned
  (:func:`local_grad`, :func:`.zero.state_pieces`).

Every local piece is contiguous in the flat order of the global tensor and rank ``j``'s piece
starts at ``j * block`` (:attr:`ShardInfo.block`), so one gather of equally padded pieces
rebuilds a tensor in either layout.

DeepSpeed ZeRO-3 keeps whole copies of some parameters between forwards (persistent small
parameters, prefetched ones): :func:`.zero.release` drops them (locally), so that the next
forward gathers patched partitions while they are patched and training never sees a patch that
was undone.

Agreement. A rank must never take a branch that issues a collective on its own: every per-rank
decision that leads to one (measure or not, run a computer or not, re-baseline or not, how long
a reduced tensor is) is put to a vote first. :func:`agree` packs any number of such integers into
one all-reduce and returns each one's maximum and minimum over ranks ("any" and "all" of a flag,
"the same everywhere" when both are equal); :func:`stable_hash` turns sets of names and configs
into integers that can be compared this way. :func:`bit_checksums` lets replicas compare their
parameters bit for bit (NaN payloads included) at the price of one integer per tensor.

Example:
    >>> import torch
    >>> get_rank(), get_world_size()
    (0, 1)
    >>> all_reduce_(torch.tensor([1.0, 2.0]), "sum")
    tensor([1., 2.])
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist

from . import zero
from .engines import fsdp_units, reshard, unsupported_engine, unwrap_model

__all__ = [
    "NO_VOTE",
    "LocalGrad",
    "ShardInfo",
    "agree",
    "all_gather_objects",
    "all_reduce_",
    "bit_checksums",
    "broadcast_",
    "from_rank0",
    "fsdp_units",  # from .engines
    "gather_",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "local_grad",
    "local_tensor",
    "reshard",  # from .engines
    "shard_info",
    "stable_hash",
    "unsupported_engine",  # from .engines
    "unwrap_model",  # from .engines
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
    (FSDP2 shards are row blocks of dim 0, ZeRO-3 partitions flat pieces: both contiguous in the
    flat order); ``owner`` is False for a replicated copy that another rank (rank 0) counts.
    ``block`` is, for a sharded tensor, the number of entries every rank's piece spans in the
    padded layout (rank ``j``'s piece starts at ``j * block``; the last pieces may be shorter or
    empty); 0 when unknown or not sharded.
    """

    global_shape: tuple[int, ...]
    offset: int
    sharded: bool
    owner: bool
    block: int = 0

    @property
    def global_numel(self) -> int:
        n = 1
        for s in self.global_shape:
            n *= s
        return n

    def to_state(self) -> list[Any]:
        """Plain values for a checkpoint (``torch.load(weights_only=True)`` reads them back)."""
        return [list(self.global_shape), self.offset, self.sharded, self.owner, self.block]

    @classmethod
    def from_state(cls, state: Sequence[Any]) -> ShardInfo:
        """The :class:`ShardInfo` saved by :meth:`to_state`."""
        shape, offset, sharded, owner, block = state
        return cls(tuple(int(s) for s in shape), int(offset), bool(sharded), bool(owner),
                   int(block))

    @classmethod
    def replicated(cls, shape: tuple[int, ...]) -> ShardInfo:
        """A whole tensor held by every rank, counted on rank 0 (one process: counted)."""
        return cls(shape, 0, False, get_rank() == 0 or not is_distributed())


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank actually holds (``to_local()`` of a DTensor), detached, no copy.

    ``.data`` is used for plain tensors so that in-place writes by the analysis do not bump the
    parameter's autograd version counter.
    """
    if _is_dtensor(p):
        return p.data.to_local() if isinstance(p, torch.nn.Parameter) else p.to_local()
    if zero.is_partitioned(p):
        return zero.partition(p)
    return p.data if isinstance(p, torch.nn.Parameter) else p.detach()


def shard_info(p: torch.Tensor) -> ShardInfo:
    """Describe the local part of ``p`` (see :class:`ShardInfo`)."""
    if zero.is_partitioned(p):
        return zero.partition_info(p)
    if not _is_dtensor(p):
        return ShardInfo.replicated(tuple(p.shape))
    from torch.distributed.tensor import Replicate, Shard

    placements = p.placements
    global_shape = tuple(p.shape)
    if all(isinstance(pl, Replicate) for pl in placements):
        return ShardInfo.replicated(global_shape)
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
    row_numel = max(row_numel, 1)
    return ShardInfo(global_shape, row_start * row_numel, True, True, per_rank * row_numel)


class LocalGrad(NamedTuple):
    """This rank's piece of a parameter's gradient: ``grad`` (None when there is none), where
    it sits (``info``: offset, ``owner``) and how many entries the piece covers (``numel``,
    the entries counted as missing when ``grad`` is None)."""

    grad: torch.Tensor | None
    info: ShardInfo
    numel: int


def local_grad(p: torch.Tensor) -> LocalGrad:
    """This rank's gradient piece of parameter ``p`` (see :class:`LocalGrad`).

    ``p.grad``'s local tensor and :func:`shard_info` for plain, DDP and FSDP2 parameters; under
    DeepSpeed the flat partition (ZeRO-3) or fragment (ZeRO-1/2) of the reduced gradient the
    engine holds between ``backward()`` and ``step()``, with its own offset (see :mod:`.zero`).
    """
    piece = zero.gradient_piece(p)
    if piece is not None:
        return LocalGrad(*piece)
    grad = local_tensor(p.grad) if p.grad is not None else None
    return LocalGrad(grad, shard_info(p), local_tensor(p).numel())


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


# --- agreement ------------------------------------------------------------------------------
_MASK = (1 << 62) - 1  # votes stay inside +-2**62, so negating one never overflows int64
NO_VOTE = -(1 << 62)  # a rank that has no say in an entry (see from_rank0)


def agree(values: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(maximum, minimum)`` over ranks of every integer in ``values``, in one all-reduce.

    Every rank passes the same number of entries, each with ``|v| <= 2**62``. A flag agreed by
    "any rank" is its maximum, by "every rank" its minimum; a value is the same on every rank
    exactly when both are equal. Alone it returns ``(values, values)`` without building a tensor.

    >>> agree([1, 0, 7])
    ([1, 0, 7], [1, 0, 7])
    """
    vals = [int(v) for v in values]
    if not is_distributed():
        return vals, list(vals)
    packed = torch.tensor(vals + [-v for v in vals], dtype=torch.int64)
    out = all_reduce_(packed, "max").tolist()
    n = len(vals)
    return out[:n], [-v for v in out[n:]]


def from_rank0(value: int) -> int:
    """``value`` on rank 0, :data:`NO_VOTE` elsewhere: the maximum of :func:`agree` is then
    rank 0's value.

    >>> from_rank0(5)
    5
    """
    return int(value) if get_rank() == 0 else NO_VOTE


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def stable_hash(obj: Any) -> int:
    """A 62-bit hash of a JSON-able ``obj`` that is the same in every process (Python's own
    ``hash`` of a string is salted per process). Non-JSON values hash by ``repr``.

    >>> stable_hash(["a", (1, 2)]) == stable_hash(["a", [1, 2]])
    True
    """
    text = json.dumps(obj, sort_keys=True, default=repr, separators=(",", ":"))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHECKSUM_CHUNK = 1 << 22  # entries per partial sum: bounds the temporaries on any tensor size


def bit_checksums(tensors: Sequence[torch.Tensor]) -> list[int]:
    """One 62-bit checksum per tensor: the sum of its entries' bit patterns read as integers.

    Equal tensors give equal checksums; a NaN, a different payload or a sign of zero changes it,
    as does almost any other difference (a sum is blind only to entries trading places). Local:
    no collective; one device-to-host copy for all tensors.

    >>> a = torch.tensor([1.0, float("nan")])
    >>> bit_checksums([a]) == bit_checksums([a.clone()]), bit_checksums([a]) == bit_checksums([-a])
    (True, False)
    """
    sums = []
    for t in tensors:
        if t.is_complex():
            t = torch.view_as_real(t)
        flat = t.detach().reshape(-1)
        ints = flat.view(_INT_OF_SIZE[flat.element_size()])
        total = torch.zeros((), dtype=torch.int64, device=flat.device)
        for start in range(0, ints.numel(), _CHECKSUM_CHUNK):
            total += ints[start : start + _CHECKSUM_CHUNK].sum(dtype=torch.int64)
        sums.append(total)
    if not sums:
        return []
    if len({s.device for s in sums}) > 1:  # model parallel: one copy per tensor
        sums = [s.cpu() for s in sums]
    return [v & _MASK for v in torch.stack(sums).tolist()]
