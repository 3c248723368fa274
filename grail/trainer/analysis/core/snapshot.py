"""Parameter snapshots and deltas: the only place where parameters are copied.

:class:`ParameterSnapshot` holds an independent copy of a model's parameters. By default each
tensor keeps its own dtype ("auto"), so a diff is exact: an unchanged bf16 weight reads as
exactly unchanged, and a 1e-9 change of an fp32 weight is not rounded away. Buffers are
allocated once and refilled in place by :meth:`ParameterSnapshot.capture_`; copies from a GPU go
to pinned host memory without blocking and are waited for only when the snapshot is read.
:meth:`ParameterSnapshot.live` wraps the live parameters without copying anything.

:class:`ParameterDelta` is ``new - old`` for two snapshots. It never materialises the difference
unless asked to (:attr:`ParameterDelta.deltas`); :meth:`ParameterDelta.stream` yields it chunk by
chunk in a reused float32 buffer on the device of the newer tensor (the snapshot chunk is copied
over), which is how every built-in metric reads it.

Under FSDP2 a snapshot holds this rank's local shard of each ``DTensor`` and records where it sits
(:class:`~grail.trainer.analysis.core.distributed.ShardInfo`); statistics computed from a delta are
reduced over ranks, counting replicated tensors once.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> old = ParameterSnapshot(model)
    >>> with torch.no_grad():
    ...     model.weight[0, 0] += 0.5
    >>> delta = old.compute_delta(ParameterSnapshot.live(model))
    >>> delta.sparsity_at_threshold(0.0)["kept_params"]
    1
    >>> round(delta.statistics()["norm_l2"], 6)
    0.5
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.masks import magnitude_keep_mask, random_keep_mask
from .distributed import ShardInfo, local_tensor, shard_info, unwrap_model
from .stats import StreamingStats, chunk_numel

__all__ = [
    "DeltaChunk",
    "ParameterDelta",
    "ParameterSnapshot",
    "collect_parameters",
    "float32_delta_",
]

logger = logging.getLogger(__name__)


def collect_parameters(
    model: nn.Module, trainable_only: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """The floating-point parameters that analysis covers, by name (tied weights once).

    DDP wrappers are unwrapped so that names do not depend on how the model is wrapped.
    """
    out = []
    for name, p in unwrap_model(model).named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        if not (p.is_floating_point() or p.is_complex()):
            continue  # quantized storage (e.g. 4-bit packed uint8): not a weight value
        out.append((name, p))
    return out


_WIDENS = {
    torch.bfloat16: {torch.bfloat16, torch.float32, torch.float64},
    torch.float16: {torch.float16, torch.float32, torch.float64},
    torch.float32: {torch.float32, torch.float64},
}


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    return src == dst or dst in _WIDENS.get(src, ())


class ParameterSnapshot:
    """Copies (or, with :meth:`live`, references) of a model's parameters, keyed by name.

    Args:
        model: the module to copy.
        device: where the copies live (``"cpu"`` keeps GPU memory for training).
        dtype: storage dtype; None keeps each parameter's own dtype (lossless).
        trainable_only: keep only parameters with ``requires_grad``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        trainable_only: bool = False,
    ) -> None:
        self._device = torch.device(device)
        self._dtype = dtype
        self.trainable_only = trainable_only
        self._data: dict[str, torch.Tensor] = {}
        self.shards: dict[str, ShardInfo] = {}
        self.param_dtypes: dict[str, torch.dtype] = {}
        self.is_live = False
        self.timestamp = 0.0
        self._pending: list[torch.cuda.Event] = []
        if model is not None:
            self.capture_(model)

    @classmethod
    def live(cls, model: nn.Module, trainable_only: bool = False) -> ParameterSnapshot:
        """A view of the live parameters: no copy; values change as the model trains."""
        snap = cls(None, trainable_only=trainable_only)
        snap.is_live = True
        for name, p in collect_parameters(model, trainable_only):
            t = local_tensor(p)
            snap.data[name] = t
            snap.shards[name] = shard_info(p)
            snap.param_dtypes[name] = t.dtype
        snap._device = next(iter(snap.data.values())).device if snap.data else torch.device("cpu")
        snap.timestamp = time.time()
        return snap

    # --- capture ---------------------------------------------------------------------------
    def capture_(self, model: nn.Module) -> ParameterSnapshot:
        """Copy the model's parameters into this snapshot, reusing its buffers where possible."""
        if self.is_live:
            raise RuntimeError("a live snapshot references the model; it cannot capture")
        params = collect_parameters(model, self.trainable_only)
        keep = {n for n, _ in params}
        for name in [n for n in self.data if n not in keep]:
            del self.data[name], self.shards[name], self.param_dtypes[name]
        async_devices: set[torch.device] = set()
        for name, p in params:
            src = local_tensor(p)
            dtype = self._dtype or src.dtype
            buf = self.data.get(name)
            if buf is None or buf.shape != src.shape or buf.dtype != dtype:
                buf = self._allocate(src.shape, dtype, pinned=src.device.type == "cuda")
                self.data[name] = buf
            non_blocking = buf.device.type == "cpu" and buf.is_pinned() and src.is_cuda
            buf.copy_(src, non_blocking=non_blocking)
            if non_blocking:
                async_devices.add(src.device)
            self.shards[name] = shard_info(p)
            self.param_dtypes[name] = src.dtype
        for device in async_devices:  # one event per GPU the copies came from
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._pending.append(event)
        self.timestamp = time.time()
        return self

    def _allocate(self, shape: torch.Size, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        if pinned and self._device.type == "cpu":
            try:
                return torch.empty(shape, dtype=dtype, pin_memory=True)
            except RuntimeError as err:  # pinned memory is a finite OS resource
                logger.warning("pinned host memory unavailable (%s); using pageable memory", err)
        return torch.empty(shape, dtype=dtype, device=self._device)

    def synchronize(self) -> None:
        """Wait for pending non-blocking copies (called before the snapshot is read)."""
        while self._pending:
            self._pending.pop().synchronize()

    @property
    def data(self) -> dict[str, torch.Tensor]:
        """``name -> tensor``; waits for pending non-blocking copies, so a read is always safe."""
        self.synchronize()
        return self._data

    @data.setter
    def data(self, value: dict[str, torch.Tensor]) -> None:
        self._data = value

    # --- introspection ---------------------------------------------------------------------
    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> torch.dtype | None:
        """The storage dtype when all tensors share one, else None."""
        dtypes = {t.dtype for t in self.data.values()}
        return dtypes.pop() if len(dtypes) == 1 else None

    def spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, tuple[int, ...], int]]:
        """``name -> (global shape, dtype, local shape, shard offset)``: what must match to diff
        two snapshots (a change of placement re-baselines like a change of shape)."""
        return {
            n: (
                self.shards[n].global_shape,
                self.param_dtypes[n],
                tuple(self.data[n].shape),
                self.shards[n].offset,
            )
            for n in self.data
        }

    def is_lossless(self, name: str) -> bool:
        """True when the stored dtype represents every value of the parameter's dtype exactly."""
        return _widens(self.param_dtypes[name], self.data[name].dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, name: object) -> bool:
        return name in self.data

    def __repr__(self) -> str:
        kind = "live" if self.is_live else f"{self.nbytes() / 2**20:.1f} MiB on {self.device}"
        return f"ParameterSnapshot({len(self)} tensors, {kind})"

    def compute_delta(self, newer: ParameterSnapshot) -> ParameterDelta:
        """``newer - self`` over the parameters both hold."""
        return ParameterDelta(self, newer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.synchronize()
        return {n: t.clone() for n, t in self.data.items()}


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

    def __init__(self, old: ParameterSnapshot, new: ParameterSnapshot) -> None:
        self.old = old
        self.new = new
        self.names = [n for n in new.data if n in old.data]
        self._deltas: dict[str, torch.Tensor] | None = None
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def shard(self, name: str) -> ShardInfo:
        return self.new.shards[name]

    def numel(self) -> int:
        """Local number of elements (this rank's shards)."""
        return sum(self.new.data[n].numel() for n in self.names)

    # --- streaming -------------------------------------------------------------------------
    def _scratch(self, device: torch.device, n: int) -> torch.Tensor:
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, chunk_numel(device)), dtype=torch.float32, device=device)
            self._buffers[device] = buf
        return buf

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
                d = self._scratch(device, stop - start)[: stop - start]
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

        This materialises a float32 copy of every parameter: fine for small models and user
        code; the built-in metrics use :meth:`stream` instead.
        """
        if self._deltas is None:
            self.old.synchronize()
            out = {}
            for name in self.names:
                new = self.new.data[name].to(self.old.data[name].device, torch.float32)
                out[name] = new - self.old.data[name].float()
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
    ) -> dict[str, torch.Tensor]:
        """``name -> delta * mask`` (float32): the update a sparse fine-tune would apply.

        ``"magnitude"`` keeps ``|delta| > threshold``; ``"random"`` keeps each entry with
        probability equal to the magnitude mask's global kept ratio, drawn from a generator
        seeded by ``seed`` (the global RNG is not touched).
        """
        if mask_type not in ("magnitude", "random"):
            raise ValueError(f"mask_type must be 'magnitude' or 'random', got {mask_type!r}")
        keep = self.sparsity_at_threshold(threshold)["kept_ratio"]
        out = {}
        for name, d in self.deltas.items():
            if mask_type == "magnitude":
                mask = magnitude_keep_mask(d, threshold)
            else:
                info = self.new.shards[name]
                mask = random_keep_mask(d.numel(), keep, seed, name, info.offset, d.device)
                mask = mask.view(d.shape)
            out[name] = torch.where(mask, d, 0.0)  # d * mask would turn a dropped NaN/inf into NaN
        return out
