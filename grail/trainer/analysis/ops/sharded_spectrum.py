r"""Spectra of many update matrices over ranks: gather each once, decompose once, broadcast.

Under FSDP2 every rank holds a block of rows of each matrix (``Shard(0)`` in ``torch.chunk`` layout:
rank ``j`` holds rows :math:`[jc, \min((j+1)c, m))` with :math:`c = \lceil m / W\rceil`, see
:class:`ShardInfo`); under DeepSpeed ZeRO-3 a flat piece of :math:`P = \lceil mn / W\rceil` entries
at flat offset :math:`jP`; under DDP and ZeRO-1/2 every rank holds the whole matrix. Both sharded
layouts are contiguous pieces at ``rank * ShardInfo.block``. :func:`sharded_spectra` computes the
spectrum of every matrix exactly once and gives every rank identical numbers:

1. matrix ``i`` (in the order of ``names``, the same on every rank) is assigned to rank
   ``i mod W``, so the decompositions are spread over the ranks;
2. its float32 delta is assembled on that rank: a sharded matrix by one ``gather`` of the
   pieces (each padded to ``block`` entries; a rank without entries sends padding), a replicated
   one from that rank's own copy (no communication). This is the equivalent of DeepSpeed's
   ``GatheredParameters`` for a ZeRO-3 update, but to one rank, and of the delta directly;
3. that rank checks it for non-finite entries, sums :math:`\lVert\Delta\rVert_F^2` in the same
   chunks as one process would (so the sums are bit-identical to a single-process run), and calls
   ``compute`` (:func:`~grail.trainer.analysis.ops.spectrum.matrix_spectrum`);
4. one broadcast carries a status, :math:`E`, exactness and :math:`\sigma^2` (float64; lengths
   known from the shape, :func:`~grail.trainer.analysis.ops.spectrum.spectrum_layout`), a second the
   truncation factors (float32) when they are wanted.

Every rank issues the same collectives in the same order, whatever it holds. An exception on the
computing rank is broadcast as a status and raised on every rank at the same point, so no rank is
left waiting in a collective. Memory: this rank's row block, and on the computing rank the
gathered :math:`W c \times n` matrix - O(largest matrix) - plus the kept factors. Without a
process group this is the plain single-process loop.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> from grail.trainer.analysis.ops.spectrum import matrix_spectrum, spectrum_layout
    >>> model = torch.nn.Linear(5, 4, bias=False)
    >>> old = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(torch.ones(4, 1) @ torch.arange(5.0).view(1, 5))
    >>> delta = old.compute_delta(ParameterSnapshot.live(model))
    >>> spectra, bad = sharded_spectra(
    ...     delta, ["weight"], lambda name, a, e: matrix_spectrum(a, 1, frob_sq=e),
    ...     lambda shape: spectrum_layout(shape, 1))
    >>> round(spectra["weight"].energy_at(1), 6), spectra["weight"].frob_sq, bad
    (1.0, 120.0, [])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..core.distributed import broadcast_, gather_, get_rank, get_world_size
from ..core.scratch import ScratchBuffers
from ..core.snapshot import ParameterDelta
from ..core.stats import StreamingStats, chunk_numel
from .spectrum import Spectrum

__all__ = ["sharded_spectra"]

logger = logging.getLogger(__name__)

_FAILED, _NONFINITE, _OK = -1.0, 0.0, 1.0

#: ``compute(name, matrix, frob_sq) -> Spectrum`` for a float32 matrix free of NaN/Inf.
ComputeFn = Callable[[str, torch.Tensor, float], Spectrum]
#: ``layout(shape) -> (number of squared singular values, factor columns)``.
LayoutFn = Callable[[tuple[int, int]], tuple[int, int]]


def _fill(delta: ParameterDelta, name: str, out: torch.Tensor) -> None:
    """Write this rank's local float32 delta of ``name`` into the flat ``out``."""
    for c in delta.stream([name], owned_only=False):
        out[c.start : c.start + c.delta.numel()].copy_(c.delta)


