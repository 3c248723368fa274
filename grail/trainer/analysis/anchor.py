"""The base snapshot of base-anchored analysis (``drift/*``): where it comes from, how it is
checked, and how it is sharded.

The base is a second lossless snapshot next to the interval snapshot: on ``snapshot_device``,
each tensor in a dtype that holds the base's values exactly, and under DDP/FSDP2 holding only this
rank's local shard, exactly like the interval snapshot (:class:`ParameterSnapshot` of the model).
:class:`BaseAnchor` holds it for the manager.

Sources of :meth:`BaseAnchor.set`:

* a module: its analysed parameters (DDP unwrapped, tied weights once; see
  :func:`~grail.trainer.analysis.core.snapshot.collect_parameters`);
* a mapping ``name -> tensor`` (a state dict); tensors may be full (unsharded) or, for an FSDP2
  model's own state dict, ``DTensor`` shards;
* a path: a checkpoint file (``.safetensors``, ``.pt``/``.pth``/``.bin``) or a Hugging Face model
  directory, read one tensor at a time with the offline loader
  (:func:`~grail.trainer.analysis.offline.checkpoint.open_checkpoint`).

The *layout* is the set of analysed parameters of the model being trained: names, global shapes,
dtypes and each rank's shard. With a layout (``model=`` given to ``set_base``, or the manager's
interval snapshot) every analysed parameter must be in the source with the parameter's global
shape (or, for a shard saved by this rank, its local shape), else one ``ValueError`` names the
differences; tensors of the source that the model does not analyse are ignored (one INFO line
counts them). Each tensor is stored in ``promote_types(source dtype, parameter dtype)``: a bf16
checkpoint of an fp32 run is kept exactly (as float32), and "unchanged" means equal as real
numbers, as in the offline diff. A sharded parameter keeps only this rank's rows.

Decisions where the design is silent:

* Without a layout (``set_base(path)`` before the first step, no ``model=``) the source is read
  as given and kept *pending*: it is checked and sharded against the model at the first
  ``on_optimizer_step`` (or the HF callback's train begin). A mismatch found then cannot raise
  into training: one warning names it and the base is taken from the live weights instead. Pass
  ``model=`` to fail at ``set_base``.
* A base set with ``set_base`` (or restored from a state dict) is *explicit*: ``reset()`` keeps
  it, because it is where the run started, not analysis progress. A base taken automatically is
  forgotten by ``reset()`` and taken again at the next call.
* Non-floating tensors of a mapping or checkpoint are never analysed parameters: ignored.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> anchor = BaseAnchor("cpu")
    >>> anchor.set({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, model)
    >>> sorted(anchor.snapshot.data), anchor.explicit, anchor.pending
    (['bias', 'weight'], True, False)
    >>> anchor.set({"weight": torch.zeros(3, 3)}, model)
    Traceback (most recent call last):
    ...
    ValueError: the base does not match the model's parameters: missing: bias; shapes differ: \
weight [3, 3] vs the model's [2, 3]
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.distributed import ShardInfo, agree, local_tensor
from .core.snapshot import ANALYSED_DTYPES, ParameterSnapshot, collect_parameters

__all__ = ["BaseAnchor", "BaseSource", "base_mismatch"]

logger = logging.getLogger(__name__)

#: What :meth:`BaseAnchor.set` accepts.
BaseSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike

_SHOWN = 5


def _listing(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def base_mismatch(source: Mapping[str, tuple[int, ...]], layout: ParameterSnapshot) -> str:
    """What keeps ``source`` (``name -> shape``) from being a base for ``layout``; ``""`` if
    nothing. A shape may be the parameter's global shape or this rank's local one."""
    missing = [n for n in layout.data if n not in source]
    shapes = []
    for n in layout.data:
        if n in source:
            want = layout.shards[n].global_shape
            if tuple(source[n]) not in (tuple(want), tuple(layout.data[n].shape)):
                shapes.append(f"{n} {list(source[n])} vs the model's {list(want)}")
    parts = []
    if missing:
        parts.append(f"missing: {_listing(missing)}")
    if shapes:
        parts.append(f"shapes differ: {_listing(shapes)}")
    return "; ".join(parts)


def _local_piece(t: torch.Tensor, info: ShardInfo, local_shape: torch.Size) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard, a full tensor's rows, or ``t``."""
    if hasattr(t, "placements"):  # a DTensor of the same sharding (an FSDP2 state dict)
        return local_tensor(t)
    t = t.detach()
    if tuple(t.shape) == tuple(info.global_shape) and tuple(t.shape) != tuple(local_shape):
        n = local_shape.numel()
        return t.reshape(-1)[info.offset : info.offset + n].view(local_shape)
    return t


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of the floating tensors, without loading a lazily read checkpoint."""
    specs = getattr(getattr(tensors, "checkpoint", None), "specs", None)
    if specs is not None:  # LazyTensors: the headers say it
        return {n: tuple(specs[n].shape) for n in tensors}
    return {
        n: tuple(t.shape)
        for n, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point
    }


def _peft_hint(names: Mapping[str, Any]) -> str:
    """A hint when the model's names are a PEFT wrapper's (``base_model.model.`` prefix,
    ``.base_layer.``), which no plain checkpoint carries."""
    if not any(n.startswith("base_model.model.") or ".base_layer." in n for n in names):
        return ""
    return ("; the model is a PEFT model, whose parameter names differ from the plain "
            "model's: pass the PEFT model itself (or its state_dict) as the base, before "
            "training, or set_base on the plain model before wrapping it")


def _build(
    tensors: Mapping[str, torch.Tensor], layout: ParameterSnapshot, device: torch.device
) -> ParameterSnapshot:
    """A snapshot of ``tensors`` in ``layout``'s names, dtypes and shards (checked first)."""
    problem = base_mismatch(_shapes(tensors), layout)
    if problem:
        raise ValueError(f"the base does not match the model's parameters: {problem}"
                         f"{_peft_hint(layout.data)}")
    snap = ParameterSnapshot(None, device=device)
    for n, buf in layout.data.items():
        info = layout.shards[n]
        piece = _local_piece(tensors[n], info, buf.shape)
        if tuple(piece.shape) != tuple(buf.shape):
            raise ValueError(
                f"the base's {n} has local shape {list(piece.shape)} on this rank, the model's "
                f"shard {list(buf.shape)}"
            )
        dtype = torch.promote_types(piece.dtype, layout.param_dtypes[n])
        snap.data[n] = piece.to(device=device, dtype=dtype, copy=True).contiguous()
        snap.param_dtypes[n] = layout.param_dtypes[n]
        snap.shards[n] = info
    extra = [n for n in tensors if n not in layout.data]
    if extra:
        logger.info("the base holds %d tensors the analysis does not cover (ignored): %s",
                    len(extra), _listing(list(extra)))
    snap.timestamp = time.time()
    return snap


