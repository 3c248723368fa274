"""AdamSignDescentMetrics against float64 references from the optimizer state and the step taken."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.core.naming import ParameterNaming
from grail.trainer.analysis.metrics.adam_sign import AdamSignDescentMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext, MetricComputer
from tests.conftest import tiny_qwen2

from ..reference import assert_same_state, state

LOGGER = "grail.trainer.analysis.metrics.adam_sign"

pytestmark = pytest.mark.usefixtures("kernel_path")


def _backward(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 12), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 4) -> None:
    """``steps`` optimizer steps on random batches; the last gradients are left in place."""
    for s in range(steps):
        opt.zero_grad()
        _backward(model, seed=s)
        opt.step()


def _groups(model: torch.nn.Module, lr: float = 1e-2) -> list[dict]:
    """Two param groups with different lr, betas and eps, so per-group handling is exercised."""
    emb = [p for n, p in model.named_parameters() if "embed" in n]
    rest = [p for n, p in model.named_parameters() if "embed" not in n]
    return [
        {"params": emb, "lr": lr * 3, "betas": (0.8, 0.99), "eps": 1e-6},
        {"params": rest, "lr": lr},
    ]


def _compute(computer: AdamSignDescentMetrics, model, opt) -> dict[str, float]:
    with torch.no_grad():
        return computer.compute(context=AnalysisContext(model=model, optimizer=opt, step=1))


def _per_param(model, opt) -> dict[str, dict[str, np.ndarray]]:
    """float64 u, sign-adjusted gradient, m, weight and lr of every parameter with Adam state."""
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            name = next(n for n, q in model.named_parameters() if q is p)
            b1, b2 = group["betas"]
            t = float(st["step"])
            m = st["exp_avg"].double().numpy().ravel()
            key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
            v = st[key].double().numpy().ravel()
            u = (m / (1 - b1**t)) / (np.sqrt(v) / np.sqrt(1 - b2**t) + group["eps"])
            g = p.grad.to_dense().double().numpy().ravel() if p.grad is not None else None
            if g is not None and group.get("maximize"):
                g = -g
            out[name] = {"u": u, "g": g, "m": m, "w": p.detach().double().numpy().ravel(),
                         "lr": group["lr"]}
    order = list(dict(model.named_parameters()))
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0])))


def _reference(params: dict[str, dict], tol: float = 0.1) -> tuple[dict[str, float], dict]:
    u = np.concatenate([d["u"] for d in params.values()])
    fin = np.isfinite(u)
    au = np.abs(u[fin])
    pairs = [np.sign(d["g"]) * np.sign(d["m"]) for d in params.values() if d["g"] is not None]
    s = np.concatenate(pairs) if pairs else np.zeros(0)
    s = s[np.isfinite(s) & (s != 0)]
    lr_u_sq = sum(float(((d["lr"] * d["u"]) ** 2)[np.isfinite(d["u"])].sum())
                  for d in params.values())
    w_sq = sum(float((d["w"] ** 2).sum()) for d in params.values())
    ref = {
        "mean_abs_u": float(au.mean()),
        "frac_near_one": float(((au >= 1 - tol) & (au <= 1 + tol)).sum() / u.size),
        "frac_small": float((au < 0.1).sum() / u.size),
        "update_to_weight": float(np.sqrt(lr_u_sq / w_sq)),
        "nonfinite_count": float((~fin).sum()),
        "num_params": float(u.size),
    }
    if s.size:
        ref["sign_agreement"] = float((s > 0).sum() / s.size)
    # entries whose float32 and float64 u could fall on different sides of a boundary
    slack = {
        "frac_near_one": sum(int((np.abs(au - b) <= 1e-5 * b).sum()) for b in (1 - tol, 1 + tol)),
        "frac_small": int((np.abs(au - 0.1) <= 1e-6).sum()),
    }
    return ref, {k: v / u.size for k, v in slack.items()}


def _assert_matches(got: dict[str, float], ref: dict[str, float], slack: dict, prefix: str) -> None:
    assert {k.removeprefix(prefix) for k in got if k.startswith(prefix) and
            k.count("/") == prefix.count("/")} == set(ref)
    for k, v in ref.items():
        key = prefix + k
        if k in slack:
            assert abs(got[key] - v) <= slack[k] + 1e-12, key
        elif k in ("sign_agreement", "nonfinite_count", "num_params"):
            assert got[key] == pytest.approx(v, abs=1e-12), key
        else:
            assert got[key] == pytest.approx(v, rel=1e-6), key


CASES = [
    pytest.param(cls, {"foreach": fe, "amsgrad": ams}, id=f"{cls.__name__}-foreach{fe}-ams{ams}")
    for cls in (torch.optim.Adam, torch.optim.AdamW)
    for fe in (False, True)
    for ams in (False, True)
] + [
    pytest.param(torch.optim.Adam, {"fused": True}, id="Adam-fused"),
    pytest.param(torch.optim.AdamW, {"fused": True, "amsgrad": True}, id="AdamW-fused-ams"),
]


@pytest.mark.parametrize(("cls", "kwargs"), CASES)
def test_matches_reference_from_state(cls, kwargs) -> None:
    model = tiny_qwen2()
    opt = cls(_groups(model), lr=1e-2, weight_decay=0.01, **kwargs)
    _train(model, opt)
    metrics = _compute(AdamSignDescentMetrics(), model, opt)
    ref, slack = _reference(_per_param(model, opt))
    assert 0.01 < ref["frac_near_one"] < 0.95 and 0.01 < ref["frac_small"] < 0.95  # u spreads
    assert 0.5 < ref["sign_agreement"] < 1.0
    _assert_matches(metrics, ref, slack, "adam_sign/")


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.Adam, {"foreach": False, "weight_decay": 0.01}),
        (torch.optim.AdamW, {"foreach": True, "amsgrad": True, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"fused": True, "weight_decay": 0.1}),
    ],
)
def test_u_is_the_step_adam_took(cls, kwargs) -> None:
    """Independent of the state formula: ``-lr * u`` is the weight change of the last step
    (after removing AdamW's decoupled decay)."""
    model = tiny_qwen2()
    opt = cls(_groups(model), lr=1e-2, **kwargs)
    _train(model, opt, steps=3)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    _backward(model, seed=99)
    opt.step()
    n_total = sum(p.numel() for p in model.parameters())
    computer = AdamSignDescentMetrics(histogram_samples=n_total)
    metrics = _compute(computer, model, opt)
    decoupled = cls is torch.optim.AdamW
    steps, w_sq = [], 0.0
    for group in opt.param_groups:
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            w0, w1 = before[name], p.detach().double()
            step = (w0 * (1 - lr * wd) if decoupled else w0) - w1
            steps.append((name, step.numpy().ravel(), lr, np.abs(w0.numpy().ravel())))
            w_sq += float((w1**2).sum())
    order = list(dict(model.named_parameters()))
    steps.sort(key=lambda s: order.index(s[0]))
    lr_u = np.concatenate([s for _, s, _, _ in steps])
    assert metrics["adam_sign/update_to_weight"] == pytest.approx(
        np.sqrt((lr_u**2).sum() / w_sq), rel=1e-4)
    # every u against the step, within float32 rounding of the weights
    u_step = np.concatenate([s / lr for _, s, lr, _ in steps])
    atol = np.concatenate([8 * 2**-24 * (w + 1e-3) / lr for _, _, lr, w in steps])
    u_hist = metrics.histograms["adam_sign/u"].astype(np.float64)
    assert u_hist.shape == u_step.shape
    assert np.all(np.abs(u_hist - u_step) <= atol + 1e-6 * np.abs(u_step))


def test_component_groups_match_reference() -> None:
    model = tiny_qwen2()
    opt = torch.optim.AdamW(_groups(model), lr=1e-2)
    _train(model, opt)
    cmap = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn"}
    metrics = _compute(AdamSignDescentMetrics(track_components=True, component_map=cmap), model,
                       opt)
    params = _per_param(model, opt)
    naming = ParameterNaming([n for n, _ in model.named_parameters()], cmap)
    comps: dict[str, dict] = {}
    for name, d in params.items():
        comps.setdefault(naming.component(name), {})[name] = d
    assert "attn" in comps and "q_proj" not in comps
    for comp, members in comps.items():
        ref, slack = _reference(members)
        for k in ("nonfinite_count", "num_params"):
            ref.pop(k)
        _assert_matches(metrics, ref, slack, f"adam_sign/component/{comp}/")


def test_tolerance_changes_the_sign_descent_band() -> None:
    model = tiny_qwen2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt)
    metrics = _compute(AdamSignDescentMetrics(tolerance=0.3), model, opt)
    ref, slack = _reference(_per_param(model, opt), tol=0.3)
    assert ref["frac_near_one"] != pytest.approx(_reference(_per_param(model, opt))[0]
                                                 ["frac_near_one"])
    _assert_matches(metrics, ref, slack, "adam_sign/")


