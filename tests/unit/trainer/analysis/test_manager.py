"""ModelAnalysisManager: schedule, fail-safety, re-baselining, state and invariants."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import BatchEncoding

from grail.trainer.analysis import (
    AnalysisConfig,
    MetricComputer,
    MetricResult,
    ModelAnalysisManager,
    measurement_steps,
)
from tests.conftest import tiny_qwen2

from .reference import assert_same_state, state


class Count(MetricComputer):
    """Written the minimal way the design promises to support."""

    name = "count"

    def compute(self, delta, **kwargs):
        return {"count/tensors": len(delta)}


class Boom(MetricComputer):
    name = "boom"

    def __init__(self, exc=RuntimeError):
        self.exc = exc
        self.calls = 0

    def compute(self, delta=None, **kwargs):
        self.calls += 1
        raise self.exc("kaboom")


def _train_steps(model, manager, steps, inputs=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen = []
    for step in range(1, steps + 1):
        ids = torch.randint(0, 128, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if manager.on_optimizer_step(model, inputs=inputs if inputs is not None else ids):
            seen.append(step)
    return seen


@pytest.mark.parametrize("interval,steps", [(1, 6), (5, 22), (100, 300)])
def test_metrics_appear_exactly_at_multiples_after_the_first(interval, steps):
    model = tiny_qwen2()
    manager = ModelAnalysisManager(AnalysisConfig(interval=interval)).add_metric(Count())
    if interval == 100:  # cheap: no training needed to exercise the schedule
        seen = [s for s in range(1, steps + 1) if manager.on_optimizer_step(model)]
    else:
        seen = _train_steps(model, manager, steps)
    assert seen == measurement_steps(interval, steps)
    assert manager.step_count == steps


def test_non_measurement_steps_do_not_touch_parameters():
    class Exploding(torch.nn.Module):
        def parameters(self, *a, **k):
            raise AssertionError("parameters accessed on a non-measurement step")

        named_parameters = parameters

    manager = ModelAnalysisManager.create(AnalysisConfig(interval=10))
    for _ in range(9):
        assert manager.on_optimizer_step(Exploding()) == {}


def test_custom_metric_minimal_signature_and_chaining():
    model = tiny_qwen2()
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=1, sparse_quality_enabled=False))
    assert manager.add_metric(Count()) is manager
    assert len(manager) == 2
    manager.on_optimizer_step(model)
    m = manager.on_optimizer_step(model)
    assert m["count/tensors"] == float(len(list(model.parameters())))
    assert "param_change/norm_l2" in m


def test_failing_computer_is_logged_once_per_error_type_and_skipped(caplog):
    model = tiny_qwen2()
    boom = Boom()
    manager = ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(boom).add_metric(Count())
    caplog.set_level(logging.WARNING, logger="grail.trainer.analysis.manager")
    for _ in range(4):
        m = manager.on_optimizer_step(model)
    assert m == {"count/tensors": float(len(list(model.parameters())))}
    assert boom.calls == 3
    warnings = [r for r in caplog.records if "boom" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError" in warnings[0].getMessage()
    boom.exc = ValueError
    manager.on_optimizer_step(model)
    assert len([r for r in caplog.records if "boom" in r.getMessage()]) == 2


def test_architecture_change_rebaselines_with_one_warning(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    manager = ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(Count())
    manager.on_optimizer_step(model)
    assert manager.on_optimizer_step(model) == {"count/tensors": 2.0}
    model.append(torch.nn.Linear(4, 2))
    caplog.set_level(logging.WARNING)
    assert manager.on_optimizer_step(model) == {}
    assert any("1.weight" in r.getMessage() and "added" in r.getMessage() for r in caplog.records)
    assert manager.on_optimizer_step(model) == {"count/tensors": 4.0}
    model[0] = torch.nn.Linear(4, 3)  # reshaped
    model[1] = torch.nn.Linear(3, 2)
    assert manager.on_optimizer_step(model) == {}
    assert manager.on_optimizer_step(model) == {"count/tensors": 4.0}


@pytest.mark.parametrize(
    "inputs",
    [
        None,
        torch.randint(0, 128, (2, 8)),
        {"input_ids": torch.randint(0, 128, (2, 8)), "labels": torch.zeros(2, 8)},
        BatchEncoding({"input_ids": torch.randint(0, 128, (2, 8))}),
        (torch.randint(0, 128, (2, 8)),),
        "not a batch",
        {"nothing": 1},
        [],
        42,
    ],
)
def test_any_inputs_never_raise(inputs):
    model = tiny_qwen2()
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=1))
    manager.on_optimizer_step(model, inputs=inputs)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    m = manager.on_optimizer_step(model, inputs=inputs)
    assert "param_change/norm_l2" in m


def test_invariants_of_a_full_measurement():
    model = tiny_qwen2(attention_dropout=0.5)
    model.train()
    model.model.layers[0].eval()  # mixed modes must come back exactly
    manager = ModelAnalysisManager.create(
        AnalysisConfig.comprehensive(
            interval=1,
            low_rank_enabled=False,
            gradient_enabled=False,
            adam_sign_enabled=False,
            param_change_track_mask_overlap=False,
        )
    )
    ids = torch.randint(0, 128, (2, 8))
    manager.on_optimizer_step(model, inputs=ids)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    model(input_ids=ids, labels=ids).loss.backward()  # grads present during analysis
    before = state(model)
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    m = manager.on_optimizer_step(
        model, inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    )
    assert "sparse/kl_at_1e-06" in m and "sparse/kl_at_keep_0.01_dare" in m
    assert_same_state(before, state(model))
    assert [mod.training for mod in model.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())


def test_trainable_only_skips_frozen_parameters():
    model = tiny_qwen2()
    for n, p in model.named_parameters():
        p.requires_grad_("q_proj" in n)
    manager = ModelAnalysisManager(AnalysisConfig(interval=1, trainable_only=True)).add_metric(
        Count()
    )
    manager.on_optimizer_step(model)
    assert manager.on_optimizer_step(model) == {"count/tensors": 4.0}  # q_proj weight+bias x2
    assert set(manager.old_snapshot.data) == {
        n for n, p in model.named_parameters() if "q_proj" in n
    }


def test_snapshot_buffers_are_reused_between_measurements():
    model = tiny_qwen2()
    manager = ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(Count())
    manager.on_optimizer_step(model)
    ptrs = {n: t.data_ptr() for n, t in manager.old_snapshot.data.items()}
    snap = manager.old_snapshot
    for _ in range(3):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        manager.on_optimizer_step(model)
    assert manager.old_snapshot is snap
    assert {n: t.data_ptr() for n, t in snap.data.items()} == ptrs
    first_name, first = next(iter(model.named_parameters()))
    assert torch.equal(snap.data[first_name], first.detach())


def test_step_override_reset_state_dict_and_repr():
    model = tiny_qwen2()
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=3, sparse_quality_enabled=False))
    assert manager.on_optimizer_step(model, step=3) == {}  # first snapshot at a given step
    assert manager.step_count == 3
    assert manager.on_optimizer_step(model, step=6)
    sd = manager.state_dict()
    assert sd["step_count"] == 6 and "snapshot" not in sd
    other = ModelAnalysisManager.create(AnalysisConfig(interval=3, sparse_quality_enabled=False))
    other.load_state_dict(sd)
    assert other.step_count == 6 and other.old_snapshot is None
    other.load_state_dict(manager.state_dict(include_snapshot=True))
    other.step_count = 8
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    m = other.on_optimizer_step(model)  # step 9: compares with the restored snapshot
    assert m["param_change/norm_max"] == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="config"):
        ModelAnalysisManager(AnalysisConfig(interval=4)).load_state_dict(sd)
    assert "interval=3" in repr(manager) and "param_change" in repr(manager)
    manager.reset()
    assert manager.step_count == 0 and manager.old_snapshot is None


def test_construction_errors_say_what_to_do():
    with pytest.raises(TypeError, match="AnalysisConfig"):
        ModelAnalysisManager({"interval": 5})
    with pytest.raises(TypeError, match="MetricComputer"):
        ModelAnalysisManager().add_metric(lambda delta: {})
    with pytest.raises(ValueError, match="interval"):
        AnalysisConfig(interval=-1)


def test_failures_inside_the_manager_never_reach_training(caplog, monkeypatch):
    model = tiny_qwen2()
    manager = ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(Count())

    def broken(*a, **k):
        raise MemoryError("no room for a snapshot")

    monkeypatch.setattr(manager, "_new_snapshot", broken)
    caplog.set_level(logging.WARNING)
    assert manager.on_optimizer_step(model) == {}
    assert any("MemoryError" in r.getMessage() for r in caplog.records)


class NeedsOptimizer(MetricComputer):
    name = "opt"

    def requires_optimizer(self):
        return True

    def compute(self, delta, context=None, **kwargs):
        return {"opt/groups": float(len(context.optimizer.param_groups))}


def test_computers_needing_an_optimizer_are_skipped_without_one(caplog):
    model = torch.nn.Linear(2, 2)
    manager = ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(NeedsOptimizer())
    caplog.set_level(logging.INFO)
    manager.on_optimizer_step(model)
    assert manager.on_optimizer_step(model) == {}
    assert manager.on_optimizer_step(model) == {}
    assert sum("no optimizer" in r.getMessage() for r in caplog.records) == 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert manager.on_optimizer_step(model, optimizer=opt) == {"opt/groups": 1.0}


def test_a_failed_snapshot_refill_drops_the_baseline(monkeypatch):
    model = torch.nn.Linear(2, 2)
    manager = ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(Count())
    manager.on_optimizer_step(model)

    def broken(self, model):
        next(iter(self.data.values())).add_(1.0)  # half refilled, then fails
        raise RuntimeError("copy failed")

    monkeypatch.setattr(type(manager.old_snapshot), "capture_", broken)
    assert manager.on_optimizer_step(model) == {}  # metrics lost, training unharmed
    assert manager.old_snapshot is None  # no half-refilled baseline survives


def test_a_snapshot_device_missing_here_fails_at_construction(monkeypatch):
    """Not ``{}`` forever after a warning about 'manager': construction says which field to
    change. The config alone stays valid (it may be written on another machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = AnalysisConfig(snapshot_device="cuda")  # a value: no availability check
    for build in (ModelAnalysisManager, ModelAnalysisManager.create):
        with pytest.raises(ValueError, match=r"AnalysisConfig\.snapshot_device.*'cpu'"):
            build(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ModelAnalysisManager(AnalysisConfig(snapshot_device="cuda:1"))
    with pytest.raises(ValueError, match=r"2 cuda device\(s\)"):
        ModelAnalysisManager(AnalysisConfig(snapshot_device="cuda:2"))
    ModelAnalysisManager(AnalysisConfig(snapshot_device="cpu"))


class Impostor(MetricComputer):
    name = "impostor"

    def compute(self, delta, **kwargs):
        return {"param_change/norm_l2": -1.0, "impostor/own": 2.0}


def test_a_computer_cannot_overwrite_another_computers_key(caplog):
    model = torch.nn.Linear(4, 4)
    manager = ModelAnalysisManager.create(
        AnalysisConfig(interval=1, sparse_quality_enabled=False)
    ).add_metric(Impostor())
    caplog.set_level(logging.WARNING, logger="grail.trainer.analysis.manager")
    manager.on_optimizer_step(model)
    for _ in range(2):
        with torch.no_grad():
            model.weight.add_(1.0)
        m = manager.on_optimizer_step(model)
        assert m["param_change/norm_l2"] == pytest.approx(4.0)  # the first value stands
        assert m["impostor/own"] == 2.0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "'param_change'" in warnings[0] and "'impostor'" in warnings[0]


def test_a_failing_computer_without_a_name_is_logged_with_its_class_name(caplog):
    class ExplodingMetric(MetricComputer):
        def compute(self, delta, **kwargs):
            raise RuntimeError("kaboom")

    model = torch.nn.Linear(2, 2)
    manager = ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(ExplodingMetric())
    caplog.set_level(logging.WARNING, logger="grail.trainer.analysis.manager")
    manager.on_optimizer_step(model)
    manager.on_optimizer_step(model)
    assert "analysis computer 'ExplodingMetric' failed" in caplog.records[0].getMessage()
    assert "ExplodingMetric" in repr(manager)
    assert Count.name == "count"  # explicit names are kept


def test_a_step_going_back_rebaselines_with_one_warning(caplog):
    """A resumed run passes an earlier step: comparing with the snapshot from the later step
    would mix two runs, so the next measurement step takes a fresh snapshot."""
    model = torch.nn.Linear(2, 2)
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=2, sparse_quality_enabled=False))
    manager.on_optimizer_step(model, step=2)  # first snapshot
    with torch.no_grad():
        model.weight.add_(1.0)
    assert manager.on_optimizer_step(model, step=4)["param_change/norm_max"] == 1.0
    caplog.set_level(logging.WARNING, logger="grail.trainer.analysis.manager")
    for _ in range(2):  # resumed twice from step 1: one warning
        with torch.no_grad():
            model.weight.add_(10.0)
        assert manager.on_optimizer_step(model, step=1) == {}
        assert manager.old_snapshot is None and manager.step_count == 1
        assert manager.on_optimizer_step(model, step=2) == {}  # fresh snapshot, no metrics
        with torch.no_grad():
            model.weight.add_(0.5)
        assert manager.on_optimizer_step(model, step=4)["param_change/norm_max"] == 0.5
    assert sum("went back" in r.getMessage() for r in caplog.records) == 1


