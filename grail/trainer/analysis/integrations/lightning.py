"""``LightningAnalysisCallback``: the analysis inside a PyTorch Lightning ``Trainer``.

Usage::

    analyzer = ModelAnalysisManager.create(AnalysisConfig(interval=100, gradient_enabled=True))
    trainer = L.Trainer(callbacks=[LightningAnalysisCallback(analyzer)], logger=CSVLogger("logs"))
    trainer.fit(module)   # "analysis/param_change/...", "analysis/gradient/..." in every logger

The class derives from the ``Callback`` of ``lightning.pytorch`` and of ``pytorch_lightning``,
whichever are installed (both, when both are), so either package's ``Trainer`` accepts it.
Without either, importing it raises an ``ImportError`` naming the ``lightning`` extra.

Timing (checked against Lightning 2.6). With automatic optimization one training batch runs
``training_step`` -> ``on_before_zero_grad`` -> ``zero_grad`` -> ``backward`` ->
``optimizer.step()`` (all inside the optimizer closure) -> ``global_step += 1`` ->
``on_train_batch_end``. ``on_before_zero_grad`` therefore fires *before* the step's backward,
with the previous step's gradients and after the next batch's forward, and never after the
last step; it is the wrong hook. This callback measures in ``on_train_batch_end``: the weights
are updated, the gradients the optimizer just used are still present (Lightning zeroes them
at the start of the next closure), and so is the optimizer state, so the gradient and Adam
families work. With gradient accumulation the hook fires on every micro-batch; the callback
measures only when ``trainer.global_step`` has advanced, i.e. after a real optimizer step, when
the accumulated gradients are present. Manual optimization works the same way (``global_step``
counts ``optimizer.step()`` calls) as long as ``zero_grad`` runs before ``backward`` rather
than after ``step``.

Step. The manager's step is ``trainer.global_step`` after the update: the N-th optimizer step is
step N (as in the HF callback), and metrics are logged at step N with
``logger.log_metrics(metrics, step=N)`` on every logger in ``trainer.loggers``. In Lightning's
own logs, values from ``self.log`` in ``training_step`` of that batch appear at step N - 1
(Lightning logs them before counting the step): a logger's step is the number of updates the
weights had received, for the loss as for the analysis.

Inputs for the forward-pass metrics (sparse quality, low-rank quality), computed by calling
``pl_module(**inputs)``: give the module a ``forward`` that returns logits (or an output with
``.logits``). They come from ``probe_inputs`` (a fixed batch: numbers comparable across steps;
moved to the module's device when training starts), else from the training batch through
``batch_to_inputs(batch)``. The default keeps a dict batch's tensors minus loss-only keys
(``labels``, ...) and passes a tensor batch as it is; any other batch (a tuple ``(x, y)``, say)
gives no inputs, with one warning asking for ``batch_to_inputs``. With accumulation the batch
is the last micro-batch.

Decisions where the design is silent:

* Only global rank zero logs; every rank runs the analysis (it may issue collectives).
  Histograms (``analyzer.last_histograms``, finite values only) go to loggers whose
  ``experiment`` has ``add_histogram`` (``TensorBoardLogger``) and to ``WandbLogger``
  (``wandb.Histogram``); other loggers get the scalars. Loggers write on their own schedule
  (``CSVLogger`` every ``flush_logs_every_n_steps`` and at the end of training).
* Drift: in ``on_train_start`` of a run that starts at step 0, when the analyzer has a
  ``set_base`` method and ``config.drift_enabled`` is true, ``analyzer.set_base(pl_module)``
  records the weights before the first update. A resumed run keeps whatever base the analyzer
  has: call ``analyzer.set_base(...)`` with the original weights yourself before ``fit``.
* Checkpoints: the callback's ``state_dict`` is ``analyzer.state_dict()`` (step, config,
  carried computer state; not the snapshot), saved by Lightning in every checkpoint (rank
  zero's). On resume into as many processes, at a measurement step, it is restored with the
  loaded weights as baseline, so values match the uninterrupted run: in one process, and under
  DDP or DeepSpeed ZeRO-1/2, where every parameter is replicated and only rank zero carries
  state for them (it counts them), so rank zero's state is right on every rank. Otherwise
  (other steps, another number of processes, sharded parameters, whose carried state differs
  per rank) the manager is aligned with ``global_step`` and re-baselines at its next
  measurement step. Every rank takes the same branch: it depends on the checkpoint, the
  world size and the strategy only.
* The optimizer handed to the analysis is ``trainer.optimizers[0]`` when there is exactly one;
  with several (manual optimization) none is, and the families that read optimizer state are
  skipped (the manager says so once).
* Training comes first: a failing ``batch_to_inputs``, logger, ``set_base`` or state restore
  is logged once per kind as a warning and training goes on. Wrong argument types raise at
  construction.

Example:
    >>> from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    >>> cb = LightningAnalysisCallback(ModelAnalysisManager.create(AnalysisConfig(interval=10)))
    >>> cb.prefix, cb.state_key
    ('analysis/', "LightningAnalysisCallback{'prefix': 'analysis/'}")
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..core.distributed import shard_info
from ..core.logonce import LogOnce
from ..manager import ModelAnalysisManager
from .batch import DROPPED_KEYS
from .checkpoint import rank_and_world
from .sinks import finite_values, wandb_histograms

__all__ = ["LightningAnalysisCallback", "default_batch_to_inputs"]

logger = logging.getLogger(__name__)


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(package).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "LightningAnalysisCallback needs PyTorch Lightning: pip install "
            "'grail-analysis[lightning]'"
        )
    return tuple(bases)


def default_batch_to_inputs(batch: Any) -> Any:
    """The model inputs of a training batch: a dict's tensors minus loss-only keys, or a tensor.

    Anything else (a tuple ``(x, y)``, a custom object) gives ``None``: pass
    ``batch_to_inputs=`` to say which part the model takes.

    >>> ids = torch.ones(2, 3, dtype=torch.long)
    >>> sorted(default_batch_to_inputs({"input_ids": ids, "labels": ids, "n": 2}))
    ['input_ids']
    >>> default_batch_to_inputs((ids, ids)) is None
    True
    """
    if isinstance(batch, Mapping):
        inputs = {
            k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in DROPPED_KEYS
        }
        return inputs or None
    if isinstance(batch, torch.Tensor):
        return batch
    return None


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class LightningAnalysisCallback(*_callback_bases()):  # type: ignore[misc]
    """Runs ``analyzer`` after every optimizer step and logs to the trainer's loggers.

    Args:
        analyzer: the manager, e.g. ``ModelAnalysisManager.create(AnalysisConfig(...))``.
        probe_inputs: a fixed batch for the forward-pass metrics: a dict of tensors, a tensor,
            or a tuple of positional tensors; ``None`` uses the training batch.
        prefix: prepended to every metric key.
        batch_to_inputs: maps a training batch to model inputs (used when ``probe_inputs`` is
            ``None``); default :func:`default_batch_to_inputs`.
    """

    def __init__(
        self,
        analyzer: ModelAnalysisManager,
        probe_inputs: Mapping[str, torch.Tensor] | torch.Tensor | tuple[Any, ...] | None = None,
        prefix: str = "analysis/",
        batch_to_inputs: Callable[[Any], Any] | None = None,
    ) -> None:
        if not isinstance(analyzer, ModelAnalysisManager):
            raise TypeError(
                f"analyzer must be a ModelAnalysisManager, got {type(analyzer).__name__}"
            )
        if not (probe_inputs is None or isinstance(probe_inputs, (Mapping, torch.Tensor, tuple))):
            raise TypeError(
                "probe_inputs must be None, a dict of tensors, a tensor or a tuple of tensors "
                f"(tokenize text first: Lightning has no tokenizer to hand); got "
                f"{type(probe_inputs).__name__}"
            )
        if batch_to_inputs is not None and not callable(batch_to_inputs):
            raise TypeError(
                "batch_to_inputs must be a function batch -> model inputs, got "
                f"{type(batch_to_inputs).__name__}"
            )
        self.analyzer = analyzer
        self.probe_inputs = probe_inputs
        self.prefix = prefix
        self.batch_to_inputs = batch_to_inputs or default_batch_to_inputs
        self._probe: Any = None
        self._last_step: int | None = None
        self._saved_state: dict[str, Any] | None = None
        self._failures = LogOnce(logger, suffix=" (training goes on; not logged again)")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # --- hooks -----------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.probe_inputs is not None:
            self._probe = _to(self.probe_inputs, _device_of(pl_module))
        step = int(trainer.global_step)
        self._last_step = step
        saved, self._saved_state = self._saved_state, None
        self._sync_step(pl_module, step, saved, int(getattr(trainer, "world_size", 1)))
        set_base = getattr(self.analyzer, "set_base", None)
        drift = getattr(self.analyzer.config, "drift_enabled", False)
        if step == 0 and drift and callable(set_base):
            try:
                set_base(pl_module)
            except Exception as err:  # drift is lost for this run; training is not
                self._fail_once("base", "capturing the drift base failed: %r", err)

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:  # accumulating: no optimizer step on this micro-batch
            return
        self._last_step = step
        inputs = None
        if self.analyzer.is_measurement_step(step) and self._needs_inputs():
            inputs = self._probe if self._probe is not None else self._inputs_from(batch)
        optimizers = list(getattr(trainer, "optimizers", None) or ())
        optimizer = optimizers[0] if len(optimizers) == 1 else None
        metrics = self.analyzer.on_optimizer_step(pl_module, inputs, optimizer, step=step)
        if metrics and trainer.is_global_zero:
            self._log(trainer, step, metrics, dict(self.analyzer.last_histograms))

    def state_dict(self) -> dict[str, Any]:
        try:
            return {"manager": self.analyzer.state_dict(), "world_size": rank_and_world()[1]}
        except Exception as err:  # the checkpoint is saved without the analysis state
            self._fail_once("save", "could not save the analysis state: %r", err)
            return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_state = dict(state_dict) if state_dict else None

    # --- helpers ---------------------------------------------------------------------------
    def _fail_once(self, kind: str, message: str, *args: Any) -> None:
        self._failures.warning(kind, message, *args)

    def _needs_inputs(self) -> bool:
        return any(c.requires_inputs() for c in self.analyzer.computers)

    def _inputs_from(self, batch: Any) -> Any:
        try:
            inputs = self.batch_to_inputs(batch)
        except Exception as err:
            self._fail_once("batch", "batch_to_inputs raised %r; forward-pass metrics skipped",
                            err)
            return None
        if inputs is None:
            self._fail_once(
                "no-inputs",
                "no model inputs in the training batch (a %s): forward-pass metrics are skipped; "
                "pass batch_to_inputs= or probe_inputs= to LightningAnalysisCallback",
                type(batch).__name__,
            )
        return inputs

    def _sync_step(
        self, pl_module: nn.Module, step: int, saved: dict[str, Any] | None, world: int
    ) -> None:
        """Align the manager with the trainer's step at train start (see module docstring)."""
        saved = saved or {}
        manager = saved.get("manager")
        if (
            isinstance(manager, Mapping)
            and manager.get("step_count") == step
            and saved.get("world_size") == world
            and (world == 1 or _replicated(pl_module))
        ):
            try:
                self.analyzer.reset()
                self.analyzer.load_state_dict(manager, model=pl_module)
                logger.info("analysis resumed at step %d from the checkpoint", step)
                return
            except Exception as err:  # a foreign or damaged state: resume without it
                self._fail_once("restore", "analysis state not restored (%r); the analysis "
                                "re-baselines", err)
                self.analyzer.reset()  # nothing restored is kept; the baseline is taken below
        if self.analyzer.step_count == step:
            return
        self.analyzer.reset()
        self.analyzer.step_count = step
        if step > 0 and self.analyzer.is_measurement_step(step):
            self.analyzer.on_optimizer_step(pl_module, step=step)  # baseline: loaded weights
            logger.info("analysis resumed at step %d with a baseline from the loaded weights", step)
        elif step > 0:
            logger.info("analysis resumed at step %d; re-baselines at the next measurement", step)

    def _log(
        self, trainer: Any, step: int, metrics: dict[str, float], histograms: dict[str, Any]
    ) -> None:
        prefixed = {f"{self.prefix}{k}": v for k, v in metrics.items()}
        for lg in getattr(trainer, "loggers", None) or ():
            name = type(lg).__name__
            try:
                lg.log_metrics(prefixed, step=step)
            except Exception as err:  # a logger must never stop training
                self._fail_once(f"log-{name}", "%s failed to log the analysis: %r", name, err)
            if histograms:
                try:
                    self._log_histograms(lg, step, histograms)
                except Exception as err:
                    self._fail_once(f"hist-{name}", "%s failed to log histograms: %r", name, err)

    def _log_histograms(self, lg: Any, step: int, histograms: dict[str, Any]) -> None:
        if any(c.__name__ == "WandbLogger" for c in type(lg).__mro__):
            import wandb

            payload = wandb_histograms(wandb, histograms, self.prefix, self._failures)
            if payload:
                lg.experiment.log({**payload, "trainer/global_step": step})
            return
        experiment = lg.experiment
        if not callable(getattr(experiment, "add_histogram", None)):
            return
        for key, values in histograms.items():
            finite = finite_values(values)
            if finite is not None:
                experiment.add_histogram(f"{self.prefix}{key}", finite, step)


def _replicated(module: nn.Module) -> bool:
    """True when every rank holds the whole model (DDP, ZeRO-1/2); False when a parameter is
    sharded (FSDP2, ZeRO-3), under FSDP1 (its flat parameters look whole) or when the layout
    cannot be read (tensor parallel): the same answer on every rank, and never an exception."""
    try:
        if any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules()):
            return False
        return not any(shard_info(p).sharded for p in module.parameters())
    except Exception:  # e.g. DTensor placements the analysis does not read
        return False
