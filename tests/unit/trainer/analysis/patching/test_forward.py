"""prepare_inputs / logits_from_output / run_forward: normalising batches and model outputs."""

from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from grail.trainer.analysis.patching.forward import (
    PreparedInputs,
    logits_from_output,
    prepare_inputs,
    run_forward,
)
from tests.conftest import tiny_qwen2

VOCAB = 64


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2(vocab=VOCAB).eval()


def _batch(
    batch: int = 4, seq: int = 10, seed: int = 0, pad: bool = True
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for row in range(batch):
            mask[row, seq - row :] = 0  # right padding, a different amount per row
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.clone(),
        "completion_mask": mask.clone(),
        "advantages": torch.randn(batch, generator=g),
    }


# --- mappings -------------------------------------------------------------------------------


def test_dict_is_filtered_by_the_forward_signature(qwen):
    batch = _batch()
    prepared = prepare_inputs(qwen, batch, max_tokens=10_000)
    assert isinstance(prepared, PreparedInputs)
    assert prepared.args == ()
    assert set(prepared.kwargs) == {"input_ids", "attention_mask", "use_cache"}
    assert prepared.kwargs["use_cache"] is False
    assert torch.equal(prepared.kwargs["input_ids"], batch["input_ids"])
    assert prepared.mask.dtype == torch.bool
    assert torch.equal(prepared.mask, batch["attention_mask"].bool())
    assert prepared.tokens == int(batch["attention_mask"].sum())
    # the caller's batch is left alone
    assert set(batch) == {"input_ids", "attention_mask", "labels", "completion_mask", "advantages"}


def test_batch_encoding(qwen):
    from transformers import BatchEncoding

    raw = _batch()
    enc = BatchEncoding({k: raw[k] for k in ("input_ids", "attention_mask", "labels")})
    prepared = prepare_inputs(qwen, enc, max_tokens=10_000)
    assert isinstance(prepared, PreparedInputs)
    assert set(prepared.kwargs) == {"input_ids", "attention_mask", "use_cache"}
    assert prepared.tokens == int(raw["attention_mask"].sum())


def test_labels_dropped_even_when_forward_accepts_everything():
    class Any(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, **kwargs):
            return kwargs

    prepared = prepare_inputs(Any(), _batch(), max_tokens=1000)
    assert set(prepared.kwargs) == {"input_ids", "attention_mask", "completion_mask", "advantages"}


def test_input_ids_fed_to_a_module_taking_input():
    emb = nn.Embedding(VOCAB, 3)
    prepared = prepare_inputs(emb, {"input_ids": torch.ones(2, 5, dtype=torch.long)}, 100)
    assert set(prepared.kwargs) == {"input"}
    assert prepared.mask is None and prepared.tokens == 10


def test_custom_forward_keeps_only_named_arguments():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 4)

        def forward(self, input_ids, attention_mask=None, *, scale: float = 1.0):
            return self.emb(input_ids) * scale

    prepared = prepare_inputs(Custom(), {**_batch(), "scale": 2.0}, max_tokens=1000)
    assert set(prepared.kwargs) == {"input_ids", "attention_mask", "scale"}
    assert "use_cache" not in prepared.kwargs  # not accepted: not passed


def test_a_wrapper_taking_kwargs_receives_the_attention_mask(qwen):
    """A forward with named ids and ``**kwargs`` (a wrapper passing them on) gets the padding
    mask and position ids, not the trainer's other keys; its logits equal the bare model's."""

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    batch = _batch(pad=True)
    batch["position_ids"] = torch.arange(10).expand(4, 10)
    prepared = prepare_inputs(Wrap(qwen), batch, max_tokens=1000)
    assert set(prepared.kwargs) == {"input_ids", "attention_mask", "position_ids"}
    bare = prepare_inputs(qwen, batch, max_tokens=1000)
    with torch.no_grad():
        got = run_forward(Wrap(qwen).eval(), prepared)
        want = run_forward(qwen.eval(), bare)
    assert torch.equal(got, want)


# --- tensors, tuples, lists ------------------------------------------------------------------


def test_tensor_input(qwen):
    ids = _batch()["input_ids"]
    prepared = prepare_inputs(qwen, ids, max_tokens=10_000)
    assert len(prepared.args) == 1 and torch.equal(prepared.args[0], ids)
    assert prepared.kwargs == {}
    assert prepared.mask is None
    assert prepared.tokens == ids.numel()


