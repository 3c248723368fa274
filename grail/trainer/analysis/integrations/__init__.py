"""Adapters to training frameworks and metric backends; heavy libraries load on first use.

``ModelAnalysisCallback`` (Hugging Face ``Trainer`` and TRL trainers) needs the ``hf`` extra;
``WandbSink`` needs the ``wandb`` extra. Importing this package imports neither: names are
resolved lazily on attribute access.

Example:
    >>> from grail.trainer.analysis import integrations
    >>> integrations.JsonlSink.__name__
    'JsonlSink'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import BatchCapture, tokenize_probe
    from .sinks import JsonlSink, MetricSink, WandbSink, read_jsonl
    from .transformers import ModelAnalysisCallback

__all__ = [
    "BatchCapture",
    "JsonlSink",
    "MetricSink",
    "ModelAnalysisCallback",
    "WandbSink",
    "read_jsonl",
    "tokenize_probe",
]

_WHERE = {
    "ModelAnalysisCallback": ".transformers",
    "BatchCapture": ".batch",
    "tokenize_probe": ".batch",
    "JsonlSink": ".sinks",
    "MetricSink": ".sinks",
    "WandbSink": ".sinks",
    "read_jsonl": ".sinks",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
