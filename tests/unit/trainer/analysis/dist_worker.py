"""One process of the distributed tests: trains a tiny Qwen2 and records the analysis.

Run as ``python -m tests.unit.trainer.analysis.dist_worker --mode fsdp --rank 0 --world 2 ...``.
Every rank sees the same batches, so data-parallel training is bit-identical to one process
training on that batch, and the analysis of the sharded or replicated model must equal the
single-process analysis.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from tests.unit.trainer.analysis.ranks import join_group, leave_group, parallelize


def config_dict(low_rank: bool, drift: bool = False) -> dict:
    return {
        "drift_enabled": drift,  # with --drift: the base is the full weights before training
        "drift_keep_ratios": [0.1, 0.5],
        "interval": 2,
        "param_change_per_layer": True,
        "param_change_track_components": True,
        "param_change_track_sign_flips": True,
        "param_change_track_mask_overlap": True,  # rank 1 of DDP owns no tensor: same reductions
        "sparse_quality_thresholds": [1e-6, 1e-3],
        "sparse_quality_keep_ratios": [0.1],
        "sparse_quality_rescale_random": True,
        "gradient_enabled": True,
        "gradient_track_per_layer": True,
        "adam_sign_enabled": True,
        "low_rank_enabled": low_rank,
        "low_rank_ranks": [1, 4],
        # embeddings and head: 131 rows, uneven shards; a limit of 16 sends the 32-wide
        # matrices through the range finder and keeps k_proj (16 x 32) exact
        "low_rank_include_embeddings": True,
        "low_rank_track_components": True,
        "low_rank_exact_max_dim": 16,
        # with --drift, the whole fine-tune's attribution and principal geometry too
        "attribution_enabled": drift,
        "attribution_groups": ["component", "layer"],
        "principal_enabled": drift,
        "principal_ranks": [1, 4],
        "principal_track_components": True,
    }


def reference_masks(weights: dict, out: Path, rank: int, world: int) -> dict[str, str]:
    """Saved masks for ``drift/overlap/*``: random sets (30% of the entries) under each
    criterion, written by rank 0 next to the outputs; every rank names the same files (the
    config is part of the layout the ranks agree on)."""
    import torch
    import torch.distributed as dist

    from grail.trainer.analysis.core.mask_file import ChangeCriterion, MaskWriter

    criteria = {"exact": ChangeCriterion("exact"), "t4": ChangeCriterion("threshold", 1e-4),
                "bf16": ChangeCriterion("bf16_view"), "keep": ChangeCriterion("keep_ratio", 0.1)}
    paths = {}
    for i, (name, criterion) in enumerate(criteria.items()):
        gen = torch.Generator().manual_seed(1000 + i)
        paths[name] = str(out.with_name(f"mask-{name}.safetensors"))
        if rank != 0:
            continue
        writer = MaskWriter(paths[name], {n: t.shape for n, t in weights.items()}, criterion)
        for n, t in weights.items():
            writer.write(n, torch.rand(t.shape, generator=gen) < 0.3)
        writer.finish()
    if world > 1:
        dist.barrier()
    return paths


def attribution_config_dict() -> dict:
    """Attribution per component and per layer next to sparse quality (the reference forward
    is shared); every group measured, so that one process and N agree group by group."""
    return {
        "interval": 2,
        "sparse_quality_thresholds": [1e-3],
        "attribution_enabled": True,
        "attribution_groups": ["component", "layer"],
        "attribution_max_groups": 16,
    }


def budget_ties(mode: str) -> dict:
    """Exact budget masks over sharded and replicated tensors whose updates tie a lot.

    ``first`` (7 x 5, uneven 4/3-row shards) and ``last`` (1 x 6: one rank holds no row) are
    FSDP2-sharded in ``fsdp`` mode; ``mid`` is a plain tensor on every rank (replicated) in
    between, so the tie order crosses shards, ranks and a replicated tensor. Returns, per budget,
    each tensor's local flat offset and the kept flags the drop function gives this rank's
    entries; checks that :class:`SelectPatch` applies exactly those flags.
    """
    import torch
    from torch import nn

    from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    from grail.trainer.analysis.ops.budget import exact_budget_drops
    from grail.trainer.analysis.patching.swaps import SelectPatch

    gen = torch.Generator().manual_seed(7)
    shapes = {"first": (7, 5), "mid": (5, 3), "last": (1, 6)}
    model = nn.Module()
    updates = {}
    for name, shape in shapes.items():
        child = nn.Module()
        child.weight = nn.Parameter(torch.randint(-8, 8, shape, generator=gen) / 4)
        model.add_module(name, child)
        # values from {0, +-1/2, +-1, +-2}: dyadic, so W_old + u is exact and ties are plenty
        choice = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0])
        updates[name] = choice[torch.randint(0, 7, shape, generator=gen)]
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.first)
        fully_shard(model.last)
    train_model = model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)
    old = ParameterSnapshot(train_model)
    live = ParameterSnapshot.live(train_model)
    with torch.no_grad():
        for name in shapes:
            info = live.shards[f"{name}.weight"]
            local = live.data[f"{name}.weight"]
            rows = info.offset // shapes[name][1]
            local.add_(updates[name][rows : rows + local.shape[0]])
    delta = old.compute_delta(live)
    total = sum(delta.shard(n).global_numel for n in delta.names)
    budgets = list(range(total + 2))
    out: dict = {"names": delta.names, "masks": {}}
    for k, drop in zip(budgets, exact_budget_drops(delta, budgets), strict=True):
        flags = {}
        for name in delta.names:
            new, prev = live.data[name].reshape(-1), old.data[name].reshape(-1)
            bits = (new - prev).abs().view(torch.int32)
            offset = delta.shard(name).offset
            kept = drop(name, offset, bits, torch.empty_like(bits)) == 0
            flags[name] = {"offset": offset, "kept": kept.int().tolist()}
        before = {n: live.data[n].clone() for n in delta.names}
        w_old = {n: old.data[n].clone() for n in delta.names}  # the patch swaps into `old`
        with SelectPatch(delta, drop):
            for name in delta.names:
                kept = torch.tensor(flags[name]["kept"], dtype=torch.bool)
                want = torch.where(kept, before[name].reshape(-1), w_old[name].reshape(-1))
                assert torch.equal(live.data[name].reshape(-1), want), (k, name)
        for name in delta.names:
            assert torch.equal(live.data[name], before[name]), (k, name)
            assert torch.equal(old.data[name], w_old[name]), (k, name)
        out["masks"][str(k)] = flags
    return out


def kwargs_wrapper(mode: str) -> dict:
    """A ``forward(input_ids, **kwargs)`` wrapper whose inner call refuses ``attention_mask``:
    every rank's first analysis forward raises the same ``TypeError`` (under FSDP2 after the
    root's parameters were gathered), every rank runs it again without the mask, and warns
    once."""
    import logging

    import torch
    import torch.nn.functional as F
    from torch import nn

    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    from tests.conftest import tiny_qwen2

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kwargs):
            return self._logits(input_ids, **kwargs)

        def _logits(self, input_ids, labels=None):  # no attention_mask: a TypeError naming it
            return self.inner(input_ids=input_ids).logits

    model = Wrapper(tiny_qwen2(vocab=131, hidden=32, layers=2))
    train_model: nn.Module = model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.inner.model.layers:
            fully_shard(layer)
        fully_shard(model)
    refused: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: refused.append(r.getMessage()) if "refused" in r.getMessage() else None
    logging.getLogger("grail.trainer.analysis.patching.forward").addHandler(handler)
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-2, foreach=False)
    manager = ModelAnalysisManager.create(AnalysisConfig(
        interval=2, sparse_quality_thresholds=[1e-6, 1e-3], sparse_quality_keep_ratios=[0.1]))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # still selects the compared positions
    records = {}
    for step in range(1, 7):
        ids = torch.randint(0, 131, (2, 12), generator=torch.Generator().manual_seed(step))
        logits = train_model(input_ids=ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 131), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        metrics = manager.on_optimizer_step(
            train_model, inputs={"input_ids": ids, "attention_mask": mask}, optimizer=opt)
        opt.zero_grad()
        if metrics:
            records[str(step)] = metrics
    return {"metrics": records, "refused": refused}


def resume(mode: str, form: str) -> dict:
    """Train 4 steps, save the analysis state with its snapshots, go on to step 8 (run A);
    restore the weights, the optimizer and, in a new manager, the state, and replay steps 5-8
    (run B). ``form``: ``"current"``; ``"old-format"``, the state without its shard layouts, as
    states saved before they were saved; ``"rank0-state"``, every rank loads rank 0's state."""
    import copy
    import io
    import logging

    import torch
    import torch.distributed as dist
    from torch import nn

    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    from grail.trainer.analysis.core.distributed import get_rank, local_tensor
    from tests.conftest import tiny_qwen2

    model = tiny_qwen2(vocab=131, hidden=32, layers=2)
    train_model: nn.Module = parallelize(model, mode)
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-2, foreach=False)
    config = AnalysisConfig(interval=2, drift_enabled=True, drift_keep_ratios=[0.1],
                            param_change_track_mask_overlap=True)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: warnings.append(r.getMessage())
    logging.getLogger("grail").addHandler(handler)

    def step(s: int, manager: ModelAnalysisManager) -> dict:
        ids = torch.randint(0, 131, (2, 12), generator=torch.Generator().manual_seed(s))
        train_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        metrics = manager.on_optimizer_step(train_model, inputs={"input_ids": ids})
        opt.zero_grad()
        return metrics

    first = ModelAnalysisManager.create(config)
    first.set_base(train_model, model=train_model)
    for s in range(1, 5):
        step(s, first)
    saved = io.BytesIO()
    state = first.state_dict(include_snapshot=True)
    if form == "old-format":
        del state["snapshot_shards"], state["base_shards"]
    torch.save(state, saved)
    if form == "rank0-state" and dist.is_initialized():
        shared = [saved.getvalue()]
        dist.broadcast_object_list(shared, src=0)
        saved = io.BytesIO(shared[0])
    weights = [local_tensor(p).clone() for p in train_model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    run_a = {str(s): step(s, first) for s in range(5, 9)}
    with torch.no_grad():
        for p, w in zip(train_model.parameters(), weights, strict=True):
            local_tensor(p).copy_(w)
    opt.load_state_dict(opt_state)
    warnings.clear()
    second = ModelAnalysisManager.create(config)
    saved.seek(0)
    second.load_state_dict(torch.load(saved, weights_only=True), model=train_model)
    run_b = {str(s): step(s, second) for s in range(5, 9)}
    return {"a": run_a, "b": run_b, "warnings": warnings, "rank": get_rank()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--low-rank", action="store_true")
    parser.add_argument("--budget-ties", action="store_true")
    parser.add_argument("--drift", action="store_true")
    parser.add_argument("--kwargs-wrapper", action="store_true")
    parser.add_argument("--resume", choices=["current", "old-format", "rank0-state"])
    parser.add_argument("--attribution", action="store_true")
    parser.add_argument(
        "--own-batches",
        action="store_true",
        help="each rank analyses a different batch; one process analyses their concatenation",
    )
    parser.add_argument(
        "--mixed-kernels",
        action="store_true",
        help="rank 0 runs the compiled kernels from the first measurement, the others eager",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    from tests.conftest import tiny_qwen2

    join_group(args.rank, args.world, args.port)
    if args.budget_ties:
        Path(args.out).write_text(json.dumps(budget_ties(args.mode)))
        leave_group(args.world)
    if args.kwargs_wrapper:
        Path(args.out).write_text(json.dumps(kwargs_wrapper(args.mode)))
        leave_group(args.world)
    if args.resume:
        result = resume(args.mode, args.resume)
        Path(args.out).write_text(json.dumps(result))
        leave_group(args.world)
    model = tiny_qwen2(vocab=131, hidden=32, layers=2)  # 131 rows: uneven shards
    start = {n: p.detach().clone() for n, p in model.named_parameters()}  # full tensors
    train_model = parallelize(model, args.mode)
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-2, foreach=False)
    config = (attribution_config_dict() if args.attribution
              else config_dict(args.low_rank, args.drift))
    if args.drift:  # drift/overlap/* against saved masks of the full tensors
        config["drift_reference_masks"] = reference_masks(start, Path(args.out), args.rank,
                                                         args.world)
    manager = ModelAnalysisManager.create(AnalysisConfig.from_dict(config))
    if args.drift:  # checked and sliced to this rank's shards at the first step
        manager.set_base(start)
    settings = contextlib.ExitStack()
    if args.mixed_kernels and args.rank == 0:  # "auto" compiles at once at any size here
        from grail.trainer.analysis import kernels

        free = {"min_total_numel": 0, "pool_numel": 64, "startup_seconds": 0.0}
        settings.enter_context(kernels.settings.override(**free, kernel_seconds=0.0))
    records = {}
    snapshot_bytes = 0
    for step in range(1, args.steps + 1):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 131, (2, 12), generator=gen)
        train_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if step == 4:  # a no-grad forward leaves FSDP2 root parameters unsharded
            with torch.no_grad():
                train_model(input_ids=ids)
        probe = ids
        if args.own_batches:
            own = [
                torch.randint(0, 131, (2, 12), generator=torch.Generator().manual_seed(100 * r))
                for r in range(2)
            ]
            probe = own[args.rank] if args.world > 1 else torch.cat(own)
        metrics = manager.on_optimizer_step(
            train_model, inputs={"input_ids": probe}, optimizer=opt
        )
        opt.zero_grad()
        if metrics:
            records[str(step)] = metrics
        if manager.old_snapshot is not None:
            snapshot_bytes = manager.old_snapshot.nbytes()
    result = {"metrics": records, "snapshot_bytes": snapshot_bytes}
    if manager.base_snapshot is not None:
        result["base_bytes"] = manager.base_snapshot.nbytes()
    if args.mixed_kernels:
        from grail.trainer.analysis import kernels

        result["kernels"] = {k: v["compiled_measurements"] for k, v in kernels.report().items()}
    settings.close()
    if args.low_rank:  # inputs on rank 0 only: every rank must skip the forwards, none may hang
        from grail.trainer.analysis.core.snapshot import ParameterSnapshot
        from grail.trainer.analysis.metrics.base import AnalysisContext
        from grail.trainer.analysis.metrics.low_rank import LowRankMetrics

        inputs = {"input_ids": ids} if args.rank == 0 else None
        delta = manager.old_snapshot.compute_delta(ParameterSnapshot.live(train_model))
        one_sided = LowRankMetrics(ranks=[1]).compute(
            delta, context=AnalysisContext(model=train_model, inputs=inputs, step=7)
        )
        result["one_sided_keys"] = sorted(one_sided)
    if args.attribution:  # fewer groups than exist: every rank measures the same ones
        from grail.trainer.analysis.core.distributed import reshard
        from grail.trainer.analysis.core.snapshot import ParameterSnapshot
        from grail.trainer.analysis.metrics.attribution import AttributionMetrics
        from grail.trainer.analysis.metrics.base import AnalysisContext

        train_model(input_ids=ids, labels=ids).loss.backward()  # an update since the snapshot
        opt.step()
        reshard(train_model)
        delta = manager.old_snapshot.compute_delta(ParameterSnapshot.live(train_model))
        result["truncated"] = AttributionMetrics(["component", "layer"], max_groups=3).compute(
            delta, context=AnalysisContext(model=train_model, inputs={"input_ids": ids}, step=7)
        )
    Path(args.out).write_text(json.dumps(result))
    leave_group(args.world)


if __name__ == "__main__":
    main()
