"""``new - old`` of two parameter snapshots, streamed chunk by chunk.

:class:`ParameterDelta` never materialises the difference unless asked to
(:attr:`ParameterDelta.deltas`); :meth:`ParameterDelta.stream` yields it as
:class:`DeltaChunk` s in a reused float32 buffer on the device of the newer tensor (the snapshot
chunk is copied over), which is how every built-in metric reads it. :func:`float32_delta_` is
the one rounding rule of a delta: the exact difference, rounded once to float32. Snapshots are
:mod:`.snapshot`'s (``ParameterSnapshot.compute_delta`` builds a delta).

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> weights = torch.nn.ParameterDict({"w": torch.zeros(2)})
    >>> before = ParameterSnapshot(weights)
    >>> weights["w"].data[1] = 0.25  # an update
    >>> delta = before.compute_delta(ParameterSnapshot.live(weights))
    >>> [(c.name, c.delta.tolist()) for c in delta.stream()]
    [('w', [0.0, 0.25])]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..ops.masks import magnitude_keep_mask, random_keep_mask
from .distributed import ShardInfo
from .scratch import ScratchBuffers
from .stats import StreamingStats, chunk_numel

if TYPE_CHECKING:
    from .snapshot import ParameterSnapshot

__all__ = ["DeltaChunk", "ParameterDelta", "float32_delta_"]


def float32_delta_(out: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``out = float32(new - old)``, rounded once, so ``|new - old| == |old - new|`` exactly.

    The subtraction runs in the wider of the two dtypes (exact for bf16/fp16 values in float32;
    float64 parameters are subtracted in float64 and then rounded), never rounding one operand
    first - the symmetry is what lets a swapped mask be recomputed when it is undone.
    """
    if new.dtype == torch.float32 and old.dtype == torch.float32:
        return torch.sub(new, old, out=out)
    if torch.float64 in (new.dtype, old.dtype):
        return out.copy_(torch.sub(new, old))
    return out.copy_(new).sub_(old)


@dataclass
class DeltaChunk:
    """One chunk of one parameter's delta, as yielded by :meth:`ParameterDelta.stream`.

    ``old`` and ``new`` are flat chunks in their stored dtypes on the compute device; ``delta``
    is ``new - old`` in float32 held in a reused buffer: read it, do not keep it.
    """

    name: str
    start: int
    old: torch.Tensor
    new: torch.Tensor
    delta: torch.Tensor
    lossless: bool
    first: bool
    last: bool


