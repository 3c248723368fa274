"""LowRankMetrics against float64 numpy SVDs and an independently patched copy of the model."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from grail.trainer.analysis.config import AnalysisConfig
from grail.trainer.analysis.core.distributed import ShardInfo
from grail.trainer.analysis.core.naming import ParameterNaming
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.manager import ModelAnalysisManager
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.metrics.low_rank import LowRankMetrics, low_rank_targets
from grail.trainer.analysis.metrics.registry import build_computers
from tests.conftest import tiny_gpt2, tiny_qwen2

from ..reference import assert_same_state, state

# every test with eager and with compiled comparisons
pytestmark = pytest.mark.usefixtures("kernel_path")

RANKS = [1, 2, 4]
QWEN_MATRICES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


@torch.no_grad()
def _dense_update(model: nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        # a decaying spectrum, like real fine-tuning updates, plus dense noise
        d = torch.randn(p.shape, generator=gen) * scale
        if p.dim() == 2:
            u = torch.randn(p.shape[0], 3, generator=gen)
            v = torch.randn(3, p.shape[1], generator=gen)
            d = d * 0.3 + (u * torch.tensor([1.0, 0.5, 0.25])) @ v * scale
        p.add_(d.to(p.dtype))


def _setup(update=_dense_update, dtype=torch.float32):
    model = tiny_qwen2(dtype=dtype)
    snap = ParameterSnapshot(model)
    old = {n: t.clone() for n, t in snap.data.items()}
    update(model)
    ctx = AnalysisContext(model=model, inputs=_inputs(), step=3)
    return model, snap.compute_delta(ParameterSnapshot.live(model)), old, ctx


def _matrices(model: nn.Module, old: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float64 deltas of the matrices the analysis must pick for a Qwen2 model."""
    out = {}
    for n, p in model.named_parameters():
        if p.dim() == 2 and n.split(".")[-2] in QWEN_MATRICES:
            out[n] = p.detach().double().numpy() - old[n].double().numpy()
    return out


