"""SparseQualityMetrics against an independent reconstruction of the masked model."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from transformers import BatchEncoding

from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.core.stats import f32_floor
from grail.trainer.analysis.metrics import SparseQualityMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.ops.masks import mix_seed, random_keep_mask
from tests.conftest import tiny_qwen2

from ..reference import assert_same_state, state

# every test on the eager swap and on the compiled one (kernels.select_swap)
pytestmark = pytest.mark.usefixtures("kernel_path")


@torch.no_grad()
def _update(model, scale=2e-3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        d = torch.randn(p.shape, generator=gen) * scale
        d[torch.rand(p.shape, generator=gen) < 0.2] = 0
        p.add_(d.to(p.dtype))


def _setup(dtype=torch.float32, **kw):
    model = tiny_qwen2(dtype=dtype, **kw)
    snap = ParameterSnapshot(model)
    old = {n: t.clone() for n, t in snap.data.items()}
    _update(model)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    ctx = AnalysisContext(
        model=model, inputs={"input_ids": ids, "attention_mask": mask, "labels": ids}, step=7
    )
    return model, snap, old, ctx


def _reference_quality(model, old, keep, ids, mask, scale=None):
    """Copy the model, write W_old + masked delta, run both, compare in float64 numpy."""
    ref_model = copy.deepcopy(model).eval()
    full_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, p in ref_model.named_parameters():
            new = p.detach().float()
            o = old[n].float()
            if scale is None:
                value = torch.where(keep[n], new, o)
            else:
                value = torch.where(keep[n], o + (new - o) / scale, o)
            p.copy_(value.to(p.dtype))
        a = full_model(input_ids=ids, attention_mask=mask).logits[mask.bool()].double().numpy()
        b = ref_model(input_ids=ids, attention_mask=mask).logits[mask.bool()].double().numpy()

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(a), log_softmax(b)
    kl = np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0).mean()
    cos = ((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).mean()
    return {
        "kl": kl,
        "cosine": cos,
        "mse": ((a - b) ** 2).mean(),
        "top1_agree": (a.argmax(-1) == b.argmax(-1)).mean(),
    }


def _check(metrics, ref, suffix):
    assert metrics[f"sparse/kl_{suffix}"] == pytest.approx(ref["kl"], rel=2e-3, abs=1e-9)
    assert metrics[f"sparse/cosine_{suffix}"] == pytest.approx(ref["cosine"], rel=1e-6)
    assert metrics[f"sparse/mse_{suffix}"] == pytest.approx(ref["mse"], rel=2e-3, abs=1e-12)
    assert metrics[f"sparse/top1_agree_{suffix}"] == pytest.approx(ref["top1_agree"])


def test_matches_independent_reconstruction_magnitude_random_and_dare(kernel_path, monkeypatch):
    from grail.trainer.analysis import kernels

    swaps = []
    real = kernels.select_swap
    monkeypatch.setattr(kernels, "select_swap", lambda *a: swaps.append(real(*a)) or swaps[-1])
    model, snap, old, ctx = _setup()
    t = 1e-3
    computer = SparseQualityMetrics(thresholds=[t], rescale_random=True, seed=3)
    m = computer.compute(snap.compute_delta(ParameterSnapshot.live(model)), context=ctx)
    # apply, switch and undo of every parameter went through the compiled swap (or none did)
    n_params = len(list(model.parameters()))
    if kernel_path == "fused":
        assert len(swaps) == 3 * n_params and all(s is not None for s in swaps)
    else:
        assert not swaps
    ids, mask = ctx.inputs["input_ids"], ctx.inputs["attention_mask"]
    new = {n: p.detach() for n, p in model.named_parameters()}
    keep_mag = {n: (new[n] - old[n]).abs() > f32_floor(t) for n in new}
    total = sum(v.numel() for v in keep_mag.values())
    kept = sum(int(v.sum()) for v in keep_mag.values()) / total
    assert m["sparse/kept_ratio_at_1e-03"] == pytest.approx(kept, abs=0)
    assert m["sparse/unchanged_ratio_at_1e-03"] == pytest.approx(1 - kept)
    assert m["sparse/tokens"] == float(mask.sum())
    _check(m, _reference_quality(model, old, keep_mag, ids, mask), "at_1e-03")
    seed = mix_seed(3, 7)
    changed = sum(int((new[n] != old[n]).sum()) for n in new)
    prob = kept * total / changed  # equal budget: kept changes / changed entries
    keep_rand = {
        n: random_keep_mask(new[n].numel(), prob, seed, n, 0, "cpu").view(new[n].shape) for n in new
    }
    _check(m, _reference_quality(model, old, keep_rand, ids, mask), "at_1e-03_random")
    _check(m, _reference_quality(model, old, keep_rand, ids, mask, scale=prob), "at_1e-03_dare")
    assert m["sparse/nonfinite"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "mixed"])
def test_threshold_zero_is_exact_identity_even_with_dropout_in_train_mode(dtype):
    model, snap, _old, ctx = _setup(
        dtype=torch.float32 if dtype == "mixed" else dtype, attention_dropout=0.5
    )
    if dtype == "mixed":  # bf16 embedding, fp32 head: each parameter keeps its own dtype
        model.model.embed_tokens.to(torch.bfloat16)
        model.model.embed_tokens.register_forward_hook(lambda m, a, o: o.float())
        snap = ParameterSnapshot(model)
        _update(model)
    model.train()
    m = SparseQualityMetrics(thresholds=[0.0], include_random=False).compute(
        snap.compute_delta(ParameterSnapshot.live(model)), context=ctx
    )
    assert m["sparse/kl_at_0e+00"] == 0.0
    assert m["sparse/top1_agree_at_0e+00"] == 1.0
    assert m["sparse/mse_at_0e+00"] == 0.0
    assert model.training


def test_invariants_when_a_forward_fails_halfway():
    model, snap, _old, ctx = _setup(attention_dropout=0.1)
    model.train()
    model.model.layers[1].eval()
    snap_before = {n: t.clone() for n, t in snap.data.items()}
    model(**{k: v for k, v in ctx.inputs.items()}).loss.backward()
    before = state(model)
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    calls = {"n": 0}

    def fail_on_third(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")

    handle = model.model.layers[1].register_forward_hook(fail_on_third)
    with pytest.raises(RuntimeError, match="injected"):
        SparseQualityMetrics(thresholds=[1e-3]).compute(
            snap.compute_delta(ParameterSnapshot.live(model)), context=ctx
        )
    handle.remove()
    assert_same_state(before, state(model))
    assert all(p.requires_grad for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state())
    for n, t in snap.data.items():
        assert torch.equal(t, snap_before[n])


def test_reproducible_and_seed_dependent():
    model, snap, _old, ctx = _setup()
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    a = SparseQualityMetrics(thresholds=[1e-3], seed=1).compute(delta, context=ctx)
    b = SparseQualityMetrics(thresholds=[1e-3], seed=1).compute(delta, context=ctx)
    c = SparseQualityMetrics(thresholds=[1e-3], seed=2).compute(delta, context=ctx)
    assert a == b
    assert a["sparse/kl_at_1e-03_random"] != c["sparse/kl_at_1e-03_random"]
    assert a["sparse/kl_at_1e-03"] == c["sparse/kl_at_1e-03"]


@pytest.mark.parametrize("form", ["dict", "batch_encoding", "tensor", "tuple"])
def test_input_forms(form):
    model, snap, _old, ctx = _setup()
    ids = ctx.inputs["input_ids"]
    inputs = {
        "dict": {"input_ids": ids, "advantages": torch.ones(3), "completion_mask": ids},
        "batch_encoding": BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
        "tensor": ids,
        "tuple": (ids,),
    }[form]
    ctx.inputs = inputs
    m = SparseQualityMetrics(thresholds=[0.0]).compute(
        snap.compute_delta(ParameterSnapshot.live(model)), context=ctx
    )
    assert m["sparse/kl_at_0e+00"] == 0.0
    assert m["sparse/tokens"] == float(ids.numel())


def test_output_forms_and_output_fn():
    torch.manual_seed(0)

    class TupleOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.head = torch.nn.Linear(8, 20)

        def forward(self, input_ids):
            return (self.head(self.emb(input_ids)), "extra")

    for model, fn in ((TupleOut(), None), (TupleOut(), lambda out: out[0] * 1.0)):
        snap = ParameterSnapshot(model)
        _update(model)
        ctx = AnalysisContext(model=model, inputs=torch.randint(0, 20, (2, 5)), step=1)
        m = SparseQualityMetrics(thresholds=[0.0, 1e-2], output_fn=fn).compute(
            snap.compute_delta(ParameterSnapshot.live(model)), context=ctx
        )
        assert m["sparse/kl_at_0e+00"] == 0.0 and m["sparse/kl_at_1e-02"] > 0.0


def test_missing_or_unusable_inputs_return_empty_and_log_once(caplog):
    """No inputs at a step is normal (INFO, once); inputs that were passed but cannot be used
    are the caller's mistake (a warning, once per reason)."""
    model, snap, _old, ctx = _setup()
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    computer = SparseQualityMetrics()
    caplog.set_level(logging.INFO)
    for inputs in (None, None, "text", {"labels": torch.ones(2)}, "text", [[1, 2]]):
        ctx.inputs = inputs
        assert computer.compute(delta, context=ctx) == {}
    said = [(r.levelno, r.getMessage()) for r in caplog.records
            if "sparse: forward-pass metrics skipped" in r.getMessage()]
    assert [level for level, _ in said] == [logging.INFO] + [logging.WARNING] * 3
    assert "no inputs were passed" in said[0][1]
    assert "unsupported inputs type str" in said[1][1]
    assert "keys: ['labels']" in said[2][1] and "inputs list holds no tensor" in said[3][1]


