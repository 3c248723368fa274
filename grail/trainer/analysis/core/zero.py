r"""DeepSpeed ZeRO: where this rank's pieces of parameters, gradients and optimizer state are.

Read from the attributes DeepSpeed sets on parameters and on its optimizers; ``deepspeed`` is
never imported here (a model that is not under DeepSpeed has none of them) and no collective is
issued (:mod:`.distributed` issues them).

* **ZeRO-3** replaces each parameter's data by a placeholder. Rank ``j`` of the parameter's
  process group (``ds_process_group``, ``W`` ranks) holds the flat partition ``p.ds_tensor`` of
  ``P = ceil(N / W)`` entries of the flattened ``N = prod(ds_shape)`` entries: global positions
  :math:`[jP, \min((j+1)P, N))`, then padding up to ``P`` on the last ranks.
  :func:`partition` gives the valid part (a view, so writes reach the partition) and its
  :class:`~.distributed.ShardInfo` (``offset = jP``, ``block = P``). The gradient partition
  and the fp32 optimizer state of a parameter have the same layout (padding included).
* **ZeRO-1/2** keep whole parameters on every rank (replicated, as under DDP) but partition the
  fp32 master weights, the gradients and the optimizer state: the parameters of a param group
  are flattened and concatenated, and each rank holds one contiguous piece of that flat group.
  A parameter therefore has at most one contiguous *fragment* on a rank (``p._hp_mapping``,
  ``None`` when the rank holds none of it), at flat offset ``lp_fragment_address.start`` in the
  parameter; every entry lies in exactly one rank's fragment.

Gradients exist only between ``engine.backward()`` and ``engine.step()``: the engine consumes
them inside ``step()`` (stage 1/2: ``averaged_gradients[i] = None``; stage 3 the same, leaving
the unclipped, possibly loss-scaled buffer behind, which is therefore never read).
:func:`gradient_piece` returns ``None`` as the gradient outside that window, so the gradient
family reports the entries as missing rather than stale.

Decisions: parameters offloaded to NVMe (partition not resident) and ZeRO++ hierarchical
partitioning (forwards gather from secondary copies of the partitions, which an in-place patch of
the primary ones would not reach) are refused (:func:`unsupported`: the manager reports nothing,
with one warning). Parameters offloaded to CPU are read where they are.

Example (no DeepSpeed: nothing is partitioned):
    >>> import torch
    >>> is_partitioned(torch.nn.Parameter(torch.zeros(3)))
    False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "StatePiece",
    "coordinator",
    "gradient_piece",
    "is_engine",
    "is_gathered",
    "is_partitioned",
    "partition",
    "partition_info",
    "release",
    "state_pieces",
    "unsupported",
    "zero_optimizer",
]


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (``ds_tensor`` holds this rank's partition)."""
    return getattr(p, "ds_tensor", None) is not None and hasattr(p, "ds_shape")


