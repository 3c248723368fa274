"""``drift/attrib/*`` and ``drift/principal/*``: attribution and principal geometry of the whole
fine-tune (base -> now), against float64 references and the families' interval views."""

from __future__ import annotations

import numpy as np
import pytest

from grail.trainer.analysis.config import AnalysisConfig
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.manager import ModelAnalysisManager
from grail.trainer.analysis.metrics.attribution import AttributionMetrics
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.metrics.drift import DriftMetrics
from grail.trainer.analysis.metrics.low_rank import low_rank_targets
from grail.trainer.analysis.metrics.principal import PrincipalMetrics
from grail.trainer.analysis.ops.principal import fingerprint
from tests.conftest import tiny_qwen2

from ..reference import assert_same_state, state
from .test_drift import _copy, _inputs, _kl, _logits64, _update
from .test_principal import RANKS, _assert_matches, _reference

COMPONENTS = ("q_proj", "o_proj", "down_proj")


def _fine_tune():
    """A base, an interval snapshot and the live model two updates later."""
    model = tiny_qwen2()
    base = ParameterSnapshot(model)
    w_base = _copy(model)
    _update(model, 1, 3e-2)
    prev = ParameterSnapshot(model)
    _update(model, 2, 3e-2)
    return model, base, w_base, prev


def _drift(model, base, prev, computer: DriftMetrics, inputs=None) -> dict[str, float]:
    live = ParameterSnapshot.live(model)
    ctx = AnalysisContext(model=model, inputs=inputs, step=4, base=base)
    return computer.compute(prev.compute_delta(live), old_snapshot=prev, current_snapshot=live,
                            context=ctx)


def test_attribution_of_the_whole_fine_tune_matches_float64_model_copies():
    """kl_only: the base with one component's whole update; kl_without: now with that
    component back at the base; both against P_now, on float64 copies of the model."""
    model, base, w_base, prev = _fine_tune()
    w_now = _copy(model)
    inputs = _inputs()
    before = state(model)
    computer = DriftMetrics(keep_ratios=[], attribution=AttributionMetrics(["component"]))
    m = _drift(model, base, prev, computer, inputs)
    assert_same_state(state(model), before)  # every bit as it was
    now64 = _logits64(model, w_now, inputs)
    assert m["drift/attrib/kl_total"] == pytest.approx(_kl(now64, _logits64(model, w_base,
                                                                             inputs)), rel=1e-5)
    assert m["drift/attrib/kl_total"] == pytest.approx(m["drift/kl_now_base"], rel=1e-6)
    total_sq = sum(float(((w_now[n].double() - w_base[n].double()) ** 2).sum()) for n in w_now)
    for c in COMPONENTS:
        mine = [n for n in w_now if n.split(".")[-2] == c]
        only = {n: (w_now[n] if n in mine else w_base[n]) for n in w_now}
        without = {n: (w_base[n] if n in mine else w_now[n]) for n in w_now}
        key = f"drift/attrib/component/{c}/"
        assert m[key + "kl_only"] == pytest.approx(
            _kl(now64, _logits64(model, only, inputs)), rel=1e-5), c
        assert m[key + "kl_without"] == pytest.approx(
            _kl(now64, _logits64(model, without, inputs)), rel=1e-5), c
        share = sum(float(((w_now[n].double() - w_base[n].double()) ** 2).sum()) for n in mine)
        assert m[key + "update_share"] == pytest.approx(share / total_sq, rel=1e-5), c
    # the interval view (W_prev -> W_now) is another delta: different numbers
    interval = AttributionMetrics(["component"]).compute(
        prev.compute_delta(ParameterSnapshot.live(model)),
        context=AnalysisContext(model=model, inputs=inputs, step=4))
    assert interval["attrib/kl_total"] < m["drift/attrib/kl_total"]


def test_principal_geometry_of_the_whole_fine_tune_matches_float64_numpy():
    model, base, w_base, prev = _fine_tune()
    computer = DriftMetrics(keep_ratios=[], principal=PrincipalMetrics(ranks=RANKS))
    m = _drift(model, base, prev, computer)
    names = low_rank_targets(base.compute_delta(ParameterSnapshot.live(model)), model)
    _assert_matches(m, _reference(model, w_base, names), "drift/principal/")
    assert m["drift/principal/num_matrices"] == len(names)
    assert not any(k.startswith("drift/attrib") for k in m)  # no attribution computer


