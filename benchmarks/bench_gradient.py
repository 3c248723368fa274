"""Cost of the gradient and Adam-state metrics against the bandwidth floor.

The floor is one read of every gradient, ``exp_avg`` and ``exp_avg_sq`` (a ``sum`` over each
tensor): no implementation of these metrics can read less. Both computers are timed on the same
~56M-parameter Qwen2-style model (fp32, AdamW state after two steps), side by side in one
process, each timed alternately with the floor (median of the per-pair ratios), on the eager
streaming path and on the compiled single-pass kernels (the default on CPU); the ratio is what
the README reports. The first fused call, which compiles, and one AdamW step are timed as
context.

Run: ``python benchmarks/bench_gradient.py [--repeat 5] [--threads N]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import best_of, paired, peak_rss, qwen2, table

from grail.trainer.analysis.metrics.adam_sign import AdamSignDescentMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.metrics.gradient import GradientSparsityMetrics
from grail.trainer.analysis.metrics.optimizer_pass import OptimizerPass


def setup(device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = qwen2(device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(2):
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
        opt.step()
    return model, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, opt = setup(args.device)
    n = sum(p.numel() for p in model.parameters())
    tensors = [p.grad for p in model.parameters()]
    for p in model.parameters():
        tensors += [opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]]

    def floor() -> None:
        for t in tensors:
            t.sum()

    def computers(fused: bool, full: bool = False, link: bool = True) -> tuple:
        """The two computers as the manager builds them (sharing one pass when fused)."""
        extra = {"track_components": True, "histogram_samples": 10_000} if full else {}
        shared = None
        if fused and link:  # what OptimizerPass.from_config gives both when both are on
            shared = OptimizerPass.build([0.0, 1e-8, 1e-6], tolerance=0.1, trainable_only=False)
        gradient = GradientSparsityMetrics(
            per_layer=full, fused=fused, optimizer_pass=shared, **extra
        )
        adam = AdamSignDescentMetrics(fused=fused, optimizer_pass=shared, **extra)
        return gradient, adam

    def run(computers: tuple, which: str = "both") -> None:
        ctx = AnalysisContext(model=model, optimizer=opt, step=1)  # one per measurement
        with torch.no_grad():
            if which in ("both", "gradient"):
                computers[0].compute(context=ctx)
            if which in ("both", "adam"):
                computers[1].compute(context=ctx)

    torch.set_grad_enabled(False)
    # The first fused call compiles (once per process and input signature): timed apart.
    start = time.perf_counter()
    run(computers(True))
    t_compile = time.perf_counter() - start
    t_floor = best_of(floor, repeat=args.repeat)
    rows = [{"what": "floor: read grads + exp_avg + exp_avg_sq", "ms": f"{t_floor * 1e3:.0f}",
             "x floor": "1.00", "extra RSS MiB": "-"}]
    cases = [
        ("gradient/* (defaults)", False, "gradient"),
        ("adam_sign/* (defaults)", False, "adam"),
        ("both (defaults)", False, "both"),
        ("both, per layer + components + histograms", True, "both"),
    ]
    for label, full, which in cases:
        for fused in (False, True):
            comp = computers(fused, full, link=which == "both")
            t, _, ratio = paired(lambda c=comp, w=which: run(c, w), floor, repeat=args.repeat)
            with peak_rss() as mem:
                run(comp, which)
            rows.append({"what": f"{label}, {'fused' if fused else 'eager'}",
                         "ms": f"{t * 1e3:.0f}", "x floor": f"{ratio:.2f}",
                         "extra RSS MiB": f"{mem['extra'] / 2**20:.1f}"})
    rows.append({"what": "fused: first call, compiling included (once per process)",
                 "ms": f"{t_compile * 1e3:.0f}", "x floor": "-", "extra RSS MiB": "-"})
    # context, timed last because it changes the state: the optimizer step these metrics follow
    t_step = best_of(opt.step, repeat=args.repeat)
    rows.append({"what": "context: one AdamW step (foreach)", "ms": f"{t_step * 1e3:.0f}",
                 "x floor": f"{t_step / t_floor:.2f}", "extra RSS MiB": "-"})
    print(f"model: {n / 1e6:.1f}M parameters, fp32, AdamW; device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(table(rows))


if __name__ == "__main__":
    main()
