"""DDP and FSDP2 on CPU with gloo and two processes: global metrics equal one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from .ops.test_budget import reference_keep
from .ranks import run_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed"),
]

TIMEOUT = 240  # a deadlock fails the test instead of hanging CI


def _run(
    mode: str,
    world: int,
    tmp: Path,
    low_rank: bool = False,
    *flags: str,
    worker: str = "tests.unit.trainer.analysis.dist_worker",
) -> list[dict]:
    """Each rank's JSON from ``worker`` run with ``mode``, ``world`` ranks and ``flags``."""
    outs = [tmp / f"{mode}-{world}-{rank}.json" for rank in range(world)]

    def args_of(rank: int, port: int) -> list[str]:
        extra = ["--low-rank"] if low_rank else []
        return ["--mode", mode, "--rank", str(rank), "--world", str(world), "--port", str(port),
                "--out", str(outs[rank]), *extra, *flags]

    done = run_ranks(worker, world, args_of, TIMEOUT, f"{mode} with {world} ranks")
    for code, log in done:
        assert code == 0, log[-3000:]
    return [json.loads(o.read_text()) for o in outs]


REPLICAS = "param_change/replicas_diverged"


def _assert_close(
    got: dict, ref: dict, where: str, token_factor: int = 2, replicated: bool | None = None
) -> None:
    """``got`` from ranks, ``ref`` from one process. Forward-pass metrics average over every
    rank's batch, so ``sparse/tokens`` counts ``token_factor`` times the single batch when all
    ranks analyse that same batch. DDP replicas are compared bit for bit on top by the manager
    (no process has replicas, FSDP2 shards every parameter): the replicas never diverge here.
    ``replicated`` says whether ``got`` came through a manager with replicated parameters
    (default: ``where`` names DDP); a computer measured by hand reports no replica check."""
    assert got.keys() == ref.keys(), (where, sorted(set(got) ^ set(ref))[:10])
    if replicated is None:
        replicated = where.startswith("ddp")
    for step in got:
        assert got[step].get(REPLICAS) == (0.0 if replicated else None), (where, step)
    got = {step: {k: v for k, v in m.items() if k != REPLICAS} for step, m in got.items()}
    for step in ref:
        diff = sorted(set(got[step]) ^ set(ref[step]))[:10]
        assert got[step].keys() == ref[step].keys(), (where, step, diff)
        for key, want in ref[step].items():
            value = got[step][key]
            if key == "sparse/tokens":
                want = want * token_factor
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
                   "param_change/mask_overlap",
                   "adam_sign/"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # bitwise the same on every rank
    _assert_close(ranks[0]["metrics"], single["metrics"], mode)


def test_ranks_on_different_kernel_paths_agree(single, tmp_path):
    """The "auto" compile policy decides per process from its own timings, so ranks may run
    different paths at a measurement: neither path issues a collective of its own, and the
    all-reduced metrics stay the same on every rank (and equal to one process)."""
    ranks = _run("fsdp", 2, tmp_path, False, "--mixed-kernels")
    used = ranks[0]["kernels"]
    assert {"change", "swap", "rows", "moments", "adam"} <= set(used)
    assert all(n > 0 for n in used.values()) and ranks[1]["kernels"] == {}
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    _assert_close(ranks[0]["metrics"], single["metrics"], "fsdp, mixed kernel paths")


def test_fsdp_snapshot_holds_only_local_shards(single, tmp_path):
    ranks = _run("fsdp", 2, tmp_path)
    total = single["snapshot_bytes"]
    for r in ranks:
        assert 0.35 * total < r["snapshot_bytes"] < 0.65 * total
    assert sum(r["snapshot_bytes"] for r in ranks) == total


