"""Per-rank snapshot memory and measurement time under FSDP2, against one process.

Two gloo processes on CPU shard a Qwen2-style model with ``fully_shard`` (per decoder layer, then
the root); one process trains the same model unsharded. Both take one optimizer step on the same
batch between snapshots, then time one measurement (parameter change with per-layer and
per-component groups, sparse quality at 1e-6 with the random baseline). Reports the snapshot
bytes each rank holds and the measurement time per rank, as ratios to the single process.

Run: ``python benchmarks/bench_distributed.py [--hidden 256 --layers 4 --vocab 8000]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import qwen2, table

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager


def measure(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = qwen2(args.hidden, args.layers, args.vocab).train()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = AnalysisConfig(interval=1, param_change_per_layer=True,
                            param_change_track_components=True)
    manager = ModelAnalysisManager.create(config)
    ids = torch.randint(0, args.vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(1, args.steps + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        metrics = manager.on_optimizer_step(model, inputs={"input_ids": ids})
        if step > 1:
            times.append(time.perf_counter() - start)
        assert step == 1 or "sparse/kl_at_1e-06" in metrics
    result = {"snapshot_bytes": manager.old_snapshot.nbytes(), "seconds": min(times)}
    Path(out).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp, "single.json")
        measure(0, 1, args, 0, str(single))
        port = _port()
        outs = [str(Path(tmp, f"rank{r}.json")) for r in range(2)]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=measure, args=(r, 2, args, port, outs[r])) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        one = json.loads(single.read_text())
        ranks = [json.loads(Path(o).read_text()) for o in outs]
    rows = [{"process": "single", "snapshot MB": f"{one['snapshot_bytes'] / 2**20:.1f}",
             "snapshot / single": "1.00", "measurement s": f"{one['seconds']:.3f}",
             "time / single": "1.00"}]
    for r, res in enumerate(ranks):
        rows.append({"process": f"FSDP2 rank {r} of 2",
                     "snapshot MB": f"{res['snapshot_bytes'] / 2**20:.1f}",
                     "snapshot / single": f"{res['snapshot_bytes'] / one['snapshot_bytes']:.2f}",
                     "measurement s": f"{res['seconds']:.3f}",
                     "time / single": f"{res['seconds'] / one['seconds']:.2f}"})
    print(table(rows))


if __name__ == "__main__":
    main()
