"""LightningAnalysisCallback in real Lightning training runs on CPU (tiny random-init Qwen2)."""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

L = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger  # noqa: E402

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager  # noqa: E402
from grail.trainer.analysis.integrations import LightningAnalysisCallback  # noqa: E402
from tests.conftest import tiny_qwen2  # noqa: E402

from ._hf import Recorder  # noqa: E402

pytestmark = pytest.mark.slow

VOCAB, SEQ, BATCH = 128, 12, 4


def _rows(n: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": r, "labels": r} for r in ids]


class _TinyLMBody:
    """A causal LM whose forward returns logits; the loss is logged as ``train_loss``.

    Mixed into the ``LightningModule`` of ``lightning.pytorch`` or of ``pytorch_lightning``.
    """

    def __init__(self, tuple_batches: bool = False, same_batches: bool = False) -> None:
        super().__init__()
        self.model = tiny_qwen2(vocab=VOCAB)
        self.tuple_batches = tuple_batches
        self.same_batches = same_batches

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        if self.tuple_batches:
            batch = {"input_ids": batch[0], "labels": batch[1]}
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        rows = _rows()
        if self.same_batches:  # every batch alike: where a resumed epoch starts is moot
            rows = rows[:BATCH] * 4
        if self.tuple_batches:
            rows = [(r["input_ids"], r["labels"]) for r in rows]
        return torch.utils.data.DataLoader(rows, batch_size=BATCH)


class TinyLM(_TinyLMBody, L.LightningModule):
    pass


class StateRecorder(L.Callback):
    """After every optimizer step: float64 weights and the float64 norm of the gradients."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, np.ndarray]] = {}
        self.grad_norm: dict[int, float] = {}
        self.batches_per_step: dict[int, int] = {}
        self.all_training: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.all_training.append(all(m.training for m in pl_module.modules()))
        self.batches_per_step[step] = self.batches_per_step.get(step, 0) + 1
        self.weights[step] = {
            n: p.detach().double().numpy().copy() for n, p in pl_module.named_parameters()
        }
        grads = [p.grad.detach().double().numpy() for p in pl_module.parameters()
                 if p.grad is not None]
        self.grad_norm[step] = math.sqrt(sum(float(np.sum(g * g)) for g in grads))


def _config(**overrides: Any) -> AnalysisConfig:
    base: dict[str, Any] = {"interval": 2, "gradient_enabled": True, "adam_sign_enabled": True,
                            "fused_kernels": False}
    return AnalysisConfig(**{**base, **overrides})


def _fit(tmp_path: Path, module: Any, callbacks: list[Any], *, trainer_cls: Any = None,
         ckpt_path: str | None = None, **kw: Any) -> Any:
    trainer_cls = trainer_cls or L.Trainer
    loggers = kw.pop("logger", None)
    if loggers is None:
        loggers = CSVLogger(str(tmp_path), name="csv", version=0)
    settings: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_steps": 6, "log_every_n_steps": 1,
        "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    trainer = trainer_cls(logger=loggers, callbacks=callbacks, **{**settings, **kw})
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _csv(tmp_path: Path) -> list[dict[str, str]]:
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _analysis_rows(rows: list[dict[str, str]], prefix: str = "analysis/") -> dict[int, dict]:
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        found = {k[len(prefix):]: float(v) for k, v in row.items() if k.startswith(prefix) and v}
        if found:
            assert int(row["step"]) not in out
            out[int(row["step"])] = found
    return out


def _losses(rows: list[dict[str, str]]) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]


def test_metrics_reach_the_csv_logger_at_global_steps_and_training_is_unchanged(tmp_path):
    torch.manual_seed(0)
    plain = TinyLM()
    _fit(tmp_path / "plain", plain, [])
    rng_plain = torch.get_rng_state()

    torch.manual_seed(0)
    module = TinyLM()
    recorder = StateRecorder()
    callback = LightningAnalysisCallback(ModelAnalysisManager.create(_config()))
    _fit(tmp_path, module, [callback, recorder])

    rows = _csv(tmp_path)
    found = _analysis_rows(rows)
    assert sorted(found) == [4, 6]  # snapshot at global step 2, then every 2 steps
    for step in (4, 6):
        m = found[step]
        # The gradients of that optimizer step were present (independent float64 norm).
        assert m["gradient/norm_l2"] == pytest.approx(recorder.grad_norm[step], rel=1e-6)
        assert m["gradient/norm_l2"] > 0 and m["gradient/missing_ratio"] == 0.0
        assert "adam_sign/frac_near_one" in m
        # The update is W(step) - W(step - 2), the weights after those optimizer steps.
        old, new = recorder.weights[step - 2], recorder.weights[step]
        ref = math.sqrt(sum(float(np.sum((new[n] - old[n]) ** 2)) for n in new))
        assert m["param_change/norm_l2"] == pytest.approx(ref, rel=1e-6)
        assert "sparse/kl_at_1e-06" in m  # forward metrics ran on the dict batch

    # Training is untouched: the same losses at the same steps, bit-identical weights and
    # the same global RNG state as a run without the callback.
    assert _losses(rows) == _losses(_csv(tmp_path / "plain"))
    assert len(_losses(rows)) == 6
    for (name, a), b in zip(module.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(torch.get_rng_state(), rng_plain)
    assert not any(p.grad is None for p in module.parameters())  # Lightning's grads kept
    assert recorder.all_training == [True] * 6  # train mode restored after the analysis


class RaisingForward(TinyLM):
    """Training uses ``self.model`` directly; only the analysis calls ``forward``."""

    def forward(self, input_ids, attention_mask=None):
        self.model(input_ids=input_ids)  # half-way through, as a real failure would be
        raise RuntimeError("forward broke")


def test_a_forward_that_raises_leaves_training_bit_identical(tmp_path):
    plain = TinyLM()
    _fit(tmp_path / "plain", plain, [])
    module = RaisingForward()
    analyzer = ModelAnalysisManager.create(_config())
    _fit(tmp_path, module, [LightningAnalysisCallback(analyzer)])
    for (name, a), b in zip(module.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
    assert _losses(_csv(tmp_path)) == _losses(_csv(tmp_path / "plain"))
    found = _analysis_rows(_csv(tmp_path))
    assert sorted(found) == [4, 6] and "param_change/norm_l2" in found[4]
    assert not any(k.startswith("sparse/") for k in found[4])  # the failing family is skipped


def test_gradient_accumulation_measures_only_real_optimizer_steps(tmp_path):
    torch.manual_seed(0)
    analyzer = ModelAnalysisManager.create(_config(sparse_quality_enabled=False))
    calls: list[int] = []
    real = analyzer.on_optimizer_step

    def spy(model, inputs=None, optimizer=None, **kw):
        calls.append(kw["step"])
        return real(model, inputs, optimizer, **kw)

    analyzer.on_optimizer_step = spy
    recorder = StateRecorder()
    _fit(tmp_path, TinyLM(), [LightningAnalysisCallback(analyzer), recorder],
         max_steps=4, accumulate_grad_batches=2)

    assert calls == [1, 2, 3, 4]  # once per optimizer step, not per micro-batch
    assert recorder.batches_per_step == {0: 1, 1: 2, 2: 2, 3: 2, 4: 1}
    found = _analysis_rows(_csv(tmp_path))
    assert sorted(found) == [4]
    # The accumulated gradients the optimizer used at step 4 are the ones measured.
    assert found[4]["gradient/norm_l2"] == pytest.approx(recorder.grad_norm[4], rel=1e-6)


class InputRecorder(Recorder):
    def requires_inputs(self) -> bool:
        return True


def test_probe_inputs_and_batch_to_inputs(tmp_path, caplog):
    probe = {"input_ids": torch.randint(0, VOCAB, (3, 5))}
    rec = InputRecorder()
    analyzer = ModelAnalysisManager(_config()).add_metric(rec)
    _fit(tmp_path / "probe", TinyLM(), [LightningAnalysisCallback(analyzer, probe_inputs=probe)],
         max_steps=4)
    assert [c["step"] for c in rec.calls] == [4]
    assert torch.equal(rec.calls[0]["inputs"]["input_ids"], probe["input_ids"])
    assert rec.calls[0]["grads"] and not rec.calls[0]["grad_enabled"]
    assert isinstance(rec.calls[0]["optimizer"], torch.optim.AdamW)

    # Tuple batches: the default finds no model inputs (one warning), a function does.
    rec = InputRecorder()
    analyzer = ModelAnalysisManager(_config()).add_metric(rec)
    with caplog.at_level(logging.WARNING, "grail.trainer.analysis.integrations.lightning"):
        _fit(tmp_path / "tuple", TinyLM(tuple_batches=True), [LightningAnalysisCallback(analyzer)],
             max_steps=6)
    assert rec.calls == []
    assert sum("batch_to_inputs" in r.getMessage() for r in caplog.records) == 1

    rec = InputRecorder()
    analyzer = ModelAnalysisManager(_config()).add_metric(rec)
    callback = LightningAnalysisCallback(analyzer, batch_to_inputs=lambda b: {"input_ids": b[0]})
    _fit(tmp_path / "fn", TinyLM(tuple_batches=True), [callback], max_steps=4)
    assert rec.calls[0]["inputs"]["input_ids"].shape == (BATCH, SEQ)


class WandbLogger(Logger):
    """Stands in for Lightning's WandbLogger (recognised by its class name); records calls."""

    name, version = "fake", 0

    def __init__(self) -> None:
        super().__init__()
        self.experiment = self  # WandbLogger.experiment is the wandb run
        self.scalars: list[tuple[int, dict]] = []
        self.runs: list[dict] = []

    def log_metrics(self, metrics, step=None):
        self.scalars.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log(self, payload):  # the run's log
        self.runs.append(dict(payload))


def test_histograms_reach_the_tensorboard_and_wandb_loggers(tmp_path):
    wandb = pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    analyzer = ModelAnalysisManager.create(
        _config(sparse_quality_enabled=False, histogram_samples=64))
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    fake = WandbLogger()
    _fit(tmp_path, TinyLM(), [LightningAnalysisCallback(analyzer)], max_steps=4,
         logger=[tb, fake])
    assert [step for step, m in fake.scalars if "analysis/gradient/norm_l2" in m] == [4]
    (run,) = fake.runs
    assert run["trainer/global_step"] == 4
    assert isinstance(run["analysis/gradient/abs_grad"], wandb.Histogram)
    assert sum(run["analysis/gradient/abs_grad"].histogram) == 64
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "analysis/gradient/norm_l2" in scalars
    assert [e.step for e in events.Scalars("analysis/gradient/norm_l2")] == [4]
    hist = events.Histograms("analysis/gradient/abs_grad")
    assert [h.step for h in hist] == [4] and hist[0].histogram_value.num == 64


def test_resume_from_a_checkpoint_continues_the_numbers(tmp_path):
    torch.manual_seed(0)
    full = ModelAnalysisManager.create(_config(param_change_track_mask_overlap=True))
    _fit(tmp_path / "full", TinyLM(same_batches=True), [LightningAnalysisCallback(full)],
         max_steps=12)
    expected = _analysis_rows(_csv(tmp_path / "full"))
    assert sorted(expected) == [4, 6, 8, 10, 12]

    # The same run stopped after the first epoch (4 steps) and resumed: new module, new
    # manager, the Lightning checkpoint. Lightning resumes a checkpoint written at the end of
    # an epoch with one more batch of that epoch, so every batch is the same batch here.
    torch.manual_seed(0)
    first = ModelAnalysisManager.create(_config(param_change_track_mask_overlap=True))
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    _fit(tmp_path / "a", TinyLM(same_batches=True), [LightningAnalysisCallback(first), saver],
         max_steps=4,
         enable_checkpointing=True)
    ckpt = next((tmp_path / "ckpt").glob("*step=4.ckpt"))
    second = ModelAnalysisManager.create(_config(param_change_track_mask_overlap=True))
    _fit(tmp_path / "b", TinyLM(same_batches=True), [LightningAnalysisCallback(second)],
         max_steps=12,
         ckpt_path=str(ckpt))
    resumed = _analysis_rows(_csv(tmp_path / "b"))
    assert sorted(resumed) == [6, 8, 10, 12]  # step 4 is the restored baseline: nothing lost
    assert math.isfinite(resumed[6]["param_change/mask_overlap"])  # carried state restored
    for step in resumed:
        assert set(resumed[step]) == set(expected[step])
        for key, value in expected[step].items():
            assert resumed[step][key] == pytest.approx(value, rel=1e-6, nan_ok=True), (step, key)


def test_drift_base_is_captured_at_train_start(tmp_path):
    class Drifting(ModelAnalysisManager):
        def __init__(self, config):
            super().__init__(config)
            self.bases: list[tuple[int, torch.Tensor]] = []
            self.fail = False

        def set_base(self, source):
            if self.fail:
                raise RuntimeError("no memory for a base")
            self.bases.append((self.step_count, next(source.parameters()).detach().clone()))

    torch.manual_seed(0)
    module = TinyLM()
    initial = next(module.parameters()).detach().clone()
    analyzer = Drifting.create(_config(sparse_quality_enabled=False))
    analyzer.config.drift_enabled = True  # the drift field may not exist yet: set it here
    _fit(tmp_path / "on", module, [LightningAnalysisCallback(analyzer)], max_steps=4)
    assert len(analyzer.bases) == 1
    step, base = analyzer.bases[0]
    assert step == 0 and torch.equal(base, initial)

    off = Drifting.create(_config(sparse_quality_enabled=False))
    off.config.drift_enabled = False
    _fit(tmp_path / "off", TinyLM(), [LightningAnalysisCallback(off)], max_steps=2)
    assert off.bases == []

    failing = Drifting.create(_config(sparse_quality_enabled=False))
    failing.fail = True
    failing.config.drift_enabled = True
    _fit(tmp_path / "fail", TinyLM(), [LightningAnalysisCallback(failing)], max_steps=4)
    assert sorted(_analysis_rows(_csv(tmp_path / "fail"))) == [4]  # training and analysis go on


def test_a_failing_logger_does_not_stop_training(tmp_path, caplog):
    class Broken(CSVLogger):
        def log_metrics(self, metrics, step=None):
            if any(k.startswith("analysis/") for k in metrics):
                raise OSError("disk full")
            super().log_metrics(metrics, step)

    analyzer = ModelAnalysisManager.create(_config(sparse_quality_enabled=False))
    with caplog.at_level(logging.WARNING, "grail.trainer.analysis.integrations.lightning"):
        trainer = _fit(tmp_path, TinyLM(), [LightningAnalysisCallback(analyzer)],
                       logger=Broken(str(tmp_path), name="csv", version=0))
    assert trainer.global_step == 6
    assert sum("disk full" in r.getMessage() for r in caplog.records) == 1
    assert len(_losses(_csv(tmp_path))) == 6


def test_pytorch_lightning_trainer_accepts_the_callback(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    module = type("PlTinyLM", (_TinyLMBody, pl.LightningModule), {})()
    analyzer = ModelAnalysisManager.create(_config(sparse_quality_enabled=False))
    callback = LightningAnalysisCallback(analyzer)
    assert isinstance(callback, pl.Callback) and isinstance(callback, L.Callback)
    from pytorch_lightning.loggers import CSVLogger as PlCSVLogger

    logger = PlCSVLogger(str(tmp_path), name="csv", version=0)
    _fit(tmp_path, module, [callback], trainer_cls=pl.Trainer, max_steps=4, logger=logger)
    assert sorted(_analysis_rows(_csv(tmp_path))) == [4]


def test_bad_arguments_fail_at_construction():
    analyzer = ModelAnalysisManager.create(_config())
    with pytest.raises(TypeError, match="ModelAnalysisManager"):
        LightningAnalysisCallback(object())
    with pytest.raises(TypeError, match="tokenize text first"):
        LightningAnalysisCallback(analyzer, probe_inputs=["a probe"])
    with pytest.raises(TypeError, match="batch_to_inputs"):
        LightningAnalysisCallback(analyzer, batch_to_inputs="input_ids")


def test_missing_lightning_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "from grail.trainer.analysis import integrations\n"
        "try:\n"
        "    integrations.LightningAnalysisCallback\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "grail-analysis[lightning]" in out.stdout


class RankReport(L.Callback):
    """Writes what each rank's analysis returned, for the parent process to compare."""

    def __init__(self, analyzer: ModelAnalysisManager, out: str) -> None:
        self.analyzer, self.out = analyzer, out
        self.seen: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.analyzer.last_metrics and trainer.global_step % 2 == 0:
            self.seen[trainer.global_step] = dict(self.analyzer.last_metrics)

    def on_train_end(self, trainer, pl_module):
        with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({str(k): v for k, v in self.seen.items()}, f)


def _spawned(run: Any, tmp_path: Path) -> None:
    """``run(folder)`` with Lightning's ``ddp_spawn``, once more in a fresh folder if a spawned
    rank aborted at interpreter exit: on gloo, torch 2.13 now and then aborts a process after
    its work is done ("terminate called without an active exception"; see ``ranks.py``), which
    says nothing about the run."""
    from torch.multiprocessing.spawn import ProcessExitedException

    try:
        run(tmp_path / "try1")
    except ProcessExitedException as err:
        if getattr(err, "signal_name", None) != "SIGABRT":
            raise
        run(tmp_path / "try2")


@pytest.mark.distributed
def test_ddp_every_rank_measures_the_same_and_rank_zero_logs(tmp_path):
    def run(folder: Path) -> None:
        folder.mkdir()
        analyzer = ModelAnalysisManager.create(_config(sparse_quality_enabled=False))
        callback = LightningAnalysisCallback(analyzer)
        _fit(folder, TinyLM(), [callback, RankReport(analyzer, str(folder))], max_steps=4,
             devices=2, strategy="ddp_spawn")
        ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert sorted(ranks[0]) == ["4"] and ranks[0] == ranks[1]
        found = _analysis_rows(_csv(folder))
        assert sorted(found) == [4]
        assert found[4]["gradient/norm_l2"] == pytest.approx(ranks[0]["4"]["gradient/norm_l2"])

    _spawned(run, tmp_path)


@pytest.mark.distributed
def test_ddp_resume_restores_the_carried_state_from_rank_zeros_checkpoint(tmp_path):
    """Rank zero's state is saved; under DDP it is right on every rank (rank zero alone carries
    the replicated parameters' changed sets), so mask_overlap goes on at the first measurement
    after the resume instead of starting over (NaN). Lightning's DDP resume itself does not
    reproduce the uninterrupted run's updates here, so values are not compared."""
    config = _config(sparse_quality_enabled=False, gradient_enabled=False,
                     adam_sign_enabled=False, param_change_track_mask_overlap=True)
    ddp = {"devices": 2, "strategy": "ddp_spawn"}

    def run(folder: Path) -> None:
        first = ModelAnalysisManager.create(config)
        saver = ModelCheckpoint(dirpath=str(folder / "ckpt"), save_top_k=-1, every_n_epochs=1)
        _fit(folder / "a", TinyLM(same_batches=True), [LightningAnalysisCallback(first), saver],
             max_steps=4, enable_checkpointing=True, **ddp)
        ckpt = next((folder / "ckpt").glob("*step=4.ckpt"))
        second = ModelAnalysisManager.create(config)
        _fit(folder / "b", TinyLM(same_batches=True), [LightningAnalysisCallback(second)],
             max_steps=6, ckpt_path=str(ckpt), **ddp)
        resumed = _analysis_rows(_csv(folder / "b"))
        assert sorted(resumed) == [6]  # step 4 is the restored baseline: nothing lost
        assert 0.0 < resumed[6]["param_change/mask_overlap"] <= 1.0  # carried state restored

    _spawned(run, tmp_path)


def test_only_a_model_every_rank_holds_whole_restores_rank_zeros_state(tmp_path):
    """The DDP restore branch needs whole parameters on every rank; sharded ones (FSDP2's
    DTensors), FSDP1's flat parameters and layouts the analysis cannot read take the
    re-baseline branch, without raising into training."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.device_mesh import init_device_mesh

    from grail.trainer.analysis.integrations.lightning import _replicated

    assert _replicated(tiny_qwen2(vocab=VOCAB))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for placement in (Shard(0), Shard(1)):  # Shard(1): not read by the analysis
            linear = torch.nn.Linear(4, 4)
            linear.weight = torch.nn.Parameter(distribute_tensor(linear.weight.detach(), mesh,
                                                                 [placement]))
            assert not _replicated(linear)
    finally:
        dist.destroy_process_group()

    class FullyShardedDataParallel(torch.nn.Module):  # FSDP1's wrapper, by its name
        pass

    wrapped = torch.nn.Sequential(FullyShardedDataParallel(), torch.nn.Linear(2, 2))
    assert not _replicated(wrapped)


def test_a_restore_that_raises_keeps_no_carried_state(tmp_path, caplog):
    """A computer whose configuration does not fit raises from the baseline taken in
    load_state_dict: nothing restored survives, and the callback re-baselines (the error
    reaches the caller there, as it would without a checkpoint)."""
    from grail.trainer.analysis.metrics.base import MetricComputer

    class Refuses(MetricComputer):
        name = "refuses"

        def requires_base(self) -> bool:
            return True

        def check_base(self, base) -> None:
            raise ValueError("this computer's configuration does not fit the model")

        def compute(self, delta=None, **kwargs):
            return {}

    model = tiny_qwen2(vocab=VOCAB)
    source = ModelAnalysisManager.create(_config(param_change_track_mask_overlap=True))
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        source.on_optimizer_step(model, step=step)
    state = source.state_dict()
    assert any(k.endswith("mask_overlap") for k in state["computers"])
    target = ModelAnalysisManager.create(_config(param_change_track_mask_overlap=True))
    target.add_metric(Refuses())
    state["computers"] = dict(state["computers"])
    with pytest.raises(ValueError, match="does not fit"):
        target.load_state_dict(state, model=model)
    overlap = next(c for c in target.computers if c.name == "mask_overlap")
    assert overlap.state_dict() == {}  # not kept without its baseline
