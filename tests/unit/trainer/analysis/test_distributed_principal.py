"""``principal/*`` under DDP and FSDP2 on CPU with gloo and two processes equals one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from .test_distributed import _assert_close
from .test_distributed import _run as _run_worker

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed"),
]

MATRICES = 16  # 14 projections, the embedding and the head


def _run(mode: str, world: int, tmp: Path) -> list[dict]:
    return _run_worker(mode, world, tmp, worker="tests.unit.trainer.analysis.dist_worker_principal")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("single", 1, tmp_path_factory.mktemp("single-principal"))[0]


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_agree_with_each_other_and_with_one_process(mode, single, tmp_path):
    ranks = _run(mode, 2, tmp_path)
    assert set(single["metrics"]) == set(single["drift"]) == {"4", "6"}
    keys = single["metrics"]["4"]
    assert keys["principal/num_matrices"] == MATRICES
    assert 0 < keys["principal/randomized_matrices"] < MATRICES
    for key in ("principal/energy_in_top4", "principal/component/q_proj/subspace_overlap_top1",
                "principal/spectral_drift_top8", "principal/left_energy_top1_random"):
        assert key in keys, key
    assert 0 < keys["principal/energy_in_top1"] < 1 and keys["principal/spectral_drift_top4"] > 0
    assert "drift/principal/energy_in_top4" in single["drift"]["6"]
    for view in ("metrics", "drift"):
        assert ranks[0][view] == ranks[1][view]  # bitwise the same on every rank
        _assert_close(ranks[0][view], single[view], f"{mode} {view}",
                      replicated=mode == "ddp" and view == "metrics")
    # each matrix is cached on the rank that computes it (i mod 2), and used there
    assert single["cache"] == {"entries": MATRICES, "hits": MATRICES}
    assert [r["cache"]["entries"] for r in ranks] == [MATRICES // 2] * 2
    assert [r["cache"]["hits"] for r in ranks] == [MATRICES // 2] * 2
    assert single["base_cache"] == {"entries": MATRICES, "hits": MATRICES}
    assert [r["base_cache"]["hits"] for r in ranks] == [MATRICES // 2] * 2
