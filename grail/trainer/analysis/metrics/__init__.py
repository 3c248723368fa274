"""Built-in metric computers and the base class for your own."""

from .base import AnalysisContext, MetricComputer, MetricResult
from .drift import DriftMetrics
from .parameter_change import ParameterChangeMetrics
from .sparse_quality import SparseQualityMetrics

__all__ = [
    "AnalysisContext",
    "DriftMetrics",
    "MetricComputer",
    "MetricResult",
    "ParameterChangeMetrics",
    "SparseQualityMetrics",
]
