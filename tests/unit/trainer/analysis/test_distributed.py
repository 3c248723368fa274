"""DDP and FSDP2 on CPU with gloo and two processes: global metrics equal one process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed"),
]

ROOT = Path(__file__).resolve().parents[4]
TIMEOUT = 240  # a deadlock fails the test instead of hanging CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, world: int, tmp: Path, low_rank: bool = False) -> list[dict]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs, outs = [], []
    for rank in range(world):
        out = tmp / f"{mode}-{world}-{rank}.json"
        cmd = [sys.executable, "-m", "tests.unit.trainer.analysis.dist_worker", "--mode", mode,
               "--rank", str(rank), "--world", str(world), "--port", str(port), "--out", str(out)]
        if low_rank:
            cmd.append("--low-rank")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{mode} with {world} ranks timed out (deadlock?)")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads(o.read_text()) for o in outs]


def _assert_close(got: dict, ref: dict, where: str) -> None:
    assert got.keys() == ref.keys(), (where, sorted(set(got) ^ set(ref))[:10])
    for step in ref:
        diff = sorted(set(got[step]) ^ set(ref[step]))[:10]
        assert got[step].keys() == ref[step].keys(), (where, step, diff)
        for key, want in ref[step].items():
            value = got[step][key]
            if math.isnan(want):
                assert math.isnan(value), (where, step, key)
            elif any(s in key.rsplit("/", 1)[-1]
                     for s in ("sparsity", "ratio", "count", "tokens", "num_params")):
                assert value == pytest.approx(want, rel=1e-9, abs=1e-12), (where, step, key)
            else:
                assert value == pytest.approx(want, rel=1e-5, abs=1e-9), (where, step, key)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("single", 1, tmp_path_factory.mktemp("single"))[0]


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_agree_with_each_other_and_with_one_process(mode, single, tmp_path):
    ranks = _run(mode, 2, tmp_path)
    assert set(single["metrics"]) == {"4", "6"}  # first snapshot at step 2
    keys = single["metrics"]["4"]
    for prefix in ("param_change/layer_1/", "param_change/component/q_proj/", "sparse/kl_at_1e-03",
                   "sparse/kl_at_keep_0.1_random", "sparse/kl_at_1e-06_dare", "gradient/",
                   "adam_sign/"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # bitwise the same on every rank
    _assert_close(ranks[0]["metrics"], single["metrics"], mode)


def test_fsdp_snapshot_holds_only_local_shards(single, tmp_path):
    ranks = _run("fsdp", 2, tmp_path)
    total = single["snapshot_bytes"]
    for r in ranks:
        assert 0.35 * total < r["snapshot_bytes"] < 0.65 * total
    assert sum(r["snapshot_bytes"] for r in ranks) == total
