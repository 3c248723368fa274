"""Attribution computer (``attrib/*``) against its floor: the bare forwards it needs.

Same ~58M Qwen2-style model as the other benchmarks, batch 4 x 128, every weight updated, groups
per component (12 on this model, all measured with the default ``max_groups=16``). The computer
runs ``2 G + 2`` forwards (the reference, ``kl_total``, and per group "only g" and "without g")
plus the update sums, the whole-tensor exchanges and the comparisons; the floor is as many
forwards of the unpatched model in eval mode under ``no_grad``, timed alternately with the
computer (median of the per-pair ratios). Two exchange paths: rebinding the parameters to the
snapshot's storage (the default for a CPU model with its CPU snapshot) and exchanging values
through a chunk buffer (what FSDP2 shards and a CPU snapshot of a GPU model take). Also the peak
RSS above model + snapshot, in units of the model's bytes and of one logits tensor.

Run: ``python benchmarks/bench_attribution.py [--device cuda] [--dtypes float32,bfloat16]``
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
    simulate_update,
    table,
)

from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics.attribution import AttributionMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext


def run(dtype: torch.dtype, rebind: bool, args: argparse.Namespace) -> dict[str, str]:
    model = model_from_args(args, dtype)
    snap = ParameterSnapshot(model)
    simulate_update(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    live = ParameterSnapshot.live(model)
    computer = AttributionMetrics(groups=args.groups.split(","), rebind=rebind)

    def ctx() -> AnalysisContext:  # one per measurement, as the manager makes them
        return AnalysisContext(model=model, inputs={"input_ids": ids}, step=1)

    calls = {"n": 0}
    handle = model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    metrics = computer.compute(snap.compute_delta(live), context=ctx())  # compiles, counts
    handle.remove()
    forwards = calls["n"]

    def floor() -> None:
        with torch.no_grad():
            for _ in range(forwards):
                model(input_ids=ids, use_cache=False).logits.float().sum().item()

    t_attr, t_floor, ratio = paired(
        lambda: computer.compute(snap.compute_delta(live), context=ctx()), floor, args.repeat
    )
    with peak_memory(args.device) as mem:
        computer.compute(snap.compute_delta(live), context=ctx())
    logits_bytes = args.batch * args.seq * args.vocab * 4
    groups = sum(k.endswith("/kl_only") for k in metrics)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "exchange": "rebind" if rebind else "values",
        "groups": str(groups),
        "forwards": str(forwards),
        "computer / forwards": f"{ratio:.3f}",
        "computer s": f"{t_attr:.2f}",
        "floor s": f"{t_floor:.2f}",
        "kl_total": f"{metrics['attrib/kl_total']:.3g}",
        "extra memory / model": f"{mem['extra'] / model_bytes(model):.3f}",
        "extra memory / logits": f"{mem['extra'] / logits_bytes:.2f}",
    }


def main() -> None:
    parser = add_model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.set_defaults(dtypes="float32")
    add_batch_args(parser, repeat=3)
    parser.add_argument("--groups", default="component", help="component,layer or both")
    parser.add_argument("--exchange", default="rebind,values", help="rebind, values or both")
    args = parser.parse_args()
    print(f"device: {args.device}  threads: {torch.get_num_threads()}", flush=True)
    rows = []
    for d in args.dtypes.split(","):
        for path in args.exchange.split(","):
            rows.append(run(getattr(torch, d), path == "rebind", args))
            print(rows[-1], flush=True)  # a long run on a shared machine: keep what is done
    print(table(rows))


if __name__ == "__main__":
    main()
