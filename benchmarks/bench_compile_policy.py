"""The compile policy over a run's first measurements: eager, compiled from the start (the old
default ``fused_kernels=True``) and the new default (``"auto"``), cold and warm compile cache.

Each run is a fresh process (the compile state is per process) measuring the default
``AnalysisConfig`` (parameter change + sparse quality) on a random-init Qwen2-style model
(hidden 512, 8 layers, vocab 32000: ~58M parameters; ``--quick``: hidden 256, 4 layers,
~20M), batch 4x128, one simulated update between measurements: the wall time of each
``on_optimizer_step`` that measures, indices 1..N. Cold: ``TORCHINDUCTOR_CACHE_DIR`` is a fresh
directory; warm: the directory a cold compiled run of the same dtype just filled. A fourth run,
``auto, switched``, is ``"auto"`` with compiling estimated free, so that it switches at once: its
later measurements are the new default's steady state after a switch.

Configurations alternate within a round and rounds repeat (``--rounds``); tables show medians
over rounds and summary ratios their range. Every worker also reports, per kernel family, its
work per measurement on each path (the saving fractions of the policy's priors), its compile
seconds (the cost priors) and, for ``"auto"``, the measurement at which the policy would switch
with the eager costs it measured.

The children run with ``OMP_WAIT_POLICY=PASSIVE``: on a machine shared with other jobs, OpenMP
threads spinning at barriers make eager 2-thread timings 10-50x slower and erratic.

Run: ``python benchmarks/bench_compile_policy.py [--quick] [--rounds 3] [--dtypes float32]``;
results go to ``benchmarks/results/compile_policy_<size>_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = {"58M": (512, 8), "20M": (256, 4)}
MODES = {"eager": False, "compiled": True, "auto": "auto", "auto, switched": "auto"}


# --- worker (one run in a fresh process) ------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(HERE))
    from _common import qwen2, simulate_update

    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager, kernels
    from grail.trainer.analysis.kernels import ledger

    dtype = getattr(torch, spec["dtype"])
    model = qwen2(spec["hidden"], spec["layers"], 32000, dtype=dtype)
    inputs = {"input_ids": torch.randint(0, 32000, (4, 128), generator=torch.Generator())}
    optimizer = None
    options: dict[str, Any] = {}
    if spec["config"] == "gradients":  # gradient and Adam statistics only, on a real step's state
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        options = {"param_change_enabled": False, "sparse_quality_enabled": False,
                   "gradient_enabled": True, "adam_sign_enabled": True}  # fmt: skip
    free = {"startup_seconds": 0.0, "kernel_seconds": 0.0}
    times, cpu, families = [], [], []
    with kernels.settings.override(**(free if spec["mode"] == "auto, switched" else {})):
        config = AnalysisConfig(interval=1, fused_kernels=MODES[spec["mode"]], **options)
        manager = ModelAnalysisManager.create(config)
        manager.on_optimizer_step(model, inputs=inputs, optimizer=optimizer)  # first snapshot
        for i in range(spec["measurements"]):
            simulate_update(model, seed=i + 1)
            before = kernels.report()
            start, start_cpu = time.perf_counter(), _cpu_seconds()
            metrics = manager.on_optimizer_step(model, inputs=inputs, optimizer=optimizer)
            times.append(time.perf_counter() - start)
            cpu.append(_cpu_seconds() - start_cpu)
            assert metrics, "a measurement returned nothing"
            families.append(_family_deltas(before, kernels.report()))
        report = kernels.report()
        compiles = list(ledger.current().compiles)
    return {
        **spec,
        "times": times,
        "cpu": cpu,
        "families": families,
        "compiles": compiles,
        "report": report,
        "threads": torch.get_num_threads(),
        "disabled": kernels.disabled_reason(),
    }


def policy_overhead(calls: int = 20000) -> float:
    """Seconds of one decision of "auto" (the rule evaluated) plus one timed block: the
    bookkeeping a measurement adds over the compiled path (a few of each per measurement)."""
    from grail.trainer.analysis import kernels

    with kernels.settings.override():
        start = time.perf_counter()
        for step in range(calls):
            with kernels.timed(kernels.use("change", 1 << 40, "auto", step=step)):
                pass
        return (time.perf_counter() - start) / calls


def _cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of its finished children (the C++
    compiler): the cost measure other jobs on a shared machine disturb least."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _family_deltas(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per family, this measurement's eager work, compiled work and compile seconds."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        eager = a["eager_seconds"] + a["open_seconds"]
        eager -= b.get("eager_seconds", 0.0) + b.get("open_seconds", 0.0)
        out[name] = {
            "eager": eager,
            "compiled": a["compiled_seconds"] - b.get("compiled_seconds", 0.0),
            "compile": a["compile_seconds"] - b.get("compile_seconds", 0.0),
        }
    return out


def predicted_switch(report: dict[str, dict[str, Any]], limit: int = 2000) -> int | None:
    """The measurement at which "auto" switches if every family keeps its cheapest measured
    eager cost (the rule itself, fed in a fresh ledger)."""
    from grail.trainer.analysis import kernels
    from grail.trainer.analysis.kernels import ledger

    with kernels.settings.override():
        for m in range(1, limit + 1):
            for name, info in report.items():
                decision = kernels.use(name, 1 << 40, "auto", step=m)
                if decision:
                    return m
                seconds = info["eager_min"] if info["eager_measurements"] else info["open_seconds"]
                ledger.current().record(decision, seconds, 0.0)
    return None


# --- orchestration ----------------------------------------------------------------------------


def run_worker(spec: dict[str, Any], cache: str) -> dict[str, Any]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_round(base: dict[str, Any], dtype: str, tmp: Path, rnd: int) -> list[dict[str, Any]]:
    """Every configuration of one dtype once; the order rotates with the round."""
    warm = tmp / f"warm-{dtype}-{rnd}"
    plan = [
        ("compiled", "cold", warm),  # fills the warm cache for the runs after it
        ("compiled", "warm", warm),
        ("auto", "cold", None),
        ("auto", "warm", warm),
        ("eager", "-", None),
        ("auto, switched", "warm", warm),
    ]
    first, rest = plan[:1], plan[1:]
    rest = rest[rnd % len(rest) :] + rest[: rnd % len(rest)]
    runs = []
    for mode, cache, directory in first + rest:
        path = directory or tmp / f"cold-{dtype}-{rnd}-{mode.replace(', ', '-')}"
        spec = {**base, "dtype": dtype, "mode": mode, "cache": cache}
        start = time.perf_counter()
        runs.append(run_worker(spec, str(path)))
        total = sum(runs[-1]["times"])
        print(
            f"  round {rnd + 1} {dtype:8s} {mode:15s} {cache:4s} {total:7.1f} s "
            f"({time.perf_counter() - start:.0f} s wall)",
            flush=True,
        )
    return runs


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _range(values: list[float]) -> str:
    return f"{_med(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def summarize(runs: list[dict[str, Any]], n: int) -> str:
    lines = []
    for dtype in sorted({r["dtype"] for r in runs}):
        by: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in runs:
            if r["dtype"] == dtype:
                by.setdefault((r["mode"], r["cache"]), []).append(r)
        for key, what in (("times", "wall-clock seconds"), ("cpu", "CPU seconds")):
            lines += _table(dtype, by, n, key, what)
            lines += _ratios(dtype, by, n, key, what)
        lines += _costs(dtype, by)
    return "\n".join(lines)


def _table(dtype: str, by: dict, n: int, key: str, what: str) -> list[str]:
    cols = [("eager", "-"), ("compiled", "cold"), ("auto", "cold"), ("compiled", "warm"),
            ("auto", "warm"), ("auto, switched", "warm")]  # fmt: skip
    cols = [c for c in cols if c in by]
    lines = [f"\n### {dtype}: {what} per measurement (median over rounds)\n"]
    lines.append("| # | " + " | ".join(f"{m} ({c})" for m, c in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for i in range(n):
        cells = [f"{_med([r[key][i] for r in by[c]]):.2f}" for c in cols]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    cells = [f"{_med([sum(r[key]) for r in by[c]]):.2f}" for c in cols]
    lines.append("| total | " + " | ".join(cells) + " |")
    return lines


def _steady(values: list[float]) -> float:
    return _med(values[3:])


def _ratios(dtype: str, by: dict, n: int, key: str, what: str) -> list[str]:
    """The ratios the goal names, each from the runs of one round (side by side)."""
    sw, eager = ("auto, switched", "warm"), ("eager", "-")
    lines = [f"\n{dtype}, {what}: ratios, median [range] over rounds\n"]

    def paired(a: tuple[str, str], b: tuple[str, str], fn: Any, label: str, goal: str = ""):
        values = [fn(x[key], y[key]) for x, y in zip(by.get(a, []), by.get(b, []), strict=False)]
        if values:
            lines.append(f"- {label}: {_range(values)}{goal}")

    for cache in ("cold", "warm"):
        for mode, goal in (("auto", " (goal <= 1)"), ("compiled", "")):
            paired((mode, cache), eager, lambda a, e: sum(a) / sum(e),
                   f"total of {n}, {mode} / eager, {cache} cache", goal)  # fmt: skip
    for cache in ("cold", "warm"):
        label = f"first auto ({cache}) / steady auto after its switch"
        paired(("auto", cache), sw, lambda a, s: a[0] / _steady(s), label, " (goal <= 1.5)")
    paired(sw, ("compiled", "warm"), lambda s, c: _steady(s) / _steady(c),
           "steady auto after its switch / steady compiled", " (goal <= 1.05)")  # fmt: skip
    paired(("compiled", "cold"), ("compiled", "warm"), lambda c, w: c[0] / _steady(w),
           "old default: first (cold) / steady")  # fmt: skip
    return lines


def _costs(dtype: str, by: dict) -> list[str]:
    """Compile costs, the switch "auto" predicts from its measured eager costs, and the saving
    per kernel family (wall-clock)."""
    lines = [f"\n{dtype}: compile costs and the policy's inputs (wall-clock)\n"]
    for cache in ("cold", "warm"):
        rs = by.get(("compiled", cache), [])
        if rs:
            cost = [r["times"][0] - _steady(r["times"]) for r in rs]
            first = [sum(r["compiles"][:1]) for r in rs]
            later = [_med(r["compiles"][1:]) for r in rs]
            lines.append(
                f"- {cache} cache: first measurement - steady {_range(cost)} s; first compile "
                f"{_range(first)} s; each later kernel {_range(later)} s"
            )
    autos = by.get(("auto", "cold"), []) + by.get(("auto", "warm"), [])
    switches = [predicted_switch(r["report"]) for r in autos]
    lines.append(f"- auto switches at measurement (its measured eager costs kept): {switches}")
    lines.append("- work per measurement by family, eager vs compiled (steady): saving")
    for fam in sorted({f for r in autos for m in r["families"] for f in m}):
        e = _med([m[fam]["eager"] for r in autos for m in r["families"][1:]
                  if m.get(fam, {}).get("eager", 0) > 0])  # fmt: skip
        c = _med([m[fam]["compiled"] for r in by.get(("compiled", "warm"), [])
                  for m in r["families"][3:] if fam in m])  # fmt: skip
        lines.append(f"  - {fam}: {e:.3f} s vs {c:.3f} s: {1 - c / e:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~20M parameters instead of ~58M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measurements", type=int, default=10)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--config", default="default", choices=["default", "gradients"],
        help="gradients: gradient and Adam statistics only (their saving per family)",
    )  # fmt: skip
    parser.add_argument("--summarize", help="summarize the runs of a results .json again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.summarize:
        runs = json.loads(Path(args.summarize).read_text())
        print(summarize(runs, len(runs[0]["times"])))
        return
    size = "20M" if args.quick else "58M"
    hidden, layers = SIZES[size]
    base = {"hidden": hidden, "layers": layers, "measurements": args.measurements}
    base["config"] = args.config
    name = f"compile_policy_{size}_{args.config}_{datetime.date.today()}"
    out = HERE / "results" / name
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="compile-policy-") as tmp:
        for rnd in range(args.rounds):
            for dtype in args.dtypes.split(","):
                runs += one_round(base, dtype, Path(tmp), rnd)
            head = (
                f"## Compile policy, ~{size} Qwen2 (hidden {hidden}, {layers} layers), "
                f"{args.config} config, batch 4x128, {runs[0]['threads']} threads, "
                f"{rnd + 1} rounds, {datetime.date.today()}\n\n"
                f"Policy bookkeeping: {policy_overhead() * 1e6:.1f} us per decision and timed "
                f"block; load average at the end {os.getloadavg()[0]:.1f}"
            )
            text = head + "\n" + summarize(runs, args.measurements)
            out.with_suffix(".md").write_text(text + "\n")  # after every round: partial results
            out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    print(text)
    print(f"\nwritten: {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
