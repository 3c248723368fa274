"""One process of the distributed ``principal/*`` test: trains a tiny Qwen2, records the analysis.

Run as ``python -m tests.unit.trainer.analysis.dist_worker_principal --mode fsdp --rank 0
--world 2 ...``. Every rank sees the same batches (see :mod:`.dist_worker`), so the analysis of
the sharded or replicated model must equal the single-process one. Besides the interval view
(the manager, measurements at steps 4 and 6, the second one served by the factor cache) it
measures the whole run against the weights before training with a cache that keeps the base's
factors (the base-drift view), and reports how often each cache was used on this rank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tests.unit.trainer.analysis.ranks import join_group, leave_group, parallelize

CONFIG = {
    "interval": 2,
    "param_change_enabled": False,
    "sparse_quality_enabled": False,
    "principal_enabled": True,
    "principal_ranks": [1, 4, 8],  # 8 + 8 oversampling < 32: randomized
    "principal_track_components": True,
    # embeddings and head: 131 rows, uneven shards; a limit of 16 sends the 32-wide matrices
    # through the range finder and keeps k_proj (16 x 32) exact
    "low_rank_include_embeddings": True,
    "low_rank_exact_max_dim": 16,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    from grail.trainer.analysis.core.distributed import reshard
    from grail.trainer.analysis.core.snapshot import ParameterSnapshot
    from grail.trainer.analysis.ops.principal import FactorCache
    from tests.conftest import tiny_qwen2

    join_group(args.rank, args.world, args.port)
    model = tiny_qwen2(vocab=131, hidden=32, layers=2)  # 131 rows: uneven shards
    train_model = parallelize(model, args.mode)
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-2, foreach=False)
    manager = ModelAnalysisManager.create(AnalysisConfig.from_dict(CONFIG))
    (computer,) = manager.computers
    base = ParameterSnapshot(train_model)  # local shards under FSDP2
    base_cache = FactorCache("cpu", tracks="reference")
    records: dict[str, dict[str, float]] = {}
    drift: dict[str, dict[str, float]] = {}
    for step in range(1, 7):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 131, (2, 12), generator=gen)
        train_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if step == 4:  # a no-grad forward leaves FSDP2 root parameters unsharded
            with torch.no_grad():
                train_model(input_ids=ids)
        metrics = manager.on_optimizer_step(train_model, optimizer=opt)
        opt.zero_grad()
        if metrics:
            records[str(step)] = metrics
            reshard(train_model)
            whole = base.compute_delta(ParameterSnapshot.live(train_model))
            with torch.no_grad():
                drift[str(step)] = computer.measure(
                    whole, train_model, cache=base_cache, prefix="drift/principal"
                )
    result = {
        "metrics": records,
        "drift": drift,
        "cache": {"entries": len(computer.cache), "hits": computer.cache.hits},
        "base_cache": {"entries": len(base_cache), "hits": base_cache.hits},
    }
    Path(args.out).write_text(json.dumps(result))
    leave_group(args.world)


if __name__ == "__main__":
    main()
