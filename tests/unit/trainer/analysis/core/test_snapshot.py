"""ParameterSnapshot and ParameterDelta against float64 numpy references."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from grail.trainer.analysis.core import stats
from grail.trainer.analysis.core.snapshot import (
    ParameterDelta,
    ParameterSnapshot,
    collect_parameters,
)
from tests.conftest import tiny_gpt2, tiny_qwen2

CHUNK = stats.CPU_CHUNK


class Params(nn.Module):
    """A module holding the given tensors as parameters (integer ones frozen)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            grad = t.is_floating_point() or t.is_complex()
            self.register_parameter(name, nn.Parameter(t.clone(), requires_grad=grad))

    def assign(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, t in tensors.items():
                getattr(self, name).copy_(t)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_delta(old: torch.Tensor, new: torch.Tensor) -> np.ndarray:
    """float32 delta as the correctly rounded exact difference, in float64 for reductions."""
    exact = new.double().numpy() - old.double().numpy()
    return exact.astype(np.float32).astype(np.float64).reshape(-1)


def _ref_stats(ds: list[np.ndarray]) -> dict[str, float]:
    d = np.concatenate(ds)
    d = d[np.isfinite(d)]
    n = len(d)
    mean = d.sum() / n
    return {
        "norm_l2": math.sqrt(float(np.sum(d * d))),
        "norm_l1": float(np.sum(np.abs(d))),
        "norm_max": float(np.max(np.abs(d))),
        "mean": float(mean),
        "std": math.sqrt(float(np.sum((d - mean) ** 2) / n)),
        "min": float(d.min()),
        "max": float(d.max()),
        "mean_abs": float(np.mean(np.abs(d))),
    }


def _assert_stats(got: dict[str, float], ref: dict[str, float]) -> None:
    assert set(got) == {"norm_l2", "norm_l1", "norm_max", "mean", "std", "min", "max"}
    for key in ("norm_l2", "norm_l1", "std"):
        assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=0), key
    for key in ("norm_max", "min", "max"):
        assert got[key] == ref[key], key  # exact: these are float32 values
    # the mean may be ~0: compare on the scale of the entries
    assert abs(got["mean"] - ref["mean"]) <= 1e-6 * ref["mean_abs"]
    assert all(isinstance(v, float) for v in got.values())


# --- the data every delta test uses ------------------------------------------------------------


def _update_pair(dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict]:
    """Old and new tensors: one larger than two chunks, small ones, exact ties, zeros, NaN."""
    g = _gen(seed)
    big = torch.randn(2 * CHUNK + 17, generator=g)
    old = {
        "big": big,
        "matrix": torch.randn(33, 17, generator=g),
        "bias": torch.randn(5, generator=g),
        "ties": torch.zeros(64),
    }
    new = {
        "big": big
        + 1e-3 * torch.randn(big.shape, generator=g) * (torch.rand(big.shape, generator=g) < 0.3),
        "matrix": old["matrix"] + 0.01 * torch.randn(33, 17, generator=g),
        "bias": old["bias"].clone(),  # unchanged
        # |delta| exactly 0.25 and 2^-20 (the thresholds used below), and their neighbours
        "ties": torch.tensor([0.25, -0.25, 2.0**-20, -(2.0**-20)] * 8 + [0.0] * 16 + [1.0] * 16),
    }
    old = {k: v.to(dtype) for k, v in old.items()}
    new = {k: v.to(dtype) for k, v in new.items()}
    return old, new


def _delta_for(old: dict, new: dict) -> tuple[ParameterDelta, Params]:
    model = Params(old)
    before = ParameterSnapshot(model)
    model.assign(new)
    return before.compute_delta(ParameterSnapshot(model)), model


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --- snapshots ------------------------------------------------------------------------------


