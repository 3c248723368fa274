"""Shared fixtures: tiny random-init models built from a config (no hub access)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs one worker per core (pyproject: -n auto): one thread each
    torch.set_num_threads(1)


def tiny_qwen2(
    vocab: int = 128,
    hidden: int = 32,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
) -> torch.nn.Module:
    """A random-init Qwen2 causal LM of a few thousand parameters (train mode, like HF)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **overrides,
    )
    return Qwen2ForCausalLM(cfg).to(dtype)


def tiny_gpt2(vocab: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                     **overrides)
    return GPT2LMHeadModel(cfg)


@pytest.fixture
def qwen2():
    return tiny_qwen2()


@pytest.fixture
def gpt2():
    return tiny_gpt2()
