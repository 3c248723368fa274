"""attrib/* under DDP and FSDP2 on two gloo ranks equals one process."""

from __future__ import annotations

import math

import pytest
import torch.distributed as dist

from .test_distributed import REPLICAS, _run

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed"),
]


def _close(got: dict[str, float], want: dict[str, float], where: str) -> None:
    """Forward metrics average over every rank's batch: with the same batch on both ranks the
    token counts double and every mean stays. DDP replicas are checked bit for bit on top."""
    assert got.get(REPLICAS) == (0.0 if where.startswith("ddp") else None), where
    got = {k: v for k, v in got.items() if k != REPLICAS}
    assert got.keys() == want.keys(), (where, sorted(set(got) ^ set(want))[:10])
    for key, value in want.items():
        if key.endswith("/tokens"):
            value *= 2
        if math.isnan(value):
            assert math.isnan(got[key]), (where, key)
        elif key.endswith("param_share"):
            assert got[key] == value, (where, key)  # a ratio of exact counts
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), (where, key)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("single", 1, tmp_path_factory.mktemp("single-attrib"), False, "--attribution")[0]


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_attribution_on_two_ranks_equals_one_process(mode, single, tmp_path):
    ranks = _run(mode, 2, tmp_path, False, "--attribution")
    keys = single["metrics"]["4"]
    assert keys["attrib/component/q_proj/kl_only"] > 0
    assert keys["attrib/layer_1/kl_without"] > 0
    assert "sparse/kl_at_1e-03" in keys
    assert not any(math.isnan(v) for k, v in keys.items() if k.startswith("attrib/"))
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # bitwise the same on every rank
    for step, want in single["metrics"].items():
        _close(ranks[0]["metrics"][step], want, f"{mode} step {step}")
    # three groups of fourteen measured: the same three on every rank, no rank left waiting
    truncated = [r["truncated"] for r in ranks]
    assert truncated[0] == truncated[1]
    measured = [k for k, v in truncated[0].items() if k.endswith("kl_only") and not math.isnan(v)]
    assert len(measured) == 3
    assert sorted(measured) == sorted(
        k for k, v in single["truncated"].items() if k.endswith("kl_only") and not math.isnan(v)
    )
