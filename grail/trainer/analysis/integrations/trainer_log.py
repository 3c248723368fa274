"""How :class:`~.transformers.ModelAnalysisCallback` logs a step: a sink onto the trainer's log.

:class:`TrainerLog` is a :class:`~.sinks.MetricSink` made for one event. Scalars go through the
base ``transformers.Trainer.log`` (not an override: TRL's ``log`` would drain its buffered
averages into them), with ``control.should_log`` saved and restored around the call; without a
trainer they are appended to ``state.log_history``, with one warning. Histograms go straight to
the active wandb run when ``report_to`` includes wandb, as ``wandb.Histogram`` under
``train/<prefix><name>``, finite values only. A failure is logged once per kind by the callback
and training goes on.

Example:
    >>> from transformers import TrainerControl, TrainerState, TrainingArguments
    >>> from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    >>> from grail.trainer.analysis.integrations.transformers import ModelAnalysisCallback
    >>> cb = ModelAnalysisCallback(ModelAnalysisManager(AnalysisConfig()))  # no trainer
    >>> args, state = TrainingArguments("out", report_to="none"), TrainerState()
    >>> TrainerLog(cb, args, state, TrainerControl()).log({"x": 1.0}, 3)
    >>> state.log_history
    [{'analysis/x': 1.0, 'step': 3}]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from .sinks import wandb_histograms

if TYPE_CHECKING:
    from .transformers import ModelAnalysisCallback

__all__ = ["TrainerLog"]


class TrainerLog:
    """A :class:`~.sinks.MetricSink` onto the trainer's own log for one event: scalars through
    ``Trainer.log`` (``state.log_history`` without a trainer), histograms to the active wandb
    run when ``report_to`` includes wandb (see module docstring). Failures are logged once per
    kind by the callback; nothing raises."""

    def __init__(
        self,
        callback: ModelAnalysisCallback,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
    ) -> None:
        self.callback, self.args, self.state, self.control = callback, args, state, control

    def log(
        self,
        metrics: Mapping[str, float],
        step: int,
        histograms: Mapping[str, Any] | None = None,
    ) -> None:
        if not metrics:
            return
        prefix = self.callback.prefix
        self._scalars({f"{prefix}{k}": v for k, v in metrics.items()}, step)
        if histograms:
            try:
                self._histograms(histograms, step)
            except Exception as err:  # a reporting backend must never stop training
                self.callback._fail_once(
                    "histograms", "logging the analysis histograms failed: %r", err
                )

    def close(self) -> None:
        """Nothing to release: the trainer owns its reporting backends."""

    def _scalars(self, logs: dict[str, float], step: int) -> None:
        trainer, control = self.callback.trainer, self.control
        if trainer is None:
            self.callback._once.warning(
                "no-trainer",
                "ModelAnalysisCallback could not find its trainer; metrics go to "
                "state.log_history only. Pass ModelAnalysisCallback(..., trainer=trainer) to fix "
                "this.",
            )
            self.state.log_history.append({**logs, "step": step})
            return
        should_log = control.should_log
        try:
            Trainer.log(trainer, logs)
        except Exception as err:  # a reporting backend must never stop training
            self.callback._fail_once("log", "logging the analysis metrics failed: %r", err)
        finally:
            control.should_log = should_log
            trainer.control.should_log = should_log

    def _histograms(self, histograms: Mapping[str, Any], step: int) -> None:
        report_to = self.args.report_to
        report_to = report_to if isinstance(report_to, list) else [report_to]
        if "wandb" not in report_to and "all" not in report_to:
            return
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        prefix = f"train/{self.callback.prefix}"
        payload = wandb_histograms(wandb, histograms, prefix, self.callback._failures)
        if payload:
            payload["train/global_step"] = step
            wandb.log(payload)
