"""PrincipalMetrics against float64 numpy SVDs, and the factor cache by counting decompositions."""

from __future__ import annotations

import dataclasses
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
from grail.trainer.analysis.metrics.low_rank import low_rank_targets
from grail.trainer.analysis.metrics.principal import PrincipalMetrics
from grail.trainer.analysis.metrics.registry import build_computers
from grail.trainer.analysis.ops.principal import FactorCache, fingerprint
from tests.conftest import tiny_gpt2, tiny_qwen2

from ..reference import assert_same_state, state

RANKS = [1, 4, 64]  # 64 is beyond every matrix of the tiny model: the whole matrix
QWEN_MATRICES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
COLUMNS = ("energy_in_top", "left_energy_top", "subspace_overlap_top", "spectral_drift_top")


@torch.no_grad()
def _update(model: nn.Module, scale: float = 2e-3, seed: int = 1) -> None:
    """Dense noise plus a part along each matrix's own top singular pair (so the block
    shares are far from their random values)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        d = torch.randn(p.shape, generator=gen) * scale
        if p.dim() == 2:
            u, _, vh = torch.linalg.svd(p.double())
            d += 5 * scale * torch.outer(u[:, 0], vh[0]).float()
        p.add_(d.to(p.dtype))


def _setup(seed: int = 1):
    model = tiny_qwen2()
    snap = ParameterSnapshot(model)
    old = {n: t.clone() for n, t in snap.data.items()}
    _update(model, seed=seed)
    return model, snap.compute_delta(ParameterSnapshot.live(model)), old


def _reference(model: nn.Module, old: dict[str, torch.Tensor], names: list[str]) -> dict:
    """Every per-rank key for the matrices ``names``, in float64 numpy."""
    live = dict(model.named_parameters())
    sums: dict[str, float] = {"e": 0.0}
    for name in names:
        w = old[name].double().numpy()
        w2 = live[name].detach().double().numpy()
        d = w2 - w
        e = float((d**2).sum())
        m, n = w.shape
        u, s, vt = np.linalg.svd(w)
        u2, s2, _ = np.linalg.svd(w2)
        sums["e"] += e
        for r in RANKS:
            k = min(r, m, n)
            uk, vk = u[:, :k], vt[:k].T
            cos = np.linalg.svd(uk.T @ u2[:, :k], compute_uv=False)
            add = {
                f"energy_in_top{r}": ((uk.T @ d @ vk) ** 2).sum(),
                f"energy_in_top{r}_random": e * k * k / (m * n),
                f"left_energy_top{r}": ((uk.T @ d) ** 2).sum(),
                f"left_energy_top{r}_random": e * k / m,
                f"subspace_overlap_top{r}": e * (cos**2).mean(),
                f"spectral_drift_top{r}": e * np.linalg.norm(s2[:k] - s[:k])
                / np.linalg.norm(s[:k]),
            }
            for key, value in add.items():
                sums[key] = sums.get(key, 0.0) + float(value)
    return {k: v / sums["e"] for k, v in sums.items() if k != "e"}


def _assert_matches(got: dict, want: dict, prefix: str) -> None:
    for key, value in want.items():
        g = got[f"{prefix}{key}"]
        if key.startswith("subspace_overlap"):  # compare the rotation, 1 - overlap
            assert 1 - g == pytest.approx(1 - value, rel=1e-3, abs=1e-8), key
        else:
            assert g == pytest.approx(value, rel=1e-4, abs=1e-9), key


def test_keys_match_a_float64_numpy_reference() -> None:
    model, delta, old = _setup()
    m = PrincipalMetrics(ranks=RANKS, track_components=True).compute(
        delta, context=AnalysisContext(model=model)
    )
    names = low_rank_targets(delta, model)
    assert {n.split(".")[-2] for n in names} == QWEN_MATRICES
    _assert_matches(m, _reference(model, old, names), "principal/")
    naming = ParameterNaming(delta.names)
    for comp in ("q_proj", "down_proj"):
        group = [n for n in names if naming.component(n) == comp]
        _assert_matches(m, _reference(model, old, group), f"principal/component/{comp}/")
    assert m["principal/num_matrices"] == 14 and m["principal/randomized_matrices"] == 0
    assert m["principal/skipped_matrices"] == 0
    # the planted part along (u1, v1) puts far more than a random share in the top-1 block
    assert m["principal/energy_in_top1"] > 10 * m["principal/energy_in_top1_random"]
    assert 0 < m["principal/subspace_overlap_top4"] < 1 and m["principal/spectral_drift_top1"] > 0


def test_without_a_model_the_name_rule_selects_the_same_matrices() -> None:
    model, delta, _ = _setup()
    with_model = PrincipalMetrics(ranks=RANKS).compute(delta, context=AnalysisContext(model=model))
    assert PrincipalMetrics(ranks=RANKS).compute(delta) == with_model
    every = PrincipalMetrics(ranks=[1], include_embeddings=True).compute(delta)
    assert every["principal/num_matrices"] == 16
    gpt = tiny_gpt2()  # Conv1D matrices, tied embedding and head left out
    gold = ParameterSnapshot(gpt)
    _update(gpt)
    g = PrincipalMetrics(ranks=[1]).compute(gold.compute_delta(ParameterSnapshot.live(gpt)),
                                            context=AnalysisContext(model=gpt))
    assert g["principal/num_matrices"] == 8 and 0 < g["principal/energy_in_top1"] <= 1


# --- the factor cache ----------------------------------------------------------------------------
def _fingerprints(model: nn.Module, names: list[str]) -> set[tuple[int, ...]]:
    params = dict(model.named_parameters())
    return {fingerprint(params[n].detach()) for n in names}


def test_interval_view_decomposes_each_matrix_once_per_measurement_after_the_first(
    decompositions,
) -> None:
    """The factors of W_new are the next interval's reference factors: 2 decompositions per
    matrix at the first measurement, then only W_new's; the numbers equal a run without cache."""
    model = tiny_qwen2()
    cfg = AnalysisConfig(interval=1, principal_enabled=True, principal_ranks=[1, 4],
                         param_change_enabled=False, sparse_quality_enabled=False)
    manager = ModelAnalysisManager.create(cfg)
    (computer,) = manager.computers
    names = low_rank_targets(ParameterSnapshot(model).compute_delta(ParameterSnapshot(model)),
                             model)
    manager.on_optimizer_step(model)  # the first snapshot
    counts = []
    for step in range(3):
        old = ParameterSnapshot(model)  # what the manager's snapshot holds, for the reference
        _update(model, seed=10 + step)
        before = len(decompositions)
        got = manager.on_optimizer_step(model)
        counts.append(len(decompositions) - before)
        if step:  # only the new weights were decomposed
            assert set(decompositions[before:]) == _fingerprints(model, names)
        uncached = PrincipalMetrics(ranks=[1, 4]).measure(
            old.compute_delta(ParameterSnapshot.live(model)), model, cache=None
        )
        assert got == uncached
    assert counts == [2 * len(names), len(names), len(names)]
    assert len(computer.cache) == len(names) and computer.cache.hits == 2 * len(names)
    manager.reset()
    assert len(computer.cache) == 0
    # without the cache (a one-off diff): both matrices every time, the same numbers
    plain = PrincipalMetrics.from_config(dataclasses.replace(cfg, principal_cache_factors=False))
    assert plain.cache is None
    start = len(decompositions)
    plain.compute(old.compute_delta(ParameterSnapshot.live(model)))
    plain.compute(old.compute_delta(ParameterSnapshot.live(model)))
    assert len(decompositions) - start == 4 * len(names)