@pytest.fixture(scope="module")
def single_low_rank(tmp_path_factory):
    return _run("single", 1, tmp_path_factory.mktemp("single-low-rank"), low_rank=True)[0]


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_low_rank_two_ranks_agree_with_each_other_and_with_one_process(
    mode, single_low_rank, tmp_path
):
    ranks = _run(mode, 2, tmp_path, low_rank=True)
    keys = single_low_rank["metrics"]["4"]
    for key in ("lowrank/energy_at_r1", "lowrank/component/q_proj/stable_rank",
                "lowrank/kl_at_r1", "lowrank/top1_agree_at_r4", "sparse/kl_at_budget_r1",
                "sparse/top1_agree_at_budget_r4"):
        assert key in keys, key
    assert keys["lowrank/num_matrices"] == 16  # 14 projections, the embedding and the head
    assert 0 < keys["lowrank/randomized_matrices"] < 16
    assert keys["lowrank/kl_at_r1"] > 0
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # bitwise the same on every rank
    _assert_close(ranks[0]["metrics"], single_low_rank["metrics"], mode)
    # inputs on rank 0 only: both ranks skip output quality together (and nobody hangs)
    assert "lowrank/kl_at_r1" in single_low_rank["one_sided_keys"]
    for r in ranks:
        assert "lowrank/energy_at_r1" in r["one_sided_keys"]
        assert not any("kl" in k for k in r["one_sided_keys"])


def _global_masks(ranks: list[dict], shapes: dict[str, tuple[int, ...]]) -> dict:
    """``budget -> name -> global kept flags`` put together from every rank's local pieces;
    a replicated tensor's copies must agree."""
    out: dict = {}
    for k in ranks[0]["masks"]:
        out[k] = {}
        for name, shape in shapes.items():
            flags = np.full(int(np.prod(shape)), -1)
            for r in ranks:
                piece = r["masks"][k][name]
                kept = np.array(piece["kept"], dtype=int)
                here = flags[piece["offset"] : piece["offset"] + kept.size]
                assert ((here == -1) | (here == kept)).all(), (k, name)  # copies agree
                here[:] = kept
            assert (flags >= 0).all(), (k, name)
            out[k][name] = flags.astype(bool)
    return out


def test_budget_mask_ties_are_global_under_sharding(tmp_path):
    """Budgets 0..N+1 over tied dyadic updates: FSDP2 (uneven and empty shards next to a
    replicated tensor) and DDP build the single-process mask, which is the numpy reference."""
    (single,) = _run("single", 1, tmp_path, False, "--budget-ties")
    names = single["names"]
    assert names == ["first.weight", "mid.weight", "last.weight"]
    shapes = {"first.weight": (7, 5), "mid.weight": (5, 3), "last.weight": (1, 6)}
    want = _global_masks([single], shapes)
    for mode in ("fsdp", "ddp"):
        ranks = _run(mode, 2, tmp_path, False, "--budget-ties")
        if mode == "fsdp":  # sharded as intended: rank 1 holds rows 4..6 and no row of `last`
            assert ranks[1]["masks"]["0"]["first.weight"]["offset"] == 20
            assert ranks[1]["masks"]["0"]["last.weight"]["kept"] == []
        got = _global_masks(ranks, shapes)
        for k in want:
            for name in names:
                assert (got[k][name] == want[k][name]).all(), (mode, k, name)
    # the single-process mask is the exact top-k with ties in (name, position) order
    gen_deltas = _tied_deltas(shapes)
    total = sum(d.size for d in gen_deltas.values())
    ties_cut = 0
    for k, masks in want.items():
        ref = reference_keep(gen_deltas, min(int(k), total))
        assert sum(int(m.sum()) for m in masks.values()) == min(int(k), total)
        for name in names:
            assert (masks[name] == ref[name]).all(), (k, name)
        kept = np.concatenate([np.abs(gen_deltas[n]).reshape(-1)[masks[n]] for n in names])
        dropped = np.concatenate([np.abs(gen_deltas[n]).reshape(-1)[~masks[n]] for n in names])
        ties_cut += bool(kept.size and dropped.size and kept.min() == dropped.max())
    assert ties_cut > total // 2  # most budgets split a group of equal values


