"""One rank of the DeepSpeed tests: trains a tiny Qwen2 under ZeRO-1, 2 and 3 and records both the
analysis and the full (gathered) training state it saw.

Run as ``python -m tests.unit.trainer.analysis.ds_worker --rank 0 --world 2 --port P --out DIR``
(one process per rank, gloo, DeepSpeed's CPU accelerator). For each run (``1``, ``2``, ``3``: the
stage in fp32; ``3bf16``: ZeRO-3 with bf16 compute weights and fp32 master weights), every rank
trains on
its own batches and analyses its own probe batch with two managers: ``pre`` is called between
``engine.backward()`` and ``engine.step()`` (gradients exist), ``post`` after ``engine.step()``
(where the HF Trainer's callbacks run). At the steps the managers read the model, rank 0 also
saves what DeepSpeed's own full-state helpers (``GatheredParameters``, ``safe_get_full_grad``,
``safe_get_full_optimizer_state``) return, so the test can replay the same states in one process
on an unsharded copy and compare. The model is wrapped with a 3-entry ``scale`` parameter: an odd
size, so the last ZeRO-3 partition is padded.

Run ``offload``: ZeRO-3 without an optimizer (DeepSpeed's inference-only offload, no parameter
coordinator reachable from the parameters), a patched forward raising half-way (see
:func:`run_offload`).

Run ``trainer``: the HF Trainer itself runs ZeRO-3 (``TrainingArguments(deepspeed=...)``, through
accelerate) with ``ModelAnalysisCallback``; the callback is called after ``engine.step()``.

ZeRO-3 also checks the invariants (partitions bit-identical after a measurement, and every whole
copy DeepSpeed holds equal to the partitions, also when a forward raises on every rank half-way;
RNG, modes and gradients untouched), that a rank without inputs makes every rank skip the
forwards, that a forward on patched partitions sees the patch while DeepSpeed still holds whole
copies from training's forward, and the snapshot size.

DeepSpeed's shared-memory all-reduce kernel is not built (compiling it takes a minute in a fresh
environment and gloo carries every collective anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.unit.trainer.analysis.ranks import leave_group

VOCAB = 131
STEPS = 6
# the steps at which the managers (interval 2) read the model: step 1 takes the base
# (drift/*), steps 2, 4, 6 the snapshots and measurements
RECORD = (1, 2, 4, 6)
PERSISTENCE = 600  # ZeRO-3: norms, biases and k/v projections stay gathered, the rest not


def analysis_config() -> dict:
    return {
        "interval": 2,
        "param_change_per_layer": True,
        "param_change_track_components": True,
        "param_change_track_sign_flips": True,
        "param_change_track_mask_overlap": True,
        "sparse_quality_thresholds": [1e-6, 1e-3],
        "sparse_quality_keep_ratios": [0.1],
        "sparse_quality_rescale_random": True,
        "gradient_enabled": True,
        "gradient_track_per_layer": True,
        "gradient_track_components": True,
        "adam_sign_enabled": True,
        "adam_sign_track_components": True,
        "histogram_samples": 64,
        "low_rank_enabled": True,
        "low_rank_ranks": [1, 4],
        "low_rank_include_embeddings": True,
        "low_rank_track_components": True,
        "low_rank_exact_max_dim": 16,
        # the whole fine-tune, output attribution and principal geometry over partitions too
        "drift_enabled": True,
        "drift_keep_ratios": [0.1],
        "attribution_enabled": True,
        "attribution_groups": ["component", "layer"],
        "principal_enabled": True,
        "principal_ranks": [1, 4],
        "principal_track_components": True,
    }


def ds_config(stage: int, bf16: bool) -> dict:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
    }
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = PERSISTENCE
        # else zero.Init replaces torch's F.linear for the rest of the process by DeepSpeed's
        # own, whose bf16 rounding differs from the replay's (the model's math, not the analysis)
        cfg["zero_optimization"]["memory_efficient_linear"] = False
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def build_model(dtype: Any = None) -> Any:
    """The tiny Qwen2 (seeded: the same on every rank and in the replay) plus ``scale``."""
    import torch
    from torch import nn

    from tests.conftest import tiny_qwen2

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = tiny_qwen2(vocab=VOCAB, hidden=32, layers=2)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits * self.scale.mean()

    model = Scaled()
    return model if dtype is None else model.to(dtype)


def shared_probe(run: str) -> bool:
    """Whether every rank analyses the same probe batch: in bf16, a forward over 2 rows and one
    over the 4 rows of both ranks round differently (by percents of a small KL), so the replay
    could not tell an analysis error from a batch-shape effect; the same batch on every rank
    gives bit-identical logits."""
    return run.endswith("bf16")


def batch(step: int, rank: int, probe: bool = False) -> Any:
    import torch

    seed = 1000 * (2 if probe else 1) + 10 * step + rank
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def full_state(engine: Any, stage: int, grads: bool) -> dict:
    """Weights, gradients (when ``grads``), Adam moments and hyperparameters of every parameter,
    gathered with DeepSpeed's own helpers (collectives: every rank calls this)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad, safe_get_full_optimizer_state

    named = list(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            weights = {n: p.detach().float().clone() for n, p in named}
    else:
        weights = {n: p.detach().float().clone() for n, p in named}
    out: dict[str, Any] = {"weights": weights, "grads": {}, "exp_avg": {}, "exp_avg_sq": {}}
    basic = engine.optimizer.optimizer
    moments = bool(basic.state)  # none before the first step
    for n, p in named:
        if grads:
            out["grads"][n] = safe_get_full_grad(p).float().clone().view(weights[n].shape)
        for key in ("exp_avg", "exp_avg_sq") if moments else ():
            out[key][n] = safe_get_full_optimizer_state(p, key).float().clone()
    out["step"] = float(next(iter(basic.state.values()))["step"]) if moments else 0.0
    group = basic.param_groups[0]
    out["hyper"] = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
    return out


def partitions(module: Any) -> dict[str, Any]:
    """Clones of every ZeRO-3 partition and of the whole tensors DeepSpeed keeps gathered."""
    out = {}
    for n, p in module.named_parameters():
        out[n] = p.ds_tensor.clone()
        if p.ds_status.name == "AVAILABLE":
            out[n + "#full"] = p.data.clone()
    return out


def gathered_consistent(module: Any) -> bool:
    """Every whole tensor DeepSpeed holds equals the concatenation of the partitions."""
    import torch
    import torch.distributed as dist

    for _, p in module.named_parameters():
        parts = [torch.empty_like(p.ds_tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, p.ds_tensor.contiguous())
        if p.ds_status.name == "AVAILABLE":
            whole = torch.cat(parts)[: p.ds_numel]
            if not torch.equal(whole, p.data.reshape(-1)):
                return False
    return True


def run_stage(run: str, rank: int, out_dir: Path) -> dict:
    import deepspeed
    import torch

    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

    stage, bf16 = int(run[0]), run.endswith("bf16")
    cfg = ds_config(stage, bf16)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = build_model()
    else:
        model = build_model()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=cfg
    )
    config = AnalysisConfig.from_dict(analysis_config())
    managers = {"pre": ModelAnalysisManager.create(config),
                "post": ModelAnalysisManager.create(config)}
    result: dict[str, Any] = {"metrics": {"pre": {}, "post": {}}, "hist": {"pre": {}, "post": {}}}
    states: dict[str, dict] = {"pre": {}, "post": {}}
    for step in range(1, STEPS + 1):
        ids = batch(step, rank)
        logits = engine(input_ids=ids)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), ids.reshape(-1))
        engine.backward(loss)
        for when in ("pre", "post"):
            if when == "post":
                engine.step()
            if step in RECORD:
                state = full_state(engine, stage, grads=when == "pre")
                if rank == 0:
                    states[when][step] = state
            # bf16: one probe batch for both ranks (see shared_probe)
            probe = {"input_ids": batch(step, 0 if shared_probe(run) else rank, probe=True)}
            before = partitions(engine.module) if stage == 3 and when == "pre" else None
            metrics = managers[when].on_optimizer_step(
                engine, inputs=probe, optimizer=engine.optimizer
            )
            if before is not None:
                after = partitions(engine.module)
                for n in before:  # bit for bit, gathered copies that are kept included
                    assert n.endswith("#full") or n in after, (step, n)
                    if n in after:
                        assert torch.equal(before[n], after[n]), (step, n)
                assert gathered_consistent(engine.module), step
            if metrics:
                result["metrics"][when][str(step)] = metrics
                result["hist"][when][str(step)] = {
                    k: sorted(v.tolist()) for k, v in managers[when].last_histograms.items()
                }
    if rank == 0:
        torch.save(states, out_dir / f"states-{run}.pt")
    result["snapshot_bytes"] = managers["pre"].old_snapshot.nbytes()
    if stage == 3:
        result.update(zero3_checks(engine, managers["post"], rank))
    return result


