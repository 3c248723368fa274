"""``grail-analysis mask`` against numpy, its metadata, and the online comparison with a mask.

The online part (``drift/overlap/{name}/*``) is checked through the function the drift family
calls on every piece of the live changed set: its numbers must equal those of the offline
``overlap`` command for the same base, live weights and reference run.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from grail.trainer.analysis import ParameterSnapshot, load_mask
from grail.trainer.analysis.cli import main
from grail.trainer.analysis.offline.overlap import OverlapOptions, budget, run_overlap
from grail.trainer.analysis.ops.changed import ReferenceOverlap, changed_flags
from tests.unit.trainer.analysis.ops.test_changed import bf16_reference

SHAPES = {"model.layers.0.mlp.up_proj.weight": (24, 16), "model.norm.weight": (16,),
          "lm_head.weight": (30, 16)}


def _checkpoints(tmp_path, seed=0, scale=3e-3):
    rng = np.random.default_rng(seed)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    tuned = {}
    for n, w in base.items():
        d = (rng.standard_normal(w.shape) * scale * np.abs(w)).astype(np.float32)
        d[rng.random(w.shape) < 0.2] = 0.0
        tuned[n] = w + d
    paths = []
    for name, tensors in (("base", base), ("tuned", tuned)):
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file({n: torch.from_numpy(t) for n, t in tensors.items()}, paths[-1])
    return base, tuned, paths


def _cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_threshold_mask_and_its_metadata(tmp_path, capsys):
    base, tuned, (b, t) = _checkpoints(tmp_path)
    out = tmp_path / "masks" / "m.safetensors"
    rc, stdout, err = _cli(capsys, "mask", b, t, "--out", str(out), "--threshold", "1e-3")
    assert rc == 0, err
    mask = load_mask(out)
    expected = {n: np.abs(tuned[n] - base[n]) > np.float32(1e-3) for n in SHAPES}
    for n, e in expected.items():
        assert np.array_equal(mask[n].numpy(), e)
    changed = sum(int(e.sum()) for e in expected.values())
    total = sum(e.size for e in expected.values())
    assert (mask.changed, mask.num_params, mask.density) == (changed, total, changed / total)
    assert mask.criterion.kind == "threshold" and mask.criterion.value == 1e-3
    assert mask.shapes == SHAPES
    for side, path in (("base", b), ("tuned", t)):
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        assert mask.inputs[side]["files"][0]["sha256"] == digest
        assert mask.inputs[side]["path"] == path
    assert f"{changed:,} of {total:,} entries changed" in stdout


def _mask(capsys, out, b: str, t: str, *criterion: str):
    """``grail-analysis mask b t --out out *criterion`` (must succeed), read back."""
    rc, _, err = _cli(capsys, "mask", b, t, "--out", str(out), *criterion)
    assert rc == 0, err
    return load_mask(out)


def test_bf16_view_and_exact_masks(tmp_path, capsys):
    base, tuned, (b, t) = _checkpoints(tmp_path, seed=1)
    mask = _mask(capsys, tmp_path / "v.safetensors", b, t, "--bf16-view", "--no-hash")
    for n in SHAPES:
        expected = bf16_reference(tuned[n]) != bf16_reference(base[n])
        assert np.array_equal(mask[n].numpy(), expected)
    assert 0.1 < mask.density < 0.9 and "sha256" not in mask.inputs["base"]["files"][0]
    exact = _mask(capsys, tmp_path / "e.safetensors", b, t, "--threshold", "0")
    for n in SHAPES:
        assert np.array_equal(exact[n].numpy(), tuned[n] != base[n])


def test_keep_ratio_mask_is_the_exact_top_k(tmp_path, capsys):
    base, tuned, (b, t) = _checkpoints(tmp_path, seed=2)
    mask = _mask(capsys, tmp_path / "k.safetensors", b, t, "--keep-ratio", "0.05")
    mags = np.concatenate([np.abs(tuned[n] - base[n]).reshape(-1) for n in mask.shapes])
    k = budget(0.05, mags.size)
    nonzero = np.sort(mags[mags > 0])
    assert np.unique(nonzero).size == nonzero.size  # no ties among the changed entries
    chosen = np.zeros(mags.size, dtype=bool)
    chosen[np.argsort(-mags, kind="stable")[:k]] = True
    got = np.concatenate([mask[n].numpy().reshape(-1) for n in mask.shapes])
    assert mask.changed == k and np.array_equal(got, chosen)
    assert mask.criterion.kind == "keep_ratio" and mask.criterion.value == 0.05


def test_bad_mask_inputs_print_one_line_and_exit_1(tmp_path, capsys):
    _, _, (b, t) = _checkpoints(tmp_path, seed=3)
    save_file({"other": torch.zeros(3)}, tmp_path / "other.safetensors")
    out = str(tmp_path / "m.safetensors")
    cases = [
        ([b, t, "--out", out], "exactly one of"),
        ([b, t, "--out", str(tmp_path / "m.bin"), "--threshold", "0"], "must end in .safetensors"),
        ([b, str(tmp_path / "missing"), "--out", out, "--bf16-view"], "does not exist"),
        ([b, str(tmp_path / "other.safetensors"), "--out", out, "--bf16-view"], "names differ"),
        ([b, t, "--out", out, "--keep-ratio", "0"], "keep ratio must be in (0, 1]"),
        ([b, t, "--out", out, "--threshold", "nan"], "threshold must be"),
    ]
    for argv, message in cases:
        rc, _, err = _cli(capsys, "mask", *argv)
        assert rc == 1, argv
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "m.safetensors").exists()
    assert not list(tmp_path.glob("*.partial*"))
    rc, _, err = _cli(capsys, "mask", b, t, "--out", out, "--threshold", "0", "--bf16-view")
    assert rc == 2 and "not allowed with" in err


def test_mask_refuses_to_write_over_its_own_inputs(tmp_path, capsys):
    """``--out`` naming BASE or TUNED, or a file inside a model directory given as one, would
    replace a checkpoint by a mask: refused, the inputs untouched."""
    _, _, (b, t) = _checkpoints(tmp_path, seed=4)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({n: torch.zeros(s) for n, s in SHAPES.items()}, model_dir / "model.safetensors")
    before = {p: Path(p).read_bytes() for p in (b, t, model_dir / "model.safetensors")}
    for base, tuned, out, label in ((b, t, t, "TUNED"), (b, t, b, "BASE"),
                                    (b, str(model_dir), model_dir / "mask.safetensors", "TUNED")):
        rc, _, err = _cli(capsys, "mask", base, tuned, "--out", str(out), "--threshold", "0")
        assert rc == 1 and f"would overwrite {label}" in err, err
    assert {p: Path(p).read_bytes() for p in before} == before
    assert not (model_dir / "mask.safetensors").exists()


def _models(seed_ref: int, seed_now: int, scale: float):
    """A tiny base model and two fine-tunes of it (sparse-ish updates of relative size
    ``scale``): the reference run and the live one."""
    from tests.conftest import tiny_qwen2

    base = tiny_qwen2()
    out = []
    for seed in (seed_ref, seed_now):
        model = tiny_qwen2()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                noise = torch.randn(p.shape, generator=gen) * scale * p.abs()
                noise[torch.rand(p.shape, generator=gen) < 0.4] = 0.0
                p.add_(noise)
        out.append(model)
    return base, *out


@pytest.mark.parametrize(("criterion", "flags"), [("exact", ["--threshold", "0"]),
                                                  ("bf16_view", ["--bf16-view"])])
def test_online_overlap_equals_offline_overlap(tmp_path, capsys, criterion, flags):
    """The live run's changed set since the base, fed in shard-like pieces at odd offsets and in
    shuffled order, against the saved mask of the reference run: the same numbers as
    ``grail-analysis overlap BASE NOW REF`` with the same criterion."""
    base, ref, now = _models(1, 2, 4e-3)
    paths = {}
    for name, model in (("base", base), ("ref", ref), ("now", now)):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  paths[name])
    mask_path = str(tmp_path / "ref-mask.safetensors")
    rc, _, err = _cli(capsys, "mask", paths["base"], paths["ref"], "--out", mask_path, *flags)
    assert rc == 0, err

    mask = load_mask(mask_path)
    snap = ParameterSnapshot(base)
    delta = snap.compute_delta(ParameterSnapshot.live(now))
    assert mask.check_shapes({n: t.shape for n, t in snap.data.items()}) == []
    pieces = []
    rng = random.Random(0)
    for c in delta.stream():
        changed = changed_flags(mask.criterion, c.old, c.new, c.delta)
        cut = sorted(rng.sample(range(1, changed.numel()), 3)) if changed.numel() > 4 else []
        for lo, hi in zip([0, *cut], [*cut, changed.numel()]):
            pieces.append((c.name, c.start + lo, changed[lo:hi].clone()))
    rng.shuffle(pieces)
    acc = ReferenceOverlap(mask)
    for name, offset, flags_ in pieces:
        acc.update(name, offset, flags_)
    online = acc.result()

    doc = run_overlap(OverlapOptions(paths["base"], [paths["now"], paths["ref"]], keep_ratios=[],
                                     bf16_view=criterion == "bf16_view", hash_files=False))
    g = doc["pairs"][0]["global"]
    assert 0.05 < g["density_a"] < 0.95 and 0.05 < g["density_b"] < 0.95
    assert online == {
        "jaccard": g["jaccard"],
        "jaccard_random": g["jaccard_random"],
        "overlap_now_in_ref": g["overlap_a_in_b"],
        "overlap_ref_in_now": g["overlap_b_in_a"],
    }
    assert mask.density == doc["runs"]["ref"]["density"]
