"""Which built-in computers a config enables, in the order they run.

Cheap streaming statistics run first, forward-pass metrics last, so that a slow or failing
forward pass never delays the numbers that cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import AnalysisConfig
from .base import MetricComputer

__all__ = ["build_computers"]


def build_computers(
    config: AnalysisConfig, output_fn: Callable[[Any], torch.Tensor] | None = None
) -> list[MetricComputer]:
    """Instantiate every built-in computer that ``config`` turns on."""
    out: list[MetricComputer] = []
    if config.param_change_enabled:
        from .parameter_change import ParameterChangeMetrics

        out.append(
            ParameterChangeMetrics(
                thresholds=config.param_change_thresholds,
                per_layer=config.param_change_per_layer,
                track_components=config.param_change_track_components,
                track_sign_flips=config.param_change_track_sign_flips,
                component_map=config.component_map,
                fused=config.fused_kernels,
            )
        )
    if config.param_change_track_mask_overlap:
        from .mask_overlap import MaskOverlapMetrics

        out.append(MaskOverlapMetrics())
    gradient = adam = None
    if config.gradient_enabled:
        from .gradient import GradientSparsityMetrics

        gradient = GradientSparsityMetrics.from_config(config)
        out.append(gradient)
    if config.adam_sign_enabled:
        from .adam_sign import AdamSignDescentMetrics

        adam = AdamSignDescentMetrics.from_config(config)
        out.append(adam)
    if gradient is not None and adam is not None and config.fused_kernels:
        gradient.share_pass_with(adam)  # one read of each gradient for both families
    if config.sparse_quality_enabled:
        from .sparse_quality import SparseQualityMetrics

        out.append(SparseQualityMetrics.from_config(config, output_fn=output_fn))
    if config.low_rank_enabled:
        from .low_rank import LowRankMetrics

        out.append(LowRankMetrics.from_config(config, output_fn=output_fn))
    if config.principal_enabled:
        from .principal import PrincipalMetrics

        out.append(PrincipalMetrics.from_config(config))
    return out
