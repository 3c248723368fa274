"""Parameter-change and sparse-quality benchmarks for several model sizes in one process.

Used for accelerator runs, where interpreter start-up and imports are a noticeable share of a
short lease. Sizes: the ~58M reference model and a ~1.5B Qwen2-style configuration
(hidden 1536, 28 layers, vocab 151936, intermediate 8960, 12 heads, 2 KV heads).

Run: ``python benchmarks/run_suite.py --device cuda``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_param_change
import bench_sparse_quality
from _common import table

SIZES = {
    "58M": {
        "hidden": 512,
        "layers": 8,
        "vocab": 32000,
        "intermediate": None,
        "heads": 8,
        "kv_heads": None,
    },
    "1.5B": {
        "hidden": 1536,
        "layers": 28,
        "vocab": 151936,
        "intermediate": 8960,
        "heads": 12,
        "kv_heads": 2,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="58M:float32,58M:bfloat16,1.5B:bfloat16")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name(), f"torch {torch.__version__}", flush=True)
    for which, bench in (("param_change", bench_param_change), ("sparse", bench_sparse_quality)):
        rows = []
        for item in args.sizes.split(","):
            size, dtype = item.split(":")
            ns = argparse.Namespace(device=args.device, batch=4, seq=128, **SIZES[size])
            start = time.perf_counter()
            row = {"size": size, **bench.run(getattr(torch, dtype), ns)}
            print(f"{which} {size} {dtype} done in {time.perf_counter() - start:.0f}s", flush=True)
            rows.append(row)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        print(f"\n{which} on {args.device}\n{table(rows)}\n", flush=True)


if __name__ == "__main__":
    main()