def test_snapshot_copies_are_independent():
    model = tiny_qwen2()
    snap = ParameterSnapshot(model)
    params = dict(model.named_parameters())
    assert list(snap.data) == list(params)
    for name, p in params.items():
        assert torch.equal(snap.data[name], p.detach())
        assert snap.data[name].data_ptr() != p.data_ptr()
    saved = {n: t.clone() for n, t in snap.data.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for name, t in snap.data.items():
        assert torch.equal(t, saved[name])
    # and the other way round: writing into the snapshot leaves the model alone
    snap.data["lm_head.weight"].zero_()
    assert torch.equal(params["lm_head.weight"].detach(), saved["lm_head.weight"] + 1.0)


def test_snapshot_creates_no_grad_and_keeps_requires_grad():
    model = tiny_qwen2()
    snap = ParameterSnapshot(model)
    assert all(p.grad is None for p in model.parameters())
    assert not any(t.requires_grad for t in snap.data.values())


def _mixed_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[1].to(torch.bfloat16)
    return model


def test_auto_dtype_keeps_each_parameter_dtype():
    model = _mixed_model()
    snap = ParameterSnapshot(model)
    assert {n: t.dtype for n, t in snap.data.items()} == {
        "0.weight": torch.float32,
        "0.bias": torch.float32,
        "1.weight": torch.bfloat16,
        "1.bias": torch.bfloat16,
    }
    assert snap.dtype is None  # mixed
    assert all(snap.is_lossless(n) for n in snap.data)
    for name, p in model.named_parameters():
        assert torch.equal(snap.data[name], p.detach())


def test_uniform_dtype_is_reported():
    snap = ParameterSnapshot(nn.Linear(2, 2))
    assert snap.dtype == torch.float32
    assert ParameterSnapshot(nn.Linear(2, 2).to(torch.float16)).dtype == torch.float16


def test_lossy_dtype_option():
    model = _mixed_model()
    snap = ParameterSnapshot(model, dtype=torch.bfloat16)
    assert snap.dtype == torch.bfloat16
    assert not snap.is_lossless("0.weight") and snap.is_lossless("1.weight")
    assert torch.equal(snap.data["0.weight"], model[0].weight.detach().to(torch.bfloat16))
    wide = ParameterSnapshot(model, dtype=torch.float32)
    assert wide.dtype == torch.float32 and all(wide.is_lossless(n) for n in wide.data)
    assert torch.equal(wide.data["1.weight"], model[1].weight.detach().float())
    half = ParameterSnapshot(model, dtype=torch.float16)
    assert not half.is_lossless("1.weight")  # bf16's range does not fit fp16
    assert not half.is_lossless("0.weight")


def test_trainable_only():
    model = tiny_qwen2()
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)
    snap = ParameterSnapshot(model, trainable_only=True)
    assert sorted(snap.data) == sorted(n for n, _ in model.named_parameters() if "q_proj" in n)
    assert len(ParameterSnapshot(model)) == len(list(model.parameters()))
    live = ParameterSnapshot.live(model, trainable_only=True)
    assert sorted(live.data) == sorted(snap.data)


def test_non_floating_parameters_are_skipped():
    model = Params({"w": torch.randn(3), "codes": torch.arange(6, dtype=torch.uint8)})
    assert [n for n, _ in collect_parameters(model)] == ["w"]
    snap = ParameterSnapshot(model)
    assert list(snap.data) == ["w"] and "codes" not in snap
    model.assign({"w": torch.ones(3)})
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    assert list(delta.deltas) == ["w"] and len(delta) == 1
    assert delta.sparsity_at_threshold(0.0)["total_params"] == 3


