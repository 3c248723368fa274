"""DriftMetrics against float64 numpy on explicit W_base / W_prev / W_now copies, and its output
metrics against explicit model copies evaluated in float64."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis.config import format_threshold
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.metrics.drift import DriftMetrics
from grail.trainer.analysis.ops.masks import mix_seed, random_keep_mask
from tests.conftest import tiny_qwen2

from ..reference import assert_same_state, bf16_bits, delta32, state

THRESHOLDS = [0.0, 1e-8, 1e-6, 1e-4]

# every test on the eager paths and on the compiled kernels (statistics, swaps, comparisons)
pytestmark = pytest.mark.usefixtures("kernel_path")


@torch.no_grad()
def _update(model: torch.nn.Module, seed: int, scale: float, zero: float = 0.3) -> None:
    """A random update leaving a fraction ``zero`` of the entries untouched."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        d = torch.randn(p.shape, generator=gen) * scale
        d[torch.rand(p.shape, generator=gen) < zero] = 0.0
        p.add_(d.to(p.dtype))


def _copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(dtype=torch.float32, scale=None, **kw):
    """base -> (update) -> prev -> (update) -> now, with explicit copies of all three."""
    model = tiny_qwen2(dtype=dtype)
    scale = scale or (1e-3 if dtype != torch.float32 else 1e-5)
    base_snap = ParameterSnapshot(model)
    w_base = _copy(model)
    _update(model, 1, scale)
    prev = ParameterSnapshot(model)
    w_prev = _copy(model)
    _update(model, 2, scale)
    w_now = _copy(model)
    live = ParameterSnapshot.live(model)
    delta = prev.compute_delta(live)
    ctx = AnalysisContext(model=model, step=6, base=base_snap, **kw)
    computer = DriftMetrics(thresholds=THRESHOLDS, per_layer=True, track_components=True)
    m = computer.compute(delta, old_snapshot=prev, current_snapshot=live, context=ctx)
    return m, w_base, w_prev, w_now, model


def _group(name: str) -> tuple[str | None, str]:
    """Layer and component of a tiny Qwen2 parameter, spelled out independently of naming.py."""
    parts = name.split(".")
    layer = f"layer_{parts[2]}" if parts[1:2] == ["layers"] else None
    return layer, parts[-2]


def _stats(names: list[str], base: dict, now: dict) -> dict[str, float]:
    d32 = np.concatenate([delta32(now[n], base[n]) for n in names])
    d64 = np.concatenate([now[n].double().numpy().ravel() - base[n].double().numpy().ravel()
                          for n in names])
    b = np.concatenate([base[n].float().numpy().ravel() for n in names])
    w = np.concatenate([now[n].float().numpy().ravel() for n in names])
    total = d32.size
    out = {
        "norm_l2": float(np.sqrt((d64**2).sum())),
        "relative_norm": float(np.sqrt((d64**2).sum()) / np.sqrt((b.astype(np.float64)**2).sum())),
        "norm_max": float(np.abs(d64).max()),
        "exact_unchanged_ratio": int((w == b).sum()) / total,
        "bf16_unchanged_ratio": int((bf16_bits(w) == bf16_bits(b)).sum()) / total,
    }
    for t in THRESHOLDS:
        # 1 - (|d| <= T) / N: a NaN/Inf delta counts as changed
        out[f"changed_ratio_at_{format_threshold(t)}"] = 1 - int((np.abs(d32) <= t).sum()) / total
    return out


def _check(m: dict, ref: dict, prefix: str) -> None:
    for key, want in ref.items():
        got = m[prefix + key]
        if "ratio" in key:
            assert got == want, prefix + key  # counts are exact
        else:
            assert got == pytest.approx(want, rel=1e-6), prefix + key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_statistics_match_float64_reference_overall_per_layer_and_component(dtype):
    m, w_base, w_prev, w_now, _ = _run(dtype)
    names = list(w_now)
    _check(m, _stats(names, w_base, w_now), "drift/")
    groups: dict[str, list[str]] = {}
    for n in names:
        layer, comp = _group(n)
        if layer is not None:
            groups.setdefault(f"drift/{layer}/", []).append(n)
        groups.setdefault(f"drift/component/{comp}/", []).append(n)
    assert {k.rsplit("/", 1)[0] + "/" for k in m if k.count("/") > 1} == set(groups)
    for prefix, members in groups.items():
        _check(m, _stats(members, w_base, w_now), prefix)
    # cos(W_now - W_prev, W_prev - W_base) in float64
    a = np.concatenate([w_now[n].double().numpy().ravel() - w_prev[n].double().numpy().ravel()
                        for n in names])
    b = np.concatenate([w_prev[n].double().numpy().ravel() - w_base[n].double().numpy().ravel()
                        for n in names])
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert m["drift/cos_interval"] == pytest.approx(cos, abs=1e-7)
    assert not any(k.startswith(("drift/kl", "drift/sparse")) for k in m)  # no inputs given