def test_non_integer_steps_are_ignored_with_one_warning(caplog):
    manager = ModelAnalysisManager(AnalysisConfig(interval=100)).add_metric(Count())
    model = torch.nn.Linear(2, 2)
    caplog.set_level(logging.WARNING, logger="grail.trainer.analysis.manager")
    manager.on_optimizer_step(model, step=10)
    for bad in (10.7, "10", True, np.float64(12.0), torch.tensor(12.5)):
        before = manager.step_count
        manager.on_optimizer_step(model, step=bad)
        assert manager.step_count == before + 1, bad  # counted as the next step
    assert sum("not an integer" in r.getMessage() for r in caplog.records) == 1
    for good, want in ((np.int64(40), 40), (torch.tensor(50), 50), (np.int32(60), 60)):
        manager.on_optimizer_step(model, step=good)
        assert manager.step_count == want and type(manager.step_count) is int


def test_one_process_does_no_agreement_work(monkeypatch):
    """Without a process group the votes are the local values: no hashes, checksums or
    exchanges are computed, and no replica key is reported."""
    import grail.trainer.analysis.manager as manager_module
    import grail.trainer.analysis.manager_votes as votes

    def forbidden(*args, **kwargs):
        raise AssertionError("agreement work in a single process")

    for name in ("stable_hash", "bit_checksums", "all_gather_objects", "from_rank0"):
        monkeypatch.setattr(votes, name, forbidden)
    for name in ("layout_hash", "spec_hash", "vote_step"):
        monkeypatch.setattr(manager_module, name, forbidden)
    model = tiny_qwen2()
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=1)).add_metric(Count())
    ids = torch.randint(0, 128, (2, 8))
    manager.on_optimizer_step(model, inputs=ids, step=1)
    m = manager.on_optimizer_step(model, inputs=ids, step=2)
    assert "sparse/kl_at_1e-06" in m and "count/tensors" in m
    assert "param_change/replicas_diverged" not in m