def is_engine(model: Any) -> bool:
    """True for a ``DeepSpeedEngine`` (or a subclass such as the pipeline engine)."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def _group_rank_size(p: torch.Tensor) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    group = getattr(p, "ds_process_group", None)
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _global_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def partition_geometry(p: torch.Tensor) -> tuple[tuple[int, ...], int, int, int]:
    """``(global shape, offset, valid entries, partition size)`` of a ZeRO-3 parameter."""
    shape = tuple(int(s) for s in p.ds_shape)
    size = int(getattr(p.ds_tensor, "ds_numel", p.ds_tensor.numel()))
    rank, _ = _group_rank_size(p)
    offset = rank * size
    valid = max(0, min(size, _global_numel(shape) - offset))
    return shape, offset, valid, size


def partition(p: torch.Tensor) -> torch.Tensor:
    """The valid part of this rank's ZeRO-3 partition of ``p``: a flat view of ``p.ds_tensor``
    (writes reach the partition; ``.data``, so the analysis never bumps a version counter)."""
    _, _, valid, _ = partition_geometry(p)
    return p.ds_tensor.data[:valid]


def unsupported(p: torch.Tensor) -> str | None:
    """Why a ZeRO-3 parameter cannot be read locally (None: it can)."""
    location = getattr(p.ds_tensor, "final_location", None)
    if location is not None and "nvme" in str(location).lower():
        return "DeepSpeed ZeRO-3 with parameters offloaded to NVMe"
    if getattr(p, "ds_zero_param_process_group", None) is not None:
        # forwards gather secondary partitions, which would not show a patch of the primary
        return "DeepSpeed ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1)"
    _, size = _group_rank_size(p)
    if dist.is_available() and dist.is_initialized() and size != dist.get_world_size():
        # partitions replicated over several groups (MiCS, or model parallelism): every group
        # would count its copy, and no global owner is known
        return (f"DeepSpeed ZeRO-3 partitioned over {size} of {dist.get_world_size()} ranks "
                "(MiCS or model parallelism)")
    return None


def is_gathered(p: torch.Tensor) -> bool:
    """True while DeepSpeed holds the whole ZeRO-3 parameter (gathered for a forward, or
    persistent)."""
    return getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"


def coordinator(params: list[torch.Tensor]) -> Any | None:
    """DeepSpeed's parameter coordinator for these ZeRO-3 parameters (None without a ZeRO-3
    optimizer, e.g. a model built under ``zero.Init`` for inference only)."""
    opt = getattr(params[0], "_z3_optimizer", None) if params else None
    offload = getattr(opt, "parameter_offload", None)
    return offload.get_param_coordinator() if offload is not None else None


def release(module: Any) -> None:
    """Release every whole copy DeepSpeed holds of ``module``'s ZeRO-3 parameters.

    Persistent (small) parameters and prefetched ones stay gathered between forwards; after a
    release the next forward - the analysis' own or training's - gathers each parameter it uses
    from the partitions again, so it sees patched partitions while they are patched and never a
    copy of a patch that was undone. Goes through DeepSpeed's parameter coordinator when there
    is one (it also waits for prefetches in flight), as ``engine.empty_partition_cache()`` does.
    Without a ZeRO-3 optimizer (DeepSpeed's inference-only offload) the same steps are taken by
    hand: prefetches in flight are waited for (the registry DeepSpeed keeps on the root
    module), the modules using each parameter forgotten, and every whole copy partitioned.
    Local: freeing memory needs no collective. No-op for other modules.
    """
    params = [p for p in module.parameters() if is_partitioned(p)]
    if not params:
        return
    coord = coordinator(params)
    if coord is not None:
        coord.release_and_reset_all(module)
        return
    registry = getattr(module, "ds_inflight_param_registry", None)
    ours = set(params)
    for p in [p for p in list(registry or ()) if p in ours]:
        registry.pop(p).wait()  # type: ignore[union-attr]
    for p in params:
        getattr(p, "ds_active_sub_modules", set()).clear()
    gathered = [p for p in params if is_gathered(p)]
    if gathered:
        gathered[0].partition(param_list=gathered)


# --- optimizers -----------------------------------------------------------------------------
_ZERO_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
               "fp32_groups_flat_partition")


def zero_optimizer(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO (or bf16) optimizer behind ``optimizer`` - itself, an engine, or a
    wrapper such as accelerate's, unwrapped through ``.optimizer`` - else None."""
    seen = 0
    while optimizer is not None and seen < 6:
        if any(hasattr(optimizer, a) for a in _ZERO_ATTRS):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


@dataclass
class StatePiece:
    """This rank's piece of one parameter's optimizer state, with the weights and gradient
    entries it belongs to (all flat, aligned, in the optimizer's layout).

    ``state`` holds ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad) pieces and
    the flat group's ``step``; ``group`` is the torch param group with the hyperparameters;
    ``info`` places the piece in the flattened global parameter (``owner``: counted here).
    """

    weight: torch.Tensor
    grad: torch.Tensor | None
    state: dict[str, Any]
    group: dict[str, Any]
    info: Any  # ShardInfo (imported lazily by the caller's module: no import cycle)

    def numel(self) -> int:
        return self.weight.numel()


def _fragment(p: torch.Tensor) -> Any | None:
    """ZeRO-1/2 (and bf16 optimizer) fragment mapping of ``p`` on this rank, or None."""
    return getattr(p, "_hp_mapping", None)


def _stage12_grad(p: torch.Tensor, frag: Any) -> torch.Tensor | None:
    try:
        g = frag.get_lp_grad_fragment(p._index_in_param_group)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError):
        return None  # outside backward .. step: consumed by the optimizer
    if g is None:
        return None
    g = g.reshape(-1)
    start, n = frag.lp_fragment_address.start, frag.lp_fragment_address.numel
    if g.numel() == p.numel() and g.numel() != n:
        g = g.narrow(0, start, n)  # a full accumulation buffer: this rank's fragment of it
    return g


def _stage3_position(opt: Any, p: torch.Tensor) -> tuple[int, int, int] | None:
    try:
        group_idx, offset, numel = opt.grad_position[opt.get_param_id(p)]
    except (AttributeError, KeyError, TypeError):
        return None
    return int(group_idx), int(offset), int(numel)


