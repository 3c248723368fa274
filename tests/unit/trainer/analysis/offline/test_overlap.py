"""``grail-analysis overlap`` against numpy: planted and random sets, signs, views, top-k, RSS."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from grail.trainer.analysis.cli import main
from grail.trainer.analysis.offline.checkpoint import CheckpointError
from grail.trainer.analysis.offline.overlap import (
    OverlapOptions,
    budget,
    checkpoint_labels,
    run_overlap,
)
from tests.unit.trainer.analysis.ops.test_changed import bf16_reference

from ..cli_memory import cli_peak_rss

SHAPES = {
    "model.embed_tokens.weight": (40, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (16, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (40, 8),
}
LAYER = {n: (n.split(".")[2] if ".layers." in n else "other") for n in SHAPES}
LAYER = {n: f"layer_{v}" if v != "other" else v for n, v in LAYER.items()}
COMPONENT = {n: n.split(".")[-2] for n in SHAPES}


def _save(path: Path, tensors: dict[str, np.ndarray]) -> str:
    save_file({n: torch.from_numpy(np.ascontiguousarray(t)) for n, t in tensors.items()}, path)
    return str(path)


def _runs(tmp_path, base, deltas, names=("a", "b", "c")):
    """BASE and one checkpoint per delta dict; returns the paths."""
    paths = [_save(tmp_path / "base.safetensors", base)]
    for name, d in zip(names, deltas):
        paths.append(_save(tmp_path / f"{name}.safetensors",
                           {n: (base[n] + d[n]).astype(np.float32) for n in base}))
    return paths


def _base(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def _planted(base, seed, density):
    """A delta of +-0.5 on a random set of the given density (a dict of float32 arrays)."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, w in base.items():
        chosen = rng.random(w.shape) < density
        out[n] = np.where(chosen, rng.choice([-0.5, 0.5], size=w.shape), 0.0).astype(np.float32)
    return out


def _scope(names, base, run_a, run_b):
    """Counts of one scope from numpy, with the deltas of the stored checkpoints."""
    da = np.concatenate([(run_a[n] - base[n]).reshape(-1).astype(np.float64) for n in names])
    db = np.concatenate([(run_b[n] - base[n]).reshape(-1).astype(np.float64) for n in names])
    ca, cb = da != 0, db != 0
    both = ca & cb
    return {
        "num_params": da.size,
        "intersection": int(both.sum()),
        "union": int((ca | cb).sum()),
        "density_a": ca.mean(),
        "density_b": cb.mean(),
        "same": int((both & (np.signbit(da) == np.signbit(db))).sum()),
        "cosine": float(da @ db / np.sqrt((da @ da) * (db @ db))),
    }


def _check(metrics, ref):
    assert metrics["num_params"] == ref["num_params"]
    assert metrics["intersection"] == ref["intersection"]
    assert metrics["union"] == ref["union"]
    assert metrics["density_a"] == pytest.approx(ref["density_a"], rel=1e-12)
    assert metrics["density_b"] == pytest.approx(ref["density_b"], rel=1e-12)
    assert metrics["jaccard"] == pytest.approx(ref["intersection"] / ref["union"], rel=1e-12)
    a, b = ref["density_a"], ref["density_b"]
    assert metrics["jaccard_random"] == pytest.approx(a * b / (a + b - a * b), rel=1e-12)
    assert metrics["sign_agreement"] == pytest.approx(ref["same"] / ref["intersection"],
                                                      rel=1e-12)
    assert metrics["cosine"] == pytest.approx(ref["cosine"], rel=1e-9, abs=1e-12)