class Sampled(MetricComputer):
    """Returns its keys with a histogram, as the gradient and Adam families do."""

    name = "sampled"

    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at

    def compute(self, delta=None, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("sampling failed")
        values = np.arange(self.calls, self.calls + 3, dtype=np.float32)
        return MetricResult({"sampled/calls": self.calls}, {"sampled/values": values})


def test_histograms_are_part_of_the_result_and_collected_by_the_manager():
    """A computer returns a MetricResult (keys + histograms) or a plain dict; the manager
    returns the keys (as floats) and keeps the histograms of the same measurement in
    last_histograms; a computer that raises contributes neither."""
    model = tiny_qwen2()
    sampled = Sampled(fail_at=3)
    manager = ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(sampled)
    manager.add_metric(Count())
    assert manager.on_optimizer_step(model) == {} and manager.last_histograms == {}
    m = manager.on_optimizer_step(model)
    assert m == {"sampled/calls": 1.0, "count/tensors": float(len(list(model.parameters())))}
    assert all(type(v) is float for v in m.values())
    assert list(manager.last_histograms) == ["sampled/values"]
    np.testing.assert_array_equal(manager.last_histograms["sampled/values"], [1.0, 2.0, 3.0])
    m = manager.on_optimizer_step(model)
    assert m["sampled/calls"] == 2.0
    np.testing.assert_array_equal(manager.last_histograms["sampled/values"], [2.0, 3.0, 4.0])
    m = manager.on_optimizer_step(model)  # the third call raises: no keys, no histograms
    assert "sampled/calls" not in m and "count/tensors" in m
    assert manager.last_histograms == {}
    manager.reset()
    assert manager.last_histograms == {}


def test_the_log_once_helper_speaks_once_per_key_and_repeats_at_debug(caplog):
    """The manager's warnings (here: a step that is not an integer) are said once at WARNING;
    repeats go to DEBUG only."""
    model = torch.nn.Linear(2, 2)
    manager = ModelAnalysisManager(AnalysisConfig(interval=10))
    with caplog.at_level(logging.DEBUG, logger="grail.trainer.analysis.manager"):
        for _ in range(3):
            manager.on_optimizer_step(model, step="7")
    levels = [r.levelno for r in caplog.records if "not an integer" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_a_config_field_set_after_construction_is_checked_when_the_manager_is_built():
    config = AnalysisConfig()
    config.interval = 0
    with pytest.raises(ValueError, match="interval=0 is invalid"):
        ModelAnalysisManager.create(config)
    config.interval = 2
    config.sparse_quality_keep_ratios = [1.5]
    with pytest.raises(ValueError, match="sparse_quality_keep_ratios"):
        ModelAnalysisManager(config)


def test_a_manager_without_computers_says_so_once_instead_of_returning_nothing_silently(caplog):
    config = AnalysisConfig(interval=1, param_change_enabled=False, sparse_quality_enabled=False)
    manager = ModelAnalysisManager.create(config)
    assert len(manager) == 0
    caplog.set_level(logging.WARNING, logger="grail.trainer.analysis.manager")
    _train_steps(tiny_qwen2(vocab=128), manager, 3)
    said = [r for r in caplog.records if "no metric computer is registered" in r.getMessage()]
    assert len(said) == 1 and "add_metric()" in said[0].getMessage()
    manager.add_metric(Count())  # a custom computer alone is a valid setup: no warning
    caplog.clear()
    assert _train_steps(tiny_qwen2(vocab=128), ModelAnalysisManager(config).add_metric(Count()),
                        3) == [2, 3]
    assert not [r for r in caplog.records if "no metric computer" in r.getMessage()]


def test_a_compiled_model_is_analysed_as_the_module_it_wraps(tmp_path):
    """``torch.compile(model)``: names without the wrapper's ``_orig_mod.`` prefix (a
    checkpoint of the plain model is a valid base), the same numbers as the plain model, and
    the analysis forwards run the wrapped module eagerly (nothing is compiled)."""
    import torch._dynamo

    plain, twin = tiny_qwen2(vocab=128), tiny_qwen2(vocab=128)
    twin.load_state_dict(plain.state_dict())
    plain.save_pretrained(tmp_path / "base")
    compiled = torch.compile(twin)
    # eager kernels: a graph compiled below could only be the model's
    config = AnalysisConfig(interval=1, drift_enabled=True, sparse_quality_keep_ratios=[0.1],
                            fused_kernels=False)
    got, want = ModelAnalysisManager.create(config), ModelAnalysisManager.create(config)
    got.set_base(str(tmp_path / "base"), model=compiled)
    want.set_base(str(tmp_path / "base"), model=plain)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # other tests' too
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2) for m in (plain, twin)]
    for step in range(3):
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(step))
        for model, opt in zip((plain, twin), opts):  # trained eagerly: only the analysis differs
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        a = got.on_optimizer_step(compiled, inputs=ids)
        b = want.on_optimizer_step(plain, inputs=ids)
        assert a.keys() == b.keys()
        np.testing.assert_equal([a[k] for k in sorted(a)], [b[k] for k in sorted(b)])
    assert "drift/kl_now_base" in a and a["drift/kl_now_base"] > 0
    assert not any(n.startswith("_orig_mod") for n in got.old_snapshot.data)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_nothing_to_analyse_says_why_once(caplog):
    """trainable_only=True on a fully frozen model (e.g. after a PEFT merge_and_unload)."""
    model = tiny_qwen2(vocab=128)
    for p in model.parameters():
        p.requires_grad_(False)
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=1, trainable_only=True))
    caplog.set_level(logging.WARNING, logger="grail.trainer.analysis.manager")
    ids = torch.randint(0, 128, (2, 8))
    assert [manager.on_optimizer_step(model, inputs=ids) for _ in range(3)] == [{}, {}, {}]
    said = [r.getMessage() for r in caplog.records if "no parameter is analysed" in r.getMessage()]
    assert len(said) == 1 and "trainable_only=False" in said[0]


