"""Shared fixtures: run a test module once on the eager path and once on the compiled kernels."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from grail.trainer.analysis import kernels


def compiler_works() -> bool:
    """Whether the kernels compile in this process (tried once; no compiler: a skip)."""
    kernels.MomentsBatch([0.0]).add(torch.ones(4), [0])
    return kernels.disabled_reason() is None


@pytest.fixture(params=["eager", "fused"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``"eager"``: the kernels are never tried. ``"fused"``: they are, with the pooling limit
    scaled down to the tiny test models, and the test fails if compiling failed and the
    computers silently fell back to eager."""
    if request.param == "eager":
        overrides = {"min_numel": 2**62}
    else:
        if request.node.get_closest_marker("distributed"):
            pytest.skip("worker processes do not see the fixture")
        if not compiler_works():
            pytest.skip(f"torch.compile does not work here: {kernels.disabled_reason()}")
        # tiny test models: kernels at any model size, biases and norms pooled, matrices one
        # call each; compiling estimated free, so that "auto" (the default) compiles at once
        overrides = {
            "min_total_numel": 0,
            "pool_numel": 64,
            "startup_seconds": 0.0,
            "kernel_seconds": 0.0,
        }
    with kernels.settings.override(**overrides):
        yield request.param
    assert kernels.disabled_reason() is None