def _as_given(tensors: Mapping[str, torch.Tensor], device: torch.device) -> ParameterSnapshot:
    """The floating tensors of ``tensors`` as they are (no layout to check against yet)."""
    snap = ParameterSnapshot(None, device=device)
    for n, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in ANALYSED_DTYPES:
            continue
        local = local_tensor(t) if hasattr(t, "placements") else t.detach()
        snap.data[n] = local.to(device=device, copy=True).contiguous()
        snap.param_dtypes[n] = local.dtype
        snap.shards[n] = ShardInfo(tuple(t.shape), 0, False, True)
    snap.timestamp = time.time()
    if not snap.data:
        raise ValueError("the base holds no floating-point tensors")
    return snap


def _tensors(source: BaseSource) -> Mapping[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return dict(collect_parameters(source))
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        from .offline.checkpoint import open_checkpoint
        from .offline.pair import LazyTensors

        ckpt = open_checkpoint(Path(source))
        names = [n for n, s in ckpt.specs.items() if s.dtype in ANALYSED_DTYPES]
        return LazyTensors(ckpt, names)
    raise TypeError(
        "set_base expects a model (nn.Module), a state dict (name -> tensor) or a checkpoint "
        f"path (str or os.PathLike), got {type(source).__name__}"
    )


class BaseAnchor:
    """The base snapshot and where it stands (see module docstring).

    Args:
        device: ``snapshot_device`` of the config.
        trainable_only: keep only trainable parameters, like the interval snapshot.
    """

    def __init__(self, device: str | torch.device, trainable_only: bool = False) -> None:
        self.device = torch.device(device)
        self.trainable_only = trainable_only
        self.snapshot: ParameterSnapshot | None = None
        self.explicit = False  # set by set_base or a state dict: kept by reset()
        self.pending = False  # not yet checked against (and sharded like) the model
        self.restored = False  # from a state dict: its pieces carry the saving rank's layout
        self.step: int | None = None  # the step whose weights it holds, when taken automatically
        self.failed = False  # taking or checking it raised: not retried until set or cleared

    def set(self, source: BaseSource, model: nn.Module | None = None,
            layout: ParameterSnapshot | None = None) -> None:
        """Make ``source`` the base; raises ``ValueError`` if it does not match ``model`` (or
        ``layout``, e.g. the interval snapshot), ``TypeError`` for an unknown source."""
        if model is not None:
            layout = ParameterSnapshot.live(model, trainable_only=self.trainable_only)
        if isinstance(source, nn.Module) and (layout is None or model is source):
            snap = ParameterSnapshot(source, device=self.device, trainable_only=self.trainable_only)
            pending = layout is None
        else:
            tensors = _tensors(source)
            pending = layout is None
            snap = _as_given(tensors, self.device) if pending else _build(tensors, layout,
                                                                          self.device)
        self.snapshot, self.explicit, self.pending, self.step = snap, True, pending, None
        self.failed, self.restored = False, False

    def take(self, model: nn.Module, step: int) -> None:
        """The base from the live weights of ``model`` (at ``step``)."""
        self.snapshot = None  # the old one (if any) is released before the copy is made
        self.snapshot = ParameterSnapshot(model, device=self.device,
                                          trainable_only=self.trainable_only)
        self.explicit, self.pending, self.step = False, False, step

    def resolve(self, model: nn.Module, step: int) -> None:
        """Check a pending base against ``model`` and shard it like it; on a mismatch, warn and
        take the base from the live weights (training must go on). Every rank calls this at
        the same step and all take the same decision (one vote): a base mixed from the saved
        pieces on some ranks and the live weights on others would be no base at all."""
        assert self.snapshot is not None
        snap: ParameterSnapshot | None = None
        problem = ""
        try:  # whatever happens here, every rank reaches the vote
            live = ParameterSnapshot.live(model, trainable_only=self.trainable_only)
            if self.snapshot.spec() == live.spec():  # e.g. set_base(model) of the model itself
                snap = self.snapshot
                snap.shards = dict(live.shards)
            elif self.restored:  # the saving rank's pieces: only this rank's own fit
                problem = ("the base in the loaded state holds other pieces than this rank's "
                           "(each rank must load the state it saved, on as many ranks)")
            else:
                snap = _build(self.snapshot.data, live, self.device)
        except ValueError as err:
            problem = f"{err} (pass model= to set_base to catch this when the base is set)"
        except Exception as err:  # e.g. out of memory on this rank only
            problem = f"checking the base failed: {err!r}"
        anywhere, _ = agree([bool(problem)])
        if anywhere[0]:
            logger.warning("%s; drift/* is measured from the weights at step %d instead",
                           problem or "another rank cannot use the base", step)
            self.take(model, step)
            return
        assert snap is not None
        self.snapshot, self.pending, self.restored = snap, False, False

    def ensure(self, model: nn.Module, wanted: bool, step: int) -> None:
        """Resolve a pending base, or take one from ``model`` when ``wanted`` and none is set
        (a warning when that happens after step 1: a resumed run measures from there)."""
        if self.pending:
            self.resolve(model, step)
        elif self.snapshot is None and wanted:
            self.take(model, step)
            if step > 1:
                logger.warning(
                    "the base of drift/* is taken at step %d (a resumed run?): drift is measured "
                    "from here, not from the start of training; call set_base(<starting "
                    "checkpoint>) before training to measure the whole fine-tune",
                    step,
                )

    def follow(self, model: nn.Module, changed: str, step: int) -> None:
        """Re-take the base from ``model`` when the parameters ``changed`` (a description, ``""``
        when they did not), with one warning, as the interval snapshot is re-taken."""
        if changed:
            logger.warning(
                "model parameters changed since the base was taken (%s); drift/* is measured "
                "from the weights at step %d from now on",
                changed,
                step,
            )
            self.take(model, step)

    def clear(self, keep_explicit: bool = True) -> None:
        """Forget an automatically taken base (and with ``keep_explicit=False`` any base)."""
        self.failed = False
        if not (keep_explicit and self.explicit):
            self.snapshot, self.explicit, self.pending, self.step = None, False, False, None

    def needs_work(self, wanted: bool) -> bool:
        """Whether :meth:`resolve` or :meth:`take` is due (O(1): called at every step)."""
        if self.failed:
            return False
        return self.pending or (self.snapshot is None and wanted)

    def state(self) -> dict[str, Any]:
        """``{"base", "base_param_dtypes", "base_shards", "base_uid"}`` for
        ``state_dict(include_snapshot=True)``."""
        if self.snapshot is None:
            return {}
        layout = self.snapshot.layout_state()
        return {
            "base": self.snapshot.state_dict(),
            "base_param_dtypes": layout["param_dtypes"],
            "base_shards": layout["shards"],
            "base_uid": self.snapshot.uid,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (pending: checked against the model at the next call)."""
        snap = ParameterSnapshot.restored(
            state["base"], state.get("base_param_dtypes", {}), state.get("base_shards", {}),
            device=self.device, uid=state.get("base_uid"),
        )
        self.snapshot, self.explicit, self.pending, self.step = snap, True, True, None
        self.failed, self.restored = False, True