def test_a_plain_base_for_a_peft_style_model_says_how_to_set_it():
    class Peft(torch.nn.Module):  # the names a PEFT wrapper gives: base_model.model.<name>
        def __init__(self, inner):
            super().__init__()
            self.base_model = torch.nn.Module()
            self.base_model.model = inner

    plain = tiny_qwen2(vocab=128)
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=1, drift_enabled=True))
    with pytest.raises(ValueError, match="PEFT model itself"):
        manager.set_base(plain.state_dict(), model=Peft(tiny_qwen2(vocab=128)))
    with pytest.raises(ValueError) as plain_error:  # a plain mismatch gets no PEFT hint
        manager.set_base({"x": torch.zeros(2)}, model=plain)
    assert "PEFT" not in str(plain_error.value)


def test_a_computer_carrying_state_without_reset_is_refused_at_add_metric():
    class Remembers(MetricComputer):
        name = "remembers"

        def __init__(self) -> None:
            self.previous = None

        def compute(self, delta=None, **kwargs):
            return {}

        def state_dict(self):
            return {"previous": self.previous} if self.previous is not None else {}

        def load_state_dict(self, state):
            self.previous = state.get("previous")

    manager = ModelAnalysisManager(AnalysisConfig(interval=1))
    with pytest.raises(TypeError, match=r"does not override reset\(\).*implement reset\(\)"):
        manager.add_metric(Remembers())

    class Forgets(Remembers):
        def reset(self) -> None:
            self.previous = None

    assert manager.add_metric(Forgets()) is manager