def test_cos_interval_over_a_run_uses_shared_norms_and_matches_reference(monkeypatch):
    """A manager over several measurements: param_change shares ||a||^2, the previous
    measurement gives ||b||^2, so only the first measurement passes over the weights again;
    with param_change off, or a lossy interval snapshot, the norms are computed and the values
    stay right."""
    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
    from grail.trainer.analysis.metrics import drift

    passes = []
    real = drift._sum_sq
    monkeypatch.setattr(drift, "_sum_sq", lambda d: passes.append(1) or real(d))
    for overrides, passes_wanted in (({}, 1), ({"param_change_enabled": False}, 1 + 4),
                                     ({"snapshot_dtype": "bfloat16"}, 4)):
        passes.clear()
        model = tiny_qwen2()
        cfg = AnalysisConfig(interval=2, drift_enabled=True, sparse_quality_enabled=False,
                             **overrides)
        manager = ModelAnalysisManager.create(cfg)
        weights, cosines = {}, {}
        for step in range(1, 11):
            _update(model, step, 1e-4 * (1 + step % 3))
            out = manager.on_optimizer_step(model)
            weights[step] = _copy(model)
            if out:
                cosines[step] = out["drift/cos_interval"]
        assert sorted(cosines) == [4, 6, 8, 10]
        for step, got in cosines.items():
            prev = weights[step - 2]
            if cfg.snapshot_dtype == "bfloat16":
                prev = {n: t.to(torch.bfloat16) for n, t in prev.items()}
            a = np.concatenate([(weights[step][n].double() - prev[n].double()).numpy().ravel()
                                for n in prev])
            b = np.concatenate([(prev[n].double() - weights[1][n].double()).numpy().ravel()
                                for n in prev])
            want = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            assert got == pytest.approx(want, abs=1e-6), (overrides, step)
        # by default ||b||^2 at the first measurement only; without param_change also ||a||^2
        # at every measurement; with a lossy snapshot ||b||^2 every time
        assert len(passes) == passes_wanted, overrides


def test_cos_interval_is_nan_while_the_interval_snapshot_is_the_base():
    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

    model = tiny_qwen2()
    manager = ModelAnalysisManager.create(
        AnalysisConfig(interval=1, drift_enabled=True, sparse_quality_enabled=False))
    out = {}
    for step in range(1, 4):
        _update(model, step, 1e-4)
        out[step] = manager.on_optimizer_step(model)
    assert out[1] == {}  # base and first snapshot, both of step 1's weights
    assert math.isnan(out[2]["drift/cos_interval"])  # W_prev = W_base
    assert -1.0 <= out[3]["drift/cos_interval"] <= 1.0
    assert out[2]["drift/norm_l2"] > 0


# --- outputs -------------------------------------------------------------------------------
def _inputs():
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # padding is excluded
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def _logits64(model: torch.nn.Module, weights: dict, inputs: dict) -> np.ndarray:
    """Logits of a copy of ``model`` holding ``weights``, at the unmasked positions, as float64.

    An fp32 model's copy runs in float64; a bf16 model's copy runs in bf16, as the model itself
    does (a float64 pass would measure bf16 arithmetic, not the metric)."""
    m = copy.deepcopy(model).eval()
    if next(m.parameters()).dtype == torch.float32:
        m = m.double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(weights[n].to(p.dtype))
        out = m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return out[inputs["attention_mask"].bool()].double().numpy()


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0).mean())


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def _topk_keep(base: dict, now: dict, k: int) -> dict[str, np.ndarray]:
    """Exact top-k of |W_now - W_base| (the difference rounded once to float32, the delta the
    library defines) over all entries; ties in name order, then position (a stable sort of the
    concatenation)."""
    names = list(now)
    d = np.abs(np.concatenate([delta32(now[n], base[n]) for n in names]))
    order = np.argsort(-d, kind="stable")
    keep = np.zeros(d.size, dtype=bool)
    keep[order[:k]] = True
    out, pos = {}, 0
    for n in names:
        size = now[n].numel()
        out[n] = keep[pos : pos + size].reshape(now[n].shape)
        pos += size
    return out


