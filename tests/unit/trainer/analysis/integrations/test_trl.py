"""ModelAnalysisCallback inside TRL's GRPOTrainer (CPU, no vLLM, tiny Qwen2, 3 steps)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager
from grail.trainer.analysis.integrations import ModelAnalysisCallback
from grail.trainer.analysis.integrations.transformers import tokenize_probe

from ._hf import CORPUS, Recorder, analysis_entries, bpe_tokenizer, lm_model, steps_with

pytestmark = pytest.mark.slow

BATCH, COMPLETION = 4, 6


PROMPTS = [t.split(" makes")[0] + " makes" for t in CORPUS[:16]]


def _grpo(tmp_path, probe=None):
    tok = bpe_tokenizer()
    rec = Recorder()
    manager = ModelAnalysisManager.create(AnalysisConfig(interval=1)).add_metric(rec)
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=BATCH,
        num_generations=4, max_completion_length=COMPLETION, learning_rate=1e-3, beta=0.0,
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=lm_model(tok),
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tok,
        callbacks=[ModelAnalysisCallback(manager, probe_inputs=probe)],
    )
    trainer.train()
    return trainer, rec, tok


def _check_common(trainer, rec):
    history = trainer.state.log_history
    entries = analysis_entries(history)
    assert sorted(entries) == [2, 3]
    # TRL's buffered averages (reward, ...) are not drained into the analysis entries ...
    assert all(not any(k.startswith("reward") for k in e) for e in history
               if any(k.startswith("analysis/") for k in e))
    assert [c["step"] for c in rec.calls] == [2, 3]
    for metrics in entries.values():
        assert metrics["param_change/norm_l2"] > 0
        assert {"sparse/kl_at_1e-06", "sparse/top1_agree_at_1e-06_random"} <= set(metrics)
    # ... and TRL's own per-step logs keep their loss and reward on every step.
    assert steps_with(history, "loss") == [1, 2, 3]
    assert all("reward" in e for e in history if "loss" in e)
    return entries


def test_grpo_captured_training_batch_gives_sparse_metrics(tmp_path):
    trainer, rec, tok = _grpo(tmp_path)
    entries = _check_common(trainer, rec)
    for call, step in zip(rec.calls, (2, 3), strict=True):
        inputs = call["inputs"]
        # The training forward (prompt + completion), not a generation call (no_grad, cached
        # one-token inputs) and not the analysis' own forwards.
        assert set(inputs) >= {"input_ids", "attention_mask"}
        assert "logits_to_keep" not in inputs and "use_cache" not in inputs
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert ids.shape[0] == BATCH
        for row, row_mask in zip(ids, mask, strict=True):
            text = tok.decode(row[row_mask.bool()])
            prompt = next(p for p in PROMPTS if text.startswith(p))
            assert int(row_mask.sum()) > len(tok(prompt)["input_ids"])  # has a completion
        assert entries[step]["sparse/tokens"] == float(mask.sum())


def test_grpo_with_string_probe(tmp_path):
    texts = ["5 plus 8 makes 13", "40 plus 43", "7"]
    trainer, rec, tok = _grpo(tmp_path, probe=texts)
    entries = _check_common(trainer, rec)
    want = tokenize_probe(texts, tok)
    for call in rec.calls:
        assert torch.equal(call["inputs"]["input_ids"], want["input_ids"])
    assert entries[2]["sparse/tokens"] == entries[3]["sparse/tokens"] == float(
        want["attention_mask"].sum()
    )
