"""What the ``"auto"`` compile policy has measured in this process: per kernel family, the work
done per measurement on each path, and every compile (:mod:`.policy` decides from it).

A :class:`Use` is one measurement's decision for one family, passed where a ``fused`` flag goes;
:func:`timed` blocks around the work it governs add their seconds to the family's current
measurement (nested blocks count once; time spent compiling inside a block is counted apart),
on the :func:`work_seconds` clock.
A computer whose whole ``compute`` is that work decorates it with ``@timed()``: the block then
times the first decision taken inside it.

Example:
    >>> ledger = Ledger()
    >>> fam, new = ledger.begin("change", saving=0.5, kernels=1, step=7)
    >>> fam.measurements, new, ledger.begin("change", 0.5, 1, step=7)[1]
    (1, True, False)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Family", "Ledger", "Use", "bind", "current", "fresh", "timed", "work_seconds"]

_clock = threading.local()  # .block: the open timed block of this thread, else None


class Use:
    """One measurement's decision for one family: true when the kernels run."""

    __slots__ = ("compiled", "family")

    def __init__(self, family: str | None, compiled: bool) -> None:
        self.family = family  # None: nothing is recorded
        self.compiled = compiled

    def __bool__(self) -> bool:
        return self.compiled

    def __repr__(self) -> str:
        return f"Use({self.family!r}, compiled={self.compiled})"


@dataclass
class Family:
    """One family's measured history (work in :func:`work_seconds`, compiling excluded; compile
    seconds wall-clock)."""

    saving: float  # fraction of the eager work the kernels save (a prior)
    kernels: int  # kernels a measurement compiles (a prior)
    measurements: int = 0
    step: Any = field(default=None, repr=False)
    decision: bool = False  # the current measurement's
    switched_at: int | None = None  # the measurement from which the kernels run
    open_seconds: float = 0.0  # eager work of the current measurement so far
    eager_measurements: int = 0
    eager_seconds: float = 0.0
    eager_min: float = math.inf
    compiled_measurements: int = 0
    compiled_seconds: float = 0.0
    compile_seconds: float = 0.0

    def close(self) -> None:
        """End the current measurement: its eager work, if any, joins the history."""
        if self.open_seconds > 0.0:
            self.eager_measurements += 1
            self.eager_seconds += self.open_seconds
            self.eager_min = min(self.eager_min, self.open_seconds)
        self.open_seconds = 0.0

    def predicted_saving(self) -> float:
        """Seconds the kernels would save per measurement: the prior fraction of the cheapest
        eager measurement so far (robust to a slow first one), 0 before any."""
        return self.saving * self.eager_min if self.eager_measurements else 0.0

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("step", "decision")}
        out["predicted_saving"] = self.predicted_saving()
        return out


class Ledger:
    """Every family's history, and the seconds of each compile of this process."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        self.compiles: list[float] = []
        self.lock = threading.Lock()

    def begin(self, name: str, saving: float, kernels: int, step: Any) -> tuple[Family, bool]:
        """The family and whether this is a new measurement of it (``step`` ``None``: always;
        else when it differs from the last one); a new one closes the previous."""
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = Family(saving, kernels)
        if step is not None and fam.measurements and step == fam.step:
            return fam, False
        fam.close()
        fam.measurements += 1
        fam.step = step
        return fam, True

    def record(self, use: Use, seconds: float, compiling: float) -> None:
        fam = self.families.get(use.family)  # type: ignore[arg-type]
        if fam is None:
            return
        fam.compile_seconds += compiling
        if use.compiled:
            fam.compiled_seconds += seconds
        else:
            fam.open_seconds += seconds

    def compiled(self, seconds: float, work: float | None = None) -> None:
        """A compile took ``seconds`` of wall-clock time, ``work`` on the :func:`work_seconds`
        clock (default: ``seconds``), which the open :func:`timed` block, if any, counts
        apart."""
        self.compiles.append(seconds)
        block = _clock.__dict__.get("block")
        if block is not None:
            block.compiling += seconds if work is None else work


_current = Ledger()


def current() -> Ledger:
    """The ledger decisions are made from."""
    return _current


@contextlib.contextmanager
def fresh() -> Iterator[Ledger]:
    """An empty ledger inside the block, the previous one restored after."""
    global _current
    saved, _current = _current, Ledger()
    try:
        yield _current
    finally:
        _current = saved


class _Block:
    """An open :func:`timed` block: the decision it times and the compiling inside it."""

    __slots__ = ("compiling", "use")

    def __init__(self, use: Use | None) -> None:
        self.use = use
        self.compiling = 0.0


@contextlib.contextmanager
def timed(fused: object = None) -> Iterator[None]:
    """Time the block (context manager or decorator) as the work of a kernel family: of
    ``fused`` when it is a recording :class:`Use`, or (``fused=None``) of the first recording
    decision taken inside the block. A plain flag, a nested block or a block without a decision
    records nothing; time spent compiling inside is counted apart."""
    if _clock.__dict__.get("block") is not None:
        yield
        return
    if fused is not None and not (isinstance(fused, Use) and fused.family is not None):
        yield
        return
    block = _clock.block = _Block(fused)  # type: ignore[arg-type]
    start = work_seconds()
    ledger = _current
    try:
        yield
    finally:
        _clock.block = None
        if block.use is not None:
            seconds = work_seconds() - start - block.compiling
            ledger.record(block.use, max(seconds, 0.0), block.compiling)


def work_seconds() -> float:
    """The clock work is timed on: CPU seconds of this process (every thread) divided by the
    intra-op thread count, i.e. about the wall-clock time of the work on an otherwise idle
    machine. Wall-clock time would also count the waiting on a shared or oversubscribed
    machine (measured: 5.8 s wall for 1.3 CPU seconds of a 2-thread measurement at load 15),
    making compiling look cheaper than its estimates, which are idle-machine times."""
    return time.process_time() / max(torch.get_num_threads(), 1)


def bind(use: Use) -> None:
    """Let the open unbound :func:`timed` block, if any, time ``use``'s work."""
    block = _clock.__dict__.get("block")
    if block is not None and block.use is None and use.family is not None:
        block.use = use
