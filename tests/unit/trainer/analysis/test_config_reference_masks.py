"""``AnalysisConfig.drift_reference_masks``: checked at construction, serialised as paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from grail.trainer.analysis import AnalysisConfig
from grail.trainer.analysis.core.mask_file import ChangeCriterion, MaskWriter


@pytest.fixture
def mask_path(tmp_path) -> Path:
    path = tmp_path / "sft.safetensors"
    writer = MaskWriter(path, {"w": (4,)}, ChangeCriterion("bf16_view"))
    writer.write("w", torch.tensor([True, False, True, False]))
    writer.finish()
    return path


def test_default_is_no_reference():
    assert AnalysisConfig().drift_reference_masks == {}


def test_paths_are_stored_as_strings_and_round_trip(mask_path):
    cfg = AnalysisConfig(drift_enabled=True,
                         drift_reference_masks={"sft": mask_path, "rl-seed.1": str(mask_path)})
    assert cfg.drift_reference_masks == {"sft": str(mask_path), "rl-seed.1": str(mask_path)}
    assert AnalysisConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["drift_reference_masks"] is not cfg.drift_reference_masks


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["sft"], "expected a dict"),
        ({"": "x"}, "non-empty strings"),
        ({"a/b": None}, "cannot be part of a metric key"),
        ({"component": None}, "cannot be part of a metric key"),
        ({"layer_3": None}, "cannot be part of a metric key"),
        ({"my ref": None}, "whitespace"),
        ({"sft": 3}, "must be a path"),
        ({"sft": "no/such/mask.safetensors"}, "does not exist"),
    ],
)
def test_bad_references_fail_at_construction(mask_path, value, message):
    if isinstance(value, dict):
        value = {k: (mask_path if v is None else v) for k, v in value.items()}
    with pytest.raises(ValueError) as info:
        AnalysisConfig(drift_enabled=True, drift_reference_masks=value)
    text = str(info.value)
    assert text.startswith("AnalysisConfig.drift_reference_masks=") and message in text
    assert "\n" not in text


def test_a_file_that_is_not_a_mask_is_rejected(tmp_path):
    save_file({"w": torch.zeros(3)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="not a grail-analysis mask file"):
        AnalysisConfig(drift_enabled=True,
                       drift_reference_masks={"w": str(tmp_path / "weights.safetensors")})


def test_masks_without_the_drift_family_fail_at_construction(mask_path):
    with pytest.raises(ValueError, match="set drift_enabled=True, or leave drift_reference_masks"):
        AnalysisConfig(drift_reference_masks={"sft": mask_path})
    with pytest.raises(ValueError, match="set drift_enabled=True"):
        AnalysisConfig.minimal(drift_reference_masks={"sft": mask_path})
    assert AnalysisConfig.comprehensive(drift_reference_masks={"sft": mask_path}).drift_enabled
    cfg = AnalysisConfig(drift_enabled=True, drift_reference_masks={"sft": mask_path})
    cfg.drift_enabled = False  # changed after construction: the manager checks again
    from grail.trainer.analysis import ModelAnalysisManager

    with pytest.raises(ValueError, match="set drift_enabled=True"):
        ModelAnalysisManager(cfg)
