"""The plug-in interface: a computer turns a delta (and optionally the model) into floats.

A subclass writes :meth:`MetricComputer.compute` and nothing else. The manager schedules it,
passes only what it asks for, skips it (logging once) when it raises, and makes sure it runs on
every rank. ``compute`` is always called with keyword arguments, so the minimal form works::

    class DeltaCount(MetricComputer):
        name = "custom"

        def compute(self, delta, **kwargs):
            return {"custom/tensors": float(len(delta))}

A computer that runs forward passes declares it with ``requires_model()``/``requires_inputs()``;
one that reads gradients or optimizer state with ``requires_optimizer()``. The manager never
tests for a concrete class.

``compute`` returns the keys as a plain ``dict`` or, when it also has sampled distributions for
histogram loggers, as a :class:`MetricResult` (a read-only mapping of the keys that carries
``histograms`` beside them); the manager collects both into ``on_optimizer_step``'s return
value and ``manager.last_histograms``. Two computers that share work do it through the
measurement's :class:`AnalysisContext` (:meth:`AnalysisContext.shared`), never through
references to each other.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.logonce import LogOnce
from ..patching.forward import UnusableInputs

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from ..config import AnalysisConfig
    from ..core.snapshot import ParameterDelta, ParameterSnapshot

__all__ = ["AnalysisContext", "MetricComputer", "MetricResult"]

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class MetricResult(Mapping[str, float]):
    """What a computer returns when it has histograms besides its keys.

    ``metrics`` are the keys (``{"family/name": value}``); ``histograms`` map a name such as
    ``"gradient/abs_grad"`` to sampled values (a 1-D numpy array) for histogram loggers. The
    result reads as the mapping of its ``metrics``, so code that indexes or iterates a computer's
    return value works whichever of the two forms it gets; equality with a mapping compares the
    metrics.

    >>> import numpy as np
    >>> r = MetricResult({"demo/norm": 1.5}, {"demo/values": np.array([0.5, 2.0])})
    >>> r["demo/norm"], list(r), r == {"demo/norm": 1.5}
    (1.5, ['demo/norm'], True)
    >>> MetricResult.of({"demo/norm": 1.5}).histograms, MetricResult.of(None).metrics
    ({}, {})
    """

    metrics: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Mapping[str, float] | None) -> MetricResult:
        """``value`` itself if it is a :class:`MetricResult`, else its keys without histograms
        (``None`` counts as no keys)."""
        if isinstance(value, MetricResult):
            return value
        return cls(dict(value or {}))

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def __repr__(self) -> str:
        return f"MetricResult({self.metrics!r}, histograms={sorted(self.histograms)!r})"


@dataclass
class AnalysisContext:
    """What a measurement step knows besides the parameters.

    ``inputs`` is whatever the caller passed (dict, ``BatchEncoding``, tensor, tuple or None);
    ``attention_mask`` is extracted from it when present; ``metadata`` holds the extra keyword
    arguments of ``on_optimizer_step``. ``base`` is the base snapshot (the run's starting
    weights, see :meth:`~grail.trainer.analysis.ModelAnalysisManager.set_base`) when one is held
    on every rank, for computers that declare :meth:`MetricComputer.requires_base`;
    ``snapshot_step`` is the step at which the interval snapshot (``old_snapshot``) was captured
    (``None`` when unknown, e.g. restored from a state dict). A context lives for one measurement;
    :meth:`shared` lets computers reuse each other's work within it.
    """

    model: nn.Module | None = None
    inputs: Any = None
    attention_mask: torch.Tensor | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    base: ParameterSnapshot | None = None
    snapshot_step: int | None = None
    _shared: dict[Hashable, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def shared(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()`` the first time ``key`` is asked for in this measurement, the same object
        afterwards: the full model's logits on the probe batch, for instance, are computed once
        for the sparse and the low-rank computers. Every rank asks in the same order, so work
        with collectives inside ``make`` stays aligned.

        >>> ctx = AnalysisContext()
        >>> ctx.shared("x", lambda: [1]) is ctx.shared("x", lambda: [2])
        True
        """
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def share(self, key: Hashable, value: Any) -> None:
        """Set (or replace) what :meth:`shared` returns for ``key``."""
        self._shared[key] = value

    def take(self, key: Hashable) -> Any:
        """Remove and return what was shared under ``key`` (``None`` if nothing): for work
        handed from one computer to the next that must be used at most once.

        >>> ctx = AnalysisContext()
        >>> ctx.share("x", 1)
        >>> ctx.take("x"), ctx.take("x")
        (1, None)
        """
        return self._shared.pop(key, None)


