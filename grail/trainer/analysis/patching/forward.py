"""Turning whatever the user passed into one forward pass, and its output into logits.

Inputs may be a mapping (``dict``, ``BatchEncoding``), a tensor of input ids, or a tuple/list of
positional arguments. Mapping keys that the model's ``forward`` does not name (``labels``,
``completion_mask``, ``advantages``, ...) are dropped by inspecting its signature; ``labels`` is
always dropped (the analysis needs logits, not a loss), and ``use_cache=False`` is passed where
accepted. A ``forward`` that takes ``**kwargs`` (a wrapper passing them on) also receives
``attention_mask`` and ``position_ids``, dropped again if it refuses them. Tensors are moved to
the device of the model's first parameter.

The batch is cut to at most ``max_tokens`` positions: whole rows first; if a row is longer, one
row, the first with a position the attention mask keeps, from that position on (a causal model's
prefix is self-contained, and left padding is masked out anyway).

Outputs: ``output_fn(output)`` if given, else ``output.logits``, a mapping's ``"logits"``, a
tuple's first tensor that is not a scalar (a forward returning ``(loss, logits)`` works), or the
tensor itself. No tensor of at least one dimension there is a ``TypeError`` describing the
output and how to pass ``output_fn``. Logits are flattened to ``[positions, classes]``
keeping only the positions the attention mask marks as tokens: non-zero, or zero in an
additive floating-point mask (one without a positive entry); a ``[batch, (heads,) seq, seq]``
mask is read on its diagonal and cut along its last two dimensions. With a mask of any other
shape every position is compared, with one warning.

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.ones(4, 10, dtype=torch.long),
    ...          "attention_mask": torch.ones(4, 10), "labels": torch.ones(4, 10)}
    >>> prepared = prepare_inputs(torch.nn.Embedding(2, 3), batch, max_tokens=25)
    >>> isinstance(prepared, str)  # Embedding.forward has no attention_mask parameter
    False
    >>> sorted(prepared.kwargs), prepared.tokens
    (['input'], 20)
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import zero
from ..core.distributed import agree
from ..core.engines import reshard
from ..core.logonce import LogOnce

__all__ = [
    "PreparedInputs",
    "UnusableInputs",
    "agree_across_ranks",
    "logits_from_output",
    "prepare_inputs",
    "run_forward",
]

logger = logging.getLogger(__name__)
_ONCE = LogOnce(logger)  # one warning per model type and refused keys

_ALWAYS_DROP = {"labels"}
_ID_KEYS = ("input_ids", "input", "x", "inputs_embeds")


@dataclass
class PreparedInputs:
    """Arguments of one forward pass and the mask of positions to compare."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # bool [batch, seq], [n] for 1-D ids; None: every position
    tokens: int = 0
    passed_on: tuple[str, ...] = ()  # keys given to a **kwargs forward that does not name them


class UnusableInputs(str):
    """Why inputs that were passed cannot be used (a ``str``): a mistake the caller should hear
    about, unlike a step without inputs."""


_PASSED_ON = ("attention_mask", "position_ids")  # also given to a forward taking **kwargs


def _forward_parameters(model: nn.Module) -> tuple[set[str], bool, set[str]]:
    """The keyword names ``model.forward`` accepts, whether it accepts every key (no
    signature, or no named parameter at all), and the names it gets only through ``**kwargs``
    (:data:`_PASSED_ON`, dropped again if the forward turns them down)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return set(), True, set()
    kinds = {p.kind for p in sig.parameters.values()}
    named = {
        n
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    if not named:
        return named, True, set()
    via_kwargs = set()
    if inspect.Parameter.VAR_KEYWORD in kinds:
        via_kwargs = set(_PASSED_ON) - named
    return named | via_kwargs, False, via_kwargs


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _cut(
    t: Any, rows: slice, cols: slice | None, batch: int, seq: int | None, key: str = ""
) -> Any:
    """Rows ``rows`` and, where the tensor has the sequence dimension (dimension 1), columns
    ``cols`` of a per-row tensor; anything else unchanged. ``attention_mask`` and
    ``position_ids`` broadcast over the batch (first dimension 1) keep their single row, and a
    3-D or 4-D attention mask is cut along its last two dimensions (``[batch, (heads,)
    query, key]``)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    if t.shape[0] == batch:
        t = t[rows]
    elif not (key in _PASSED_ON and t.shape[0] == 1):
        return t
    if cols is None or seq is None:
        return t
    square = key == "attention_mask" and t.dim() >= 3
    for d in range(t.dim() - 2, t.dim()) if square else range(1, min(2, t.dim())):
        if t.shape[d] == seq:
            t = t[(slice(None),) * d + (cols,)]
    return t


