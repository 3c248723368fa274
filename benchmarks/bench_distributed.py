"""Per-rank snapshot memory and measurement time under FSDP2 and DeepSpeed ZeRO-3, against one
process.

Two gloo processes on CPU shard a Qwen2-style model with ``fully_shard`` (per decoder layer, then
the root), then two more with DeepSpeed ZeRO-3 (built under ``zero.Init``, DeepSpeed's default
persistence threshold, its CPU accelerator); one process trains the same model unsharded. All
take one optimizer step on the same batch between snapshots, then time one measurement
(parameter change with per-layer and per-component groups, sparse quality at 1e-6 with the random
baseline). Reports the snapshot bytes each rank holds and the measurement time per rank, as
ratios to the single process. The ZeRO-3 rows need ``pip install deepspeed`` (skipped without).

Engines measured one after the other see different load on a shared machine, so the ZeRO-3 /
FSDP2 ratio is also measured side by side: two more processes hold a ZeRO-3 engine and an FSDP2
copy of the same model, and alternate a training step and a measurement of each for ``--rounds``
rounds (the first two of each are not timed).

DeepSpeed prefetches up to ``stage3_prefetch_bucket_size`` entries ahead of the module that
runs (5e7 by default). That is more than this whole model, so the first module's fetch gathers
everything in a few large calls that compute then waits for. ``--zero-prefetch-bucket`` sets it
smaller, for training and analysis alike.

Run: ``python benchmarks/bench_distributed.py [--hidden 256 --layers 4 --vocab 8000 --rounds 10
--zero-prefetch-bucket N]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import qwen2, table

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager


def _zero3(args: argparse.Namespace, rank: int, world: int, port: int) -> tuple[Any, Any]:
    """``(engine, train_step)`` of a ZeRO-3 engine on this rank (gloo, CPU accelerator)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import deepspeed.comm.torch
    from transformers import Qwen2ForCausalLM  # noqa: F401  (before zero.Init patches Tensor)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo carries everything
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "zero_optimization": {"stage": 3}}
    if args.zero_prefetch_bucket is not None:
        cfg["zero_optimization"]["stage3_prefetch_bucket_size"] = args.zero_prefetch_bucket
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = qwen2(args.hidden, args.layers, args.vocab).train()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=cfg)

    def train_step(ids: torch.Tensor) -> None:
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    return engine, train_step


def _fsdp(args: argparse.Namespace, world: int) -> tuple[Any, Any]:
    """``(model, train_step)`` of the model under FSDP2 (per decoder layer, then the root), or
    unsharded in one process."""
    model = qwen2(args.hidden, args.layers, args.vocab).train()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    return model, train_step


def _manager() -> ModelAnalysisManager:
    """Every step measured: parameter change per layer and component, sparse quality."""
    return ModelAnalysisManager.create(AnalysisConfig(
        interval=1, param_change_per_layer=True, param_change_track_components=True))


def _timed_measurement(manager: ModelAnalysisManager, model: Any,
                       train_step: Callable[[torch.Tensor], None], ids: torch.Tensor,
                       world: int) -> float:
    """One training step, then the seconds one measurement takes (the first call takes the
    snapshot; every later one must have measured)."""
    first = manager.old_snapshot is None
    train_step(ids)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    metrics = manager.on_optimizer_step(model, inputs={"input_ids": ids})
    seconds = time.perf_counter() - start
    assert first or "sparse/kl_at_1e-06" in metrics, sorted(metrics)
    return seconds


def _batch(args: argparse.Namespace) -> torch.Tensor:
    """The training and probe batch: 2 x 64 random token ids, the same on every rank."""
    return torch.randint(0, args.vocab, (2, 64), generator=torch.Generator().manual_seed(0))