def zero3_checks(engine: Any, manager: Any, rank: int) -> dict:
    """Invariants under ZeRO-3 (every rank runs the same calls)."""
    import torch

    from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    from grail.trainer.analysis.metrics.base import AnalysisContext
    from grail.trainer.analysis.metrics.low_rank import LowRankMetrics
    from grail.trainer.analysis.metrics.sparse_quality import SparseQualityMetrics

    module = engine.module
    out: dict[str, Any] = {}
    delta = manager.old_snapshot.compute_delta(ParameterSnapshot.live(engine))
    probe = {"input_ids": batch(0, rank, probe=True)}

    # a forward that raises on every rank half-way (in the second decoder layer)
    class Boom(RuntimeError):
        pass

    def boom(mod: Any, args: Any) -> None:
        raise Boom("half-way")

    before = partitions(module)
    rng = torch.get_rng_state()
    modes = [m.training for m in module.modules()]
    handle = module.lm.model.layers[1].register_forward_pre_hook(boom)
    try:
        SparseQualityMetrics(thresholds=[1e-6]).compute(
            delta, context=AnalysisContext(model=engine, inputs=probe, step=7)
        )
        out["raised"] = False
    except Boom:
        out["raised"] = True
    finally:
        handle.remove()
    after = partitions(module)
    out["bit_identical_after_raise"] = all(
        torch.equal(before[n], after[n]) if n in after else n.endswith("#full") for n in before
    )
    out["gathered_consistent_after_raise"] = gathered_consistent(module)
    out["rng_restored"] = torch.equal(rng, torch.get_rng_state())
    out["modes_restored"] = modes == [m.training for m in module.modules()]
    out["no_grad_created"] = all(p.grad is None for p in module.parameters())
    # the model still trains and analyses normally after the failure
    sq = SparseQualityMetrics(thresholds=[1e-6]).compute(
        delta, context=AnalysisContext(model=engine, inputs=probe, step=7)
    )
    out["after_raise_kl"] = sq["sparse/kl_at_1e-06"]
    out["gathered_consistent_after"] = gathered_consistent(module)
    out.update(stale_copy_check(engine, probe))
    # inputs on rank 0 only: every rank skips the forwards, none hangs
    inputs = probe if rank == 0 else None
    one_sided = LowRankMetrics(ranks=[1]).compute(
        delta, context=AnalysisContext(model=engine, inputs=inputs, step=7)
    )
    out["one_sided_keys"] = sorted(one_sided)
    metrics = manager.on_optimizer_step(engine, inputs=inputs, optimizer=engine.optimizer)
    metrics = manager.on_optimizer_step(engine, inputs=inputs, optimizer=engine.optimizer)
    out["one_sided_manager_keys"] = sorted(metrics)
    return out


