"""The showcase experiments: the rounding rules against real bf16 rounding, and the quick mode.

The quick mode of ``research/experiments/run_all.py`` is run in a subprocess; besides its exit
code, the claims it checks are re-derived here from the JSON it wrote, so a check that silently
stopped checking would still fail the build.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
EXPERIMENTS = ROOT / "research" / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rules = _load("exp_rules")


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


def _weights(n: int, seed: int) -> torch.Tensor:
    """fp32 weights log-uniform in magnitude over several binades, random signs."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.empty(n).uniform_(-10, -1, generator=g))
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return mag * sign


def test_rules_doctests():
    result = doctest.testmod(rules)
    assert result.attempted >= 3 and result.failed == 0


def test_bf16_spacing_is_the_distance_to_the_next_bf16_number():
    w = _bf16(_weights(10_000, 0)).abs()
    w = torch.cat([w, torch.tensor([1.0, 0.5, 3.0], dtype=torch.bfloat16)])
    following = (w.view(torch.int16) + 1).view(torch.bfloat16)
    expected = following.double() - w.double()
    assert torch.equal(rules.bf16_spacing(w).double(), expected)
    assert float(rules.bf16_spacing(torch.tensor(0.0))) < 1e-38


def test_interval_rule_predicts_changes_of_rounded_values():
    n = 200_000
    w = _weights(n, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.empty(n).uniform_(-1.5, 1.5, generator=g)
    d = x * rules.bf16_spacing(w)
    changed = (_bf16(w + d) != _bf16(w)).double().mean().item()
    predicted = rules.mean_of(rules.change_probabilities({"w": x}))
    reference = float(torch.clamp(x.double().abs(), max=1.0).mean())
    assert predicted == pytest.approx(reference, rel=1e-12)
    assert abs(changed - predicted) < 0.01


@pytest.mark.parametrize("same_sign", [True, False])
def test_drift_rule_predicts_jaccard_of_consecutive_rounded_changes(same_sign):
    n = 200_000
    w = _weights(n, 3)
    g = torch.Generator().manual_seed(4)
    x1 = torch.empty(n).uniform_(0.0, 0.8, generator=g)
    x2 = torch.empty(n).uniform_(0.0, 0.8, generator=g) * (1 if same_sign else -1)
    u = rules.bf16_spacing(w)
    w1 = w + x1 * u
    w2 = w1 + x2 * u
    c1 = _bf16(w1) != _bf16(w)
    c2 = _bf16(w2) != _bf16(w1)
    measured = float((c1 & c2).sum()) / float((c1 | c2).sum())
    predicted = rules.drift_jaccard({"w": x1}, {"w": x2})
    assert abs(measured - predicted) < 0.01
    # Independent draws with the same probabilities would predict something else entirely.
    independent = rules.jaccard({"w": x1.abs()}, {"w": x2.abs()})
    assert abs(independent - predicted) > 0.05


def test_per_step_rule_predicts_bf16_additions():
    n = 100_000
    w = _bf16(_weights(n, 5))
    g = torch.Generator().manual_seed(6)
    x = torch.empty(n).uniform_(-1.0, 1.0, generator=g)
    d = x * rules.bf16_spacing(w)
    changed = _bf16(w.float() + d) != w
    predicted = d.abs() >= rules.bf16_spacing(w) / 2
    assert float((changed == predicted).double().mean()) > 0.99


def test_jaccard_of_sets_matches_python_sets():
    g = torch.Generator().manual_seed(7)
    a = torch.rand(500, generator=g) < 0.3
    b = torch.rand(500, generator=g) < 0.4
    sa = {i for i in range(500) if a[i]}
    sb = {i for i in range(500) if b[i]}
    expected = len(sa & sb) / len(sa | sb)
    assert rules.jaccard({"w": a.double()}, {"w": b.double()}) == pytest.approx(expected)


@pytest.mark.slow
def test_quick_mode_passes_its_checks(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "run_all.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed" in proc.stdout
    for name in ("precision", "masks", "overlap", "principal", "overlap_runs"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 200_000
    assert (tmp_path / "RESULTS.md").read_text().startswith("# ")

    checks = json.loads((tmp_path / "checks.json").read_text())
    names = {c["name"]: c["passed"] for group in checks.values() for c in group}
    for name in (
        "fp32_dense",
        "view_equals_bf16_ratio",
        "view_matches_rule",
        "pure_matches_rule",
        "bf16_sparse_at_small_lr",
        "fp32_overlap_one",
        "bf16_view_overlap_above_independent",
        "bf16_view_overlap_matches_rule",
        "pure_bf16_overlap_above_independent",
        "pure_bf16_overlap_matches_rule",
        "sft_magnitude_beats_random",
        "rl_magnitude_beats_random",
        "sft_dare_beats_random",
        "rl_dare_beats_random",
        "principal_random_baseline",
        "sft_on_principals",
        "rl_on_principals",
        "both_rotate_more_than_random",
        "runs_fp32_dense",
        "runs_rl_bf16_lift",
        "runs_magnitude_rule_lift",
        "runs_magnitude_rule_rl_sft",
        "runs_rl_top_updates_shared",
        "runs_signed_rule",
    ):
        assert names.get(name) is True, name

    # Re-derive the main claims from the raw results.
    precision = json.loads((tmp_path / "precision.json").read_text())
    lrs = [run["lr"] for run in precision["runs"]]
    assert min(lrs) <= 1e-6 and max(lrs) >= 1e-3
    for run in precision["runs"]:
        assert run["fp32"] and len(run["fp32"]) == len(run["bf16_view"]) == len(run["pure_bf16"])
        for fp32, view in zip(run["fp32"], run["bf16_view"]):
            assert fp32["exact_unchanged_ratio"] < 0.05
            assert view["exact_unchanged_ratio"] == fp32["bf16_unchanged_ratio"]
        view = [r["exact_unchanged_ratio"] for r in run["bf16_view"]]
        rule = run["interval_rule_unchanged"]
        assert abs(sum(view) / len(view) - sum(rule) / len(rule)) <= 0.1
    masks = json.loads((tmp_path / "masks.json").read_text())
    for regime in ("sft", "rl"):
        metrics = masks[regime]["metrics"]
        for keep in ("0.1", "0.5"):
            kl = metrics[f"sparse/kl_at_keep_{keep}"]
            assert kl < metrics[f"sparse/kl_at_keep_{keep}_random"]
    principal = json.loads((tmp_path / "principal.json").read_text())
    for regime in ("sft", "rl"):
        m, control = principal[regime]["metrics"], principal[regime]["control"]
        for k in principal["settings"]["ranks"]:
            share = m[f"principal/energy_in_top{k}"]
            assert share >= 3 * m[f"principal/energy_in_top{k}_random"], (regime, k)
            rnd = control[f"principal/energy_in_top{k}"]
            assert abs(rnd / control[f"principal/energy_in_top{k}_random"] - 1) < 0.5
            if k <= 8:
                turned = 1 - m[f"principal/subspace_overlap_top{k}"]
                assert turned >= 1.5 * (1 - control[f"principal/subspace_overlap_top{k}"])
    # Two RL seeds through bf16 share more changed weights than random sets; exact (fp32)
    # changes are dense and share as many as random ones; a rule that knows only |dW| and |w|
    # predicts a lift above 1 by itself.
    runs = json.loads((tmp_path / "overlap_runs.json").read_text())["pairs"]
    rl = runs["rl_a|rl_b"]
    assert rl["bf16_view"]["jaccard_lift"] > 1.2
    assert rl["rules"]["magnitude"]["jaccard_lift"] > 1.1
    for pair in runs.values():
        assert pair["fp32"]["density_a"] > 0.99 and abs(pair["fp32"]["jaccard_lift"] - 1) < 0.01
        v = pair["bf16_view"]
        a, b = v["density_a"], v["density_b"]
        assert v["jaccard_random"] == pytest.approx(a * b / (a + b - a * b), rel=1e-9)
