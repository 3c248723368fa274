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

Under FSDP2 a snapshot holds this rank's local shard of each ``DTensor``, under DeepSpeed ZeRO-3
the valid part of this rank's flat partition of each parameter (in the parameter's dtype, padding
left out), and records where it sits
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
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.masks import magnitude_keep_mask, random_keep_mask
from .distributed import ShardInfo, local_tensor, shard_info, unwrap_model
from .scratch import ScratchBuffers
from .stats import StreamingStats, chunk_numel

__all__ = [
    "ANALYSED_DTYPES",
    "DeltaChunk",
    "ParameterDelta",
    "ParameterSnapshot",
    "collect_parameters",
    "float32_delta_",
]

logger = logging.getLogger(__name__)


# Names of excluded parameters already logged, per model (see collect_parameters).
_EXCLUSIONS_LOGGED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
_NAMES_SHOWN = 10
#: Parameter dtypes the analysis covers (see :func:`collect_parameters`).
ANALYSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def collect_parameters(
    model: nn.Module, trainable_only: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """The real floating-point parameters that analysis covers, by name (tied weights once).

    DDP wrappers are unwrapped so that names do not depend on how the model is wrapped.
    Only float16, bfloat16, float32 and float64 parameters are analysed; others are excluded
    from every metric: a complex value has no magnitude threshold or sign in the sense the
    metrics use, integer and bool storage (e.g. 4-bit packed ``uint8`` of a quantized model)
    is not a weight value, and float8 and smaller formats have no arithmetic in torch that the
    delta could use. One INFO line names them, the first time each is met for a given model.
    """
    root = unwrap_model(model)
    out, excluded = [], []
    for name, p in root.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        if p.dtype not in ANALYSED_DTYPES:
            excluded.append((name, p.dtype))
            continue
        out.append((name, p))
    if excluded:
        _log_exclusions(root, excluded)
    return out


def _log_exclusions(model: nn.Module, excluded: list[tuple[str, torch.dtype]]) -> None:
    try:
        logged = _EXCLUSIONS_LOGGED.setdefault(model, set())
    except TypeError:  # a module that cannot be weakly referenced: log every time
        logged = set()
    new = [(n, d) for n, d in excluded if n not in logged]
    if not new:
        return
    logged.update(n for n, _ in new)
    shown = ", ".join(f"{n} ({str(d).removeprefix('torch.')})" for n, d in new[:_NAMES_SHOWN])
    more = f", ... ({len(new)} parameters)" if len(new) > _NAMES_SHOWN else ""
    logger.info(
        "analysis excludes %d parameter(s) of a dtype it does not analyse (only float16, "
        "bfloat16, float32 and float64 are): %s%s",
        len(new),
        shown,
        more,
    )


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

    @property
    def in_memory(self) -> bool:
        """Whether :attr:`data` holds its tensors (a plain dict), rather than a mapping that
        loads each tensor when it is accessed (an offline checkpoint)."""
        return type(self._data) is dict

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
