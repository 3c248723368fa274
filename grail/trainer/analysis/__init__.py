"""grail-analysis: how are the weights changing, and would a sparse or low-rank update do?

Three lines in a training loop::

    from grail.trainer.analysis import ModelAnalysisManager, AnalysisConfig
    analyzer = ModelAnalysisManager.create(AnalysisConfig(interval=100))
    metrics = analyzer.on_optimizer_step(model, inputs=batch)   # after optimizer.step()
"""

from .config import AnalysisConfig
from .core.mask_file import ChangeCriterion, MaskFileError, SavedMask, load_mask
from .core.naming import ParameterNaming
from .core.snapshot import ParameterDelta, ParameterSnapshot
from .core.stats import StreamingStats
from .manager import ModelAnalysisManager, measurement_steps
from .metrics import (
    AnalysisContext,
    MetricComputer,
    MetricResult,
    ParameterChangeMetrics,
    SparseQualityMetrics,
)

__all__ = [
    "AnalysisConfig",
    "AnalysisContext",
    "ChangeCriterion",
    "MaskFileError",
    "MetricComputer",
    "MetricResult",
    "ModelAnalysisManager",
    "ParameterChangeMetrics",
    "ParameterDelta",
    "ParameterNaming",
    "ParameterSnapshot",
    "SavedMask",
    "SparseQualityMetrics",
    "StreamingStats",
    "load_mask",
    "measurement_steps",
]

__version__ = "0.1.0"
