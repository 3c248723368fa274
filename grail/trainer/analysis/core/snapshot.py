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
import uuid
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .distributed import ShardInfo, local_tensor, shard_info
from .engines import unwrap_model

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
        self.uid = uuid.uuid4().hex  # which weights these are: new at every capture, restored
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
        self.uid = uuid.uuid4().hex
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
        from .delta import ParameterDelta

        return ParameterDelta(self, newer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.synchronize()
        return {n: t.clone() for n, t in self.data.items()}

    def layout_state(self) -> dict[str, dict[str, Any]]:
        """What a checkpoint of :meth:`state_dict` needs beside the tensors, in plain values:
        ``{"param_dtypes": {name: "bfloat16", ...}, "shards": {name: [...], ...}}`` (each
        rank's snapshot holds its own pieces; the shards say where they sit)."""
        return {
            "param_dtypes": {
                n: str(d).removeprefix("torch.") for n, d in self.param_dtypes.items()
            },
            "shards": {n: info.to_state() for n, info in self.shards.items()},
        }

    @classmethod
    def restored(
        cls,
        tensors: Mapping[str, torch.Tensor],
        param_dtypes: Mapping[str, str],
        shards: Mapping[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        trainable_only: bool = False,
        live: ParameterSnapshot | None = None,
        uid: str | None = None,
    ) -> ParameterSnapshot:
        """A snapshot of saved ``tensors`` (:meth:`state_dict`) with the dtypes and shards of
        :meth:`layout_state` (and ``uid``, the saved snapshot's, when given).

        A tensor saved without its shard (a checkpoint written before shards were saved) takes
        the shard of ``live`` when the local shapes agree, else counts as replicated (whole on
        every rank, counted on rank 0). A replicated tensor is counted by this process's rank 0
        whichever rank saved it (replicas are the same bits); a sharded one keeps the saving
        rank's place, which this rank's live layout must match (:meth:`spec`) to be diffed
        against it.
        """
        snap = cls(None, device=device, dtype=dtype, trainable_only=trainable_only)
        for name, tensor in tensors.items():
            snap.data[name] = tensor.to(snap._device, copy=True)
            snap.param_dtypes[name] = getattr(torch, param_dtypes.get(name, ""), tensor.dtype)
            if name in shards:
                info = ShardInfo.from_state(shards[name])
                snap.shards[name] = info if info.sharded else ShardInfo.replicated(
                    info.global_shape)
            elif live is not None and name in live.data and live.data[name].shape == tensor.shape:
                snap.shards[name] = live.shards[name]
            else:
                snap.shards[name] = ShardInfo.replicated(tuple(tensor.shape))
        snap.timestamp = time.time()
        snap.uid = uid if isinstance(uid, str) and uid else snap.uid
        return snap


# the delta of two snapshots lives in .delta; re-exported here, where it has always been found
from .delta import DeltaChunk, ParameterDelta, float32_delta_  # noqa: E402
