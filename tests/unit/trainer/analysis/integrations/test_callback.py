"""ModelAnalysisCallback: batch capture, probe inputs, logging, ranks (no training loop)."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainerControl, TrainerState

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.integrations import ModelAnalysisCallback, tokenize_probe
from tests.conftest import tiny_qwen2

from ._hf import Recorder, bpe_tokenizer, training_args


def _manager(interval: int = 1, **cfg) -> ModelAnalysisManager:
    return ModelAnalysisManager.create(AnalysisConfig(interval=interval, **cfg))


def test_constructor_rejects_bad_arguments():
    with pytest.raises(TypeError, match="ModelAnalysisManager"):
        ModelAnalysisCallback(AnalysisConfig())
    for bad in ("one string", [], [1, 2], 3.0):
        with pytest.raises(TypeError, match="probe_inputs"):
            ModelAnalysisCallback(_manager(), probe_inputs=bad)


def _begin(cb, model, processing_class=None, step=0, args=None):
    state = TrainerState()
    state.global_step = step
    cb.on_train_begin(args, state, TrainerControl(), model=model,
                      processing_class=processing_class)
    return state


def test_analysis_forwards_do_not_replace_the_captured_batch():
    model = tiny_qwen2()
    rec = Recorder()
    cb = ModelAnalysisCallback(_manager(interval=1).add_metric(rec))
    state = _begin(cb, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 128, (2, 6))
    for step in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        state.global_step = step
        cb.on_optimizer_step(None, state, TrainerControl(), model=model, optimizer=opt)
        assert cb.capture.batch["input_ids"] is ids  # the sparse forwards were not captured
        opt.zero_grad()
    assert [c["step"] for c in rec.calls] == [2, 3]
    assert all(c["inputs"]["input_ids"] is ids and c["grads"] for c in rec.calls)
    assert "sparse/kl_at_1e-06" in cb.analyzer.last_metrics
    cb.on_train_end(None, state, TrainerControl())
    assert cb.capture.batch is None  # the hook is gone and the reference released
    model(input_ids=ids)
    assert cb.capture.batch is None


def test_probe_strings_are_tokenized_once_and_used(caplog):
    tok = bpe_tokenizer()
    model = tiny_qwen2(vocab=len(tok))
    rec = Recorder()
    texts = ["3 plus 6 makes 9", "10 plus"]
    cb = ModelAnalysisCallback(_manager(interval=1).add_metric(rec), probe_inputs=texts)
    state = _begin(cb, model, processing_class=tok)
    want = tokenize_probe(texts, tok)
    for step in range(2):
        with torch.no_grad():
            model.lm_head.weight.add_(0.01)
        state.global_step = step
        cb.on_optimizer_step(None, state, TrainerControl(), model=model)
    got = rec.calls[-1]["inputs"]
    assert torch.equal(got["input_ids"], want["input_ids"])
    metrics = cb.analyzer.last_metrics
    assert metrics["sparse/tokens"] == float(want["attention_mask"].sum())
    with pytest.raises(ValueError, match="tokenizer"):
        _begin(ModelAnalysisCallback(_manager(), probe_inputs=texts), model)


def _measure_once(cb, model, is_main: bool):
    state = _begin(cb, model)
    state.is_world_process_zero = is_main
    control = TrainerControl()
    for step in range(2):
        with torch.no_grad():
            model.lm_head.weight.add_(0.01)
        state.global_step = step
        cb.on_optimizer_step(None, state, control, model=model)
        state.global_step = step + 1
        cb.on_step_end(None, state, control)
    return state


def test_only_the_main_process_logs_but_every_rank_measures(caplog):
    model = tiny_qwen2()
    cb = ModelAnalysisCallback(_manager(interval=1, sparse_quality_enabled=False))
    state = _measure_once(cb, model, is_main=False)
    assert state.log_history == []
    assert cb.analyzer.last_metrics["param_change/norm_l2"] > 0  # the analysis did run

    cb = ModelAnalysisCallback(_manager(interval=1, sparse_quality_enabled=False), prefix="x/")
    with caplog.at_level(logging.WARNING):
        state = _measure_once(cb, model, is_main=True)
    assert "could not find its trainer" in caplog.text  # no Trainer on the call stack here
    assert [e["step"] for e in state.log_history] == [2]
    assert state.log_history[0]["x/param_change/norm_l2"] == cb.analyzer.last_metrics[
        "param_change/norm_l2"]


def _args(tmp_path, resume=None):
    from types import SimpleNamespace

    return SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=resume,
                           report_to=["none"])


def _overlap_callback() -> ModelAnalysisCallback:
    return ModelAnalysisCallback(
        _manager(interval=2, sparse_quality_enabled=False, param_change_track_mask_overlap=True)
    )


def _steps(cb, model, state, steps):
    for step in steps:
        with torch.no_grad():
            model.lm_head.weight[step % 7].add_(0.01)  # a different row changes at every step
        state.global_step = step - 1
        cb.on_optimizer_step(None, state, TrainerControl(), model=model)
        state.global_step = step


def test_state_is_saved_per_checkpoint_and_restored_only_when_it_fits(tmp_path, caplog):
    model = tiny_qwen2()
    cb = _overlap_callback()
    state = _begin(cb, model)
    _steps(cb, model, state, range(1, 5))
    (tmp_path / "checkpoint-4").mkdir()
    cb.on_save(_args(tmp_path), state, TrainerControl())
    saved = tmp_path / "checkpoint-4" / "grail_analysis_state_rank0.pt"
    assert saved.is_file() and not list(tmp_path.glob("**/*.tmp"))
    mask = cb.analyzer.computers[1].state_dict()["previous"]

    # Resumed at step 4 from args.resume_from_checkpoint: the changed set comes back.
    again = _overlap_callback()
    _begin(again, model, step=4, args=_args(tmp_path / "elsewhere", tmp_path / "checkpoint-4"))
    restored = again.analyzer.computers[1].state_dict()["previous"]
    assert restored.keys() == mask.keys()
    assert all(torch.equal(restored[n], mask[n]) for n in mask)
    assert again.analyzer.step_count == 4 and again.analyzer.old_snapshot is not None

    # A file saved at another step (copied by hand, say) or a damaged one is not used.
    for name, make in (("checkpoint-6", lambda p: p.write_bytes(saved.read_bytes())),
                       ("checkpoint-8", lambda p: p.write_bytes(b"not a torch file"))):
        (tmp_path / name).mkdir()
        make(tmp_path / name / saved.name)
        other = _overlap_callback()
        step = int(name.split("-")[1])
        with caplog.at_level(logging.WARNING):
            _begin(other, model, step=step, args=_args(tmp_path))
        assert "not restored" in caplog.text
        assert other.analyzer.computers[1].state_dict() == {}
        assert other.analyzer.step_count == step and other.analyzer.old_snapshot is not None
        caplog.clear()


def test_saving_the_state_never_raises(tmp_path, caplog, monkeypatch):
    model = tiny_qwen2()
    cb = _overlap_callback()
    state = _begin(cb, model)
    _steps(cb, model, state, range(1, 5))
    with caplog.at_level(logging.WARNING):
        cb.on_save(_args(tmp_path), state, TrainerControl())  # no checkpoint-4 folder
        cb.on_save(_args(tmp_path), state, TrainerControl())
    assert caplog.text.count("not found") == 1
    (tmp_path / "checkpoint-4").mkdir()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with caplog.at_level(logging.WARNING):
        cb.on_save(_args(tmp_path), state, TrainerControl())
    assert "No space left" in caplog.text


def test_a_failing_log_backend_never_reaches_training(tmp_path, caplog):
    from transformers import Trainer, TrainerCallback

    class BrokenBackend(TrainerCallback):
        """Stands in for a reporting integration that raises on every log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            raise RuntimeError("backend down")

    model = tiny_qwen2()
    cb = ModelAnalysisCallback(_manager(interval=1, sparse_quality_enabled=False))
    trainer = Trainer(model=model, args=training_args(str(tmp_path)), callbacks=[BrokenBackend()])
    state = _begin(cb, model)
    cb.trainer = trainer
    control = TrainerControl()
    control.should_log = True
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            with torch.no_grad():
                model.lm_head.weight.add_(0.01)
            state.global_step = step
            cb.on_optimizer_step(None, state, control, model=model)
            state.global_step = step + 1
            cb.on_step_end(trainer.args, state, control)
    assert caplog.text.count("backend down") == 1
    assert control.should_log is True  # the trainer's own log of the step is kept


