"""``TensorBoardSink``: the analysis as TensorBoard scalars and histograms.

Each measurement becomes ``SummaryWriter.add_scalar(prefix + key, value, step)`` for every
metric and ``add_histogram(prefix + name, values, step)`` for every histogram, written through
:class:`torch.utils.tensorboard.SummaryWriter` (which needs the ``tensorboard`` package: the
``tensorboard`` extra). Open the folder with ``tensorboard --logdir LOG_DIR``.

Decisions where the design is silent:

* The writer is flushed after every measurement, as :class:`~.sinks.JsonlSink` flushes every
  line: measurements are rare (every ``interval`` steps) and a crash then loses none of them.
  ``SummaryWriter``'s own background flush would otherwise hold them for up to two minutes.
* Non-finite scalars are written as they are (TensorBoard shows NaN and Inf); a value that is
  not a number at all is skipped with one warning. Histograms get their finite values only
  (:func:`~.sinks.finite_values`); one with none left is skipped.
* Training comes first: once constructed, the sink never raises into the training loop; a
  failing write is logged once per kind and the measurement dropped. A ``log_dir`` that cannot
  be created raises at construction.
* ``log_dir=None`` takes ``SummaryWriter``'s default, ``runs/<date>_<host>``.

Example:
    >>> import tempfile
    >>> with TensorBoardSink(tempfile.mkdtemp(), prefix="analysis/") as sink:
    ...     sink.log({"param_change/norm_l2": 0.5}, step=10,
    ...              histograms={"gradient/abs_grad": [0.1, 0.2, float("nan")]})
    >>> sink.prefix
    'analysis/'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ..core.logonce import LogOnce
from .sinks import FAILURE_SUFFIX, ClosingSink, finite_values

__all__ = ["TensorBoardSink"]

logger = logging.getLogger(__name__)


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises this when the tensorboard package is missing
        raise ImportError(
            "TensorBoardSink needs the tensorboard package: pip install "
            "'grail-analysis[tensorboard]'"
        ) from err
    return SummaryWriter


class TensorBoardSink(ClosingSink):
    """Write metrics and histograms to a TensorBoard event file (see module docstring).

    Args:
        log_dir: the run's folder (created if missing); ``None`` for ``runs/<date>_<host>``.
        prefix: prepended to every tag, e.g. ``"analysis/"`` beside your own training curves.
        **writer_kwargs: passed on to ``SummaryWriter`` (``comment``, ``max_queue``, ...).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        prefix: str = "",
        **writer_kwargs: Any,
    ) -> None:
        writer_class = _summary_writer_class()
        self.prefix = prefix
        self.writer: Any = writer_class(
            None if log_dir is None else os.fspath(log_dir), **writer_kwargs
        )
        self.log_dir: str = self.writer.get_logdir()
        self._warn = LogOnce(logger, suffix=FAILURE_SUFFIX)

    def log(
        self,
        metrics: Mapping[str, float],
        step: int,
        histograms: Mapping[str, Any] | None = None,
    ) -> None:
        """Add every metric as a scalar and every histogram's finite values at ``step``.

        An empty ``metrics`` writes nothing, histograms included: a loop may call this on
        every step with ``analyzer.last_histograms``, which keeps the last measurement's. A call
        after :meth:`close` is dropped with one warning, never raised into training.
        """
        if not metrics:
            return
        if self.writer is None:
            self._warn.warning("closed", "%r is closed; metrics of step %s and later are "
                               "dropped", self, step)
            return
        wrote = False
        try:
            for key, value in metrics.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    self._warn.warning("value", "metric %r is not a number (%r); not logged",
                                       key, value)
                    continue
                self.writer.add_scalar(f"{self.prefix}{key}", number, int(step))
                wrote = True
            for name, values in (histograms or {}).items():
                finite = finite_values(values)
                if finite is None:
                    continue
                self.writer.add_histogram(f"{self.prefix}{name}", finite, int(step))
                wrote = True
            if wrote:
                self.writer.flush()
        except Exception as err:  # a logging backend must never stop training
            self._warn.warning("write", "TensorBoardSink could not write step %s to %s: %r",
                               step, self.log_dir, err)

    def close(self) -> None:
        """Flush and close the event file; calling it twice is harmless."""
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as err:  # closing must not raise at the end of training either
                self._warn.warning("close", "TensorBoardSink could not close %s: %r",
                                   self.log_dir, err)
            self.writer = None

    def __repr__(self) -> str:
        return f"TensorBoardSink({self.log_dir!r}, prefix={self.prefix!r})"
