"""Reading checkpoints lazily: discovery, pairing, one tensor at a time, observers, run logs."""

from __future__ import annotations

import json
import re
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from grail.trainer.analysis.core.naming import ParameterNaming
from grail.trainer.analysis.core.snapshot import ParameterSnapshot
from grail.trainer.analysis.metrics.parameter_change import ParameterChangeMetrics
from grail.trainer.analysis.offline import checkpoint as offline
from grail.trainer.analysis.offline.checkpoint import CheckpointError, open_checkpoint
from grail.trainer.analysis.offline.pair import open_pair, pair_checkpoints
from grail.trainer.analysis.offline.stream import CellStats, ObservedDelta, Progress
from grail.trainer.analysis.report.runlog import read_run_log

from ..checkpoints import float64_reference, save_pair


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lazy_pair_reads_every_tensor_bit_exactly(tmp_path, shard, dtype):
    base, tuned, bdir, tdir = save_pair(tmp_path, dtype, shard=shard)
    pair = open_pair(str(bdir), str(tdir))
    assert len(pair.tuned.files) > 1 if shard else len(pair.tuned.files) == 1
    params = dict(tuned.named_parameters())
    assert set(pair.names) == set(params)
    old = dict(base.named_parameters())
    for name in pair.names:
        assert pair.new.param_dtypes[name] == dtype
        assert pair.new.shards[name].global_shape == tuple(params[name].shape)
        assert torch.equal(_bits(pair.new.data[name]), _bits(params[name].detach()))
        assert torch.equal(_bits(pair.old.data[name]), _bits(old[name].detach()))


def test_torch_formats_read_like_safetensors(tmp_path):
    base, tuned, bdir, tdir = save_pair(tmp_path)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    (tmp_path / "bin").mkdir()
    torch.save(base.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    p = open_pair(str(bdir), str(tdir))
    q = open_pair(str(tmp_path / "bin"), str(tmp_path / "tuned.pt"))
    from_st = ParameterChangeMetrics().compute(p.old.compute_delta(p.new))
    from_pt = ParameterChangeMetrics().compute(q.old.compute_delta(q.new))
    assert q.base.format == q.tuned.format == "torch"
    assert from_pt == pytest.approx(from_st, rel=1e-12, abs=1e-15)


def test_legacy_torch_file_is_loaded_whole_with_a_note(tmp_path):
    sd = {"w": torch.arange(6.0).view(2, 3)}
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    ckpt = open_checkpoint(tmp_path / "old.pt")
    assert torch.equal(ckpt.load("w"), sd["w"])
    assert any("legacy" in n for n in ckpt.notes)


def test_memory_maps_are_short_lived(tmp_path, monkeypatch):
    """Safetensors are reopened per tensor, torch files after RECYCLE_BYTES."""
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(6)}
    save_file(tensors, tmp_path / "a.safetensors")
    torch.save(tensors, tmp_path / "a.pt")
    monkeypatch.setattr(offline, "RECYCLE_BYTES", 2 * 64 * 4)
    for name, opens in (("a.safetensors", 6), ("a.pt", 3)):
        ckpt = open_checkpoint(tmp_path / name)
        opened: list = []

        def handle(f, real=ckpt._handle, log=opened):
            log.append(f)
            return real(f)

        monkeypatch.setattr(ckpt, "_handle", handle)
        values = [ckpt.load(f"t{i}")[0].item() for i in range(6)]
        assert values == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        assert len(opened) == opens, name


def _low_rank():
    low_rank = pytest.importorskip("grail.trainer.analysis.metrics.low_rank")
    return low_rank.LowRankMetrics(ranks=[1, 4])


@pytest.mark.parametrize(
    "make",
    [lambda: ParameterChangeMetrics(per_layer=True, track_components=True, track_sign_flips=True),
     _low_rank],
    ids=["param_change", "lowrank"],
)
def test_streamed_computers_hold_few_tensors(tmp_path, make):
    """Every path of the computer and ParameterDelta touches .data one tensor at a time."""
    _, _, bdir, tdir = save_pair(tmp_path, shard=True)
    pair = open_pair(str(bdir), str(tdir))
    alive: list[weakref.ref] = []
    peak = [0]
    for side in (pair.base, pair.tuned):
        real = side.load

        def load(name, device="cpu", _real=real):
            t = _real(name, device)
            alive.append(weakref.ref(t))
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            return t

        side.load = load
    cells = CellStats(ParameterNaming(pair.names))
    delta = ObservedDelta(pair.old, pair.new, [cells])
    assert make().compute(delta=delta)
    # per side: the cached tensor and the one being loaded - never the model
    assert peak[0] <= 4 < len(pair.names)
    if isinstance(make(), ParameterChangeMetrics):
        assert pair.old.data.loads == pair.new.data.loads == len(pair.names)  # each read once


