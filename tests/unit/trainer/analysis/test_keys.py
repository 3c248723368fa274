"""The metric-key grammar: every family's key shapes read back as themselves, with the right
parts; the builders refuse parts that would be misread; real computer output parses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager, keys
from grail.trainer.analysis.config import format_threshold as config_format_threshold
from grail.trainer.analysis.keys import (
    KeyParts,
    format_budget,
    format_keep_ratio,
    format_rank,
    format_threshold,
    format_top,
    metric_key,
    parse_key,
)
from grail.trainer.analysis.metrics.sparse_quality import format_keep_ratio as sq_format_keep
from tests.conftest import tiny_qwen2

# key -> (family, scope, group, name, label, variant, label_kind, label_value)
SHAPES = {
    # parameter change
    "param_change/norm_l2": ("param_change", "global", None, "norm_l2", None, None, None, None),
    "param_change/sparsity_at_1e-06":
        ("param_change", "global", None, "sparsity", "1e-06", None, "threshold", 1e-6),
    "param_change/changed_ratio_at_0e+00":
        ("param_change", "global", None, "changed_ratio", "0e+00", None, "threshold", 0.0),
    "param_change/layer_3/mean_abs_delta":
        ("param_change", "layer", "layer_3", "mean_abs_delta", None, None, None, None),
    "param_change/encoder.block.layer_11/sparsity_at_1e-04":
        ("param_change", "layer", "encoder.block.layer_11", "sparsity", "1e-04", None,
         "threshold", 1e-4),
    "param_change/component/q_proj/sparsity":
        ("param_change", "component", "q_proj", "sparsity", None, None, None, None),
    "param_change/component/attn.c_proj/norm_l2":
        ("param_change", "component", "attn.c_proj", "norm_l2", None, None, None, None),
    # mask overlap (written into param_change)
    "param_change/mask_overlap":
        ("param_change", "global", None, "mask_overlap", None, None, None, None),
    "param_change/mask_overlap_prev_ratio":
        ("param_change", "global", None, "mask_overlap_prev_ratio", None, None, None, None),
    # sparse quality
    "sparse/kl_at_1e-06": ("sparse", "global", None, "kl", "1e-06", None, "threshold", 1e-6),
    "sparse/top1_agree_at_1e-06_random":
        ("sparse", "global", None, "top1_agree", "1e-06", "random", "threshold", 1e-6),
    "sparse/kl_at_keep_0.01": ("sparse", "global", None, "kl", "keep_0.01", None, "keep", 0.01),
    "sparse/cosine_at_keep_0.1_dare":
        ("sparse", "global", None, "cosine", "keep_0.1", "dare", "keep", 0.1),
    "sparse/kept_ratio_at_keep_1e-05":
        ("sparse", "global", None, "kept_ratio", "keep_1e-05", None, "keep", 1e-5),
    "sparse/threshold_at_keep_0.5":
        ("sparse", "global", None, "threshold", "keep_0.5", None, "keep", 0.5),
    "sparse/kl_at_budget_r8": ("sparse", "global", None, "kl", "budget_r8", None, "budget", 8.0),
    "sparse/top1_agree_at_budget_r64":
        ("sparse", "global", None, "top1_agree", "budget_r64", None, "budget", 64.0),
    "sparse/tokens": ("sparse", "global", None, "tokens", None, None, None, None),
    # gradients and Adam
    "gradient/norm_l2": ("gradient", "global", None, "norm_l2", None, None, None, None),
    "gradient/layer_0/sparsity_at_1e-08":
        ("gradient", "layer", "layer_0", "sparsity", "1e-08", None, "threshold", 1e-8),
    "gradient/component/gate_proj/missing_ratio":
        ("gradient", "component", "gate_proj", "missing_ratio", None, None, None, None),
    "adam_sign/frac_near_one": ("adam_sign", "global", None, "frac_near_one", None, None, None,
                                None),
    "adam_sign/component/down_proj/mean_abs_u":
        ("adam_sign", "component", "down_proj", "mean_abs_u", None, None, None, None),
    # low rank
    "lowrank/energy_at_r8": ("lowrank", "global", None, "energy", "r8", None, "rank", 8.0),
    "lowrank/component/q_proj/energy_at_r1":
        ("lowrank", "component", "q_proj", "energy", "r1", None, "rank", 1.0),
    "lowrank/kl_at_r4": ("lowrank", "global", None, "kl", "r4", None, "rank", 4.0),
    "lowrank/param_ratio_at_r16":
        ("lowrank", "global", None, "param_ratio", "r16", None, "rank", 16.0),
    "lowrank/rank_for_energy_0.9":
        ("lowrank", "global", None, "rank_for_energy_0.9", None, None, None, None),
    # drift: the whole fine-tune, with sub-families and references
    "drift/kl_base_now": ("drift", "global", None, "kl_base_now", None, None, None, None),
    "drift/changed_ratio_at_1e-06":
        ("drift", "global", None, "changed_ratio", "1e-06", None, "threshold", 1e-6),
    "drift/layer_2/relative_norm":
        ("drift", "layer", "layer_2", "relative_norm", None, None, None, None),
    "drift/component/v_proj/norm_l2":
        ("drift", "component", "v_proj", "norm_l2", None, None, None, None),
    "drift/sparse/kl_at_keep_0.1":
        ("drift/sparse", "global", None, "kl", "keep_0.1", None, "keep", 0.1),
    "drift/sparse/kl_at_keep_0.01_random":
        ("drift/sparse", "global", None, "kl", "keep_0.01", "random", "keep", 0.01),
    "drift/sparse/top1_agree_at_keep_0.1_dare":
        ("drift/sparse", "global", None, "top1_agree", "keep_0.1", "dare", "keep", 0.1),
    "drift/lowrank/energy_at_r8":
        ("drift/lowrank", "global", None, "energy", "r8", None, "rank", 8.0),
    "drift/overlap/sft_run/jaccard":
        ("drift/overlap", "reference", "sft_run", "jaccard", None, None, None, None),
    "drift/overlap/base-2/kl_at_keep_0.1":
        ("drift/overlap", "reference", "base-2", "kl", "keep_0.1", None, "keep", 0.1),
    # attribution and principal directions
    "attrib/kl_total": ("attrib", "global", None, "kl_total", None, None, None, None),
    "attrib/component/mlp/kl_only":
        ("attrib", "component", "mlp", "kl_only", None, None, None, None),
    "attrib/layer_5/kl_without": ("attrib", "layer", "layer_5", "kl_without", None, None, None,
                                  None),
    "attrib/layer_5/update_share":
        ("attrib", "layer", "layer_5", "update_share", None, None, None, None),
    "principal/energy_in_top8": ("principal", "global", None, "energy_in", "top8", None, "top",
                                 8.0),
    "principal/energy_in_top8_random":
        ("principal", "global", None, "energy_in", "top8", "random", "top", 8.0),
    "principal/subspace_overlap_top16":
        ("principal", "global", None, "subspace_overlap", "top16", None, "top", 16.0),
    "principal/spectral_drift_top1":
        ("principal", "global", None, "spectral_drift", "top1", None, "top", 1.0),
    # a custom computer's key
    "custom/accuracy": ("custom", "global", None, "accuracy", None, None, None, None),
}


@pytest.mark.parametrize("key", list(SHAPES))
def test_every_family_key_shape_reads_back_with_its_parts(key):
    family, scope, group, name, label, variant, kind, value = SHAPES[key]
    parts = parse_key(key)
    assert parts == KeyParts(family=family, scope=scope, group=group, name=name, label=label,
                             variant=variant)
    assert parts.key == key
    assert (parts.label_kind, parts.label_value) == (kind, value)
    assert parts.root == family.split("/")[0]
    where = {"layer": "layer", "component": "component", "reference": "reference"}.get(scope)
    built = metric_key(family, name, label=label, variant=variant,
                       **({where: group} if where else {}))
    assert built == key


def test_parts_helpers():
    p = parse_key("sparse/kl_at_keep_0.1_random")
    assert p.with_(variant=None).key == "sparse/kl_at_keep_0.1"
    assert p.with_(name="kept_ratio", variant=None).key == "sparse/kept_ratio_at_keep_0.1"
    assert parse_key("param_change/encoder.block.layer_7/norm_l2").layer_index == 7
    assert parse_key("param_change/component/layer_norm/norm_l2").layer_index is None
    assert parse_key("custom/score_at_best").label_kind == "other"
    assert parse_key("custom/score_at_best").label_value is None


@pytest.mark.parametrize(
    "key", ["loss", "", "/x", "a//b", "a/", "sparse/component/q_proj",
            "sparse/component/q/extra/kl", "sparse/layer_3/extra/kl"],
)
def test_strings_outside_the_grammar_are_none(key):
    assert parse_key(key) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"family": "sparse", "name": "kl_at_x"}, "read back"),
        ({"family": "sparse", "name": "kl_random"}, "read back"),
        ({"family": "sparse", "name": "energy_in_top8"}, "read back"),
        ({"family": "a", "name": "b/c"}, "read back"),
        ({"family": "a", "name": "b", "layer": "block_3"}, "read back"),
        ({"family": "a", "name": "b", "component": "x/y"}, "read back"),
        ({"family": "a/layer_2", "name": "b"}, "read back"),
        ({"family": "a", "name": "b", "variant": "shuffled"}, "variant"),
        ({"family": "a", "name": "b", "layer": "layer_1", "component": "q"}, "one scope"),
    ],
)
def test_builder_refuses_parts_that_would_be_misread(kwargs, match):
    with pytest.raises(ValueError, match=match):
        metric_key(**kwargs)


def test_label_builders_are_the_design_formats_and_the_old_names_still_import():
    for t in (0.0, -0.0, 1e-8, 1e-6, 1e-4, 0.5, 3e-7):
        assert format_threshold(t) == f"{t + 0.0:.0e}"
    assert format_threshold(-0.0) == "0e+00"
    assert config_format_threshold is format_threshold and sq_format_keep is format_keep_ratio
    assert [format_keep_ratio(r) for r in (0.01, 0.1, 1.0, 1e-5)] == [
        "keep_0.01", "keep_0.1", "keep_1", "keep_1e-05"]
    assert (format_rank(8), format_budget(8), format_top(8)) == ("r8", "budget_r8", "top8")


_SEG = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@st.composite
def _parts(draw):
    family = "/".join(draw(st.lists(_SEG, min_size=1, max_size=3)))
    scope = draw(st.sampled_from(["global", "layer", "component", "reference"]))
    if scope == "reference":
        family += "/overlap"
    trunk = draw(st.sampled_from(["", "encoder.block.", "h."]))
    group = {
        "global": None,
        "layer": f"{trunk}layer_{draw(st.integers(0, 99))}",
        "component": draw(st.from_regex(r"[a-z][a-z0-9_.]{0,10}", fullmatch=True)),
        "reference": draw(_SEG),
    }[scope]
    label = draw(st.one_of(
        st.none(),
        st.floats(0, 1, allow_nan=False).map(format_threshold),
        st.floats(1e-6, 1).map(format_keep_ratio),
        st.integers(1, 4096).map(format_rank),
        st.integers(1, 4096).map(format_budget),
        st.integers(1, 4096).map(format_top),
    ))
    return dict(family=family, scope=scope, group=group, name=draw(_SEG), label=label,
                variant=draw(st.sampled_from([None, "random", "dare"])))


@given(_parts())
def test_built_keys_read_back_or_are_refused(fields):
    """Whatever the builder accepts reads back exactly; what it refuses would have been
    misread (a name that itself ends in a label or variant, a family segment that looks like a
    layer)."""
    parts = KeyParts(**fields)
    where = {"layer": "layer", "component": "component", "reference": "reference"}
    extra = {where[parts.scope]: parts.group} if parts.scope in where else {}
    try:
        key = metric_key(parts.family, parts.name, label=parts.label, variant=parts.variant,
                         **extra)
    except ValueError:
        assert parse_key(parts.key) != parts
        return
    assert key == parts.key and parse_key(key) == parts
    if parts.label is not None and parts.label_kind != "threshold":
        assert parts.label_value is not None and math.isfinite(parts.label_value)


@pytest.mark.slow
def test_every_key_the_built_in_computers_write_reads_back():
    """The comprehensive preset on a tiny model: every key parses, with the parts the report
    relies on."""
    torch.manual_seed(0)
    model = tiny_qwen2()
    cfg = AnalysisConfig.comprehensive(interval=1, fused_kernels=False,
                                       sparse_quality_keep_ratios=[0.1],
                                       sparse_quality_rescale_random=True,
                                       low_rank_ranks=[1, 4])
    manager = ModelAnalysisManager.create(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 8))
    seen: dict[str, float] = {}
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        seen.update(manager.on_optimizer_step(model, inputs=ids, optimizer=opt))
        opt.zero_grad()
    roots = {k.split("/")[0] for k in seen}
    assert {"param_change", "sparse", "gradient", "adam_sign", "lowrank"} <= roots
    for key in seen:
        parts = parse_key(key)
        assert parts is not None and parts.key == key, key
        assert parts.root == key.split("/")[0]  # drift/sparse, drift/lowrank: sub-families
    parsed = [parse_key(k) for k in seen]
    assert any(p.scope == "layer" and p.layer_index is not None for p in parsed)
    assert any(p.scope == "component" for p in parsed)
    assert {p.variant for p in parsed} == {None, "random", "dare"}
    assert {p.label_kind for p in parsed} >= {None, "threshold", "keep", "rank", "budget"}
    assert keys.parse_key("sparse/kl_at_keep_0.1_dare").key in seen
