"""Helpers for the Trainer/TRL tests: tokenizer, data, recorders (no hub access)."""

from __future__ import annotations

from typing import Any

import torch

from grail.trainer.analysis import MetricComputer, MetricResult
from tests.conftest import tiny_qwen2

CORPUS = [f"{i} plus {i + 3} makes {2 * i + 3}" for i in range(64)]


def bpe_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on :data:`CORPUS` (pad and eos tokens set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=280,
            special_tokens=["<pad>", "<eos>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def lm_model(tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    model = tiny_qwen2(vocab=len(tokenizer), seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    return model


def lm_dataset(rows: int = 64, seq: int = 12, vocab: int = 128, seed: int = 0) -> Any:
    """Fixed-length random token rows with labels (no collator needed)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(out: str, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    base: dict[str, Any] = {
        "output_dir": out,
        "max_steps": 7,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**base, **overrides})


class Recorder(MetricComputer):
    """Records what the manager handed it at every measurement; returns one key."""

    name = "rec"

    def __init__(self, histograms: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.histograms = histograms

    def compute(self, delta=None, context=None, **kwargs: Any) -> dict[str, float] | MetricResult:
        model = context.model
        self.calls.append(
            {
                "step": context.step,
                "inputs": context.inputs,
                "optimizer": context.optimizer,
                "grads": all(p.grad is not None for p in model.parameters() if p.requires_grad),
                "grad_enabled": torch.is_grad_enabled(),
            }
        )
        metrics = {"rec/calls": float(len(self.calls))}
        if self.histograms:
            return MetricResult(metrics, {"rec/hist": torch.arange(8.0).numpy()})
        return metrics


def weight_recorder() -> Any:
    """A callback keeping float64 copies of all parameters after every optimizer step."""
    from transformers import TrainerCallback

    class WeightRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.weights: dict[int, dict[str, torch.Tensor]] = {}

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.weights[state.global_step + 1] = {
                n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()
            }

    return WeightRecorder()


def analysis_entries(log_history: list[dict[str, Any]], prefix: str = "analysis/") -> dict:
    """``{step: {key without prefix: value}}`` of the analysis log entries."""
    out: dict[int, dict[str, float]] = {}
    for entry in log_history:
        found = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix)}
        if found:
            assert entry["step"] not in out, f"two analysis entries at step {entry['step']}"
            out[entry["step"]] = found
    return out


def steps_with(log_history: list[dict[str, Any]], key: str) -> list[int]:
    return [e["step"] for e in log_history if key in e]
