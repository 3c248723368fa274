"""The base of drift/*: set_base sources, when it is taken, checks, re-baselining, state, the HF
callback."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.offline.checkpoint import CheckpointError
from tests.conftest import tiny_qwen2

CFG = {"interval": 2, "drift_enabled": True, "drift_keep_ratios": [0.1]}


@torch.no_grad()
def _update(model: torch.nn.Module, seed: int, scale: float = 1e-3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _norm(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(((a[n].double() - b[n].double()) ** 2).sum().item() for n in a)))


def _inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))}


def _manager(**overrides) -> ModelAnalysisManager:
    return ModelAnalysisManager.create(AnalysisConfig(**{**CFG, **overrides}))


def test_set_base_from_a_model_a_state_dict_and_saved_checkpoints_gives_identical_metrics(
    tmp_path,
):
    base_model = tiny_qwen2(seed=4)
    model = tiny_qwen2(seed=4)
    _update(model, 99, 1e-2)  # the run starts elsewhere: the base is not the first weights
    state = {n: t.detach().clone() for n, t in base_model.state_dict().items()}
    save_file({n: t.contiguous() for n, t in state.items()}, tmp_path / "base.safetensors")
    torch.save(state, tmp_path / "base.pt")
    base_model.save_pretrained(tmp_path / "hf")
    sources = {
        "model": (base_model, None),
        "model+layout": (base_model, model),
        "state_dict": (state, model),
        "state_dict pending": (state, None),
        "safetensors": (str(tmp_path / "base.safetensors"), model),
        "pt pending": (tmp_path / "base.pt", None),
        "hf dir": (str(tmp_path / "hf"), model),
    }
    managers = {}
    for label, (source, layout) in sources.items():
        managers[label] = _manager()
        managers[label].set_base(source, model=layout)
    results: dict[str, list[dict]] = {label: [] for label in managers}
    for step in range(1, 7):
        _update(model, step)
        for label, manager in managers.items():
            out = manager.on_optimizer_step(model, inputs=_inputs())
            if out:
                results[label].append(out)
    want = results["model"]
    assert len(want) == 2 and want[0]["drift/kl_base_now"] > 0
    assert want[-1]["drift/norm_l2"] == pytest.approx(
        _norm(_weights(model), _weights(base_model)), rel=1e-6)
    for label, got in results.items():
        assert got == want, label  # bit for bit
        base = managers[label].base_snapshot
        for n, p in base_model.named_parameters():
            assert torch.equal(base.data[n], p.detach()), (label, n)


def test_a_bf16_checkpoint_of_an_fp32_run_is_kept_exactly_as_float32(tmp_path):
    model = tiny_qwen2()
    start = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    save_file(start, tmp_path / "base.safetensors")
    manager = _manager(sparse_quality_enabled=False)
    manager.set_base(tmp_path / "base.safetensors", model=model)
    base = manager.base_snapshot
    assert all(base.data[n].dtype == torch.float32 for n in start)
    assert all(torch.equal(base.data[n], start[n].float()) for n in start)
    for step in range(1, 5):
        _update(model, step)
        out = manager.on_optimizer_step(model)
    assert out["drift/norm_l2"] == pytest.approx(
        _norm(_weights(model), {n: t.float() for n, t in start.items()}), rel=1e-6)


def test_base_set_before_training_vs_taken_at_the_first_call():
    """Documented difference: without set_base the base holds the weights after the first
    optimizer step, so drift/* misses that step's update; with set_base(model) before training it
    holds the starting weights."""
    model = tiny_qwen2()
    before, auto = _manager(), _manager()
    before.set_base(model)
    weights = {0: _weights(model)}
    outs: dict[str, dict] = {}
    for step in range(1, 7):
        _update(model, step)
        weights[step] = _weights(model)
        outs["before"] = before.on_optimizer_step(model, inputs=_inputs()) or outs.get("before")
        outs["auto"] = auto.on_optimizer_step(model, inputs=_inputs()) or outs.get("auto")
        if step == 1:
            assert auto.base_snapshot is not None and before.base_snapshot is not None
    for n, w in weights[1].items():
        assert torch.equal(auto.base_snapshot.data[n], w)
        assert torch.equal(before.base_snapshot.data[n], weights[0][n])
    now = weights[6]
    assert outs["before"]["drift/norm_l2"] == pytest.approx(_norm(now, weights[0]), rel=1e-6)
    assert outs["auto"]["drift/norm_l2"] == pytest.approx(_norm(now, weights[1]), rel=1e-6)
    assert outs["before"]["drift/norm_l2"] != pytest.approx(outs["auto"]["drift/norm_l2"])
    assert outs["before"]["drift/kl_base_now"] != outs["auto"]["drift/kl_base_now"]
    # everything else is the same
    same = [k for k in outs["auto"] if not k.startswith("drift/")]
    assert same and all(outs["auto"][k] == outs["before"][k] for k in same)


def test_a_base_that_does_not_match_fails_at_set_base_with_one_clear_error(tmp_path):
    model = tiny_qwen2()
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    manager = _manager()
    missing = {n: t for n, t in state.items() if n != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"does not match .* missing: lm_head.weight"):
        manager.set_base(missing, model=model)
    wrong = {**state, "model.norm.weight": torch.ones(7)}
    with pytest.raises(ValueError, match=r"shapes differ: model.norm.weight \[7\] vs .*\[32\]"):
        manager.set_base(wrong, model=model)
    with pytest.raises(TypeError, match="set_base expects a model"):
        manager.set_base(42, model=model)
    with pytest.raises(CheckpointError, match="does not exist"):
        manager.set_base(tmp_path / "missing.safetensors", model=model)
    save_file({"x": torch.ones(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="missing: "):
        manager.set_base(tmp_path / "other.safetensors", model=model)
    assert manager.base_snapshot is None  # nothing was set
    # without model=, the interval snapshot is the layout once there is one
    for _ in range(2):
        manager.on_optimizer_step(model)
    with pytest.raises(ValueError, match=r"missing: lm_head\.weight"):
        manager.set_base(missing)


def test_a_pending_base_that_does_not_match_warns_once_and_training_goes_on(caplog):
    model = tiny_qwen2()
    manager = _manager(sparse_quality_enabled=False)
    manager.set_base({"model.norm.weight": torch.ones(7)})  # no layout known yet: accepted
    assert manager.base_snapshot is not None
    caplog.set_level(logging.WARNING)
    outs = []
    for step in range(1, 5):
        _update(model, step)
        outs.append(manager.on_optimizer_step(model))
        if step == 1:
            start = _weights(model)
    warnings = [r.getMessage() for r in caplog.records if "does not match" in r.getMessage()]
    assert len(warnings) == 1 and "measured from the weights at step 1" in warnings[0]
    assert outs[-1]["drift/norm_l2"] == pytest.approx(_norm(_weights(model), start), rel=1e-6)


def test_a_pending_base_whose_check_raises_is_re_taken_and_the_vote_still_runs(
    caplog, monkeypatch
):
    from grail.trainer.analysis import anchor

    model = tiny_qwen2()
    manager = _manager(sparse_quality_enabled=False)
    manager.set_base(_weights(model))  # pending: checked at the first call
    votes = []
    real_agree = anchor.agree
    monkeypatch.setattr(anchor, "agree", lambda values: votes.append(values) or real_agree(values))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory on this rank")

    monkeypatch.setattr(anchor, "_build", broken)
    monkeypatch.setattr(anchor.ParameterSnapshot, "spec", lambda self: {id(self): None})
    caplog.set_level(logging.WARNING)
    _update(model, 1)
    manager.on_optimizer_step(model)  # the vote is reached: no other rank is left waiting
    assert votes == [[True]]
    said = [r.getMessage() for r in caplog.records if "checking the base failed" in r.getMessage()]
    assert len(said) == 1 and "out of memory on this rank" in said[0]
    assert manager.base_snapshot is not None and manager._anchor.step == 1


def test_an_architecture_change_re_takes_the_base_with_a_warning(caplog):
    model = tiny_qwen2()
    manager = _manager(sparse_quality_enabled=False)
    for step in range(1, 5):
        _update(model, step)
        assert bool(manager.on_optimizer_step(model)) == (step == 4)
    model.lm_head = torch.nn.Linear(32, 64, bias=False)  # a new head
    caplog.set_level(logging.WARNING)
    _update(model, 5)
    assert manager.on_optimizer_step(model) == {}
    assert manager.on_optimizer_step(model) == {}  # step 6 re-baselines the interval snapshot
    assert any("since the base was taken" in r.getMessage() for r in caplog.records)
    start = _weights(model)
    _update(model, 7)
    manager.on_optimizer_step(model)
    _update(model, 8)
    out = manager.on_optimizer_step(model)
    assert out["drift/norm_l2"] == pytest.approx(_norm(_weights(model), start), rel=1e-6)


def test_state_dict_carries_the_base_and_a_restored_run_continues_exactly():
    model = tiny_qwen2()
    first = _manager()
    first.set_base(model)
    for step in range(1, 5):
        _update(model, step)
        first.on_optimizer_step(model, inputs=_inputs())
    assert "base" not in first.state_dict()
    state = first.state_dict(include_snapshot=True)
    assert set(state["base"]) == {n for n, _ in model.named_parameters()}
    second = _manager()
    second.load_state_dict(state)
    for step in range(5, 7):
        _update(model, step)
        want = first.on_optimizer_step(model, inputs=_inputs())
        got = second.on_optimizer_step(model, inputs=_inputs())
    # the carried ||W_prev - W_base||^2 travels with the state: every value is the same bits
    assert math.isfinite(want["drift/cos_interval"]) and got == want


def test_a_carried_norm_is_used_only_with_the_base_it_was_saved_with():
    model = tiny_qwen2()
    first = _manager()
    first.set_base(model)
    weights = {}
    for step in range(1, 5):
        _update(model, step)
        first.on_optimizer_step(model)
        weights[step] = _weights(model)
    state = first.state_dict(include_snapshot=True)
    drift = next(v for k, v in state["computers"].items() if k.endswith(":drift"))
    assert drift["last_norm"][:2] == [4, state["base_uid"]]
    resumed = _manager()
    resumed.load_state_dict(state)
    resumed.set_base(weights[2], model=model)  # another base: the carried norm is not its own
    for step in (5, 6):
        _update(model, step)
        got = resumed.on_optimizer_step(model)
    now, prev, base = _weights(model), weights[4], weights[2]
    dot = sum(((now[n].double() - prev[n].double()) * (prev[n].double() - base[n].double())).sum()
              for n in now)
    want = float(dot) / (_norm(now, prev) * _norm(prev, base))
    assert got["drift/cos_interval"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="last_norm"):
        next(c for c in resumed.computers if c.name == "drift").load_state_dict(
            {"last_norm": [1, 2]})


def test_reset_keeps_a_base_given_with_set_base_and_forgets_a_taken_one():
    model = tiny_qwen2()
    given, taken = _manager(), _manager()
    given.set_base(model)
    start = _weights(model)
    _update(model, 1)
    given.on_optimizer_step(model)
    taken.on_optimizer_step(model)
    given.reset()
    taken.reset()
    assert taken.base_snapshot is None
    assert all(torch.equal(given.base_snapshot.data[n], start[n]) for n in start)


def test_no_base_is_held_unless_a_computer_reads_it():
    model = tiny_qwen2()
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=2))
    for step in range(1, 5):
        _update(model, step)
        out = manager.on_optimizer_step(model, inputs=_inputs())
    assert manager.base_snapshot is None and out and not any(k.startswith("drift") for k in out)
    assert AnalysisConfig.comprehensive().drift_enabled
    with pytest.raises(ValueError, match="drift_keep_ratios"):
        AnalysisConfig(drift_keep_ratios=[0.0])


def test_hf_callback_takes_the_base_before_the_first_step(tmp_path):
    from transformers import Trainer

    from grail.trainer.analysis.integrations import ModelAnalysisCallback

    from ..integrations._hf import lm_dataset, training_args

    model = tiny_qwen2()
    start = _weights(model)
    analyzer = _manager(sparse_quality_enabled=False)
    callback = ModelAnalysisCallback(analyzer)
    trainer = Trainer(model=model, args=training_args(str(tmp_path), max_steps=4),
                      train_dataset=lm_dataset(), callbacks=[callback])
    trainer.train()
    for n, w in start.items():
        assert torch.equal(analyzer.base_snapshot.data[n], w), n
    logged = [h for h in trainer.state.log_history if "analysis/drift/norm_l2" in h]
    assert [h["step"] for h in logged] == [4]
    assert logged[0]["analysis/drift/norm_l2"] == pytest.approx(
        _norm(_weights(model), start), rel=1e-6)
    assert math.isfinite(logged[0]["analysis/drift/cos_interval"])


def test_a_base_that_cannot_be_taken_is_reported_once_and_not_retried_every_step(
    monkeypatch, caplog
):
    from grail.trainer.analysis import anchor

    model = tiny_qwen2()
    manager = _manager(sparse_quality_enabled=False)
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of host memory")

    monkeypatch.setattr(anchor.BaseAnchor, "take", fail)
    caplog.set_level(logging.WARNING)
    outs = []
    for step in range(1, 7):
        _update(model, step)
        outs.append(manager.on_optimizer_step(model))
    assert len(calls) == 1 and manager.base_snapshot is None
    assert sum("out of host memory" in r.getMessage() for r in caplog.records) == 1
    assert outs[3] and "param_change/norm_l2" in outs[3]  # the other families go on
    assert not any(k.startswith("drift/") for k in outs[3])
    monkeypatch.undo()
    manager.reset()  # tries again
    manager.on_optimizer_step(model)
    assert manager.base_snapshot is not None
