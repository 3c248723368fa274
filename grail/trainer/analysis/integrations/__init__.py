"""Adapters to training frameworks and metric backends; heavy libraries load on first use.

``ModelAnalysisCallback`` (Hugging Face ``Trainer`` and TRL trainers) needs the ``hf`` extra,
``LightningAnalysisCallback`` the ``lightning`` extra, ``WandbSink`` the ``wandb`` extra and
``TensorBoardSink`` the ``tensorboard`` extra; ``AccelerateSink`` uses the accelerator it is
given. Importing this package imports none of them: names are resolved lazily on attribute
access, and a missing library is an ``ImportError`` naming the extra to install.

May import: the analysis core (``manager``, ``config``) and, inside each adapter module only,
its framework (transformers, lightning, wandb, tensorboard); ``trainer_log``, the Hugging Face
callback's sink, belongs to the ``transformers`` adapter.

Example:
    >>> from grail.trainer.analysis import integrations
    >>> integrations.JsonlSink.__name__
    'JsonlSink'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .accelerate import AccelerateSink
    from .batch import BatchCapture, tokenize_probe
    from .lightning import LightningAnalysisCallback
    from .sinks import JsonlSink, MetricSink, WandbSink, read_jsonl
    from .tensorboard import TensorBoardSink
    from .transformers import ModelAnalysisCallback

__all__ = [
    "AccelerateSink",
    "BatchCapture",
    "JsonlSink",
    "LightningAnalysisCallback",
    "MetricSink",
    "ModelAnalysisCallback",
    "TensorBoardSink",
    "WandbSink",
    "read_jsonl",
    "tokenize_probe",
]

_WHERE = {
    "ModelAnalysisCallback": ".transformers",
    "LightningAnalysisCallback": ".lightning",
    "AccelerateSink": ".accelerate",
    "TensorBoardSink": ".tensorboard",
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
