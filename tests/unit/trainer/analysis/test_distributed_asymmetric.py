"""Two gloo ranks where one rank is in an odd state: the ranks must stay in step.

Each case (see ``dist_asym_worker``) puts rank ``odd`` - rank 0 in one run, rank 1 in another:
some states break only one way - in a state the other rank is not in (no inputs, no optimizer,
no gradients, an extra parameter, another step, ...) and follows every ``on_optimizer_step``
with a user all-reduce of ``rank + 1``. Whatever the state, that all-reduce gives 3.0 on both
ranks and both ranks return the same metrics. One pair of processes per (mode, odd rank) runs
every case.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.distributed as dist

from .ranks import run_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed"),
]

TIMEOUT = 480  # the whole matrix of one (mode, odd rank); a hang fails at the group timeout
REPLICAS = "param_change/replicas_diverged"


def _spawn(mode: str, odd: int, tmp: Path) -> list[dict]:
    outs = [tmp / f"{mode}-odd{odd}-rank{rank}.json" for rank in range(2)]

    def args_of(rank: int, port: int) -> list[str]:
        return ["--mode", mode, "--odd", str(odd), "--rank", str(rank), "--port", str(port),
                "--out", str(outs[rank])]

    done = run_ranks("tests.unit.trainer.analysis.dist_asym_worker", 2, args_of, TIMEOUT,
                     f"{mode} with the odd state on rank {odd}")
    cases = [sorted(json.loads(o.read_text())) if o.exists() else [] for o in outs]
    for rank, (code, log) in enumerate(done):
        assert code == 0, (f"rank {rank} exited with {code} after cases {cases[rank]}",
                           log[-4000:])
    return [json.loads(o.read_text()) for o in outs]


def _same(a: dict, b: dict) -> bool:
    """Metric dicts equal, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a
    )


@pytest.mark.parametrize("odd", [0, 1])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_rank_in_an_odd_state_keeps_the_ranks_in_step(mode, odd, tmp_path):
    ranks = _spawn(mode, odd, tmp_path)
    cases = ranks[0]
    assert len(cases) == 21 and cases.keys() == ranks[1].keys()
    for case in cases:
        for rank, record in enumerate(ranks):
            assert record[case]["checks"] == [3.0] * len(record[case]["calls"]), (case, rank)
        for i, (a, b) in enumerate(zip(ranks[0][case]["calls"], ranks[1][case]["calls"],
                                       strict=True)):
            assert _same(a, b), (case, i, sorted(set(a) ^ set(b))[:5])

    def calls(case: str) -> list[dict]:
        return cases[case]["calls"]

    def warned(case: str, text: str) -> bool:
        return all(any(text in m for m in r[case]["warnings"]) for r in ranks)

    full = calls("baseline")[1]
    for key in ("param_change/norm_l2", "sparse/kl_at_1e-06_random", "sparse/kl_at_keep_0.5_dare",
                "lowrank/kl_at_r1", "gradient/histogram_nonfinite",
                "adam_sign/histogram_nonfinite"):
        assert key in full, key
    assert full.get(REPLICAS) == (0.0 if mode == "ddp" else None)

    for case in ("inputs_none", "inputs_unusable"):  # every rank skips the forwards
        skipped = calls(case)[1]
        assert "param_change/norm_l2" in skipped and "lowrank/energy_at_r1" in skipped, case
        assert not any(k.startswith("sparse/") or "kl" in k for k in skipped), case
        assert "sparse/kl_at_1e-06" in calls(case)[2], case
    assert not any(k.startswith("adam_sign/") for k in calls("optimizer_none")[1])
    assert "gradient/norm_l2" in calls("optimizer_none")[1]
    for case in ("model_none", "manager_fails_locally", "snapshot_missing"):
        assert calls(case)[1] == {} and "param_change/norm_l2" in calls(case)[2], case
    assert "fails/x" not in calls("computer_fails_on_one_rank")[1]
    assert "param_change/norm_l2" in calls("computer_fails_on_one_rank")[1]
    keys = calls("rank_dependent_keys")[1]
    assert keys["rank_keys/common"] == 1.0 and not any("only_rank" in k for k in keys)
    assert warned("rank_dependent_keys", "different keys on different ranks")
    for case in ("config_differs", "computer_on_one_rank"):  # nothing measured, nobody stuck
        assert all(c == {} for c in calls(case)), case
        assert warned(case, "different configs or computers"), case
    diverged = calls("replica_nan")
    if mode == "ddp":  # the NaN sits in one replica only (the next step spreads it to both)
        assert diverged[1][REPLICAS] == 1.0
        assert diverged[0] == {} and diverged[2][REPLICAS] in (0.0, 1.0)
    else:  # FSDP2 shards every parameter: there are no replicas to compare
        assert REPLICAS not in diverged[1]
    assert calls("parameter_added")[1:] == [{}, {}, {}]  # re-baselined while the ranks differ
    assert warned("parameter_added", "ranks hold different parameters")
    # steps 4 and 5 (interval 2): both ranks follow rank 0, so they measure at the same calls
    measured = [bool(c) for c in calls("step_4_and_5")]
    assert measured == [False, False, False, odd == 1, False, True]
    assert warned("step_4_and_5", "rank 0")
    # steps 4 and 6: both measure with rank 0's step (one random mask, not a blend of two)
    assert "sparse/kl_at_1e-06_random" in calls("step_4_and_6")[3]
    assert _same(calls("step_4_and_6")[3], calls("step_4_and_6_reference")[3])
    assert "sparse/kl_at_1e-06_random" in calls("step_not_an_integer")[3]
    assert any("not an integer" in m for m in ranks[odd]["step_not_an_integer"]["warnings"])
