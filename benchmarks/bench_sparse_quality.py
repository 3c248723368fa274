"""Sparse-quality computer against its floor: three bare forward passes.

Same ~58M Qwen2-style model as ``bench_param_change.py``, batch 4 x 128, fp32 and bf16, one
threshold (1e-6) with the random baseline: the computer runs three forwards (full, magnitude,
random) plus the masking and the comparisons; the floor is three forwards of the unpatched model
in eval mode under ``no_grad``, timed alternately with the computer (median of the per-pair
ratios), once with the compiled swaps and comparisons (the default on CPU) and once with
``fused=False`` (eager ops). Also the peak RSS above model + snapshot, in units of the model's
bytes and of one logits tensor.

Run: ``python benchmarks/bench_sparse_quality.py [--device cuda] [model size flags]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_batch_args,
    add_model_args,
    model_bytes,
    model_from_args,
    paired,
    peak_memory,
    print_dtype_rows,
    simulate_update,
)

from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics import SparseQualityMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext


def run(dtype: torch.dtype, args: argparse.Namespace) -> dict[str, str]:
    model = model_from_args(args, dtype)
    snap = ParameterSnapshot(model)
    simulate_update(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)

    def floor() -> None:
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids, use_cache=False).logits.float().sum().item()

    computer = SparseQualityMetrics(thresholds=[1e-6])  # compiled swaps and comparisons
    eager = SparseQualityMetrics(thresholds=[1e-6], fused=False)

    def ctx() -> AnalysisContext:  # one per measurement, as the manager makes them
        return AnalysisContext(model=model, inputs={"input_ids": ids}, step=1)

    live = ParameterSnapshot.live(model)
    t_sparse, t_floor, ratio = paired(
        lambda: computer.compute(snap.compute_delta(live), context=ctx()), floor, args.repeat
    )
    _, _, ratio_eager = paired(
        lambda: eager.compute(snap.compute_delta(live), context=ctx()), floor, args.repeat
    )
    with peak_memory(args.device) as mem:
        metrics = computer.compute(snap.compute_delta(live), context=ctx())
    logits_bytes = args.batch * args.seq * args.vocab * 4
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "computer / 3 forwards": f"{ratio:.2f}",
        "eager / 3 forwards": f"{ratio_eager:.2f}",
        "computer s": f"{t_sparse:.3f}",
        "floor s": f"{t_floor:.3f}",
        "kept at 1e-6": f"{metrics['sparse/kept_ratio_at_1e-06']:.3f}",
        "extra memory / model": f"{mem['extra'] / model_bytes(model):.3f}",
        "extra memory / logits": f"{mem['extra'] / logits_bytes:.2f}",
    }


def main() -> None:
    parser = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    print_dtype_rows(run, add_batch_args(parser).parse_args())


if __name__ == "__main__":
    main()
