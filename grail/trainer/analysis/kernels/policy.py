"""When the compiled kernels run, and how each one is compiled: the one place of compile policy.

:data:`settings` holds the size limits (tests and benchmarks change them with
:meth:`KernelSettings.override`); :class:`Kernel` wraps a plain function compiled on first use
with a bounded set of input signatures; a compiler failure turns every kernel off for the rest
of the process with one warning (:func:`disabled_reason`).

Example:
    >>> from grail.trainer.analysis.kernels import settings, worth_it
    >>> worth_it(1000)
    False
    >>> with settings.override(min_total_numel=0):
    ...     worth_it(1000)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Kernel",
    "KernelSettings",
    "constants",
    "disabled_reason",
    "floats",
    "settings",
    "slices",
    "usable",
    "worth_it",
]

logger = logging.getLogger(__name__)


@dataclass
class KernelSettings:
    """Size limits of the compiled paths (one process-wide instance: :data:`settings`)."""

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
    #: Distinct input signatures compiled per kernel; later ones use the eager path. Dynamo
    #: keeps a bounded cache per function and fails (``fullgraph``) beyond it.
    max_signatures: int = 6

    @contextlib.contextmanager
    def override(self, **values: int) -> Iterator[KernelSettings]:
        """Change some limits inside a ``with`` block, restoring them after."""
        saved = dataclasses.asdict(self)
        unknown = set(values) - set(saved)
        if unknown:
            raise TypeError(f"unknown kernel settings {sorted(unknown)}; valid: {sorted(saved)}")
        for key, value in values.items():
            setattr(self, key, value)
        try:
            yield self
        finally:
            for key, value in saved.items():
                setattr(self, key, value)


settings = KernelSettings()

#: Inductor picks another reduction form for rows wider than this and guards on the choice:
#: row-wise kernels are compiled (and counted as a signature) once for each side of it.
WIDE_ROWS = 4096

_failure: list[str] = []  # the first compiler failure of this process, if any


def worth_it(numel: int) -> bool:
    """Whether a measurement of ``numel`` entries should use the kernels (see
    :attr:`KernelSettings.min_total_numel`)."""
    return numel >= settings.min_total_numel


def disabled_reason() -> str | None:
    """Why the kernels are off for the rest of the process (a compiler error), else ``None``."""
    return _failure[0] if _failure else None


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