def _masked(base: dict, now: dict, keep: dict, scale: float | None = None) -> dict:
    out = {}
    for n in now:
        b, w = base[n].double(), now[n].double()
        kept = torch.as_tensor(keep[n])
        value = w if scale is None else b + (w - b) / scale
        out[n] = torch.where(kept, value, b).to(now[n].dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kls_to_the_base_and_masked_whole_updates_match_float64_model_copies(dtype):
    ratios = [0.01, 0.3]
    model = tiny_qwen2(dtype=dtype)
    base_snap = ParameterSnapshot(model)
    w_base = _copy(model)
    _update(model, 1, 3e-2)
    prev = ParameterSnapshot(model)
    _update(model, 2, 3e-2)
    w_now = _copy(model)
    inputs = _inputs()
    ctx = AnalysisContext(model=model, inputs=inputs, step=6, base=base_snap)
    live = ParameterSnapshot.live(model)
    computer = DriftMetrics(keep_ratios=ratios, rescale_random=True, seed=3)
    m = computer.compute(prev.compute_delta(live), old_snapshot=prev, current_snapshot=live,
                         context=ctx)
    now64, base64 = _logits64(model, w_now, inputs), _logits64(model, w_base, inputs)
    tokens = int(inputs["attention_mask"].sum())
    assert m["drift/tokens"] == tokens
    assert m["drift/kl_base_now"] == pytest.approx(_kl(base64, now64), rel=1e-5)
    assert m["drift/kl_now_base"] == pytest.approx(_kl(now64, base64), rel=1e-5)
    # the two directions differ by more than the tolerance: neither is the other
    assert abs(m["drift/kl_base_now"] / m["drift/kl_now_base"] - 1) > 1e-4
    assert m["drift/top1_agree"] == _top1(now64, base64)
    total = sum(t.numel() for t in w_now.values())
    changed = sum(int((w_now[n] != w_base[n]).sum()) for n in w_now)
    seed = mix_seed(3, 6, "drift")
    for r in ratios:
        k = round(r * total)
        keep = _topk_keep(w_base, w_now, k)
        masked = _logits64(model, _masked(w_base, w_now, keep), inputs)
        label = f"keep_{r:g}"
        assert m[f"drift/sparse/kl_at_{label}"] == pytest.approx(_kl(now64, masked), rel=1e-5)
        assert m[f"drift/sparse/top1_agree_at_{label}"] == _top1(now64, masked)
        prob = min(k, changed) / changed
        rand = {n: random_keep_mask(t.numel(), prob, seed, n, 0, "cpu").view(t.shape).numpy()
                for n, t in w_now.items()}
        for suffix, scale in (("_random", None), ("_dare", prob)):
            other = _logits64(model, _masked(w_base, w_now, rand, scale), inputs)
            assert m[f"drift/sparse/kl_at_{label}{suffix}"] == pytest.approx(
                _kl(now64, other), rel=1e-5), suffix
            assert m[f"drift/sparse/top1_agree_at_{label}{suffix}"] == _top1(now64, other)
    kls = [m[f"drift/sparse/kl_at_keep_{r:g}"] for r in ratios]
    assert kls[0] > kls[1] > 0


def test_exact_top_k_with_ties_in_name_then_position_order():
    """An update made of a few repeated values: k falls inside a group of equal |delta|."""
    model = tiny_qwen2()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # dyadic weights: every difference below is exact, ties are real
        for p in model.parameters():
            p.copy_(torch.randint(-8, 8, p.shape, generator=gen) / 32)
    base_snap = ParameterSnapshot(model)
    w_base = _copy(model)
    with torch.no_grad():
        for p in model.parameters():
            choice = torch.tensor([0.0, 0.25, -0.25, 0.5])
            p.add_(choice[torch.randint(0, 4, p.shape, generator=gen)])
    w_now = _copy(model)
    inputs = _inputs()
    ctx = AnalysisContext(model=model, inputs=inputs, step=2, base=base_snap)
    total = sum(t.numel() for t in w_now.values())
    r = 0.3  # far more entries of |delta| 0.25 than the cut needs: most of them tie
    m = DriftMetrics(keep_ratios=[r], include_random=False).compute(
        current_snapshot=ParameterSnapshot.live(model), context=ctx)
    keep = _topk_keep(w_base, w_now, round(r * total))
    d = {n: np.abs(delta32(w_now[n], w_base[n])) for n in w_now}
    kept = np.concatenate([d[n][keep[n].ravel()] for n in d])
    dropped = np.concatenate([d[n][~keep[n].ravel()] for n in d])
    assert kept.min() == dropped.max() == 0.25  # the cut splits a group of ties
    masked = _logits64(model, _masked(w_base, w_now, keep), inputs)
    now64 = _logits64(model, w_now, inputs)
    assert m["drift/sparse/kl_at_keep_0.3"] == pytest.approx(_kl(now64, masked), rel=1e-5)
    assert m["drift/sparse/top1_agree_at_keep_0.3"] == _top1(now64, masked)


def test_output_keys_need_only_inputs_and_low_rank_keys_the_low_rank_option():
    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

    model = tiny_qwen2()
    cfg = AnalysisConfig(interval=2, drift_enabled=True, sparse_quality_enabled=False,
                         low_rank_enabled=True, low_rank_ranks=[1, 4],
                         low_rank_quality_enabled=False)
    manager = ModelAnalysisManager.create(cfg)
    inputs = _inputs()
    out = {}
    for step in range(1, 7):
        _update(model, step, 1e-3)
        out[step] = manager.on_optimizer_step(model, inputs=inputs if step != 6 else None)
    keys = set(out[4])
    for key in ("drift/kl_base_now", "drift/kl_now_base", "drift/top1_agree", "drift/tokens",
                "drift/sparse/kl_at_keep_0.01_random", "drift/sparse/top1_agree_at_keep_0.1",
                "drift/lowrank/energy_at_r1", "drift/lowrank/kl_at_r4",
                "drift/lowrank/top1_agree_at_r1"):
        assert key in keys, key
    assert not any(k.startswith("sparse/") for k in keys)  # sparse quality is off
    assert not any(k.startswith("lowrank/kl") for k in keys)  # its quality is off, drift's is not
    assert "drift/lowrank/energy_at_r4" in out[6] and "drift/kl_base_now" not in out[6]
    r1, r4 = out[4]["drift/lowrank/energy_at_r1"], out[4]["drift/lowrank/energy_at_r4"]
    assert 0 < r1 < r4 <= 1
    assert out[4]["drift/lowrank/kl_at_r4"] < out[4]["drift/lowrank/kl_at_r1"]


@pytest.mark.parametrize("fail_at", [1, 2, 4, 6])
def test_invariants_also_when_a_forward_fails_halfway(fail_at):
    """Weights, snapshots, gradients, training flags and the RNG are exactly as before, whether
    all forwards run (0) or the n-th raises: the base forward (1), a masked one (2, 4) or DARE's
    (6, under a per-module patch)."""
    model = tiny_qwen2(attention_dropout=0.1)
    base_snap = ParameterSnapshot(model)
    _update(model, 1, 1e-2)
    prev = ParameterSnapshot(model)
    _update(model, 2, 1e-2)
    inputs = _inputs()
    model.train()
    model.model.layers[1].eval()
    model(**inputs).loss.backward()
    before = state(model)
    snaps = {n: (t.clone(), base_snap.data[n].clone()) for n, t in prev.data.items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    calls = {"n": 0}

    def fail(module, args, output):
        calls["n"] += 1
        if calls["n"] == fail_at + 1:  # the first call is the reference (now) forward
            raise RuntimeError("injected")

    handle = model.model.layers[1].register_forward_hook(fail)
    ctx = AnalysisContext(model=model, inputs=inputs, step=4, base=base_snap)
    live = ParameterSnapshot.live(model)
    with pytest.raises(RuntimeError, match="injected"):
        DriftMetrics(keep_ratios=[0.1, 0.5], rescale_random=True).compute(
            prev.compute_delta(live), old_snapshot=prev, current_snapshot=live, context=ctx)
    handle.remove()
    assert_same_state(before, state(model))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state())
    for n, (p, b) in snaps.items():
        assert torch.equal(prev.data[n], p) and torch.equal(base_snap.data[n], b)
    # and when nothing fails: no graph, no new gradient, the same state
    ctx = AnalysisContext(model=model, inputs=inputs, step=4, base=base_snap)
    m = DriftMetrics(keep_ratios=[0.1], rescale_random=True).compute(
        prev.compute_delta(live), old_snapshot=prev, current_snapshot=live, context=ctx)
    assert m["drift/kl_base_now"] > 0
    assert_same_state(before, state(model))
    assert torch.equal(rng, torch.get_rng_state())
    assert [m.training for m in model.modules()] == modes


def test_no_base_is_skipped_and_nothing_moved_reads_zero():
    model = tiny_qwen2()
    live = ParameterSnapshot.live(model)
    assert DriftMetrics().compute(current_snapshot=live, context=AnalysisContext()) == {}
    base = ParameterSnapshot(model)
    ctx = AnalysisContext(model=model, inputs=_inputs(), base=base, step=1)
    m = DriftMetrics(keep_ratios=[0.5]).compute(current_snapshot=live, context=ctx)
    assert m["drift/norm_l2"] == 0.0 and m["drift/exact_unchanged_ratio"] == 1.0
    assert m["drift/kl_base_now"] == 0.0 and m["drift/kl_now_base"] == 0.0
    assert m["drift/top1_agree"] == 1.0 and m["drift/sparse/kl_at_keep_0.5"] == 0.0
    assert math.isnan(m["drift/cos_interval"])  # no interval snapshot
