"""Which built-in computers a config enables, in the order they run.

Cheap streaming statistics run first, forward-pass metrics last, so that a slow or failing
forward pass never delays the numbers that cost nothing. Each family is built by its own
``from_config``; families that share work (the gradient and Adam families' one read of each
gradient) find each other through the measurement's context, so the registry wires nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import AnalysisConfig
from .adam_sign import AdamSignDescentMetrics
from .attribution import AttributionMetrics
from .base import MetricComputer
from .drift import DriftMetrics
from .gradient import GradientSparsityMetrics
from .low_rank import LowRankMetrics
from .mask_overlap import MaskOverlapMetrics
from .parameter_change import ParameterChangeMetrics
from .principal import PrincipalMetrics
from .sparse_quality import SparseQualityMetrics

__all__ = ["FAMILIES", "build_computers"]

#: ``(config switch, computer class)`` of every built-in family, in run order.
FAMILIES: tuple[tuple[str, type[MetricComputer]], ...] = (
    ("param_change_enabled", ParameterChangeMetrics),
    ("param_change_track_mask_overlap", MaskOverlapMetrics),
    ("gradient_enabled", GradientSparsityMetrics),
    ("adam_sign_enabled", AdamSignDescentMetrics),
    ("sparse_quality_enabled", SparseQualityMetrics),
    ("low_rank_enabled", LowRankMetrics),
    ("principal_enabled", PrincipalMetrics),
    ("attribution_enabled", AttributionMetrics),
    ("drift_enabled", DriftMetrics),  # last: its output metrics reuse the others' reference logits
)


def build_computers(
    config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
) -> list[MetricComputer]:
    """Instantiate every built-in computer that ``config`` turns on.

    >>> [c.name for c in build_computers(AnalysisConfig(gradient_enabled=True))]
    ['param_change', 'gradient', 'sparse']
    """
    return [
        family.from_config(config, output_fn=output_fn)
        for switch, family in FAMILIES
        if getattr(config, switch)
    ]
