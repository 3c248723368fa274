"""Forward-pass metrics of the offline diff: the TUNED model on a file of prompts.

The TUNED directory is loaded once with ``transformers`` (``AutoModelForCausalLM`` and
``AutoTokenizer``, local files only, the checkpoint's own dtype). BASE becomes an in-memory
:class:`~grail.trainer.analysis.core.snapshot.ParameterSnapshot` filled tensor by tensor from its
checkpoint (the patching swaps values with it, so it must be real memory), and the computers that
need a model - sparse quality, low-rank quality - run exactly as online with
``ParameterDelta(base, live tuned model)`` and the tokenised prompts as the batch.

Decisions:

* Prompts: one per line, blank lines skipped; tokenised as one right-padded batch truncated to
  ``max_tokens`` tokens per prompt (the metrics cut the batch to ``max_tokens`` positions). A
  tokenizer without a pad token pads with its EOS (or UNK, or id 0) token; padded positions are
  masked out of every comparison.
* Each BASE tensor is stored in the wider of its own and the model's dtype, so the snapshot is
  exact for both (a bf16 base of an fp32 model is widened, an fp32 base of a bf16 model is kept).
* When the BASE tensor names do not match the model's parameter names (a checkpoint format that
  transformers renames on load), BASE is loaded with ``from_pretrained`` as well, snapshotted and
  freed.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "prompts.txt")
    >>> with open(path, "w") as f:
    ...     _ = f.write("first prompt\\n\\nsecond prompt\\n")
    >>> read_prompts(path)
    ['first prompt', 'second prompt']
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..core.distributed import shard_info
from ..core.snapshot import ParameterSnapshot, collect_parameters
from ..metrics.base import AnalysisContext, MetricComputer
from .checkpoint import Checkpoint, CheckpointError

__all__ = ["base_snapshot", "load_model", "read_prompts", "run_model_metrics", "tokenize"]

logger = logging.getLogger(__name__)


def read_prompts(path: str | Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CheckpointError(f"prompts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read prompts file {path}: {err}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise CheckpointError(f"prompts file {path} holds no prompts (one per line)")
    return prompts


def _dtype_kwargs() -> dict[str, Any]:
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": "auto"} if (major, minor) >= (4, 56) else {"torch_dtype": "auto"}


def load_model(path: str | Path, device: str, with_tokenizer: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a local transformers directory, the model in eval mode."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CheckpointError(
            "--prompts needs transformers: pip install 'grail-analysis[hf]'"
        ) from None
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise CheckpointError(f"--prompts needs a transformers model directory; {path} is not one")
    try:
        tokenizer = (
            AutoTokenizer.from_pretrained(path, local_files_only=True) if with_tokenizer else None
        )
    except Exception as err:
        raise CheckpointError(f"cannot load a tokenizer from {path}: {_line(err)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **_dtype_kwargs())
    except Exception as err:
        raise CheckpointError(f"transformers cannot load {path}: {_line(err)}") from None
    return model.to(device).eval(), tokenizer


def _line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


def tokenize(tokenizer: Any, prompts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """One right-padded batch with an attention mask (see module docstring)."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "right"
    batch = tokenizer(
        prompts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def base_snapshot(base: Checkpoint, model: torch.nn.Module, device: str) -> ParameterSnapshot:
    """BASE's values for every parameter of ``model`` (see module docstring)."""
    params = collect_parameters(model)
    missing = [n for n, p in params if n not in base.specs or base.specs[n].shape != p.shape]
    if missing:
        logger.info("BASE names differ from the model's (%s...); loading it with transformers",
                    missing[0])
        base_model, _ = load_model(base.path, device, with_tokenizer=False)
        snap = ParameterSnapshot(base_model, device=device)
        if set(snap.data) != {n for n, _ in params}:
            raise CheckpointError("BASE and TUNED load as models with different parameters")
        del base_model
        return snap
    snap = ParameterSnapshot(None, device=device)
    for name, p in params:
        t = base.load(name, device)
        wide = torch.promote_types(t.dtype, p.dtype)
        snap.data[name] = t.to(wide, copy=True).contiguous()
        snap.param_dtypes[name] = p.dtype
        snap.shards[name] = shard_info(p)
    base.close()
    return snap


def run_model_metrics(
    computers: list[MetricComputer],
    base: Checkpoint,
    tuned_dir: str | Path,
    prompts: list[str],
    device: str,
    max_tokens: int,
) -> dict[str, float]:
    """Load TUNED, snapshot BASE, and run ``computers`` with the prompts as the batch."""
    model, tokenizer = load_model(tuned_dir, device)
    batch = tokenize(tokenizer, prompts, max_tokens)
    old = base_snapshot(base, model, device)
    live = ParameterSnapshot.live(model)
    delta = old.compute_delta(live)
    context = AnalysisContext(
        model=model, inputs=batch, attention_mask=batch["attention_mask"], step=0
    )
    out: dict[str, float] = {}
    for computer in computers:
        with torch.no_grad():
            raw = computer.compute(
                delta=delta, old_snapshot=old, current_snapshot=live, context=context
            )
        out.update({str(k): float(v) for k, v in (raw or {}).items()})
    return out