def test_planted_sets_give_exact_counts_globally_per_layer_and_component(tmp_path):
    base = _base()
    deltas = [_planted(base, s, d) for s, d in ((1, 0.3), (2, 0.5), (3, 0.1))]
    paths = _runs(tmp_path, base, deltas)
    doc = run_overlap(OverlapOptions(paths[0], paths[1:], keep_ratios=[], hash_files=False))
    runs = [{n: base[n] + d[n] for n in base} for d in deltas]
    assert [(p["a"], p["b"]) for p in doc["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    for p, (i, j) in zip(doc["pairs"], [(0, 1), (0, 2), (1, 2)]):
        _check(p["global"], _scope(list(SHAPES), base, runs[i], runs[j]))
        for layer in ("layer_0", "layer_1", "other"):
            names = [n for n in SHAPES if LAYER[n] == layer]
            _check(p["layers"][layer], _scope(names, base, runs[i], runs[j]))
        for comp in set(COMPONENT.values()):
            names = [n for n in SHAPES if COMPONENT[n] == comp]
            _check(p["components"][comp], _scope(names, base, runs[i], runs[j]))
        cells = p["cells"]
        for r, layer in enumerate(cells["layers"]):
            for c, comp in enumerate(cells["components"]):
                names = [n for n in SHAPES if LAYER[n] == layer and COMPONENT[n] == comp]
                if not names:
                    assert cells["intersection"][r][c] is None
                    continue
                ref = _scope(names, base, runs[i], runs[j])
                assert cells["intersection"][r][c] == ref["intersection"]
                assert cells["union"][r][c] == ref["union"]
        # the scopes partition the entries: their counts add up exactly
        for key in ("intersection", "union", "num_params"):
            total = p["global"][key]
            assert sum(m[key] for m in p["layers"].values()) == total
            assert sum(m[key] for m in p["components"].values()) == total
        for key in ("intersection", "union"):
            assert sum(v or 0 for row in cells[key] for v in row) == p["global"][key]
    for label, d in zip("abc", deltas):
        changed = sum(int((v != 0).sum()) for v in d.values())
        assert doc["runs"][label]["changed"] == changed
        assert doc["runs"][label]["num_params"] == sum(v.size for v in d.values())


def _lift_sd(n, a, b):
    """Standard deviation of the Jaccard lift of independent sets (delta method on the
    intersection, whose variance given the densities is about n a b (1-a)(1-b))."""
    inter, union = n * a * b, n * (a + b - a * b)
    sd_inter = math.sqrt(n * a * b * (1 - a) * (1 - b))
    d_jaccard = (union + inter) / union**2  # dJ/dI with |A|, |B| fixed
    return sd_inter * d_jaccard / (a * b / (a + b - a * b))


def test_independent_random_sets_have_a_lift_of_one(tmp_path):
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (200, 250) for i in range(4)}
    base = _base(4, shapes)
    a, b = _planted(base, 5, 0.1), _planted(base, 6, 0.3)
    paths = _runs(tmp_path, base, [a, b])
    g = run_overlap(OverlapOptions(paths[0], paths[1:], keep_ratios=[], hash_files=False,
                                   per_layer=False))["pairs"][0]["global"]
    sd = _lift_sd(g["num_params"], g["density_a"], g["density_b"])
    assert abs(g["jaccard_lift"] - 1.0) < 4 * sd, (g["jaccard_lift"], sd)
    assert abs(g["overlap_a_in_b"] - g["overlap_a_in_b_random"]) < 0.01
    # the check can fail: a set that shares a part of the other is far outside the band
    shared = {n: np.where(a[n] != 0, a[n], b[n]) for n in base}
    paths = _runs(tmp_path, base, [a, shared], names=("a", "shared"))
    g = run_overlap(OverlapOptions(paths[0], paths[1:], keep_ratios=[], hash_files=False,
                                   per_layer=False))["pairs"][0]["global"]
    assert g["jaccard_lift"] - 1.0 > 10 * _lift_sd(g["num_params"], g["density_a"],
                                                   g["density_b"])


def test_identical_and_sign_flipped_runs(tmp_path):
    base = _base(7)
    rng = np.random.default_rng(8)
    d = {n: (rng.standard_normal(w.shape) * 1e-2).astype(np.float32) for n, w in base.items()}
    paths = _runs(tmp_path, base, [d, d, {n: -v for n, v in d.items()}],
                  names=("a", "same", "flipped"))
    doc = run_overlap(OverlapOptions(paths[0], paths[1:], keep_ratios=[0.1], hash_files=False))
    same, flipped = doc["pairs"][0]["global"], doc["pairs"][1]["global"]
    assert (same["jaccard"], same["sign_agreement"]) == (1.0, 1.0)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert same["topk_jaccard_at_keep_0.1"] == 1.0
    assert flipped["jaccard"] == 1.0 and flipped["sign_agreement"] == 0.0
    assert flipped["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert all(m["sign_agreement"] == 1.0 for m in doc["pairs"][0]["layers"].values())


def test_bf16_view_against_explicit_rounding(tmp_path):
    base = _base(9)
    rng = np.random.default_rng(10)
    deltas = [{n: (rng.standard_normal(w.shape) * 3e-3 * np.abs(w)).astype(np.float32)
               for n, w in base.items()} for _ in range(2)]
    paths = _runs(tmp_path, base, deltas)
    doc = run_overlap(OverlapOptions(paths[0], paths[1:], bf16_view=True, keep_ratios=[],
                                     hash_files=False))
    assert doc["criterion"]["kind"] == "bf16_view"
    runs = {"base": base, "a": {n: base[n] + deltas[0][n] for n in SHAPES},
            "b": {n: base[n] + deltas[1][n] for n in SHAPES}}
    bits = {k: bf16_reference(np.concatenate([v[n].reshape(-1) for n in SHAPES]))
            for k, v in runs.items()}
    ca, cb = bits["a"] != bits["base"], bits["b"] != bits["base"]
    g = doc["pairs"][0]["global"]
    assert 0.2 < ca.mean() < 0.8
    assert (g["intersection"], g["union"]) == (int((ca & cb).sum()), int((ca | cb).sum()))
    assert doc["runs"]["a"]["density"] == pytest.approx(ca.mean(), rel=1e-12)
    # the contrast is the exact change: dense here
    assert doc["pairs"][0]["contrast"]["criterion"]["kind"] == "exact"
    assert doc["pairs"][0]["contrast"]["density_a"] > 0.99


def test_threshold_against_numpy(tmp_path):
    base = _base(11)
    rng = np.random.default_rng(12)
    deltas = [{n: (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)
               for n, w in base.items()} for _ in range(2)]
    paths = _runs(tmp_path, base, deltas)
    doc = run_overlap(OverlapOptions(paths[0], paths[1:], threshold=1e-3, keep_ratios=[],
                                     hash_files=False))
    stored = [np.concatenate([((base[n] + d[n]).astype(np.float32) - base[n]).reshape(-1)
                              for n in SHAPES]) for d in deltas]
    ca, cb = (np.abs(s) > np.float32(1e-3) for s in stored)
    g = doc["pairs"][0]["global"]
    assert (g["intersection"], g["union"]) == (int((ca & cb).sum()), int((ca | cb).sum()))
    assert doc["criterion"] == {"kind": "threshold", "value": 1e-3, "text": "|dW| > 0.001"}


def _distinct(base, seed):
    """Deltas whose magnitudes are all different: a permutation of 1..N, times 2^-10."""
    rng = np.random.default_rng(seed)
    total = sum(w.size for w in base.values())
    values = (rng.permutation(total) + 1) * 2.0**-10 * rng.choice([-1.0, 1.0], size=total)
    out, pos = {}, 0
    for n, w in base.items():
        out[n] = values[pos : pos + w.size].reshape(w.shape).astype(np.float32)
        pos += w.size
    return out


def test_top_k_masks_are_the_exact_global_top_k(tmp_path):
    base = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}  # deltas stored exactly
    deltas = [_distinct(base, 13), _distinct(base, 14)]
    paths = _runs(tmp_path, base, deltas)
    keeps = [0.01, 0.1, 0.5]
    doc = run_overlap(OverlapOptions(paths[0], paths[1:], keep_ratios=keeps, hash_files=False))
    mags = [np.concatenate([np.abs((base[n] + d[n]).astype(np.float32) - base[n]).reshape(-1)
                            for n in SHAPES]) for d in deltas]
    names = np.concatenate([[n] * int(np.prod(s)) for n, s in SHAPES.items()])
    for keep in keeps:
        k = budget(keep, mags[0].size)
        tops = []
        for m in mags:
            assert np.unique(m).size == m.size  # no ties: the top-k set is unique
            chosen = np.zeros(m.size, dtype=bool)
            chosen[np.argsort(-m, kind="stable")[:k]] = True
            tops.append(chosen)
        both, either = tops[0] & tops[1], tops[0] | tops[1]
        p = doc["pairs"][0]
        label = f"keep_{keep:g}"
        assert p["global"][f"topk_intersection_at_{label}"] == int(both.sum())
        assert p["global"][f"topk_union_at_{label}"] == int(either.sum())
        assert p["global"][f"topk_jaccard_at_{label}"] == both.sum() / either.sum()
        r = k / mags[0].size
        assert p["global"][f"topk_jaccard_at_{label}_random"] == pytest.approx(r / (2 - r))
        for layer in ("layer_0", "other"):
            sel = np.array([LAYER[n] == layer for n in names])
            assert p["layers"][layer][f"topk_intersection_at_{label}"] == int((both & sel).sum())


def test_top_k_ties_are_broken_by_position_and_keep_exactly_k(tmp_path):
    base = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    ones = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}
    paths = _runs(tmp_path, base, [ones, {n: -v for n, v in ones.items()}])
    doc = run_overlap(OverlapOptions(paths[0], paths[1:], keep_ratios=[0.1], hash_files=False))
    g = doc["pairs"][0]["global"]
    k = budget(0.1, g["num_params"])
    assert g["topk_intersection_at_keep_0.1"] == g["topk_union_at_keep_0.1"] == k


