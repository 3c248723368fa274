r"""When the compiled kernels run, and how each one is compiled: the one place of compile policy.

Modes (``AnalysisConfig.fused_kernels``, each computer's ``fused``): ``False`` never compiles;
``True`` uses the kernels for every measurement of at least
:attr:`KernelSettings.min_total_numel` entries, paying the compile at the first; ``"auto"`` (the
default) starts eager and compiles a kernel family once compiling has paid for itself.

The break-even rule of ``"auto"``. Computers ask :func:`use` per measurement and family
(``change``, ``moments``, ``adam``, ``swap``, ``rows``: one file each) and time the work its
kernels would replace with :func:`~.ledger.timed`, in CPU seconds per intra-op thread (about
its time on an idle machine, also when the machine is shared: see
:func:`~.ledger.work_seconds`). Compiling family ``f`` costs its ``n_f`` kernels
``n_f * kernel_seconds``, plus ``startup_seconds`` once per process (the first compile imports
Inductor and checks the C++ toolchain): cold-cache, idle-machine estimates; the mean of the
compiles measured in the process replaces ``kernel_seconds`` when lower (a warm cache). Eager,
the family would save ``s_f = phi_f e_f`` per measurement, with ``e_f`` its cheapest eager
measurement so far and ``phi_f`` the fraction the kernels save (a prior measured by
``benchmarks/bench_compile_policy.py``, as are the costs); ``s_f = 0`` until two eager
measurements are known. At the ``m``-th measurement of a family, with ``H = settings.horizon``:

.. math::

    R = H - m + 1 \ (m \le H), \quad R = m - 1 \ (m > H);\qquad
    \mathrm{net}_g = s_g R - n_g\,\mathrm{kernel\_seconds};\qquad
    S = \{g : \mathrm{net}_g \ge 0\}

over the families still eager; every family of ``S`` switches to the kernels for the rest of the
process when :math:`\sum_{g \in S} \mathrm{net}_g \ge` ``startup_seconds`` (0 once anything
compiled). ``R`` counts the measurements the saving is predicted over: the rest of the first
``H`` (a compile inside them must pay back inside them, so the default costs no more than the
eager path over a run's first ``H`` measurements), then as many as have passed (ski rental:
at most twice the cost of the best choice in hindsight, plus two measurements' saving).

Decisions where the design is silent:

* Under ``"auto"`` a family's saving is predicted from its cheapest eager measurement once two
  are known (the first of a process also warms caches and allocators), so the kernels run from
  the third measurement at the earliest, unless the estimated costs are zero; a measurement
  below ``min_total_numel`` is eager and not counted.
* Decisions depend on timings, so processes and ranks may switch at different measurements.
  Neither path issues a collective (statistics are all-reduced the same way), so ranks need not
  agree; the paths agree to float32 rounding (counts exactly).
* Measurements are told apart by ``step`` (computers pass ``context.step``): asking again for a
  family at the same step (adam's joint pass, the reference shared by sparse and low-rank
  quality) counts once and gets the same answer.
* :meth:`KernelSettings.override` gives its block a fresh ledger, restored after, so that tests
  and benchmarks decide from their own measurements.

Example:
    >>> from grail.trainer.analysis.kernels import settings, use, worth_it
    >>> worth_it(1000)
    False
    >>> with settings.override(min_total_numel=0):
    ...     bool(use("change", 1000, True)), bool(use("change", 1000, "auto"))
    (True, False)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import ledger
from .ledger import Family, Use, timed

__all__ = [
    "MODES",
    "Kernel",
    "KernelSettings",
    "Use",
    "constants",
    "disabled_reason",
    "floats",
    "report",
    "settings",
    "slices",
    "timed",
    "usable",
    "use",
    "worth_it",
]

logger = logging.getLogger(__name__)

#: Accepted values of ``fused_kernels`` / ``fused``.
MODES = (True, False, "auto")


@dataclass
class KernelSettings:
    """Size limits and break-even estimates of the compiled paths (one process-wide instance:
    :data:`settings`)."""

    #: Computers use the kernels only when a measurement covers at least this many entries:
    #: below it the eager path takes tens of milliseconds, and compiling (seconds, more on a
    #: cold cache) would take hundreds of measurements to pay back.
    min_total_numel: int = 1 << 24
    #: Smaller tensors take the eager path (Dynamo specialises sizes 0 and 1 instead of sharing
    #: the dynamic kernel).
    min_numel: int = 2
    #: Tensors below this size are concatenated per group and computed in one call (a call
    #: costs tens of microseconds, as much as the loop over ~10**5 entries).
    pool_numel: int = 1 << 16
    #: Queues of pooled small tensors flush at this many entries.
    pool_flush: int = 1 << 20
    #: Entries per kernel call: int32 counts stay exact.
    slice_numel: int = 1 << 30
    #: Entries per call where a tensor is split on purpose: the compiled swap moves a tensor in
    #: slices this long (a mask whose rule changes inside the tensor - an exact top-k splitting
    #: its ties - sends only one slice to the eager chunks), and the compiled comparison upcasts
    #: half-precision logits this many at a time.
    split_numel: int = 1 << 22
    #: Distinct input signatures compiled per kernel; later ones use the eager path. Dynamo
    #: keeps a bounded cache per function and fails (``fullgraph``) beyond it.
    max_signatures: int = 6
    #: "auto": measurements a run is assumed to last at least (a compile inside them must pay
    #: back inside them); 0 is plain ski rental.
    horizon: int = 10
    #: "auto": seconds of a process's first compile beyond its kernel: importing Dynamo and
    #: Inductor and checking the C++ toolchain (cold cache, 2 CPU cores; see COMPILE_POLICY.md).
    startup_seconds: float = 10.0
    #: "auto": seconds to compile one kernel with a cold cache (the mean of the compiles measured
    #: in the process replaces it when lower).
    kernel_seconds: float = 1.5

    @contextlib.contextmanager
    def override(self, **values: Any) -> Iterator[KernelSettings]:
        """Change some settings inside a ``with`` block, restoring them after; the block starts
        with an empty ledger of measured costs (restored after too)."""
        saved = dataclasses.asdict(self)
        unknown = set(values) - set(saved)
        if unknown:
            raise TypeError(f"unknown kernel settings {sorted(unknown)}; valid: {sorted(saved)}")
        for key, value in values.items():
            setattr(self, key, value)
        try:
            with ledger.fresh():
                yield self
        finally:
            for key, value in saved.items():
                setattr(self, key, value)


settings = KernelSettings()

#: Inductor picks another reduction form for rows wider than this and guards on the choice:
#: row-wise kernels are compiled (and counted as a signature) once for each side of it.
WIDE_ROWS = 4096

_failure: list[str] = []  # the first compiler failure of this process, if any

#: Eager measurements a family's saving is predicted from: the first of a process also warms
#: caches and allocators, so it alone would overstate the saving.
_HISTORY = 2

#: Per family: the fraction of its timed eager work the kernels save, and how many kernels a
#: measurement compiles, as measured by benchmarks/bench_compile_policy.py (CPU, 2 threads):
#: change 0.52, swap 0.51, rows 0.16 (its timed work includes argmax and row checks the kernels
#: leave); gradient and Adam together 0.72 (their joint pass), taken as 0.6 each.
_PRIORS: dict[str, tuple[float, int]] = {
    "change": (0.5, 1),
    "moments": (0.6, 2),
    "adam": (0.6, 1),
    "swap": (0.5, 2),
    "rows": (0.15, 2),
}


def worth_it(numel: int) -> bool:
    """Whether a measurement of ``numel`` entries is large enough for the kernels (see
    :attr:`KernelSettings.min_total_numel`)."""
    return numel >= settings.min_total_numel


def disabled_reason() -> str | None:
    """Why the kernels are off for the rest of the process (a compiler error), else ``None``."""
    return _failure[0] if _failure else None


def use(family: str, numel: int, mode: bool | str = True, step: Any = None) -> Use:
    """Whether ``family``'s kernels run for a measurement of ``numel`` entries in ``mode``
    (``True``, ``False`` or ``"auto"``, see module docstring). ``step`` identifies the
    measurement (``None``: each call is one)."""
    if mode not in MODES or not isinstance(mode, (bool, str)):
        raise ValueError(f"fused kernels mode must be one of {MODES}, got {mode!r}")
    if family not in _PRIORS:
        raise ValueError(f"unknown kernel family {family!r}; known: {sorted(_PRIORS)}")
    if mode is False or not worth_it(numel) or _failure:
        return Use(None, False)
    book = ledger.current()
    with book.lock:
        fam, new = book.begin(family, *_PRIORS[family], step=step)
        if new:
            fam.decision = mode is True or fam.switched_at is not None or _break_even(book, fam)
            fam.compiled_measurements += fam.decision
    decision = Use(family, fam.decision)
    ledger.bind(decision)
    return decision


def _break_even(book: ledger.Ledger, fam: Family) -> bool:
    """The rule of the module docstring, for ``fam``'s new measurement; switches every family
    it chooses."""
    m, h = fam.measurements, settings.horizon
    remaining = h - m + 1 if m <= h else m - 1
    for f in book.families.values():
        if f.step != fam.step:  # not yet asked in this measurement: its last one is complete
            f.close()
    done = book.compiles[1:]  # the first compile carries the startup
    per_kernel = min(settings.kernel_seconds, sum(done) / len(done) if done else math.inf)
    net = {
        name: _saving(f) * remaining - f.kernels * per_kernel
        for name, f in book.families.items()
        if f.switched_at is None
    }
    chosen = [name for name, v in net.items() if v >= 0.0]
    startup = 0.0 if book.compiles else settings.startup_seconds
    if not chosen or sum(net[name] for name in chosen) < startup:
        return False
    for name in chosen:
        f = book.families[name]
        f.switched_at = f.measurements + (f is not fam)  # the others: from their next one
    logger.debug(
        "grail-analysis: compiling the %s kernels from measurement %d (predicted saving %s s "
        "per measurement over %d; estimated cost %.1f s per kernel%s)",
        ", ".join(chosen), m,
        ", ".join(f"{_saving(book.families[n]):.3f}" for n in chosen),
        remaining, per_kernel, f" + {startup:.1f} s startup" if startup else "",
    )  # fmt: skip
    return True


def _saving(fam: Family) -> float:
    """The predicted saving per measurement, once ``_HISTORY`` eager measurements are known."""
    return fam.predicted_saving() if fam.eager_measurements >= _HISTORY else 0.0


def report() -> dict[str, dict[str, Any]]:
    """What ``"auto"`` knows, per family seen since the last :meth:`KernelSettings.override`
    (benchmarks, debugging): measurements, eager and compiled work seconds, compile seconds,
    from which measurement it uses the kernels, and its predicted saving per measurement."""
    return {name: fam.summary() for name, fam in ledger.current().families.items()}


def constants(values: Sequence[float]) -> torch.Tensor:
    """A packed-constants argument: float32, its size static for the compiler."""
    t = torch.tensor(list(values), dtype=torch.float32)
    torch._dynamo.mark_static(t)
    return t


class Kernel:
    """A function compiled on first use, with a bounded set of input signatures.

    Its first ``n_data`` arguments are 1-D data tensors (dynamic sizes), the rest packed
    constants from :func:`constants` (static sizes).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        n_data: int,
        probe: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] | None = None,
    ) -> None:
        self._fn = fn
        self._n_data = n_data
        self._probe = probe
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._signatures: set[tuple[object, ...]] = set()
        self._lock = threading.Lock()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor | None:
        """The compiled result, or ``None`` where the caller must compute it otherwise.

        Any error here (a graph variant Dynamo compiles on its own, for a guard the signature
        does not cover) turns the kernels off like a failed compile: results never depend on
        the compiler working.
        """
        if not self.ready(*args):
            return None
        try:
            with torch.no_grad():
                return self._compiled(*args)  # type: ignore[misc]
        except Exception as exc:  # a recompile the signature did not foresee, or worse
            fail(exc)
            return None

    def ready(self, *args: torch.Tensor) -> bool:
        """Whether a call with these arguments' signature will run compiled (compiles now if
        needed); lets a batch queue small tensors knowing the queue will not be refused."""
        if _failure:
            return False
        n = self._n_data
        # what Dynamo guards on besides shapes: thread count, inference mode, dtypes, and the
        # constants' static sizes (grad mode is always off: calls run under no_grad)
        key = (torch.get_num_threads(), torch.is_inference_mode_enabled())
        key += (*(a.dtype for a in args[:n]), *(a.numel() for a in args[n:]))
        if self._probe is not None:  # row-wise kernels: Inductor guards on the row width
            key += (args[0].shape[-1] > WIDE_ROWS,)
        if key in self._signatures:
            return True
        with self._lock:
            return self._compile_for(key, args)

    def _compile_for(self, key: tuple[object, ...], args: Sequence[torch.Tensor]) -> bool:
        if key in self._signatures:
            return True
        if len(self._signatures) >= settings.max_signatures:
            return False
        if not ledger.current().compiles:
            logger.info("grail-analysis: compiling the analysis kernels (once per process)")
        start, start_work = time.perf_counter(), ledger.work_seconds()
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self._fn, dynamic=True, fullgraph=True)
            # Inductor picks the loop form (parallel or not) from the sizes it first sees, so
            # compile on inputs as large as a typical weight, then check the result once.
            n = self._n_data
            if self._probe is not None:
                probe = self._probe(args)
            else:
                probe = [torch.ones(1 << 20, dtype=a.dtype) for a in args[:n]] + list(args[n:])
            with torch.no_grad():
                out = self._compiled(*probe)
            outs = out if isinstance(out, tuple) else (out,)
            if not all(bool(torch.isfinite(o).all()) for o in outs):
                raise RuntimeError("the compiled kernel returned non-finite values on its probe")
        except Exception as exc:  # any compiler failure means "use the eager path"
            fail(exc)
            return False
        finally:
            work = ledger.work_seconds() - start_work
            ledger.current().compiled(time.perf_counter() - start, work)
        self._signatures.add(key)
        return True


