"""GradientSparsityMetrics against float64 numpy references on real gradients."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.config import format_threshold
from grail.trainer.analysis.core.naming import ParameterNaming
from grail.trainer.analysis.metrics.base import AnalysisContext, MetricResult
from grail.trainer.analysis.metrics.gradient import GradientSparsityMetrics, HistogramSample
from tests.conftest import tiny_gpt2, tiny_qwen2

from ..reference import assert_same_state, state

THRESHOLDS = [0.0, 1e-8, 1e-6]

pytestmark = pytest.mark.usefixtures("kernel_path")


def _backward(model: torch.nn.Module, seed: int = 0, vocab: int = 128) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab // 2, (2, 12), generator=gen)  # half the vocab unused: zeros
    model(input_ids=ids, labels=ids).loss.backward()


def _ctx(model: torch.nn.Module) -> AnalysisContext:
    return AnalysisContext(model=model, step=1)


def _compute(computer: GradientSparsityMetrics, model: torch.nn.Module) -> dict[str, float]:
    with torch.no_grad():
        return computer.compute(context=_ctx(model))


def _reference(grads: dict[str, np.ndarray | None], thresholds=THRESHOLDS) -> dict[str, float]:
    """float64 reference; ``None`` marks a trainable parameter without gradient (its numel)."""
    present = [g for g in grads.values() if isinstance(g, np.ndarray)]
    missing = sum(int(g) for g in grads.values() if not isinstance(g, np.ndarray))
    x = np.concatenate(present) if present else np.zeros(0)
    fin = np.isfinite(x)
    f = x[fin]
    out = {
        "norm_l2": float(np.sqrt((f**2).sum())),
        "norm_l1": float(np.abs(f).sum()),
        "norm_max": float(np.abs(f).max()) if f.size else 0.0,
        "mean": float(f.mean()) if f.size else 0.0,
        "std": float(f.std()) if f.size else 0.0,
        "mean_abs": float(np.abs(f).mean()) if f.size else 0.0,
        "nonfinite_count": float((~fin).sum()),
        "num_params": float(x.size),
        "missing_ratio": missing / (x.size + missing),
    }
    for t in thresholds:
        le = float((np.abs(f) <= t).sum())
        out[f"sparsity_at_{format_threshold(t)}"] = le / x.size if x.size else 0.0
    return out


def _grads(model: torch.nn.Module) -> dict[str, np.ndarray | int]:
    out: dict[str, np.ndarray | int] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            out[n] = p.numel()
        else:
            out[n] = p.grad.detach().to_dense().double().numpy().reshape(-1)
    return out


TOP = ["norm_l2", "norm_l1", "norm_max", "mean", "std", "nonfinite_count", "num_params",
       "missing_ratio", *[f"sparsity_at_{format_threshold(t)}" for t in THRESHOLDS]]

GROUP = ["norm_l2", "mean_abs", "missing_ratio", *[f"sparsity_at_{format_threshold(t)}"
                                                   for t in THRESHOLDS]]


def _assert_close(got: dict[str, float], ref: dict[str, float], prefix: str, keys=TOP) -> None:
    for k in keys:
        key, v = prefix + k, ref[k]
        assert key in got, key
        if "sparsity" in k or "count" in k or "num_params" in k or "missing" in k:
            assert got[key] == pytest.approx(v, abs=1e-12), key
        elif k == "mean":  # a signed sum: its float32 error scales with sum |g|, not |sum g|
            assert got[key] == pytest.approx(v, abs=1e-6 * ref["mean_abs"]), key
        else:
            assert got[key] == pytest.approx(v, rel=1e-6, abs=1e-12), key


def test_whole_model_matches_reference_with_ties_missing_and_frozen() -> None:
    model = tiny_qwen2()
    model.model.norm.weight.requires_grad_(False)  # frozen: neither counted nor missing
    _backward(model)
    model.model.layers[1].mlp.up_proj.weight.grad = None  # trainable, no gradient
    g = model.model.layers[0].self_attn.q_proj.weight.grad
    g.view(-1)[:3] = torch.tensor([1e-6, 1e-8, -1e-6])  # exact ties at thresholds
    metrics = _compute(GradientSparsityMetrics(thresholds=THRESHOLDS), model)
    ref = _reference(_grads(model))
    assert ref["sparsity_at_0e+00"] > 0.1  # unused embedding rows: real zeros
    assert 0 < ref["missing_ratio"] < 1
    _assert_close(metrics, ref, "gradient/")
    assert not any(k.startswith("gradient/layer_") or "component" in k for k in metrics)


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_gpt2])
def test_per_layer_and_component_groups_match_reference(make) -> None:
    model = make()
    _backward(model)
    model.lm_head.weight.grad = None if make is tiny_qwen2 else model.lm_head.weight.grad
    cmap = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn"}
    computer = GradientSparsityMetrics(THRESHOLDS, per_layer=True, track_components=True,
                                       component_map=cmap)
    metrics = _compute(computer, model)
    grads = _grads(model)
    naming = ParameterNaming(list(grads), cmap)
    groups: dict[str, dict] = {}
    for name, g in grads.items():
        layer = naming.layer(name)
        if layer is not None:
            groups.setdefault(f"gradient/{layer}/", {})[name] = g
        groups.setdefault(f"gradient/component/{naming.component(name)}/", {})[name] = g
    assert "gradient/component/attn/norm_l2" in metrics or make is tiny_gpt2
    for prefix, members in groups.items():
        ref = _reference(members)
        _assert_close(metrics, ref, prefix, GROUP)
    group_keys = {k for k in metrics if k.count("/") > 1}
    expected = {p + k for p in groups for k in GROUP}
    assert group_keys == expected


def test_nonfinite_entries_are_counted_and_excluded() -> None:
    model = torch.nn.Linear(8, 4)
    model.weight.grad = torch.randn(4, 8)
    model.weight.grad[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    model.bias.grad = torch.zeros(4)
    metrics = _compute(GradientSparsityMetrics(THRESHOLDS), model)
    ref = _reference(_grads(model))
    assert ref["nonfinite_count"] == 3.0
    _assert_close(metrics, ref, "gradient/")
    assert all(math.isfinite(v) for v in metrics.values())


def test_bf16_gradients_match_upcast_reference() -> None:
    model = tiny_qwen2(dtype=torch.bfloat16)
    _backward(model)
    metrics = _compute(GradientSparsityMetrics(THRESHOLDS), model)
    ref = _reference(_grads(model))
    _assert_close(metrics, ref, "gradient/")


def test_sparse_embedding_gradient_equals_dense_statistics() -> None:
    def build(sparse: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(50, 6, sparse=sparse), torch.nn.Linear(6, 3))

    ids = torch.tensor([[1, 3, 3, 7], [7, 7, 2, 49]])  # duplicates are summed by coalesce
    results = {}
    for sparse in (True, False):
        model = build(sparse)
        model(ids).square().sum().backward()
        assert model[0].weight.grad.is_sparse == sparse
        computer = GradientSparsityMetrics(THRESHOLDS, track_components=True, histogram_samples=400)
        result = _compute(computer, model)
        results[sparse] = (result, result.histograms)
        if sparse:
            dense_grads = {n: p.grad.to_dense().double().numpy().reshape(-1)
                           for n, p in model.named_parameters()}
    sparse_metrics, sparse_hist = results[True]
    dense_metrics, dense_hist = results[False]
    ref = _reference(dense_grads)
    assert ref["sparsity_at_0e+00"] > 0.8  # 45 of 50 rows are implicit zeros
    _assert_close(sparse_metrics, ref, "gradient/")
    assert sparse_metrics.keys() == dense_metrics.keys()
    _assert_close(sparse_metrics, {k.removeprefix("gradient/"): v for k, v in
                                   dense_metrics.items()} | {"mean_abs": ref["mean_abs"]},
                  "gradient/", [k.removeprefix("gradient/") for k in dense_metrics])
    # the same positions are sampled, so the sparse lookup returns the dense values
    np.testing.assert_allclose(sparse_hist["gradient/abs_grad"], dense_hist["gradient/abs_grad"],
                               rtol=1e-6)


def test_no_gradients_returns_empty_and_logs_once(caplog) -> None:
    model = tiny_qwen2()
    computer = GradientSparsityMetrics()
    with caplog.at_level(logging.INFO, logger="grail.trainer.analysis.metrics.gradient"):
        assert _compute(computer, model) == {}
        assert _compute(computer, model) == {}
    assert len([r for r in caplog.records if "no parameter has a gradient" in r.message]) == 1
    assert computer.compute(context=None) == {}


def test_compute_changes_nothing_and_keeps_global_rng() -> None:
    model = tiny_qwen2()
    _backward(model)
    before, rng = state(model), torch.get_rng_state()
    computer = GradientSparsityMetrics(THRESHOLDS, per_layer=True, track_components=True,
                                       histogram_samples=1000)
    _compute(computer, model)
    assert_same_state(before, state(model))
    assert torch.equal(rng, torch.get_rng_state())


def test_histogram_is_reproducible_sized_and_drawn_from_the_gradients() -> None:
    model = tiny_qwen2()
    _backward(model)
    a, b = (GradientSparsityMetrics(histogram_samples=500) for _ in range(2))
    torch.manual_seed(123)
    ha = _compute(a, model).histograms["gradient/abs_grad"]
    torch.manual_seed(456)  # the global RNG plays no part
    hb = _compute(b, model).histograms["gradient/abs_grad"]
    assert ha.shape == (500,) and np.array_equal(ha, hb)
    all_abs = np.abs(np.concatenate([g for g in _grads(model).values()])).astype(np.float32)
    assert np.isin(ha, all_abs).all()
    c = GradientSparsityMetrics(histogram_samples=500, histogram_seed=1)
    assert not np.array_equal(_compute(c, model).histograms["gradient/abs_grad"], ha)
    off = _compute(GradientSparsityMetrics(), model)  # no histograms: a plain dict
    assert type(off) is dict and MetricResult.of(off).histograms == {}


def test_nonfinite_gradients_are_left_out_of_the_histogram_and_counted() -> None:
    """Histogram loggers reject NaN/Inf: the sample holds the finite |g| only, and
    ``histogram_nonfinite`` says how many were left out (every entry sampled here)."""
    model = tiny_qwen2()
    _backward(model)
    model.lm_head.weight.grad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -1e38])
    model.model.norm.weight.grad.view(-1)[0] = -float("inf")
    grads = np.concatenate([g for g in _grads(model).values()])
    computer = GradientSparsityMetrics(histogram_samples=grads.size)
    metrics = _compute(computer, model)
    hist = metrics.histograms["gradient/abs_grad"]
    assert metrics["gradient/histogram_nonfinite"] == 3.0 == float((~np.isfinite(grads)).sum())
    assert np.isfinite(hist).all()
    np.testing.assert_array_equal(np.sort(hist),
                                  np.sort(np.abs(grads[np.isfinite(grads)]).astype(np.float32)))
    assert "gradient/histogram_nonfinite" not in _compute(GradientSparsityMetrics(), model)


def test_histogram_positions_do_not_depend_on_which_gradients_exist() -> None:
    """Positions are drawn over every trainable entry (so every rank draws the same, whatever
    gradients it holds); those without a gradient are left out of the sample."""
    model = tiny_qwen2()
    _backward(model)
    full = _compute(GradientSparsityMetrics(histogram_samples=300), model)
    model.lm_head.weight.grad = None
    part = _compute(GradientSparsityMetrics(histogram_samples=300), model)
    names = [n for n, _ in model.named_parameters()]
    numels = [p.numel() for p in model.parameters()]
    head = names.index("lm_head.weight")
    start = sum(numels[:head])
    # the documented draw: sorted uniform positions from a generator seeded with the seed (0)
    pos = torch.randint(sum(numels), (300,), generator=torch.Generator().manual_seed(0)).sort()[0]
    in_head = ((pos >= start) & (pos < start + numels[head])).numpy()
    assert 0 < in_head.sum() < 300
    np.testing.assert_array_equal(part.histograms["gradient/abs_grad"],
                                  full.histograms["gradient/abs_grad"][~in_head])


def test_histogram_sample_takes_everything_when_small() -> None:
    tensors = [torch.arange(3.0), torch.arange(10.0, 15.0)]
    s = HistogramSample(100, [t.numel() for t in tensors], seed=0)
    for i, t in enumerate(tensors):
        s.fill(i, 0, t.numel(), lambda pos, t=t: t[pos])
    assert s.result().tolist() == [0, 1, 2, 10, 11, 12, 13, 14]
    # a shard holding positions 2..4 of the second tensor fills exactly those slots; slots
    # nobody filled are left out, not reported as zeros
    s = HistogramSample(100, [3, 5], seed=0)
    s.fill(1, 2, 3, lambda pos: pos.double() + 100)
    assert s.result().tolist() == [100, 101, 102]


def test_manager_reports_gradient_keys_and_histograms() -> None:
    model = tiny_qwen2()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    cfg = AnalysisConfig(interval=1, sparse_quality_enabled=False, gradient_enabled=True,
                         gradient_track_per_layer=True, histogram_samples=64)
    analyzer = ModelAnalysisManager.create(cfg)
    for step in range(2):
        _backward(model, seed=step)
        opt.step()
        metrics = analyzer.on_optimizer_step(model, optimizer=opt)
        opt.zero_grad()
    assert metrics["gradient/missing_ratio"] == 0.0
    assert "gradient/layer_1/norm_l2" in metrics
    assert analyzer.last_histograms["gradient/abs_grad"].shape == (64,)


def test_from_config() -> None:
    cfg = AnalysisConfig(gradient_enabled=True, gradient_thresholds=[1e-5], histogram_samples=7,
                         gradient_track_components=True, component_map={"q_proj": "attn"})
    c = GradientSparsityMetrics.from_config(cfg)
    assert (c.thresholds, c.per_layer, c.track_components, c.histogram_samples) == (
        [1e-5], False, True, 7)
    assert c.component_map == {"q_proj": "attn"}
    # gradients are read from the model: no optimizer needed (the Adam family needs one)
    assert c.requires_model() and not c.requires_optimizer() and not c.requires_inputs()
