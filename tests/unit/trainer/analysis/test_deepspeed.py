"""DeepSpeed ZeRO-1/2/3 on CPU with gloo and two processes: every family's metrics equal one
process analysing the same unsharded states.

One spawn of two ranks (``ds_worker``) trains under each stage and saves, at every step the
analysis reads the model, the full training state DeepSpeed's own helpers gather; the test
replays those states here, in one process, on an unsharded copy of the model with a torch AdamW
holding the same moments, and compares. Each rank analyses its own probe batch; the replay
analyses both at once (forward-pass metrics are token-weighted over ranks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from .ds_worker import RECORD, STEPS, analysis_config, batch, build_model, shared_probe
from .ranks import run_ranks

deepspeed = pytest.importorskip("deepspeed")

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed"),
    pytest.mark.timeout(1200),
]

TIMEOUT = 900  # one spawn runs the three stages; a deadlock fails instead of hanging CI
REPLICAS = "param_change/replicas_diverged"
COUNTS = ("sparsity", "ratio", "count", "tokens", "num_params", "matrices")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("deepspeed")

    def args_of(rank: int, port: int) -> list[str]:
        return ["--rank", str(rank), "--world", "2", "--port", str(port), "--out", str(out)]

    done = run_ranks("tests.unit.trainer.analysis.ds_worker", 2, args_of, TIMEOUT,
                     "DeepSpeed ZeRO-1/2/3 with 2 ranks")
    for code, log in done:
        assert code == 0, log[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def replay(states: dict[int, dict], dtype: torch.dtype, ranks: int) -> tuple[dict, dict]:
    """The managers' calls of one run, in one process on the unsharded model (in ``dtype``,
    with the fp32 Adam moments DeepSpeed keeps), analysing the probe batches of ``ranks``
    ranks at once."""
    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

    model = build_model(dtype)
    params = dict(model.named_parameters())
    hyper = states[RECORD[0]]["hyper"]
    opt = torch.optim.AdamW(model.parameters(), lr=hyper["lr"], betas=hyper["betas"],
                            eps=hyper["eps"], weight_decay=hyper["weight_decay"], foreach=False)
    manager = ModelAnalysisManager.create(AnalysisConfig.from_dict(analysis_config()))
    metrics, hists = {}, {}
    for step in range(1, STEPS + 1):
        state = states.get(step)
        if state is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(state["weights"][name])
                    grad = state["grads"].get(name)
                    p.grad = grad.to(dtype) if grad is not None else None
                    if name not in state["exp_avg"]:
                        continue  # before the first step: no moments yet
                    opt.state[p] = {
                        "step": torch.tensor(state["step"]),
                        "exp_avg": state["exp_avg"][name].view(p.shape).clone(),
                        "exp_avg_sq": state["exp_avg_sq"][name].view(p.shape).clone(),
                    }
        probe = {"input_ids": torch.cat([batch(step, r, probe=True) for r in range(ranks)])}
        got = manager.on_optimizer_step(model, inputs=probe, optimizer=opt)
        if got:
            metrics[str(step)] = got
            hists[str(step)] = {k: sorted(v.tolist()) for k, v in manager.last_histograms.items()}
    return metrics, hists


def assert_close(got: dict, ref: dict, where: str, token_factor: int) -> None:
    """Counts and ratios exactly (up to float formatting), norms to 1e-5 relative;
    ``*/tokens`` count ``token_factor`` times the replay's batch."""
    for step in ref:
        keys = set(got[step]) - {REPLICAS}
        assert keys == set(ref[step]), (where, step, sorted(keys ^ set(ref[step]))[:10])
        for key, want in ref[step].items():
            value = got[step][key]
            if key.endswith("/tokens"):  # sparse/, drift/, attrib/: forwards over every rank
                want *= token_factor
            if math.isnan(want):
                assert math.isnan(value), (where, step, key)
            elif any(s in key.rsplit("/", 1)[-1] for s in COUNTS):
                assert value == pytest.approx(want, rel=1e-9, abs=1e-12), (where, step, key)
            else:
                assert value == pytest.approx(want, rel=1e-5, abs=1e-9), (where, step, key)


@pytest.mark.parametrize("stage", ["1", "2", "3", "3bf16"])
def test_every_family_on_two_ranks_equals_one_process(runs, stage):
    """fp32 under every stage, and ZeRO-3 with bf16 compute weights (the replay model in bf16,
    its gradients as DeepSpeed reduced them, rounded to bf16)."""
    out, ranks = runs
    mine = [r[stage] for r in ranks]
    assert mine[0]["metrics"] == mine[1]["metrics"]  # bitwise the same on every rank
    assert mine[0]["hist"] == mine[1]["hist"]
    states = torch.load(out / f"states-{stage}.pt", weights_only=False)
    dtype = torch.bfloat16 if stage.endswith("bf16") else torch.float32
    shared = shared_probe(stage)  # both ranks analyse rank 0's probe batch
    for when in ("pre", "post"):
        got = mine[0]["metrics"][when]
        assert sorted(got) == ["4", "6"], (stage, when)
        ref, ref_hist = replay(states[when], dtype, 1 if shared else 2)
        assert sorted(ref) == ["4", "6"]
        families = {k.split("/")[0] for k in ref["4"]}
        want = {"param_change", "sparse", "adam_sign", "lowrank", "drift", "attrib", "principal"}
        if when == "pre":  # between backward and step: the engine still holds the gradients
            want.add("gradient")
        assert families == want, (stage, when, families)
        for key in ("param_change/mask_overlap", "sparse/kl_at_keep_0.1_dare",
                    "sparse/kl_at_budget_r4", "lowrank/kl_at_r1", "lowrank/energy_at_r4",
                    "adam_sign/component/scale/mean_abs_u", "param_change/layer_1/norm_l2",
                    "drift/sparse/kl_at_keep_0.1", "drift/lowrank/kl_at_r1",
                    "attrib/component/q_proj/kl_only", "attrib/layer_1/kl_without",
                    "principal/energy_in_top4", "principal/component/q_proj/energy_in_top1"):
            assert key in ref["4"], key
        if when == "pre":
            assert ref["4"]["gradient/missing_ratio"] == 0.0
            assert not math.isnan(ref["4"]["adam_sign/sign_agreement"])
        assert ref["4"]["lowrank/kl_at_r1"] > 0
        assert ref["6"]["drift/kl_base_now"] > 0 and ref["4"]["attrib/kl_total"] > 0
        assert_close(got, ref, f"zero{stage}-{when}", 2 if shared else 1)
        # replicated parameters (ZeRO-1/2) are compared bit for bit; ZeRO-3 has none
        replicas = {m.get(REPLICAS) for m in got.values()}
        assert replicas == ({0.0} if stage in ("1", "2") else {None}), (stage, when)
        for step, hists in ref_hist.items():
            assert hists.keys() == mine[0]["hist"][when][step].keys()
            for key, values in hists.items():
                np.testing.assert_allclose(mine[0]["hist"][when][step][key], values,
                                           rtol=1e-6, atol=0, err_msg=f"{stage} {when} {key}")