def measure(
    rank: int, world: int, args: argparse.Namespace, port: int, out: str, engine: str = "fsdp"
) -> None:
    torch.set_num_threads(1)
    if engine == "zero3":
        model, train_step = _zero3(args, rank, world, port)
    else:
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world)
        model, train_step = _fsdp(args, world)
    manager, ids = _manager(), _batch(args)
    times = [_timed_measurement(manager, model, train_step, ids, world)
             for _ in range(args.steps)][1:]
    result = {"snapshot_bytes": manager.old_snapshot.nbytes(), "seconds": min(times)}
    Path(out).write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def side_by_side(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    """A ZeRO-3 engine and an FSDP2 copy of the same model in the same two processes,
    measured alternately."""
    torch.set_num_threads(1)
    engines = {"ZeRO-3": _zero3(args, rank, 2, port), "FSDP2": _fsdp(args, 2)}
    managers = {label: _manager() for label in engines}
    ids = _batch(args)
    times: dict[str, list[float]] = {label: [] for label in engines}
    for round_ in range(args.rounds + 2):
        order = list(engines) if round_ % 2 == 0 else list(reversed(engines))  # no order bias
        for label in order:
            model, train_step = engines[label]
            seconds = _timed_measurement(managers[label], model, train_step, ids, 2)
            if round_ >= 2:  # the first takes the snapshot, the second warms up
                times[label].append(seconds)
    Path(out).write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def _two_ranks(args: argparse.Namespace, engine: str, tmp: str) -> list[dict]:
    port = _port()
    outs = [str(Path(tmp, f"{engine}-rank{r}.json")) for r in range(2)]
    ctx = mp.get_context("spawn")
    if engine == "side-by-side":
        procs = [ctx.Process(target=side_by_side, args=(r, args, port, outs[r]))
                 for r in range(2)]
    else:
        procs = [ctx.Process(target=measure, args=(r, 2, args, port, outs[r], engine))
                 for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    for p in procs:  # a rank that crashed leaves the other waiting in a collective
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    if codes != [0, 0]:
        raise RuntimeError(f"{engine}: the two ranks exited with {codes}")
    return [json.loads(Path(o).read_text()) for o in outs]


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
    parser.add_argument("--rounds", type=int, default=10,
                        help="timed measurements of each engine side by side (0: none)")
    parser.add_argument("--zero-prefetch-bucket", type=int, default=None,
                        help="ZeRO-3's stage3_prefetch_bucket_size in entries (default: "
                        "DeepSpeed's, 5e7, more than this whole model)")
    args = parser.parse_args()
    engines = {"FSDP2": "fsdp"}
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("deepspeed is not installed: no ZeRO-3 rows (pip install grail-analysis[deepspeed])")
    else:
        engines["ZeRO-3"] = "zero3"
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp, "single.json")
        measure(0, 1, args, 0, str(single))
        one = json.loads(single.read_text())
        ranks = {label: _two_ranks(args, engine, tmp) for label, engine in engines.items()}
        both = (_two_ranks(args, "side-by-side", tmp)
                if "ZeRO-3" in engines and args.rounds > 0 else [])
    rows = [{"process": "single", "snapshot MB": f"{one['snapshot_bytes'] / 2**20:.2f}",
             "snapshot / single": "1.000", "measurement s": f"{one['seconds']:.3f}",
             "time / single": "1.00"}]
    for label, results in ranks.items():
        for r, res in enumerate(results):
            rows.append({"process": f"{label} rank {r} of 2",
                         "snapshot MB": f"{res['snapshot_bytes'] / 2**20:.2f}",
                         "snapshot / single":
                             f"{res['snapshot_bytes'] / one['snapshot_bytes']:.3f}",
                         "measurement s": f"{res['seconds']:.3f}",
                         "time / single": f"{res['seconds'] / one['seconds']:.2f}"})
    print(table(rows))
    if both:
        pairs = []
        for r, times in enumerate(both):
            z, f = times["ZeRO-3"], times["FSDP2"]
            pairs.append({
                "side by side": f"rank {r} of 2",
                "FSDP2 min / median s": f"{min(f):.3f} / {statistics.median(f):.3f}",
                "ZeRO-3 min / median s": f"{min(z):.3f} / {statistics.median(z):.3f}",
                "ZeRO-3 / FSDP2 (min, median)":
                    f"{min(z) / min(f):.2f}, {statistics.median(z) / statistics.median(f):.2f}"})
        print(f"\nalternating in the same two processes, {args.rounds} rounds:")
        print(table(pairs))


if __name__ == "__main__":
    main()
