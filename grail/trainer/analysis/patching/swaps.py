"""Swap weights for an extra forward pass and put every bit back, also when the pass fails.

The context managers:

* :func:`analysis_mode` - ``torch.no_grad()``, every module in eval mode (dropout would make
  identical weights look different), and on exit each module's own ``training`` flag and the
  global CPU and CUDA RNG states exactly as they were (under DeepSpeed ZeRO-3 it also releases
  the whole copies of parameters, so none of a patched partition outlives the analysis).
* :class:`SelectPatch` - every analysed parameter becomes ``W_new`` or ``W_old`` entry by entry
  (a magnitude or random mask). A masked update is an element-wise *selection* between two values
  that already exist, so the patch swaps the dropped entries between the parameter and the
  snapshot and swaps them back afterwards: no copy of the model, exact by construction. Undoing
  recomputes the mask, which is why a mask may depend only on ``|W_new - W_old|`` and on the
  position. Where the snapshot's dtype differs from the parameter's (a bf16 snapshot of an fp32
  model) the dropped values are saved instead and the snapshot is left alone. With ``fused=True``
  each CPU tensor is moved in one compiled pass that evaluates the masks itself
  (:func:`~grail.trainer.analysis.kernels.select_swap`, for magnitude and random masks; 2-3x
  faster than the chunked eager ops); whatever it declines takes the eager path.
* :class:`~.module_patch.ModulePatch` - arbitrary new values (DARE rescaling, low-rank
  truncation) written per module; re-exported here.

Everything runs on the parameters' own devices; snapshot chunks are brought over as needed.

Example:
    >>> import torch
    >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    >>> from grail.trainer.analysis.ops.masks import magnitude_drop
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> old = ParameterSnapshot(model)
    >>> w_old = model.weight.detach().clone()
    >>> with torch.no_grad():
    ...     model.weight += torch.tensor([[1e-3, 1.0]])
    >>> w_new = model.weight.detach().clone()
    >>> delta = old.compute_delta(ParameterSnapshot.live(model))
    >>> with analysis_mode(model), SelectPatch(delta, magnitude_drop(0.1)):
    ...     model.weight[0, 0] == w_old[0, 0], model.weight[0, 1] == w_new[0, 1]
    (tensor(True), tensor(True))
    >>> torch.equal(model.weight, w_new), torch.equal(old.data["weight"], w_old)
    (True, True)
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..core import zero
from ..core.scratch import ScratchBuffers
from ..core.snapshot import ParameterDelta, float32_delta_
from ..core.stats import chunk_numel
from ..ops.masks import NO_DROP, DropFn, Mask, as_mask, pack_mask
from .module_patch import ModulePatch
from .swap_steps import SwapSteps, _Patched

__all__ = ["ModulePatch", "SelectPatch", "analysis_mode"]  # ModulePatch: from .module_patch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def analysis_mode(model: nn.Module) -> Iterator[None]:
    """no_grad + eval for the duration; restores training flags and RNG states on exit."""
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        zero.release(model)


def _pack_on(device: torch.device) -> bool:
    """Keep swap masks packed for the undo (host memory), or recompute them (accelerators)."""
    return device.type == "cpu"


def _timed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Time a patch operation as the work of its kernel decision (``fused``), for the "auto"
    compile policy (:func:`~grail.trainer.analysis.kernels.timed`)."""

    @functools.wraps(method)
    def run(self: SelectPatch, *args: Any, **kwargs: Any) -> Any:
        with kernels.timed(self.fused):
            return method(self, *args, **kwargs)

    return run


