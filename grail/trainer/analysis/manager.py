"""The analysis lifecycle: when to snapshot, when to measure, and never to break training.

Step semantics (a schedule is a value: :func:`measurement_steps` spells it out). Steps are
counted by calls to :meth:`ModelAnalysisManager.on_optimizer_step`. At step ``interval`` the
first snapshot is taken and ``{}`` is returned; at ``2*interval``, ``3*interval``, ... every
computer compares the live parameters with the snapshot taken ``interval`` steps earlier, then
the snapshot is refilled in place from the live parameters. Any other step returns ``{}`` after
incrementing a counter: no parameter is touched.

Fail-safety lives here and only here: a computer that raises is logged once per computer and
error type (a warning naming it; the traceback at debug level) and skipped, the others run, and
nothing propagates into the training loop. When parameters are added, removed or reshaped
between measurements, one warning names them and the snapshot is re-baselined.

Decisions where the design is silent:

* ``on_optimizer_step(..., step=N)`` sets the step counter to ``N`` first (the HF callback passes
  the trainer's global step, so a resumed run keeps its schedule).
* Computers run under ``torch.no_grad()``; the manager restores ``model.training`` of every
  module after each computer, whatever the computer did.
* ``state_dict()`` holds the step counter, the config and the computers' carried state (small:
  e.g. one bit per entry for ``mask_overlap``); the snapshot only with ``include_snapshot=True``
  (it is as large as the model). Without it, a resumed run re-baselines at its next measurement
  step, unless ``load_state_dict(state, model=...)`` gets the weights of a measurement step.
* In a process group, a computer's result is kept only if it succeeded on every rank (one tiny
  all-reduce per computer), so all ranks return the same keys.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 4)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> analyzer = ModelAnalysisManager.create(AnalysisConfig(interval=2,
    ...                                        sparse_quality_enabled=False))
    >>> for step in range(1, 5):
    ...     model(torch.randn(3, 4)).square().sum().backward()
    ...     opt.step(); opt.zero_grad()
    ...     metrics = analyzer.on_optimizer_step(model)
    ...     print(step, len(metrics) > 0)
    1 False
    2 False
    3 False
    4 True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .anchor import BaseAnchor, BaseSource
from .config import SNAPSHOT_DTYPES, AnalysisConfig
from .core.distributed import ShardInfo, all_reduce_, is_distributed, reshard, unsupported_engine
from .core.snapshot import ParameterSnapshot
from .metrics.base import AnalysisContext, MetricComputer

__all__ = ["ModelAnalysisManager", "measurement_steps"]

logger = logging.getLogger(__name__)


def measurement_steps(interval: int, last_step: int) -> list[int]:
    """Steps in ``1..last_step`` at which metrics are returned (the first snapshot is silent).

    >>> measurement_steps(5, 20)
    [10, 15, 20]
    """
    return list(range(2 * interval, last_step + 1, interval))


def _attention_mask(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None
    return None


class ModelAnalysisManager:
    """Runs metric computers over parameter deltas every ``config.interval`` optimizer steps.

    Args:
        config: all options; ``None`` means ``AnalysisConfig()``.
    """

    def __init__(self, config: AnalysisConfig | None = None) -> None:
        if config is not None and not isinstance(config, AnalysisConfig):
            raise TypeError(
                f"config must be an AnalysisConfig, got {type(config).__name__}; build one with "
                "AnalysisConfig(...) or AnalysisConfig.from_dict(...)"
            )
        self.config = config or AnalysisConfig()
        self.computers: list[MetricComputer] = []
        self.step_count = 0
        self.old_snapshot: ParameterSnapshot | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_histograms: dict[str, Any] = {}
        self._reported: set[tuple[str, str]] = set()
        self._skip_logged: set[tuple[str, str]] = set()
        self._anchor = BaseAnchor(self.config.snapshot_device, self.config.trainable_only)
        self._snapshot_step: int | None = None  # step whose weights old_snapshot holds

    @classmethod
    def create(
        cls,
        config: AnalysisConfig | None = None,
        *,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> ModelAnalysisManager:
        """A manager with every built-in computer that ``config`` enables.

        ``output_fn`` maps a model output to logits for the forward-pass metrics (e.g. for an
        encoder or a value head); by default ``.logits``, the first tuple element, or the tensor
        itself is used.
        """
        from .metrics.registry import build_computers

        manager = cls(config)
        for computer in build_computers(manager.config, output_fn=output_fn):
            manager.add_metric(computer)
        return manager

    def add_metric(self, computer: MetricComputer) -> ModelAnalysisManager:
        """Append a computer; returns ``self`` so calls chain."""
        if not isinstance(computer, MetricComputer):
            raise TypeError(
                f"add_metric expects a MetricComputer, got {type(computer).__name__}; subclass "
                "grail.trainer.analysis.MetricComputer and implement compute()"
            )
        self.computers.append(computer)
        return self

    def __len__(self) -> int:
        return len(self.computers)

    def __repr__(self) -> str:
        names = ", ".join(c.name for c in self.computers)
        return (
            f"ModelAnalysisManager(interval={self.config.interval}, step={self.step_count}, "
            f"computers=[{names}], snapshot={self.old_snapshot!r})"
        )

    # --- lifecycle -------------------------------------------------------------------------
    def is_measurement_step(self, step: int | None = None) -> bool:
        step = self.step_count if step is None else step
        return step > 0 and step % self.config.interval == 0

    def on_optimizer_step(
        self,
        model: nn.Module,
        inputs: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        step: int | None = None,
        **metadata: Any,
    ) -> dict[str, float]:
        """Call once after every ``optimizer.step()``; returns metrics on measurement steps.

        Never raises because of the analysis: problems are logged and ``{}`` is returned.
        """
        if step is not None:
            self.step_count = int(step)
        else:
            self.step_count += 1
        if self._anchor.needs_work(self._wants_base()):
            self.ensure_base(model)
        if not self.is_measurement_step():
            return {}
        try:
            return self._measure(model, inputs, optimizer, metadata)
        except Exception as err:  # the training loop must survive anything the analysis does
            self._report("manager", err)
            return {}

    def _measure(
        self,
        model: nn.Module,
        inputs: Any,
        optimizer: torch.optim.Optimizer | None,
        metadata: dict[str, Any],
    ) -> dict[str, float]:
        engine = unsupported_engine(model)
        if engine is not None:
            if ("engine", engine) not in self._skip_logged:
                self._skip_logged.add(("engine", engine))
                logger.warning(
                    "%s partitions parameters into placeholders outside their forward; the "
                    "analysis cannot read them and reports nothing for this model",
                    engine,
                )
            return {}
        reshard(model)  # FSDP2: analyse local shards, whatever the last forward left behind
        cfg = self.config
        if self.old_snapshot is None:
            self.old_snapshot = self._new_snapshot(model)
            return {}
        live = ParameterSnapshot.live(model, trainable_only=cfg.trainable_only)
        self._check_base(model, live)
        changed = _spec_changes(self.old_snapshot.spec(), live.spec())
        if changed:
            logger.warning(
                "model parameters changed since the last snapshot (%s); re-baselining without "
                "metrics this step",
                changed,
            )
            self.old_snapshot = self._new_snapshot(model)
            return {}
        delta = self.old_snapshot.compute_delta(live)
        context = AnalysisContext(
            model=model,
            inputs=inputs,
            attention_mask=_attention_mask(inputs),
            optimizer=optimizer,
            step=self.step_count,
            metadata=dict(metadata),
            base=self._agreed_base(),
            snapshot_step=self._snapshot_step,
        )
        metrics: dict[str, float] = {}
        histograms: dict[str, Any] = {}
        for computer in self.computers:
            if not self._ready(computer, context):
                continue
            result = self._run(computer, delta, live, context, model)
            if result is not None:
                metrics.update(result)
                hist = getattr(computer, "last_histograms", None)
                if hist:
                    histograms.update(hist)
        try:
            self.old_snapshot.capture_(model)
            self._snapshot_step = self.step_count
        except BaseException:
            self.old_snapshot = None  # a half-refilled baseline would give wrong numbers later
            raise
        self.last_metrics = metrics
        self.last_histograms = histograms
        return metrics

    def _ready(self, computer: MetricComputer, context: AnalysisContext) -> bool:
        if computer.requires_inputs() and context.inputs is None:
            self._log_once(computer.name, "no-inputs", "no inputs passed; skipping")
            return False
        if computer.requires_model() and context.model is None:
            self._log_once(computer.name, "no-model", "no model passed; skipping")
            return False
        if computer.requires_optimizer() and context.optimizer is None:
            self._log_once(
                computer.name, "no-optimizer", "no optimizer passed to on_optimizer_step; skipping"
            )
            return False
        return True

    def _run(
        self,
        computer: MetricComputer,
        delta: Any,
        live: ParameterSnapshot,
        context: AnalysisContext,
        model: nn.Module,
    ) -> dict[str, float] | None:
        modes = [(m, m.training) for m in model.modules()]
        failed = False
        result: dict[str, float] = {}
        start = time.perf_counter()
        try:
            with torch.no_grad():
                raw = computer.compute(
                    delta=delta,
                    old_snapshot=self.old_snapshot,
                    current_snapshot=live,
                    context=context,
                )
            result = {str(k): float(v) for k, v in (raw or {}).items()}
        except Exception as err:
            failed = True
            self._report(computer.name, err)
        finally:
            for module, mode in modes:
                module.training = mode
        if is_distributed():
            flag = torch.tensor([1.0 if failed else 0.0], dtype=torch.float64)
            failed = bool(all_reduce_(flag, "max").item())
        logger.debug("%s took %.3fs", computer.name, time.perf_counter() - start)
        return None if failed else result

    def _report(self, name: str, err: BaseException) -> None:
        key = (name, type(err).__name__)
        if key not in self._reported:
            self._reported.add(key)
            logger.warning(
                "analysis computer %r failed with %s: %s (skipped; further %s errors from it "
                "are not logged)",
                name,
                type(err).__name__,
                err,
                type(err).__name__,
            )
        logger.debug("traceback of %r", name, exc_info=err)

    def _log_once(self, name: str, reason: str, message: str) -> None:
        if (name, reason) not in self._skip_logged:
            self._skip_logged.add((name, reason))
            logger.info("%s: %s", name, message)

    def _new_snapshot(self, model: nn.Module) -> ParameterSnapshot:
        cfg = self.config
        self._snapshot_step = self.step_count
        return ParameterSnapshot(
            model,
            device=cfg.snapshot_device,
            dtype=SNAPSHOT_DTYPES[cfg.snapshot_dtype],
            trainable_only=cfg.trainable_only,
        )

    # --- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the step count, the snapshot and every computer's carried state."""
        self.step_count = 0
        self.old_snapshot = None
        self._snapshot_step = None
        self._anchor.clear()  # a base given with set_base stays: it is where the run started
        self.last_metrics = {}
        self.last_histograms = {}
        for computer in self.computers:
            computer.reset()

    def state_dict(self, include_snapshot: bool = False) -> dict[str, Any]:
        """What a checkpoint needs to resume the analysis.

        ``{"step_count", "config"}``; ``"computers"``: the carried state of each computer that
        has one (:meth:`MetricComputer.state_dict`), keyed ``"<position>:<name>"`` - always
        included, because it is small by contract (``mask_overlap`` keeps one bit per entry)
        and a resumed run needs it to match an uninterrupted one; ``"snapshot"`` (and
        ``"snapshot_param_dtypes"``) and the base of ``drift/*`` (``"base"``,
        ``"base_param_dtypes"``) only with ``include_snapshot=True``, because each is as large
        as the model. Tensors are returned as they are (no copies): save them with
        ``torch.save`` before training goes on.
        """
        state: dict[str, Any] = {"step_count": self.step_count, "config": self.config.to_dict()}
        computers = {
            _computer_key(i, c): s for i, c in enumerate(self.computers) if (s := c.state_dict())
        }
        if computers:
            state["computers"] = computers
        if include_snapshot and self.old_snapshot is not None:
            state["snapshot"] = self.old_snapshot.state_dict()
            state["snapshot_param_dtypes"] = {
                n: str(d).removeprefix("torch.") for n, d in self.old_snapshot.param_dtypes.items()
            }
        if include_snapshot:
            state.update(self._anchor.state())  # "base", "base_param_dtypes"
        return state

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module | None = None) -> None:
        """Restore :meth:`state_dict`; a different config is an error (it changes the keys).

        Computer states describe the measurement at ``step_count`` and continue exactly only
        from a baseline taken at that step: the saved snapshot, or - when the state holds none
        - ``model``, whose parameters must be the weights at ``step_count`` (e.g. just loaded
        from the same checkpoint) and which is snapshotted here if ``step_count`` is a
        measurement step (the HF callback does this). Without such a baseline the computer
        states are dropped and the manager re-baselines at its next measurement step.

        Raises:
            ValueError: ``state`` is not such a mapping, its config differs from this
                manager's, or it holds states for computers this manager does not have (then
                nothing is changed), or a computer rejects its state (then every computer is
                reset and nothing else is changed).
        """
        if not isinstance(state, Mapping) or "step_count" not in state:
            got = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                "an analysis state must be a mapping with 'step_count' (and optionally "
                "'config', 'computers', 'snapshot'), as returned by "
                f"ModelAnalysisManager.state_dict(); got {got}"
            )
        if "config" in state and AnalysisConfig.from_dict(state["config"]) != self.config:
            raise ValueError(
                "the saved analysis config differs from this manager's; construct the manager "
                "with AnalysisConfig.from_dict(state['config']) to resume it"
            )
        computer_states = self._checked_computer_states(state.get("computers", {}))
        step = int(state["step_count"])
        exact = "snapshot" in state or (model is not None and self.is_measurement_step(step))
        try:
            for i, computer in enumerate(self.computers):
                computer.load_state_dict(computer_states.get(_computer_key(i, computer), {}))
        except Exception:
            for computer in self.computers:
                computer.reset()
            raise
        self.step_count = step
        self.old_snapshot = None
        self._snapshot_step = None
        if "base" in state:
            self._anchor.load(state)
        self.last_metrics = {}
        self.last_histograms = {}
        if "snapshot" in state:
            snap = ParameterSnapshot(
                None,
                device=self.config.snapshot_device,
                dtype=SNAPSHOT_DTYPES[self.config.snapshot_dtype],
                trainable_only=self.config.trainable_only,
            )
            dtypes = state.get("snapshot_param_dtypes", {})
            for name, tensor in state["snapshot"].items():
                snap.data[name] = tensor.to(self.config.snapshot_device).clone()
                snap.param_dtypes[name] = getattr(torch, dtypes.get(name, ""), tensor.dtype)
                snap.shards[name] = ShardInfo(tuple(tensor.shape), 0, False, True)
            self.old_snapshot = snap
        elif exact and model is not None:
            self.on_optimizer_step(model, step=step)  # the baseline from the given weights
        if not exact or self.old_snapshot is None:
            for computer in self.computers:  # stale without a baseline at `step`
                computer.reset()

    def _checked_computer_states(self, states: Any) -> dict[str, Any]:
        """``states`` if every key names one of this manager's computers, else ValueError."""
        mine = [_computer_key(i, c) for i, c in enumerate(self.computers)]
        if not isinstance(states, Mapping):
            raise ValueError(f"state['computers'] must be a mapping, got {type(states).__name__}")
        unknown = sorted(str(k) for k in states if k not in mine)
        if unknown:
            raise ValueError(
                f"the saved state has computer states {unknown} but this manager's computers are "
                f"{mine}; add the same computers in the same order (create() with the same "
                "config, then the same add_metric calls) to resume it"
            )
        return dict(states)


    # --- the base of drift/* -----------------------------------------------------------------
    @property
    def base_snapshot(self) -> ParameterSnapshot | None:
        """The base that ``drift/*`` measures from (see :meth:`set_base`); ``None`` until set or
        taken. Lossless, on ``snapshot_device``, sharded like :attr:`old_snapshot`."""
        return self._anchor.snapshot

    def set_base(self, source: BaseSource, model: nn.Module | None = None) -> None:
        """Measure ``drift/*`` from ``source``: a model, a state dict, or a checkpoint path
        (safetensors or ``.pt`` file, or a Hugging Face model directory).

        Without this call the base is the weights at the first :meth:`on_optimizer_step` call,
        i.e. after the first optimizer step (the HF callback takes it at train begin instead,
        before any step). ``model`` is the model being trained: the base is checked against its
        parameters (names, shapes) and sharded like it now; without it the check happens
        against the interval snapshot if there is one, else at the next
        :meth:`on_optimizer_step` (a mismatch found then is a warning, and the base is taken
        from the live weights). See :mod:`~grail.trainer.analysis.anchor`.

        Raises:
            ValueError: names or shapes do not match the model.
            TypeError: ``source`` is none of the accepted kinds.
        """
        layout = None if model is not None else self.old_snapshot
        self._anchor.set(source, model=model, layout=layout)
        if not self._wants_base():
            logger.info("set_base: no computer reads the base (drift_enabled=False?)")

    def ensure_base(self, model: nn.Module) -> None:
        """Hold a base now: check a pending one against ``model``, or, when a computer needs a
        base and none is set, take it from ``model``'s weights. Never raises (problems are
        logged); the HF callback calls this at train begin."""
        try:
            if unsupported_engine(model) is None:
                reshard(model)  # FSDP2: local shards, as the interval snapshot holds them
                self._anchor.ensure(model, self._wants_base(), self.step_count)
        except Exception as err:  # the training loop must survive anything the analysis does
            self._report("base", err)
            self._anchor.clear(keep_explicit=False)
            self._anchor.failed = True  # not retried at every step; set_base or reset() retries

    def _wants_base(self) -> bool:
        return any(c.requires_base() for c in self.computers)

    def _check_base(self, model: nn.Module, live: ParameterSnapshot) -> None:
        """Re-take a base whose parameters no longer match the model's (one warning)."""
        base = self._anchor.snapshot
        if base is not None and not self._anchor.pending:
            self._anchor.follow(model, _spec_changes(base.spec(), live.spec()), self.step_count)

    def _agreed_base(self) -> ParameterSnapshot | None:
        """The base if every rank holds one (one tiny all-reduce when computers need it)."""
        base = None if self._anchor.pending else self._anchor.snapshot
        if is_distributed() and self._wants_base():
            flag = torch.tensor([0.0 if base is None else 1.0], dtype=torch.float64)
            if not all_reduce_(flag, "min").item():
                return None
        return base


def _computer_key(position: int, computer: MetricComputer) -> str:
    return f"{position}:{computer.name}"

def _spec_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    reshaped = [n for n in new if n in old and new[n] != old[n]]
    parts = []
    for label, names in (("added", added), ("removed", removed), ("reshaped/retyped", reshaped)):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            parts.append(f"{label}: {', '.join(names[:5])}{more}")
    return "; ".join(parts)
