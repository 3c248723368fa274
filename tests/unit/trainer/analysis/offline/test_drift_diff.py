"""Online drift/* at the step a checkpoint is saved equals ``grail-analysis diff`` of that
checkpoint against the base, for every statistic the two share."""

from __future__ import annotations

import copy

import pytest
import torch

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.config import format_threshold
from grail.trainer.analysis.offline.diff import DiffOptions, run_diff

from ..checkpoints import save_pair

PROMPTS = "the cat sat on the mat\na big red dog ran far away\nthe small blue cat\ngreen tree\n"
THRESHOLDS = [0.0, 1e-6, 1e-4]


@pytest.mark.slow
def test_online_drift_equals_the_offline_diff_of_the_same_pair(tmp_path):
    pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    from grail.trainer.analysis.offline.quality import tokenize

    base, tuned, bdir, tdir = save_pair(tmp_path, with_tokenizer=True)
    (tmp_path / "p.txt").write_text(PROMPTS)
    doc = run_diff(DiffOptions(str(bdir), str(tdir), prompts=str(tmp_path / "p.txt"),
                               thresholds=THRESHOLDS, keep_ratios=[0.1], low_rank=False,
                               hash_files=False, progress=False))
    offline = doc["metrics"]
    batch = tokenize(AutoTokenizer.from_pretrained(tdir), PROMPTS.splitlines(), 4096)
    # online: a run from BASE whose weights reach TUNED at the measurement step 4
    model = copy.deepcopy(base)
    manager = ModelAnalysisManager.create(AnalysisConfig(
        interval=2, drift_enabled=True, drift_keep_ratios=[], param_change_thresholds=THRESHOLDS,
        param_change_per_layer=True, param_change_track_components=True,
        sparse_quality_enabled=False))
    manager.set_base(base, model=model)
    target = dict(tuned.named_parameters())
    for step in range(1, 5):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base.get_parameter(n) + (target[n] - base.get_parameter(n)) * step / 4)
        out = manager.on_optimizer_step(model, inputs=batch)
    assert all(torch.equal(p, target[n]) for n, p in model.named_parameters())
    # every drift key but the interval's direction, which a pair of checkpoints does not have
    shared = [k for k in out if k.startswith("drift/") and k != "drift/cos_interval"]
    assert "drift/kl_base_now" in shared and "drift/layer_1/norm_max" in shared
    for key in shared:
        assert offline[key] == pytest.approx(out[key], rel=1e-12, abs=1e-15), key
    assert out["drift/cos_interval"] == pytest.approx(1.0)  # steps along one straight line
    assert offline["drift/cos_interval"] is None  # NaN, written as null
    assert out["drift/kl_base_now"] > 0 and out["drift/tokens"] == offline["sparse/tokens"]
    # and the diff's param_change/* of the pair, under their own names
    same = {"norm_l2": "norm_l2", "relative_norm": "relative_norm", "norm_max": "norm_max",
            "exact_unchanged_ratio": "exact_unchanged_ratio",
            "bf16_unchanged_ratio": "bf16_unchanged_ratio"}
    groups = {k.rsplit("/", 1)[0] for k in out if k.startswith("drift/") and k.count("/") > 1
              and "/sparse/" not in k and "/lowrank/" not in k}
    checked = 0
    for prefix in ["drift", *groups]:
        pc = "param_change" + prefix[len("drift"):]
        names = dict(same) if prefix == "drift" else {
            "norm_l2": "norm_l2", "relative_norm": "relative_norm",
            "exact_unchanged_ratio": "sparsity"}
        for d, p in names.items():
            assert offline[f"{pc}/{p}"] == pytest.approx(out[f"{prefix}/{d}"], rel=1e-12), d
            checked += 1
        for t in THRESHOLDS:
            label = format_threshold(t)
            sparsity = offline[f"{pc}/sparsity_at_{label}"]
            assert out[f"{prefix}/changed_ratio_at_{label}"] == pytest.approx(1 - sparsity)
            checked += 1
    assert checked > 50