class ParameterDelta:
    """``new - old`` for every parameter present in both snapshots (see module docstring)."""

    #: False in a subclass that overrides :meth:`stream` (see :attr:`kernel_streamable`).
    _plain_stream: bool = True

    def __init__(self, old: ParameterSnapshot, new: ParameterSnapshot) -> None:
        self.old = old
        self.new = new
        self.names = [n for n in new.data if n in old.data]
        self._deltas: dict[str, torch.Tensor] | None = None
        self._scratch = ScratchBuffers(chunk_numel)  # the float32 delta chunk

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "stream" in cls.__dict__:
            cls._plain_stream = False

    @property
    def kernel_streamable(self) -> bool:
        """Whether compiled kernels may read each parameter's two tensors whole from the
        snapshots instead of going through :meth:`stream`.

        True for a delta of two in-memory snapshots. False when the snapshots load tensors
        on access (the kernels would hold every tensor until the end of the pass), and for a
        subclass that overrides :meth:`stream` (it wants to see every chunk, e.g. to observe
        them), unless the subclass overrides this property too.
        """
        return self._plain_stream and self.old.in_memory and self.new.in_memory

    def __len__(self) -> int:
        return len(self.names)

    def shard(self, name: str) -> ShardInfo:
        return self.new.shards[name]

    def numel(self) -> int:
        """Local number of elements (this rank's shards)."""
        return sum(self.new.data[n].numel() for n in self.names)

    # --- streaming -------------------------------------------------------------------------
    def stream(
        self, names: list[str] | None = None, owned_only: bool = True
    ) -> Iterator[DeltaChunk]:
        """Yield the delta chunk by chunk, tensor by tensor.

        ``owned_only`` skips replicated tensors that another rank counts (no-op in one process).
        """
        self.old.synchronize()
        for name in names if names is not None else self.names:
            if owned_only and not self.new.shards[name].owner:
                continue
            new = self.new.data[name].reshape(-1)
            old = self.old.data[name].reshape(-1)
            device = new.device
            step = chunk_numel(device)
            lossless = self.old.is_lossless(name)
            n = new.numel()
            for start in range(0, max(n, 1), step):
                stop = min(start + step, n)
                d = self._scratch.get(device, stop - start)
                nc = new[start:stop]
                oc = old[start:stop]
                if oc.device != device:
                    oc = oc.to(device, non_blocking=True)
                float32_delta_(d, nc, oc)
                yield DeltaChunk(name, start, oc, nc, d, lossless, start == 0, stop >= n)

    # --- convenience (user code; built-in metrics stream instead) ---------------------------
    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        """``name -> new - old`` in float32 on the old snapshot's device; built on first access.

        Each entry is the exact difference rounded once to float32 (:func:`float32_delta_`), the
        same values :meth:`stream` yields. This materialises a float32 copy of every parameter:
        fine for small models and user code; the built-in metrics use :meth:`stream` instead.
        """
        if self._deltas is None:
            self.old.synchronize()
            out = {}
            for name in self.names:
                old = self.old.data[name]
                new = self.new.data[name].to(old.device)
                buf = torch.empty(new.shape, dtype=torch.float32, device=old.device)
                out[name] = float32_delta_(buf, new, old)
            self._deltas = out
        return self._deltas

    def _stats(self, thresholds: list[float], per_tensor: bool = False) -> StreamingStats:
        groups = ["all", *self.names] if per_tensor else ["all"]
        device = next(iter(self.new.data.values())).device if self.names else torch.device("cpu")
        stats = StreamingStats(thresholds, groups=groups, device=device)
        for i, name in enumerate(self.names):
            rows = [0, i + 1] if per_tensor else [0]
            for chunk in self.stream([name]):
                stats.update_chunk(chunk.delta, rows)
        return stats.all_reduce()

    def statistics(self) -> dict[str, float]:
        """``norm_l2, norm_l1, norm_max, mean, std, min, max`` of all finite delta entries."""
        return self._stats([]).result(0).five_numbers()

    def per_layer_statistics(self) -> dict[str, dict[str, float]]:
        """``parameter name -> statistics()`` of that tensor alone (whole tensor, all ranks)."""
        results = self._stats([], per_tensor=True).results()
        return {name: r.five_numbers() for name, r in zip(self.names, results[1:])}

    def sparsity_at_threshold(self, threshold: float) -> dict[str, float]:
        """Entries kept by a magnitude mask ``|delta| > threshold``.

        Returns ``kept_ratio, dropped_ratio, total_params, kept_params``; non-finite deltas count
        as kept (they certainly changed).
        """
        r = self._stats([threshold]).result(0)
        total = r.count + r.nonfinite
        kept = total - r.le[float(threshold)]
        return {
            "kept_ratio": kept / total if total else 0.0,
            "dropped_ratio": 1.0 - kept / total if total else 0.0,
            "total_params": total,
            "kept_params": kept,
        }

    def apply_sparse_mask(
        self, threshold: float, mask_type: str = "magnitude", seed: int = 0
    ) -> ParameterDelta:
        """The update a sparse fine-tune would apply: ``delta * mask``, as a delta of its own.

        ``"magnitude"`` keeps ``|delta| > threshold`` (non-finite deltas are kept); ``"random"``
        keeps each entry with probability equal to the magnitude mask's global kept ratio, by
        the hash bits of :func:`~grail.trainer.analysis.ops.masks.random_keep_mask` drawn with
        ``seed`` (reproducible, independent of sharding; no RNG state is read or advanced).

        The result's ``old`` is this delta's old snapshot and its ``new`` a snapshot of the
        sparsely updated weights ``W_old + delta * mask`` - the new value where the mask keeps
        an entry, the old one where it drops it, in the wider of the two dtypes on the old
        snapshot's device (no arithmetic, so nothing is rounded). Its :attr:`deltas`,
        :meth:`statistics`, :meth:`sparsity_at_threshold` and :meth:`stream` therefore read the
        masked update: exactly this delta where kept and ``0`` where dropped (a dropped entry
        whose old weight is not finite reads ``NaN``, as ``old - old`` does). It holds one copy
        of the parameters.

        Example:
            >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
            >>> model = torch.nn.Linear(3, 1, bias=False)
            >>> old = ParameterSnapshot(model)
            >>> with torch.no_grad():
            ...     model.weight += torch.tensor([[0.5, 1e-6, -0.25]])
            >>> sparse = old.compute_delta(ParameterSnapshot.live(model)).apply_sparse_mask(1e-4)
            >>> sparse.sparsity_at_threshold(0.0)["kept_params"]
            2
            >>> sparse.deltas["weight"][0, 1].item()
            0.0
        """
        if mask_type not in ("magnitude", "random"):
            raise ValueError(f"mask_type must be 'magnitude' or 'random', got {mask_type!r}")
        keep = self.sparsity_at_threshold(threshold)["kept_ratio"] if mask_type == "random" else 1
        from .snapshot import ParameterSnapshot

        masked = ParameterSnapshot(None, device=self.old._device)
        flat: dict[str, torch.Tensor] = {}
        for name in self.names:
            new, old = self.new.data[name], self.old.data[name]
            dtype = torch.promote_types(new.dtype, old.dtype)
            masked.data[name] = torch.empty(new.shape, dtype=dtype, device=old.device)
            masked.shards[name] = self.new.shards[name]
            masked.param_dtypes[name] = self.new.param_dtypes[name]
            flat[name] = masked.data[name].view(-1)
        for c in self.stream(owned_only=False):
            if mask_type == "magnitude":
                kept = magnitude_keep_mask(c.delta, threshold)
            else:
                offset = self.new.shards[c.name].offset + c.start
                kept = random_keep_mask(c.delta.numel(), keep, seed, c.name, offset, c.delta.device)
            chunk = flat[c.name][c.start : c.start + c.delta.numel()]
            chunk.copy_(torch.where(kept, c.new, c.old))  # a selection: bit-exact values
        masked.timestamp = self.new.timestamp
        return ParameterDelta(self.old, masked)