@pytest.mark.parametrize("container", [tuple, list])
def test_positional_inputs(container):
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(8, 3)
    prepared = prepare_inputs(model, container([x]), max_tokens=5)
    assert isinstance(prepared.args, tuple) and len(prepared.args) == 1
    assert torch.equal(prepared.args[0], x[:5])  # float features: one position per row
    assert prepared.tokens == 5
    logits = run_forward(model, prepared)
    assert logits.shape == (5, 2)


def test_tuple_cuts_only_tensors_with_the_batch_dimension():
    ids = torch.ones(4, 10, dtype=torch.long)
    other = torch.zeros(3, 10)  # a different leading size: left alone
    prepared = prepare_inputs(nn.Embedding(2, 2), (ids, other, "tag"), max_tokens=20)
    a, b, c = prepared.args
    assert a.shape == (2, 10) and b.shape == (3, 10) and c == "tag"


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        (None, "no inputs"),
        ({}, "no tensor"),
        ({"labels": torch.ones(2, 3)}, "no tensor"),
        ({"input_ids": [1, 2, 3]}, "no tensor"),
        ((), "unsupported"),
        ([], "unsupported"),
        (("a", 1), "no tensor"),
        (torch.zeros(0, 5, dtype=torch.long), "empty"),
        (torch.tensor(3), "empty"),
        ({"input_ids": torch.zeros(0, 4, dtype=torch.long)}, "empty"),
        (5, "unsupported"),
        ("some text", "unsupported"),
        (np.ones((2, 3)), "unsupported"),
        ({1, 2}, "unsupported"),
        ({0: torch.ones(2, 3), "advantages": 1.0}, "no tensor"),
        ([[1, 2, 3]], "inputs list holds no tensor"),
    ],
)
def test_unusable_inputs_give_a_reason_instead_of_raising(qwen, inputs, fragment):
    reason = prepare_inputs(qwen, inputs, max_tokens=100)
    assert isinstance(reason, str)
    assert fragment in reason


# --- max_tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_tokens", "shape"),
    [
        (10_000, (4, 10)),
        (40, (4, 10)),
        (39, (3, 10)),
        (25, (2, 10)),
        (10, (1, 10)),
        (7, (1, 7)),
        (1, (1, 1)),
    ],
)
def test_max_tokens_cuts_rows_first_then_columns(qwen, max_tokens, shape):
    batch = _batch(pad=False)
    batch["position_ids"] = torch.arange(10).expand(4, 10)
    prepared = prepare_inputs(qwen, batch, max_tokens=max_tokens)
    rows, cols = shape
    assert prepared.kwargs["input_ids"].shape == shape
    assert torch.equal(prepared.kwargs["input_ids"], batch["input_ids"][:rows, :cols])
    assert torch.equal(prepared.kwargs["attention_mask"], batch["attention_mask"][:rows, :cols])
    assert torch.equal(prepared.kwargs["position_ids"], batch["position_ids"][:rows, :cols])
    assert prepared.mask.shape == shape
    assert prepared.tokens == rows * cols <= max_tokens


@pytest.mark.parametrize(
    ("pad", "max_tokens", "start", "tokens"),
    [
        (10, 8, 10, 6),  # left padding longer than the budget: the 6 real tokens
        (4, 8, 4, 8),  # from the first real token, 8 positions
        (0, 8, 0, 8),  # no padding: the first 8 positions, as before
    ],
)
def test_a_long_left_padded_row_is_read_from_its_first_real_token(pad, max_tokens, start,
                                                                   tokens):
    ids = torch.arange(16).reshape(1, 16) % VOCAB
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, :pad] = 0
    prepared = prepare_inputs(nn.Embedding(VOCAB, 2), {"input_ids": ids, "attention_mask": mask},
                              max_tokens)
    got = prepared.kwargs["input"]
    assert got.shape[1] <= max_tokens  # the forward stays within the budget
    assert torch.equal(got, ids[:, start : start + max_tokens])
    assert prepared.tokens == tokens == int(prepared.mask.sum())