def test_a_fixed_reference_is_decomposed_once(decompositions) -> None:
    """The base-drift view: delta = W_now - W_base with a cache that keeps the base's factors.
    Later measurements decompose W_now only; a new base is decomposed again."""
    model = tiny_qwen2()
    base = ParameterSnapshot(model)
    names = low_rank_targets(base.compute_delta(base), model)
    base_keys = _fingerprints(model, names)
    computer = PrincipalMetrics(ranks=[1, 4])
    cache = FactorCache("cpu", tracks="reference")
    for step in range(3):
        _update(model, seed=20 + step)
        start = len(decompositions)
        delta = base.compute_delta(ParameterSnapshot.live(model))
        got = computer.measure(delta, model, cache=cache, prefix="drift/principal")
        calls = decompositions[start:]
        assert len(calls) == (2 if step == 0 else 1) * len(names)
        assert (set(calls) & base_keys) == (base_keys if step == 0 else set())
        assert set(got) == {k.replace("principal/", "drift/principal/", 1)
                            for k in computer.measure(delta, model)}
        uncached = computer.measure(delta, model, cache=None, prefix="drift/principal")
        assert got == uncached
    assert len(computer.cache) == 0  # the interval cache was not touched
    assert cache.nbytes() == sum(4 * 4 * sum(p.shape) + 4 * 8 for n, p in
                                 model.named_parameters() if n in names)
    new_base = ParameterSnapshot(model)  # set_base: the reference changes
    start = len(decompositions)
    computer.measure(new_base.compute_delta(ParameterSnapshot.live(model)), model, cache=cache)
    assert len(decompositions) - start == 2 * len(names)


