"""drift/overlap/{name}/*: the live changed set since the base against saved mask files.

A reference run is trained from a base and saved; masks of it are written by the library's own
writer (``grail-analysis mask``) under every criterion; a second run from the same base is
analysed with those masks. Its four values must equal a float64/boolean numpy computation from
the base and live weights and the mask's bits, and the offline ``grail-analysis overlap`` of the
same pair.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.core.mask_file import ChangeCriterion, MaskFileError, MaskWriter
from grail.trainer.analysis.metrics.drift_overlap import ReferenceMasks, overlap_key
from grail.trainer.analysis.offline.mask import MaskOptions, run_mask
from grail.trainer.analysis.offline.overlap import OverlapOptions, run_overlap
from tests.conftest import tiny_qwen2

from ..reference import bf16_bits

VALUES = ("jaccard", "jaccard_random", "overlap_now_in_ref", "overlap_ref_in_now")
CRITERIA = {  # reference name -> run_mask options (one criterion each)
    "t0": {"threshold": 0.0},
    "t4": {"threshold": 1e-4},
    "bf16": {"bf16_view": True},
    "keep": {"keep_ratio": 0.05},
}
STEPS = 4  # interval 2: the base at step 1 (set before), drift measured at step 4


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}


def _train(model: torch.nn.Module, seed: int, steps: int, manager=None) -> list[dict]:
    """AdamW without weight decay on random token batches: rows of tokens never seen keep
    their exact values, so the exact changed set is not everything."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if manager is not None:
            out = manager.on_optimizer_step(model)
            if out:
                records.append(out)
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Base, a reference run and its masks, a second run analysed against them."""
    tmp = tmp_path_factory.mktemp("overlap")
    base_model = tiny_qwen2(seed=1)
    base = _weights(base_model)
    ref_model = tiny_qwen2(seed=1)
    _train(ref_model, seed=10, steps=5)
    paths = {"base": tmp / "base.safetensors", "ref": tmp / "ref.safetensors"}
    save_file(base, paths["base"])
    save_file(_weights(ref_model), paths["ref"])
    masks = {}
    for name, opts in CRITERIA.items():
        masks[name] = str(tmp / f"{name}.safetensors")
        run_mask(MaskOptions(str(paths["base"]), str(paths["ref"]), masks[name],
                             hash_files=False, **opts))
    # "exact" written by hand from numpy flags, so the writer's exact kind is covered too
    masks["exact"] = str(tmp / "exact.safetensors")
    ref = _weights(ref_model)
    writer = MaskWriter(masks["exact"], {n: t.shape for n, t in base.items()},
                        ChangeCriterion("exact"))
    for n, t in base.items():
        writer.write(n, torch.from_numpy(ref[n].numpy() != t.numpy()))
    writer.finish()
    model = tiny_qwen2(seed=1)
    cfg = AnalysisConfig(interval=2, drift_enabled=True, sparse_quality_enabled=False,
                         drift_reference_masks=masks)
    manager = ModelAnalysisManager.create(cfg)
    manager.set_base(base, model=model)
    records = _train(model, seed=20, steps=STEPS, manager=manager)
    now = _weights(model)
    paths["now"] = tmp / "now.safetensors"
    save_file(now, paths["now"])
    return {"tmp": tmp, "base": base, "now": now, "masks": masks, "records": records,
            "paths": paths, "names": [n for n, _ in model.named_parameters()]}


def _reference_bits(path: str, names: list[str], shapes: dict) -> np.ndarray:
    """The mask's flags in ``names`` order, read with numpy (independent of the library)."""
    raw = load_numpy(path)
    out = [np.unpackbits(raw[n], bitorder="little")[: int(np.prod(shapes[n]))] for n in names]
    return np.concatenate(out).astype(bool)


def _live_flags(kind: str, value: float | None, base: dict, now: dict, names: list[str]
                ) -> np.ndarray:
    b = np.concatenate([base[n].numpy().ravel() for n in names])
    w = np.concatenate([now[n].numpy().ravel() for n in names])
    d = (w - b).astype(np.float32)  # float32, rounded once, as the library's delta
    if kind == "exact":
        return w != b
    if kind == "threshold":
        return ~(np.abs(d.astype(np.float64)) <= value)  # NaN counts as changed
    if kind == "bf16_view":
        return bf16_bits(w) != bf16_bits(b)
    assert kind == "keep_ratio"
    k = max(1, min(d.size, round(value * d.size)))
    order = np.argsort(-np.abs(d.astype(np.float64)), kind="stable")  # ties: position order
    flags = np.zeros(d.size, dtype=bool)
    flags[order[:k]] = True
    return flags