def test_metrics_on_lazy_pair_equal_float64_reference(tmp_path):
    base, tuned, bdir, tdir = save_pair(tmp_path, shard=True)
    pair = open_pair(str(bdir), str(tdir))
    m = ParameterChangeMetrics().compute(pair.old.compute_delta(pair.new))
    ref = float64_reference(base, tuned)
    for key in ("norm_l2", "norm_l1", "norm_max"):
        assert m[f"param_change/{key}"] == pytest.approx(ref[key], rel=1e-6)
    assert m["param_change/mean"] == pytest.approx(ref["mean"], rel=1e-5, abs=1e-12)
    assert m["param_change/exact_unchanged_ratio"] == ref["exact_unchanged_ratio"]
    assert m["param_change/num_params"] == ref["num_params"]


def test_cell_stats_and_curve_equal_numpy(tmp_path):
    base, tuned, bdir, tdir = save_pair(tmp_path)
    pair = open_pair(str(bdir), str(tdir))
    naming = ParameterNaming(pair.names)
    cells = CellStats(naming, thresholds=[0.0, 1e-4, 1e-3])
    delta = ObservedDelta(pair.old, pair.new, [cells])
    for _ in range(2):  # a second pass must not count twice
        for _chunk in delta.stream():
            pass
    r = cells.result()
    old = dict(base.named_parameters())
    groups: dict[tuple[str, str], list[np.ndarray]] = {}
    everything = []
    for name, p in tuned.named_parameters():
        d = p.detach().double().numpy().ravel() - old[name].detach().double().numpy().ravel()
        groups.setdefault((naming.layer(name) or "other", naming.component(name)), []).append(d)
        everything.append(d)
    assert r["layers"] == ["layer_0", "layer_1", "other"]
    for (layer, comp), parts in groups.items():
        d = np.concatenate(parts)
        i, j = r["layers"].index(layer), r["components"].index(comp)
        assert r["mean_abs_delta"][i][j] == pytest.approx(np.abs(d).mean(), rel=1e-6)
        assert r["changed_ratio"][i][j] == (d != 0).sum() / d.size
        assert r["num_params"][i][j] == d.size
    x = np.abs(np.concatenate(everything)).astype(np.float32)  # the library's float32 delta
    for t, c in zip(r["curve"]["thresholds"], r["curve"]["changed_ratio"], strict=True):
        assert c == (x > t).sum() / x.size
    assert sum(v is None for row in r["mean_abs_delta"] for v in row) > 0  # empty cells


def test_name_mismatch_lists_names_on_both_sides(tmp_path):
    three = {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2)}
    save_file(three, tmp_path / "x.safetensors")
    save_file({"a": torch.ones(2), "d": torch.ones(2)}, tmp_path / "y.safetensors")
    with pytest.raises(CheckpointError) as err:
        open_pair(str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors"))
    msg = str(err.value)
    assert "2 only in BASE (b, c)" in msg and "1 only in TUNED (d)" in msg and "\n" not in msg


def test_shape_mismatch_is_an_error(tmp_path):
    save_file({"a": torch.ones(2, 3)}, tmp_path / "x.safetensors")
    save_file({"a": torch.ones(3, 2)}, tmp_path / "y.safetensors")
    with pytest.raises(CheckpointError, match=r"shapes differ for 1 tensors: a \[2, 3\] vs \[3, "):
        open_pair(str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors"))


def test_non_floating_tensors_are_skipped_and_dtypes_compared_in_float32(tmp_path):
    w = torch.randn(4, 4)
    save_file({"w": w.to(torch.bfloat16), "n": torch.tensor([1, 2]), "b": torch.zeros(3)},
              tmp_path / "x.safetensors")
    new_w = w.to(torch.bfloat16).float() + 1e-6 * (torch.arange(16.0).view(4, 4) % 2)
    save_file({"w": new_w, "n": torch.tensor([1, 3]), "b": torch.zeros(3)},
              tmp_path / "y.safetensors")
    pair = open_pair(str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors"))
    assert pair.names == ["w", "b"] or sorted(pair.names) == ["b", "w"]
    assert pair.skipped == ["n (int64)"] and pair.upcast == ["w"]
    assert any("non-floating" in n for n in pair.notes)
    assert any("compared in float32" in n and "bfloat16 in BASE" in n for n in pair.notes)
    assert pair.old.data["w"].dtype == torch.float32 and pair.old.param_dtypes["w"] == torch.float32
    m = ParameterChangeMetrics(thresholds=[0.0]).compute(pair.old.compute_delta(pair.new))
    # 8 of 16 entries of w moved by 1e-6 (real change in float32), b is unchanged
    assert m["param_change/exact_unchanged_ratio"] == (8 + 3) / 19
    # ... and every one of those changes vanishes when rounded to bf16
    assert m["param_change/bf16_unchanged_ratio"] == 1.0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "w.txt").write_text("x") and p / "w.txt", "unsupported file type"),
        (lambda p: (p / "g.safetensors").write_bytes(b"\x00" * 4) and p / "g.safetensors",
         "not a safetensors file"),
        (lambda p: (p / "h.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json!"
                                                     + b" " * 10) and p / "h.safetensors",
         "not a safetensors file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no weights found"),
        (lambda p: (p / "g.pt").write_bytes(b"garbage" * 20) and p / "g.pt",
         r"g\.pt is not a torch checkpoint \(torch\.load failed: it is text starting "
         r"'garbagegarbage"),
    ],
    ids=["missing", "suffix", "short-header", "bad-json", "empty-dir", "garbage-pt"],
)
def test_unreadable_inputs_raise_one_line_errors(tmp_path, make, match):
    with pytest.raises(CheckpointError, match=match) as err:
        open_checkpoint(make(tmp_path))
    assert "\n" not in str(err.value)


