"""Fixtures shared by the metric families' tests."""

from __future__ import annotations

import pytest
import torch

from grail.trainer.analysis.metrics import principal as principal_module
from grail.trainer.analysis.ops.principal import fingerprint


@pytest.fixture
def decompositions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Fingerprints of every matrix the computer decomposes, in call order."""
    calls: list[tuple[int, ...]] = []
    real = principal_module.top_factors

    def counting(w: torch.Tensor, k: int, **kw):
        calls.append(fingerprint(w))
        return real(w, k, **kw)

    monkeypatch.setattr(principal_module, "top_factors", counting)
    return calls
