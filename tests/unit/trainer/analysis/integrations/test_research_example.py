"""The research example script runs every example end to end in smoke mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grail.trainer.analysis.integrations import read_jsonl

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[5]
SCRIPT = ROOT / "research" / "trl" / "analysis_integration_example.py"

pytestmark = pytest.mark.slow


def test_all_examples_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--example", "all", "--smoke", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # smoke: custom and trainer 4 steps every 2 (one measurement), grpo 3 steps every 1 (two)
    done = dict(re.findall(r"== (\w+): (\d+) measurements", out))
    assert done == {"custom": "1", "trainer": "1", "grpo": "2"}, out[-3000:]
    header = re.search(
        r"step\s+loss\s+\|dW\|\s+changed\s+KL top10%\s+KL rand10%\s+top1 top10%\s+KL to base",
        out)
    assert header is not None, out[-3000:]
    rows = re.findall(r"^\s+(\d+)\s+(-?\d+\.\d+)((?:\s+\S+){6})\s*$", out, flags=re.M)
    assert [int(r[0]) for r in rows] == [4, 4, 2, 3], out[-3000:]
    assert all("-" not in r[2].split() for r in rows)  # every column has a value
    records = read_jsonl(tmp_path / "custom" / "analysis.jsonl")
    assert [r["step"] for r in records] == [4]
    assert "sparse/kl_at_keep_0.1_random" in records[0]["metrics"]
    assert records[0]["metrics"]["drift/kl_base_now"] > 0