def test_a_lossy_snapshot_misses_the_cache_and_stays_correct(decompositions) -> None:
    model = tiny_qwen2()
    cfg = AnalysisConfig(interval=1, principal_enabled=True, principal_ranks=[1, 4],
                         param_change_enabled=False, sparse_quality_enabled=False,
                         snapshot_dtype="bfloat16")
    manager = ModelAnalysisManager.create(cfg)
    manager.on_optimizer_step(model)
    for step in range(2):
        _update(model, seed=30 + step)
        old = manager.old_snapshot
        want = PrincipalMetrics(ranks=[1, 4]).measure(
            old.compute_delta(ParameterSnapshot.live(model)), model, cache=None
        )
        start = len(decompositions)
        assert manager.on_optimizer_step(model) == want
        assert len(decompositions) - start == 2 * 14  # bf16 W_old is not the fp32 W_new


# --- invariants and edge cases -------------------------------------------------------------------
def test_weights_rng_modes_and_grads_are_untouched() -> None:
    model = tiny_qwen2()
    model.model.layers[0].eval()
    cfg = AnalysisConfig(interval=1, principal_enabled=True, sparse_quality_enabled=False)
    manager = ModelAnalysisManager.create(cfg)
    manager.on_optimizer_step(model)
    _update(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    before = state(model)
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    grad_enabled = torch.is_grad_enabled()
    out = manager.on_optimizer_step(model)
    assert "principal/energy_in_top1" in out
    assert_same_state(before, state(model))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state()) and torch.is_grad_enabled() == grad_enabled
    fresh = tiny_qwen2()
    _update(fresh)
    assert all(p.grad is None for p in fresh.parameters())
    snap = ParameterSnapshot(fresh)
    PrincipalMetrics().compute(snap.compute_delta(ParameterSnapshot.live(fresh)))
    assert all(p.grad is None for p in fresh.parameters())


def test_nonfinite_zero_reference_and_zero_updates() -> None:
    model, delta, _ = _setup()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    m = PrincipalMetrics(ranks=RANKS).compute(delta, context=AnalysisContext(model=model))
    assert m["principal/skipped_matrices"] == 1 and m["principal/num_matrices"] == 13
    assert math.isfinite(m["principal/energy_in_top1"])

    zero_ref = tiny_qwen2()
    with torch.no_grad():
        zero_ref.model.layers[1].self_attn.o_proj.weight.zero_()
    snap = ParameterSnapshot(zero_ref)
    _update(zero_ref)
    m = PrincipalMetrics(ranks=RANKS).compute(snap.compute_delta(ParameterSnapshot.live(zero_ref)))
    assert m["principal/skipped_matrices"] == 1 and m["principal/num_matrices"] == 13

    still = tiny_qwen2()
    none = ParameterSnapshot(still).compute_delta(ParameterSnapshot.live(still))
    m = PrincipalMetrics(ranks=RANKS).compute(none, context=AnalysisContext(model=still))
    assert m["principal/num_matrices"] == 14
    per_rank = [k for k in m if k.rsplit("/", 1)[-1].startswith(COLUMNS)]
    assert len(per_rank) == 6 * len(RANKS) and all(math.isnan(m[k]) for k in per_rank)
    assert PrincipalMetrics().compute(None) == {}