class MetricComputer(ABC):
    """Base class of every metric family (see module docstring).

    A subclass that sets no ``name`` is named after its class, so log messages say which
    computer spoke:

    >>> class Norms(MetricComputer):
    ...     def compute(self, delta=None, **kwargs):
    ...         return {}
    >>> Norms().name
    'Norms'
    """

    #: Who is speaking in log messages (usually the prefix of the keys); defaults to the class
    #: name.
    name: str = "MetricComputer"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # An explicit ``name`` (here or in a parent other than this base) is kept; a name that
        # was itself only a default is not inherited.
        if "name" not in cls.__dict__:
            source = next(k for k in cls.__mro__[1:] if "name" in k.__dict__)
            if source is MetricComputer or source.__dict__.get("_default_name"):
                cls.name = cls.__name__
                cls._default_name = True

    @abstractmethod
    def compute(
        self,
        delta: ParameterDelta | None = None,
        old_snapshot: ParameterSnapshot | None = None,
        current_snapshot: ParameterSnapshot | None = None,
        context: AnalysisContext | None = None,
        **kwargs: Any,
    ) -> dict[str, float] | MetricResult:
        """Return ``{"family/name": value}`` for one measurement (or a :class:`MetricResult`
        that also carries histograms)."""

    @classmethod
    def from_config(
        cls,
        config: AnalysisConfig,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> MetricComputer:
        """The computer an :class:`~grail.trainer.analysis.config.AnalysisConfig` describes.

        Every built-in family implements it (``ModelAnalysisManager.create`` builds each
        enabled family this way); ``output_fn`` maps a model output to logits for the families
        that run forward passes and is ignored by the others. A custom computer need not
        implement it: construct it and pass it to ``add_metric``.
        """
        raise NotImplementedError(
            f"{cls.__name__} is not built from an AnalysisConfig; construct it and pass it to "
            "ModelAnalysisManager.add_metric()"
        )

    def requires_model(self) -> bool:
        """True if :attr:`AnalysisContext.model` must be set."""
        return False

    def requires_inputs(self) -> bool:
        """True if the computer needs a batch (:attr:`AnalysisContext.inputs`)."""
        return False

    def requires_optimizer(self) -> bool:
        """True if the computer reads the optimizer (or gradients) at the measurement step."""
        return False

    def requires_base(self) -> bool:
        """True if the computer reads :attr:`AnalysisContext.base`: the manager then holds a base
        snapshot (taken at the first ``on_optimizer_step`` unless ``set_base`` gave one)."""
        return False

    def check_base(self, base: ParameterSnapshot) -> None:  # noqa: B027 - an optional hook
        """Raise if this computer's configuration does not fit the model whose base was just
        taken (``base``: its names, and ``base.shards[n].global_shape``).

        Called by the manager once per new base, on every rank, when the base is set with a
        model to check against or taken at ``on_optimizer_step``. Unlike :meth:`compute`, an
        exception raised here is not logged and skipped: it propagates to the caller
        (``set_base``, ``ensure_base`` or ``on_optimizer_step``), because it is a configuration
        mistake, not a measurement failure. The check must depend only on what every rank
        holds alike (global shapes, files), so that every rank raises or none does.
        """

    def reset(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Forget state carried across measurements (called by ``manager.reset()``)."""

    def _once(self) -> LogOnce:
        """This computer's :class:`~grail.trainer.analysis.core.logonce.LogOnce` (its module's
        logger), made on first use: subclasses need not call ``super().__init__()``."""
        once = self.__dict__.get("_log_once")
        if once is None:
            once = self.__dict__["_log_once"] = LogOnce(logging.getLogger(type(self).__module__))
        return once

    def log_once(self, message: str) -> None:
        """Log ``message`` at INFO level the first time this computer says it."""
        self._once().info(("info", message), "%s: %s", self.name, message)

    def warn_once(self, key: Hashable, message: str, *args: Any) -> None:
        """Log ``message % args`` as a warning the first time this computer meets ``key``."""
        self._once().warning(("warning", key), message, *args)

    def skip(self, reason: str) -> dict[str, float]:
        """Return ``{}`` for this measurement, logging ``reason`` once per computer (INFO).

        For conditions that are not errors - no batch, no optimizer state, nothing to analyse -
        so the metric quietly steps aside without repeating itself every interval.
        """
        self.log_once(f"metrics skipped: {reason}")
        return {}

    def skip_inputs(self, reason: str) -> dict[str, float]:
        """:meth:`skip` for the forward-pass metrics (see :meth:`note_inputs`)."""
        self.note_inputs(reason)
        return {}

    def note_inputs(self, reason: str, what: str = "forward-pass metrics") -> None:
        """Log once why ``what`` did not run: a warning when inputs were passed but cannot be
        used (:class:`~grail.trainer.analysis.patching.forward.UnusableInputs`: the caller
        expects these keys), INFO otherwise (no inputs at this step, another rank's)."""
        if isinstance(reason, UnusableInputs):
            self.warn_once(("inputs", reason), "%s: %s skipped: %s", self.name, what, reason)
        else:
            self.log_once(f"{what} skipped: {reason}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def state_dict(self) -> dict[str, Any]:
        """State carried across measurements, for checkpoints; ``{}`` (the default) if none.

        Override together with :meth:`load_state_dict` and :meth:`reset` (which the manager
        calls to drop the state; ``add_metric`` refuses a computer without it) in a computer
        that remembers something from one measurement to the next. Tensors are allowed (the
        manager's state is saved with ``torch.save``); keep it small - it is saved with every
        checkpoint - and local to this rank in a process group.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; ``{}`` means "nothing carried": reset.

        The default accepts only ``{}``: a computer that saves state must say how to load it.
        """
        if state:
            raise ValueError(
                f"{type(self).__name__} ({self.name!r}) got a saved state with keys "
                f"{sorted(map(str, state))} but does not override load_state_dict(); implement "
                "it (and state_dict()) to carry state across checkpoints"
            )
        self.reset()
