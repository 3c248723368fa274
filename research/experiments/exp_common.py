"""Shared pieces of the experiments: a tiny causal LM, synthetic tasks, training loops.

Everything is built in-process and seeded, so a run is reproducible on one machine with a fixed
thread count (the runner fixes it):

* **Model.** A random-init Qwen2 causal LM from a config (``SETTINGS`` below: about 0.2M
  parameters, untied output head).
* **Pre-training task.** Sequences of a Markov chain over ``VOCAB`` tokens in which every token
  has ``FANOUT`` possible successors with Dirichlet-drawn probabilities (``markov_chain(seed)``).
  The model learns the chain, so it has real structure before any fine-tuning.
* **SFT task (shifted).** The same chain with the successor distributions of half of the tokens
  redrawn (``shifted_chain``): the fine-tune has to rewrite part of what was learned.
* **RL task.** REINFORCE on sampled continuations of chain prompts with a scalar reward: the
  fraction of generated tokens in the lower half of the vocabulary (``reward``).

The optimizer is AdamW without weight decay (weight decay would touch every entry and hide
the effects under study).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 32
FANOUT = 3


@dataclass(frozen=True)
class ModelSettings:
    """Shape of the tiny Qwen2 model."""

    vocab: int = VOCAB
    hidden: int = 64
    layers: int = 4
    intermediate: int = 192
    heads: int = 4
    kv_heads: int = 2


SETTINGS = ModelSettings()


def build_model(seed: int, settings: ModelSettings = SETTINGS) -> nn.Module:
    """A random-init Qwen2 causal LM (fp32, train mode)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=settings.vocab,
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- tasks ---------------------------------------------------------------------------------
def markov_chain(seed: int, vocab: int = VOCAB, fanout: int = FANOUT) -> torch.Tensor:
    """A ``vocab x vocab`` row-stochastic matrix with ``fanout`` non-zero entries per row."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(vocab, vocab)
    for i in range(vocab):
        succ = torch.randperm(vocab, generator=g)[:fanout]
        # Exponential weights normalised: a flat Dirichlet draw from the seeded generator.
        weights = -torch.log(torch.rand(fanout, generator=g).clamp_min(1e-6))
        probs[i, succ] = weights / weights.sum()
    return probs


def shifted_chain(base: torch.Tensor, seed: int, fraction: float = 0.5) -> torch.Tensor:
    """``base`` with the rows of a random ``fraction`` of the tokens redrawn."""
    vocab, fanout = base.shape[0], int((base[0] > 0).sum())
    fresh = markov_chain(seed, vocab, fanout)
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(vocab, generator=g)[: round(fraction * vocab)]
    out = base.clone()
    out[rows] = fresh[rows]
    return out


def sample_chain(
    probs: torch.Tensor, batch: int, length: int, g: torch.Generator
) -> torch.Tensor:
    """``batch`` sequences of ``length`` tokens; first tokens uniform."""
    seq = torch.empty(batch, length, dtype=torch.long)
    seq[:, 0] = torch.randint(0, probs.shape[0], (batch,), generator=g)
    for t in range(1, length):
        seq[:, t] = torch.multinomial(probs[seq[:, t - 1]], 1, generator=g).squeeze(1)
    return seq


def chain_entropy(probs: torch.Tensor) -> float:
    """Mean next-token entropy (nats) under the uniform start distribution's successors."""
    p = probs.clamp_min(1e-30)
    return float(-(probs * p.log()).sum(1).mean())


def reward(completions: torch.Tensor, vocab: int = VOCAB) -> torch.Tensor:
    """Fraction of tokens of each completion in the lower half of the vocabulary."""
    return (completions < vocab // 2).float().mean(dim=1)


# --- training ------------------------------------------------------------------------------
def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens).logits[:, :-1].float()
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def pretrain(
    probs: torch.Tensor, steps: int, seed: int, batch: int = 32, length: int = 32
) -> tuple[nn.Module, list[float]]:
    """Train a fresh model on the chain with a cosine-decayed lr of 3e-3; returns the losses."""
    model = build_model(seed)
    opt = make_optimizer(model, 3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, sample_chain(probs, batch, length, g))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
    return model, losses


@torch.no_grad()
def sample(
    model: nn.Module, prompts: torch.Tensor, new_tokens: int, g: torch.Generator
) -> torch.Tensor:
    """Prompts followed by ``new_tokens`` tokens sampled at temperature 1 (no KV cache)."""
    training = model.training
    model.eval()
    seq = prompts
    for _ in range(new_tokens):
        logits = model(input_ids=seq).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        seq = torch.cat([seq, nxt], dim=1)
    model.train(training)
    return seq


def reinforce_loss(
    model: nn.Module, seq: torch.Tensor, prompt_len: int, advantages: torch.Tensor
) -> torch.Tensor:
    """Policy gradient: ``-mean_b(A_b * sum_t log p(completion token t))``."""
    logits = model(input_ids=seq).logits[:, prompt_len - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, seq[:, prompt_len:, None]).squeeze(-1)
    return -(advantages * logp.sum(1)).mean()


StepHook = Callable[[int, nn.Module], None]


def finetune_sft(
    model: nn.Module,
    probs: torch.Tensor,
    lr: float,
    steps: int,
    seed: int,
    on_step: StepHook | None = None,
    batch: int = 32,
    length: int = 32,
) -> list[float]:
    """SFT on ``probs`` at a constant ``lr``; ``on_step(step, model)`` after every update."""
    opt = make_optimizer(model, lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        loss = lm_loss(model, sample_chain(probs, batch, length, g))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, model)
    return losses


def finetune_rl(
    model: nn.Module,
    prompts_chain: torch.Tensor,
    lr: float,
    steps: int,
    seed: int,
    on_step: StepHook | None = None,
    batch: int = 32,
    prompt_len: int = 8,
    new_tokens: int = 8,
) -> list[float]:
    """REINFORCE with a batch-mean baseline; returns the mean reward of every step."""
    opt = make_optimizer(model, lr)
    g = torch.Generator().manual_seed(seed)
    rewards = []
    for step in range(1, steps + 1):
        prompts = sample_chain(prompts_chain, batch, prompt_len, g)
        seq = sample(model, prompts, new_tokens, g)
        r = reward(seq[:, prompt_len:])
        loss = reinforce_loss(model, seq, prompt_len, r - r.mean())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rewards.append(float(r.mean()))
        if on_step is not None:
            on_step(step, model)
    return rewards


def clone(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An independent copy in ``dtype`` (train mode preserved)."""
    return copy.deepcopy(model).to(dtype)