# --- the trainer: passed explicitly, or found by the one documented lookup ------------------
def test_callback_events_pass_no_trainer_so_the_lookup_is_still_needed():
    """What CallbackHandler.call_event hands every event. If transformers starts passing the
    trainer (or anything else), this fails: then use it instead of find_training_loop."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler

    from grail.trainer.analysis.integrations.transformers import EVENT_KWARGS

    seen: dict[str, set[str]] = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["on_train_begin"] = set(kwargs)

        def on_optimizer_step(self, args, state, control, **kwargs):
            seen["on_optimizer_step"] = set(kwargs)

    handler = CallbackHandler([Spy()], tiny_qwen2(), None, None, None)
    handler.on_train_begin(None, TrainerState(), TrainerControl())
    handler.on_optimizer_step(None, TrainerState(), TrainerControl())
    assert seen == {"on_train_begin": set(EVENT_KWARGS), "on_optimizer_step": set(EVENT_KWARGS)}
    assert "trainer" not in EVENT_KWARGS


def test_an_explicit_trainer_is_used_and_a_wrong_one_is_refused(tmp_path, caplog):
    """trainer= (as TRL's callbacks take it) is logged through even where no trainer is on the
    call stack; anything that is not a Trainer fails at construction."""
    from transformers import Trainer

    with pytest.raises(TypeError, match="trainer must be a transformers"):
        ModelAnalysisCallback(_manager(), trainer=object())
    model = tiny_qwen2()
    trainer = Trainer(model=model, args=training_args(str(tmp_path)))
    cb = ModelAnalysisCallback(_manager(interval=1, sparse_quality_enabled=False), trainer=trainer)
    assert cb.trainer is trainer
    trainer.add_callback(cb)
    with caplog.at_level(logging.WARNING):
        state = _measure_once(cb, model, is_main=True)
    assert cb.trainer is trainer  # the failed stack lookup does not replace it
    assert "could not find its trainer" not in caplog.text
    assert state.log_history == []  # went through trainer.log, not the fallback
    logged = [e for e in trainer.state.log_history if "analysis/param_change/norm_l2" in e]
    assert len(logged) == 1


def test_find_training_loop_finds_the_trainer_and_its_resume_checkpoint(tmp_path):
    """Called from an event inside Trainer.train, the lookup returns the trainer holding the
    callback and the checkpoint train() resumes from (True resolved to a path)."""
    from transformers import Trainer, TrainerCallback

    from grail.trainer.analysis.integrations.transformers import find_training_loop

    from ._hf import lm_dataset

    found = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            found.append(find_training_loop(self))

    assert find_training_loop(Probe()) == (None, None)  # no training loop here
    probe = Probe()
    args = training_args(str(tmp_path), max_steps=2, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=tiny_qwen2(), args=args, train_dataset=lm_dataset(), callbacks=[probe])
    trainer.train()
    trainer.train(resume_from_checkpoint=True)
    assert found[0] == (trainer, None)
    assert found[1][0] is trainer and found[1][1] == str(tmp_path / "checkpoint-2")