def _tokens(values: torch.Tensor) -> torch.Tensor:
    """Which mask values mark a token (see :func:`_positions`)."""
    if values.dtype == torch.bool:
        return values
    if values.is_floating_point() and not bool((values > 0).any()):
        return values == 0  # additive: 0 attends, negative (down to -inf) masks
    return values != 0


def _positions(
    model_type: type, mask: Any, batch: int, seq: int | None, one_per_row: bool = False
) -> torch.Tensor | None:
    """The positions an attention mask marks as tokens, bool ``[batch, seq]`` (``[batch]`` for
    one position per row); None compares every position.

    Values read as the transformers convention has it: non-zero (``True``, ``1``, a packed
    sequence's index) is a token, zero is padding. A floating-point mask without a positive
    entry is additive (added to attention scores): zero is a token, a negative value (down to
    ``-inf``) is padding. The rule looks at one batch only, so every rank reads its own the
    same way. A ``[batch, seq, seq]`` or ``[batch, heads, seq, seq]`` mask (first dimension
    ``batch`` or 1) is read on its diagonal: a position that may attend to itself is a token
    (a mask whose fully masked rows were opened up again, as transformers' legacy SDPA path
    does with ``_unmask_unattended``, reads those padded rows as tokens). A mask of any other
    shape compares every position, with one warning per model type; a 2-D ``[seq, seq]`` mask
    with as many rows as the batch is indistinguishable from ``[batch, seq]``.
    """
    if not isinstance(mask, torch.Tensor):
        return None
    if seq is None and one_per_row and mask.numel() == batch:  # 1-D ids
        return _tokens(mask.reshape(batch))
    if seq is not None and tuple(mask.shape) == (batch, seq):
        return _tokens(mask)
    square = mask.dim() in (3, 4) and mask.shape[-2:] == (seq, seq)
    if seq is not None and square and mask.shape[0] in (batch, 1):
        diagonal = (mask if mask.dim() == 3 else mask[:, 0]).diagonal(dim1=-2, dim2=-1)
        return _tokens(diagonal).expand(batch, seq)
    _ONCE.warning(
        (model_type, "mask shape", mask.dim()),
        "attention_mask of shape %s is neither [batch, seq] nor [batch, (heads,) seq, seq] with "
        "batch, seq = %s, %s: every position is compared, padded ones included",
        list(mask.shape), batch, seq if seq is not None else "?",
    )
    return None


def _window(real: torch.Tensor | None, seq: int, max_tokens: int) -> tuple[slice, slice]:
    """Rows and columns of a batch whose rows are longer than ``max_tokens``: one row, the
    first with a compared position (``real``, from :func:`_positions`), from its first compared
    position on (left padding is not kept: with the attention mask it changes no compared logit
    of a causal model with relative positions), ``max_tokens`` columns at most."""
    row, start = 0, 0
    if real is not None:
        some = real.any(dim=1).nonzero().flatten()
        if some.numel():
            row = int(some[0])
            start = int(real[row].nonzero()[0])
    return slice(row, row + 1), slice(start, min(seq, start + max_tokens))


