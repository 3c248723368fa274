"""Every metric key and value of four fixed workloads, for checking that a refactoring changes
no number.

    python benchmarks/golden/golden_metrics.py --out before.json   # on the old tree
    python benchmarks/golden/golden_metrics.py --out after.json    # on the new tree
    python benchmarks/golden/golden_metrics.py --compare before.json after.json

Workloads (public API and the command line only, so the script runs on any layout):

* ``demo``: the README demo's custom loop (``research/trl/analysis_integration_example.py
  --example custom``), its JSONL log;
* ``comprehensive_fp32`` / ``comprehensive_bf16``: ``AnalysisConfig.comprehensive()`` on a tiny
  Qwen2 trained a few AdamW steps, with a probe batch (every family, per layer and component,
  histograms);
* ``diff``: ``grail-analysis diff BASE TUNED`` of two saved checkpoints (statistics, spectra).

Values are compared bit for bit (``float.hex``; NaN equals NaN). One thread, fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _hex(value: float) -> str:
    return "nan" if math.isnan(value) else float(value).hex()


def _tiny_qwen2(dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM(cfg).to(dtype)


def comprehensive(dtype_name: str) -> dict[str, dict[str, str]]:
    import torch

    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = _tiny_qwen2(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = AnalysisConfig.comprehensive(interval=2, histogram_samples=64)
    analyzer = ModelAnalysisManager.create(cfg)
    gen = torch.Generator().manual_seed(1)
    probe = {"input_ids": torch.randint(0, 128, (2, 16), generator=gen)}
    out: dict[str, dict[str, str]] = {}
    for step in range(1, 7):
        batch = torch.randint(0, 128, (4, 16), generator=gen)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        metrics = analyzer.on_optimizer_step(model, inputs=probe, optimizer=opt)
        opt.zero_grad()
        if metrics:
            out[str(step)] = {k: _hex(v) for k, v in sorted(metrics.items())}
            for name, values in sorted(analyzer.last_histograms.items()):
                out[str(step)][f"histogram:{name}"] = ",".join(_hex(float(x)) for x in values)
    return out


def demo(tmp: Path) -> dict[str, dict[str, str]]:
    out_dir = tmp / "demo"
    subprocess.run(
        [sys.executable, str(ROOT / "research/trl/analysis_integration_example.py"),
         "--example", "custom", "--steps", "100", "--interval", "25",
         "--output-dir", str(out_dir)],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    lines = (out_dir / "custom/analysis.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {str(r["step"]): {k: _hex(v) for k, v in sorted(r["metrics"].items())} for r in records}


def diff(tmp: Path) -> dict[str, object]:
    import torch

    base = _tiny_qwen2(torch.float32)
    base.save_pretrained(tmp / "base")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in base.parameters():
            keep = torch.rand(p.shape, generator=gen) < 0.3
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3 * keep)
    base.save_pretrained(tmp / "tuned")
    subprocess.run(
        [sys.executable, "-m", "grail.trainer.analysis", "diff", str(tmp / "base"),
         str(tmp / "tuned"), "--out", str(tmp / "diff"), "--no-report"],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    result = json.loads((tmp / "diff/metrics.json").read_text())

    def walk(x):
        if isinstance(x, float):
            return _hex(x)
        if isinstance(x, dict):
            skip = ("meta", "timing", "arguments", "path")  # run-specific, not results
            return {k: walk(v) for k, v in sorted(x.items()) if k not in skip}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(result)


def collect() -> dict[str, object]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        return {
            "comprehensive_fp32": comprehensive("fp32"),
            "comprehensive_bf16": comprehensive("bf16"),
            "diff": diff(Path(tmp)),
            "demo": demo(Path(tmp)),
        }


def compare(a: dict, b: dict, path: str = "") -> list[str]:
    problems = []
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                problems.append(f"{path}/{key}: only in {'after' if key in b else 'before'}")
            else:
                problems += compare(a[key], b[key], f"{path}/{key}")
    elif a != b:
        problems.append(f"{path}: {a!r} != {b!r}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--compare", nargs=2)
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        problems = compare(before, after)
        for line in problems[:50]:
            print(line)
        n_keys = sum(len(v) for w in before.values() if isinstance(w, dict)
                     for v in w.values() if isinstance(v, dict))
        print(f"{len(problems)} differences ({n_keys} per-step keys compared)")
        return 1 if problems else 0
    Path(args.out).write_text(json.dumps(collect(), indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