def _torch_zip(path):
    torch.save({"w": torch.ones(64)}, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (lambda p: b"hello, this is a text file\n" * 4,
         r"torch\.load failed: it is text starting 'hello, this is a text file"),
        (lambda p: b"", r"torch\.load failed: the file is empty\)$"),
        (lambda p: bytes(range(7, 250)), r"torch\.load failed: it is neither a zip archive "
                                          r"\(torch\.save\) nor a pickle"),
        (lambda p: _torch_zip(p)[:200], r"torch\.load failed: .*zip archive.*truncated"),
        (lambda p: (save_file({"w": torch.ones(2)}, p) or p.read_bytes()),
         r"torch\.load failed: it is a safetensors file: rename it to \.safetensors\)$"),
    ],
    ids=["text", "empty", "binary", "truncated-zip", "safetensors"],
)
def test_a_pt_file_that_is_not_a_torch_checkpoint_says_what_it_is(tmp_path, content, match):
    path = tmp_path / "w.pt"
    path.write_bytes(content(tmp_path / "scratch"))
    with pytest.raises(CheckpointError, match=r"w\.pt is not a torch checkpoint \(") as err:
        open_checkpoint(path)
    msg = str(err.value)
    assert re.search(match, msg), msg
    assert "\n" not in msg and "\x1b" not in msg and len(msg) < 300, msg


def test_a_torch_file_named_safetensors_says_so(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"w\.safetensors is not a safetensors file \(a "
                       r"torch\.save zip archive: rename it to \.pt\)$"):
        open_checkpoint(tmp_path / "w.safetensors")


def test_index_with_missing_shard_and_module_pickle(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing shard files"):
        open_checkpoint(tmp_path / "m")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"module\.pt holds pickled Python objects, not only "
                       r"tensors \(torch\.load\(weights_only=True\) refused .*Linear.*\); save "
                       r"the model's state_dict\(\) instead") as err:
        open_checkpoint(tmp_path / "module.pt")
    assert "\x1b" not in str(err.value) and len(str(err.value)) < 300


