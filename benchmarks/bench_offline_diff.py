"""The offline checkpoint diff against the online path and against reading the files.

On a random-init Qwen2-style model (default ~58M parameters: hidden 512, 8 layers, vocab 32000)
saved twice with ``save_pretrained`` (sharded), in fp32 and bf16, side by side in one process:

* floor: loading every tensor of both checkpoints through the lazy mapping, one subtraction
  into a preallocated float32 buffer and one sum (what any diff must do);
* offline: ``ParameterChangeMetrics`` (4 thresholds, per layer, per component, sign flips) on
  the lazily loaded pair, without and with the heatmap/curve observer of the report;
* online: the same computer on two in-memory snapshots of the same models;
* whole ``run_diff`` (no low-rank, no hashing) and its peak RSS above the process's, as a
  fraction of one checkpoint's bytes and of its largest tensor.

Run: ``python benchmarks/bench_offline_diff.py [--device cuda] [--hidden 1536 --layers 28
--vocab 151936 --intermediate 8960 --heads 12 --kv-heads 2]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_model_args,
    best_of,
    model_bytes,
    peak_rss,
    qwen2,
    simulate_update,
    table,
)

from grail.trainer.analysis.core.naming import ParameterNaming
from grail.trainer.analysis.core.snapshot import ParameterDelta, ParameterSnapshot
from grail.trainer.analysis.metrics import ParameterChangeMetrics
from grail.trainer.analysis.offline.diff import DiffOptions, run_diff
from grail.trainer.analysis.offline.pair import open_pair
from grail.trainer.analysis.offline.stream import CellStats, ObservedDelta


def run(dtype: torch.dtype, args: argparse.Namespace, root: Path) -> dict[str, str]:
    model = qwen2(args.hidden, args.layers, args.vocab, args.intermediate, args.heads,
                  args.kv_heads, dtype=dtype)
    size = model_bytes(model)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    base_dir, tuned_dir = root / f"{dtype}-base", root / f"{dtype}-tuned"
    model.save_pretrained(base_dir, max_shard_size="200MB")
    old = ParameterSnapshot(model, device=args.device)
    simulate_update(model, scale=1e-4)
    model.save_pretrained(tuned_dir, max_shard_size="200MB")
    new = ParameterSnapshot(model, device=args.device)
    del model
    pc = ParameterChangeMetrics(per_layer=True, track_components=True, track_sign_flips=True)
    pair = open_pair(str(base_dir), str(tuned_dir), args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    buf = torch.empty(max(s.numel for s in pair.tuned.specs.values()), device=args.device)

    def read_floor() -> None:
        total = torch.zeros((), device=args.device)
        for n in pair.names:
            new, old = pair.new.data[n], pair.old.data[n]
            out = buf[: new.numel()].view_as(new)
            total += torch.sub(new, old, out=out).sum()
        float(total)

    def offline(observe: bool) -> None:
        cls = [CellStats(ParameterNaming(pair.names), device=args.device)] if observe else []
        pc.compute(ObservedDelta(pair.old, pair.new, cls))
        sync()

    t_floor = best_of(read_floor, repeat=args.repeat)
    t_offline = best_of(lambda: offline(False), repeat=args.repeat)
    t_observed = best_of(lambda: offline(True), repeat=args.repeat)
    snaps = [old, new]
    del old, new
    t_online = best_of(lambda: (pc.compute(ParameterDelta(*snaps)), sync()), repeat=args.repeat)
    snaps.clear()
    opts = DiffOptions(str(base_dir), str(tuned_dir), device=args.device, low_rank=False,
                       hash_files=False, progress=False)
    run_diff(opts)  # warm-up: imports, allocator pools
    with peak_rss() as mem:
        t_diff = best_of(lambda: run_diff(opts), repeat=1, warmup=0)
    mb = 2 * size / 1e6
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "checkpoint MB": f"{size / 1e6:.0f}",
        "floor MB/s": f"{mb / t_floor:.0f}",
        "offline / floor": f"{t_offline / t_floor:.2f}",
        "offline / online": f"{t_offline / t_online:.2f}",
        "observer overhead": f"{t_observed / t_offline:.2f}x",
        "run_diff MB/s": f"{mb / t_diff:.0f}",
        "peak RSS / checkpoint": f"{mem['extra'] / size:.2f}",
        "peak RSS / largest tensor": f"{mem['extra'] / largest:.1f}",
    }


def main() -> None:
    parser = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(getattr(torch, d), args, Path(tmp)) for d in args.dtypes.split(",")]
    print(f"device {args.device}")
    print(table(rows))


if __name__ == "__main__":
    main()