def stale_copy_check(engine: Any, probe: Any) -> dict:
    """An analysis forward on patched partitions while DeepSpeed still holds the whole copies a
    training forward left (persistent parameters): it must compute with the patch. The expected
    logits come from a plain forward after every copy was released by hand."""
    import torch

    from grail.trainer.analysis.core import zero
    from grail.trainer.analysis.patching.forward import prepare_inputs, run_forward

    module = engine.module
    prepared = prepare_inputs(engine, probe, max_tokens=10**6)
    with torch.no_grad():
        engine(*prepared.args, **prepared.kwargs)  # as training: persistent copies stay gathered
        held = [p for p in module.parameters() if zero.is_gathered(p)]
        saved = [p.ds_tensor.clone() for p in held]
        try:
            for p in held:
                p.ds_tensor.data.mul_(0.5)
            seen = run_forward(engine, prepared)
            zero.release(module)
            expected = engine(*prepared.args, **prepared.kwargs)
        finally:
            for p, s in zip(held, saved):
                p.ds_tensor.data.copy_(s)
            zero.release(module)
    expected = expected.reshape(seen.shape)
    unpatched = run_forward(engine, prepared)
    return {"held_copies": len(held),
            "patched_forward_sees_patch": bool(torch.equal(seen, expected)),
            "patch_changes_logits": not bool(torch.equal(seen, unpatched))}