def test_truncated_safetensors_fails_on_read(tmp_path):
    save_file({"a": torch.randn(1000)}, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(raw[: len(raw) // 2])
    ckpt = open_checkpoint(tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot (open|read)"):
        ckpt.load("a")


def test_run_log_reader(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = [json.dumps({"step": s, "time": 0.0, "metrics": {"a/b": s / 10, "a/c": None}})
             for s in (10, 20)]
    path.write_text("\n".join(lines) + '\n{"step": 30, "met')
    records = read_run_log(path)
    assert [r["step"] for r in records] == [10, 20]
    assert records[1]["metrics"]["a/b"] == 2.0 and np.isnan(records[0]["metrics"]["a/c"])
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(CheckpointError, match="line 2"):
        read_run_log(path)
    path.write_text(json.dumps({"step": "x", "metrics": {}}) + "\n")
    with pytest.raises(CheckpointError, match="record 1"):
        read_run_log(path)
    path.write_text(lines[0] + "\n" + json.dumps({"step": 30, "metrics": {"a/b": [1]}}) + "\n")
    with pytest.raises(CheckpointError, match=r"record 2 has a non-numeric value for 'a/b'"):
        read_run_log(path)
    path.write_text(lines[0] + "\n[1, 2]\n" + lines[1] + "\n")
    with pytest.raises(CheckpointError, match=re.escape("not {step, metrics} records")):
        read_run_log(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_run_log(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("text", ["hello world\n", "\n\ufeff" + '{"step": 1, "metrics": {}}\n'],
                         ids=["text", "byte-order-mark"])
def test_run_log_that_is_not_json_lines_says_so_without_a_warning(tmp_path, caplog, text):
    """Not read as a log whose only line was cut off by a crash (a warning and "no
    measurements")."""
    path = tmp_path / "run.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"run\.jsonl is not a JSON-lines run log \(line "
                       r"\d starts with '.*', not '\{'\)$"):
        read_run_log(path)
    assert caplog.text == ""


def test_pair_from_snapshots_of_models_matches_pairing(tmp_path):
    """The lazy pair and in-memory snapshots of the same models give identical statistics."""
    base, tuned, bdir, tdir = save_pair(tmp_path, torch.bfloat16)
    pair = pair_checkpoints(open_checkpoint(bdir), open_checkpoint(tdir))
    lazy = pair.old.compute_delta(pair.new).per_layer_statistics()
    mem = ParameterSnapshot(base).compute_delta(ParameterSnapshot(tuned)).per_layer_statistics()
    assert lazy.keys() == mem.keys()
    for name in lazy:
        assert lazy[name] == pytest.approx(mem[name], rel=1e-12, abs=1e-15)


def test_progress_counts_tensors_and_bytes_once(tmp_path):
    _, _, bdir, tdir = save_pair(tmp_path, torch.bfloat16, shard=True)
    pair = open_pair(str(bdir), str(tdir))
    progress = Progress(len(pair.names), pair.bytes_of, enabled=True)
    delta = ObservedDelta(pair.old, pair.new, [progress])
    for _ in range(2):
        ParameterChangeMetrics().compute(delta)
    seconds = progress.close()
    files = sum(f.stat().st_size for f in [*pair.base.files, *pair.tuned.files])
    assert progress.done_bytes == sum(2 * s.numel for s in pair.tuned.specs.values()) * 2
    assert 0.9 * files < progress.done_bytes <= files and seconds > 0


def test_prompts_of_special_tokens_only_are_not_usable(tmp_path, caplog):
    """A prompt that encodes to special tokens only carries no text: all such prompts are an
    error (the attention mask alone is not empty), some of them a warning."""
    pytest.importorskip("tokenizers")
    from grail.trainer.analysis.offline.quality import prompt_batch

    _, _, _, tdir = save_pair(tmp_path, with_tokenizer=True)
    with pytest.raises(CheckpointError, match="has no usable tokenizer: the prompts encode to no "
                       "tokens"):
        prompt_batch(tdir, ["<|endoftext|>", "<|endoftext|><|endoftext|>"], 64)
    with caplog.at_level("WARNING"):
        batch = prompt_batch(tdir, ["the cat", "<|endoftext|>"], 64)
    assert batch["attention_mask"].sum(dim=1).tolist() == [2, 1]
    assert "1 of 2 prompts encode to no tokens" in caplog.text


def test_a_run_log_appended_to_by_a_resumed_run_keeps_the_later_records(tmp_path, caplog):
    path = tmp_path / "resumed.jsonl"
    lines = [(2, 0.1), (4, 0.2), (6, 0.3), (8, 0.4),  # interrupted after step 8
             (6, 0.35), (8, 0.45), (10, 0.5)]  # resumed from the checkpoint of step 4
    path.write_text("".join(json.dumps({"step": s, "time": 0.0, "metrics": {"a/b": v}}) + "\n"
                            for s, v in lines))
    with caplog.at_level("WARNING"):
        records = read_run_log(path)
    assert [(r["step"], r["metrics"]["a/b"]) for r in records] == [
        (2, 0.1), (4, 0.2), (6, 0.35), (8, 0.45), (10, 0.5)]
    said = [r.getMessage() for r in caplog.records if "replaced" in r.getMessage()]
    assert len(said) == 1 and "2 records replaced" in said[0]
