"""Checkpoint pairs written by the tests themselves (save_pretrained, torch.save, safetensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.conftest import tiny_qwen2

CORPUS = ["the cat sat on the mat", "a big red dog ran far away", "the small blue cat",
          "green tree"]


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 1e-3) -> None:
    """Sparse-ish update: ~30% of entries untouched, the rest moved by N(0, scale^2)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen) * scale
        noise[torch.rand(p.shape, generator=gen) < 0.3] = 0.0
        p.add_(noise.to(p.dtype))


def tokenizer():
    """A byte-level BPE tokenizer of 300 tokens trained on :data:`CORPUS` (pad = eos).

    Byte-level BPE because transformers picks the tokenizer class from the model type of the
    directory (Qwen2 here), and Qwen2's class rebuilds a byte-level BPE from the saved files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
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
    if with_tokenizer:
        model_kwargs.setdefault("vocab", 320)
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
