"""ParameterChangeMetrics against float64 numpy references on real models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis.config import format_threshold
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics import ParameterChangeMetrics
from tests.conftest import tiny_gpt2, tiny_qwen2

from ..reference import bf16_bits, delta32

THRESHOLDS = [0.0, 1e-8, 1e-6, 1e-4]

pytestmark = pytest.mark.usefixtures("kernel_path")


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int = 1, scale: float = 1e-5) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(model.parameters()):
        noise = torch.randn(p.shape, generator=gen) * scale * (1 + i % 3)
        noise[torch.rand(p.shape, generator=gen) < 0.3] = 0.0  # unchanged entries
        p.add_(noise.to(p.dtype))
        if p.dim() == 2:  # an exact tie at a threshold and a sign flip
            p.view(-1)[0] = 0.25
    # a sign flip that is not a tie
    first = next(model.parameters())
    first.view(-1)[1] = -first.view(-1)[1] if first.view(-1)[1] != 0 else 1.0


def _reference(old: dict, new: dict, thresholds=THRESHOLDS) -> dict:
    d64, d32, eq, bf, flips, old_sq = [], [], 0, 0, 0, 0.0
    for name in new:
        n, o = new[name], old[name]
        d32.append(delta32(n, o))
        d64.append(n.double().numpy().reshape(-1) - o.double().numpy().reshape(-1))
        nn, oo = n.float().numpy().reshape(-1), o.float().numpy().reshape(-1)
        eq += int((nn == oo).sum())
        bf += int((bf16_bits(nn) == bf16_bits(oo)).sum())
        flips += int((np.sign(nn.astype(np.float64)) * np.sign(oo.astype(np.float64)) < 0).sum())
        old_sq += float((oo.astype(np.float64) ** 2).sum())
    d32, d64 = np.concatenate(d32), np.concatenate(d64)
    fin = np.isfinite(d32)
    f32, f64 = d32[fin].astype(np.float64), d64[fin]
    total = d32.size
    out = {
        "norm_l2": float(np.sqrt((f64**2).sum())),
        "norm_l1": float(np.abs(f64).sum()),
        "norm_max": float(np.abs(f64).max()),
        "mean": float(f64.mean()),
        "std": float(f64.std()),
        "min": float(f64.min()),
        "max": float(f64.max()),
        "relative_norm": float(np.sqrt((f64**2).sum()) / np.sqrt(old_sq)),
        "exact_unchanged_ratio": eq / total,
        "bf16_unchanged_ratio": bf / total,
        "sign_flip_ratio": flips / total,
        "nonfinite_count": float((~fin).sum()),
        "num_params": float(total),
    }
    for t in thresholds:
        sp = int((np.abs(f32) <= t).sum()) / total
        out[f"sparsity_at_{format_threshold(t)}"] = sp
        out[f"changed_ratio_at_{format_threshold(t)}"] = 1 - sp
    return out


def _compare(metrics: dict, ref: dict, prefix: str = "param_change/") -> None:
    for key, value in ref.items():
        got = metrics[prefix + key]
        if "ratio" in key or "sparsity" in key or key.endswith("count") or key == "num_params":
            assert got == value, key  # counts are exact
        elif key in ("mean", "std"):
            assert got == pytest.approx(
                value, rel=1e-5, abs=1e-6 * ref["norm_l1"] / ref["num_params"]
            )
        else:
            assert got == pytest.approx(value, rel=1e-6), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_global_metrics_match_reference(dtype):
    model = tiny_qwen2(dtype=dtype)
    old = ParameterSnapshot(model)
    old_copy = {n: t.clone() for n, t in old.data.items()}
    _perturb(model, scale=1e-3 if dtype != torch.float32 else 1e-5)
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = ParameterChangeMetrics(THRESHOLDS, track_sign_flips=True).compute(
        old.compute_delta(ParameterSnapshot.live(model))
    )
    _compare(metrics, _reference(old_copy, new))
    if dtype == torch.bfloat16:
        assert (
            metrics["param_change/bf16_unchanged_ratio"]
            == metrics["param_change/exact_unchanged_ratio"]
        )


def test_large_tensor_spans_many_chunks_and_nonfinite_is_excluded():
    model = torch.nn.Linear(700, 1000)  # 700k weights: several CPU chunks
    old = ParameterSnapshot(model)
    old_copy = {n: t.clone() for n, t in old.data.items()}
    _perturb(model)
    with torch.no_grad():
        model.weight[3, 3] = float("nan")
        model.weight[4, 4] = float("inf")
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = ParameterChangeMetrics(THRESHOLDS, track_sign_flips=True).compute(
        old.compute_delta(ParameterSnapshot.live(model))
    )
    ref = _reference(old_copy, new)
    assert ref["nonfinite_count"] == 2.0
    _compare(metrics, ref)
    assert all(math.isfinite(v) for v in metrics.values())


def test_bf16_model_without_update_is_fully_sparse():
    model = tiny_qwen2(dtype=torch.bfloat16)
    old = ParameterSnapshot(model)
    m = ParameterChangeMetrics(THRESHOLDS).compute(old.compute_delta(ParameterSnapshot.live(model)))
    assert m["param_change/sparsity_at_0e+00"] == 1.0
    assert m["param_change/norm_l2"] == 0.0
    assert m["param_change/exact_unchanged_ratio"] == 1.0
    assert m["param_change/bf16_unchanged_ratio"] == 1.0
    assert m["param_change/relative_norm"] == 0.0


def test_fp32_update_below_bf16_resolution_is_dense_exactly_but_sparse_in_bf16():
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    old = ParameterSnapshot(model)
    with torch.no_grad():
        model.weight.add_(1e-4)  # < 2^-9: lost in bf16, kept in fp32
    m = ParameterChangeMetrics(THRESHOLDS).compute(old.compute_delta(ParameterSnapshot.live(model)))
    w = 64 * 64 / (64 * 64 + 64)
    assert m["param_change/exact_unchanged_ratio"] == pytest.approx(1 - w)
    assert m["param_change/bf16_unchanged_ratio"] == 1.0


def _group_reference(model, old_copy, new, groups_of):
    by_group: dict[str, list[str]] = {}
    for name in new:
        g = groups_of(name)
        if g is not None:
            by_group.setdefault(g, []).append(name)
    out = {}
    for g, names in by_group.items():
        d = np.concatenate([delta32(new[n], old_copy[n]) for n in names]).astype(np.float64)
        o = np.concatenate([old_copy[n].double().numpy().reshape(-1) for n in names])
        eq = sum(int((new[n] == old_copy[n]).sum()) for n in names)
        out[g] = {
            "mean_abs_delta": float(np.abs(d).mean()),
            "norm_l2": float(np.sqrt((d**2).sum())),
            "relative_norm": float(np.sqrt((d**2).sum()) / np.sqrt((o**2).sum())),
            "sparsity": eq / d.size,
            **{
                f"sparsity_at_{format_threshold(t)}": float((np.abs(d) <= t).mean())
                for t in THRESHOLDS
            },
        }
    return out


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "mlp"])
def test_per_layer_and_component_groups(arch):
    if arch == "qwen2":
        model = tiny_qwen2()
        layer_of = lambda n: f"layer_{n.split('.')[2]}" if n.startswith("model.layers.") else None  # noqa: E731
        comp_of = lambda n: n.split(".")[-2]  # noqa: E731
        expected_components = {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "input_layernorm",
            "post_attention_layernorm",
            "embed_tokens",
            "norm",
            "lm_head",
        }
    elif arch == "gpt2":
        model = tiny_gpt2()
        layer_of = lambda n: f"layer_{n.split('.')[2]}" if n.startswith("transformer.h.") else None  # noqa: E731

        def comp_of(n):
            parts = n.split(".")[:-1]
            if parts[-1] == "c_proj":
                return ".".join(parts[-2:])
            return parts[-1]

        expected_components = {
            "c_attn",
            "attn.c_proj",
            "c_fc",
            "mlp.c_proj",
            "ln_1",
            "ln_2",
            "wte",
            "wpe",
            "ln_f",
        }
    else:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        layer_of = lambda n: f"layer_{n.split('.')[0]}"  # noqa: E731
        comp_of = lambda n: n.split(".")[-1]  # noqa: E731
        expected_components = {"weight", "bias"}
    old = ParameterSnapshot(model)
    old_copy = {n: t.clone() for n, t in old.data.items()}
    _perturb(model)
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = ParameterChangeMetrics(THRESHOLDS, per_layer=True, track_components=True).compute(
        old.compute_delta(ParameterSnapshot.live(model))
    )
    layers = _group_reference(model, old_copy, new, layer_of)
    comps = _group_reference(model, old_copy, new, comp_of)
    assert set(comps) == expected_components
    for prefix, groups in (("param_change/", layers), ("param_change/component/", comps)):
        for g, ref in groups.items():
            for k, v in ref.items():
                got = metrics[f"{prefix}{g}/{k}"]
                if "sparsity" in k:
                    assert got == v, (g, k)
                else:
                    assert got == pytest.approx(v, rel=1e-6), (g, k)
    n_layer_keys = sum(1 for k in metrics if k.startswith("param_change/layer_"))
    assert n_layer_keys == len(layers) * (4 + len(THRESHOLDS))


def test_keys_are_stable_and_floats():
    model = tiny_qwen2()
    computer = ParameterChangeMetrics(THRESHOLDS, per_layer=True, track_components=True)
    old = ParameterSnapshot(model)
    k1 = computer.compute(old.compute_delta(ParameterSnapshot.live(model)))
    _perturb(model)
    k2 = computer.compute(old.compute_delta(ParameterSnapshot.live(model)))
    assert k1.keys() == k2.keys()
    assert all(type(v) is float for v in k2.values())


def test_lossy_snapshot_counts_in_snapshot_precision():
    model = torch.nn.Linear(32, 32)
    old = ParameterSnapshot(model, dtype=torch.bfloat16)
    m = ParameterChangeMetrics([0.0]).compute(old.compute_delta(ParameterSnapshot.live(model)))
    # nothing changed: in the snapshot's precision every entry is unchanged ...
    assert m["param_change/exact_unchanged_ratio"] == 1.0
    assert m["param_change/bf16_unchanged_ratio"] == 1.0
    # ... while the float32 delta against rounded values is mostly non-zero (why "auto" is default)
    assert m["param_change/sparsity_at_0e+00"] < 0.1


def test_a_delta_that_is_not_kernel_streamable_is_streamed_chunk_by_chunk(kernel_path):
    """The computer asks the delta whether the kernels may read it whole: a subclass that
    overrides stream() (to observe every chunk) says no and sees every parameter streamed,
    with the same numbers (up to the eager path's float32 chunk sums)."""
    from grail.trainer.analysis.core.snapshot import ParameterDelta

    class Observed(ParameterDelta):
        def stream(self, names=None, owned_only=True):
            for chunk in super().stream(names, owned_only):
                seen.add(chunk.name)
                yield chunk

    seen: set[str] = set()
    model = tiny_qwen2()
    old = ParameterSnapshot(model)
    _perturb(model)
    new = ParameterSnapshot.live(model)
    plain, observed = ParameterDelta(old, new), Observed(old, new)
    assert plain.kernel_streamable and not observed.kernel_streamable
    computer = ParameterChangeMetrics(THRESHOLDS, per_layer=True, track_sign_flips=True)
    want = computer.compute(plain)
    seen.clear()
    got = computer.compute(observed)
    assert seen == set(observed.names)  # every parameter went through stream()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-15, nan_ok=True), k