def test_maximize_compares_the_negated_gradient() -> None:
    model = tiny_qwen2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, maximize=True)
    _train(model, opt)
    metrics = _compute(AdamSignDescentMetrics(), model, opt)
    params = _per_param(model, opt)
    ref, slack = _reference(params)
    assert ref["sign_agreement"] > 0.5
    _assert_matches(metrics, ref, slack, "adam_sign/")


def test_nonfinite_u_is_counted_and_excluded() -> None:
    model = tiny_qwen2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, steps=2)
    opt.zero_grad()
    _backward(model, seed=7)
    model.lm_head.weight.grad.view(-1)[:2] = float("nan")  # m and v become NaN there
    opt.step()
    metrics = _compute(AdamSignDescentMetrics(), model, opt)
    ref, slack = _reference(_per_param(model, opt))
    assert ref["nonfinite_count"] == 2.0
    ref.pop("update_to_weight")  # the weights are NaN there too
    assert np.isnan(metrics.pop("adam_sign/update_to_weight"))
    _assert_matches(metrics, ref, slack, "adam_sign/")


def test_nonfinite_u_are_left_out_of_the_histogram_and_counted() -> None:
    """Histogram loggers reject NaN/Inf: the sample holds the finite u only, and
    ``histogram_nonfinite`` says how many were left out (every entry sampled here)."""
    model = tiny_qwen2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, steps=2)
    state = opt.state[model.lm_head.weight]
    state["exp_avg"].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    n_total = sum(p.numel() for p in model.parameters())
    computer = AdamSignDescentMetrics(histogram_samples=n_total)
    metrics = _compute(computer, model, opt)
    u = np.concatenate([d["u"] for d in _per_param(model, opt).values()])
    hist = metrics.histograms["adam_sign/u"]
    assert metrics["adam_sign/histogram_nonfinite"] == 3.0 == float((~np.isfinite(u)).sum())
    assert np.isfinite(hist).all() and hist.size == n_total - 3
    np.testing.assert_allclose(np.sort(hist), np.sort(u[np.isfinite(u)]), rtol=1e-5, atol=1e-7)
    # the key is there whenever histograms are on
    assert "adam_sign/histogram_nonfinite" in _compute(
        AdamSignDescentMetrics(histogram_samples=8), model, opt)
    assert "adam_sign/histogram_nonfinite" not in _compute(AdamSignDescentMetrics(), model, opt)


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_a_nonfinite_weight_gives_nan_update_to_weight(bad) -> None:
    """0 is reserved for an all-zero weight; an Inf weight must not read as "no update"."""
    model = tiny_qwen2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, steps=2)
    with torch.no_grad():
        model.lm_head.weight.view(-1)[0] = bad
    assert math.isnan(_compute(AdamSignDescentMetrics(), model, opt)["adam_sign/update_to_weight"])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert _compute(AdamSignDescentMetrics(), model, opt)["adam_sign/update_to_weight"] == 0.0


