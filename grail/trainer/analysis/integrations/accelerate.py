"""``AccelerateSink``: the analysis into every tracker an ``accelerate.Accelerator`` fronts.

A custom loop built on Accelerate already logs through ``accelerator.log``, which fans out to
the trackers chosen with ``Accelerator(log_with=...)`` and started with
``accelerator.init_trackers(...)``: TensorBoard, wandb, MLflow, Aim, Comet, ClearML, DVCLive,
trackio, or a custom ``GeneralTracker``. This sink sends the analysis the same way::

    accelerator = Accelerator(log_with="tensorboard", project_dir="runs")
    accelerator.init_trackers("my-run")
    sink = AccelerateSink(accelerator, prefix="analysis/")
    ...
    sink.log(analyzer.on_optimizer_step(model, batch, optimizer), step,
             histograms=analyzer.last_histograms)

Scalars: ``accelerator.log({prefix + key: float(value)}, step=step)``; every tracker receives
them (each decides which process writes, as for the user's own logs).

Histograms go, on the main process only, to the trackers that have them, through the object
behind the tracker (``tracker.tracker``): ``tensorboard`` (``SummaryWriter.add_histogram``,
then ``flush``) and ``wandb`` (``run.log({name: wandb.Histogram}, step=step)``). Other trackers
get the scalars only; that is said once at info level. Only finite values are sent
(:func:`~.sinks.finite_values`); a histogram with none left is skipped.

Decisions where the design is silent:

* The accelerator is duck-typed (anything with a callable ``log`` and a ``trackers`` list), so
  this module never imports accelerate.
* No tracker started yet (``accelerator.init_trackers`` not called): the measurement is dropped
  with one warning, as :class:`~.sinks.WandbSink` does without a run. Accelerate starts
  trackers on the main process only, so the other processes drop theirs without one.
* ``close()`` releases nothing: the trackers belong to the accelerator; end them with
  ``accelerator.end_training()``.
* Training comes first: values that are not numbers are skipped and a failing tracker is
  logged once per kind; nothing raises into the loop. A non-accelerator argument raises at
  construction.

Example:
    >>> class Recorder:  # stands in for an Accelerator with one tracker
    ...     trackers = ["a tracker"]
    ...     def log(self, values, step=None):
    ...         print(step, values)
    >>> AccelerateSink(Recorder(), prefix="analysis/").log({"param_change/norm_l2": 0.5}, 10)
    10 {'analysis/param_change/norm_l2': 0.5}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..core.logonce import LogOnce
from .sinks import FAILURE_SUFFIX, finite_values, wandb_histograms

__all__ = ["AccelerateSink"]

logger = logging.getLogger(__name__)


class AccelerateSink:
    """Log through ``accelerator.log`` to every configured tracker (see module docstring).

    Args:
        accelerator: an ``accelerate.Accelerator`` whose trackers are (or will be) started
            with ``init_trackers``.
        prefix: prepended to every key, e.g. ``"analysis/"`` beside your own training curves.
    """

    def __init__(self, accelerator: Any, *, prefix: str = "") -> None:
        if not callable(getattr(accelerator, "log", None)):
            raise TypeError(
                "AccelerateSink needs an accelerate.Accelerator (an object with .log(values, "
                f"step=...)), got {type(accelerator).__name__}"
            )
        self.accelerator = accelerator
        self.prefix = prefix
        self._warn = LogOnce(logger, suffix=FAILURE_SUFFIX)
        self._told = LogOnce(logger)  # which trackers get no histograms (info)

    def log(
        self,
        metrics: Mapping[str, float],
        step: int,
        histograms: Mapping[str, Any] | None = None,
    ) -> None:
        """Send ``metrics`` to every tracker and ``histograms`` to those that support them.

        An empty ``metrics`` sends nothing, histograms included: a loop may call this on every
        step with ``analyzer.last_histograms``, which keeps the last measurement's.
        """
        if not metrics:
            return
        payload: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                payload[f"{self.prefix}{key}"] = float(value)
            except (TypeError, ValueError):
                self._warn.warning("value", "metric %r is not a number (%r); not logged", key,
                                   value)
        trackers = list(getattr(self.accelerator, "trackers", None) or ())
        if not trackers:
            if getattr(self.accelerator, "is_main_process", True):  # others never have any
                self._warn.warning(
                    "no-trackers",
                    "AccelerateSink: the accelerator has no trackers, metrics are dropped: "
                    "create it with Accelerator(log_with=...) and call "
                    "accelerator.init_trackers(...) first",
                )
            return
        if payload:
            try:
                self.accelerator.log(payload, step=int(step))
            except Exception as err:  # a tracker must never stop training
                self._warn.warning("log", "AccelerateSink: accelerator.log failed at step %s: %r",
                                   step, err)
        if histograms and getattr(self.accelerator, "is_main_process", True):
            for tracker in trackers:
                self._log_histograms(tracker, histograms, int(step))

    def _log_histograms(self, tracker: Any, histograms: Mapping[str, Any], step: int) -> None:
        name = str(getattr(tracker, "name", type(tracker).__name__))
        try:
            if name == "tensorboard":
                writer = tracker.tracker
                wrote = False
                for key, values in histograms.items():
                    finite = finite_values(values)
                    if finite is not None:
                        writer.add_histogram(f"{self.prefix}{key}", finite, step)
                        wrote = True
                if wrote:
                    writer.flush()
            elif name == "wandb":
                import wandb

                payload = wandb_histograms(wandb, histograms, self.prefix, self._warn)
                if payload:
                    tracker.tracker.log(payload, step=step)
            else:
                self._told.info(name, "AccelerateSink sends no histograms to the %r tracker "
                                "(scalars only)", name)
        except Exception as err:  # a tracker must never stop training
            self._warn.warning(f"histogram-{name}", "AccelerateSink: histograms to %r failed at "
                               "step %s: %r", name, step, err)

    def close(self) -> None:
        """Nothing to release: end the trackers with ``accelerator.end_training()``."""

    def __repr__(self) -> str:
        return f"AccelerateSink({type(self.accelerator).__name__}, prefix={self.prefix!r})"