def _stage3_grad(p: torch.Tensor) -> torch.Tensor | None:
    opt = getattr(p, "_z3_optimizer", None)
    pos = _stage3_position(opt, p) if opt is not None else None
    if pos is None or not p.requires_grad:
        return None
    if getattr(opt, "offload_optimizer", False):
        grads = getattr(opt.fp32_partitioned_groups_flat[pos[0]], "grad", None)
        live = grads is not None
    else:
        live = opt.averaged_gradients.get(pos[0]) is not None
    if not live:
        return None
    from deepspeed.utils import safe_get_local_grad

    g = safe_get_local_grad(p)
    return None if g is None else g.reshape(-1)[: partition(p).numel()]


def _info(shape: tuple[int, ...], offset: int, block: int, owner: bool) -> Any:
    from .distributed import ShardInfo  # here: distributed imports this module

    return ShardInfo(shape, offset, True, owner, block)


def partition_info(p: torch.Tensor) -> Any:
    """The :class:`~.distributed.ShardInfo` of a ZeRO-3 parameter's partition."""
    shape, offset, _, size = partition_geometry(p)
    return _info(shape, offset, size, True)


def gradient_piece(p: torch.Tensor) -> tuple[torch.Tensor | None, Any, int] | None:
    """``(flat gradient piece or None, its ShardInfo, entries it covers)`` of a DeepSpeed-managed
    parameter, or None for a parameter whose gradient is ``p.grad`` (not under DeepSpeed, or
    DeepSpeed left it there). A ZeRO-1/2 rank that holds no fragment of ``p`` gets
    ``owner=False``.
    """
    if is_partitioned(p):
        return _stage3_grad(p), partition_info(p), partition(p).numel()
    if not hasattr(p, "_hp_mapping") or p.grad is not None:
        return None
    frag = _fragment(p)
    shape = tuple(p.shape)
    if frag is None:
        return None, _info(shape, 0, 0, False), 0
    info = _info(shape, frag.lp_fragment_address.start, 0, True)
    return _stage12_grad(p, frag), info, int(frag.lp_fragment_address.numel)


def _basic(opt: Any) -> Any:
    return getattr(opt, "optimizer", None)


def _stage3_piece(opt: Any, p: torch.Tensor) -> StatePiece | None:
    pos = _stage3_position(opt, p)
    basic = _basic(opt)
    if pos is None or basic is None or not p.requires_grad:
        return None
    group_idx = pos[0]
    flat = opt.fp32_partitioned_groups_flat[group_idx]
    full = basic.state.get(flat, {})
    group = basic.param_groups[opt.sub_group_to_group_id[group_idx]]
    if "step" not in full:
        return None
    local = partition(p)
    state: dict[str, Any] = {"step": full["step"]}
    from deepspeed.utils import safe_get_local_optimizer_state

    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in full:
            state[key] = safe_get_local_optimizer_state(p, key).reshape(-1)[: local.numel()]
    return StatePiece(local, _stage3_grad(p), state, group, partition_info(p))


def _stage12_piece(opt: Any, p: torch.Tensor) -> StatePiece | None:
    frag = _fragment(p)
    basic = _basic(opt)
    if frag is None or basic is None or not frag.optim_fragment:
        return None
    group = basic.param_groups[frag.param_group_index]
    flats = group["params"]
    full = basic.state.get(flats[0], {}) if flats else {}
    if "step" not in full:
        return None
    state: dict[str, Any] = {"step": full["step"]}
    for key, value in frag.optim_fragment.items():
        state[key] = value.reshape(-1)
    start, n = frag.lp_fragment_address.start, frag.lp_fragment_address.numel
    weight = p.data.reshape(-1).narrow(0, start, n)  # the compute weights of the fragment
    info = _info(tuple(p.shape), start, 0, True)
    return StatePiece(weight, _stage12_grad(p, frag), state, group, info)


def state_pieces(
    optimizer: Any, params: list[tuple[str, torch.Tensor]]
) -> list[tuple[str, StatePiece]] | None:
    """``(name, piece)`` for every parameter of which this rank holds optimizer state, when
    ``optimizer`` is a DeepSpeed ZeRO optimizer (else None: read ``optimizer.state``)."""
    opt = zero_optimizer(optimizer)
    if opt is None:
        return None
    stage3 = hasattr(opt, "fp32_partitioned_groups_flat")
    out = []
    for name, p in params:
        piece = _stage3_piece(opt, p) if stage3 and is_partitioned(p) else _stage12_piece(opt, p)
        if piece is not None:
            out.append((name, piece))
    return out