def test_dtypes_formats_and_labels(tmp_path):
    from tests.conftest import tiny_qwen2
    from tests.unit.trainer.analysis.checkpoints import perturb

    base = tiny_qwen2()
    base.save_pretrained(tmp_path / "base")
    runs = []
    for seed in (1, 2):
        m = tiny_qwen2()
        perturb(m, seed=seed)
        runs.append(m)
    runs[0].save_pretrained(tmp_path / "x" / "ckpt", max_shard_size="50KB")  # sharded
    torch.save(runs[1].to(torch.bfloat16).state_dict(), tmp_path / "y.pt")  # bf16, torch file
    paths = [str(tmp_path / "x" / "ckpt"), str(tmp_path / "y.pt")]
    doc = run_overlap(OverlapOptions(str(tmp_path / "base"), paths, keep_ratios=[0.1],
                                     hash_files=True))
    assert list(doc["runs"]) == ["ckpt", "y"]
    assert doc["compared"]["compared_in_float32"] and any("float32" in n for n in doc["notes"])
    sd = [m.state_dict() for m in (base, runs[0], runs[1].to(torch.bfloat16))]
    ca = np.concatenate([(sd[1][n] != sd[0][n]).reshape(-1).numpy() for n in sd[0]])
    cb = np.concatenate([(sd[2][n].float() != sd[0][n]).reshape(-1).numpy() for n in sd[0]])
    g = doc["pairs"][0]["global"]
    assert (g["intersection"], g["union"]) == (int((ca & cb).sum()), int((ca | cb).sum()))
    files = doc["inputs"]["runs"]["ckpt"]["files"]
    assert len(files) > 1 and all(len(f["sha256"]) == 64 for f in files)
    assert doc["inputs"]["base"]["path"] == str(tmp_path / "base")