def _kl_top1(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    def logsm(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsm(a), logsm(b)
    kl = np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0).mean()
    return float(kl), float((a.argmax(-1) == b.argmax(-1)).mean())


def _reference_forward(model: nn.Module, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of a deep copy whose listed weights are replaced (float64 values, cast down)."""
    ref = copy.deepcopy(model).eval()
    inputs = _inputs()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in weights:
                p.copy_(torch.from_numpy(weights[n]).to(p.dtype))
        mask = inputs["attention_mask"].bool()
        logits = ref(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return logits[mask].double().numpy()


def test_targets_skip_embeddings_and_heads_by_module_type() -> None:
    model, delta, _, _ = _setup()
    names = low_rank_targets(delta, model)
    assert {n.split(".")[-2] for n in names} == QWEN_MATRICES and len(names) == 14
    assert low_rank_targets(delta, None) == names  # offline name rule agrees
    every = low_rank_targets(delta, model, include_embeddings=True)
    assert set(every) - set(names) == {"model.embed_tokens.weight", "lm_head.weight"}

    gpt = tiny_gpt2()  # tied head: lm_head.weight is transformer.wte.weight
    gdelta = ParameterSnapshot(gpt).compute_delta(ParameterSnapshot.live(gpt))
    gnames = low_rank_targets(gdelta, gpt)
    assert not any("wte" in n or "wpe" in n for n in gnames)
    assert "transformer.h.0.attn.c_attn.weight" in gnames  # Conv1D counts as Linear-like
    assert low_rank_targets(gdelta, None) == gnames

    class Odd(nn.Module):  # a head named "out", found through get_output_embeddings
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.mid = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10)

        def get_output_embeddings(self) -> nn.Module:
            return self.out

    odd = Odd()
    odelta = ParameterSnapshot(odd).compute_delta(ParameterSnapshot.live(odd))
    assert low_rank_targets(odelta, odd) == ["mid.weight"]


def test_spectrum_keys_match_numpy_reference() -> None:
    model, delta, old, ctx = _setup()
    m = LowRankMetrics(ranks=RANKS, track_components=True).compute(delta, context=ctx)
    mats = _matrices(model, old)
    naming = ParameterNaming(delta.names)

    def reference(names: list[str]) -> dict[str, float]:
        w = sum((mats[n] ** 2).sum() for n in names)
        size = sum(mats[n].size for n in names)
        out = {f"param_ratio_at_r{r}": sum(r * sum(mats[n].shape) for n in names) / size
               for r in RANKS}
        for r in RANKS:
            out[f"energy_at_r{r}"] = 0.0
        out.update(stable_rank=0.0, effective_rank=0.0, **{"rank_for_energy_0.9": 0.0})
        for n in names:
            sq = np.linalg.svd(mats[n], compute_uv=False) ** 2
            e = sq.sum()
            p = sq / e
            for r in RANKS:
                out[f"energy_at_r{r}"] += sq[:r].sum() / w
            out["stable_rank"] += e / sq[0] * e / w
            out["effective_rank"] += np.exp(-(p * np.log(p)).sum()) * e / w
            out["rank_for_energy_0.9"] += (np.argmax(np.cumsum(p) >= 0.9) + 1) * e / w
        return out

    for k, v in reference(list(mats)).items():
        assert m[f"lowrank/{k}"] == pytest.approx(v, rel=1e-5), k
    for comp in ("q_proj", "down_proj"):
        names = [n for n in mats if naming.component(n) == comp]
        for k, v in reference(names).items():
            assert m[f"lowrank/component/{comp}/{k}"] == pytest.approx(v, rel=1e-5), (comp, k)
    assert m["lowrank/num_matrices"] == 14 and m["lowrank/randomized_matrices"] == 0
    assert m["lowrank/nonfinite_matrices"] == 0


def test_planted_rank2_update_is_reproduced_at_rank2() -> None:
    @torch.no_grad()
    def planted(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(2)
        for n, p in model.named_parameters():
            if p.dim() == 2 and n.split(".")[-2] in QWEN_MATRICES:
                u = torch.randn(p.shape[0], 2, generator=gen) * torch.tensor([0.3, 0.1])
                p.add_(u @ torch.randn(2, p.shape[1], generator=gen))
            else:  # embeddings, head, norms, biases: a dense update they keep in full
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)

    _, delta, _, ctx = _setup(planted)
    m = LowRankMetrics(ranks=RANKS).compute(delta, context=ctx)
    assert m["lowrank/energy_at_r2"] == pytest.approx(1.0, abs=1e-5)
    assert m["lowrank/energy_at_r1"] < 0.99
    assert m["lowrank/stable_rank"] < 2
    # ~0: only float32 rounding of W_old + U_2 S_2 V_2^T against W_new is left
    assert m["lowrank/kl_at_r2"] < 1e-6 and m["lowrank/top1_agree_at_r2"] == 1.0
    assert m["lowrank/kl_at_r4"] < 1e-6
    assert m["lowrank/kl_at_r1"] > 1e-3


def test_output_quality_matches_an_independently_patched_model() -> None:
    model, delta, old, ctx = _setup()
    m = LowRankMetrics(ranks=RANKS).compute(delta, context=ctx)
    mats = _matrices(model, old)
    full = _reference_forward(model, {})
    total = sum(d.size for d in mats.values())
    for r in RANKS:
        trunc = {}
        for n, d in mats.items():
            u, s, vh = np.linalg.svd(d, full_matrices=False)
            trunc[n] = old[n].double().numpy() + (u[:, :r] * s[:r]) @ vh[:r]
        kl, top1 = _kl_top1(full, _reference_forward(model, trunc))
        assert m[f"lowrank/kl_at_r{r}"] == pytest.approx(kl, rel=1e-3, abs=1e-8), r
        assert m[f"lowrank/top1_agree_at_r{r}"] == pytest.approx(top1), r
        # equal budget: the k = sum r(m+n) largest |dW| over the same matrices jointly
        k = sum(r * sum(d.shape) for d in mats.values())
        flat = np.concatenate([np.abs(d.astype(np.float32)).reshape(-1) for d in mats.values()])
        cut = np.sort(flat)[::-1][k - 1]
        assert (flat == cut).sum() == 1  # no ties here: the kept set is unambiguous
        sparse = {n: np.where(np.abs(d.astype(np.float32)) >= cut, d, 0) + old[n].double().numpy()
                  for n, d in mats.items()}
        kl, top1 = _kl_top1(full, _reference_forward(model, sparse))
        assert k < total
        assert m[f"sparse/kl_at_budget_r{r}"] == pytest.approx(kl, rel=1e-3, abs=1e-8), r
        assert m[f"sparse/top1_agree_at_budget_r{r}"] == pytest.approx(top1), r
    assert m["lowrank/kl_at_r4"] > 0  # the random noise part is not low-rank
    assert m["lowrank/nonfinite"] == 0


def test_invariants_weights_rng_modes_and_grads_restored() -> None:
    model, delta, _, ctx = _setup()
    model.train()
    model.model.layers[0].eval()
    before = state(model)
    modes = [mod.training for mod in model.modules()]
    rng = torch.get_rng_state()
    LowRankMetrics(ranks=RANKS, exact_max_dim=8).compute(delta, context=ctx)
    assert_same_state(before, state(model))
    assert [mod.training for mod in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fail_at", [2, 3])
def test_invariants_hold_when_a_forward_fails(fail_at: int) -> None:
    model, delta, _, ctx = _setup()
    before = state(model)
    rng = torch.get_rng_state()
    calls = [0]

    def output_fn(out):  # the 2nd forward is a low-rank pass, the 3rd a budget-sparse pass
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("boom")
        return out.logits

    with pytest.raises(RuntimeError, match="boom"):
        LowRankMetrics(ranks=RANKS, output_fn=output_fn).compute(delta, context=ctx)
    assert_same_state(before, state(model))
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_randomized_path_agrees_with_exact_and_is_deterministic() -> None:
    _, delta, _, ctx = _setup()
    spectrum_only = AnalysisContext(model=ctx.model, step=3)
    exact = LowRankMetrics(ranks=[1, 2], method="svd").compute(delta, context=spectrum_only)
    rnd = LowRankMetrics(ranks=[1, 2], exact_max_dim=8, oversampling=6, power_iterations=3)
    r1 = rnd.compute(delta, context=spectrum_only)
    r2 = rnd.compute(delta, context=spectrum_only)
    assert r1 == r2
    assert r1["lowrank/randomized_matrices"] == 14
    for k in ("energy_at_r1", "energy_at_r2", "stable_rank"):
        assert r1[f"lowrank/{k}"] == pytest.approx(exact[f"lowrank/{k}"], rel=1e-3), k


def test_quality_needs_inputs_and_can_be_disabled(caplog: pytest.LogCaptureFixture) -> None:
    _, delta, _, ctx = _setup()
    with caplog.at_level(logging.INFO):
        m = LowRankMetrics(ranks=RANKS).compute(delta, context=AnalysisContext(model=ctx.model))
    assert "lowrank/energy_at_r1" in m and "lowrank/kl_at_r1" not in m
    assert "no inputs" in caplog.text
    m = LowRankMetrics(ranks=RANKS, quality=False).compute(delta, context=ctx)
    assert "lowrank/kl_at_r1" not in m and "sparse/kl_at_budget_r1" not in m
    m = LowRankMetrics(ranks=RANKS).compute(delta)  # offline: no model at all
    assert m["lowrank/num_matrices"] == 14
    assert LowRankMetrics().compute(None) == {}


def test_nonfinite_and_zero_updates() -> None:
    model, delta, _, _ = _setup()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    m = LowRankMetrics(ranks=RANKS).compute(delta, context=AnalysisContext(model=model))
    assert m["lowrank/nonfinite_matrices"] == 1 and m["lowrank/num_matrices"] == 13
    still = tiny_qwen2()
    zero = ParameterSnapshot(still).compute_delta(ParameterSnapshot.live(still))
    m = LowRankMetrics(ranks=RANKS).compute(zero, context=AnalysisContext(model=still))
    assert math.isnan(m["lowrank/energy_at_r1"]) and math.isnan(m["lowrank/stable_rank"])
    assert m["lowrank/param_ratio_at_r1"] > 0


def test_a_matrix_sharded_over_one_rank_matches_the_unsharded_result() -> None:
    """In one process a row-sharded matrix is the whole matrix: the gather path changes nothing."""
    _, delta, _, ctx = _setup()
    plain = LowRankMetrics(ranks=RANKS, exact_max_dim=16).compute(delta, context=ctx)
    for name in low_rank_targets(delta, ctx.model):
        info = delta.new.shards[name]
        delta.new.shards[name] = ShardInfo(info.global_shape, 0, True, True)
    sharded = LowRankMetrics(ranks=RANKS, exact_max_dim=16).compute(delta, context=ctx)
    assert sharded == plain
    assert plain["lowrank/randomized_matrices"] > 0


def test_truncation_of_a_row_shard_uses_its_global_rows() -> None:
    """A rank holding rows 2..4 of a 7 x 5 matrix writes rows 2..4 of W_old + U_r S_r V_r^T."""
    gen = torch.Generator().manual_seed(4)
    w_old, d = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    full_old = ParameterSnapshot(nn.ParameterDict({"w": nn.Parameter(w_old.clone())}))
    full_new = ParameterSnapshot(nn.ParameterDict({"w": nn.Parameter(w_old + d)}))
    full = full_old.compute_delta(full_new)
    spectra = LowRankMetrics(ranks=[2])._spectra(full, ["w"], True, step=0)[0]
    shard_old = ParameterSnapshot(nn.ParameterDict({"w": nn.Parameter(w_old[2:5].clone())}))
    shard_new = ParameterSnapshot(nn.ParameterDict({"w": nn.Parameter((w_old + d)[2:5])}))
    shard_old.shards["w"] = shard_new.shards["w"] = ShardInfo((7, 5), 2 * 5, True, True)
    shard = shard_old.compute_delta(shard_new)
    value = LowRankMetrics._truncations(shard, spectra, 2)["w"]
    u, s, vh = np.linalg.svd((w_old + d).double().numpy() - w_old.double().numpy())
    want = w_old.double().numpy() + (u[:, :2] * s[:2]) @ vh[:2]
    got = value(shard_new.data["w"].clone())
    np.testing.assert_allclose(got.double().numpy(), want[2:5], rtol=1e-5, atol=1e-5)


def test_config_registry_and_manager() -> None:
    cfg = AnalysisConfig(interval=1, low_rank_enabled=True, low_rank_ranks=[2, 1],
                         low_rank_track_components=True, sparse_quality_enabled=False,
                         param_change_enabled=False, sparse_quality_seed=4)
    (computer,) = build_computers(cfg)
    assert isinstance(computer, LowRankMetrics)
    assert computer.ranks == [1, 2] and computer.track_components and computer.seed == 4
    model = tiny_qwen2()
    manager = ModelAnalysisManager.create(cfg)
    assert manager.on_optimizer_step(model, inputs=_inputs()) == {}
    _dense_update(model)
    out = manager.on_optimizer_step(model, inputs=_inputs())
    assert {"lowrank/energy_at_r1", "lowrank/kl_at_r2", "sparse/kl_at_budget_r1",
            "lowrank/component/q_proj/energy_at_r2"} <= set(out)
    with pytest.raises(ValueError, match="ranks"):
        LowRankMetrics(ranks=[])
    with pytest.raises(ValueError, match="method"):
        LowRankMetrics(method="qr")


def test_sparse_and_low_rank_share_one_reference_forward_per_measurement():
    from grail.trainer.analysis.metrics.sparse_quality import SparseQualityMetrics

    model, delta, _, ctx = _setup()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    sparse, low = SparseQualityMetrics(), LowRankMetrics(ranks=RANKS)
    alone = {**sparse.compute(delta, context=ctx)}
    alone |= low.compute(delta, context=AnalysisContext(model=model, inputs=_inputs(), step=3))
    n_alone = len(calls)
    calls.clear()
    shared_ctx = AnalysisContext(model=model, inputs=_inputs(), step=3)
    together = {**sparse.compute(delta, context=shared_ctx)}
    together |= low.compute(delta, context=shared_ctx)
    handle.remove()
    # sparse: full, magnitude, random; low rank: 3 ranks + 3 equal budgets (+ its own full)
    assert n_alone == 3 + 2 * len(RANKS) + 1
    assert len(calls) == n_alone - 1
    assert together == alone


def test_a_context_reused_with_new_weights_recomputes_the_reference():
    from grail.trainer.analysis.metrics.sparse_quality import SparseQualityMetrics

    model, delta, _, ctx = _setup()
    sparse = SparseQualityMetrics(thresholds=[0.0])
    first = sparse.compute(delta, context=ctx)
    snap = ParameterSnapshot(model)
    _dense_update(model, seed=7)
    delta2 = snap.compute_delta(ParameterSnapshot.live(model))
    again = sparse.compute(delta2, context=ctx)  # same context object, other weights
    fresh = sparse.compute(delta2, context=AnalysisContext(model=model, inputs=_inputs(), step=3))
    assert again == fresh
    assert again["sparse/kl_at_0e+00"] == 0.0  # T = 0 against the right reference
    assert len(ctx._shared) == 1  # replaced, not accumulated
    assert first.keys() == again.keys()