def test_a_matrix_sharded_over_one_rank_matches_the_unsharded_result() -> None:
    """In one process a row-sharded matrix is the whole matrix: the gather path changes nothing."""
    model, delta, _ = _setup()
    plain = PrincipalMetrics(ranks=[1, 4], exact_max_dim=16).compute(delta)
    for name in low_rank_targets(delta, model):
        info = delta.new.shards[name]
        delta.new.shards[name] = ShardInfo(info.global_shape, 0, True, True)
    assert PrincipalMetrics(ranks=[1, 4], exact_max_dim=16).compute(delta) == plain
    assert plain["principal/randomized_matrices"] > 0


# --- configuration -------------------------------------------------------------------------------
def test_config_fields_registry_and_presets() -> None:
    cfg = AnalysisConfig()
    assert (cfg.principal_enabled, cfg.principal_ranks, cfg.principal_track_components) == (
        False, [1, 8, 64], False)
    assert not any(isinstance(c, PrincipalMetrics) for c in build_computers(cfg))
    rich = AnalysisConfig.comprehensive()
    assert rich.principal_enabled and rich.principal_track_components
    cfg = AnalysisConfig(principal_enabled=True, principal_ranks=(8, 2),
                         sparse_quality_enabled=False, param_change_enabled=False,
                         low_rank_exact_max_dim=100,
                         low_rank_include_embeddings=True, sparse_quality_seed=5,
                         snapshot_device="cpu", principal_track_components=True)
    assert AnalysisConfig.from_dict(cfg.to_dict()) == cfg
    (computer,) = build_computers(cfg)
    assert isinstance(computer, PrincipalMetrics)
    assert computer.ranks == [2, 8] and computer.exact_max_dim == 100 and computer.seed == 5
    assert computer.include_embeddings and computer.track_components
    assert computer.cache.device == torch.device("cpu") and computer.cache.tracks == "next"
    for bad in ([], [0], [1, 1], [2.0], "8", None):
        with pytest.raises(ValueError, match=r"AnalysisConfig\.principal_ranks="):
            AnalysisConfig(principal_ranks=bad)
    with pytest.raises(ValueError, match="ranks"):
        PrincipalMetrics(ranks=[])
    with pytest.raises(ValueError, match="method"):
        PrincipalMetrics(method="qr")


# --- offline: the whole fine-tune against the base ---------------------------------------------
def test_offline_diff_reports_the_fine_tune_against_the_base_checkpoint(tmp_path) -> None:
    pytest.importorskip("safetensors")
    from grail.trainer.analysis.offline.diff import DiffOptions, run_diff

    from ..checkpoints import save_pair

    base, tuned, bdir, tdir = save_pair(tmp_path, torch.bfloat16, shard=True)
    opts = DiffOptions(str(bdir), str(tdir), ranks=[1, 4], low_rank=False, hash_files=False,
                       progress=False)
    doc = run_diff(opts)
    got = {k: v for k, v in doc["metrics"].items() if k.startswith("principal/")}
    assert doc["config"]["principal_enabled"] and not doc["config"]["principal_cache_factors"]
    online = PrincipalMetrics(ranks=[1, 4], track_components=True).compute(
        ParameterSnapshot(base).compute_delta(ParameterSnapshot(tuned))
    )
    assert got.keys() == online.keys() and "principal/component/q_proj/energy_in_top4" in got
    for key, value in online.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-15, nan_ok=True), key
    assert got["principal/num_matrices"] == 14
    quiet = run_diff(dataclasses.replace(opts, principal=False))
    assert not any(k.startswith("principal/") for k in quiet["metrics"])