def test_long_rows_skip_a_row_without_real_tokens():
    ids = torch.arange(32).reshape(2, 16) % VOCAB
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0] = 0  # all padding
    mask[1, :3] = 0
    batch = {"input_ids": ids, "attention_mask": mask,
             "position_ids": torch.arange(16).expand(2, 16)}
    prepared = prepare_inputs(tiny_qwen2(vocab=VOCAB), batch, max_tokens=8)
    assert torch.equal(prepared.kwargs["input_ids"], ids[1:2, 3:11])
    assert torch.equal(prepared.kwargs["position_ids"], batch["position_ids"][1:2, 3:11])
    assert prepared.tokens == 8


def test_a_kwargs_wrapper_whose_inner_module_refuses_the_mask_runs_without_it(caplog):
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Embedding(VOCAB, 3)

        def forward(self, input_ids, **kwargs):
            return self.inner(input_ids, **kwargs)

    model = Wrap()
    prepared = prepare_inputs(model, _batch(), max_tokens=1000)
    assert prepared.passed_on == ("attention_mask",)
    with torch.no_grad():
        got = run_forward(model, prepared)
        again = run_forward(model, prepared)  # the key stays out: no second failure
    want = model.inner(_batch()["input_ids"])[_batch()["attention_mask"].bool()]
    assert torch.equal(got, want) and torch.equal(again, want)
    refused = [r for r in caplog.records if "refused attention_mask" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelname == "WARNING"


def test_token_count_respects_the_attention_mask(qwen):
    batch = _batch(pad=True)  # row r has 10 - r real tokens
    prepared = prepare_inputs(qwen, batch, max_tokens=25)
    assert prepared.kwargs["input_ids"].shape == (2, 10)
    assert prepared.tokens == 10 + 9
    assert prepared.tokens == int(prepared.mask.sum())
    prepared = prepare_inputs(qwen, batch, max_tokens=6)
    assert prepared.tokens == 6  # row 0 has no padding in its first 6 positions


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 100))
def test_cut_never_exceeds_the_budget_and_keeps_whole_rows_when_possible(batch, seq, max_tokens):
    ids = torch.zeros(batch, seq, dtype=torch.long)
    prepared = prepare_inputs(nn.Embedding(2, 2), ids, max_tokens)
    rows, cols = prepared.args[0].shape
    assert prepared.tokens == rows * cols <= max_tokens
    if max_tokens >= seq:
        assert cols == seq and rows == min(batch, max_tokens // seq)
    else:
        assert (rows, cols) == (1, max_tokens)


def test_tensors_end_up_on_the_model_device(qwen):
    prepared = prepare_inputs(qwen, _batch(), max_tokens=100)
    device = next(qwen.parameters()).device
    assert all(v.device == device for v in prepared.kwargs.values() if torch.is_tensor(v))
    assert prepared.mask.device == device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_batch_is_moved_to_a_cuda_model():
    model = nn.Embedding(VOCAB, 4).cuda()
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    prepared = prepare_inputs(model, batch, max_tokens=100)
    assert prepared.kwargs["input"].is_cuda and prepared.mask.is_cuda
    assert run_forward(model, prepared).is_cuda


# --- outputs --------------------------------------------------------------------------------


def test_logits_from_output_variants():
    t = torch.randn(2, 3, 5)
    assert logits_from_output(t) is t
    assert logits_from_output(SimpleNamespace(logits=t, loss=None)) is t
    assert logits_from_output({"logits": t, "loss": 1.0}) is t
    assert logits_from_output(OrderedDict(logits=t)) is t
    assert logits_from_output((t, "cache")) is t
    assert logits_from_output([t]) is t
    other = torch.zeros(1)
    assert logits_from_output({"logits": t, "x": other}, output_fn=lambda o: o["x"]) is other


def test_logits_from_a_transformers_output(qwen):
    with torch.no_grad():
        out = qwen(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert logits_from_output(out) is out.logits
    assert logits_from_output(out.to_tuple()) is out.logits


@pytest.mark.parametrize(
    "output", [None, 3, "logits", {}, {"loss": torch.ones(1)}, (), SimpleNamespace(logits=None)]
)
def test_logits_not_found_is_a_type_error_naming_output_fn(output):
    with pytest.raises(TypeError) as info:
        logits_from_output(output)
    assert "output_fn" in str(info.value)


def test_output_fn_returning_a_non_tensor():
    with pytest.raises(TypeError, match="output_fn returned list"):
        logits_from_output(torch.ones(1), output_fn=lambda o: [o])


class _LossAndLogits(nn.Module):
    """A custom forward returning ``(scalar loss, logits)``, or only the loss."""

    def __init__(self, loss_only: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)
        self.loss_only = loss_only

    def forward(self, input_ids, attention_mask=None):
        logits = self.head(self.embed(input_ids))
        loss = logits.logsumexp(-1).mean()
        return loss if self.loss_only else (loss, logits)


def test_a_leading_scalar_loss_is_not_taken_for_the_logits():
    loss, logits = torch.tensor(0.5), torch.randn(2, 3, 5)
    assert logits_from_output((loss, logits)) is logits
    assert logits_from_output([loss, None, logits]) is logits
    assert logits_from_output({"loss": loss, "logits": logits}) is logits


@pytest.mark.parametrize(
    ("output", "described"),
    [
        ((torch.tensor(0.5),), "tuple (0-d tensor)"),
        (torch.tensor(0.5), "0-d tensor"),
        ({"logits": torch.tensor(0.5)}, "dict {'logits': 0-d tensor}"),
        ([torch.tensor(1.0), "cache"], "list (0-d tensor, str)"),
    ],
)
def test_no_logits_error_describes_the_output_and_shows_output_fn(output, described):
    with pytest.raises(TypeError) as info:
        logits_from_output(output)
    msg = str(info.value)
    assert f"model output {described};" in msg, msg
    assert "[batch, seq, classes]" in msg
    assert "ModelAnalysisManager.create(config, output_fn=lambda out: out[1])" in msg
    assert "\n" not in msg


def test_output_fn_returning_a_scalar_is_a_type_error():
    with pytest.raises(TypeError, match="output_fn returned a 0-d tensor"):
        logits_from_output((torch.tensor(1.0), torch.ones(2, 3)), output_fn=lambda o: o[0])


def test_run_forward_of_a_model_returning_loss_and_logits():
    model = _LossAndLogits().eval()
    batch = _batch(pad=True)
    prepared = prepare_inputs(model, batch, max_tokens=10_000)
    with torch.no_grad():
        logits = run_forward(model, prepared)
        full = model(batch["input_ids"])[1]
    mask = batch["attention_mask"].bool()
    assert torch.equal(logits, full[mask])
    with torch.no_grad():  # the same as picking them with output_fn
        assert torch.equal(run_forward(model, prepared, output_fn=lambda out: out[1]), logits)


def test_run_forward_of_a_model_returning_only_a_loss_says_what_to_do():
    model = _LossAndLogits(loss_only=True).eval()
    prepared = prepare_inputs(model, _batch(), max_tokens=10_000)
    expected = r"0-d tensor.*output_fn=lambda out: out\[1\]"
    with pytest.raises(TypeError, match=expected), torch.no_grad():
        run_forward(model, prepared)


def test_sparse_quality_runs_on_a_loss_and_logits_model():
    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

    model = _LossAndLogits()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = AnalysisConfig(interval=1, param_change_enabled=False, fused_kernels=False)
    analyzer = ModelAnalysisManager.create(cfg)
    batch = _batch()
    for _ in range(2):
        model(batch["input_ids"])[0].backward()
        opt.step()
        opt.zero_grad()
        metrics = analyzer.on_optimizer_step(model, inputs=batch)
    assert metrics["sparse/tokens"] == float(batch["attention_mask"].sum())
    assert math.isfinite(metrics["sparse/kl_at_1e-06"])


# --- run_forward ----------------------------------------------------------------------------


def test_run_forward_flattens_the_unmasked_positions(qwen):
    batch = _batch(pad=True)
    prepared = prepare_inputs(qwen, batch, max_tokens=10_000)
    with torch.no_grad():
        logits = run_forward(qwen, prepared)
        full = qwen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    assert logits.shape == (int(mask.sum()), VOCAB)
    assert logits.dtype == torch.float32
    expected = torch.cat([full[r][mask[r]] for r in range(full.shape[0])])  # row-major order
    assert torch.equal(logits, expected)


def test_run_forward_without_mask_keeps_every_position(qwen):
    ids = _batch()["input_ids"]
    with torch.no_grad():
        logits = run_forward(qwen, prepare_inputs(qwen, ids, max_tokens=10_000))
        full = qwen(input_ids=ids).logits
    assert torch.equal(logits, full.reshape(-1, VOCAB))


def test_run_forward_keeps_half_precision_logits_as_produced():
    model = tiny_qwen2(vocab=VOCAB, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = run_forward(model, prepare_inputs(model, _batch(), max_tokens=12))
        full = model(input_ids=_batch()["input_ids"][:1]).logits
    assert logits.dtype == torch.bfloat16 and logits.shape == (10, VOCAB)  # one whole row
    assert torch.equal(logits, full.reshape(-1, VOCAB))  # no float32 copy, nothing rounded


def test_run_forward_converts_other_dtypes_to_float32():
    model = torch.nn.Embedding(VOCAB, VOCAB, dtype=torch.float64)
    with torch.no_grad():
        logits = run_forward(model, prepare_inputs(model, torch.ones(2, 3, dtype=torch.long), 99))
    assert logits.dtype == torch.float32
    assert torch.equal(logits, model.weight[1].float().expand(6, VOCAB))


def test_run_forward_output_fn_and_mask_shape_mismatch(qwen):
    prepared = prepare_inputs(qwen, _batch(), max_tokens=10_000)
    with torch.no_grad():
        last = run_forward(qwen, prepared, output_fn=lambda o: o.logits[:, -1])
    assert last.shape == (4, VOCAB)  # the [batch, seq] mask does not apply to [batch, vocab]


def test_run_forward_one_dimensional_output():
    class Score(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1)

    model = Score()
    with torch.no_grad():
        out = run_forward(model, prepare_inputs(model, (torch.randn(6, 3),), max_tokens=100))
    assert out.shape == (6, 1)


def test_inputs_embeds_with_attention_mask_are_cut_to_the_budget(qwen):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(4, 10, 32, generator=g)
    batch = {"inputs_embeds": embeds, "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    prepared = prepare_inputs(qwen, batch, max_tokens=25)
    assert prepared.kwargs["inputs_embeds"].shape == (2, 10, 32)
    assert prepared.tokens == 20
    prepared = prepare_inputs(qwen, batch, max_tokens=7)
    assert torch.equal(prepared.kwargs["inputs_embeds"], embeds[:1, :7])
    assert prepared.kwargs["attention_mask"].shape == (1, 7)
    with torch.no_grad():
        assert run_forward(qwen, prepared).shape == (7, VOCAB)


def test_float_features_without_mask_are_never_cut_along_features():
    x = torch.randn(3, 10, 5)  # e.g. a batch of images or feature maps: only rows are cut
    prepared = prepare_inputs(nn.Identity(), (x,), max_tokens=2)
    assert prepared.args[0].shape == (2, 10, 5)


# --- how the attention mask is read ---------------------------------------------------------


class _IgnoresMask(nn.Module):
    """Logits from the ids alone: the mask only decides which positions are compared."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids))


def _additive(mask: torch.Tensor, fill: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask == 0, fill)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fill", [-math.inf, "min", -1e4])
def test_an_additive_mask_compares_the_tokens_not_the_padding(dtype, fill):
    fill = torch.finfo(dtype).min if fill == "min" else fill
    batch = _batch(pad=True)
    additive = dict(batch, attention_mask=_additive(batch["attention_mask"], fill, dtype))
    model = _IgnoresMask()
    want, got = prepare_inputs(model, batch, 1000), prepare_inputs(model, additive, 1000)
    assert torch.equal(got.mask, batch["attention_mask"].bool())
    assert got.tokens == want.tokens == int(batch["attention_mask"].sum())
    assert got.kwargs["attention_mask"] is not None  # the model still gets its own mask
    with torch.no_grad():
        assert torch.equal(run_forward(model, got), run_forward(model, want))


def test_an_additive_mask_windows_a_long_left_padded_row_from_its_first_token():
    ids = torch.arange(16).reshape(1, 16) % VOCAB
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, :5] = 0
    additive = _additive(mask, -math.inf, torch.float32)
    prepared = prepare_inputs(_IgnoresMask(), {"input_ids": ids, "attention_mask": additive}, 8)
    assert torch.equal(prepared.kwargs["input_ids"], ids[:, 5:13])
    assert torch.equal(prepared.kwargs["attention_mask"], additive[:, 5:13])
    assert prepared.tokens == 8 and bool(prepared.mask.all())


def test_a_float_0_1_mask_and_packed_sequence_indices_read_non_zero_as_tokens():
    batch = _batch(pad=True)
    as_float = dict(batch, attention_mask=batch["attention_mask"].float())
    packed = batch["attention_mask"] * torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1])
    as_packed = dict(batch, attention_mask=packed)
    for inputs in (as_float, as_packed):
        prepared = prepare_inputs(_IgnoresMask(), inputs, 1000)
        assert torch.equal(prepared.mask, batch["attention_mask"].bool())


def test_sparse_quality_with_an_additive_mask_equals_the_0_1_mask():
    from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

    batch = _batch(pad=True)
    runs = {}
    for label, mask in [("0/1", batch["attention_mask"]),
                        ("additive", _additive(batch["attention_mask"], -math.inf,
                                               torch.float32))]:
        model = _IgnoresMask()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        analyzer = ModelAnalysisManager.create(AnalysisConfig(
            interval=1, param_change_enabled=False, fused_kernels=False))
        for _ in range(2):
            model(batch["input_ids"]).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
            runs[label] = analyzer.on_optimizer_step(
                model, inputs=dict(batch, attention_mask=mask))
    assert runs["additive"] == runs["0/1"]
    assert runs["additive"]["sparse/tokens"] == float(batch["attention_mask"].sum())


class _ChecksMaskShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _IgnoresMask()

    def forward(self, input_ids, attention_mask=None):
        b, s = input_ids.shape
        assert attention_mask.shape[-2:] == (s, s), attention_mask.shape
        assert attention_mask.shape[0] in (b, 1), attention_mask.shape
        return self.inner(input_ids)


def _square(padding: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """A [batch, 1, seq, seq] causal mask hiding the padded keys (bool, or additive)."""
    s = padding.shape[1]
    keep = torch.ones(s, s, dtype=torch.bool).tril() & (padding != 0)[:, None, None, :]
    if dtype == torch.bool:
        return keep
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -math.inf)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_4d_mask_is_read_on_its_diagonal_and_cut_along_both_sequence_dimensions(dtype, caplog):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[0, :3] = 0  # row 0 left-padded
    padding[1, 10:] = 0  # row 1 right-padded
    square = _square(padding, dtype)
    model = _ChecksMaskShape()
    whole = prepare_inputs(model, {"input_ids": ids, "attention_mask": square}, 1000)
    assert torch.equal(whole.mask, padding.bool()) and whole.tokens == 19
    cut = prepare_inputs(model, {"input_ids": ids, "attention_mask": square}, 5)
    assert torch.equal(cut.kwargs["input_ids"], ids[:1, 3:8])  # from row 0's first token
    assert torch.equal(cut.kwargs["attention_mask"], square[:1, :, 3:8, 3:8])
    assert cut.tokens == 5
    with torch.no_grad():
        assert torch.equal(run_forward(model, whole),
                           model.inner(ids)[padding.bool()])
        assert torch.equal(run_forward(model, cut), model.inner(ids[:1, 3:8])[0])
    assert not [r for r in caplog.records if "attention_mask of shape" in r.getMessage()]


def test_a_mask_broadcast_over_the_batch_keeps_its_row_when_cut():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]  # [1, 1, 12, 12]
    model = _ChecksMaskShape()
    whole = prepare_inputs(model, {"input_ids": ids, "attention_mask": causal}, 1000)
    assert whole.mask.shape == (2, 12) and whole.tokens == 24
    cut = prepare_inputs(model, {"input_ids": ids, "attention_mask": causal}, 5)
    assert torch.equal(cut.kwargs["attention_mask"], causal[:, :, :5, :5])
    with torch.no_grad():
        assert run_forward(model, cut).shape == (5, VOCAB)


def test_a_mask_of_another_shape_compares_every_position_with_one_warning(caplog):
    class KeyPadding(_IgnoresMask):  # its own type: the warning is once per model type
        pass

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    keys = torch.ones(2, 1, 1, 12)  # [batch, 1, 1, key]: not a square mask
    for _ in range(2):
        prepared = prepare_inputs(KeyPadding(), {"input_ids": ids, "attention_mask": keys}, 1000)
        assert prepared.mask is None and prepared.tokens == 24
    warned = [r for r in caplog.records if "attention_mask of shape" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    assert "[2, 1, 1, 12]" in warned[0].getMessage()


def test_an_additive_mask_without_padding_compares_every_token():
    batch = _batch(pad=False)
    zeros = dict(batch, attention_mask=torch.zeros(4, 10))  # additive, nothing masked
    prepared = prepare_inputs(_IgnoresMask(), zeros, 1000)
    assert bool(prepared.mask.all()) and prepared.tokens == 40
    # one rank's batch alone reads as the whole batch does: the rule looks at one batch
    both = _additive(_batch(pad=True)["attention_mask"], -math.inf, torch.float32)
    both[1:] = 0
    rows = [prepare_inputs(_IgnoresMask(), dict(batch, attention_mask=both[r:r + 1],
                                                input_ids=batch["input_ids"][r:r + 1]), 1000)
            for r in range(4)]
    whole = prepare_inputs(_IgnoresMask(), dict(batch, attention_mask=both), 1000)
    assert torch.equal(torch.cat([r.mask for r in rows]), whole.mask)


@pytest.mark.parametrize("shape", [(6,), (1, 6)])
def test_one_dimensional_ids_take_a_mask_of_their_length(shape):
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _IgnoresMask()

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids)[None]  # [1, n, classes]

    ids = torch.arange(6) % VOCAB
    mask = torch.tensor([0, 1, 1, 1, 1, 0]).reshape(shape)
    prepared = prepare_inputs(Flat(), {"input_ids": ids, "attention_mask": mask}, 1000)
    assert prepared.tokens == 4
    with torch.no_grad():
        got = run_forward(Flat(), prepared)
    assert got.shape == (4, VOCAB)


def test_inputs_embeds_with_a_4d_mask_stay_within_the_budget(qwen):
    embeds = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    padding = torch.ones(2, 6, dtype=torch.long)
    square = _square(padding)
    prepared = prepare_inputs(qwen, {"inputs_embeds": embeds, "attention_mask": square}, 4)
    assert prepared.kwargs["inputs_embeds"].shape == (1, 4, 32)
    assert prepared.kwargs["attention_mask"].shape == (1, 1, 4, 4)
    assert prepared.tokens == 4


def test_a_4d_mask_reaches_a_transformers_model_and_compares_its_tokens(qwen):
    batch = _batch(pad=True)
    square = _square(batch["attention_mask"])
    prepared = prepare_inputs(qwen, {"input_ids": batch["input_ids"], "attention_mask": square},
                              1000)
    assert prepared.tokens == int(batch["attention_mask"].sum())  # positions, not mask entries
    with torch.no_grad():
        got = run_forward(qwen, prepared)
    assert got.shape == (prepared.tokens, VOCAB) and bool(got.isfinite().all())


def test_a_mask_with_as_many_heads_as_positions_is_cut_on_its_last_two_dimensions():
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    causal = torch.ones(8, 8, dtype=torch.bool).tril().expand(1, 8, 8, 8)  # heads == seq
    prepared = prepare_inputs(_ChecksMaskShape(), {"input_ids": ids, "attention_mask": causal},
                              4)
    assert prepared.kwargs["attention_mask"].shape == (1, 8, 4, 4)


def test_broadcast_position_ids_follow_the_window():
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    batch = {"input_ids": ids, "position_ids": torch.arange(8)[None]}  # [1, seq]
    prepared = prepare_inputs(tiny_qwen2(vocab=VOCAB), batch, 4)
    assert prepared.kwargs["input_ids"].shape == (1, 4)
    assert torch.equal(prepared.kwargs["position_ids"], torch.arange(4)[None])


def test_inputs_embeds_with_a_mask_of_one_column_are_not_one_position_per_row(caplog):
    class Embeds(nn.Module):
        def forward(self, inputs_embeds, attention_mask=None):
            return inputs_embeds

    embeds = torch.randn(3, 5, 4)
    prepared = prepare_inputs(Embeds(), {"inputs_embeds": embeds,
                                         "attention_mask": torch.ones(3, 1)}, 1000)
    assert prepared.mask is None  # not read as one position per row: every position compared
    assert [r for r in caplog.records if "attention_mask of shape [3, 1]" in r.getMessage()]
