r"""Experiments 1 and 3: storage precision against apparent update sparsity, and mask overlap.

The same SFT fine-tune (same data order) runs at each learning rate in three storage modes:

* ``fp32``: parameters and AdamW state in float32.
* ``bf16 view``: the fp32 run itself, analysed through a shadow bfloat16 model whose weights are
  the fp32 master weights rounded to nearest after every step (what a bf16 checkpoint of an
  fp32-master run stores).
* ``pure bf16``: parameters and AdamW state in bfloat16; every step's update is rounded.

One :class:`~grail.trainer.analysis.ModelAnalysisManager` per mode, with ``interval`` steps
between measurements and ``param_change_track_mask_overlap`` on, reports
``param_change/exact_unchanged_ratio``, ``param_change/bf16_unchanged_ratio`` and
``param_change/mask_overlap`` over consecutive intervals.

Rounding-rule predictions (:mod:`exp_rules`) are computed from the fp32 run's own weights and
deltas over the same intervals, taking the manager's snapshot (``manager.old_snapshot``, the start
of the interval) just before it advances: the interval rule and the drift rule for the bf16 view,
the per-step rule for pure bf16.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from exp_common import clone, finetune_sft
from exp_rules import StepRule, change_probabilities, drift_jaccard, jaccard, mean_of, scaled_moves
from torch import nn

from grail.trainer.analysis import (
    AnalysisConfig,
    ModelAnalysisManager,
    ParameterSnapshot,
    measurement_steps,
)

logger = logging.getLogger(__name__)

MODES = ("fp32", "bf16_view", "pure_bf16")
RULES = (
    "interval_rule_unchanged",
    "interval_rule_overlap",
    "independent_rule_overlap",
    "step_rule_unchanged",
    "step_rule_overlap",
)


@dataclass(frozen=True)
class PrecisionSettings:
    lrs: tuple[float, ...]
    interval: int  # optimizer steps between measurements
    intervals: int  # measured intervals per run (the first `interval` steps only set the snapshot)
    overlap_lr: float  # learning rate whose per-interval overlaps are drawn


def analysis_config(interval: int) -> AnalysisConfig:
    return AnalysisConfig(
        interval=interval,
        sparse_quality_enabled=False,
        param_change_thresholds=[0.0],
        param_change_track_mask_overlap=True,
    )


_KEYS = (
    "param_change/exact_unchanged_ratio",
    "param_change/bf16_unchanged_ratio",
    "param_change/mask_overlap",
    "param_change/norm_l2",
)


def _keep(metrics: dict[str, float]) -> dict[str, float]:
    # mask_overlap is NaN at the first measurement (no previous interval): leave it out
    return {
        k.split("/", 1)[1]: metrics[k]
        for k in _KEYS
        if k in metrics and not math.isnan(metrics[k])
    }


def run_fp32(
    base: nn.Module, chain: torch.Tensor, lr: float, s: PrecisionSettings, seed: int
) -> dict[str, Any]:
    """The fp32 run, its bf16 view and the two rule predictions, per interval."""
    model, shadow = clone(base), clone(base, torch.bfloat16)
    managers = {m: ModelAnalysisManager.create(analysis_config(s.interval)) for m in MODES[:2]}
    rule = StepRule(model)
    out: dict[str, Any] = {key: [] for key in ("fp32", "bf16_view", *RULES)}
    previous: dict[str, dict[str, torch.Tensor]] = {}
    steps = s.interval * (s.intervals + 1)
    measured = set(measurement_steps(s.interval, steps))

    def on_step(step: int, model: nn.Module) -> None:
        rule.update(model)
        fp32 = managers["fp32"]
        if step in measured and fp32.old_snapshot is not None:
            # The manager's snapshot is the start of this interval: predict before it advances.
            moves = scaled_moves(fp32.old_snapshot.compute_delta(ParameterSnapshot.live(model)))
            current = {
                "moves": moves,
                "interval": change_probabilities(moves),
                "step": rule.predict(fp32.old_snapshot),
            }
            out["interval_rule_unchanged"].append(1.0 - mean_of(current["interval"]))
            out["step_rule_unchanged"].append(1.0 - mean_of(current["step"]))
            if previous:
                out["interval_rule_overlap"].append(drift_jaccard(previous["moves"], moves))
                out["independent_rule_overlap"].append(
                    jaccard(previous["interval"], current["interval"])
                )
                out["step_rule_overlap"].append(jaccard(previous["step"], current["step"]))
            previous.update(current)
        if step % s.interval == 0:
            rule.reset()
        if m := fp32.on_optimizer_step(model):
            out["fp32"].append(_keep(m))
        with torch.no_grad():
            for p_shadow, p in zip(shadow.parameters(), model.parameters(), strict=True):
                p_shadow.copy_(p)  # round to nearest even
        if m := managers["bf16_view"].on_optimizer_step(shadow):
            out["bf16_view"].append(_keep(m))

    losses = finetune_sft(model, chain, lr, steps, seed, on_step)
    out["final_loss"] = losses[-1]
    return out


def run_pure_bf16(
    base: nn.Module, chain: torch.Tensor, lr: float, s: PrecisionSettings, seed: int
) -> dict[str, Any]:
    """The same fine-tune with bfloat16 parameters and optimizer state."""
    model = clone(base, torch.bfloat16)
    manager = ModelAnalysisManager.create(analysis_config(s.interval))
    rows: list[dict[str, float]] = []

    def on_step(step: int, model: nn.Module) -> None:
        if m := manager.on_optimizer_step(model):
            rows.append(_keep(m))

    losses = finetune_sft(model, chain, lr, s.interval * (s.intervals + 1), seed, on_step)
    return {"pure_bf16": rows, "final_loss": losses[-1]}


def run(base: nn.Module, chain: torch.Tensor, s: PrecisionSettings, seed: int) -> dict[str, Any]:
    """Every learning rate in every mode; JSON-ready."""
    runs = []
    for lr in s.lrs:
        fp32 = run_fp32(base, chain, lr, s, seed)
        pure = run_pure_bf16(base, chain, lr, s, seed)
        runs.append(
            {
                "lr": lr,
                **{key: fp32[key] for key in ("fp32", "bf16_view", *RULES)},
                "pure_bf16": pure["pure_bf16"],
                "final_loss": {"fp32": fp32["final_loss"], "pure_bf16": pure["final_loss"]},
            }
        )
        r = runs[-1]
        logger.info(
            "lr %.0e: unchanged fp32 %.3f, bf16 view %.3f (rule %.3f), pure bf16 %.3f (rule %.3f)",
            lr,
            mean(r["fp32"], "exact_unchanged_ratio"),
            mean(r["bf16_view"], "exact_unchanged_ratio"),
            sum(r["interval_rule_unchanged"]) / len(r["interval_rule_unchanged"]),
            mean(r["pure_bf16"], "exact_unchanged_ratio"),
            sum(r["step_rule_unchanged"]) / len(r["step_rule_unchanged"]),
        )
    return {
        "settings": {
            "lrs": list(s.lrs),
            "interval": s.interval,
            "intervals": s.intervals,
            "overlap_lr": s.overlap_lr,
        },
        "runs": runs,
    }


def mean(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else float("nan")