def prepare_inputs(model: nn.Module, inputs: Any, max_tokens: int) -> PreparedInputs | str:
    """Normalise ``inputs`` for ``model`` (see module docstring); a string says why it can't."""
    if inputs is None:
        return "no inputs were passed"
    device = _model_device(model)
    named_only_by_kwargs: set[str] = set()
    if isinstance(inputs, torch.Tensor):
        args: tuple[Any, ...] = (inputs,)
        kwargs: dict[str, Any] = {}
        ids = inputs
    elif isinstance(inputs, Mapping):
        named, accepts_all, named_only_by_kwargs = _forward_parameters(model)
        kwargs = {
            k: v
            for k, v in inputs.items()
            if k not in _ALWAYS_DROP and (accepts_all or k in named)
        }
        if "input" in named and "input" not in kwargs and "input_ids" in inputs:
            kwargs["input"] = inputs["input_ids"]  # plain nn.Module taking `input`
        if "use_cache" in named:
            kwargs["use_cache"] = False
        args = ()
        ids = next((kwargs[k] for k in _ID_KEYS if isinstance(kwargs.get(k), torch.Tensor)), None)
        if ids is None:
            ids = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if ids is None:
            keys = sorted(map(str, inputs))
            return UnusableInputs(f"inputs mapping has no tensor the model accepts (keys: {keys})")
    elif isinstance(inputs, (tuple, list)) and inputs:
        args = tuple(inputs)
        kwargs = {}
        ids = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if ids is None:
            return UnusableInputs(
                f"inputs {type(inputs).__name__} holds no tensor (pass a tensor of ids)"
            )
    else:
        return UnusableInputs(f"unsupported inputs type {type(inputs).__name__}")
    if ids.dim() == 0 or ids.numel() == 0:
        return UnusableInputs("inputs are empty")

    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    batch = ids.shape[0]
    seq = ids.shape[1] if ids.dim() >= 2 and ids.dtype in (torch.long, torch.int) else None
    embeds = ids.dim() >= 3 and isinstance(mask, torch.Tensor) and mask.dim() >= 2
    if seq is None and embeds and mask.shape[-1] == ids.shape[1]:
        seq = ids.shape[1]  # inputs_embeds [batch, seq, hidden]: the mask has the positions
    real = _positions(type(model), mask, batch, seq, one_per_row=ids.dim() == 1)
    if seq is not None and seq > max_tokens:
        rows, cols = _window(real, seq, max_tokens)
    else:
        per_row = seq if seq is not None else 1
        rows, cols = slice(0, max(1, min(batch, max_tokens // per_row))), None
    args = tuple(_cut(a, rows, cols, batch, seq) for a in args)
    kwargs = {k: _cut(v, rows, cols, batch, seq, key=k) for k, v in kwargs.items()}
    mask = _cut(real, rows, cols, batch, seq) if real is not None else None

    def move(v: Any) -> Any:
        return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v

    args = tuple(move(a) for a in args)
    kwargs = {k: move(v) for k, v in kwargs.items()}
    if mask is not None:
        mask = mask.to(device)
        tokens = int(mask.sum())
    else:
        n_cols = len(range(seq)[cols or slice(None)]) if seq is not None else 1
        tokens = len(range(batch)[rows]) * n_cols
    passed_on = tuple(k for k in _PASSED_ON if k in kwargs and k in named_only_by_kwargs)
    return PreparedInputs(args=args, kwargs=kwargs, mask=mask, tokens=tokens, passed_on=passed_on)


def agree_across_ranks(prepared: PreparedInputs | str) -> PreparedInputs | str:
    """Forwards run only if every rank has usable inputs (one vote; identity alone).

    Analysis forwards of a sharded model are collectives: a rank that skipped them would leave
    the others waiting. Every rank must call this at the same point, usable inputs or not.
    """
    unusable, _ = agree([isinstance(prepared, str)])
    if unusable[0] and not isinstance(prepared, str):
        return "another rank has no usable inputs"
    return prepared


_EXPECTED = (
    "expected logits: a tensor of shape [batch, seq, classes] or [positions, classes] as "
    "output.logits, output['logits'], the first non-scalar tensor of a tuple, or the output "
    "itself; pass output_fn to pick them, e.g. "
    "ModelAnalysisManager.create(config, output_fn=lambda out: out[1])"
)


def _describe(output: Any, depth: int = 0) -> str:
    """Types and tensor shapes of a model output for error messages: ``tuple (0-d tensor,
    tensor[2, 5, 11])`` for a loss and logits."""
    if isinstance(output, torch.Tensor):
        return f"tensor[{', '.join(map(str, output.shape))}]" if output.dim() else "0-d tensor"
    if depth == 0 and isinstance(output, Mapping):
        items = [f"{k!r}: {_describe(v, 1)}" for k, v in list(output.items())[:6]]
        return f"{type(output).__name__} {{{', '.join(items)}{', ...' if len(output) > 6 else ''}}}"
    if depth == 0 and isinstance(output, (tuple, list)):
        items = [_describe(v, 1) for v in output[:6]]
        return f"{type(output).__name__} ({', '.join(items)}{', ...' if len(output) > 6 else ''})"
    return type(output).__name__


def logits_from_output(
    output: Any, output_fn: Callable[[Any], torch.Tensor] | None = None
) -> torch.Tensor:
    """The logits tensor of a model output (see module docstring).

    In a tuple or list, 0-d tensors (a loss) and non-tensors are passed over: a forward that
    returns ``(loss, logits)`` gives its logits. An output without a tensor of at least one
    dimension raises a ``TypeError`` that describes it and says how to pass ``output_fn``.
    """
    if output_fn is not None:
        out = output_fn(output)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"output_fn returned {type(out).__name__}, expected a tensor")
        if out.dim() == 0:
            raise TypeError(
                f"output_fn returned a 0-d tensor (a scalar such as a loss); {_EXPECTED}"
            )
        return out
    if isinstance(output, torch.Tensor):
        out = output
    elif getattr(output, "logits", None) is not None:
        out = output.logits
    elif isinstance(output, Mapping) and "logits" in output:
        out = output["logits"]
    elif isinstance(output, (tuple, list)):
        out = next((o for o in output if isinstance(o, torch.Tensor) and o.dim() > 0), None)
    else:
        out = None
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        raise TypeError(f"cannot find logits in the model output {_describe(output)}; {_EXPECTED}")
    return out


_KEPT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _call(model: nn.Module, prepared: PreparedInputs) -> Any:
    """``model`` on the prepared inputs. A ``**kwargs`` forward that turns down a key it was
    given only through ``**kwargs`` (``TypeError`` naming it, e.g. a wrapper passing them on to
    a module without that parameter) is called again without those keys, which are then left
    out for good (``prepared`` changes), with one warning."""
    try:
        return model(*prepared.args, **prepared.kwargs)
    except TypeError as err:
        refused = [k for k in prepared.passed_on if k in str(err)]
        if not refused:
            raise
        for key in prepared.passed_on:
            prepared.kwargs.pop(key, None)
        _ONCE.warning(
            (type(model), tuple(refused)),
            "%s.forward takes **kwargs but refused %s (%s): analysis forwards run without %s, "
            "so padded positions are read as the model reads them without a mask",
            type(model).__name__, ", ".join(refused), err, ", ".join(prepared.passed_on),
        )
        prepared.passed_on = ()
        zero.release(model)  # ZeRO-3: whatever the failed call gathered
        return model(*prepared.args, **prepared.kwargs)


def run_forward(
    model: nn.Module,
    prepared: PreparedInputs,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One forward pass; logits ``[positions, classes]`` of the unmasked positions, detached.

    float32, bfloat16 and float16 logits keep the dtype the model produced them in (the
    comparisons of :mod:`~grail.trainer.analysis.ops.divergence` upcast one block of rows at a
    time, which is exact: no float32 copy of a half-precision output is made); any other dtype
    is converted to float32.

    Under DeepSpeed ZeRO-3 the whole copies DeepSpeed keeps between forwards (persistent and
    prefetched parameters) are released before the pass, so that its own gathers read the
    partitions as they are, patched or not, and again after it (also when it raises), so that
    training's next forward never sees a patch. Releasing is local; the pass gathers each module's
    parameters as training's forwards do (every rank runs the same forwards).
    """
    zero.release(model)
    try:
        logits = logits_from_output(_call(model, prepared), output_fn)
    finally:
        reshard(model)  # FSDP2: drop unsharded copies of (possibly patched) parameters
        zero.release(model)  # ZeRO-3: likewise for gathered and prefetched copies
    if logits.dim() == 1:
        logits = logits.unsqueeze(-1)
    mask = prepared.mask
    positions = logits.shape[:-1]
    if mask is not None and mask.dim() == 1 and positions == (1, mask.numel()):
        mask = mask.unsqueeze(0)  # 1-D ids, logits [1, n, classes]
    if mask is not None and positions == mask.shape and not bool(mask.all()):
        logits = logits[mask.to(logits.device)]  # a copy: only when some positions are masked
    flat = logits.detach().reshape(-1, logits.shape[-1])
    return flat if flat.dtype in _KEPT_DTYPES else flat.float()
