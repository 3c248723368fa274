r"""What the gradient and Adam families read, and the one pass over the gradients they share.

Both families read the optimizer's view of a measurement step: ``p.grad`` (``gradient/*``) and
Adam's state (``adam_sign/*``, whose normalised update is
:math:`u = (m \cdot s) / (\sqrt{v} + \epsilon \sqrt{1-\beta_2^t})` with
:math:`s = \sqrt{1-\beta_2^t} / (1-\beta_1^t)`). The helpers here read that state
(:func:`adam_entries`, :func:`adam_inputs`, :func:`bias_corrections`, :func:`u_constants`,
:func:`real_view`).

:class:`OptimizerPass` is how the two computers share work without knowing each other. On CPU,
with the compiled kernels, one loop per parameter can read the gradient once for both families
(:func:`~grail.trainer.analysis.kernels.joint_rows`). The pass is a frozen declaration of what
both families need (their float32 thresholds and which parameters the Adam family reads); both
computers built from one config hold equal declarations, and whichever of them runs first in a
measurement computes the joint rows of every parameter through
:meth:`~.base.AnalysisContext.shared`, keyed by the declaration. Each computer then takes its
own half (:class:`JointRows`); a row is used at most once. The numbers are those of the two
computers run apart (tested).

Decisions where the design is silent:

* The joint rows are computed only where both families would use the kernels for the parameter
  (a dense, contiguous gradient and Adam state, owned by this rank, of a size that
  :func:`~grail.trainer.analysis.kernels.joint_rows` takes) and only when each family's
  measurement is large enough for the kernels (:func:`~grail.trainer.analysis.kernels.worth_it`),
  the same conditions under which each computer alone would use them. Without a model or an
  optimizer in the context there is nothing to share.
* The declaration is built by :meth:`OptimizerPass.from_config` only when both families and
  ``fused_kernels`` are on; a computer built by hand shares only when it is given one.

Example:
    >>> from grail.trainer.analysis.config import AnalysisConfig
    >>> OptimizerPass.from_config(AnalysisConfig()) is None  # the families are off
    True
    >>> p = OptimizerPass.from_config(AnalysisConfig(gradient_enabled=True,
    ...                                               adam_sign_enabled=True))
    >>> p == OptimizerPass.build([0.0, 1e-8, 1e-6], tolerance=0.1, trainable_only=False)
    True
    >>> OptimizerPass.build([1e-6], 0.1, False).rows(AnalysisContext()).adam  # no optimizer
    {}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import kernels
from ..config import AnalysisConfig
from ..core import zero
from ..core.distributed import ShardInfo, local_tensor, shard_info
from ..core.snapshot import collect_parameters
from ..core.stats import f32_floor
from .base import AnalysisContext

__all__ = [
    "JointRows",
    "OptimizerPass",
    "Scalar",
    "adam_entries",
    "adam_inputs",
    "bias_corrections",
    "real_view",
    "u_bounds",
    "u_constants",
]

Scalar = float | torch.Tensor

#: ``|u|`` below this is "small" (noise-dominated), for ``adam_sign/frac_small``.
SMALL_U = 0.1


def real_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a complex ``t`` viewed as real pairs (as torch's optimizers read it)."""
    return torch.view_as_real(t) if t.is_complex() else t


def bias_corrections(step: Any, beta1: float, beta2: float) -> tuple[Scalar, Scalar]:
    """``(1 - beta1^t, sqrt(1 - beta2^t))`` as torch computes them.

    A step held on an accelerator (``capturable``/``fused``) stays there: no host sync.

    >>> bc1, bc2s = bias_corrections(torch.tensor(2.0), 0.9, 0.99)
    >>> round(bc1, 6), round(bc2s ** 2, 6)
    (0.19, 0.0199)
    """
    if isinstance(step, torch.Tensor) and step.device.type != "cpu":
        t = step.float()
        return 1 - torch.pow(beta1, t), (1 - torch.pow(beta2, t)).sqrt()
    t = float(step)
    return 1.0 - beta1**t, (1.0 - beta2**t) ** 0.5


