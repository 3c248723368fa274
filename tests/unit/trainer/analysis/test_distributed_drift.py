"""drift/* under DDP and FSDP2 on CPU with gloo and two processes: every rank returns the numbers
of one process (drift/overlap/* against saved masks included), and the base is sharded like the
interval snapshot."""

from __future__ import annotations

import math

import pytest

from .test_distributed import _assert_close, _run, pytestmark  # noqa: F401  (markers)


@pytest.fixture(scope="module")
def single_drift(tmp_path_factory):
    return _run("single", 1, tmp_path_factory.mktemp("single-drift"), True, "--drift")[0]


def _scaled(metrics: dict, factor: int) -> dict:
    """Every rank analyses the same batch: drift/tokens counts it once per rank."""
    return {s: {k: v * factor if k.endswith("/tokens") and k != "sparse/tokens" else v
                for k, v in m.items()}
            for s, m in metrics.items()}


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_drift_on_two_ranks_equals_one_process(mode, single_drift, tmp_path):
    ranks = _run(mode, 2, tmp_path, True, "--drift")
    keys = single_drift["metrics"]["4"]
    for key in ("drift/norm_l2", "drift/layer_1/bf16_unchanged_ratio",
                "drift/component/q_proj/changed_ratio_at_1e-06", "drift/kl_base_now",
                "drift/kl_now_base", "drift/sparse/kl_at_keep_0.1_random",
                "drift/sparse/top1_agree_at_keep_0.5_dare", "drift/lowrank/energy_at_r1",
                "drift/lowrank/kl_at_r4", "drift/overlap/exact/jaccard",
                "drift/overlap/t4/overlap_now_in_ref", "drift/overlap/bf16/jaccard_random",
                "drift/overlap/keep/overlap_ref_in_now", "drift/attrib/component/q_proj/kl_only",
                "drift/attrib/layer_1/kl_without", "drift/principal/energy_in_top4",
                "drift/principal/component/o_proj/subspace_overlap_top1"):
        assert key in keys, key
    for key, value in keys.items():  # FSDP2 shards index the masks by their flat offset
        if key.startswith("drift/overlap/"):
            assert 0 < value <= 1, key
    for step in ("4", "6"):
        assert math.isfinite(single_drift["metrics"][step]["drift/cos_interval"])
    assert keys["drift/kl_base_now"] > 0
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # bitwise the same on every rank
    _assert_close(_scaled(ranks[0]["metrics"], 1), _scaled(single_drift["metrics"], 2), mode)
    for step, metrics in single_drift["metrics"].items():  # counts: exactly one process's
        overlap = {k: v for k, v in metrics.items() if k.startswith("drift/overlap/")}
        assert len(overlap) == 16
        assert overlap == {k: ranks[0]["metrics"][step][k] for k in overlap}, step
    total = single_drift["base_bytes"]
    assert total == single_drift["snapshot_bytes"]  # a second lossless snapshot
    if mode == "fsdp":  # only this rank's shards, like the interval snapshot
        assert [r["base_bytes"] for r in ranks] == [r["snapshot_bytes"] for r in ranks]
        assert sum(r["base_bytes"] for r in ranks) == total
        assert all(r["base_bytes"] < 0.65 * total for r in ranks)
