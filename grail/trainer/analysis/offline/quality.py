"""Forward-pass metrics of the offline diff: the TUNED model on a file of prompts.

The TUNED directory is loaded once with ``transformers`` (``AutoModelForCausalLM``, local files
only, the checkpoint's own dtype); the prompts are encoded with ``AutoTokenizer`` from TUNED or from
the ``--tokenizer`` directory, before any weight is read (:func:`prompt_batch`), so that a
missing or wrong tokenizer fails in seconds, not after the stream. BASE becomes an in-memory
:class:`~grail.trainer.analysis.core.snapshot.ParameterSnapshot` filled tensor by tensor from its
checkpoint (the patching swaps values with it, so it must be real memory), and the computers that
need a model - sparse quality, low-rank quality - run exactly as online with
``ParameterDelta(base, live tuned model)`` and the tokenised prompts as the batch.

Decisions:

* Prompts: one per line, blank lines skipped; tokenised as one right-padded batch truncated to
  ``max_tokens`` tokens per prompt (the metrics cut the batch to ``max_tokens`` positions). A
  tokenizer without a pad token pads with its EOS (or UNK, or id 0) token; padded positions are
  masked out of every comparison.
* A tokenizer is unusable when no prompt encodes to a token other than a special token:
  transformers builds a one-token tokenizer for a directory without tokenizer files instead of
  raising, and the forward-pass metrics would then silently be missing. Some prompts that encode
  to nothing under an otherwise usable tokenizer only draw a warning. Token ids outside the model's
  embedding are an error too (checked against ``vocab_size`` of ``config.json`` before the stream
  and against the loaded model's input embedding after it).
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

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..core.distributed import shard_info
from ..core.snapshot import ParameterSnapshot, collect_parameters
from ..metrics.base import AnalysisContext, MetricComputer
from .checkpoint import Checkpoint, CheckpointError

__all__ = [
    "base_snapshot",
    "check_model_dir",
    "check_token_ids",
    "load_model",
    "load_tokenizer",
    "prompt_batch",
    "read_prompts",
    "run_model_metrics",
    "tokenize",
]

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


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "--prompts needs transformers: pip install 'grail-analysis[hf]'"
        ) from None
    return transformers


def check_model_dir(path: str | Path) -> Path:
    """``path`` if it is a transformers model directory (it has a ``config.json``)."""
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise CheckpointError(f"--prompts needs a transformers model directory; {path} is not one")
    return path


def load_model(path: str | Path, device: str) -> Any:
    """The causal LM of a local transformers directory, in eval mode on ``device``."""
    auto = _transformers().AutoModelForCausalLM
    path = check_model_dir(path)
    try:
        model = auto.from_pretrained(path, local_files_only=True, **_dtype_kwargs())
    except Exception as err:
        raise CheckpointError(f"transformers cannot load {path}: {_line(err)}") from None
    return model.to(device).eval()


def _hint(tokenizer_dir: str | Path | None) -> str:
    if tokenizer_dir is None:
        return "pass --tokenizer DIR with the model's tokenizer"
    return "--tokenizer DIR must hold the model's tokenizer"


def load_tokenizer(tuned: str | Path, tokenizer_dir: str | Path | None = None) -> Any:
    """The tokenizer of ``tokenizer_dir`` if given, else of the TUNED directory."""
    auto = _transformers().AutoTokenizer
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        what = "is not a directory" if Path(tokenizer_dir).exists() else "does not exist"
        raise CheckpointError(f"--tokenizer {tokenizer_dir} {what}")
    path = Path(tokenizer_dir if tokenizer_dir is not None else tuned)
    try:
        return auto.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load a tokenizer from {path} ({_line(err, 120)}); "
                              f"{_hint(tokenizer_dir)}") from None


def _line(err: BaseException, limit: int = 200) -> str:
    """The message on one line (transformers spreads one sentence over several), shortened."""
    text = " ".join(part.strip() for part in str(err).split("\n") if part.strip())
    text = text or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def check_token_ids(
    batch: dict[str, torch.Tensor], rows: int, source: str, tokenizer_dir: str | Path | None
) -> None:
    """Every id of ``batch`` (padding included: it is embedded too) is below ``rows``."""
    ids = batch["input_ids"]
    if ids.numel() and (int(ids.max()) >= rows or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= rows else int(ids.min())
        raise CheckpointError(
            f"the tokenizer of {source} produces token id {bad} but the model has {rows} token "
            f"embeddings; {_hint(tokenizer_dir)}"
        )


def _config_vocab(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        vocab = config.get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def prompt_batch(
    tuned: str | Path,
    prompts: list[str],
    max_tokens: int,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """The prompts encoded for TUNED, checked to be usable (see module docstring)."""
    model_dir = check_model_dir(tuned)
    tokenizer = load_tokenizer(model_dir, tokenizer_dir)
    source = str(tokenizer_dir if tokenizer_dir is not None else model_dir)
    batch = tokenize(tokenizer, prompts, max_tokens)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    real = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special)
    per_prompt = real.sum(dim=1)
    if not bool(per_prompt.any()):
        raise CheckpointError(
            f"{source} has no usable tokenizer: the prompts encode to no tokens (a vocabulary of "
            f"{len(tokenizer)}; are the tokenizer files missing?); {_hint(tokenizer_dir)}"
        )
    if not bool(per_prompt.all()):
        logger.warning("%d of %d prompts encode to no tokens with the tokenizer of %s",
                       int((per_prompt == 0).sum()), len(prompts), source)
    vocab = _config_vocab(model_dir)
    if vocab is not None:
        check_token_ids(batch, vocab, source, tokenizer_dir)
    return batch


def base_snapshot(base: Checkpoint, model: torch.nn.Module, device: str) -> ParameterSnapshot:
    """BASE's values for every parameter of ``model`` (see module docstring)."""
    params = collect_parameters(model)
    missing = [n for n, p in params if n not in base.specs or base.specs[n].shape != p.shape]
    if missing:
        logger.info("BASE names differ from the model's (%s...); loading it with transformers",
                    missing[0])
        base_model = load_model(base.path, device)
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
    batch: dict[str, torch.Tensor],
    device: str,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, float]:
    """Load TUNED, snapshot BASE, and run ``computers`` with ``batch`` (:func:`prompt_batch`)."""
    model = load_model(tuned_dir, device)
    rows = model.get_input_embeddings().num_embeddings
    source = str(tokenizer_dir if tokenizer_dir is not None else tuned_dir)
    check_token_ids(batch, rows, source, tokenizer_dir)
    old = base_snapshot(base, model, device)
    live = ParameterSnapshot.live(model)
    delta = old.compute_delta(live)
    context = AnalysisContext(
        model=model, inputs=batch, attention_mask=batch["attention_mask"], step=0, base=old
    )
    out: dict[str, float] = {}
    for computer in computers:
        with torch.no_grad():
            raw = computer.compute(
                delta=delta, old_snapshot=old, current_snapshot=live, context=context
            )
        out.update({str(k): float(v) for k, v in (raw or {}).items()})
    return out
