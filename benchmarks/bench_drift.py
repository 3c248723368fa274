"""drift/* against its goals: statistics vs parameter change, outputs vs their bare forwards,
extra peak memory.

Same ~58M Qwen2-style model as ``bench_param_change.py`` (hidden 512, 8 layers, vocab 32000),
fp32 and bf16, batch 4 x 128. Base = the initial weights, interval snapshot after one simulated
update, live weights after a second one. Side by side in one process, alternately (median of the
per-pair ratios):

* statistics: ``DriftMetrics`` without inputs (the six statistics, 4 thresholds, per layer and
  component, and ``cos_interval``) against ``ParameterChangeMetrics`` with the same options on
  the interval delta. Steady state: ``param_change`` has shared the interval's squared norm and
  the previous measurement's ``||W_prev - W_base||^2`` is remembered (as in a run); also the
  first measurement, which passes over ``W_prev - W_base`` once more;
* outputs: the forward-pass part (base forward, both KLs, exact top-k masks at keep 0.01 and 0.1
  with their random baselines: 1 + 4 forwards) with the live model's logits already in the
  context (shared with ``sparse/*``), against 5 bare forwards of the model in eval mode under
  ``no_grad``;
* memory: peak RSS of a whole drift measurement (statistics and outputs) above model + both
  snapshots + the shared reference, in model bytes and in logits tensors. RSS after
  ``malloc_trim`` at entry, sampled, by default; with ``--live-memory`` the script restarts
  itself with glibc returning every freed block above 256 KiB at once and reads the kernel's
  own peak, so that the peak is the peak of live memory (the analogue of CUDA's
  ``max_memory_allocated``) and not also blocks freed inside the measurement that the allocator
  kept for reuse; the timed calls still run (the measured call meets the same state) but only
  the memory is reported. Also the same peak of the 5 bare forwards alone.

``--fused true`` measures the compiled swaps and comparisons (steady, after the first call
compiled them); the default ``auto`` is the eager path of a run's first measurements.

Run: ``python benchmarks/bench_drift.py [--repeat 5] [--fused auto|true|false] [--live-memory]
[model size flags]``
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
    reexec_with_live_heap,
    simulate_update,
)

from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics import ParameterChangeMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.metrics.drift import DriftMetrics
from grail.trainer.analysis.metrics.drift_outputs import drift_outputs
from grail.trainer.analysis.metrics.sparse_quality import shared_reference
from grail.trainer.analysis.patching.forward import prepare_inputs, run_forward
from grail.trainer.analysis.patching.swaps import analysis_mode

THRESHOLDS = [0.0, 1e-8, 1e-6, 1e-4]


def run(dtype: torch.dtype, args: argparse.Namespace) -> dict[str, str]:
    model = model_from_args(args, dtype)
    base = ParameterSnapshot(model)
    simulate_update(model, seed=1)
    prev = ParameterSnapshot(model)
    simulate_update(model, seed=2)
    live = ParameterSnapshot.live(model)
    delta = prev.compute_delta(live)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    opts = {"per_layer": True, "track_components": True}
    param_change = ParameterChangeMetrics(THRESHOLDS, **opts)
    fused = {"auto": "auto", "true": True, "false": False}[args.fused]
    drift = DriftMetrics(THRESHOLDS, keep_ratios=[0.01, 0.1], fused=fused, **opts)
    step = [10]

    def context(inputs: bool = False) -> AnalysisContext:
        """A fresh measurement's context, ``param_change``'s norm shared, the previous step's
        drift norm remembered (``snapshot_step`` is the step the drift computer saw last)."""
        step[0] += 1
        ctx = AnalysisContext(model=model, inputs={"input_ids": ids} if inputs else None,
                              step=step[0], base=base, snapshot_step=step[0] - 1)
        param_change.compute(delta, context=ctx)
        return ctx

    def stats(ctx: AnalysisContext) -> None:
        drift.compute(delta, old_snapshot=prev, current_snapshot=live, context=ctx)

    def first(ctx: AnalysisContext) -> None:
        drift.reset()  # nothing remembered: ||W_prev - W_base||^2 is one more pass
        stats(ctx)

    stats(context())  # compiles the kernels (once per process and dtype)
    # every call runs with --live-memory too (reporting only the memory), so that the measured
    # call meets the same state: the compile policy's, the computer's
    # contexts are made (and param_change run in them) before the timing, in step order
    contexts = [context() for _ in range(args.repeat)]
    t_stats, t_pc, r_stats = paired(
        lambda: stats(contexts.pop(0)), lambda: param_change.compute(delta),
        repeat=args.repeat, warmup=0,
    )
    contexts = [context() for _ in range(args.repeat)]
    _, _, r_first = paired(
        lambda: first(contexts.pop(0)), lambda: param_change.compute(delta),
        repeat=args.repeat, warmup=0,
    )

    prepared = prepare_inputs(model, {"input_ids": ids}, drift.max_tokens)
    assert not isinstance(prepared, str)
    base_delta = base.compute_delta(live)

    def forward() -> torch.Tensor:
        return run_forward(model, prepared)

    def with_reference() -> AnalysisContext:
        ctx = context(inputs=True)
        with analysis_mode(model):
            shared_reference(ctx, delta, drift.max_tokens, None, forward, fused=True)
        return ctx

    def outputs(ctx: AnalysisContext) -> None:
        drift_outputs(drift, model, ctx, prepared, delta, base_delta, {})

    def floor() -> None:
        with analysis_mode(model):
            for _ in range(5):
                forward().sum().item()

    outputs(with_reference())  # compiles the swap and comparison kernels
    contexts = [with_reference() for _ in range(args.repeat)]
    t_out, t_floor, r_out = paired(
        lambda: outputs(contexts.pop(0)), floor, repeat=args.repeat, warmup=0
    )
    ctx = with_reference()
    with peak_memory(args.device, trim=True, exact=args.live_memory) as mem:
        drift.compute(delta, old_snapshot=prev, current_snapshot=live, context=ctx)
    with peak_memory(args.device, trim=True, exact=args.live_memory) as bare:
        floor()
    logits_bytes = args.batch * args.seq * args.vocab * 4
    times = {
        "statistics / param_change": f"{r_stats:.2f}",
        "first measurement": f"{r_first:.2f}",
        "stats ms": f"{t_stats * 1e3:.0f}",
        "param_change ms": f"{t_pc * 1e3:.0f}",
        "outputs / 5 forwards": f"{r_out:.2f}",
        "outputs s": f"{t_out:.2f}",
        "floor s": f"{t_floor:.2f}",
    }
    kind = "live " if args.live_memory else ""
    row = {"dtype": str(dtype).removeprefix("torch.")} | ({} if args.live_memory else times)
    row[f"extra {kind}peak / model"] = f"{mem['extra'] / model_bytes(model):.2f}"
    row[f"extra {kind}peak / logits"] = f"{mem['extra'] / logits_bytes:.2f}"
    row[f"bare forward {kind}peak / model"] = f"{bare['extra'] / model_bytes(model):.2f}"
    return row


def main() -> None:
    parser = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--fused", choices=["auto", "true", "false"], default="auto",
        help="the drift computer's kernel mode (auto: the default; eager in a run's first "
        "measurements)",
    )
    parser.add_argument(
        "--live-memory", action="store_true",
        help="report only the memory, as the peak of live memory (restarts with glibc "
        "returning freed blocks at once, reads the kernel's peak RSS; the timed calls still run, "
        "unreported)",
    )
    args = add_batch_args(parser).parse_args()
    if args.live_memory:
        reexec_with_live_heap()
    print_dtype_rows(run, args)


if __name__ == "__main__":
    main()
