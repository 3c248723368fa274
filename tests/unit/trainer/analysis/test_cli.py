"""``grail-analysis diff`` / ``plot`` end to end: same numbers as online, one-line errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from grail.trainer.analysis.cli import main
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics.base import AnalysisContext
from grail.trainer.analysis.metrics.registry import build_computers
from grail.trainer.analysis.offline.diff import DiffOptions, build_config

from .checkpoints import float64_reference, save_pair, tokenizer
from .cli_memory import cli_peak_rss

PROMPTS = "the cat sat on the mat\n\na big red dog ran far away\nthe small blue cat\ngreen tree\n"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _same(a: float | None, b: float) -> bool:
    if a is None:
        return not math.isfinite(b)
    return a == pytest.approx(b, rel=1e-12, abs=1e-15)


def _online(base, tuned, opts: DiffOptions, context=None) -> dict[str, float]:
    """The online computers of the same config on in-memory snapshots of the same models."""
    config = build_config(opts)
    config = dataclasses.replace(config, sparse_quality_enabled=context is not None)
    old = ParameterSnapshot(base)
    new = ParameterSnapshot.live(tuned) if context is not None else ParameterSnapshot(tuned)
    out: dict[str, float] = {}
    for computer in build_computers(config):
        out.update(computer.compute(delta=old.compute_delta(new), context=context))
    return out


@pytest.mark.parametrize(
    ("dtype", "shard"),
    [(torch.float32, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16-sharded"],
)
def test_diff_metrics_equal_online_metrics(tmp_path, capsys, dtype, shard):
    base, tuned, bdir, tdir = save_pair(tmp_path, dtype, shard=shard)
    rc, out, err = _run(capsys, "diff", str(bdir), str(tdir), "--out", str(tmp_path / "o"),
                        "--ranks", "1", "4", "--no-report")
    assert rc == 0, err
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    online = _online(base, tuned, DiffOptions(str(bdir), str(tdir), ranks=[1, 4]))
    assert doc["metrics"].keys() == online.keys()
    assert any(k.startswith("param_change/layer_1/") for k in online)
    assert all(_same(doc["metrics"][k], v) for k, v in online.items())
    assert doc["compared"]["dtypes"] == {str(dtype).removeprefix("torch."): 27}
    assert not (tmp_path / "o" / "report.html").exists() and "metrics.json" in out


def test_diff_norms_equal_float64_and_records_inputs(tmp_path, capsys):
    base, tuned, bdir, tdir = save_pair(tmp_path, shard=True)
    rc, _, err = _run(capsys, "diff", str(bdir), str(tdir), "--out", str(tmp_path / "o"),
                      "--thresholds", "0", "1e-4", "--no-report", "--no-per-layer")
    assert rc == 0, err
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    m, ref = doc["metrics"], float64_reference(base, tuned)
    for key in ("norm_l2", "norm_l1", "norm_max"):
        assert m[f"param_change/{key}"] == pytest.approx(ref[key], rel=1e-6)
    assert m["param_change/exact_unchanged_ratio"] == ref["exact_unchanged_ratio"]
    assert not any("/layer_" in k for k in m) and "param_change/sparsity_at_1e-04" in m
    assert doc["arguments"]["thresholds"] == [0.0, 1e-4] and doc["arguments"]["per_layer"] is False
    assert doc["config"]["param_change_thresholds"] == [0.0, 1e-4]
    assert {"python", "torch", "transformers", "grail-analysis"} <= doc["versions"].keys()
    assert doc["versions"]["torch"] == torch.__version__
    files = doc["inputs"]["tuned"]["files"]
    assert len(files) > 1
    for f in files + doc["inputs"]["base"]["files"]:
        root = tdir if f in files else bdir
        assert f["sha256"] == hashlib.sha256((root / f["file"]).read_bytes()).hexdigest()


def test_different_dtypes_are_compared_in_float32(tmp_path, capsys):
    base, tuned, bdir, tdir = save_pair(tmp_path, torch.bfloat16, tuned_dtype=torch.float32)
    rc, _, err = _run(capsys, "diff", str(bdir), str(tdir), "--out", str(tmp_path / "o"),
                      "--no-report")
    assert rc == 0 and "compared in float32" in err
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["compared"]["dtypes"] == {"bfloat16 -> float32": 27}
    assert any("compared in float32" in n for n in doc["notes"])
    online = _online(base.float(), tuned, DiffOptions(str(bdir), str(tdir)))
    assert all(_same(doc["metrics"][k], v) for k, v in online.items() if k.startswith("param_"))


@pytest.mark.slow
def test_diff_with_prompts_equals_online_forward_metrics(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from grail.trainer.analysis.offline.quality import tokenize

    base, tuned, bdir, tdir = save_pair(tmp_path, shard=True, with_tokenizer=True)
    (tmp_path / "p.txt").write_text(PROMPTS)
    args = ["--thresholds", "0", "1e-4", "--keep-ratios", "0.1", "0.5", "--ranks", "1", "4"]
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    rc, _, err = _run(capsys, "diff", str(bdir), str(tdir), "--out", str(tmp_path / "o"),
                      "--prompts", str(tmp_path / "p.txt"), *args)
    assert rc == 0, err
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]
    low_rank = any(k.startswith("lowrank/kl_at_r") for k in m)
    principal = any(k.startswith("principal/energy_in_top") for k in m)
    # curve, two heatmaps, KL vs kept fraction, attribution, and the energy curves with the
    # low-rank and the principal metrics
    html = (tmp_path / "o" / "report.html").read_text()
    assert html.count("<img") == 5 + low_rank + principal
    lines = [line for line in PROMPTS.splitlines() if line]
    assert m["sparse/tokens"] == sum(len(tokenizer()(line)["input_ids"]) for line in lines)
    from transformers import AutoTokenizer

    batch = tokenize(AutoTokenizer.from_pretrained(tdir), lines, 4096)
    assert batch["attention_mask"].sum() == m["sparse/tokens"]
    opts = DiffOptions(str(bdir), str(tdir), prompts="p", thresholds=[0.0, 1e-4],
                       keep_ratios=[0.1, 0.5], ranks=[1, 4])
    online = _online(base, tuned, opts, AnalysisContext(model=tuned, inputs=batch))
    forward = {k: v for k, v in online.items() if k.startswith(("sparse/", "lowrank/"))}
    assert "sparse/kl_at_keep_0.1_random" in forward and "sparse/kl_at_1e-04" in forward
    assert "sparse/kl_at_0e+00" not in m  # threshold 0 keeps the whole update
    assert all(_same(m[k], v) for k, v in forward.items())
    assert m["sparse/kl_at_keep_0.1"] > 0
    for n, p in tuned.named_parameters():  # the online reference left its model intact
        assert torch.equal(p, before[n])


def _one_line_error(rc: int, err: str, match: str) -> None:
    assert rc == 1, err
    assert err.count("\n") == 1 and err.startswith("grail-analysis: error: "), err
    assert "Traceback" not in err and re.search(match, err), err


def test_prompts_need_a_usable_tokenizer(tmp_path, capsys, monkeypatch):
    """transformers builds a 1-token tokenizer for a directory without tokenizer files: the
    prompts encode to nothing, which is an error before any weight is read, not a silent run
    without sparse/* metrics; --tokenizer DIR takes the tokenizer from elsewhere."""
    pytest.importorskip("tokenizers")
    from grail.trainer.analysis.offline import diff as offline_diff

    _, _, bdir, tdir = save_pair(tmp_path, vocab=320)
    (tmp_path / "p.txt").write_text(PROMPTS)
    tokenizer().save_pretrained(tmp_path / "tok")
    capsys.readouterr()  # progress bars of save_pretrained
    args = ["diff", str(bdir), str(tdir), "--out", str(tmp_path / "o"), "--no-report",
            "--no-low-rank", "--prompts", str(tmp_path / "p.txt")]
    real_open_pair = offline_diff.open_pair

    def no_stream(*a, **k):
        raise AssertionError("the checkpoints were read before the tokenizer was checked")

    monkeypatch.setattr(offline_diff, "open_pair", no_stream)
    rc, _, err = _run(capsys, *args)
    _one_line_error(rc, err, rf"{re.escape(str(tdir))} has no usable tokenizer.*--tokenizer DIR")
    rc, _, err = _run(capsys, *args, "--tokenizer", str(tmp_path / "nope"))
    _one_line_error(rc, err, "--tokenizer .*nope does not exist")
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(capsys, *args, "--tokenizer", str(tmp_path / "empty"))
    _one_line_error(rc, err, r"cannot load a tokenizer from .*empty \(.+\); --tokenizer DIR must "
                    "hold the model's tokenizer$")
    rc, _, err = _run(capsys, *args[:-2], "--tokenizer", str(tmp_path / "tok"))
    _one_line_error(rc, err, "--tokenizer needs --prompts")
    monkeypatch.setattr(offline_diff, "open_pair", real_open_pair)
    rc, _, err = _run(capsys, *args, "--keep-ratios", "0.1", "--tokenizer", str(tmp_path / "tok"))
    assert rc == 0, err
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    lines = [line for line in PROMPTS.splitlines() if line]
    assert doc["metrics"]["sparse/tokens"] == sum(len(tokenizer()(t)["input_ids"]) for t in lines)
    assert doc["metrics"]["sparse/kl_at_keep_0.1"] > 0
    assert doc["arguments"]["tokenizer"] == str(tmp_path / "tok")


def test_token_ids_beyond_the_model_vocabulary_are_an_error(tmp_path, capsys):
    """A tokenizer of 300 tokens for a model of 128 embedding rows: one line, exit 1."""
    pytest.importorskip("tokenizers")
    _, _, bdir, tdir = save_pair(tmp_path, vocab=128)
    tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "p.txt").write_text(PROMPTS)
    capsys.readouterr()
    rc, _, err = _run(capsys, "diff", str(bdir), str(tdir), "--out", str(tmp_path / "o"),
                      "--no-report", "--no-low-rank", "--prompts", str(tmp_path / "p.txt"),
                      "--tokenizer", str(tmp_path / "tok"))
    _one_line_error(rc, err, r"tokenizer of .*tok produces token id 2\d\d but the model has 128 "
                    r"token embeddings; --tokenizer DIR must hold the model's tokenizer$")


def test_empty_out_is_an_error_and_writes_nothing(tmp_path, capsys, monkeypatch):
    x = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2)}, x)
    _write_run_log(tmp_path / "run.jsonl")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for argv in (["diff", str(x), str(x), "--no-report", "--out", ""],
                 ["plot", str(tmp_path / "run.jsonl"), "--out", ""]):
        rc, out, err = _run(capsys, *argv)
        _one_line_error(rc, err, "--out is empty")
        assert out == ""
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.parametrize("device", ["meta", "mps", "cpu:x"])
def test_unsupported_device_is_a_one_line_error(tmp_path, capsys, device):
    x = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2)}, x)
    rc, _, err = _run(capsys, "diff", str(x), str(x), "--out", str(tmp_path / "o"),
                      "--no-report", "--device", device)
    _one_line_error(rc, err, r"device .* \(use cpu or cuda\)")


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "does not exist"),
        ("garbage", "not a safetensors file"),
        ("names", r"parameter names differ: 1 only in BASE \(b\); 1 only in TUNED \(c\)"),
        ("shapes", "shapes differ for 1 tensors"),
        ("prompts-not-hf", "needs a transformers model directory"),
        ("prompts-missing", "prompts file .* does not exist"),
        ("prompts-empty", "holds no prompts"),
        ("bad-threshold", "param_change_thresholds"),
        ("out-is-file", "exists and is not a directory"),
        ("no-float", "no floating-point tensors"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys, case, match):
    x, y = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.ones(3)}, x)
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(3)}, y)
    extra: list[str] = []
    out = str(tmp_path / "o")
    if case == "missing":
        x = tmp_path / "nope"
    elif case == "garbage":
        y.write_bytes(b"\xff" * 64)
    elif case == "names":
        save_file({"a": torch.ones(2, 3), "c": torch.ones(3)}, y)
    elif case == "shapes":
        save_file({"a": torch.ones(3, 2), "b": torch.ones(3)}, y)
    elif case.startswith("prompts"):
        p = tmp_path / "p.txt"
        if case != "prompts-missing":
            p.write_text("hello\n" if case == "prompts-not-hf" else "\n \n")
        extra = ["--prompts", str(p)]
    elif case == "bad-threshold":
        extra = ["--thresholds", "-1"]
    elif case == "out-is-file":
        (tmp_path / "o").write_text("")
    elif case == "no-float":
        save_file({"n": torch.tensor([1])}, x)
        save_file({"n": torch.tensor([2])}, y)
    rc, _, err = _run(capsys, "diff", str(x), str(y), "--out", out, "--no-report", *extra)
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("grail-analysis: error: "), err
    assert "Traceback" not in err
    assert re.search(match, err), err


def test_non_floating_tensors_are_skipped_with_a_note(tmp_path, capsys):
    save_file({"a": torch.ones(4), "step": torch.tensor([3])}, tmp_path / "x.safetensors")
    save_file({"a": torch.full((4,), 2.0), "step": torch.tensor([9])}, tmp_path / "y.safetensors")
    rc, _, err = _run(capsys, "diff", str(tmp_path / "x.safetensors"),
                      str(tmp_path / "y.safetensors"), "--out", str(tmp_path / "o"), "--no-report")
    assert rc == 0 and "skipped 1 non-floating tensors: step (int64)" in err
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["compared"]["skipped"] == ["step (int64)"]
    assert doc["metrics"]["param_change/num_params"] == 4.0
    assert doc["metrics"]["param_change/norm_l1"] == 4.0


def test_usage_errors_and_debug(tmp_path, capsys):
    assert main([]) == 0
    rc, _, err = _run(capsys, "diff", "a", "b")
    assert rc == 2 and "--out" in err
    with pytest.raises(Exception, match="does not exist"):
        main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path), "--debug"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_a_gpu_is_an_error(tmp_path, capsys):
    rc, _, err = _run(capsys, "diff", "a", "b", "--out", str(tmp_path), "--device", "cuda")
    assert rc == 1 and "no CUDA device" in err


def _write_run_log(path) -> None:
    records = []
    for i, step in enumerate((10, 20, 30)):
        records.append({"step": step, "time": 1.0 * i, "metrics": {
            "param_change/norm_l2": 1.0 / (i + 1),
            "param_change/relative_norm": 1e-3 / (i + 1),
            "param_change/exact_unchanged_ratio": 0.02,
            "param_change/bf16_unchanged_ratio": 0.9,
            "param_change/sparsity_at_1e-06": 0.1 * i,
            "param_change/sparsity_at_1e-04": 0.5,
            "param_change/layer_0/mean_abs_delta": 1e-4,
            "param_change/layer_1/mean_abs_delta": 2e-4 * (i + 1),
            "sparse/kl_at_1e-06": 0.01 * (i + 1),
            "sparse/kl_at_1e-06_random": 0.05 * (i + 1),
            "sparse/kept_ratio_at_1e-06": 0.9,
        }})
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 40, "ti')


def test_plot_writes_a_report_of_the_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _write_run_log(tmp_path / "run.jsonl")
    rc, _, err = _run(capsys, "plot", str(tmp_path / "run.jsonl"), "--out", str(tmp_path / "r"))
    assert rc == 0, err
    html = (tmp_path / "r" / "report.html").read_text()
    # the headline, one grid per family (param_change, sparse) and the layer x step heatmap
    assert html.count("<img") == 4
    assert "From step 10 to step 30" in html and "the sparsity is rounding" in html
    rc, _, err = _run(capsys, "plot", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r"))
    assert rc == 1 and "does not exist" in err
    (tmp_path / "empty.jsonl").write_text("")
    rc, _, err = _run(capsys, "plot", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "r"))
    assert rc == 1 and "no measurements" in err


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({}, r"holds 2 records but no metric values"),
        ({"param_change/norm_l2": None}, r"holds 2 records but no metric values"),
        ({"param_change/norm_l2": "big"}, r"record 1 has a non-numeric value for "
                                          r"'param_change/norm_l2' \('big'\)"),
        ({"a/b": {"c": 1}}, r"record 1 has a non-numeric value for 'a/b'"),
    ],
    ids=["empty-metrics", "only-null", "string", "dict"],
)
def test_plot_of_records_without_metric_values_is_an_error(tmp_path, capsys, metrics, match):
    pytest.importorskip("matplotlib")
    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps({"step": s, "time": 0.0, "metrics": metrics}) + "\n"
                           for s in (1, 2)))
    rc, out, err = _run(capsys, "plot", str(log), "--out", str(tmp_path / "r"))
    _one_line_error(rc, err, match)
    assert out == "" and not (tmp_path / "r" / "report.html").exists()


@pytest.mark.slow
def test_module_and_console_script_entry_points(tmp_path):
    """``python -m`` always; the console script where the package is installed (CI)."""
    cmds = [[sys.executable, "-m", "grail.trainer.analysis"]]
    script = shutil.which("grail-analysis", path=os.path.dirname(sys.executable))
    if script:
        cmds.append([script])
    for cmd in cmds:
        proc = subprocess.run([*cmd, "diff", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                               str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_peak_memory_is_a_few_tensors_not_a_checkpoint(tmp_path):
    """Two ~200 MB checkpoints are diffed in a fresh process using far less than one of them.

    The low-rank spectra are switched off: they add one float32 matrix (see their own tests)
    and most of the run time on CPU.
    """
    from .checkpoints import perturb, tiny_qwen2

    save_pair(tmp_path / "small")
    model = tiny_qwen2(vocab=8192, hidden=512, layers=16)
    model.save_pretrained(tmp_path / "base")
    perturb(model, scale=1e-4)
    model.save_pretrained(tmp_path / "tuned", max_shard_size="100MB")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    del model
    assert 180e6 < size < 260e6 and largest < 0.1 * size
    small, out = tmp_path / "small", str(tmp_path / "o")
    flags = ["--no-report", "--no-low-rank", "--no-principal"]
    r = cli_peak_rss(["diff", str(small / "base"), str(small / "tuned"), "--out", out + "-warm",
                      *flags], ["diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out",
                                out, *flags])
    assert r["rc"] == 0
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["metrics"]["param_change/num_params"] * 4 == size
    assert len(doc["inputs"]["tuned"]["files"]) > 1
    print(f"peak extra RSS {r['extra'] / 1e6:.0f} MB for two {size / 1e6:.0f} MB checkpoints "
          f"(largest tensor {largest / 1e6:.0f} MB)")
    assert r["extra"] < min(0.35 * size, 4 * largest), r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_diff_equals_cpu_diff(tmp_path, capsys):
    """--device cuda streams to the GPU; statistics agree with the CPU run to float32 accuracy."""
    save_pair(tmp_path, torch.bfloat16, shard=True, with_tokenizer=True)
    (tmp_path / "p.txt").write_text(PROMPTS)
    docs = {}
    for dev in ("cpu", "cuda"):
        rc, _, err = _run(capsys, "diff", str(tmp_path / "base"), str(tmp_path / "tuned"),
                          "--out", str(tmp_path / dev), "--prompts", str(tmp_path / "p.txt"),
                          "--device", dev, "--ranks", "1", "4", "--keep-ratios", "0.1", "0.5",
                          "--no-report")
        assert rc == 0, err
        docs[dev] = json.loads((tmp_path / dev / "metrics.json").read_text())["metrics"]
    cpu, cuda = docs["cpu"], docs["cuda"]
    assert cpu.keys() == cuda.keys()
    for k, v in cpu.items():
        if k.startswith("param_change/") and ("ratio" in k or "sparsity" in k or "count" in k
                                              or "num_params" in k):
            assert cuda[k] == v, k  # counts are exact on every device
        elif k.startswith("param_change/"):
            assert cuda[k] == pytest.approx(v, rel=1e-5, abs=1e-12), k
    # forward passes differ by GPU kernels' rounding only
    assert cuda["sparse/kl_at_keep_0.1"] == pytest.approx(cpu["sparse/kl_at_keep_0.1"], rel=0.05)


def test_safetensors_inputs_without_the_package_name_the_extra(tmp_path, capsys, monkeypatch):
    for name in ("base", "tuned"):
        save_file({"w": torch.ones(3, 2)}, tmp_path / f"{name}.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now fails
    rc, _, err = _run(capsys, "diff", str(tmp_path / "base.safetensors"),
                      str(tmp_path / "tuned.safetensors"), "--out", str(tmp_path / "o"),
                      "--no-report")
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "needs the safetensors package: pip install 'grail-analysis[hf]'" in err
