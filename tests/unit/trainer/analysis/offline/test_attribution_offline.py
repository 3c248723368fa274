"""``grail-analysis diff --prompts``: attribution numbers equal the online ones, table and chart."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grail.trainer.analysis.cli import main
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics.attribution import AttributionMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.offline.diff import DiffOptions, build_config

from ..checkpoints import save_pair

PROMPTS = "the cat sat on the mat\na big red dog ran far away\n\nthe small blue cat\n"

pytestmark = pytest.mark.slow


def _online(base, tuned, tuned_dir, opts):
    """AttributionMetrics of the diff's config on in-memory copies of the same two models."""
    from transformers import AutoTokenizer

    from grail.trainer.analysis.offline.quality import tokenize

    lines = [line for line in PROMPTS.splitlines() if line]
    batch = tokenize(AutoTokenizer.from_pretrained(tuned_dir), lines, opts.max_tokens)
    delta = ParameterSnapshot(base).compute_delta(ParameterSnapshot.live(tuned))
    computer = AttributionMetrics.from_config(build_config(opts))
    return computer.compute(delta, context=AnalysisContext(model=tuned, inputs=batch))


def test_diff_attribution_equals_online_and_is_reported(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    base, tuned, bdir, tdir = save_pair(tmp_path, with_tokenizer=True)
    (tmp_path / "p.txt").write_text(PROMPTS)
    out = tmp_path / "o"
    rc = main(["diff", str(bdir), str(tdir), "--out", str(out), "--prompts",
               str(tmp_path / "p.txt"), "--no-low-rank", "--thresholds", "0",
               "--keep-ratios", "0.5", "--attribution-max-groups", "6", "--no-hash"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "metrics.json").read_text())
    got = {k: v for k, v in doc["metrics"].items() if k.startswith("attrib/")}
    # BASE -> TUNED is the pair and the whole fine-tune at once: no repeat under drift/
    assert not [k for k in doc["metrics"] if k.startswith(("drift/attrib/", "drift/lowrank/",
                                                           "drift/principal/"))]
    assert "drift/kl_base_now" in doc["metrics"]
    opts = DiffOptions(str(bdir), str(tdir), prompts="p", attribution_max_groups=6)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    want = _online(base, tuned, tdir, opts)
    for n, p in tuned.named_parameters():  # the online computation left its model as it was
        assert torch.equal(p, before[n]), n
    assert got.keys() == want.keys()
    for key, value in want.items():
        if math.isnan(value):
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    # components and blocks (--per-layer is the default); six measured, the rest n/a
    table = doc["attribution"]
    assert table["kl_total"] == got["attrib/kl_total"] > 0
    assert table["tokens"] == got["attrib/tokens"]
    kinds = [row["kind"] for row in table["groups"]]
    assert kinds == ["component"] * 12 + ["layer"] * 2
    assert sum(row["kl_only"] is not None for row in table["groups"]) == 6
    for row in table["groups"]:
        key = (f"attrib/component/{row['group']}/" if row["kind"] == "component"
               else f"attrib/{row['group']}/")
        for stat in ("kl_only", "kl_without", "update_share", "param_share"):
            assert row[stat] == got[key + stat], (key, stat)
    report = (out / "report.html").read_text()
    assert "<h2>Output attribution</h2>" in report
    assert "alt='attribution per group'" in report


def test_no_attribution_without_prompts_or_when_switched_off(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    _base, _tuned, bdir, tdir = save_pair(tmp_path, with_tokenizer=True)
    (tmp_path / "p.txt").write_text(PROMPTS)
    for extra in ([], ["--prompts", str(tmp_path / "p.txt"), "--no-attribution"]):
        out = tmp_path / f"o{len(extra)}"
        rc = main(["diff", str(bdir), str(tdir), "--out", str(out), "--no-low-rank",
                   "--thresholds", "0", "--keep-ratios", "0.5", "--no-hash", *extra])
        assert rc == 0, capsys.readouterr().err
        doc = json.loads((out / "metrics.json").read_text())
        assert "attribution" not in doc
        assert not any(k.startswith("attrib/") for k in doc["metrics"])
        assert "Output attribution" not in (out / "report.html").read_text()
    config = build_config(DiffOptions("a", "b", prompts="p", per_layer=False))
    assert config.attribution_enabled and config.attribution_groups == ["component"]
