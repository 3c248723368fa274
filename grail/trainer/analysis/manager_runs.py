"""Running the computers of a measurement: fail-safe, one at a time, results merged in order.

The methods live on :class:`ManagerRuns`, a base class of
:class:`~grail.trainer.analysis.manager.ModelAnalysisManager`. A computer that raises is
reported once per computer and error type (a warning naming it; the traceback at debug level)
and skipped; every module's ``training`` flag is restored after each computer, whatever it did;
two computers returning the same key keep the first value, with one warning naming both.

Example:
    >>> from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    >>> manager = ModelAnalysisManager(AnalysisConfig())
    >>> metrics, origin = {}, {}
    >>> manager._add(metrics, origin, "a/x", 1.0, "first")
    >>> manager._add(metrics, origin, "a/x", 2.0, "second")  # the first value stands
    >>> metrics, origin
    ({'a/x': 1.0}, {'a/x': 'first'})
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .core.logonce import LogOnce
from .core.snapshot import ParameterSnapshot
from .keys import parse_key
from .metrics.base import AnalysisContext, MetricComputer, MetricResult

__all__ = ["ManagerRuns"]

logger = logging.getLogger("grail.trainer.analysis.manager")

_BUILT_IN = "grail.trainer.analysis."  # the package's own computers


class ManagerRuns:
    """Run each computer fail-safely and merge what they return (see module docstring)."""

    computers: list[MetricComputer]
    old_snapshot: ParameterSnapshot | None
    last_histograms: dict[str, Any]
    _once: LogOnce

    def _waiting(self, computer: MetricComputer, context: AnalysisContext) -> str | None:
        """Why ``computer`` cannot run on this rank (None: it can)."""
        try:
            if computer.requires_inputs() and context.inputs is None:
                return "no inputs passed"
            if computer.requires_model() and context.model is None:
                return "no model passed"
            if computer.requires_optimizer() and context.optimizer is None:
                return "no optimizer passed to on_optimizer_step"
        except Exception as err:
            self._report(computer.name, err)
            return "it failed to say what it requires"
        return None

    def _merge(
        self, results: list[dict[str, float] | None], histograms: list[dict[str, Any]]
    ) -> tuple[dict[str, float], dict[str, str]]:
        """Every kept result in computer order (the first value of a key stands) and, per key,
        the name of the computer it came from; sets :attr:`last_histograms` from the same
        computers."""
        metrics: dict[str, float] = {}
        origin: dict[str, str] = {}
        merged_histograms: dict[str, Any] = {}
        for computer, result, hist in zip(self.computers, results, histograms, strict=True):
            if result is None:
                continue
            for key, value in result.items():
                self._add(metrics, origin, key, value, computer.name)
            merged_histograms.update(hist)
        self.last_histograms = merged_histograms
        return metrics, origin

    def _add(
        self,
        metrics: dict[str, float],
        origin: dict[str, str],
        key: str,
        value: float,
        source: str,
    ) -> None:
        """``metrics[key] = value`` unless another computer set it first (one warning)."""
        if key in metrics:
            first = origin[key]
            self._warn_once(
                ("collision", first, source),
                "computers %r and %r both return %r (and maybe more keys); the first value "
                "stands",
                first,
                source,
                key,
            )
            return
        origin[key] = source
        metrics[key] = value

    def _run(
        self,
        computer: MetricComputer,
        delta: Any,
        live: ParameterSnapshot,
        context: AnalysisContext,
        model: nn.Module,
    ) -> MetricResult | None:
        """One computer's keys (as floats) and histograms, or None when it raised (logged)."""
        modes = [(m, m.training) for m in model.modules()]
        result: MetricResult | None = None
        start = time.perf_counter()
        try:
            with torch.no_grad():
                value = computer.compute(
                    delta=delta,
                    old_snapshot=self.old_snapshot,
                    current_snapshot=live,
                    context=context,
                )
            result = _checked_result(computer.name, value)
        except Exception as err:
            self._report(computer.name, err)
        else:
            self._check_grammar(computer, result.metrics)
        finally:
            for module, mode in modes:
                module.training = mode
        logger.debug("%s took %.3fs", computer.name, time.perf_counter() - start)
        return result

    def _check_grammar(self, computer: MetricComputer, metrics: dict[str, float]) -> None:
        """One warning per computer whose keys fall outside the key grammar (``family/name``,
        :func:`~.keys.parse_key`): they are returned and logged as they are, but a report
        cannot place them (it lists them under "Other metrics"). Built-in computers are
        held to the grammar by their tests and skipped here."""
        if type(computer).__module__.startswith(_BUILT_IN):
            return
        odd = [k for k in metrics if parse_key(k) is None]
        if odd:
            self._once.warning(
                ("grammar", computer.name),
                "%s returned keys outside the key grammar 'family/name' (%s): they are logged "
                "as they are, but reports list them under 'Other metrics'; name them "
                "'family/name', e.g. 'custom/largest_update'",
                computer.name, ", ".join(repr(k) for k in odd[:3]),
            )

    def _report(self, name: str, err: BaseException) -> None:
        """A computer (or the manager itself) raised: one warning per name and error type."""
        kind = type(err).__name__
        self._once.warning(
            ("failed", name, kind),
            "analysis computer %r failed with %s: %s (skipped; further %s errors from it are "
            "not logged)",
            name,
            kind,
            err,
            kind,
        )
        logger.debug("traceback of %r", name, exc_info=err)

    def _warn_once(self, key: tuple[str, ...], message: str, *args: Any) -> None:
        self._once.warning(("warn", *key), message, *args)


def _checked_result(name: str, value: Any) -> MetricResult:
    """What ``compute`` returned, as a :class:`MetricResult` of floats; a ``TypeError`` naming
    the computer and the key when it is not a mapping of string keys to numbers."""
    if value is not None and not isinstance(value, (Mapping, MetricResult)):
        raise TypeError(f"{name}.compute returned a {type(value).__name__}; return a dict of "
                        "'family/name' keys to numbers, or a MetricResult")
    raw = MetricResult.of(value)
    metrics: dict[str, float] = {}
    for key, number in raw.metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} returned the key {key!r}; keys are 'family/name' strings")
        try:
            metrics[key] = float(number)
        except (TypeError, ValueError):
            shown = repr(number)[:60]
            raise TypeError(f"{name} returned {key!r} = {shown}, not a number") from None
    return MetricResult(metrics, dict(raw.histograms))