def test_bf16_state_matches_upcast_reference() -> None:
    model = tiny_qwen2(dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    assert opt.state[model.lm_head.weight]["exp_avg"].dtype == torch.bfloat16
    metrics = _compute(AdamSignDescentMetrics(), model, opt)
    ref, slack = _reference(_per_param(model, opt))
    _assert_matches(metrics, ref, slack, "adam_sign/")


def test_sparse_adam_with_sparse_embedding_gradients() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(40, 6, sparse=True))
    opt = torch.optim.SparseAdam(model.parameters(), lr=1e-2)
    for s in range(3):
        opt.zero_grad()
        ids = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(s))
        model(ids).sin().sum().backward()
        opt.step()
    assert model[0].weight.grad.is_sparse
    metrics = _compute(AdamSignDescentMetrics(), model, opt)
    ref, slack = _reference(_per_param(model, opt))
    assert 0.0 < ref["sign_agreement"] < 1.0 or ref["sign_agreement"] == 1.0
    _assert_matches(metrics, ref, slack, "adam_sign/")


def test_no_gradients_leaves_only_sign_agreement_undefined() -> None:
    model = tiny_qwen2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, steps=2)
    opt.zero_grad(set_to_none=True)
    metrics = _compute(AdamSignDescentMetrics(), model, opt)
    ref, slack = _reference(_per_param(model, opt))
    assert "sign_agreement" not in ref
    assert math.isnan(metrics.pop("adam_sign/sign_agreement"))  # NaN keeps the key stable
    _assert_matches(metrics, ref, slack, "adam_sign/")


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adafactor(ps, lr=0.01),
    lambda ps: None,
], ids=["sgd", "adafactor", "none"])
def test_without_adam_state_returns_empty_and_logs_once(make_opt, caplog) -> None:
    model = tiny_qwen2()
    opt = make_opt(model.parameters())
    if opt is not None:
        _train(model, opt, steps=1)
    computer = AdamSignDescentMetrics(histogram_samples=10)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert _compute(computer, model, opt) == {}
        assert _compute(computer, model, opt) == {}
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1
    assert caplog.records[0].levelno == logging.INFO
    assert type(_compute(computer, model, opt)) is dict  # skipped: no histograms either


