"""Checkpoint pairs written by the tests themselves (save_pretrained, torch.save, safetensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.conftest import tiny_qwen2

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away", "big", "small",
         "red", "blue", "green", "tree"]


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 1e-3) -> None:
    """Sparse-ish update: ~30% of entries untouched, the rest moved by N(0, scale^2)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen) * scale
        noise[torch.rand(p.shape, generator=gen) < 0.3] = 0.0
        p.add_(noise.to(p.dtype))


def tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` (ids < 32), with pad and eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def save_pair(
    root: Path,
    base_dtype: torch.dtype = torch.float32,
    tuned_dtype: torch.dtype | None = None,
    shard: bool = False,
    with_tokenizer: bool = False,
    **model_kwargs,
) -> tuple[torch.nn.Module, torch.nn.Module, Path, Path]:
    """``(base_model, tuned_model, base_dir, tuned_dir)`` saved with ``save_pretrained``."""
    base = tiny_qwen2(dtype=base_dtype, **model_kwargs)
    tuned = tiny_qwen2(dtype=base_dtype, **model_kwargs)
    perturb(tuned)
    if tuned_dtype is not None:
        tuned = tuned.to(tuned_dtype)
    base_dir, tuned_dir = root / "base", root / "tuned"
    base.save_pretrained(base_dir)
    tuned.save_pretrained(tuned_dir, max_shard_size="20KB" if shard else "5GB")
    if with_tokenizer:
        tokenizer().save_pretrained(tuned_dir)
    return base, tuned, base_dir, tuned_dir


def float64_reference(base: torch.nn.Module, tuned: torch.nn.Module) -> dict[str, float]:
    """Norms and exact counts of ``tuned - base`` in float64 numpy, over named parameters."""
    old = dict(base.named_parameters())
    d, unchanged = [], 0
    for name, p in tuned.named_parameters():
        n = p.detach().double().numpy().reshape(-1)
        o = old[name].detach().double().numpy().reshape(-1)
        d.append(n - o)
        unchanged += int((n == o).sum())
    x = np.concatenate(d)
    return {
        "norm_l2": float(np.sqrt((x * x).sum())),
        "norm_l1": float(np.abs(x).sum()),
        "norm_max": float(np.abs(x).max()),
        "mean": float(x.mean()),
        "exact_unchanged_ratio": unchanged / x.size,
        "num_params": float(x.size),
    }
