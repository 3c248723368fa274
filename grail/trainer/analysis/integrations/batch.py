"""Getting a batch for forward-pass metrics when the training framework does not hand one out.

:class:`BatchCapture` registers a forward pre-hook on a module and keeps a *reference* (no copy)
to the arguments of its most recent forward that ran with gradients enabled, i.e. a training
forward: generation and evaluation run under ``no_grad`` and are ignored, and so are forwards
made inside :meth:`BatchCapture.paused` (the analysis' own). Keyword arguments that only serve
generation or the loss (``labels``, ``num_items_in_batch``, ``logits_to_keep``, ``use_cache``,
``past_key_values``) are dropped, so the analysis compares every position. With gradient
accumulation the capture is the last micro-batch. Holding the reference keeps that one batch
alive until the next forward.

:func:`tokenize_probe` turns a list of strings into a right-padded batch with an
``attention_mask`` (padded positions are excluded from every comparison).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> capture = BatchCapture().attach(model)
    >>> x = torch.randn(4, 3)
    >>> _ = model(x)
    >>> capture.batch[0] is x
    True
    >>> with torch.no_grad():
    ...     _ = model(torch.randn(1, 3))
    >>> capture.batch[0] is x
    True
    >>> capture.detach()
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["BatchCapture", "tokenize_probe"]

#: Keyword arguments of a captured forward that only make sense for generation or the loss.
DROPPED_KEYS = frozenset(
    {
        "labels",
        "logits_to_keep",
        "num_items_in_batch",
        "num_logits_to_keep",
        "past_key_values",
        "use_cache",
    }
)


class BatchCapture:
    """The inputs of a module's most recent grad-enabled forward (see module docstring).

    ``batch`` is a dict of keyword arguments (a positional first tensor becomes ``input_ids``
    when the others are passed by name), a tuple when the module was called positionally only,
    or None before the first training forward.
    """

    def __init__(self) -> None:
        self.batch: dict[str, Any] | tuple[Any, ...] | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._paused = False

    def attach(self, module: nn.Module) -> BatchCapture:
        """Start capturing forwards of ``module`` (detaching from any previous one)."""
        self.detach()
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        """Remove the hook and release the captured batch."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.batch = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside this block are not captured."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._paused or not torch.is_grad_enabled():
            return
        batch = {k: v for k, v in kwargs.items() if k not in DROPPED_KEYS}
        if args:
            if len(args) > 1 or not batch or not isinstance(args[0], torch.Tensor):
                self.batch = args  # a plain module called positionally
                return
            batch.setdefault("input_ids", args[0])
        self.batch = batch or None


def tokenize_probe(texts: Sequence[str], processing_class: Any) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of ``texts``.

    ``processing_class`` is a tokenizer or a processor with a ``.tokenizer``. Padding is done
    here, with the pad id, else the eos id, else 0, so tokenizers without a pad token work.
    """
    tok = getattr(processing_class, "tokenizer", processing_class)
    if tok is None or not callable(tok):
        raise ValueError(
            "probe_inputs given as strings need a tokenizer: pass processing_class= to the "
            "trainer, or give probe_inputs as a dict of tensors"
        )
    rows = [list(tok(t)["input_ids"]) for t in texts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a probe string tokenized to zero tokens")
    ids_ = (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
    pad = next((i for i in ids_ if isinstance(i, int)), 0)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}
