"""Run a test module once on the eager streaming path and once on the compiled kernels."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from grail.trainer.analysis import kernels


@pytest.fixture(params=["eager", "fused"])
def kernel_path(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """``"eager"``: the kernels are never tried. ``"fused"``: every tensor of two or more
    entries goes through them (tiny test models are far below the production size limit), and
    the test fails if compiling failed and the computers silently fell back to eager."""
    if request.param == "eager":
        monkeypatch.setattr(kernels, "MIN_NUMEL", 2**62)
    else:
        if request.node.get_closest_marker("distributed"):
            pytest.skip("worker processes do not see the fixture")
        monkeypatch.setattr(kernels, "MIN_NUMEL", 2)
    yield request.param
    assert kernels.disabled_reason() is None