def test_labels_are_distinct_and_checked():
    assert checkpoint_labels(["runs/a/ckpt", "runs/b/ckpt", "c.safetensors"]) == [
        "a/ckpt", "b/ckpt", "c"]
    assert checkpoint_labels(["x", "x"]) == ["x", "x #2"]
    assert checkpoint_labels(["a", "b"], ["rl", "sft"]) == ["rl", "sft"]
    for given in (["one"], ["a", "a"], ["a", " "]):
        with pytest.raises(CheckpointError):
            checkpoint_labels(["a", "b"], given)


def _cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_writes_metrics_and_a_self_contained_report(tmp_path, capsys):
    base = _base(15)
    deltas = [_planted(base, s, 0.2) for s in (16, 17)]
    paths = _runs(tmp_path, base, deltas)
    rc, out, err = _cli(capsys, "overlap", *paths, "--out", str(tmp_path / "o"), "--labels",
                        "rl", "sft", "--keep-ratios", "0.05")
    assert rc == 0 and "report.html" in out, err
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert list(doc["runs"]) == ["rl", "sft"] and doc["keep_ratios"] == [0.05]
    html = (tmp_path / "o" / "report.html").read_text()
    assert "rl and sft share" in html and "In the bf16 view" in html
    assert html.count("<img") == 2  # the pairwise matrix and one layer x component map
    assert "http" not in html.replace("http-equiv", "")
    rc, _, err = _cli(capsys, "overlap", *paths, "--out", str(tmp_path / "n"), "--no-report",
                      "--no-per-layer", "--keep-ratios")
    assert rc == 0, err
    doc = json.loads((tmp_path / "n" / "metrics.json").read_text())
    assert doc["pairs"][0]["layers"] == {} and doc["keep_ratios"] == []
    assert not (tmp_path / "n" / "report.html").exists()


