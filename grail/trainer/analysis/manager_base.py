"""The base of ``drift/*`` on the manager: set it, take it, check it, agree on it.

The methods live on :class:`ManagerBase`, a base class of
:class:`~grail.trainer.analysis.manager.ModelAnalysisManager`; the snapshot itself and how it is
read from a model, a state dict or a checkpoint are :mod:`~grail.trainer.analysis.anchor`'s.

Example:
    >>> import torch
    >>> from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    >>> model = torch.nn.Linear(2, 2)
    >>> analyzer = ModelAnalysisManager.create(AnalysisConfig(drift_enabled=True))
    >>> analyzer.set_base(model, model=model)
    >>> sorted(analyzer.base_snapshot.data)
    ['bias', 'weight']
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from .anchor import BaseAnchor, BaseSource
from .core.distributed import agree, is_distributed
from .core.engines import reshard, unsupported_engine
from .core.snapshot import ParameterSnapshot
from .metrics.base import MetricComputer

__all__ = ["ManagerBase", "spec_changes"]

logger = logging.getLogger("grail.trainer.analysis.manager")


class ManagerBase:
    """The base snapshot that ``drift/*`` measures from (see :meth:`set_base`)."""

    computers: list[MetricComputer]
    step_count: int
    old_snapshot: ParameterSnapshot | None
    _anchor: BaseAnchor
    _fitted: tuple[int, float] | None
    _report: Callable[[str, BaseException], None]  # the manager's: log once, never raise

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
            ValueError: names or shapes do not match the model; a computer's configuration
                does not fit it (``MaskFileError``: a reference mask of ``drift/overlap/*``),
                checked here when the base is checked.
            TypeError: ``source`` is none of the accepted kinds.
        """
        layout = None if model is not None else self.old_snapshot
        self._anchor.set(source, model=model, layout=layout)
        self._check_fit()
        if not self._wants_base():
            logger.info("set_base: no computer reads the base (drift_enabled=False?)")

    def ensure_base(self, model: nn.Module) -> None:
        """Hold a base now: check a pending one against ``model``, or, when a computer needs a
        base and none is set, take it from ``model``'s weights; the HF callback calls this at
        train begin. Problems taking it are logged, never raised; a computer whose
        configuration does not fit the model raises (:meth:`MetricComputer.check_base`)."""
        self._take_base(model)
        self._check_fit()

    def _take_base(self, model: nn.Module) -> None:
        """:meth:`ensure_base` without the fit check: never raises."""
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

    def _check_fit(self) -> None:
        """Each computer checks its configuration against a base it has not seen (O(1)
        otherwise); what a check raises propagates (a configuration mistake). A base
        re-taken inside a measurement (the architecture changed) is checked at the next call."""
        base = self._anchor.snapshot
        if base is None or self._anchor.pending:
            return
        key = (id(base), base.timestamp)
        if key == self._fitted:
            return
        self._fitted = key  # raised once: the computer itself copes at later measurements
        for computer in self.computers:
            computer.check_base(base)

    def _check_base(self, model: nn.Module, live: ParameterSnapshot) -> None:
        """Re-take a base whose parameters no longer match the model's (one warning)."""
        base = self._anchor.snapshot
        if base is not None and not self._anchor.pending:
            self._anchor.follow(model, spec_changes(base.spec(), live.spec()), self.step_count)

    def _agreed_base(self) -> ParameterSnapshot | None:
        """The base if every rank holds one (one tiny all-reduce when computers need it)."""
        base = None if self._anchor.pending else self._anchor.snapshot
        if is_distributed() and self._wants_base():
            _, low = agree([0 if base is None else 1])
            if not low[0]:
                return None
        return base


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two layouts (:meth:`ParameterSnapshot.spec`), in words; ``""`` when
    nothing does.

    >>> spec_changes({"a": 1, "b": 2}, {"a": 3, "c": 2})
    'added: c; removed: b; reshaped/retyped: a'
    """
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    reshaped = [n for n in new if n in old and new[n] != old[n]]
    parts = []
    for label, names in (("added", added), ("removed", removed), ("reshaped/retyped", reshaped)):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            parts.append(f"{label}: {', '.join(names[:5])}{more}")
    return "; ".join(parts)
