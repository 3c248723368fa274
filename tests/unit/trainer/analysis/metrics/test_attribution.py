"""AttributionMetrics against explicit model copies evaluated in float64, and its invariants."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics.attribution import AttributionMetrics, attribution_groups
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.metrics.registry import build_computers
from tests.conftest import tiny_qwen2

from ..memory_probe import run_probe
from ..reference import assert_same_state, state

O_PROJ_1 = "model.layers.1.self_attn.o_proj.weight"
Q_PROJ_0 = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias")
DOWN_1 = "model.layers.1.mlp.down_proj.weight"


def _batch():
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # padding is masked out of every comparison
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


@torch.no_grad()
def _setup(planted=None, scale=0.05, dtype=torch.float32, snapshot_dtype=None, **kw):
    """Tiny Qwen2, its snapshot, W_old, and an update of the ``planted`` parameters (all if
    None)."""
    model = tiny_qwen2(dtype=dtype, **kw)
    snap = ParameterSnapshot(model, dtype=snapshot_dtype)
    old = {n: t.clone() for n, t in snap.data.items()}
    gen = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        d = torch.randn(p.shape, generator=gen) * scale
        if planted is None or n in planted:
            p.add_(d.to(p.dtype))
    ctx = AnalysisContext(model=model, inputs=_batch(), step=3)
    return model, snap, old, ctx


def _compute(model, snap, ctx, **kw):
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    return AttributionMetrics(**kw).compute(delta, context=ctx)


# --- float64 references built from explicit model copies --------------------------------------
def _variant(model, values):
    """A copy of ``model`` with the given parameters overwritten."""
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, v in values.items():
            p = out.get_parameter(n)
            p.copy_(v.to(p.dtype))
    return out


def _logits(model, inputs):
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return out.logits[mask].double().numpy()


def _kl64(a, b):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(a), log_softmax(b)
    return float(np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0).mean())


def _reference(model, old, groups, inputs):
    """``kl_total`` and per group ``(kl_only, kl_without)`` from hand-built copies."""
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = _logits(_variant(model, {}), inputs)
    out = {"kl_total": _kl64(full, _logits(_variant(model, old), inputs))}
    for g, names in groups.items():
        only = _variant(model, {n: (new[n] if n in names else old[n]) for n in new})
        without = _variant(model, {n: old[n] for n in names})
        out[g] = (_kl64(full, _logits(only, inputs)), _kl64(full, _logits(without, inputs)))
    return out


def _key(group: str, stat: str) -> str:
    kind, label = group.split("/", 1)
    return f"attrib/{label}/{stat}" if kind == "layer" else f"attrib/{group}/{stat}"


# --- tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("skip_unchanged", [True, False])
@pytest.mark.parametrize("rebind", [True, False])
def test_update_planted_in_one_module_is_attributed_to_it_exactly(skip_unchanged, rebind):
    model, snap, _old, ctx = _setup(planted={O_PROJ_1})
    m = _compute(model, snap, ctx, groups=["component", "layer"], skip_unchanged=skip_unchanged,
                 rebind=rebind)
    total = m["attrib/kl_total"]
    assert total > 1e-6
    for g in ("component/o_proj", "layer/layer_1"):  # the groups holding the update
        assert m[_key(g, "kl_only")] == 0.0
        assert m[_key(g, "kl_without")] == total
        assert m[_key(g, "update_share")] == 1.0
    others = [g for g in attribution_groups(list(snap.data), ["component", "layer"])
              if g not in ("component/o_proj", "layer/layer_1")]
    assert len(others) == 12  # 11 other components and layer_0
    for g in others:
        assert m[_key(g, "kl_without")] == 0.0
        assert m[_key(g, "kl_only")] == total
        assert m[_key(g, "update_share")] == 0.0
    assert m["attrib/tokens"] == float(ctx.inputs["attention_mask"].sum())
    assert m["attrib/nonfinite"] == 0.0


@pytest.mark.usefixtures("kernel_path")
def test_two_planted_modules_equal_explicit_copies_in_float64():
    planted = {*Q_PROJ_0, DOWN_1}
    model, snap, old, ctx = _setup(planted=planted, scale=0.2)
    kinds = ["component", "layer"]
    m = _compute(model, snap, ctx, groups=kinds, skip_unchanged=False)
    groups = attribution_groups(list(snap.data), kinds)
    ref = _reference(model, old, groups, ctx.inputs)
    assert m["attrib/kl_total"] == pytest.approx(ref["kl_total"], rel=1e-5, abs=1e-12)
    for g in groups:
        kl_only, kl_without = ref[g]
        assert m[_key(g, "kl_only")] == pytest.approx(kl_only, rel=1e-5, abs=1e-12), g
        assert m[_key(g, "kl_without")] == pytest.approx(kl_without, rel=1e-5, abs=1e-12), g
    # both modules matter, and neither carries the whole change
    for g in ("component/q_proj", "component/down_proj"):
        assert 0 < m[_key(g, "kl_without")] < ref["kl_total"]
        assert 0 < m[_key(g, "kl_only")] < ref["kl_total"]


def test_shares_equal_numpy_float64_and_sum_to_one_over_components():
    model, snap, old, ctx = _setup(scale=1e-3)
    with torch.no_grad():  # a frozen group, and a non-finite update that shares must ignore
        model.model.embed_tokens.weight.copy_(old["model.embed_tokens.weight"])
    m = _compute(model, snap, ctx, groups=["component", "layer"], max_groups=2)
    new = {n: p.detach().double().numpy() for n, p in model.named_parameters()}
    sq = {n: float(((new[n] - old[n].double().numpy()) ** 2).sum()) for n in new}
    size = {n: new[n].size for n in new}
    groups = attribution_groups(list(new), ["component", "layer"])
    for g, names in groups.items():
        want = sum(sq[n] for n in names) / sum(sq.values())
        assert m[_key(g, "update_share")] == pytest.approx(want, rel=1e-6), g
        assert m[_key(g, "param_share")] == sum(size[n] for n in names) / sum(size.values())
    for stat in ("update_share", "param_share"):
        comps = [m[_key(g, stat)] for g in groups if g.startswith("component/")]
        layers = [m[_key(g, stat)] for g in groups if g.startswith("layer/")]
        assert sum(comps) == pytest.approx(1.0, abs=1e-12)
        assert sum(layers) < 1.0  # embeddings, final norm and head are in no layer
    assert m[_key("component/embed_tokens", "update_share")] == 0.0
    assert m[_key("component/embed_tokens", "kl_without")] == 0.0


def test_nonfinite_update_entries_are_left_out_of_the_shares():
    model, snap, old, ctx = _setup(scale=1e-3)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    m = _compute(model, snap, ctx, groups=["component"])
    new = {n: p.detach().double().numpy() for n, p in model.named_parameters()}
    d = {n: new[n] - old[n].double().numpy() for n in new}
    sq = {n: float((x[np.isfinite(x)] ** 2).sum()) for n, x in d.items()}
    want = sq["model.norm.weight"] / sum(sq.values())
    assert m["attrib/component/norm/update_share"] == pytest.approx(want, rel=1e-6)
    assert m["attrib/nonfinite"] > 0  # the NaN weight poisons every logit of the full model


def _forward_counter(model):
    calls = {"n": 0}

    def count(module, args, output):
        calls["n"] += 1

    return calls, model.register_forward_hook(count)


def test_max_groups_measures_the_largest_updates_and_logs_once(caplog):
    model, snap, _old, ctx = _setup(scale=1e-2)
    with torch.no_grad():  # make two groups dominate the update
        for n, p in model.named_parameters():
            if "up_proj" in n or "lm_head" in n:
                p.add_(torch.randn_like(p))
    computer = AttributionMetrics(groups=["component"], max_groups=2)
    calls, handle = _forward_counter(model)
    caplog.set_level(logging.INFO)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    m = computer.compute(delta, context=ctx)
    computer.compute(delta, context=AnalysisContext(model=model, inputs=_batch(), step=4))
    handle.remove()
    assert calls["n"] == 2 * (1 + 1 + 2 * 2)  # reference, kl_total, two groups x two
    measured = {k.split("/")[2] for k, v in m.items()
                if k.endswith("kl_only") and not math.isnan(v)}
    assert measured == {"up_proj", "lm_head"}
    assert math.isnan(m["attrib/component/q_proj/kl_without"])
    assert m["attrib/component/q_proj/update_share"] > 0  # shares are reported for every group
    lines = [r for r in caplog.records if "exceed max_groups=2" in r.getMessage()]
    assert len(lines) == 1 and "12 groups" in lines[0].getMessage()


def test_groups_without_update_cost_no_forward():
    model, snap, _old, ctx = _setup(planted={O_PROJ_1, DOWN_1})
    calls, handle = _forward_counter(model)
    m = _compute(model, snap, ctx, groups=["component", "layer"])
    handle.remove()
    # reference + kl_total + (o_proj, down_proj, layer_1) x two; layer_0 and the rest: exact
    assert calls["n"] == 2 + 3 * 2
    assert m["attrib/layer_0/kl_only"] == m["attrib/kl_total"]


@pytest.mark.parametrize("path", ["rebind", "values", "lossy-snapshot"])
@pytest.mark.parametrize("fail_at", [4, 7], ids=["second-only-group", "second-without-group"])
def test_invariants_when_a_forward_fails_inside_the_second_group(path, fail_at):
    lossy = torch.bfloat16 if path == "lossy-snapshot" else None
    model, snap, _old, ctx = _setup(snapshot_dtype=lossy, attention_dropout=0.1)
    model.train()
    model.model.layers[1].eval()
    model(**{k: v for k, v in ctx.inputs.items()}).loss.backward()  # gradients exist
    before = state(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    snap_before = {n: t.clone() for n, t in snap.data.items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    calls = {"n": 0}

    def fail(module, args, output):
        calls["n"] += 1
        if calls["n"] == fail_at:  # 1 reference, 2 kl_total, 3-5 only a group, 6-8 without
            raise RuntimeError("injected")

    handle = model.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="injected"):
        _compute(model, snap, ctx, groups=["component"], max_groups=3, rebind=path == "rebind")
    handle.remove()
    assert_same_state(before, state(model))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert all(p.requires_grad for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state())
    assert_same_state(snap_before, dict(snap.data))


def test_no_graph_no_grad_and_deterministic_in_train_mode_with_dropout():
    model, snap, _old, ctx = _setup(attention_dropout=0.5)
    model.train()
    a = _compute(model, snap, ctx, groups=["layer"])
    b = _compute(model, snap, ctx, groups=["layer"])
    assert a == b and model.training
    assert all(p.grad is None for p in model.parameters())


def test_lossy_snapshot_equals_copies_with_the_rounded_old_weights():
    model, snap, old, ctx = _setup(planted={*Q_PROJ_0, DOWN_1}, snapshot_dtype=torch.bfloat16)
    m = _compute(model, snap, ctx, groups=["layer"], skip_unchanged=False)
    groups = attribution_groups(list(snap.data), ["layer"])
    ref = _reference(model, old, groups, ctx.inputs)  # W_old as stored: bf16, widened on write
    for g in groups:
        assert m[_key(g, "kl_only")] == pytest.approx(ref[g][0], rel=1e-5, abs=1e-12)
        assert m[_key(g, "kl_without")] == pytest.approx(ref[g][1], rel=1e-5, abs=1e-12)


def test_skips_without_inputs_or_live_model(caplog):
    model, snap, _old, ctx = _setup()
    computer = AttributionMetrics()
    caplog.set_level(logging.INFO)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    assert computer.compute(delta, context=AnalysisContext(model=model, inputs=None)) == {}
    frozen = snap.compute_delta(ParameterSnapshot(model))  # a copy, not the live model
    assert computer.compute(frozen, context=ctx) == {}
    text = caplog.text
    assert "no inputs were passed" in text and "not the live model" in text


def test_manager_runs_it_without_sparse_quality_and_shares_the_reference_forward():
    def run(sparse: bool) -> tuple[dict, int]:
        model, _snap, _old, _ctx = _setup(scale=0.0)
        config = AnalysisConfig(interval=1, sparse_quality_enabled=sparse,
                                sparse_quality_include_random=False, attribution_enabled=True,
                                attribution_groups=["layer"], param_change_enabled=False)
        manager = ModelAnalysisManager.create(config)
        manager.on_optimizer_step(model, inputs=_batch())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        calls, handle = _forward_counter(model)
        metrics = manager.on_optimizer_step(model, inputs=_batch())
        handle.remove()
        return metrics, calls["n"]

    alone, n_alone = run(sparse=False)
    assert set(alone) == {"attrib/kl_total", "attrib/tokens", "attrib/nonfinite"} | {
        f"attrib/layer_{i}/{s}" for i in (0, 1)
        for s in ("kl_only", "kl_without", "update_share", "param_share")
    }
    assert n_alone == 1 + 1 + 2 * 2
    both, n_both = run(sparse=True)
    assert n_both == n_alone + 1  # sparse adds its masked forward; the reference is shared
    assert {k: v for k, v in both.items() if k.startswith("attrib/")} == alone


def test_registry_and_config():
    names = [type(c).__name__ for c in build_computers(AnalysisConfig())]
    assert "AttributionMetrics" not in names
    config = AnalysisConfig(attribution_enabled=True, attribution_groups="layer",
                            attribution_max_groups=5, sparse_quality_max_tokens=77,
                            component_map={"q_proj": "attn"})
    (computer,) = [c for c in build_computers(config) if isinstance(c, AttributionMetrics)]
    assert (computer.groups, computer.max_groups, computer.max_tokens) == (["layer"], 5, 77)
    assert computer.component_map == {"q_proj": "attn"}
    assert AnalysisConfig.comprehensive().attribution_enabled
    assert AnalysisConfig(attribution_groups=["layer", "component"]).attribution_groups == [
        "component", "layer"]
    cfg = AnalysisConfig(attribution_enabled=True, attribution_groups=["layer"])
    assert AnalysisConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("attribution_groups", [], "non-empty list of group kinds"),
        ("attribution_groups", ["components"], "one of \\['component', 'layer'\\]"),
        ("attribution_groups", ["layer", "layer"], "unique"),
        ("attribution_groups", None, "non-empty list"),
        ("attribution_max_groups", 0, "integer in \\[1, 256\\]"),
        ("attribution_max_groups", 257, "integer in \\[1, 256\\]"),
        ("attribution_max_groups", 2.0, "integer in \\[1, 256\\]"),
        ("attribution_enabled", 1, "True or False"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=rf"AnalysisConfig\.{field}=.*{match}"):
        AnalysisConfig(**{field: value})


def test_component_map_merges_groups():
    model, snap, _old, ctx = _setup(planted={*Q_PROJ_0, O_PROJ_1})
    attn = {c: "attn" for c in ("q_proj", "k_proj", "v_proj", "o_proj")}
    m = _compute(model, snap, ctx, component_map=attn)
    assert m["attrib/component/attn/kl_only"] == 0.0  # every planted update is in "attn"
    assert m["attrib/component/attn/update_share"] == 1.0
    assert not any("q_proj" in k for k in m)


MEMORY_SCRIPT = """
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics.attribution import AttributionMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext

