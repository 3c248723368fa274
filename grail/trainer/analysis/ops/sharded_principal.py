r"""Principal geometry of many matrices over ranks: one rank per matrix, results broadcast.

The pattern of :mod:`~grail.trainer.analysis.ops.sharded_spectrum`, for two matrices instead of
one: matrix ``i`` of ``names`` (the same order on every rank) is handled by rank ``i mod W``.
There the reference :math:`W` (``delta.old``) and the updated matrix :math:`W'` (``delta.new``)
are assembled in float32 - a sharded (FSDP2 ``Shard(0)``) matrix by one ``gather`` of padded row
blocks each, a replicated one from that rank's own copy - and that rank

1. checks both for non-finite entries;
2. takes the reference's top factors from ``cache`` when its :func:`fingerprint` matches, else
   calls ``factors_of`` (and caches them when ``cache.tracks == "reference"``);
3. decomposes :math:`W'` with ``factors_of`` (cached when ``cache.tracks == "next"``: the next
   measurement's reference);
4. computes :math:`\Delta = W' - W` in float32 in place and
   :func:`~grail.trainer.analysis.ops.principal.principal_geometry`.

One broadcast then carries a status and the :class:`Geometry` numbers, so every rank returns the
same values, equal to one process's. Every rank issues the same collectives in the same order; an
exception on the computing rank is broadcast as a status and raised on every rank. The cache is
local to the rank that computes a matrix (always the same rank for the same name order), and
what it decides (hit or miss) leads to no collective.

Memory on the computing rank: the two assembled matrices (O(largest matrix)) and the factors.
Without a process group this is the plain single-process loop.

Decisions: :math:`\Delta` is ``float32(W') - float32(W)``, which equals the float32 delta the
other families stream for float32, bfloat16 and float16 weights; a matrix with a non-finite entry
or an all-zero reference (no principal directions) is left out and reported in the second
returned list.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> from grail.trainer.analysis.ops.principal import top_factors
    >>> model = torch.nn.Linear(5, 4, bias=False)
    >>> old = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     _ = model.weight.mul_(1.5)  # no rotation; singular values grow by half
    >>> geo, skipped = principal_geometries(
    ...     old.compute_delta(ParameterSnapshot.live(model)), ["weight"], [2],
    ...     lambda name, a: top_factors(a, 2))
    >>> round(geo["weight"].overlap[0], 6), round(geo["weight"].drift[0], 6), skipped
    (1.0, 0.5, [])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..core.distributed import ShardInfo, broadcast_, gather_, get_rank, get_world_size
from ..core.snapshot import ParameterDelta
from .principal import (
    FactorCache,
    Factors,
    Geometry,
    effective_rank,
    fingerprint,
    principal_geometry,
)

__all__ = ["FactorsFn", "principal_geometries"]

logger = logging.getLogger(__name__)

_FAILED, _SKIPPED, _OK = -1.0, 0.0, 1.0

#: ``factors_of(name, matrix) -> Factors``: top factors of a finite float32 matrix.
FactorsFn = Callable[[str, torch.Tensor], Factors]


def _assemble(
    local: torch.Tensor, info: ShardInfo, dst: int, device: torch.device
) -> torch.Tensor | None:
    """A new float32 ``[m, n]`` copy of the global matrix on rank ``dst``; None elsewhere.

    A collective (gather) for a sharded matrix, on every rank; nothing for a replicated one.
    """
    m, n = info.global_shape
    if not info.sharded:
        if get_rank() != dst:
            return None
        out = torch.empty((m, n), dtype=torch.float32, device=device)
        return out.copy_(local.reshape(m, n))
    # FSDP2 row blocks or DeepSpeed ZeRO-3 flat pieces: rank j's piece starts at j * block
    size = info.block or -(-m // get_world_size()) * n
    block = torch.zeros(size, dtype=torch.float32, device=device)
    block[: local.numel()].copy_(local.reshape(-1))  # padding: sent, never read
    stacked = gather_(block, dst)
    return None if stacked is None else stacked.view(-1)[: m * n].view(m, n)


def _compute(
    name: str,
    old: torch.Tensor,
    new: torch.Tensor,
    ranks: Sequence[int],
    factors_of: FactorsFn,
    cache: FactorCache | None,
    updated_by_name: dict[str, Factors] | None = None,
) -> Geometry | None:
    """On the computing rank: the geometry, or None for a matrix that is left out."""
    if not (bool(torch.isfinite(old).all()) and bool(torch.isfinite(new).all())):
        return None
    top = effective_rank(max(ranks), (old.shape[0], old.shape[1]))
    ref: Factors | None = None
    if cache is not None:
        key = fingerprint(old)
        ref = cache.get(name, top, key, old.device)
        if ref is None:
            ref = factors_of(name, old)
            if cache.tracks == "reference":
                cache.put(name, top, key, ref)
    else:
        ref = factors_of(name, old)
    if not float(ref.s[0]) > 0:
        return None  # a zero reference has no principal directions
    updated = updated_by_name.get(name) if updated_by_name is not None else None
    if updated is None:
        updated = factors_of(name, new)
        if updated_by_name is not None:
            updated_by_name[name] = updated
    if cache is not None and cache.tracks == "next":
        cache.put(name, top, fingerprint(new), updated)
    delta = new.sub_(old)  # float32(W') - float32(W), in the assembled copy
    return principal_geometry(ref, updated, delta, ranks)


def principal_geometries(
    delta: ParameterDelta,
    names: Sequence[str],
    ranks: Sequence[int],
    factors_of: FactorsFn,
    cache: FactorCache | None = None,
    updated_by_name: dict[str, Factors] | None = None,
) -> tuple[dict[str, Geometry], list[str]]:
    """``(name -> geometry, names left out)``, equal on every rank (see module docstring).

    Args:
        delta: reference (``delta.old``) and updated matrices (``delta.new``); ``names`` must be
            2-D and listed in the same order on every rank.
        ranks: the ``k`` of the top-``k`` blocks.
        factors_of: the decomposition, run on one rank per matrix; it must return at least
            ``min(max(ranks), m, n)`` triplets.
        cache: factors kept across calls (see :class:`FactorCache`); None decomposes both
            matrices every time.
        updated_by_name: the updated matrices' factors by name, filled here and read first:
            two calls within one measurement whose updated matrices are the same weights (the
            interval and the drift view both end at ``W_now``) decompose each once. Only for
            calls that see the same ``delta.new`` values and decompose with the same settings.
    """
    world, me = get_world_size(), get_rank()
    size = Geometry.vector_size(len(ranks))
    out: dict[str, Geometry] = {}
    skipped: list[str] = []
    for i, name in enumerate(names):
        dst = i % world
        info = delta.shard(name)
        shape = (int(info.global_shape[0]), int(info.global_shape[1]))
        device = delta.new.data[name].device
        old = _assemble(delta.old.data[name], info, dst, device)
        new = _assemble(delta.new.data[name], info, dst, device)
        head = torch.zeros(1 + size, dtype=torch.float64)
        error: BaseException | None = None
        if me == dst:
            assert old is not None and new is not None
            try:
                geo = _compute(name, old, new, ranks, factors_of, cache, updated_by_name)
                if geo is None:
                    head[0] = _SKIPPED
                else:
                    head[0] = _OK
                    head[1:] = geo.to_vector()
            except Exception as err:  # re-raised on every rank after the status is shared
                head.zero_()
                head[0] = _FAILED
                error = err
        del old, new
        broadcast_(head, dst)
        status = float(head[0])
        if status == _FAILED:
            if error is not None:
                raise error
            raise RuntimeError(f"the principal geometry of {name} failed on rank {dst}")
        if status == _SKIPPED:
            skipped.append(name)
            continue
        out[name] = Geometry.from_vector(shape, head[1:])
    return out, skipped
