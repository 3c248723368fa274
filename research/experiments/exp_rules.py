r"""Rounding-rule predictions of bf16 "sparsity", from an fp32 run's weights and deltas.

:math:`u(w)` is the spacing of bfloat16 numbers at :math:`|w|`: :math:`2^{e-8}` for
:math:`|w| \in [2^{e-1}, 2^e)` (8 significant bits). All predictions use only the magnitudes of
the fp32 weights and their moves, never where exactly a weight sits inside its rounding cell:
that position is modelled as uniform.

* **Interval rule** (fp32 master weights seen through bf16): a weight that moved by
  :math:`\Delta` over an interval changes its rounded value with probability
  :math:`\min(1, |\Delta| / u(w))`. The predicted changed fraction is the mean over entries.
* **Drift rule** (the same, for two consecutive intervals): a weight at uniform offset
  :math:`c \in [0, 1)` inside its cell, moving by :math:`x_1 = \Delta_1/u` then
  :math:`x_2 = \Delta_2/u` (signed), changed in interval ``k`` iff :math:`\lfloor c + x_1\rfloor
  \ne 0` and in ``k+1`` iff :math:`\lfloor c + x_1 + x_2\rfloor \ne \lfloor c + x_1\rfloor`. The
  expectation over :math:`c` (midpoint rule, :data:`CELL_POINTS` points) of both events gives an
  expected Jaccard :math:`\sum P(\text{both}) / \sum (P_1 + P_2 - P(\text{both}))`. A weight that
  just crossed a boundary needs a whole spacing of further drift to cross the next one, so
  consecutive changes of one entry are rarer than independent draws would make them.
* **Per-step rule** (pure bf16): a stored bf16 value changes in a step only if the update is at
  least half a spacing, so an entry is predicted to change over an interval iff
  :math:`\max_t |d_t| \ge u(w)/2` over the fp32 run's per-step updates :math:`d_t`.

Example:
    >>> float(bf16_spacing(torch.tensor(1.0))), float(bf16_spacing(torch.tensor(0.75)))
    (0.0078125, 0.00390625)
    >>> x = {"w": torch.tensor([0.25, 0.25])}
    >>> round(drift_jaccard(x, x), 3)  # two quarter-cell moves in a row never both cross
    0.0
"""

from __future__ import annotations

import torch
from torch import nn

from grail.trainer.analysis import ParameterDelta, ParameterSnapshot

CELL_POINTS = 128  # quadrature points for the offset inside a rounding cell

Tensors = dict[str, torch.Tensor]


def bf16_spacing(w: torch.Tensor) -> torch.Tensor:
    """Distance between adjacent bfloat16 numbers at ``|w|`` (float32; tiny for ``w == 0``)."""
    a = w.float().abs()
    _, e = torch.frexp(a)
    spacing = torch.ldexp(torch.ones_like(a), e - 8)
    return torch.where(a > 0, spacing, torch.full_like(a, 2.0**-133))


def scaled_moves(delta: ParameterDelta) -> Tensors:
    """Signed moves in units of the bf16 spacing at the old weight: ``Delta / u(w_old)``."""
    return {
        name: d / bf16_spacing(delta.old.data[name]) for name, d in delta.deltas.items()
    }


def change_probabilities(moves: Tensors) -> Tensors:
    """Interval rule per entry: ``min(1, |x|)``."""
    return {name: x.abs().clamp(max=1.0) for name, x in moves.items()}


def mean_of(values: Tensors) -> float:
    """Mean over all entries of a ``name -> tensor`` dict (float64 sum)."""
    total = sum(float(v.sum(dtype=torch.float64)) for v in values.values())
    return total / sum(v.numel() for v in values.values())


def jaccard(p: Tensors, q: Tensors) -> float:
    """``sum(p q) / sum(p + q - p q)``: the Jaccard of two 0/1 sets, or the expected Jaccard of
    sets whose entries change independently with probabilities ``p`` and ``q``."""
    inter = sum(float((p[n] * q[n]).sum(dtype=torch.float64)) for n in p)
    union = sum(float((p[n] + q[n] - p[n] * q[n]).sum(dtype=torch.float64)) for n in p)
    return inter / union if union else 1.0


def drift_jaccard(first: Tensors, second: Tensors, points: int = CELL_POINTS) -> float:
    """Expected Jaccard of consecutive changed sets under the drift rule (module docstring)."""
    c = ((torch.arange(points, dtype=torch.float64) + 0.5) / points).unsqueeze(1)
    inter = p1 = p2 = 0.0
    for name, x1 in first.items():
        a = x1.reshape(1, -1).double().clamp(-1e6, 1e6)
        b = second[name].reshape(1, -1).double().clamp(-1e6, 1e6)
        mid = torch.floor(c + a)
        changed1 = mid != 0
        changed2 = torch.floor(c + a + b) != mid
        inter += float((changed1 & changed2).sum()) / points
        p1 += float(changed1.sum()) / points
        p2 += float(changed2.sum()) / points
    union = p1 + p2 - inter
    return inter / union if union else 1.0


class StepRule:
    """Running ``max_t |d_t|`` per entry over an interval, for the per-step rule."""

    def __init__(self, model: nn.Module) -> None:
        self.last = ParameterSnapshot(model)
        self.max_abs: Tensors = {}

    def update(self, model: nn.Module) -> None:
        """Call after every optimizer step."""
        delta = self.last.compute_delta(ParameterSnapshot.live(model))
        for name, d in delta.deltas.items():
            prev = self.max_abs.get(name)
            self.max_abs[name] = d.abs() if prev is None else torch.maximum(prev, d.abs())
        self.last = ParameterSnapshot(model)

    def predict(self, old: ParameterSnapshot) -> Tensors:
        """Predicted changed set (0/1 floats): ``max_t |d_t| >= u(w_old) / 2``."""
        return {
            name: (m >= bf16_spacing(old.data[name]) / 2).float()
            for name, m in self.max_abs.items()
        }

    def reset(self) -> None:
        """Start a new interval."""
        self.max_abs = {}