def _assemble(
    delta: ParameterDelta, name: str, dst: int, scratch: ScratchBuffers
) -> torch.Tensor | None:
    """The full float32 delta ``[m, n]`` of ``name`` on rank ``dst``; None on the other ranks.
    ``scratch`` holds it (the local block or the replicated matrix), reused across matrices.

    A collective (gather) for a sharded matrix, on every rank; nothing for a replicated one.
    """
    info = delta.shard(name)
    m, n = info.global_shape
    local = delta.new.data[name]
    device = local.device
    if not info.sharded:
        if get_rank() != dst:
            return None
        flat = scratch.get(device, m * n)
        _fill(delta, name, flat)
        return flat.view(m, n)
    size = info.block or -(-m // get_world_size()) * n  # FSDP2 row blocks without a block
    block = scratch.get(device, size)
    _fill(delta, name, block[: local.numel()])
    block[local.numel() :].zero_()  # padding: sent, never read
    stacked = gather_(block, dst)
    return None if stacked is None else stacked.view(-1)[: m * n].view(m, n)


def _norm_sq(matrix: torch.Tensor) -> tuple[float, int]:
    """``(sum of squares of the finite entries, number of non-finite entries)``, summed over
    the chunks :meth:`ParameterDelta.stream` uses, so one process gets the same float64 sum."""
    stats = StreamingStats(device=matrix.device)
    flat = matrix.reshape(-1)
    step = chunk_numel(matrix.device)
    for start in range(0, flat.numel(), step):
        stats.update_chunk(flat[start : start + step], 0)
    r = stats.result(0)
    return r.sum_sq, int(r.nonfinite)


def _compute(
    name: str, matrix: torch.Tensor, compute: ComputeFn, n_values: int
) -> tuple[torch.Tensor, Spectrum | None, BaseException | None]:
    """On the computing rank: the broadcast header and the spectrum (or the error)."""
    head = torch.zeros(3 + n_values, dtype=torch.float64)
    try:
        frob_sq, nonfinite = _norm_sq(matrix)
        if nonfinite:
            head[0] = _NONFINITE
            return head, None, None
        s = compute(name, matrix, frob_sq)
        if s.sigma_sq.numel() != n_values:
            raise RuntimeError(
                f"spectrum of {name} has {s.sigma_sq.numel()} values, expected {n_values}"
            )
        head[:3] = torch.tensor([_OK, s.frob_sq, 1.0 if s.exact else 0.0], dtype=torch.float64)
        head[3:] = s.sigma_sq
        return head, s, None
    except Exception as err:  # re-raised on every rank after the status is shared
        head.zero_()
        head[0] = _FAILED
        return head, None, err


def _share_factors(
    s: Spectrum | None, shape: tuple[int, int], cols: int, src: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = shape
    if s is not None:
        assert s.left is not None and s.right is not None
        buf = torch.cat([s.left.reshape(-1), s.right.reshape(-1)]).to(device)
    else:
        buf = torch.empty((m + n) * cols, dtype=torch.float32, device=device)
    broadcast_(buf, src)
    return buf[: m * cols].view(m, cols), buf[m * cols :].view(cols, n)


def sharded_spectra(
    delta: ParameterDelta, names: Sequence[str], compute: ComputeFn, layout: LayoutFn
) -> tuple[dict[str, Spectrum], list[str]]:
    """``(name -> spectrum, names left out for non-finite updates)``, equal on every rank.

    Args:
        delta: the update; ``names`` must be 2-D (global shape) and listed in the same order
            on every rank.
        compute: the decomposition, run on one rank per matrix.
        layout: sizes of what ``compute`` returns for a shape (to receive it).
    """
    world, me = get_world_size(), get_rank()
    scratch = ScratchBuffers()
    spectra: dict[str, Spectrum] = {}
    nonfinite: list[str] = []
    for i, name in enumerate(names):
        dst = i % world
        m, n = delta.shard(name).global_shape
        shape = (int(m), int(n))
        n_values, cols = layout(shape)
        device = delta.new.data[name].device
        matrix = _assemble(delta, name, dst, scratch)
        mine: Spectrum | None = None
        error: BaseException | None = None
        if me == dst:
            assert matrix is not None
            head, mine, error = _compute(name, matrix, compute, n_values)
        else:
            head = torch.empty(3 + n_values, dtype=torch.float64)
        broadcast_(head, dst)
        status = float(head[0])
        if status == _FAILED:
            if error is not None:
                raise error
            raise RuntimeError(f"the spectrum of {name} failed on rank {dst} (see its log)")
        if status == _NONFINITE:
            nonfinite.append(name)
            continue
        left = right = None
        if cols:  # every rank, the computing one included, keeps the broadcast copy
            left, right = _share_factors(mine, shape, cols, dst, device)
        sigma_sq = head[3:].clone()
        spectra[name] = Spectrum(sigma_sq, float(head[1]), shape, bool(head[2]), left, right)
        del mine
    return spectra, nonfinite