def test_bad_inputs_print_one_line_and_exit_1(tmp_path, capsys):
    base = _base(18)
    paths = _runs(tmp_path, base, [_planted(base, 19, 0.2)] * 2)
    extra = dict(base, **{"extra.weight": np.zeros(3, np.float32)})
    other = _save(tmp_path / "names.safetensors", extra)
    reshaped = dict(base, **{"lm_head.weight": np.zeros((8, 40), np.float32)})
    shapes = _save(tmp_path / "shapes.safetensors", reshaped)
    cases = [
        ([paths[0], paths[1]], "at least two runs"),
        ([paths[0], paths[1], other], "names.safetensors"),
        ([paths[0], paths[1], shapes], "shapes differ"),
        ([paths[0], paths[1], str(tmp_path / "missing")], "does not exist"),
        ([paths[0], *paths[1:], "--labels", "x"], "1 labels for 2 runs"),
        ([*paths, "--keep-ratios", "1.5"], "(0, 1]"),
        ([*paths, "--threshold", "-1"], "threshold must be"),
    ]
    for argv, message in cases:
        rc, _, err = _cli(capsys, "overlap", *argv, "--out", str(tmp_path / "o"))
        assert rc == 1, argv
        assert err.count("\n") == 1 and message in err, err
    rc, _, err = _cli(capsys, "overlap", *paths, "--out", str(tmp_path / "o"), "--threshold",
                      "0", "--bf16-view")
    assert rc == 2 and "not allowed with" in err


#: The stated bound: peak resident memory beyond the warmed-up process stays below this many
#: times the largest tensor times the number of runs. It holds the four tensors of one name
#: (BASE and three runs), the chunk temporaries of each run and, during the top-k passes, one
#: tensor pair; measured about 10 largest tensors (50 MB) here, against 400 MB read.
PEAK_PER_RUN = 5


@pytest.mark.slow
def test_peak_memory_for_three_runs_of_100_mb(tmp_path):
    """Three runs of a 100 MB checkpoint (25M float32 entries in 20 tensors) and their base are
    compared in a fresh process whose resident memory grows by less than ``PEAK_PER_RUN`` x 3
    runs x the largest tensor (75 MB; the four checkpoints hold 400 MB)."""
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (1250, 1000) for i in range(20)}
    largest = 1250 * 1000 * 4
    small = {n: (4, 4) for n in list(shapes)[:2]}
    for root, sh in ((tmp_path / "small", small), (tmp_path / "big", shapes)):
        root.mkdir()
        gen = torch.Generator().manual_seed(0)
        base = {n: torch.randn(s, generator=gen) for n, s in sh.items()}
        save_file(base, root / "base.safetensors")
        for run in ("a", "b", "c"):
            tuned = {n: w + 1e-3 * torch.randn(w.shape, generator=gen) for n, w in base.items()}
            save_file(tuned, root / f"{run}.safetensors")
        del base, tuned
    size = (tmp_path / "big" / "a.safetensors").stat().st_size
    assert 99e6 < size < 101e6
    names = ("base", "a", "b", "c")
    small_runs, big_runs = ([str(tmp_path / d / f"{n}.safetensors") for n in names]
                            for d in ("small", "big"))
    flags = ["--no-report", "--no-hash", "--keep-ratios", "0.01", "0.1"]
    out = str(tmp_path / "o")
    r = cli_peak_rss(["overlap", *small_runs, "--out", out + "-warm", *flags],
                     ["overlap", *big_runs, "--out", out, *flags], threads=1, timeout=800)
    assert r["rc"] == 0
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["compared"]["num_params"] == 25_000_000
    print(f"peak extra RSS {r['extra'] / 1e6:.0f} MB for BASE and three runs of "
          f"{size / 1e6:.0f} MB (largest tensor {largest / 1e6:.0f} MB)")
    assert r["extra"] < PEAK_PER_RUN * 3 * largest, r