def _tied_deltas(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The updates the worker draws (same generator and order), as float64 numpy arrays."""
    import torch

    gen = torch.Generator().manual_seed(7)
    choice = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0])
    out = {}
    for name, shape in shapes.items():
        torch.randint(-8, 8, shape, generator=gen)  # W_old
        out[name] = choice[torch.randint(0, 7, shape, generator=gen)].double().numpy()
    return out


def test_forward_metrics_are_token_weighted_over_every_ranks_batch(tmp_path):
    """DDP ranks analyse different batches: every rank reports the same numbers, equal to one
    process analysing both batches at once."""
    (single,) = _run("single", 1, tmp_path, True, "--own-batches")
    ranks = _run("ddp", 2, tmp_path, True, "--own-batches")
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    _assert_close(ranks[0]["metrics"], single["metrics"], "ddp-own-batches", token_factor=1)
    assert single["metrics"]["4"]["sparse/tokens"] == 48.0  # 2 ranks x 2 rows x 12 tokens


def test_a_kwargs_wrapper_refusing_the_mask_is_called_again_on_every_rank(tmp_path):
    single = _run("single", 1, tmp_path, False, "--kwargs-wrapper")[0]
    ranks = _run("fsdp", 2, tmp_path, False, "--kwargs-wrapper")
    assert set(single["metrics"]) == {"4", "6"}
    assert "sparse/kl_at_keep_0.1_random" in single["metrics"]["4"]  # the forwards ran
    assert single["metrics"]["4"]["sparse/tokens"] == 12 + 9  # the mask still selects positions
    for result in (single, *ranks):
        assert len(result["refused"]) == 1, result["refused"]  # one warning, then no retries
        assert "refused attention_mask" in result["refused"][0]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    _assert_close(ranks[0]["metrics"], single["metrics"], "fsdp")


@pytest.mark.parametrize(("mode", "form"), [("ddp", "current"), ("fsdp", "current"),
                                            ("ddp", "old-format"), ("ddp", "rank0-state")])
def test_a_state_with_snapshots_resumes_the_uninterrupted_run(mode, form, tmp_path):
    """The snapshots' shard layouts travel with the state: a DDP replica is counted once (not
    once per rank) and an FSDP2 shard is not re-baselined; a state saved without the layouts
    takes them from the model (DDP); under DDP any rank's state restores every rank (replicas
    are counted by rank 0 whoever saved them)."""
    ranks = _run(mode, 2, tmp_path, False, "--resume", form)
    for result in ranks:
        a = {step: m for step, m in result["a"].items() if m}
        b = {step: m for step, m in result["b"].items() if m}
        assert set(a) == set(b) == {"6", "8"}, (sorted(a), sorted(b))  # nothing re-baselined
        assert not [w for w in result["warnings"] if "changed" in w or "base" in w], result
        for step in a:
            assert a[step].keys() == b[step].keys()
            for key, want in a[step].items():
                got = b[step][key]
                assert got == want or (math.isnan(got) and math.isnan(want)), (step, key)
    assert ranks[0]["b"] == ranks[1]["b"]


def test_another_ranks_sharded_state_is_refused_on_every_rank_alike(tmp_path):
    """FSDP2 ranks that all load rank 0's state: rank 1's pieces are not rank 0's, so every
    rank re-takes the base (one vote) and says so; the interval snapshot re-baselines."""
    ranks = _run("fsdp", 2, tmp_path, False, "--resume", "rank0-state")
    for result in ranks:
        said = [w for w in result["warnings"] if "drift/* is measured from the weights" in w]
        assert len(said) == 1, result["warnings"]
    assert "other pieces than this rank's" in " ".join(ranks[1]["warnings"])
    assert "another rank cannot use the base" in " ".join(ranks[0]["warnings"])
    assert ranks[0]["b"] == ranks[1]["b"]