def u_constants(bc1: Scalar, bc2s: Scalar, eps: float) -> tuple[Scalar, Scalar]:
    """``(scale, shift)`` of :func:`~grail.trainer.analysis.kernels.adam_u` from the bias
    corrections of :func:`bias_corrections` and ``eps``.

    >>> u_constants(0.5, 0.25, 1e-8)
    (0.5, 2.5e-09)
    """
    return bc2s / bc1, eps * bc2s


def u_bounds(tolerance: float) -> tuple[float, float, float]:
    """``(small, lo, hi)``: the thresholds ``t`` of the exact counts ``|u| <= t`` behind
    ``frac_small`` (``|u| < 0.1``) and ``frac_near_one`` (``1 - tol <= |u| <= 1 + tol``): a
    strict ``<`` is the count ``<=`` the largest double below.

    >>> u_bounds(0.5)[1:]
    (0.49999999999999994, 1.5)
    """
    return math.nextafter(SMALL_U, 0.0), math.nextafter(1.0 - tolerance, 0.0), 1.0 + tolerance


def adam_entries(
    optimizer: Any, params: Sequence[tuple[str, torch.Tensor]]
) -> list[tuple[str, Any, dict[str, Any], dict[str, Any]]]:
    """``(name, parameter, state, param_group)`` of the parameters that have Adam state.

    Under a DeepSpeed ZeRO optimizer the "parameter" is a :class:`~..core.zero.StatePiece`:
    this rank's piece of the state with the weights and gradient entries it belongs to.
    """
    pieces = zero.state_pieces(optimizer, list(params))
    if pieces is not None:
        candidates = [(name, piece, piece.state, piece.group) for name, piece in pieces]
    else:
        groups = {id(p): g for g in getattr(optimizer, "param_groups", []) for p in g["params"]}
        state = getattr(optimizer, "state", {})
        candidates = [
            (name, p, state.get(p) if id(p) in groups else None, groups.get(id(p)))
            for name, p in params
        ]
    out = []
    for name, p, st, group in candidates:
        if not st or not all(k in st for k in ("exp_avg", "exp_avg_sq", "step")):
            continue
        if "betas" not in group or "eps" not in group or "lr" not in group:
            continue
        if group.get("amsgrad") and "max_exp_avg_sq" not in st:
            continue
        out.append((name, p, st, group))
    return out


def held(p: Any) -> tuple[torch.Tensor, torch.Tensor | None, ShardInfo]:
    """``(local weights, local gradient or None, where they sit)`` of an :func:`adam_entries`
    parameter (or DeepSpeed state piece, whose weights and gradient are aligned with its
    state)."""
    if isinstance(p, zero.StatePiece):
        return p.weight, p.grad, p.info
    grad = local_tensor(p.grad) if p.grad is not None else None
    return local_tensor(p), grad, shard_info(p)


def adam_inputs(
    st: dict[str, Any], group: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, Scalar, Scalar, float]:
    """Flat ``m``, flat denominator state (``max_exp_avg_sq`` under ``amsgrad``), the two bias
    corrections and ``eps`` of one parameter's Adam state (local shards)."""
    beta1, beta2 = (float(b) for b in group["betas"])
    bc1, bc2s = bias_corrections(st["step"], beta1, beta2)
    v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
    m = real_view(local_tensor(st["exp_avg"])).reshape(-1)
    v = real_view(local_tensor(v)).reshape(-1)
    return m, v, bc1, bc2s, float(group["eps"])


