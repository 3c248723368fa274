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
between measurements, one warning names them and the snapshot is re-baselined. The one error
that does propagate is a configuration that does not fit the model, which a computer finds when
a new base is taken (:meth:`~.metrics.base.MetricComputer.check_base`, e.g. a reference mask of
``drift/overlap/*`` written for another model): raised once, from ``set_base``, ``ensure_base``
or ``on_optimizer_step``, since measuring on would only report NaN.

Agreement across ranks. In a process group no rank may take a branch that issues a collective
alone, so every such decision is put to a vote, one small integer all-reduce each: the step and
the layout on every call, whether and what to measure before the computers, and which results to
keep after them (:mod:`.manager_votes` describes each vote). In one process every vote is the
local value and nothing extra is computed.

Decisions where the design is silent:

* ``on_optimizer_step(..., step=N)`` sets the step counter to ``N`` (the HF callback passes the
  trainer's global step, so a resumed run keeps its schedule). ``N`` must be an integer (Python,
  numpy or a one-element integer torch tensor); anything else (``10.7``, ``"10"``, ``True``) is
  ignored with one warning and the call counts as the next step. A step below the counter (a run
  resumed from an earlier checkpoint) would compare against a snapshot from the future: one
  warning, and the snapshot and every computer's carried state are dropped, so the next
  measurement step takes a fresh snapshot.
* Computers run under ``torch.no_grad()``; the manager restores ``model.training`` of every
  module after each computer, whatever the computer did.
* Two computers returning the same key: the first value stands, and one warning names both.
* Histograms come only from what ``compute`` returns (a ``MetricResult``); attributes of a
  computer are never read. Every message is said once (:class:`~.core.logonce.LogOnce`), its
  repeats at debug level.
* ``param_change/replicas_diverged`` is the number of replicated parameter tensors (plain tensors
  in a process group, as under DDP) whose bits are not the same on every rank. It is reported at
  every measurement under a process group with at least one replicated parameter, and never
  otherwise, whichever computers are on (statistics count rank 0's replica only, so a replica
  that diverged would otherwise go unnoticed).
* ``snapshot_device`` must exist on this machine: the manager checks it at construction (the
  config itself does not, as it may be written elsewhere).
* ``state_dict()`` holds the step counter, the config and the computers' carried state (small:
  e.g. one bit per entry for ``mask_overlap``); the snapshot only with ``include_snapshot=True``
  (it is as large as the model). Without it, a resumed run re-baselines at its next measurement
  step, unless ``load_state_dict(state, model=...)`` gets the weights of a measurement step.

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

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .anchor import BaseAnchor
from .config import SNAPSHOT_DTYPES, AnalysisConfig
from .core.distributed import agree, is_distributed
from .core.engines import reshard, unsupported_engine
from .core.logonce import LogOnce
from .core.snapshot import ParameterSnapshot
from .manager_base import ManagerBase, spec_changes
from .manager_checks import check_device_exists, integer_step
from .manager_runs import ManagerRuns
from .manager_state import ManagerState
from .manager_votes import layout_hash, spec_hash, vote_results, vote_step
from .metrics.base import AnalysisContext, MetricComputer

__all__ = ["ModelAnalysisManager", "measurement_steps"]

logger = logging.getLogger(__name__)

#: What the manager passes to every ``compute`` (by keyword).
_COMPUTE_KEYWORDS = frozenset({"delta", "old_snapshot", "current_snapshot", "context"})

REPLICAS_KEY = "param_change/replicas_diverged"


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


class ModelAnalysisManager(ManagerBase, ManagerState, ManagerRuns):
    """Runs metric computers over parameter deltas every ``config.interval`` optimizer steps.

    Args:
        config: all options; ``None`` means ``AnalysisConfig()``.

    Attributes:
        last_metrics: the metrics of the last measurement.
        last_histograms: the histograms of the last measurement, ``name -> sampled values``:
            those of the computers that returned a
            :class:`~grail.trainer.analysis.metrics.base.MetricResult` (and whose keys were
            kept); for sinks, ``sink.log(metrics, step, histograms=manager.last_histograms)``.

    Raises:
        ValueError: ``config.snapshot_device`` does not exist on this machine.
    """

    def __init__(self, config: AnalysisConfig | None = None) -> None:
        if config is not None and not isinstance(config, AnalysisConfig):
            raise TypeError(
                f"config must be an AnalysisConfig, got {type(config).__name__}; build one with "
                "AnalysisConfig(...) or AnalysisConfig.from_dict(...)"
            )
        if config is not None:
            config.validate()  # fields may have been set after construction
        self.config = config or AnalysisConfig()
        check_device_exists(self.config.snapshot_device)
        self.computers: list[MetricComputer] = []
        self.step_count = 0
        self.old_snapshot: ParameterSnapshot | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_histograms: dict[str, Any] = {}
        # one of each message, repeats at debug level (fail-safety must not flood the log)
        self._once = LogOnce(logger, repeat_level=logging.DEBUG)
        self._anchor = BaseAnchor(self.config.snapshot_device, self.config.trainable_only)
        self._snapshot_step: int | None = None  # step whose weights old_snapshot holds
        self._fitted: tuple[int, float] | None = None  # the base the computers have checked

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
        kind = type(computer)
        params = inspect.signature(computer.compute).parameters.values()
        named = {p.name for p in params}
        if not any(p.kind == p.VAR_KEYWORD for p in params) and not named >= _COMPUTE_KEYWORDS:
            raise TypeError(
                f"{kind.__name__}.compute must accept the keyword arguments the manager passes "
                f"({', '.join(sorted(_COMPUTE_KEYWORDS))}): add **kwargs to its signature"
            )
        if kind.state_dict is not MetricComputer.state_dict and kind.reset is MetricComputer.reset:
            raise TypeError(
                f"{kind.__name__} carries state (it overrides state_dict()) but does not "
                "override reset(): the manager calls reset() to drop that state (reset(), a "
                "resume without an exact baseline, a step going back); implement reset() to "
                "forget it"
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
        """Call once after every ``optimizer.step()``, on every rank; returns metrics on
        measurement steps.

        Never raises because of a measurement: problems are logged and ``{}`` is returned. The
        one exception is a configuration that does not fit the model, found when the base is
        taken (a reference mask of another model: ``MaskFileError``, see
        :meth:`MetricComputer.check_base`).
        """
        try:
            if not self._advance(step):
                return {}
            if self._anchor.needs_work(self._wants_base()):
                self._take_base(model)
        except Exception as err:  # the training loop must survive anything the analysis does
            self._report("manager", err)
            return {}
        self._check_fit()  # a configuration that does not fit the model raises (check_base)
        try:
            if not self.is_measurement_step():
                return {}
            if not self.computers:
                self._warn_once(
                    ("no-computers",),
                    "no metric computer is registered, so every measurement returns {}: "
                    "enable a family in AnalysisConfig (e.g. param_change_enabled=True) or "
                    "add one with add_metric()",
                )
            return self._measure(model, inputs, optimizer, metadata)
        except Exception as err:  # the training loop must survive anything the analysis does
            self._report("manager", err)
            return {}

    def _advance(self, step: Any) -> bool:
        """Set the step counter for this call (agreed across ranks); False when the ranks'
        configs or computers differ, so that nothing is measured."""
        wanted = self.step_count + 1
        if step is not None:
            given = integer_step(step)
            if given is None:
                self._warn_once(
                    ("step-type",),
                    "on_optimizer_step(step=%r) is not an integer; it is ignored and this call "
                    "counts as step %d",
                    step,
                    wanted,
                )
            else:
                wanted = given
        same_layout = True
        if is_distributed():
            layout = layout_hash(self.config, self.computers)
            wanted, same_layout = vote_step(wanted, layout, self._once)
        previous, self.step_count = self.step_count, wanted
        if wanted < previous:
            self._warn_once(
                ("step-back",),
                "the step went back from %d to %d (a resumed run?): the snapshot is from a later "
                "step, so the analysis re-baselines at the next measurement step",
                previous,
                wanted,
            )
            self.old_snapshot = None
            for computer in self.computers:
                computer.reset()
        return same_layout

    def _measure(
        self,
        model: nn.Module,
        inputs: Any,
        optimizer: torch.optim.Optimizer | None,
        metadata: dict[str, Any],
    ) -> dict[str, float]:
        distributed = is_distributed()
        cfg = self.config
        # --- this rank's view, without collectives: a failure still votes below -------------
        broken = False
        engine: str | None = None
        live: ParameterSnapshot | None = None
        changed, spec_key = "", 0
        context = AnalysisContext()
        waiting: list[str | None] = [None] * len(self.computers)  # why a computer cannot run
        try:
            engine = unsupported_engine(model)
            if engine is None:
                reshard(model)  # FSDP2: analyse local shards, whatever the last forward left
                live = ParameterSnapshot.live(model, trainable_only=cfg.trainable_only)
                if len(live) == 0:
                    self._warn_once(
                        ("nothing-analysed",),
                        "no parameter is analysed, so every measurement returns {}: %s",
                        "trainable_only=True and no parameter requires grad (a merged or "
                        "frozen model?): unfreeze it or set trainable_only=False"
                        if cfg.trainable_only else "the model has no floating-point parameter",
                    )
                if self.old_snapshot is not None:
                    changed = spec_changes(self.old_snapshot.spec(), live.spec())
                if distributed:
                    spec_key = spec_hash(live)
            context = AnalysisContext(
                model=model,
                inputs=inputs,
                attention_mask=_attention_mask(inputs),
                optimizer=optimizer,
                step=self.step_count,
                metadata=dict(metadata),
            )
            waiting = [self._waiting(c, context) for c in self.computers]
        except Exception as err:
            if not distributed:
                raise
            self._report("manager", err)
            broken = True
        rebase = self.old_snapshot is None or bool(changed)
        flags = [w is not None for w in waiting]
        high, low = agree([broken, engine is not None, rebase, spec_key, *flags])
        if high[0]:
            if not broken:
                self._once.info(("skip", "manager", "peer-broken"), "manager: the analysis failed "
                                "on another rank; every rank skips this measurement")
            return {}
        if high[1]:
            self._warn_once(
                ("engine", engine or "another rank"),
                "%s partitions parameters into placeholders outside their forward; the analysis "
                "cannot read them and reports nothing for this model",
                engine or "a sharding engine on another rank",
            )
            return {}
        if live is not None:
            self._check_base(model, live)  # a base of another architecture is re-taken too
        if high[2] or high[3] != low[3]:
            self._explain_rebaseline(changed, high[3] != low[3])
            self.old_snapshot = None  # free the old buffers before allocating new ones
            self.old_snapshot = self._new_snapshot(model)
            return {}
        assert live is not None and self.old_snapshot is not None
        context.base = self._agreed_base()
        context.snapshot_step = self._snapshot_step
        delta = self.old_snapshot.compute_delta(live)
        replicated = [n for n in live.data if not live.shards[n].sharded] if distributed else []
        results: list[dict[str, float] | None] = []
        histograms: list[dict[str, Any]] = []
        for computer, local, anywhere in zip(self.computers, waiting, high[4:], strict=True):
            result = None
            if anywhere:
                reason = local or "another rank has no inputs, model or optimizer for it"
                where = " on every rank" if distributed else ""
                self._once.info(("skip", computer.name, reason), "%s: %s; skipping%s",
                                computer.name, reason, where)
            else:
                result = self._run(computer, delta, live, context, model)
            results.append(None if result is None else result.metrics)
            histograms.append({} if result is None else dict(result.histograms))
        names = [c.name for c in self.computers]
        skipped = [bool(f) for f in high[4:]]
        diverged = vote_results(results, skipped, names, live, replicated, self._once)
        metrics, origin = self._merge(results, histograms)
        if diverged is not None:
            self._add(metrics, origin, REPLICAS_KEY, float(diverged), "manager")
        try:
            self.old_snapshot.capture_(model)
            self._snapshot_step = self.step_count
        except BaseException:
            self.old_snapshot = None  # a half-refilled baseline would give wrong numbers later
            raise
        self.last_metrics = metrics
        return metrics

    def _explain_rebaseline(self, changed: str, ranks_differ: bool) -> None:
        if ranks_differ:
            self._warn_once(
                ("ranks-differ",),
                "ranks hold different parameters (names, global shapes or dtypes); every rank "
                "re-baselines without metrics until they agree",
            )
        elif changed:
            logger.warning(
                "model parameters changed since the last snapshot (%s); re-baselining without "
                "metrics this step",
                changed,
            )
        elif self.old_snapshot is not None:
            logger.info("another rank re-baselines (no snapshot or changed parameters there); "
                        "so does this one")

    def _new_snapshot(self, model: nn.Module) -> ParameterSnapshot:
        cfg = self.config
        self._snapshot_step = self.step_count
        return ParameterSnapshot(
            model,
            device=cfg.snapshot_device,
            dtype=SNAPSHOT_DTYPES[cfg.snapshot_dtype],
            trainable_only=cfg.trainable_only,
        )