snap = ParameterSnapshot(model)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1e-3)
out = {"model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
       "largest": max(p.numel() * p.element_size() for p in model.parameters()),
       "logits": ids.numel() * 32000 * 4}
for rebind in (True, False):
    computer = AttributionMetrics(["component", "layer"], fused=False, rebind=rebind)
    def run():
        ctx = AnalysisContext(model=model, inputs=ids, step=1)
        computer.compute(snap.compute_delta(ParameterSnapshot.live(model)), context=ctx)
    run()  # first call: allocator warm-up
    out["rebind" if rebind else "values"] = measure(run)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_memory_is_logits_not_a_copy_of_any_weight():
    """No weight is copied: the reference's logits and probabilities, one variant's logits and
    the comparison buffers (~3.4 logits tensors here), plus one chunk buffer for the value
    exchange; a copy of the embedding alone would add four logits tensors."""
    r = run_probe(MEMORY_SCRIPT)
    assert r["largest"] == 32000 * 256 * 4  # embedding and head: 4 logits tensors each
    for path in ("rebind", "values"):
        assert r[path] <= 4 * r["logits"] + 4 * 2**20, (path, r)


@pytest.mark.parametrize(("mode", "compiled"), [(True, True), ("auto", False), (False, False)])
def test_the_compile_policy_decides_whether_the_reference_rows_are_compiled(
    mode, compiled, monkeypatch
):
    """Like every family: ``True`` compiles at once, ``"auto"`` starts eager (its first
    measurements only time the work), ``False`` never compiles."""
    from grail.trainer.analysis import kernels

    calls = []
    real = kernels.reference_rows
    monkeypatch.setattr(kernels, "reference_rows", lambda *a: calls.append(1) or real(*a))
    model, snap, _, ctx = _setup()
    with kernels.settings.override(min_total_numel=0):
        _compute(model, snap, ctx, fused=mode)
    assert bool(calls) == compiled
