"""BatchCapture (the training batch a Trainer never hands out) and tokenize_probe."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from grail.trainer.analysis.integrations import BatchCapture, tokenize_probe
from tests.conftest import tiny_qwen2

from ._hf import bpe_tokenizer


def test_tokenize_probe_right_pads_with_mask():
    tok = bpe_tokenizer()
    texts = ["1 plus 4 makes 5", "12", "7 plus 10 makes 17 and more"]
    batch = tokenize_probe(texts, tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected = [tok(t)["input_ids"] for t in texts]
    assert ids.shape == (3, max(len(e) for e in expected)) and ids.dtype == torch.long
    for row, want in enumerate(expected):
        n = len(want)
        assert ids[row, :n].tolist() == want
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (ids[row, n:] == tok.pad_token_id).all()

    class Processor:  # multimodal processors carry the tokenizer as an attribute
        tokenizer = tok

    assert torch.equal(tokenize_probe(texts, Processor())["input_ids"], ids)
    with pytest.raises(ValueError, match="processing_class"):
        tokenize_probe(texts, None)


def test_capture_keeps_only_grad_enabled_forwards_by_reference():
    model = tiny_qwen2()
    capture = BatchCapture().attach(model)
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
    assert set(capture.batch) == {"input_ids", "attention_mask"}  # generation-only keys dropped
    model(input_ids=ids, attention_mask=mask, labels=ids, num_items_in_batch=torch.tensor(12))
    assert set(capture.batch) == {"input_ids", "attention_mask"}
    assert capture.batch["input_ids"] is ids and capture.batch["attention_mask"] is mask
    with torch.no_grad():  # generation / evaluation
        model(input_ids=ids[:, :2])
    assert capture.batch["input_ids"] is ids
    with capture.paused():  # the analysis' own forwards
        model(input_ids=ids[:, :3])
    assert capture.batch["input_ids"] is ids
    short = ids[:, :4]
    model(short)  # positional call: the arguments are kept as a tuple
    assert isinstance(capture.batch, tuple) and capture.batch[0] is short
    model(short, attention_mask=mask[:, :4])  # HF style: ids positional, the rest by name
    assert capture.batch["input_ids"] is short and "attention_mask" in capture.batch
    capture.detach()
    assert capture.batch is None  # reference released
    model(input_ids=ids)
    assert capture.batch is None  # hook removed


def test_capture_of_a_plain_module_and_reattach():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    capture = BatchCapture().attach(a)
    x = torch.randn(4, 3)
    a(x)
    assert isinstance(capture.batch, tuple) and len(capture.batch) == 1
    assert capture.batch[0] is x
    capture.attach(b)  # moves the hook and forgets the old batch
    assert capture.batch is None
    a(x)
    assert capture.batch is None
    y = torch.randn(2, 3)
    b(input=y)
    assert list(capture.batch) == ["input"] and capture.batch["input"] is y
    capture.detach()