class SelectPatch(SwapSteps):
    """Within the context, each parameter equals ``W_new`` where ``drop`` is 0 and ``W_old``
    where it is -1 (see module docstring). ``drop`` is a
    :class:`~grail.trainer.analysis.ops.masks.Mask` or any function with the
    :data:`~grail.trainer.analysis.ops.masks.DropFn` signature (taken as a mask without a spec).

    When parameter and snapshot share a dtype, dropped entries are exchanged between them with
    an XOR swap of their bit patterns (``x = (p ^ s) & m; p ^= x; s ^= x``): three integer ops,
    no indices, no copy, an involution. Undoing swaps the same entries back: on the CPU the mask
    is kept packed (one bit an entry, 1/32 of a float32 model), on an accelerator it is
    recomputed from ``|W_new - W_old|``, which the swap leaves unchanged (device memory stays
    O(one chunk)). Entries the update did not change may be swapped too: their values are equal.
    Otherwise (snapshot dtype differs) the dropped changed values are saved and written back.

    ``fused`` lets :func:`~grail.trainer.analysis.kernels.select_swap` move whole CPU tensors
    in one compiled pass when the mask declares a spec
    (:attr:`~grail.trainer.analysis.ops.masks.Mask.spec`; such records keep no packed mask:
    undoing recomputes it in the same pass). A tensor the kernel declines, at any step,
    continues on the eager path from the state it is in. A
    :class:`~grail.trainer.analysis.kernels.Use` as ``fused`` also times the patch's work for
    the ``"auto"`` compile policy.

    ``count_dropped`` / ``count_changed`` turn off the counts behind :meth:`dropped_count` and
    :meth:`changed_count` when they are not needed: a position-only mask (such as
    :func:`~grail.trainer.analysis.ops.masks.random_drop`) then never computes the delta at all.
    :meth:`switch` moves to another mask in one pass, without going back to ``W_new`` between.
    The steps on one chunk or slice come from :class:`~.swap_steps.SwapSteps`.
    """

    def __init__(
        self,
        delta: ParameterDelta,
        drop: Mask | DropFn,
        *,
        count_dropped: bool = True,
        count_changed: bool = True,
        fused: bool | kernels.Use = False,
    ) -> None:
        self.delta = delta
        self.drop = as_mask(drop)
        self.count_dropped = count_dropped
        self.count_changed = count_changed
        self.fused = fused
        self._done: list[_Patched] = []
        self._scratch = ScratchBuffers(chunk_numel)
        self._dropped: list[torch.Tensor] = []
        self._changed: list[torch.Tensor] = []

    def changed_count(self) -> int:
        """Entries whose value differs between ``W_new`` and ``W_old``, counted like
        :meth:`dropped_count`."""
        if not self.count_changed:
            raise RuntimeError("changed entries are not counted: pass count_changed=True")
        if not self._changed:
            return 0
        return int(torch.stack([t.cpu() for t in self._changed]).sum(dtype=torch.int64))

    def dropped_count(self) -> int:
        """Entries (changed or not) that the mask sends back to ``W_old``, counted while
        patching: this rank's local entries, replicated tensors on their owner rank only."""
        if not self.count_dropped:
            raise RuntimeError("dropped entries are not counted: pass count_dropped=True")
        if not self._dropped:
            return 0
        return int(torch.stack([t.cpu() for t in self._dropped]).sum(dtype=torch.int64))

    @_timed
    def __enter__(self) -> SelectPatch:
        self.delta.old.synchronize()
        try:
            for name in self.delta.names:
                self._patch_tensor(name)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _patch_tensor(self, name: str) -> None:
        p = self.delta.new.data[name]
        numel = p.numel()
        if not self.fused or p.device.type != "cpu":  # the kernels are CPU kernels
            self._patch_range(name, 0, numel)
            return
        # compiled in slices: a mask whose rule changes inside a tensor (where an exact top-k
        # splits its ties) sends only the slice holding the change to the chunks
        step = kernels.settings.split_numel
        for start in range(0, numel, step):
            stop = min(numel, start + step)
            after = self._spec(name, start, stop, self.drop)
            if self._fused_swap(name, start, stop, NO_DROP, after, count=True):
                self._done.append(_Patched(name, start, stop, drop=self.drop, fused=True))
            else:
                self._patch_range(name, start, stop)

    def _patch_range(self, name: str, begin: int, end: int) -> None:
        """Entries ``begin:end`` of a tensor to the mask, chunk by chunk on the eager path."""
        p, s = self._views(name)
        step = chunk_numel(p.device)
        for start in range(begin, end, step):
            stop = min(start + step, end)
            pc, sc = p[start:stop], s[start:stop]
            sd = sc.to(pc.device, non_blocking=True) if sc.device != pc.device else sc
            d, m, _, raw = self._buffers(pc.device, pc.numel())
            m = self._mask(name, start, pc, sd, self.drop, m, count=True)
            if pc.dtype == sc.dtype:
                packed = pack_mask(m, d.view(torch.int32)) if _pack_on(pc.device) else None
                self._xor_swap(pc, sd, m, raw)
                # recorded before anything else can fail, so that the undo sees this chunk
                self._done.append(_Patched(name, start, stop, packed=packed, drop=self.drop))
                if sd is not sc:
                    sc.copy_(sd, non_blocking=sc.is_pinned())
            else:
                # values are saved here: only the changed entries are worth saving
                float32_delta_(d, pc, sd)
                m.bitwise_and_(d.abs_().view(torch.int32).neg_().bitwise_right_shift_(31))
                idx = m.nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                self._done.append(_Patched(name, start, stop, idx, pc[idx]))
                pc[idx] = sd[idx].to(pc.dtype)

    @_timed
    def switch(
        self, drop: Mask | DropFn, *, count_dropped: bool = False, count_changed: bool = False
    ) -> None:
        """Within the context, move from the current mask to ``drop``'s: the same state as
        leaving and entering again with ``drop``, but each chunk is visited once and swapped
        only where the two masks differ. Counts restart with the given flags.

        >>> import torch
        >>> from grail.trainer.analysis.core.snapshot import ParameterSnapshot
        >>> from grail.trainer.analysis.ops.masks import magnitude_drop
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> old, w_old = ParameterSnapshot(model), model.weight.detach().clone()
        >>> with torch.no_grad():
        ...     model.weight += torch.tensor([[1e-3, 1.0]])
        >>> w_new = model.weight.detach().clone()
        >>> delta = old.compute_delta(ParameterSnapshot.live(model))
        >>> with torch.no_grad(), SelectPatch(delta, magnitude_drop(0.1)) as patch:
        ...     patch.switch(magnitude_drop(10.0))  # now everything is W_old
        ...     torch.equal(model.weight, w_old)
        True
        >>> torch.equal(model.weight, w_new)
        True
        """
        drop = as_mask(drop)
        self.drop, self.count_dropped, self.count_changed = drop, count_dropped, count_changed
        self._dropped, self._changed = [], []
        data_new, data_old = self.delta.new.data, self.delta.old.data
        if any(data_new[n].dtype != data_old[n].dtype for n in self.delta.names):
            # dropped values were saved, not swapped (records restore themselves): redo
            self._restore()
            self.__enter__()
            return
        try:
            moved: list[_Patched] = []  # fused records first, one pass each ...
            records: list[_Patched] = []  # ... the rest chunk by chunk
            for rec in self._done:
                if not rec.fused:
                    records.append(rec)
                elif self._fused_swap(
                    rec.name, rec.start, rec.stop, self._rec_spec(rec), self._rec_spec(rec, drop),
                    count=True,
                ):
                    rec.drop = drop
                    moved.append(rec)
                else:
                    records.extend(self._chunk_records(rec))
            self._done = moved + records  # before any chunk moves: the undo sees them all
            for rec in records:
                p, s = self._views(rec.name)
                pc, sc = p[rec.start : rec.stop], s[rec.start : rec.stop]
                sd = sc.to(pc.device, non_blocking=True) if sc.device != pc.device else sc
                d, before, after, raw = self._buffers(pc.device, pc.numel())
                before = self._current_mask(rec, pc, sd, before)
                after = self._mask(rec.name, rec.start, pc, sd, drop, after, count=True)
                packed = pack_mask(after, d.view(torch.int32)) if rec.packed is not None else None
                self._xor_swap(pc, sd, before.bitwise_xor_(after), raw)
                rec.packed, rec.drop = packed, drop  # before anything else can fail
                if sd is not sc:
                    sc.copy_(sd, non_blocking=sc.is_pinned())
        except BaseException:
            self._restore()
            raise

    @_timed
    def _restore(self) -> None:
        devices = {torch.device(t.device) for t in self.delta.new.data.values()}
        try:
            self._undo()
        finally:
            for device in devices:  # pinned write-backs of the snapshot are asynchronous
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

    def _undo(self) -> None:
        while self._done:
            rec = self._done.pop()
            if rec.fused:
                if not self._fused_swap(
                    rec.name, rec.start, rec.stop, self._rec_spec(rec), NO_DROP, count=False
                ):
                    self._done += self._chunk_records(rec)
                continue
            p, s = self._views(rec.name)
            pc, sc = p[rec.start : rec.stop], s[rec.start : rec.stop]
            if rec.index is not None:
                pc[rec.index] = rec.saved
                continue
            sd = sc.to(pc.device) if sc.device != pc.device else sc
            _, m, _, raw = self._buffers(pc.device, pc.numel())
            self._xor_swap(pc, sd, self._current_mask(rec, pc, sd, m), raw)
            if sd is not sc:
                sc.copy_(sd, non_blocking=sc.is_pinned())