def _expected(now: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    n, a, b = now.size, int(now.sum()), int(ref.sum())
    inter = int((now & ref).sum())
    da, db = a / n, b / n
    return {
        "jaccard": inter / (a + b - inter),
        "jaccard_random": da * db / (da + db - da * db),
        "overlap_now_in_ref": inter / a,
        "overlap_ref_in_now": inter / b,
    }


@pytest.mark.parametrize("name", ["exact", *CRITERIA])
def test_online_overlap_equals_a_numpy_computation_for_every_criterion(runs, name):
    (m,) = runs["records"]
    names, base, now = runs["names"], runs["base"], runs["now"]
    shapes = {n: tuple(t.shape) for n, t in base.items()}
    kind, value = {"exact": ("exact", None), "t0": ("threshold", 0.0),
                   "t4": ("threshold", 1e-4), "bf16": ("bf16_view", None),
                   "keep": ("keep_ratio", 0.05)}[name]
    live = _live_flags(kind, value, base, now, names)
    ref = _reference_bits(runs["masks"][name], names, shapes)
    want = _expected(live, ref)
    assert 0 < live.mean() < 1 and 0 < ref.mean() < 1  # neither set is trivial
    for v in VALUES:
        assert m[f"drift/overlap/{name}/{v}"] == pytest.approx(want[v], rel=1e-12, abs=0), v
    assert want["jaccard"] != pytest.approx(want["jaccard_random"], rel=1e-3)


@pytest.mark.parametrize(("name", "opts"), [("t0", {}), ("t4", {"threshold": 1e-4}),
                                            ("bf16", {"bf16_view": True})])
def test_online_jaccard_equals_the_offline_overlap_of_the_same_pair(runs, name, opts):
    (m,) = runs["records"]
    p = runs["paths"]
    doc = run_overlap(OverlapOptions(str(p["base"]), [str(p["ref"]), str(p["now"])],
                                     out=str(runs["tmp"] / f"overlap-{name}"), keep_ratios=[0.05],
                                     per_layer=False, hash_files=False, **opts))
    g = doc["pairs"][0]["global"]
    assert m[f"drift/overlap/{name}/jaccard"] == pytest.approx(g["jaccard"], rel=1e-12)
    assert m[f"drift/overlap/{name}/jaccard_random"] == pytest.approx(g["jaccard_random"],
                                                                      rel=1e-12)
    assert m[f"drift/overlap/{name}/overlap_ref_in_now"] == pytest.approx(g["overlap_a_in_b"],
                                                                          rel=1e-12)
    if name == "t0":  # both runs' exact top-5% sets: the keep-ratio mask's comparison
        assert m["drift/overlap/keep/jaccard"] == pytest.approx(
            g["topk_jaccard_at_keep_0.05"], rel=1e-12)


def test_keys_are_built_by_the_key_grammar():
    assert overlap_key("rl", "jaccard_random") == "drift/overlap/rl/jaccard_random"
    assert overlap_key("rl", "overlap_now_in_ref") == "drift/overlap/rl/overlap_now_in_ref"


@pytest.mark.parametrize("opts", [{"threshold": 0.0}, {"bf16_view": True},
                                  {"keep_ratio": 0.05}])
def test_a_mask_of_the_very_same_weights_overlaps_completely(tmp_path, opts):
    model = tiny_qwen2(seed=2)
    base = _weights(model)
    _train(model, seed=5, steps=3)
    save_file(base, tmp_path / "base.safetensors")
    save_file(_weights(model), tmp_path / "now.safetensors")
    mask = str(tmp_path / "same.safetensors")
    run_mask(MaskOptions(str(tmp_path / "base.safetensors"), str(tmp_path / "now.safetensors"),
                         mask, hash_files=False, **opts))
    manager = ModelAnalysisManager.create(AnalysisConfig(
        interval=2, drift_enabled=True, sparse_quality_enabled=False,
        drift_reference_masks={"same": mask}))
    manager.set_base(base, model=model)
    out = [manager.on_optimizer_step(model) for _ in range(4)][-1]  # weights stay at "now"
    assert out["drift/overlap/same/jaccard"] == 1.0
    assert out["drift/overlap/same/overlap_now_in_ref"] == 1.0
    assert out["drift/overlap/same/overlap_ref_in_now"] == 1.0
    assert 0 < out["drift/overlap/same/jaccard_random"] < 1


def test_nothing_changed_yet_gives_nan_ratios_of_zero_denominators(tmp_path):
    model = tiny_qwen2(seed=2)
    path = str(tmp_path / "m.safetensors")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    writer = MaskWriter(path, shapes, ChangeCriterion("exact"))
    for n, s in shapes.items():
        writer.write(n, torch.ones(s, dtype=torch.bool))
    writer.finish()
    manager = ModelAnalysisManager.create(AnalysisConfig(
        interval=2, drift_enabled=True, sparse_quality_enabled=False,
        drift_reference_masks={"all": path}))
    out = [manager.on_optimizer_step(model) for _ in range(4)][-1]  # nothing ever moves
    assert out["drift/overlap/all/jaccard"] == 0.0  # |now ∩ ref| / |ref| with |now| = 0
    assert out["drift/overlap/all/overlap_ref_in_now"] == 0.0
    assert math.isnan(out["drift/overlap/all/overlap_now_in_ref"])  # 0 / |now| = 0 / 0
    assert out["drift/overlap/all/jaccard_random"] == 0.0


def _mask_for(path, shapes: dict) -> str:
    writer = MaskWriter(path, shapes, ChangeCriterion("threshold", 1e-6))
    for n, s in shapes.items():
        writer.write(n, torch.zeros(s, dtype=torch.bool))
    writer.finish()
    return str(path)


def _mismatched(tmp_path) -> tuple[torch.nn.Module, AnalysisConfig]:
    model = tiny_qwen2(seed=3)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    other = {n: tuple(p.shape) for n, p in tiny_qwen2(hidden=16, seed=3).named_parameters()}
    missing = {n: s for n, s in shapes.items() if n != "model.norm.weight"}
    cfg = AnalysisConfig(interval=2, drift_enabled=True, sparse_quality_enabled=False,
                         drift_reference_masks={
                             "good": _mask_for(tmp_path / "good.safetensors", shapes),
                             "small": _mask_for(tmp_path / "small.safetensors", other),
                             "partial": _mask_for(tmp_path / "partial.safetensors", missing)})
    return model, cfg


def test_masks_that_do_not_fit_raise_one_error_naming_them_at_set_base(tmp_path):
    model, cfg = _mismatched(tmp_path)
    manager = ModelAnalysisManager.create(cfg)
    with pytest.raises(MaskFileError) as err:
        manager.set_base(model, model=model)
    text = str(err.value)
    assert "'small'" in text and "'partial'" in text and "'good'" not in text
    assert "model.norm.weight" in text  # the missing parameter
    assert "model.embed_tokens.weight [128, 32] vs [128, 16]" in text  # a shape that differs


def test_a_mismatch_found_at_the_first_step_raises_once_then_reports_nan(tmp_path, caplog):
    model, cfg = _mismatched(tmp_path)
    manager = ModelAnalysisManager.create(cfg)
    with pytest.raises(MaskFileError, match=r"model\.norm\.weight"):
        manager.on_optimizer_step(model)  # the base is taken here: not logged and skipped
    assert manager.base_snapshot is not None
    with caplog.at_level(logging.WARNING):
        out = [manager.on_optimizer_step(model) for _ in range(3)][-1]  # training goes on
    assert out["drift/norm_l2"] == 0.0  # the rest of drift/* is measured
    assert all(math.isnan(out[f"drift/overlap/{r}/{v}"])
               for r in ("good", "small", "partial") for v in VALUES)
    assert "drift/overlap/* is NaN" in caplog.text


def test_ensure_base_raises_too(tmp_path):
    model, cfg = _mismatched(tmp_path)
    with pytest.raises(MaskFileError, match="'small'"):
        ModelAnalysisManager.create(cfg).ensure_base(model)  # the HF callback's train begin


def test_masks_are_opened_lazily_and_kept_packed(tmp_path):
    model = tiny_qwen2(seed=3)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    path = _mask_for(tmp_path / "m.safetensors", shapes)
    refs = ReferenceMasks({"m": path})
    assert refs.masks["m"].loaded_bytes() == 0  # the header only
    from grail.trainer.analysis.core.snapshot import ParameterSnapshot

    base = ParameterSnapshot(model)
    refs.check(base)
    refs.compute(base.compute_delta(ParameterSnapshot.live(model)), base)
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert refs.masks["m"].loaded_bytes() == sum(-(-int(np.prod(s)) // 8)
                                                 for s in shapes.values()) < total / 7