class _TinyLM(nn.Module):
    """Embedding + linear head; optionally with complex, integer and float8 parameters that
    take no part in the logits (the complex one gets its own gradient through the loss)."""

    def __init__(self, extra: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(13, 8)
        self.head = nn.Linear(8, 13)
        if extra:
            self.phase = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
            self.codes = nn.Parameter(torch.arange(5, dtype=torch.int8), requires_grad=False)
            self.scale = nn.Parameter(torch.ones(3).to(torch.float8_e4m3fn), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def _train_and_measure(extra: bool, steps: int = 4) -> list[dict[str, float]]:
    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

    model = _TinyLM(extra)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = AnalysisConfig.comprehensive(interval=1, fused_kernels=False, histogram_samples=0)
    analyzer = ModelAnalysisManager.create(cfg)
    batch = {"input_ids": torch.randint(0, 13, (2, 6), generator=_gen(1))}
    out = []
    for _ in range(steps):
        loss = model(**batch).square().mean()
        if extra:
            loss = loss + model.phase.abs().square().sum()  # its own, separate gradient
        loss.backward()
        opt.step()
        metrics = analyzer.on_optimizer_step(model, inputs=batch, optimizer=opt)
        opt.zero_grad()
        out.append(metrics)
    return out


def test_complex_integer_and_float8_parameters_leave_the_other_metrics_unchanged(caplog):
    caplog.set_level("INFO", logger="grail.trainer.analysis.core.snapshot")
    plain = _train_and_measure(extra=False)
    with caplog.at_level("INFO", logger="grail.trainer.analysis"):
        mixed = _train_and_measure(extra=True)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert not warnings, [r.getMessage() for r in warnings]  # no computer failed
    for ref, got in zip(plain[1:], mixed[1:], strict=True):
        for family in ("param_change/", "sparse/", "gradient/", "adam_sign/", "lowrank/"):
            assert any(k.startswith(family) for k in ref), family  # the premise
        assert sorted(got) == sorted(ref)
        for key, value in ref.items():
            assert got[key] == value or (math.isnan(got[key]) and math.isnan(value)), key
    # one INFO line names the excluded parameters, once for all measurements
    lines = [r.getMessage() for r in caplog.records if "excludes" in r.getMessage()]
    assert len(lines) == 1, lines
    for named in ("phase (complex64)", "codes (int8)", "scale (float8_e4m3fn)"):
        assert named in lines[0], lines[0]


def test_complex_parameter_is_excluded_from_snapshots_and_deltas():
    model = Params({"w": torch.randn(4), "z": torch.randn(2, dtype=torch.complex64)})
    assert [n for n, _ in collect_parameters(model)] == ["w"]
    old = ParameterSnapshot(model)
    new_w = torch.randn(4, generator=_gen(2))
    model.assign({"w": new_w, "z": torch.ones(2, dtype=torch.complex64)})
    delta = old.compute_delta(ParameterSnapshot.live(model))
    assert delta.names == ["w"]
    _assert_stats(delta.statistics(), _ref_stats([_ref_delta(old.data["w"], new_w)]))


def test_exclusions_are_logged_once_per_model_and_again_for_new_names(caplog):
    model = Params({"w": torch.randn(4), "z": torch.randn(2, dtype=torch.complex64)})
    with caplog.at_level("INFO", logger="grail.trainer.analysis.core.snapshot"):
        for _ in range(3):
            collect_parameters(model)
            ParameterSnapshot.live(model)
        model.register_parameter("flags", nn.Parameter(torch.ones(2, dtype=torch.bool), False))
        collect_parameters(model)
        other = Params({"z": torch.randn(2, dtype=torch.complex64)})
        collect_parameters(other)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "z (complex64)" in lines[0] and "flags" not in lines[0]
    assert "flags (bool)" in lines[1] and "z (" not in lines[1]
    assert "z (complex64)" in lines[2]


def test_exclusion_log_line_is_cut_for_many_parameters(caplog):
    model = Params({f"q{i:03d}": torch.zeros(2, dtype=torch.uint8) for i in range(200)})
    with caplog.at_level("INFO", logger="grail.trainer.analysis.core.snapshot"):
        assert collect_parameters(model) == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert "q000 (uint8)" in line and "q199" not in line and "(200 parameters)" in line


def test_tied_weights_appear_once():
    model = tiny_gpt2()  # lm_head.weight is tied to transformer.wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    snap = ParameterSnapshot(model)
    assert "transformer.wte.weight" in snap and "lm_head.weight" not in snap
    assert len(snap) == len(list(model.parameters()))


def test_capture_reuses_buffers_and_reallocates_on_shape_change():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    t0 = time.time()
    snap = ParameterSnapshot(model)
    assert t0 <= snap.timestamp <= time.time()
    ptrs = {n: t.data_ptr() for n, t in snap.data.items()}
    with torch.no_grad():
        model[0].weight.mul_(2)
    t1 = time.time()
    assert snap.capture_(model) is snap
    assert t1 <= snap.timestamp <= time.time()
    assert {n: t.data_ptr() for n, t in snap.data.items()} == ptrs
    assert torch.equal(snap.data["0.weight"], model[0].weight.detach())
    # a parameter changes shape, another disappears
    model[1] = nn.Linear(3, 5, bias=False)
    snap.capture_(model)
    assert sorted(snap.data) == ["0.bias", "0.weight", "1.weight"]
    assert snap.data["1.weight"].shape == (5, 3)
    assert snap.data["1.weight"].data_ptr() != ptrs["1.weight"]
    assert torch.equal(snap.data["1.weight"], model[1].weight.detach())
    assert snap.data["0.weight"].data_ptr() == ptrs["0.weight"]
    assert snap.spec()["1.weight"][:2] == ((5, 3), torch.float32)
    # a dtype change also reallocates (auto dtype follows the parameter)
    model[0].to(torch.float16)
    snap.capture_(model)
    assert snap.data["0.weight"].dtype == torch.float16
    assert torch.equal(snap.data["0.weight"], model[0].weight.detach())


def test_introspection():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).to(torch.bfloat16))
    snap = ParameterSnapshot(model)
    assert snap.device == "cpu" and isinstance(snap.device, str)
    assert len(snap) == 4
    assert "0.weight" in snap and "2.weight" not in snap and 3 not in snap
    assert {n: s[:2] for n, s in snap.spec().items()} == {  # (global shape, dtype, ...)
        "0.weight": ((3, 4), torch.float32),
        "0.bias": ((3,), torch.float32),
        "1.weight": ((2, 3), torch.bfloat16),
        "1.bias": ((2,), torch.bfloat16),
    }
    lossy = ParameterSnapshot(model, dtype=torch.float16)
    assert lossy.spec()["1.weight"][:2] == ((2, 3), torch.bfloat16)  # the parameter's dtype
    assert snap.nbytes() == (12 + 3) * 4 + (6 + 2) * 2
    assert "4 tensors" in repr(snap)
    assert snap.timestamp > 0
    state = snap.state_dict()
    assert state.keys() == snap.data.keys()
    assert all(state[n].data_ptr() != snap.data[n].data_ptr() for n in state)
    empty = ParameterSnapshot()
    assert len(empty) == 0 and empty.dtype is None and empty.device == "cpu"


