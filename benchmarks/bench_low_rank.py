"""Cost of the low-rank computer against the sparse-quality computer on the same model and batch.

Runs on CPU by default, on CUDA with ``--device cuda``. The update is dense Gaussian noise
(``simulate_update``); the SVD cost does not depend on its spectrum. Printed numbers are median
wall times in one process; each case is timed alternately with the sparse-quality computer and
the ratio is the median of the per-pair ratios.

    python benchmarks/bench_low_rank.py [--device cuda] [--repeat 3] [--threads 2] [--skip-svd]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import paired, qwen2, simulate_update, table

from grail.trainer.analysis.config import AnalysisConfig
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.metrics.low_rank import LowRankMetrics
from grail.trainer.analysis.metrics.sparse_quality import SparseQualityMetrics
from grail.trainer.analysis.patching.swaps import analysis_mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--skip-svd", action="store_true", help="skip the method='svd' variant")
    args = parser.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)

    model = qwen2(device=dev)
    n_params = sum(p.numel() for p in model.parameters())
    old = ParameterSnapshot(model, device=dev)
    simulate_update(model)
    delta = old.compute_delta(ParameterSnapshot.live(model))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (4, 128), generator=gen).to(dev)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def ctx() -> AnalysisContext:  # one per measurement, as the manager makes them
        return AnalysisContext(model=model, inputs=inputs, step=1)

    cfg = AnalysisConfig.comprehensive(low_rank_track_components=False)
    sparse = SparseQualityMetrics.from_config(AnalysisConfig())
    cases = {
        "sparse quality (defaults: 1e-06 + random)": lambda: sparse.compute(delta, context=ctx()),
        "low-rank, whole computer (ranks 1/8/64)": lambda: LowRankMetrics.from_config(cfg).compute(
            delta, context=ctx()
        ),
        "low-rank, spectrum only": lambda: LowRankMetrics.from_config(
            cfg
        ).compute(delta, context=AnalysisContext(model=model, step=1)),
    }

    def both() -> None:  # one measurement of the comprehensive preset: the reference is shared
        shared = ctx()
        sparse.compute(delta, context=shared)
        LowRankMetrics.from_config(cfg).compute(delta, context=shared)

    cases["sparse + low-rank in one measurement"] = both
    if not args.skip_svd:
        cases["low-rank, whole, method=svd"] = lambda: LowRankMetrics(method="svd").compute(
            delta, context=ctx()
        )

    def forward() -> None:
        with analysis_mode(model):
            model(ids)

    sparse_key = "sparse quality (defaults: 1e-06 + random)"
    rows = []
    for k, fn in {"one forward pass": forward, **cases}.items():
        # each case timed alternately with the sparse computer: ratios survive machine drift
        t, t_sparse, ratio = paired(fn, cases[sparse_key], repeat=args.repeat)
        rows.append({"what": k, "seconds": f"{t:.3f}", "vs sparse quality": f"{ratio:.2f}x"})
        if k == "sparse + low-rank in one measurement":
            extra = t - t_sparse
            share = {"seconds": f"{extra:.3f}", "vs sparse quality": f"{extra / t_sparse:.2f}x"}
            rows.append({"what": "-> low-rank's share of it", **share})
    if dev.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"Qwen2-style model, {n_params / 1e6:.1f}M parameters, fp32, batch 4x128, {name}")
    print(table(rows))


if __name__ == "__main__":
    main()