def run_offload() -> dict:
    """ZeRO-3 without an optimizer (DeepSpeed's inference-only offload, as for a frozen
    reference model): no parameter coordinator is reachable from the parameters. A patched
    forward that raises half-way leaves prefetches of patched values in flight; the analysis
    must leave the partitions bit-identical, no copy gathered or in flight, and the next
    forward exact."""
    import deepspeed
    import torch

    from grail.trainer.analysis.core import zero
    from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    from grail.trainer.analysis.metrics.base import AnalysisContext
    from grail.trainer.analysis.metrics.sparse_quality import SparseQualityMetrics

    cfg = ds_config(3, False)
    del cfg["optimizer"]
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = build_model()
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg)
    module = engine.module.eval()
    probe = {"input_ids": batch(0, 0, probe=True)}
    snapshot = ParameterSnapshot(engine)
    gen = torch.Generator().manual_seed(3)
    for p in module.parameters():  # an update to analyse
        p.ds_tensor.data.add_(1e-2 * torch.randn(p.ds_tensor.shape, generator=gen))
    delta = snapshot.compute_delta(ParameterSnapshot.live(engine))
    with torch.no_grad():
        zero.release(module)
        for _ in range(2):  # the first records DeepSpeed's trace: prefetching starts after it
            expected = engine(**probe)
    before = partitions(module)
    calls = [0]

    def boom(mod: Any, args: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:  # in the first patched forward, after prefetches were launched
            raise RuntimeError("half-way")

    handle = module.lm.model.layers[1].register_forward_pre_hook(boom)
    raised = False
    try:
        # threshold 1: every entry of the update dropped, the patched values are the old ones
        SparseQualityMetrics(thresholds=[1.0]).compute(
            delta, context=AnalysisContext(model=engine, inputs=probe, step=1)
        )
    except RuntimeError:
        raised = True
    finally:
        handle.remove()
    after = partitions(module)
    out = {
        "coordinator_found": zero.coordinator(list(module.parameters())) is not None,
        "raised": raised,
        "bit_identical": all(torch.equal(before[n], after[n]) for n in before if n in after),
        "left_in_flight": sum(p.ds_status.name == "INFLIGHT" for p in module.parameters()),
        "left_gathered": sum(zero.is_gathered(p) for p in module.parameters()),
    }
    with torch.no_grad():
        out["next_forward_exact"] = bool(torch.equal(engine(**probe), expected))
    return out


def run_trainer() -> dict:
    """The HF Trainer under ZeRO-3 with the analysis callback: what every rank measured."""
    import tempfile

    import torch
    from transformers import Trainer

    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    from grail.trainer.analysis.integrations import ModelAnalysisCallback
    from tests.conftest import tiny_qwen2

    from .integrations._hf import lm_dataset, training_args

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": PERSISTENCE},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}
    config = AnalysisConfig(interval=2, gradient_enabled=True, adam_sign_enabled=True,
                            low_rank_enabled=True, low_rank_ranks=[1])
    manager = ModelAnalysisManager.create(config)
    gen = torch.Generator().manual_seed(5)
    probe = {"input_ids": torch.randint(0, 128, (2, 12), generator=gen)}
    measured: dict[str, dict] = {}

    class Keep(ModelAnalysisCallback):  # what this rank measured, logged or not
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if manager.is_measurement_step() and manager.last_metrics:
                measured[str(state.global_step)] = dict(manager.last_metrics)
            return super().on_step_end(args, state, control, **kwargs)

    with tempfile.TemporaryDirectory() as out:
        args = training_args(out, deepspeed=ds, max_steps=6, per_device_train_batch_size=2)
        trainer = Trainer(model=tiny_qwen2(vocab=128), args=args, callbacks=[Keep(manager, probe)],
                          train_dataset=lm_dataset(rows=64, seq=12, vocab=128))
        trainer.train()
    logged = [e for e in trainer.state.log_history if any(k.startswith("analysis/") for k in e)]
    return {"engine": type(trainer.model_wrapped).__name__, "measured": measured,
            "logged_steps": [e["step"] for e in logged]}


RUNNERS = {"trainer": run_trainer, "offload": run_offload}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="1,2,3,3bf16,offload,trainer")
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(args.rank),
                      LOCAL_RANK=str(args.rank), WORLD_SIZE=str(args.world),
                      LOCAL_WORLD_SIZE=str(args.world))

    import torch

    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.comm.torch
    from transformers import Qwen2ForCausalLM  # noqa: F401  (import before zero.Init patches)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # see module docstring
    deepspeed.init_distributed(dist_backend="gloo")
    out_dir = Path(args.out)
    results = {}
    for run in args.runs.split(","):
        if run in RUNNERS:
            results[run] = RUNNERS[run]()
        else:
            results[run] = run_stage(run, args.rank, out_dir)
        (out_dir / f"rank{args.rank}.json").write_text(json.dumps(results))
    leave_group(args.world)


if __name__ == "__main__":
    main()