def test_zero3_snapshot_holds_this_ranks_partitions(runs):
    _, ranks = runs
    total = sum(p.numel() * p.element_size() for p in build_model().parameters())
    replicated = [r["1"]["snapshot_bytes"] for r in ranks]
    assert replicated == [total, total]  # ZeRO-1/2: whole parameters on every rank
    for run, size in (("3", total), ("3bf16", total // 2)):
        sharded = [r[run]["snapshot_bytes"] for r in ranks]
        assert sum(sharded) == size  # padding of the last partitions is not stored
        for b in sharded:  # in the parameters' own dtype: bf16 partitions take 2 bytes
            assert abs(b - size / 2) <= 0.05 * size / 2


def test_zero3_measurement_failures_leave_partitions_bit_identical(runs):
    """A forward raising on every rank half-way: the partitions and the whole copies DeepSpeed
    keeps are bit-identical, RNG and modes restored, no gradient created; the model still
    analyses (and the worker asserted bit-identity around every regular measurement too)."""
    _, ranks = runs
    for z3 in (r[run] for r in ranks for run in ("3", "3bf16")):
        assert z3["raised"]
        assert z3["bit_identical_after_raise"]
        assert z3["gathered_consistent_after_raise"]
        assert z3["gathered_consistent_after"]
        assert z3["rng_restored"] and z3["modes_restored"] and z3["no_grad_created"]
        assert math.isfinite(z3["after_raise_kl"])


def test_zero3_forward_on_patched_partitions_ignores_copies_from_training(runs):
    """After a training forward DeepSpeed keeps whole copies of the persistent parameters; an
    analysis forward on patched partitions must not compute with them."""
    _, ranks = runs
    for z3 in (r[run] for r in ranks for run in ("3", "3bf16")):
        assert z3["held_copies"] > 0
        assert z3["patch_changes_logits"]
        assert z3["patched_forward_sees_patch"]


def test_zero3_without_optimizer_leaves_nothing_in_flight_after_a_failed_forward(runs):
    """DeepSpeed's inference-only ZeRO-3 (no coordinator reachable from the parameters): a
    patched forward raising half-way leaves no prefetch in flight and no whole copy, the
    partitions bit-identical, and the next forward exact."""
    _, ranks = runs
    for r in ranks:
        got = r["offload"]
        assert not got["coordinator_found"] and got["raised"]
        assert got["bit_identical"] and got["next_forward_exact"]
        assert got["left_in_flight"] == 0 and got["left_gathered"] == 0


def test_zero3_rank_without_inputs_skips_forwards_everywhere(runs):
    _, ranks = runs
    for r in ranks:
        z3 = r["3"]
        assert "lowrank/energy_at_r1" in z3["one_sided_keys"]
        assert not any("kl" in k for k in z3["one_sided_keys"])
        keys = z3["one_sided_manager_keys"]
        assert "param_change/norm_l2" in keys and "lowrank/energy_at_r1" in keys
        assert not any(k.startswith("sparse/") or "/kl_" in k for k in keys)
    assert ranks[0]["3"]["one_sided_manager_keys"] == ranks[1]["3"]["one_sided_manager_keys"]


def test_hf_trainer_runs_zero3_with_the_callback_unchanged(runs):
    """``TrainingArguments(deepspeed=...)`` with ZeRO-3 on two CPU ranks: the callback measures
    on every rank (the same numbers), rank 0 logs; the gradients are gone by the time the
    Trainer's callbacks run (DeepSpeed's step consumes them), so ``gradient/*`` is skipped."""
    _, ranks = runs
    got = [r["trainer"] for r in ranks]
    assert got[0]["engine"] == "DeepSpeedEngine"
    assert sorted(got[0]["measured"]) == ["4", "6"]
    assert got[0]["measured"] == got[1]["measured"]
    families = {k.split("/")[0] for k in got[0]["measured"]["4"]}
    assert families == {"param_change", "sparse", "adam_sign", "lowrank"}
    assert got[0]["measured"]["4"]["param_change/norm_l2"] > 0
    assert got[0]["measured"]["4"]["sparse/tokens"] == 48.0  # 2 ranks x 2 rows x 12 tokens
    assert got[0]["logged_steps"] == [4, 6] and got[1]["logged_steps"] == []