@dataclass
class JointRows:
    """The rows of one measurement's shared pass, per parameter name: ``moments`` for the
    gradient family (its fast kernel row of the gradient), ``adam`` for the Adam family
    (``(row, m, v, g, w, scale, shift)``: its fast kernel row and the inputs it came from).
    Each family pops its own rows."""

    moments: dict[str, torch.Tensor] = field(default_factory=dict)
    adam: dict[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerPass:
    """What the gradient and Adam families need from one shared read of each gradient (see
    module docstring); equal declarations share one :class:`JointRows` per measurement.

    Attributes:
        moment_thresholds: float32 thresholds of the gradient counts ``|g| <= t``.
        u_thresholds: float32 thresholds of the counts ``|u| <= t``.
        trainable_only: whether the Adam family reads only trainable parameters.
    """

    moment_thresholds: tuple[float, ...]
    u_thresholds: tuple[float, ...]
    trainable_only: bool
    mode: bool | str = "auto"  # fused_kernels: True, or "auto" (compile once it pays for itself)

    @classmethod
    def build(
        cls,
        gradient_thresholds: Sequence[float],
        tolerance: float,
        trainable_only: bool,
        mode: bool | str = "auto",
    ) -> OptimizerPass:
        """The declaration for the gradient family's ``thresholds`` and the Adam family's
        ``tolerance`` and ``trainable_only``, under the kernels' compile ``mode``."""
        moments = sorted(float(t) for t in gradient_thresholds)
        return cls(
            moment_thresholds=tuple(f32_floor(t) for t in moments),
            u_thresholds=tuple(f32_floor(t) for t in sorted(u_bounds(tolerance))),
            trainable_only=bool(trainable_only),
            mode=mode,
        )

    @classmethod
    def from_config(cls, config: AnalysisConfig) -> OptimizerPass | None:
        """The declaration both families built from ``config`` share, or ``None`` when they do
        not (one of them off, or ``fused_kernels`` off)."""
        if not (config.gradient_enabled and config.adam_sign_enabled and config.fused_kernels):
            return None
        return cls.build(
            config.gradient_thresholds,
            config.adam_sign_tolerance,
            config.trainable_only,
            config.fused_kernels,
        )

    def rows(self, context: AnalysisContext) -> JointRows:
        """This measurement's joint rows, computed by the first caller."""
        return context.shared(self, lambda: self._compute(context))

    def _compute(self, context: AnalysisContext) -> JointRows:
        out = JointRows()
        model, optimizer = context.model, context.optimizer
        if model is None or optimizer is None:
            return out
        params = collect_parameters(model, trainable_only=True)  # the gradient family's
        numel = sum(p.numel() for _, p in params if p.grad is not None)
        if not kernels.use("moments", numel, self.mode, context.step):
            return out  # the gradient family stays eager
        entries = adam_entries(optimizer, collect_parameters(model, self.trainable_only))
        if any(isinstance(p, zero.StatePiece) for _, p, _, _ in entries):
            return out  # DeepSpeed: state pieces need not align with gradient pieces
        numel = sum(p.numel() for _, p, _, _ in entries)
        if not kernels.use("adam", numel, self.mode, context.step):
            return out  # the Adam family stays eager
        inputs = {}
        for name, p, st, group in entries:
            contiguous = local_tensor(p).is_contiguous() and all(
                local_tensor(st[k]).is_contiguous() for k in ("exp_avg", "exp_avg_sq")
            )  # otherwise the flat views below would be copies, held for the whole pass
            if contiguous and shard_info(p).owner:
                m, v, bc1, bc2s, eps = adam_inputs(st, group)
                scale, shift = u_constants(bc1, bc2s, eps)
                inputs[name] = (m, v, real_view(local_tensor(p)).reshape(-1), scale, shift)
        moments = kernels.MomentsBatch(self.moment_thresholds)  # for their constants
        adam = kernels.AdamBatch(self.u_thresholds)
        for name, p in params:
            if name not in inputs or p.grad is None or not shard_info(p).owner:
                continue
            grad = local_tensor(p.grad)
            if grad.layout != torch.strided:
                continue
            g = real_view(grad).reshape(-1)
            m, v, w, scale, shift = inputs[name]
            pair = kernels.joint_rows(adam, moments, m, v, g, w, scale, shift)
            if pair is not None:
                out.adam[name] = (pair[0], m, v, g, w, scale, shift)
                out.moments[name] = pair[1]
        return out
