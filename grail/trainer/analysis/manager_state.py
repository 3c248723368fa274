"""Checkpointing the analysis: what :meth:`ModelAnalysisManager.state_dict` saves and how
:meth:`~ModelAnalysisManager.load_state_dict` resumes it (and :meth:`~ModelAnalysisManager.reset`).

The methods live on :class:`ManagerState`, a base class of
:class:`~grail.trainer.analysis.manager.ModelAnalysisManager`: one concern per module, one
public class. See the manager's module docstring for the decisions (what a state holds, when a
resumed run continues exactly).

Example:
    >>> from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    >>> state = ModelAnalysisManager.create(AnalysisConfig(interval=3)).state_dict()
    >>> sorted(state), state["step_count"]
    (['config', 'step_count'], 0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .anchor import BaseAnchor
from .config import SNAPSHOT_DTYPES, AnalysisConfig
from .core.engines import reshard
from .core.snapshot import ParameterSnapshot
from .metrics.base import MetricComputer

__all__ = ["ManagerState"]


class ManagerState:
    """Reset, save and restore the manager's step counter, snapshots and computer states."""

    config: AnalysisConfig
    computers: list[MetricComputer]
    step_count: int
    old_snapshot: ParameterSnapshot | None
    last_metrics: dict[str, float]
    last_histograms: dict[str, Any]
    _anchor: BaseAnchor
    _snapshot_step: int | None
    # the manager's own (ModelAnalysisManager)
    on_optimizer_step: Callable[..., dict[str, float]]
    is_measurement_step: Callable[..., bool]

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
        and a resumed run needs it to match an uninterrupted one; ``"snapshot"`` (with
        ``"snapshot_param_dtypes"``, ``"snapshot_shards"``: where this rank's pieces sit, and
        ``"snapshot_step"``: when they were taken) and the base of
        ``drift/*`` (``"base"``, ``"base_param_dtypes"``, ``"base_shards"``, ``"base_uid"``)
        only with ``include_snapshot=True``, because each is as large as the model (this
        rank's part of it). Tensors are returned as they are (no copies): save them with
        ``torch.save`` before training goes on.
        """
        state: dict[str, Any] = {"step_count": self.step_count, "config": self.config.to_dict()}
        computers = {
            _computer_key(i, c): s for i, c in enumerate(self.computers) if (s := c.state_dict())
        }
        if computers:
            state["computers"] = computers
        if include_snapshot and self.old_snapshot is not None:
            layout = self.old_snapshot.layout_state()
            state["snapshot"] = self.old_snapshot.state_dict()
            state["snapshot_param_dtypes"] = layout["param_dtypes"]
            state["snapshot_shards"] = layout["shards"]  # where this rank's pieces sit
            state["snapshot_step"] = self._snapshot_step
        if include_snapshot:
            state.update(self._anchor.state())  # "base" and its dtypes, shards and uid
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
            live = None
            if model is not None and "snapshot_shards" not in state:
                reshard(model)  # FSDP2: local shards, as the saved snapshot holds them
                live = ParameterSnapshot.live(model, self.config.trainable_only)
            self.old_snapshot = ParameterSnapshot.restored(
                state["snapshot"],
                state.get("snapshot_param_dtypes", {}),
                state.get("snapshot_shards", {}),
                device=self.config.snapshot_device,
                dtype=SNAPSHOT_DTYPES[self.config.snapshot_dtype],
                trainable_only=self.config.trainable_only,
                live=live,
            )
            saved_step = state.get("snapshot_step")
            self._snapshot_step = saved_step if isinstance(saved_step, int) else None
        elif exact and model is not None:
            try:
                self.on_optimizer_step(model, step=step)  # the baseline from the given weights
            except Exception:  # e.g. a computer's configuration does not fit the model
                for computer in self.computers:
                    computer.reset()  # carried state without its baseline would be stale
                raise
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


def _computer_key(position: int, computer: MetricComputer) -> str:
    return f"{position}:{computer.name}"