def test_live_snapshot_shares_storage():
    model = tiny_qwen2()
    live = ParameterSnapshot.live(model)
    assert live.is_live
    for name, p in model.named_parameters():
        assert live.data[name].data_ptr() == p.data_ptr()
        assert not live.data[name].requires_grad
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert torch.equal(live.data["lm_head.weight"], model.lm_head.weight.detach())
    assert live.device == "cpu"
    with pytest.raises(RuntimeError, match="live"):
        live.capture_(model)


def test_live_snapshot_of_empty_model():
    live = ParameterSnapshot.live(nn.ReLU())
    assert len(live) == 0 and live.device == "cpu"


# --- ParameterDelta -------------------------------------------------------------------------


def test_deltas_are_lazy_and_match_the_reference():
    model = tiny_qwen2()
    old = ParameterSnapshot(model)
    delta = old.compute_delta(ParameterSnapshot.live(model))
    # nothing is computed yet: a change made now is seen when .deltas is first read
    g = _gen(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    deltas = delta.deltas
    assert delta.deltas is deltas  # built once
    assert list(deltas) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert deltas[name].dtype == torch.float32 and deltas[name].shape == p.shape
        ref = _ref_delta(old.data[name], p.detach())
        np.testing.assert_array_equal(deltas[name].numpy().reshape(-1), ref.astype(np.float32))


def test_deltas_of_float64_parameters_are_rounded_once_like_the_stream():
    g = _gen(4)
    old = {"w": torch.randn(500, generator=g, dtype=torch.float64)}
    new = {"w": old["w"] + 1e-9 * torch.randn(500, generator=g, dtype=torch.float64)}
    delta, _ = _delta_for(old, new)
    got = delta.deltas["w"]
    assert got.dtype == torch.float32
    ref = _ref_delta(old["w"], new["w"])
    np.testing.assert_array_equal(got.double().numpy(), ref)  # not float32(new) - float32(old)
    streamed = torch.cat([c.delta.clone() for c in delta.stream()])
    assert torch.equal(streamed, got)


def test_statistics_do_not_materialise_deltas(monkeypatch):
    old, new = _update_pair(torch.float32)
    delta, _ = _delta_for(old, new)

    def forbidden(self):
        raise AssertionError(".deltas must not be built by statistics")

    monkeypatch.setattr(ParameterDelta, "deltas", property(forbidden))
    delta.statistics()
    delta.per_layer_statistics()
    delta.sparsity_at_threshold(1e-6)


def test_delta_covers_names_present_in_both_snapshots():
    a = ParameterSnapshot(Params({"x": torch.zeros(2), "y": torch.zeros(3)}))
    b = ParameterSnapshot(Params({"y": torch.ones(3), "z": torch.ones(4)}))
    delta = a.compute_delta(b)
    assert delta.names == ["y"] and len(delta) == 1
    assert torch.equal(delta.deltas["y"], torch.ones(3))
    assert delta.numel() == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_match_float64_reference(dtype):
    old, new = _update_pair(dtype)
    delta, _ = _delta_for(old, new)
    refs = {n: _ref_delta(old[n], new[n]) for n in old}
    _assert_stats(delta.statistics(), _ref_stats(list(refs.values())))
    per = delta.per_layer_statistics()
    assert list(per) == list(old)
    for name, ref in refs.items():
        _assert_stats(per[name], _ref_stats([ref]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsity_at_threshold_exact_counts(dtype):
    old, new = _update_pair(dtype, seed=2)
    delta, _ = _delta_for(old, new)
    d = np.concatenate([_ref_delta(old[n], new[n]) for n in old])
    for threshold in (0.0, 2.0**-20, 1e-6, 1e-4, 0.25, 0.3, 2.0):
        kept = int(np.sum(np.abs(d) > threshold))  # exact real comparison in float64
        got = delta.sparsity_at_threshold(threshold)
        assert got["total_params"] == d.size
        assert got["kept_params"] == kept, threshold
        assert got["kept_ratio"] == kept / d.size
        assert got["dropped_ratio"] == pytest.approx(1 - kept / d.size, abs=1e-15)


def test_exact_ties_are_dropped_and_neighbours_kept():
    t = 2.0**-20
    up = float(np.nextafter(np.float32(t), np.float32(1)))
    old = {"w": torch.zeros(6)}
    new = {"w": torch.tensor([t, -t, up, -up, 0.0, float(np.float32(1e-6))])}
    delta, _ = _delta_for(old, new)
    assert delta.sparsity_at_threshold(t)["kept_params"] == 3  # +-up and 1e-6 > 2^-20
    assert delta.sparsity_at_threshold(up)["kept_params"] == 1
    # 1e-6 is not a float32 value: float32(1e-6) lies on one side of it
    f = float(np.float32(1e-6))
    assert delta.sparsity_at_threshold(1e-6)["kept_params"] == int(f > 1e-6)
    assert delta.sparsity_at_threshold(float(np.nextafter(f, 0)))["kept_params"] == 1
    assert delta.sparsity_at_threshold(f)["kept_params"] == 0
    assert delta.sparsity_at_threshold(0.0)["kept_params"] == 5


def test_non_finite_deltas():
    old = {"w": torch.zeros(8)}
    new = {"w": torch.tensor([1.0, -2.0, float("nan"), float("inf"), 0.0, 0.5, 0.0, -0.25])}
    delta, _ = _delta_for(old, new)
    s = delta.statistics()
    _assert_stats(s, _ref_stats([_ref_delta(old["w"], new["w"])]))
    assert s["max"] == 1.0 and s["min"] == -2.0
    sp = delta.sparsity_at_threshold(0.3)
    assert sp["total_params"] == 8
    assert sp["kept_params"] == 5  # 1, -2, nan, inf, 0.5


def test_unchanged_model():
    model = tiny_qwen2()
    delta = ParameterSnapshot(model).compute_delta(ParameterSnapshot.live(model))
    s = delta.statistics()
    assert s == {k: 0.0 for k in s}
    sp = delta.sparsity_at_threshold(0.0)
    assert sp["kept_params"] == 0 and sp["kept_ratio"] == 0.0 and sp["dropped_ratio"] == 1.0
    assert sp["total_params"] == sum(p.numel() for p in model.parameters())


def test_empty_delta():
    delta = ParameterSnapshot().compute_delta(ParameterSnapshot())
    assert len(delta) == 0
    assert delta.sparsity_at_threshold(0.0)["total_params"] == 0
    assert delta.sparsity_at_threshold(0.0)["kept_ratio"] == 0.0


def test_lossy_old_snapshot_delta():
    model = nn.Linear(8, 8)
    old = ParameterSnapshot(model, dtype=torch.bfloat16)
    delta = old.compute_delta(ParameterSnapshot.live(model))
    refs = []
    for name, p in model.named_parameters():
        lossy = p.detach().to(torch.bfloat16)
        assert torch.equal(delta.deltas[name], p.detach() - lossy.float())
        refs.append(_ref_delta(lossy, p.detach()))
    _assert_stats(delta.statistics(), _ref_stats(refs))
    assert delta.statistics()["norm_l2"] > 0  # rounding to bf16 shows up as a change


# --- apply_sparse_mask ----------------------------------------------------------------------


def _ref_masked(old: dict, new: dict, keep: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float64 copies of the float32 delta with the dropped entries set to 0."""
    return {n: np.where(keep[n], _ref_delta(old[n], new[n]), 0.0) for n in old}


def _ref_magnitude_keep(old: dict, new: dict, t: float) -> dict[str, np.ndarray]:
    out = {}
    for n in old:
        d = _ref_delta(old[n], new[n])
        out[n] = ~(np.abs(d) <= np.float64(np.float32(t)))  # float32 threshold; NaN is kept
    return out


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_apply_sparse_mask_magnitude(dtype):
    old, new = _update_pair(dtype, seed=3)
    delta, _ = _delta_for(old, new)
    t = 1e-4
    out = delta.apply_sparse_mask(t)
    assert isinstance(out, ParameterDelta) and out.names == list(old)
    assert list(out.deltas) == list(old)
    ref = _ref_masked(old, new, _ref_magnitude_keep(old, new, t))
    for name in old:
        assert out.deltas[name].dtype == torch.float32 and out.deltas[name].shape == old[name].shape
        np.testing.assert_array_equal(out.deltas[name].numpy().reshape(-1), ref[name])


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_apply_sparse_mask_returns_a_delta_whose_statistics_match_numpy(dtype):
    old, new = _update_pair(dtype, seed=8)
    delta, _ = _delta_for(old, new)
    t = 3e-4
    sparse = delta.apply_sparse_mask(t)
    ref = _ref_masked(old, new, _ref_magnitude_keep(old, new, t))
    _assert_stats(sparse.statistics(), _ref_stats(list(ref.values())))
    for name, r in sparse.per_layer_statistics().items():
        _assert_stats(r, _ref_stats([ref[name]]))
    every = np.concatenate(list(ref.values()))
    for u in (0.0, t, 1e-3):
        got = sparse.sparsity_at_threshold(u)
        kept = int(np.sum(~(np.abs(every) <= np.float64(np.float32(u)))))
        assert got["total_params"] == every.size and got["kept_params"] == kept, u
        assert got["kept_ratio"] == kept / every.size
    # above t the masked update keeps exactly what the update keeps
    assert sparse.sparsity_at_threshold(t) == delta.sparsity_at_threshold(t)
    # its `new` snapshot holds the sparsely updated weights: old or new value, never rounded
    for name in old:
        keep = _ref_magnitude_keep(old, new, t)[name].reshape(old[name].shape)
        got = sparse.new.data[name].double().numpy()
        expected = np.where(keep, new[name].double().numpy(), old[name].double().numpy())
        np.testing.assert_array_equal(got, expected)


def test_apply_sparse_mask_deltas_stream_and_statistics_agree():
    old, new = _update_pair(torch.bfloat16, seed=9)
    delta, _ = _delta_for(old, new)
    sparse = delta.apply_sparse_mask(2e-4, mask_type="random", seed=5)
    for name in old:
        streamed = torch.cat([c.delta.clone() for c in sparse.stream([name])])
        assert torch.equal(streamed, sparse.deltas[name].reshape(-1))
    ref = [sparse.deltas[n].double().numpy().reshape(-1) for n in old]
    _assert_stats(sparse.statistics(), _ref_stats(ref))


def test_apply_sparse_mask_of_a_lossy_snapshot():
    g = _gen(11)
    model = Params({"w": torch.randn(3000, generator=g), "b": torch.randn(40, generator=g)})
    before = ParameterSnapshot(model, dtype=torch.bfloat16)  # lossy for float32 weights
    model.assign({"w": model.w.detach() + 1e-3 * torch.randn(3000, generator=g)})
    delta = before.compute_delta(ParameterSnapshot.live(model))
    sparse = delta.apply_sparse_mask(1e-3)
    for name in ("w", "b"):
        d = delta.deltas[name].double().numpy()
        expected = np.where(np.abs(d) > np.float32(1e-3), d, 0.0)
        np.testing.assert_array_equal(sparse.deltas[name].double().numpy(), expected)
        assert sparse.new.data[name].dtype == torch.float32


def test_apply_sparse_mask_random_density_matches_magnitude_kept_ratio():
    old, new = _update_pair(torch.float32, seed=4)
    delta, _ = _delta_for(old, new)
    t = 5e-4
    keep = delta.sparsity_at_threshold(t)["kept_ratio"]
    out = delta.apply_sparse_mask(t, mask_type="random", seed=7)
    kept = dropped_nonzero = 0
    for name, masked in out.deltas.items():
        d = delta.deltas[name]
        is_kept = masked != 0  # only non-zero entries can be seen to be kept
        assert torch.equal(masked[is_kept], d[is_kept])  # kept entries are the delta itself
        kept += int(is_kept.sum())
        dropped_nonzero += int(((masked == 0) & (d != 0)).sum())
    nonzero = kept + dropped_nonzero
    # each non-zero entry is kept independently with probability `keep`
    sigma = math.sqrt(keep * (1 - keep) / nonzero)
    assert abs(kept / nonzero - keep) < 6 * sigma, (kept / nonzero, keep)
    assert 0.05 < keep < 0.95  # the premise: a non-trivial ratio


def test_apply_sparse_mask_random_is_the_library_hash_mask():
    from grail.trainer.analysis.ops.masks import random_keep_mask

    old, new = _update_pair(torch.float32, seed=6)
    delta, _ = _delta_for(old, new)
    keep = delta.sparsity_at_threshold(1e-4)["kept_ratio"]
    sparse = delta.apply_sparse_mask(1e-4, mask_type="random", seed=3)
    for name in old:
        mask = random_keep_mask(old[name].numel(), keep, 3, name, 0, "cpu").numpy()
        ref = np.where(mask, _ref_delta(old[name], new[name]), 0.0)
        np.testing.assert_array_equal(sparse.deltas[name].double().numpy().reshape(-1), ref)


def test_apply_sparse_mask_random_seeded_and_rng_free():
    old, new = _update_pair(torch.float32, seed=5)
    delta, _ = _delta_for(old, new)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = delta.apply_sparse_mask(1e-4, mask_type="random", seed=3).deltas
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # the global seed plays no part
    b = delta.apply_sparse_mask(1e-4, mask_type="random", seed=3).deltas
    c = delta.apply_sparse_mask(1e-4, mask_type="random", seed=4).deltas
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_apply_sparse_mask_random_drops_non_finite_entries_to_zero():
    n = 2000
    old = {"w": torch.zeros(n)}
    new = {"w": torch.full((n,), float("nan"))}
    new["w"][::2] = float("inf")
    delta, _ = _delta_for(old, new)
    out = delta.apply_sparse_mask(0.0, mask_type="random", seed=1).deltas["w"]
    # keep ratio is 1 here (every entry changed): all kept
    assert torch.equal(out.isnan(), new["w"].isnan())
    new["w"][: n // 2] = 0.0  # half unchanged: keep ratio 0.5
    delta, _ = _delta_for(old, new)
    sparse = delta.apply_sparse_mask(0.0, mask_type="random", seed=1)
    out = sparse.deltas["w"]
    dropped = out == 0
    assert 0 < int(dropped[n // 2 :].sum()) < n // 2  # some non-finite entries were dropped ...
    finite_or_zero = torch.isfinite(out) | ~dropped
    assert bool(finite_or_zero.all())  # ... and read exactly 0, not NaN
    stats = sparse.sparsity_at_threshold(0.0)
    assert stats["kept_params"] == int((~dropped).sum())


def test_apply_sparse_mask_rejects_unknown_type():
    delta, _ = _delta_for({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="mask_type"):
        delta.apply_sparse_mask(0.0, mask_type="topk")


# --- CUDA: pinned, non-blocking snapshots -------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_snapshot_is_a_consistent_copy_even_when_the_model_moves_on():
    g = _gen(20)
    values = {"big": torch.randn(1 << 24, generator=g), "small": torch.randn(7, generator=g)}
    model = Params(values).cuda()
    snap = ParameterSnapshot(model)
    assert snap.device == "cpu"
    with torch.no_grad():  # queued right behind the copies on the same stream
        model.big.mul_(3.0)
        model.small.zero_()
    # read straight away through the public dict
    assert torch.equal(snap.data["big"], values["big"])
    assert torch.equal(snap.data["small"], values["small"])
    # capture again into the same pinned buffers, then change the model at once
    ptr = snap.data["big"].data_ptr()
    snap.capture_(model)
    with torch.no_grad():
        model.big.add_(1.0)
    delta = snap.compute_delta(ParameterSnapshot.live(model))
    assert snap.data["big"].data_ptr() == ptr
    tripled = values["big"] * 3.0  # what the snapshot holds (IEEE-exact on both devices)
    assert torch.equal(delta.deltas["big"].cpu(), (tripled + 1.0) - tripled)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_delta_statistics_match_float64_reference(dtype):
    old, new = _update_pair(dtype, seed=21)
    model = Params(old).cuda()
    before = ParameterSnapshot(model)
    model.assign({k: v.cuda() for k, v in new.items()})
    delta = before.compute_delta(ParameterSnapshot.live(model))
    refs = {n: _ref_delta(old[n], new[n]) for n in old}
    _assert_stats(delta.statistics(), _ref_stats(list(refs.values())))
    for name, ref in refs.items():
        _assert_stats(delta.per_layer_statistics()[name], _ref_stats([ref]))
    d = np.concatenate(list(refs.values()))
    for t in (0.0, 2.0**-20, 1e-6, 0.25):
        assert delta.sparsity_at_threshold(t)["kept_params"] == int(np.sum(np.abs(d) > t))
    # the random mask is the same on every device (a hash of the position, not an RNG)
    cpu_delta, _ = _delta_for(old, new)
    a = delta.apply_sparse_mask(1e-4, mask_type="random", seed=5)
    b = cpu_delta.apply_sparse_mask(1e-4, mask_type="random", seed=5)
    assert a.new.device == "cpu"  # the sparsely updated weights live with the snapshot
    assert list(a.deltas) == list(b.deltas)
    assert all(torch.equal(a.deltas[n].cpu(), b.deltas[n]) for n in b.deltas)
    masked = [b.deltas[n].double().numpy().reshape(-1) for n in b.deltas]
    _assert_stats(a.statistics(), _ref_stats(masked))


def test_kernel_streamable_is_declared_by_the_delta():
    """In-memory snapshots: yes; a subclass overriding stream(): no, unless it also says so;
    a snapshot whose mapping loads tensors on access: no."""
    from collections.abc import Mapping

    model = torch.nn.Linear(3, 2)
    old, new = ParameterSnapshot(model), ParameterSnapshot.live(model)
    assert old.in_memory and new.in_memory
    assert ParameterDelta(old, new).kernel_streamable

    class Observed(ParameterDelta):
        def stream(self, names=None, owned_only=True):
            yield from super().stream(names, owned_only)

    class ObservedButWhole(Observed):
        @property
        def kernel_streamable(self) -> bool:
            return True

    assert not Observed(old, new).kernel_streamable
    assert ObservedButWhole(old, new).kernel_streamable

    class Loading(Mapping):  # stands in for a checkpoint read on access
        def __init__(self, data):
            self._data = data

        def __getitem__(self, key):
            return self._data[key].clone()

        def __iter__(self):
            return iter(self._data)

        def __len__(self):
            return len(self._data)

    lazy = ParameterSnapshot(model)
    lazy.data = Loading(dict(lazy.data))
    assert not lazy.in_memory
    assert not ParameterDelta(lazy, new).kernel_streamable
    assert not ParameterDelta(old, lazy).kernel_streamable