def test_the_base_is_decomposed_once_per_base(decompositions):
    """With a manager: the base's factors are computed at the first measurement and reused;
    later measurements decompose W_now only, once for both views (the interval view's W_new is
    the same live weights)."""
    calls = decompositions
    model = tiny_qwen2()
    cfg = AnalysisConfig(interval=1, drift_enabled=True, drift_keep_ratios=[],
                         principal_enabled=True, principal_ranks=[1, 4],
                         param_change_enabled=False, sparse_quality_enabled=False)
    manager = ModelAnalysisManager.create(cfg)
    drift = next(c for c in manager.computers if isinstance(c, DriftMetrics))
    params = dict(model.named_parameters())
    names = low_rank_targets(ParameterSnapshot(model).compute_delta(ParameterSnapshot(model)),
                             model)
    base_keys = {fingerprint(params[n].detach()) for n in names}
    manager.on_optimizer_step(model)  # base and first snapshot
    for step in range(3):
        _update(model, 10 + step, 1e-3)
        start = len(calls)
        got = manager.on_optimizer_step(model)
        assert "drift/principal/energy_in_top4" in got and "principal/energy_in_top4" in got
        mine = calls[start:]
        assert (set(mine) & base_keys) == (base_keys if step == 0 else set()), step
        now = {fingerprint(params[n].detach()) for n in names}
        assert set(mine) <= base_keys | now
        # first: the interval's W_old and the drift view's base (two caches), W_now once;
        # later: W_now once (both references come from the caches)
        assert len(mine) == (3 if step == 0 else 1) * len(names), step
    assert len(drift.base_factors) == len(names)
    assert drift.base_factors.hits == 2 * len(names)  # measurements 2 and 3
    manager.reset()  # the automatic base is forgotten: the next one misses the kept factors
    assert len(drift.base_factors) == len(names)
    manager.on_optimizer_step(model)  # a new base and first snapshot
    _update(model, 20, 1e-3)
    start = len(calls)
    manager.on_optimizer_step(model)
    assert len(calls) - start == 3 * len(names)  # both references again, W_now once


def test_config_turns_the_views_on_with_their_families():
    both = DriftMetrics.from_config(AnalysisConfig(
        drift_enabled=True, attribution_enabled=True, attribution_groups=["layer"],
        principal_enabled=True, principal_ranks=[2], snapshot_device="cpu"))
    assert both.attribution is not None and both.attribution.groups == ["layer"]
    assert both.principal is not None and both.principal.ranks == [2]
    assert both.base_factors is not None and both.base_factors.tracks == "reference"
    plain = DriftMetrics.from_config(AnalysisConfig(drift_enabled=True))
    assert plain.attribution is None and plain.principal is None and plain.base_factors is None
    uncached = DriftMetrics.from_config(AnalysisConfig(
        drift_enabled=True, principal_enabled=True, principal_cache_factors=False))
    assert uncached.principal is not None and uncached.base_factors is None


def test_without_inputs_attribution_is_absent_and_principal_present():
    model, base, _, prev = _fine_tune()
    computer = DriftMetrics(keep_ratios=[], attribution=AttributionMetrics(),
                            principal=PrincipalMetrics(ranks=[1]))
    m = _drift(model, base, prev, computer)
    assert not any(k.startswith("drift/attrib/") for k in m)
    assert np.isfinite(m["drift/principal/energy_in_top1"])


def test_views_sharing_the_live_factors_report_what_each_computes_alone():
    model, base, _, prev = _fine_tune()
    live = ParameterSnapshot.live(model)
    interval = prev.compute_delta(live)
    computer = PrincipalMetrics(ranks=[1, 4], cache_factors=False)
    drift = DriftMetrics(keep_ratios=[], principal=PrincipalMetrics(ranks=[1, 4]))
    ctx = AnalysisContext(model=model, step=4, base=base)
    together = {**computer.compute(interval, context=ctx),
                **drift.compute(interval, old_snapshot=prev, current_snapshot=live, context=ctx)}
    alone = computer.measure(interval, model)
    alone.update(PrincipalMetrics(ranks=[1, 4]).measure(
        base.compute_delta(live), model, prefix="drift/principal"))
    assert {k: v for k, v in together.items() if "principal/" in k} == alone