def fail(exc: Exception) -> None:
    """Turn the kernels off for the rest of the process, with one warning."""
    if _failure:
        return
    _failure.append(f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    logger.warning(
        "grail-analysis: torch.compile failed (%s); parameter change, gradient and Adam "
        "statistics and sparse-quality swaps and comparisons use the eager path from now on, "
        "several times slower. AnalysisConfig(fused_kernels=False) skips the attempt.",
        _failure[0],
    )


def usable(min_numel: int, *tensors: torch.Tensor) -> bool:
    """CPU, 1-D, contiguous, of one size of at least ``min_numel`` (and 2: Dynamo specialises
    sizes 0 and 1)."""
    n = tensors[0].numel()
    if n < max(min_numel, 2):
        return False
    for t in tensors:  # a plain loop: this runs for every parameter of every measurement
        if t.dim() != 1 or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
            return False
    return True


def floats(*values: Any) -> bool:
    """Python floats (a bias correction held on a device is not: that run is not on CPU)."""
    return all(isinstance(v, float) for v in values)


def slices(n: int) -> list[slice]:
    """At most ``settings.slice_numel`` entries each, of equal sizes (no tiny tail)."""
    parts = -(-n // settings.slice_numel)
    size = -(-n // parts)
    return [slice(start, start + size) for start in range(0, n, size)]
