r"""Experiment 2: which mask of the fine-tuning update reproduces the fine-tuned model?

The whole update of a fine-tune, :math:`\Delta = W_{tuned} - W_{base}`, is measured once with a
:class:`~grail.trainer.analysis.ModelAnalysisManager` whose ``interval`` is the fine-tune's
length: the base model is registered as the snapshot by ``on_optimizer_step(model,
step=interval)`` before the first step, and the measurement happens after the last one.

At kept fractions ``KEEP`` the manager reports, against the tuned model on a fixed probe batch,
``sparse/kl_at_keep_{f}`` (largest :math:`|\Delta|` kept), ``..._random`` (a uniformly random
subset of the same size) and ``..._dare`` (the random subset rescaled by ``1/f``), all over every
parameter of the model. The low-rank computer reports ``lowrank/kl_at_r{r}`` (every 2-D matrix,
embeddings and output head included, replaced by :math:`W_{base} + \text{rank-}r` truncation of
its update; 1-D parameters keep their full update) and ``lowrank/param_ratio_at_r{r}`` (LoRA's
parameter count :math:`r(m+n)` over the matrices' entries). For each kept fraction ``f`` the
rank whose ``param_ratio`` is nearest to ``f`` on a log scale is chosen (:func:`match_ranks`); the
figure places low-rank points at their own ``param_ratio``.

Two regimes from the same pre-trained model: SFT on the shifted chain, and REINFORCE with the
scalar reward of :func:`exp_common.reward`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from exp_common import clone, finetune_rl, finetune_sft, sample, sample_chain
from torch import nn

from grail.trainer.analysis import AnalysisConfig, ModelAnalysisManager

logger = logging.getLogger(__name__)

KEEP = (0.01, 0.1, 0.5)
RANKS = (1, 2, 4, 8, 16, 32)
NOTHING = 1e9


@dataclass(frozen=True)
class MaskSettings:
    sft_steps: int
    sft_lr: float
    rl_steps: int
    rl_lr: float
    probe_batch: int = 16


def analysis_config(interval: int) -> AnalysisConfig:
    return AnalysisConfig(
        interval=interval,
        # A threshold no entry exceeds keeps nothing: KL(tuned || base), the scale of the plot.
        sparse_quality_thresholds=[NOTHING],
        sparse_quality_keep_ratios=list(KEEP),
        sparse_quality_include_random=True,
        sparse_quality_rescale_random=True,
        low_rank_enabled=True,
        low_rank_ranks=list(RANKS),
        low_rank_include_embeddings=True,
    )


def match_ranks(metrics: dict[str, float], keep: tuple[float, ...] = KEEP) -> dict[str, int]:
    """For each kept fraction, the rank whose ``param_ratio`` is nearest on a log scale."""
    out = {}
    for f in keep:
        out[f"{f:g}"] = min(
            RANKS,
            key=lambda r: abs(math.log(metrics[f"lowrank/param_ratio_at_r{r}"] / f)),
        )
    return out


def _summarise(metrics: dict[str, float]) -> dict[str, Any]:
    """The four curves at each kept fraction, plus every raw key for the JSON."""
    ranks = match_ranks(metrics)
    curves: dict[str, list[list[float]]] = {
        "magnitude": [],
        "random": [],
        "dare": [],
        "low_rank": [],
        "magnitude_at_rank_budget": [],
    }
    for f in KEEP:
        label = f"keep_{f:g}"
        kept = metrics[f"sparse/kept_ratio_at_{label}"]
        curves["magnitude"].append([kept, metrics[f"sparse/kl_at_{label}"]])
        curves["random"].append([kept, metrics[f"sparse/kl_at_{label}_random"]])
        curves["dare"].append([kept, metrics[f"sparse/kl_at_{label}_dare"]])
    for r in RANKS:
        ratio = metrics[f"lowrank/param_ratio_at_r{r}"]
        curves["low_rank"].append([ratio, metrics[f"lowrank/kl_at_r{r}"], r])
        curves["magnitude_at_rank_budget"].append(
            [ratio, metrics[f"sparse/kl_at_budget_r{r}"], r]
        )
    n = metrics["param_change/num_params"]
    return {
        "matched_ranks": ranks,
        "curves": curves,
        "kl_base": metrics[f"sparse/kl_at_{NOTHING:.0e}"],
        # (sum |d|)^2 / (N sum d^2): 1 when all entries have the same size, 2/pi for Gaussian.
        "evenness": metrics["param_change/norm_l1"] ** 2
        / (n * metrics["param_change/norm_l2"] ** 2),
        "metrics": metrics,
    }


def measure(
    base: nn.Module,
    finetune: Any,
    steps: int,
    probe: Callable[[nn.Module], torch.Tensor],
) -> dict[str, float]:
    """Fine-tune a copy of ``base`` with ``finetune(model, on_step)``; metrics of base -> tuned.

    ``probe(tuned_model)`` builds the probe batch after the last step (before the measurement).
    """
    model = clone(base)
    manager = ModelAnalysisManager.create(analysis_config(steps))
    manager.on_optimizer_step(model, step=steps)  # snapshot of the base model
    result: dict[str, float] = {}

    def on_step(step: int, m: nn.Module) -> None:
        inputs = {"input_ids": probe(m)} if step == steps else None
        metrics = manager.on_optimizer_step(m, inputs=inputs)
        if metrics:
            result.update(metrics)

    finetune(model, on_step)
    if not result:
        raise RuntimeError("the analysis returned no metrics at the end of the fine-tune")
    return result


def _ends(log: list[float], n: int = 10) -> list[float]:
    """Mean of the first and of the last ``n`` entries."""
    n = min(n, len(log))
    return [sum(log[:n]) / n, sum(log[-n:]) / n]


def run(
    base: nn.Module,
    pre_chain: torch.Tensor,
    sft_chain: torch.Tensor,
    s: MaskSettings,
    seed: int,
) -> dict[str, Any]:
    """SFT and RL fine-tunes of ``base``; JSON-ready."""
    g = torch.Generator().manual_seed(seed + 100)
    sft_probe = sample_chain(sft_chain, s.probe_batch, 32, g)
    prompts = sample_chain(pre_chain, s.probe_batch, 8, g)
    probes: dict[str, torch.Tensor] = {"sft": sft_probe}

    def rl_probe(tuned: nn.Module) -> torch.Tensor:
        # On-policy: pre-training-chain prompts with continuations of the fine-tuned policy.
        probes["rl"] = sample(tuned, prompts, 8, g)
        return probes["rl"]

    sft_log: list[float] = []
    rl_log: list[float] = []

    def sft(model: nn.Module, on_step: Any) -> None:
        sft_log.extend(finetune_sft(model, sft_chain, s.sft_lr, s.sft_steps, seed, on_step))

    def rl(model: nn.Module, on_step: Any) -> None:
        rl_log.extend(finetune_rl(model, pre_chain, s.rl_lr, s.rl_steps, seed, on_step))

    sft_metrics = measure(base, sft, s.sft_steps, lambda _: sft_probe)
    rl_metrics = measure(base, rl, s.rl_steps, rl_probe)
    out = {
        "settings": {
            "keep": list(KEEP),
            "ranks": list(RANKS),
            "sft_steps": s.sft_steps,
            "sft_lr": s.sft_lr,
            "rl_steps": s.rl_steps,
            "rl_lr": s.rl_lr,
            "probe_tokens": {k: v.numel() for k, v in probes.items()},
            "non_matrix_fraction": sum(p.numel() for p in base.parameters() if p.dim() != 2)
            / sum(p.numel() for p in base.parameters()),
        },
        "sft": {**_summarise(sft_metrics), "loss_first_last_10": _ends(sft_log)},
        "rl": {**_summarise(rl_metrics), "reward_first_last_10": _ends(rl_log)},
    }
    for regime in ("sft", "rl"):
        c = out[regime]["curves"]
        logger.info(
            "%s: KL magnitude %s random %s dare %s; matched ranks %s",
            regime,
            [f"{kl:.2g}" for _, kl in c["magnitude"]],
            [f"{kl:.2g}" for _, kl in c["random"]],
            [f"{kl:.2g}" for _, kl in c["dare"]],
            out[regime]["matched_ranks"],
        )
    return out
