"""Snapshot capture and parameter-change metrics against their bandwidth floors.

On a random-init ~58M-parameter Qwen2-style model (hidden 512, 8 layers, vocab 32000), in fp32
and bf16, side by side in one process:

* capture: refilling the snapshot in place vs a plain ``clone()`` of every parameter;
* metrics: ``ParameterChangeMetrics`` (4 thresholds, per layer, per component) vs one pass over
  the live parameters and the snapshot (``torch.sub`` into a preallocated buffer + one sum),
  on the compiled kernels (the CPU default) and on the eager path, each timed alternately with
  the floor (median of the per-pair ratios);
* peak RSS of a measurement above model + snapshot, as a fraction of the model's bytes.

Run: ``python benchmarks/bench_param_change.py [--device cuda] [--hidden 1536 --layers 28
--vocab 151936 --intermediate 8960 --heads 12 --kv-heads 2]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_model_args,
    best_of,
    model_bytes,
    model_from_args,
    paired,
    peak_memory,
    print_dtype_rows,
    simulate_update,
)

from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics import ParameterChangeMetrics


def run(dtype: torch.dtype, args: argparse.Namespace) -> dict[str, str]:
    model = model_from_args(args, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    params = [p.detach() for p in model.parameters()]
    snap = ParameterSnapshot(model)
    t_clone = best_of(lambda: [p.clone() for p in params])
    t_capture = best_of(lambda: snap.capture_(model).synchronize())
    simulate_update(model)
    live = ParameterSnapshot.live(model)
    olds = [snap.data[n] for n, _ in model.named_parameters()]
    buf = torch.empty(max(p.numel() for p in params), dtype=dtype, device=args.device)

    def floor() -> None:
        total = torch.zeros((), device=args.device)
        for p, o in zip(params, olds):
            if o.device != p.device:
                o = o.to(p.device, non_blocking=True)
            out = buf[: p.numel()].view_as(p)
            torch.sub(p, o, out=out)
            total += out.sum()
        float(total)

    def computer(fused: bool) -> ParameterChangeMetrics:
        return ParameterChangeMetrics(
            [0.0, 1e-8, 1e-6, 1e-4], per_layer=True, track_components=True, fused=fused
        )

    compiled, eager = computer(True), computer(False)
    compiled.compute(snap.compute_delta(live))  # compiles on first use (once per process)
    t_compiled, t_floor, r_compiled = paired(
        lambda: compiled.compute(snap.compute_delta(live)), floor, repeat=args.repeat
    )
    t_eager, _, r_eager = paired(
        lambda: eager.compute(snap.compute_delta(live)), floor, repeat=args.repeat
    )
    with peak_memory(args.device) as mem:
        compiled.compute(snap.compute_delta(live))
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "params": f"{n_params / 1e6:.1f}M",
        "capture / clone": f"{t_capture / t_clone:.2f}",
        "metrics / one-pass floor, compiled": f"{r_compiled:.2f}",
        "eager": f"{r_eager:.2f}",
        "compiled ms": f"{t_compiled * 1e3:.0f}",
        "eager ms": f"{t_eager * 1e3:.0f}",
        "floor ms": f"{t_floor * 1e3:.0f}",
        "extra peak memory / model bytes": f"{mem['extra'] / model_bytes(model):.3f}",
    }


def main() -> None:
    parser = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--repeat", type=int, default=5)
    print_dtype_rows(run, parser.parse_args())


if __name__ == "__main__":
    main()