def test_compute_changes_nothing_and_keeps_global_rng() -> None:
    model = tiny_qwen2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    _train(model, opt)
    opt_state = {f"{i}:{k}": v.clone() for i, st in enumerate(opt.state.values())
                 for k, v in st.items()}
    before, rng = state(model), torch.get_rng_state()
    a = _compute(AdamSignDescentMetrics(track_components=True, histogram_samples=300), model, opt)
    assert_same_state(before, state(model))
    after = {f"{i}:{k}": v for i, st in enumerate(opt.state.values()) for k, v in st.items()}
    assert_same_state(opt_state, after)
    assert torch.equal(rng, torch.get_rng_state())
    torch.manual_seed(5)
    b = _compute(AdamSignDescentMetrics(histogram_samples=300), model, opt)
    assert a.histograms["adam_sign/u"].shape == (300,)
    assert np.array_equal(a.histograms["adam_sign/u"], b.histograms["adam_sign/u"])


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("adam_first", [False, True], ids=["gradient-first", "adam-first"])
def test_gradient_pass_shared_with_adam_gives_the_same_numbers(
    kernel_path, maximize, adam_first, monkeypatch
) -> None:
    """Two computers holding one OptimizerPass read each gradient once (fused path only): the
    numbers equal those of the two computers run apart, the Adam computer uses the joint rows
    (its own kernel runs only for what the pass did not cover), whichever computer runs first,
    and each row is used once. Neither computer refers to the other: the rows travel through
    the measurement's context."""
    from grail.trainer.analysis import kernels
    from grail.trainer.analysis.metrics.gradient import GradientSparsityMetrics
    from grail.trainer.analysis.metrics.optimizer_pass import OptimizerPass

    model = tiny_qwen2()
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, maximize=maximize)
    _train(model, opt)
    for p in model.model.layers[0].parameters():
        p.grad = None  # Adam state but no gradient: the Adam computer's own eager path

    calls = {"adam": 0}
    adam_fast = kernels.adam._ADAM_FAST

    class Counting:
        def __call__(self, *args):
            calls["adam"] += 1
            return adam_fast(*args)

        def ready(self, *args):
            return adam_fast.ready(*args)

    monkeypatch.setattr(kernels.adam, "_ADAM_FAST", Counting())
    apart = {}
    for computer in (GradientSparsityMetrics(per_layer=True),
                     AdamSignDescentMetrics(track_components=True)):
        apart.update(_compute(computer, model, opt))
    calls_apart, calls["adam"] = calls["adam"], 0
    shared = OptimizerPass.build([0.0, 1e-8, 1e-6], tolerance=0.1, trainable_only=False)
    gradient = GradientSparsityMetrics(per_layer=True, optimizer_pass=shared)
    adam = AdamSignDescentMetrics(track_components=True, optimizer_pass=shared)
    for computer in (gradient, adam):
        assert not any(isinstance(v, MetricComputer) for v in vars(computer).values())
    ctx = AnalysisContext(model=model, optimizer=opt, step=1)
    joint = {}
    with torch.no_grad():
        for computer in (adam, gradient) if adam_first else (gradient, adam):
            if computer is adam:
                handed_over = len(shared.rows(ctx).adam)  # computed by whoever ran first
            joint.update(computer.compute(context=ctx))
    if kernel_path == "fused":
        assert handed_over > 0 and calls["adam"] < calls_apart
    else:
        assert handed_over == 0 and calls["adam"] == calls_apart == 0
    rows = shared.rows(ctx)  # the same object for the whole measurement ...
    assert rows.adam == {} and rows.moments == {}  # ... and every row was taken once
    assert joint.keys() == apart.keys()
    for k, v in apart.items():
        assert joint[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


def test_the_shared_pass_is_declared_by_the_config() -> None:
    """create() gives both families equal OptimizerPass declarations when both and the kernels
    are on, and none otherwise."""
    from grail.trainer.analysis.metrics.optimizer_pass import OptimizerPass

    both = AnalysisConfig(gradient_enabled=True, adam_sign_enabled=True,
                          gradient_thresholds=[1e-5], adam_sign_tolerance=0.2)
    gradient, adam = ModelAnalysisManager.create(both).computers[1:3]
    assert gradient.optimizer_pass == adam.optimizer_pass == OptimizerPass.build(
        [1e-5], tolerance=0.2, trainable_only=False)
    for cfg in (AnalysisConfig(gradient_enabled=True, adam_sign_enabled=True,
                               fused_kernels=False),
                AnalysisConfig(gradient_enabled=True)):
        assert all(getattr(c, "optimizer_pass", None) is None
                   for c in ModelAnalysisManager.create(cfg).computers)


def test_manager_runs_both_families_and_skips_adam_for_sgd(caplog) -> None:
    cfg = AnalysisConfig(interval=1, sparse_quality_enabled=False, gradient_enabled=True,
                         adam_sign_enabled=True, adam_sign_track_components=True,
                         histogram_samples=32)
    for make, has_adam in ((torch.optim.AdamW, True), (torch.optim.SGD, False)):
        model = tiny_qwen2()
        opt = make(model.parameters(), lr=1e-2)
        analyzer = ModelAnalysisManager.create(cfg)
        with caplog.at_level(logging.WARNING):
            for step in range(2):
                opt.zero_grad()
                _backward(model, seed=step)
                opt.step()
                metrics = analyzer.on_optimizer_step(model, optimizer=opt)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert "gradient/norm_l2" in metrics
        assert ("adam_sign/frac_near_one" in metrics) == has_adam
        assert ("adam_sign/u" in analyzer.last_histograms) == has_adam
        assert analyzer.last_histograms["gradient/abs_grad"].shape == (32,)


def test_from_config() -> None:
    cfg = AnalysisConfig(adam_sign_enabled=True, adam_sign_tolerance=0.2, trainable_only=True,
                         adam_sign_track_components=True, histogram_samples=9)
    c = AdamSignDescentMetrics.from_config(cfg)
    assert (c.tolerance, c.track_components, c.histogram_samples, c.trainable_only) == (
        0.2, True, 9, True)
    assert c.requires_model() and c.requires_optimizer() and not c.requires_inputs()


# --- two processes (gloo): sharded and replicated models give the one-process numbers ---------
def _dist_worker(mode: str, rank: int, world: int, port: int, out: str) -> None:
    """One rank: three AdamW steps on a tiny Qwen2, then both computers with histograms."""
    import json

    from grail.trainer.analysis.metrics.gradient import GradientSparsityMetrics

    from ..ranks import join_group, parallelize

    join_group(rank, world, port)
    model = tiny_qwen2(vocab=131, hidden=32, layers=2)  # 131 rows: uneven shards
    train = parallelize(model, mode)
    opt = torch.optim.AdamW(train.parameters(), lr=1e-2, foreach=False)
    for step in range(3):
        opt.zero_grad()
        ids = torch.randint(0, 131, (2, 12), generator=torch.Generator().manual_seed(step))
        train(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    metrics, hists = {}, {}
    for computer in (GradientSparsityMetrics(per_layer=True, track_components=True,
                                             histogram_samples=64),
                     AdamSignDescentMetrics(track_components=True, histogram_samples=64)):
        result = _compute(computer, train, opt)
        metrics.update(result)
        hists.update({k: v.tolist() for k, v in result.histograms.items()})
    with open(out, "w") as f:
        json.dump({"metrics": metrics, "hists": hists}, f)
    from ..ranks import leave_group

    leave_group(world)


def _spawn(mode: str, world: int, tmp_path) -> list[dict]:
    import json

    from ..ranks import run_ranks

    outs = [tmp_path / f"{mode}-{r}.json" for r in range(world)]
    done = run_ranks("tests.unit.trainer.analysis.metrics.test_adam_sign:_dist_worker", world,
                     lambda r, port: [mode, r, world, port, str(outs[r])], 240, mode)
    for code, log in done:
        assert code == 0, log[-3000:]
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_and_ddp_ranks_equal_one_process_including_histograms(tmp_path) -> None:
    (single,) = _spawn("single", 1, tmp_path)
    assert len(single["hists"]["adam_sign/u"]) == 64 and "gradient/layer_1/norm_l2" in (
        single["metrics"])
    for mode in ("fsdp", "ddp"):
        for rank, got in enumerate(_spawn(mode, 2, tmp_path)):
            where = f"{mode} rank {rank}"
            assert got["metrics"].keys() == single["metrics"].keys(), where
            for k, want in single["metrics"].items():
                exact = any(s in k for s in ("sparsity", "ratio", "count", "num_params", "frac"))
                tol = {"abs": 1e-12} if exact else {"rel": 1e-5, "abs": 1e-9}
                assert got["metrics"][k] == pytest.approx(want, **tol), (where, k)
            for k, want in single["hists"].items():
                np.testing.assert_allclose(got["hists"][k], want, rtol=1e-5, err_msg=where)
