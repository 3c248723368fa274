"""JsonlSink / read_jsonl / WandbSink / MetricSink, and the lazy integrations package."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from importlib import util as importlib_util

import numpy as np
import pytest

from grail.trainer.analysis.integrations import JsonlSink, MetricSink, WandbSink, read_jsonl


def test_jsonl_round_trip_appends_and_skips_empty(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    sink = JsonlSink(path)
    sink.log({"a/x": 1.5, "a/y": np.float32(0.25)}, step=10)
    sink.log({}, step=11)
    sink.log({"a/x": math.nan, "a/z": math.inf}, step=12)
    sink.close()
    sink.close()  # idempotent
    with JsonlSink(path) as again:  # an existing file is appended to
        again.log({"a/x": -3.0}, step=20)

    lines = path.read_text().splitlines()
    assert len(lines) == 3
    raw = [json.loads(line) for line in lines]  # strict JSON: no NaN/Infinity tokens
    assert raw[1]["metrics"] == {"a/x": None, "a/z": None}
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [10, 12, 20]
    assert records[0]["metrics"] == {"a/x": 1.5, "a/y": 0.25}
    assert math.isnan(records[1]["metrics"]["a/x"]) and math.isnan(records[1]["metrics"]["a/z"])
    assert records[2]["metrics"] == {"a/x": -3.0}
    times = [r["time"] for r in records]
    assert times == sorted(times) and all(t > 1e9 for t in times)


def test_jsonl_flushes_every_line(tmp_path):
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    sink.log({"k": 1.0}, step=1)
    # Another reader sees the line before close(): a crash now would not lose it.
    assert [r["metrics"] for r in read_jsonl(path)] == [{"k": 1.0}]
    sink.close()
    sink.log({"k": 2.0}, step=2)  # after close: dropped (see the test of an early close)
    assert [r["metrics"] for r in read_jsonl(path)] == [{"k": 1.0}]


def test_truncated_last_line_is_kept_and_the_next_record_starts_a_new_line(tmp_path):
    path = tmp_path / "m.jsonl"
    with JsonlSink(path) as sink:
        sink.log({"k": 1.0}, step=1)
        sink.log({"k": 2.0}, step=2)
    full = path.read_bytes()
    cut = full[: len(full) - 7]
    path.write_bytes(cut)  # the process died while writing line 2
    assert [r["step"] for r in read_jsonl(path)] == [1]
    for step in (3, 4):  # reopening twice: each sink appends, none rewrites
        with JsonlSink(path) as sink:
            sink.log({"k": float(step)}, step=step)
    data = path.read_bytes()
    assert data.startswith(cut + b"\n")  # existing bytes untouched, the cut line kept
    assert [r["step"] for r in read_jsonl(path)] == [1, 3, 4]
    assert len(data.splitlines()) == 4


def test_partial_only_line_is_kept(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "ti')
    assert read_jsonl(path) == []
    with JsonlSink(path) as sink:
        sink.log({"k": 1.0}, step=5)
    assert path.read_text().startswith('{"step": 1, "ti\n')
    assert [r["step"] for r in read_jsonl(path)] == [5]
    with JsonlSink(path) as sink:  # a cut-off first line still marks the file as a run log
        sink.log({"k": 2.0}, step=6)
    assert [r["step"] for r in read_jsonl(path)] == [5, 6]


def test_complete_last_record_without_newline_is_not_lost(tmp_path):
    path = tmp_path / "m.jsonl"
    first = json.dumps({"step": 1, "time": 0.0, "metrics": {"k": 1.0}})
    last = json.dumps({"step": 2, "time": 0.0, "metrics": {"k": 2.0}})
    original = (first + "\n" + last).encode()  # e.g. written by hand or by another tool
    path.write_bytes(original)
    sink = JsonlSink(path)
    assert path.read_bytes() == original  # opening alone writes nothing
    sink.log({}, step=3)
    assert path.read_bytes() == original
    sink.log({"k": 3.0}, step=3)
    sink.log({"k": 4.0}, step=4)
    sink.close()
    assert path.read_bytes().startswith(original + b"\n")
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["metrics"]["k"] for r in records] == [1.0, 2.0, 3.0, 4.0]


def test_a_file_that_is_not_a_run_log_is_refused_and_left_untouched(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors = pytest.importorskip("safetensors.torch")
    weights = tmp_path / "model.safetensors"
    tensors = {"w": torch.arange(100, dtype=torch.float32).reshape(10, 10)}
    safetensors.save_file(tensors, weights)
    others = {
        "notes.txt": b"hello\nworld",
        "config.json": b'{"step": 5, "lr": 0.1}\n',  # JSON, but not a {step, time, metrics}
        "list.jsonl": b"[1, 2]\n",
        "blank_first.jsonl": b'\n{"step": 1, "time": 0, "metrics": {}}\n',
        "binary.bin": bytes(range(256)) * 4,
    }
    for name, data in others.items():
        (tmp_path / name).write_bytes(data)
    for path in [weights, *(tmp_path / n for n in others)]:
        before = path.read_bytes()
        with pytest.raises(ValueError, match="pick another file") as err:
            JsonlSink(path)
        assert str(path) in str(err.value) and "not a JSONL run log" in str(err.value)
        assert path.read_bytes() == before, path.name
    loaded = safetensors.load_file(weights)
    assert torch.equal(loaded["w"], tensors["w"])


def test_non_finite_and_odd_values_never_raise(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    hists = {
        "h/nan": np.array([1.0, np.nan]),
        "h/inf": np.array([np.inf, -np.inf, 2.0]),
        "h/empty": np.array([]),
        "h/big": np.random.default_rng(0).standard_normal(10**6),
    }
    with JsonlSink(path) as sink, caplog.at_level(logging.WARNING):
        sink.log({"a/nan": math.nan, "a/inf": -math.inf, "a/max": 1.7e308}, 1, histograms=hists)
        sink.log({"a/text": "oops", "a/none": None}, 2)  # not numbers: null, one warning
        sink.log({"a/text": "again"}, 3)
    assert caplog.text.count("is not a number") == 1
    raw = [json.loads(line) for line in path.read_text().splitlines()]  # strict JSON
    assert raw[0]["metrics"] == {"a/nan": None, "a/inf": None, "a/max": 1.7e308}
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert math.isnan(records[0]["metrics"]["a/inf"]) and records[0]["metrics"]["a/max"] == 1.7e308
    assert all(math.isnan(v) for v in records[1]["metrics"].values())


class _FailingFile:
    def __init__(self, real):
        self.real = real

    def write(self, data):
        self.real.write(data[: len(data) // 2])  # half a line reaches the disk
        raise OSError(28, "No space left on device")

    def flush(self):
        self.real.flush()

    def close(self):
        self.real.close()


def test_a_failed_write_is_logged_once_and_never_raises(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    sink.log({"k": 1.0}, step=1)
    real = sink._file
    sink._file = _FailingFile(real)
    with caplog.at_level(logging.WARNING):
        sink.log({"k": 2.0}, step=2)
        sink.log({"k": 3.0}, step=3)
    assert caplog.text.count("No space left") == 1
    sink._file = real  # the disk has room again
    sink.log({"k": 4.0}, step=4)
    sink.close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 4]


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "time": 0, "metrics": {}}\nnot json\n'
                    '{"step": 2, "time": 0, "metrics": {}}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


class _FakeRun:
    def __init__(self):
        self.calls = []

    def log(self, payload, step=None):
        self.calls.append((payload, step))


def test_wandb_sink_logs_prefixed_floats_histograms_and_step():
    wandb = pytest.importorskip("wandb")
    run = _FakeRun()
    sink = WandbSink(run, prefix="analysis/")
    sink.log({"param_change/norm_l2": np.float64(2.5)}, step=7)
    sink.log({}, step=8)  # nothing to log: no call
    values = np.arange(10.0)
    sink.log({"x": 1}, step=9, histograms={"gradient/hist": values})
    sink.close()
    assert len(run.calls) == 2
    payload, step = run.calls[0]
    assert step == 7 and payload == {"analysis/param_change/norm_l2": 2.5}
    assert type(payload["analysis/param_change/norm_l2"]) is float
    payload, step = run.calls[1]
    assert step == 9 and payload["analysis/x"] == 1.0
    hist = payload["analysis/gradient/hist"]
    assert isinstance(hist, wandb.Histogram)
    assert sum(hist.histogram) == len(values)


def test_wandb_sink_without_run_warns_once_and_goes_on(monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "run", None)
    sink = WandbSink()
    with caplog.at_level(logging.WARNING):
        sink.log({"a": 1.0}, step=1)
        sink.log({"a": 2.0}, step=2)
    assert caplog.text.count("wandb.init") == 1


def test_wandb_sink_sends_only_finite_histogram_values_and_never_raises(caplog):
    wandb = pytest.importorskip("wandb")
    torch = pytest.importorskip("torch")
    big = np.random.default_rng(0).standard_normal(10**6)
    big[::1000] = np.nan
    hists = {
        "h/nan": np.array([1.0, np.nan, 2.0, 3.0]),
        "h/inf": [np.inf, 0.5, -np.inf],
        "h/all_nan": np.full(5, np.nan),
        "h/empty": np.array([], dtype=np.float32),
        "h/big": big,
        "h/bf16": torch.tensor([1.0, float("nan"), float("inf"), 4.0], dtype=torch.bfloat16),
        "h/ints": np.arange(6),
    }
    run = _FakeRun()
    sink = WandbSink(run, prefix="p/")
    sink.log({"a/nan": math.nan, "a/inf": math.inf, "a/bad": "x"}, step=3, histograms=hists)
    (payload, step), = run.calls
    assert step == 3
    assert math.isnan(payload["p/a/nan"]) and payload["p/a/inf"] == math.inf
    assert "p/a/bad" not in payload
    counts = {k: sum(v.histogram) for k, v in payload.items() if isinstance(v, wandb.Histogram)}
    assert counts == {"p/h/nan": 3, "p/h/inf": 1, "p/h/big": 10**6 - 1000, "p/h/bf16": 2,
                      "p/h/ints": 6}
    sink.log({}, step=4, histograms={"h/empty": []})  # nothing left to send: no call
    assert len(run.calls) == 1

    class Broken:
        def log(self, payload, step=None):
            raise RuntimeError("wandb service died")

    sink = WandbSink(Broken())
    with caplog.at_level(logging.WARNING):
        sink.log({"a": 1.0}, step=1)
        sink.log({"a": 2.0}, step=2, histograms={"h": np.array([np.nan])})
    assert caplog.text.count("wandb service died") == 1


def test_wandb_sink_names_the_extra_when_wandb_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"grail-analysis\[wandb\]"):
        WandbSink()


def test_sinks_satisfy_the_protocol(tmp_path):
    class Mine:
        def log(self, metrics, step):
            pass

        def close(self):
            pass

    with JsonlSink(tmp_path / "m.jsonl") as sink:
        assert isinstance(sink, MetricSink)
    assert isinstance(Mine(), MetricSink)
    assert not isinstance(object(), MetricSink)


@pytest.mark.slow
def test_importing_the_packages_loads_no_heavy_library():
    code = (
        "import sys, grail.trainer.analysis, grail.trainer.analysis.integrations as i\n"
        "i.JsonlSink, i.read_jsonl, i.MetricSink, i.WandbSink\n"
        "heavy = [m for m in ('transformers', 'wandb', 'trl', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'ModelAnalysisCallback' in dir(i)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_sink_declares_the_protocols_log_signature():
    """log(metrics, step, histograms=None) and close(): the protocol declares histograms, and
    every sink of the package - the HF callback's trainer log included - takes them so."""
    import inspect

    from grail.trainer.analysis.integrations.accelerate import AccelerateSink
    from grail.trainer.analysis.integrations.tensorboard import TensorBoardSink

    def shape(fn):
        params = list(inspect.signature(fn).parameters.values())[1:]  # without self
        return [(p.name, p.default) for p in params]

    want = [("metrics", inspect.Parameter.empty), ("step", inspect.Parameter.empty),
            ("histograms", None)]
    sinks = [MetricSink, JsonlSink, WandbSink, AccelerateSink, TensorBoardSink]
    if importlib_util.find_spec("transformers") is not None:
        from grail.trainer.analysis.integrations.transformers import _TrainerLog

        sinks.append(_TrainerLog)
    for cls in sinks:
        assert shape(cls.log) == want, cls.__name__
        assert callable(getattr(cls, "close", None)), cls.__name__


def test_a_sink_closed_early_drops_later_metrics_with_one_warning(tmp_path, caplog):
    """Training never breaks because a sink was closed before the loop ended."""
    sink = JsonlSink(tmp_path / "m.jsonl")
    sink.log({"a": 1.0}, step=1)
    sink.close()
    caplog.set_level(logging.WARNING)
    sink.log({"a": 2.0}, step=2)
    sink.log({"a": 3.0}, step=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1]
    said = [r for r in caplog.records if "is closed" in r.getMessage()]
    assert len(said) == 1 and "step 2" in said[0].getMessage()


def test_the_callback_names_the_hf_extra_when_transformers_is_missing():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "try:\n"
        "    from grail.trainer.analysis.integrations import ModelAnalysisCallback\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "grail-analysis[hf]" in out.stdout, out
