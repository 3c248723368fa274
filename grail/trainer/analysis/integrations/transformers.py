"""``ModelAnalysisCallback``: the analysis inside a Hugging Face ``Trainer`` or a TRL trainer.

Usage (the trainer is passed in, as TRL's own callbacks take it)::

    analyzer = ModelAnalysisManager.create(AnalysisConfig(interval=100))
    trainer = GRPOTrainer(...)
    trainer.add_callback(ModelAnalysisCallback(analyzer, trainer=trainer))
    trainer.train()   # keys "analysis/param_change/...", "analysis/sparse/..." in every report_to

``GRPOTrainer(..., callbacks=[ModelAnalysisCallback(analyzer)])`` works too: the trainer is then
looked up when training starts (:func:`find_training_loop`).

Why a callback reading ``kwargs["inputs"]`` gets no batch: the Trainer passes every callback
event only ``model, processing_class, optimizer, lr_scheduler, train_dataloader,
eval_dataloader``; the batch is never among them. This callback gets one in two ways:

* ``probe_inputs`` (recommended: a fixed batch makes numbers comparable across steps): a dict
  of tensors (or a tensor), or a list of strings tokenized once, at train begin, with the
  trainer's ``processing_class`` (:func:`~.batch.tokenize_probe`);
* otherwise the inputs of the most recent training forward, referenced (not copied) by a
  forward pre-hook that ignores ``no_grad`` calls (generation, evaluation) and is paused while
  the analysis runs its own forwards (:class:`~.batch.BatchCapture`).

Tensors are moved to the model's device.

Timing. The analysis runs in ``on_optimizer_step`` (parameters updated, gradients still
present), with the manager's step set to ``state.global_step + 1``: the trainer increments
``global_step`` only after that event, so the N-th optimizer step is step N and a resumed run
keeps its schedule. The metrics are logged in ``on_step_end`` of the same step, when
``state.global_step == N``, through the trainer's own ``log`` so every ``report_to`` backend
(wandb, tensorboard, trackio, ...) and ``state.log_history`` get them under ``prefix``.

Decisions where the design is silent:

* The trainer: the callback API passes events neither the trainer nor the checkpoint a run
  resumes from. ``trainer=`` gives the trainer; without it, :func:`find_training_loop` (the one
  place that looks) finds it on the call stack at train begin. Without a trainer the metrics
  are appended to ``state.log_history`` only, with a warning.
* The base ``transformers.Trainer.log`` is called, not an override: TRL's ``log`` drains its
  buffered reward/KL averages into whatever it logs, which would move them off the trainer's
  own log entry. ``control.should_log`` is saved and restored around the call because the
  trainer's ``on_log`` resets it, which would drop the trainer's own loss log of that step.
* Multi-process: every rank runs the analysis (it may issue collectives); only the world main
  process logs.
* The metrics and histograms of a step go out through one
  :class:`~.sinks.MetricSink` (``log(metrics, step, histograms)``) onto the trainer's log
  (:class:`~.trainer_log.TrainerLog`).
  Histograms (``analyzer.last_histograms``) go straight to the active wandb run when
  ``report_to`` includes wandb, as ``wandb.Histogram`` under ``train/<prefix><name>`` beside
  the scalars (``log_history`` must stay JSON-serialisable). Only their finite values are sent;
  a histogram with none is skipped.
* Training comes first: a failure while logging (a reporting backend raising, say) or while
  saving or restoring the analysis state is logged once as a warning and training goes on.
* Checkpoints: ``on_save`` writes ``analyzer.state_dict()`` (step, config, the computers'
  carried state such as ``mask_overlap``'s previous changed set; not the snapshot) to
  ``grail_analysis_state_rank<r>.pt`` in the checkpoint folder, one file per rank
  (:mod:`.checkpoint`).
* The base of ``drift/*`` is taken in ``on_train_begin``, before any step (the manager alone
  would take it after the first optimizer step), unless ``analyzer.set_base(...)`` set one; a
  base set without ``model=`` is checked against the model there. It is not saved with the
  checkpoints (it is as large as the model): a resumed run measures drift from the resumed
  weights, with a warning, unless ``set_base`` is called before ``train()`` (a base given that
  way survives the resume).
* Resume: when training starts at a ``global_step`` the manager has not reached, the manager is
  reset to that step and its saved state is looked up in the checkpoint being resumed (the
  trainer's ``resume_from_checkpoint``, else ``args.resume_from_checkpoint``, else
  ``output_dir/checkpoint-<step>``; a file saved at another step or by another world size is
  ignored; the checkpoint the running ``train()`` call resumes from is found by
  :func:`find_training_loop`). If the step is a measurement step the baseline snapshot is taken
  from the loaded weights, which are exactly the weights the uninterrupted run snapshotted,
  and the computers' states continue from it, so every value matches the uninterrupted run;
  otherwise the manager re-baselines at its next measurement step and the carried states start
  over.

Example:
    >>> from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    >>> cb = ModelAnalysisCallback(ModelAnalysisManager.create(AnalysisConfig(interval=10)),
    ...                            probe_inputs=["a probe sentence"])
    >>> cb.prefix
    'analysis/'
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.logonce import LogOnce
from ..manager import ModelAnalysisManager
from .batch import BatchCapture, tokenize_probe
from .checkpoint import restore_state, save_state, state_files

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as err:  # pragma: no cover - exercised only without the hf extra
    raise ImportError(
        "ModelAnalysisCallback needs transformers: pip install 'grail-analysis[hf]'"
    ) from err

from .trainer_log import TrainerLog as _TrainerLog  # imports transformers too

__all__ = ["ModelAnalysisCallback", "find_training_loop"]

logger = logging.getLogger(__name__)

#: The keyword arguments ``CallbackHandler.call_event`` passes every event (a test fails when
#: transformers changes them: a ``trainer`` among them would make :func:`find_training_loop`
#: unnecessary).
EVENT_KWARGS = frozenset(
    {"model", "processing_class", "optimizer", "lr_scheduler", "train_dataloader",
     "eval_dataloader"}
)
#: How many interpreter frames :func:`find_training_loop` looks through.
MAX_FRAMES = 32


def find_training_loop(callback: TrainerCallback) -> tuple[Trainer | None, Any]:
    """The ``Trainer`` whose callbacks include ``callback``, and the ``resume_from_checkpoint``
    of its running training loop, from the interpreter stack (``(None, None)`` where not found).

    The one place where the callback looks for what the callback API does not pass it
    (:data:`EVENT_KWARGS`): called from an event, it walks up at most :data:`MAX_FRAMES` frames
    to the first whose ``self`` is a ``Trainer`` holding ``callback`` - the training loop that
    emitted the event - and reads that frame's local ``resume_from_checkpoint`` (the checkpoint
    ``train()`` resumes from, ``True`` already resolved to a path). Pass ``trainer=`` to
    :class:`ModelAnalysisCallback` where a wrapper hides the trainer; the checkpoint has no
    other source (``args.resume_from_checkpoint`` and ``output_dir/checkpoint-<step>`` are the
    callback's fallbacks).
    """
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        for _ in range(MAX_FRAMES):
            if f is None:
                break
            obj = f.f_locals.get("self")
            handler = getattr(obj, "callback_handler", None)
            if isinstance(obj, Trainer) and any(
                cb is callback for cb in getattr(handler, "callbacks", ())
            ):
                return obj, f.f_locals.get("resume_from_checkpoint")
            f = f.f_back
    finally:
        del frame
    return None, None


def _is_strings(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(s, str) for s in value)
    )


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class ModelAnalysisCallback(TrainerCallback):
    """Runs ``analyzer`` once per optimizer step and logs its metrics (see module docstring).

    Args:
        analyzer: the manager, e.g. ``ModelAnalysisManager.create(AnalysisConfig(...))``.
        probe_inputs: fixed batch for forward-pass metrics: a dict of tensors, a tensor, or a
            list of strings; ``None`` uses the captured training batch.
        prefix: prepended to every metric key.
        trainer: the trainer to log through (TRL style:
            ``trainer.add_callback(ModelAnalysisCallback(analyzer, trainer=trainer))``);
            ``None`` finds it when training starts (:func:`find_training_loop`).
    """

    def __init__(
        self,
        analyzer: ModelAnalysisManager,
        probe_inputs: Mapping[str, torch.Tensor] | torch.Tensor | Sequence[str] | None = None,
        prefix: str = "analysis/",
        trainer: Trainer | None = None,
    ) -> None:
        if not isinstance(analyzer, ModelAnalysisManager):
            raise TypeError(
                f"analyzer must be a ModelAnalysisManager, got {type(analyzer).__name__}"
            )
        if trainer is not None and not isinstance(trainer, Trainer):
            raise TypeError(
                "trainer must be a transformers.Trainer (TRL's trainers are), got "
                f"{type(trainer).__name__}; pass the trainer the callback is added to, or None"
            )
        if not (
            probe_inputs is None
            or isinstance(probe_inputs, (Mapping, torch.Tensor))
            or _is_strings(probe_inputs)
        ):
            raise TypeError(
                "probe_inputs must be None, a dict of tensors, a tensor, or a non-empty list of "
                f"strings; got {type(probe_inputs).__name__}"
            )
        self.analyzer = analyzer
        self.probe_inputs = probe_inputs
        self.prefix = prefix
        self.trainer: Trainer | None = trainer
        self.capture = BatchCapture()
        self._probe: Any = None
        self._pending: tuple[dict[str, float], dict[str, Any]] | None = None
        self._once = LogOnce(logger)
        self._failures = LogOnce(logger, suffix=" (training goes on; not logged again)")

    # --- events ----------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        trainer, resume_dir = find_training_loop(self)
        self.trainer = self.trainer or trainer
        if model is None:
            return
        if self.probe_inputs is not None:
            raw = self.probe_inputs
            if _is_strings(raw):
                raw = tokenize_probe(raw, processing_class)
            self._probe = _to(raw, _device_of(model))
        self.capture.attach(model)
        folders = [resume_dir, getattr(args, "resume_from_checkpoint", None)]
        output_dir = getattr(args, "output_dir", None)
        if isinstance(output_dir, str):
            folders.append(os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        self._sync_step(model, state.global_step, state_files(folders))
        # drift/*: the base is the weights before the first step (unless set_base gave one)
        self.analyzer.ensure_base(model)

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            return
        step = state.global_step + 1  # the trainer increments global_step after this event
        inputs = None
        if self.analyzer.is_measurement_step(step):
            inputs = self._probe if self._probe is not None else self.capture.batch
        inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        with self.capture.paused():  # the analysis' own forwards are not a training batch
            metrics = self.analyzer.on_optimizer_step(model, inputs, optimizer, step=step)
        if metrics:
            self._pending = (metrics, dict(self.analyzer.last_histograms))

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not state.is_world_process_zero:
            return
        metrics, histograms = pending
        _TrainerLog(self, args, state, control).log(metrics, state.global_step, histograms)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Write the analysis state into the checkpoint folder just saved (see module docs)."""
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        try:
            saved = save_state(self.analyzer, folder, state.global_step)
        except Exception as err:  # the checkpoint itself is saved; the analysis must not fail it
            self._fail_once("save", "could not save the analysis state to %s: %r", folder, err)
            return
        if saved is None:
            self._fail_once(
                "no-folder",
                "checkpoint folder %s not found; the analysis state is not saved with it (a "
                "resume from it re-baselines the analysis)",
                folder,
            )

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.capture.detach()

    # --- helpers ---------------------------------------------------------------------------
    def _fail_once(self, kind: str, message: str, *args: Any) -> None:
        self._failures.warning(kind, message, *args)

    def _sync_step(self, model: nn.Module, step: int, state_files: Sequence[str] = ()) -> None:
        """Align the manager with the trainer's step when training starts (see module docs)."""
        if self.analyzer.step_count == step:
            return
        self.analyzer.reset()
        self.analyzer.step_count = step
        if step > 0:
            path = restore_state(self.analyzer, model, step, state_files)
            if path is not None:
                logger.info("analysis resumed at step %d from %s", step, path)
                return
        if self.analyzer.is_measurement_step(step):
            self.analyzer.on_optimizer_step(model, step=step)  # baseline from loaded weights
            logger.info("analysis resumed at step %d with a baseline from the loaded weights", step)
        elif step > 0:
            logger.info("analysis resumed at step %d; re-baselines at the next measurement", step)
