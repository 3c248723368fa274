"""One process of the distributed tests: trains a tiny Qwen2 and records the analysis.

Run as ``python -m tests.unit.trainer.analysis.dist_worker --mode fsdp --rank 0 --world 2 ...``.
Every rank sees the same batches, so data-parallel training is bit-identical to one process
training on that batch, and the analysis of the sharded or replicated model must equal the
single-process analysis.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def config_dict(low_rank: bool) -> dict:
    return {
        "interval": 2,
        "param_change_per_layer": True,
        "param_change_track_components": True,
        "param_change_track_sign_flips": True,
        "sparse_quality_thresholds": [1e-6, 1e-3],
        "sparse_quality_keep_ratios": [0.1],
        "sparse_quality_rescale_random": True,
        "gradient_enabled": True,
        "gradient_track_per_layer": True,
        "adam_sign_enabled": True,
        "low_rank_enabled": low_rank,
        "low_rank_ranks": [1, 4],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--low-rank", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    from tests.conftest import tiny_qwen2

    torch.set_num_threads(1)
    if args.world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    model = tiny_qwen2(vocab=131, hidden=32, layers=2)  # 131 rows: uneven shards
    train_model = model
    if args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-2, foreach=False)
    manager = ModelAnalysisManager.create(AnalysisConfig.from_dict(config_dict(args.low_rank)))
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
        metrics = manager.on_optimizer_step(train_model, inputs={"input_ids": ids}, optimizer=opt)
        opt.zero_grad()
        if metrics:
            records[str(step)] = metrics
        if manager.old_snapshot is not None:
            snapshot_bytes = manager.old_snapshot.nbytes()
    Path(args.out).write_text(json.dumps({"metrics": records, "snapshot_bytes": snapshot_bytes}))
    if args.world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