def test_mistakes_in_a_custom_compute_say_what_to_change(caplog):
    class NoKeywords(MetricComputer):
        name = "no_keywords"

        def compute(self, delta):
            return {}

    with pytest.raises(TypeError, match=r"NoKeywords.compute must accept .*add \*\*kwargs"):
        ModelAnalysisManager(AnalysisConfig(interval=1)).add_metric(NoKeywords())

    class Returns(MetricComputer):
        def __init__(self, name, value):
            self.name, self.value = name, value

        def compute(self, delta=None, **kwargs):
            return self.value

    model = torch.nn.Linear(3, 3)
    manager = ModelAnalysisManager(AnalysisConfig(interval=1, sparse_quality_enabled=False))
    for computer in (Returns("a_float", 0.5), Returns("a_word", {"custom/x": "abc"}),
                     Returns("an_int_key", {7: 1.0}), Returns("fine", {"custom/ok": 1})):
        manager.add_metric(computer)
    caplog.set_level(logging.WARNING)
    manager.on_optimizer_step(model)
    out = manager.on_optimizer_step(model)
    assert out["custom/ok"] == 1.0 and "custom/x" not in out
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "a_float.compute returned a float; return a dict" in said
    assert "a_word returned 'custom/x' = 'abc', not a number" in said
    assert "an_int_key returned the key 7; keys are 'family/name' strings" in said



def test_custom_keys_outside_the_grammar_are_logged_with_one_warning(caplog):
    class Loose(MetricComputer):
        name = "loose"

        def compute(self, delta=None, **kwargs):
            return {"largest": 1.0, "custom//empty": 2.0, "custom/fine": 3.0}

    model = torch.nn.Linear(3, 3)
    manager = ModelAnalysisManager(AnalysisConfig(interval=1, sparse_quality_enabled=False))
    manager.add_metric(Loose())
    caplog.set_level(logging.WARNING)
    manager.on_optimizer_step(model)
    for _ in range(2):
        out = manager.on_optimizer_step(model)
    assert out["largest"] == 1.0 and out["custom/fine"] == 3.0  # logged as they are
    said = [r.getMessage() for r in caplog.records if "outside the key grammar" in r.getMessage()]
    assert len(said) == 1 and "'largest', 'custom//empty'" in said[0]
    assert not [r for r in caplog.records if "param_change" in r.getMessage()]  # built-ins pass