def test_keep_ratio_targets_land_within_one_percent():
    model, snap, _old, ctx = _setup()
    ratios = [0.01, 0.1, 0.5]
    m = SparseQualityMetrics(thresholds=[], keep_ratios=ratios, include_random=False).compute(
        snap.compute_delta(ParameterSnapshot.live(model)), context=ctx
    )
    for r in ratios:
        assert m[f"sparse/kept_ratio_at_keep_{r:g}"] == pytest.approx(r, rel=0.01)
        assert m[f"sparse/threshold_at_keep_{r:g}"] > 0
    kls = [m[f"sparse/kl_at_keep_{r:g}"] for r in ratios]
    assert kls[0] > kls[1] > kls[2] >= 0


def test_dare_keys_only_when_enabled_and_nonfinite_logits_reported():
    model, snap, _old, ctx = _setup()
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    m = SparseQualityMetrics(thresholds=[1e-3]).compute(delta, context=ctx)
    assert not any(k.endswith("_dare") for k in m)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    snap2 = ParameterSnapshot(model)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = 0.0  # the update removes the NaN: the old model is broken
    m = SparseQualityMetrics(thresholds=[1e-3], include_random=False).compute(
        snap2.compute_delta(ParameterSnapshot.live(model)), context=ctx
    )
    # the magnitude mask keeps the NaN -> 0 change (|delta| is NaN), so only finite rows remain
    assert m["sparse/nonfinite"] == 0.0
    model2, snap3, _, ctx2 = _setup()
    with torch.no_grad():
        model2.lm_head.weight[3, 0] = float("inf")
    m = SparseQualityMetrics(thresholds=[1e-3], include_random=False).compute(
        snap3.compute_delta(ParameterSnapshot.live(model2)), context=ctx2
    )
    assert m["sparse/nonfinite"] > 0
    assert m["sparse/top1_agree_at_1e-03"] != 1.0 or np.isnan(m["sparse/top1_agree_at_1e-03"])
