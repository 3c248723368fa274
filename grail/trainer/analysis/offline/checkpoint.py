"""Saved checkpoints as lazily loaded tensors: discovery, headers, one tensor at a time.

:func:`open_checkpoint` accepts a Hugging Face model directory (``model.safetensors``, a sharded
``model.safetensors.index.json``, ``pytorch_model.bin`` or its sharded index) or a single
``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file. It reads only the headers: names, shapes
and dtypes (:class:`TensorSpec`).

:meth:`Checkpoint.load` reads one tensor.
Safetensors are memory-mapped (``safetensors.safe_open``); ``.pt``/``.bin`` files are opened with
``torch.load(mmap=True, weights_only=True)``. A memory map keeps every page it touched resident
for as long as it is open, so maps are short-lived: a safetensors file is opened anew for each
tensor (re-reading its header costs well under a millisecond) and a torch file, whose index is
slower to unpickle, after :data:`RECYCLE_BYTES` have been read through it. Resident memory stays
at a few tensors, not the file. Legacy (non-zip) ``torch.save`` files cannot be mapped and are
loaded whole, with a note.

A torch file that ``torch.load`` rejects is described by its first bytes (empty, text, a
safetensors file under a torch suffix, a damaged zip archive or pickle) rather than by torch's
message, which is several paragraphs long or, for text, a bare number.

Example:
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_file({"a.weight": torch.ones(2, 3), "step": torch.tensor([1])}, path)
    >>> ckpt = open_checkpoint(path)
    >>> sorted((s.name, s.shape, s.dtype) for s in ckpt.specs.values())
    [('a.weight', (2, 3), torch.float32), ('step', (1,), torch.int64)]
    >>> ckpt.load("a.weight").sum().item()
    6.0
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RECYCLE_BYTES",
    "Checkpoint",
    "CheckpointError",
    "TensorSpec",
    "check_labels",
    "number_repeats",
    "open_checkpoint",
]

logger = logging.getLogger(__name__)

#: Bytes read through one memory map of a torch file before it is closed and reopened.
RECYCLE_BYTES = 16 << 20

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "BOOL": "bool",
}  # fmt: skip
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of its messages
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # first bytes of torch.save files (new, legacy)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or compared; the message is one line for the user."""


@dataclass(frozen=True)
class TensorSpec:
    """What a checkpoint header says about one tensor (``dtype`` None: unknown to torch)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    dtype_name: str
    file: Path
    offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        size = torch.empty((), dtype=self.dtype).element_size() if self.dtype else 1
        return self.numel * size

    @property
    def is_floating(self) -> bool:
        return self.dtype is not None and self.dtype.is_floating_point


def _torch_dtype(name: str) -> torch.dtype | None:
    found = getattr(torch, name, None)
    return found if isinstance(found, torch.dtype) else None


def _safetensors_header(path: Path) -> dict[str, TensorSpec]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= size <= 100 << 20:
                what = "a torch.save zip archive: rename it to .pt" if raw.startswith(_ZIP) else (
                    "bad header size")
                raise CheckpointError(f"{path} is not a safetensors file ({what})")
            header = json.loads(fh.read(size))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from err
    specs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            tname = _ST_DTYPES.get(info["dtype"], info["dtype"].lower())
            shape = tuple(int(d) for d in info["shape"])
            offset = int(info["data_offsets"][0])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{path} has a malformed header entry for {name!r}") from err
        specs[name] = TensorSpec(name, shape, _torch_dtype(tname), tname, path, offset)
    return dict(sorted(specs.items(), key=lambda kv: kv[1].offset))


def _torch_state(path: Path, mmap: bool) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    except Exception as err:  # unpickling errors have no common base class
        if mmap and isinstance(err, RuntimeError) and "mmap" in str(err) and _looks_pickled(path):
            raise  # legacy format: the caller falls back to a full load
        raise CheckpointError(_not_torch(path, err)) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping) and len(obj) == 1:
                obj = obj[key]
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = _ANSI.sub("", str(err)).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _head(path: Path, size: int = 64) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


def _looks_pickled(path: Path) -> bool:
    """A pickle (protocol 2+) as legacy ``torch.save`` writes; worth a full, unmapped load."""
    return _head(path, 2)[:1] == _PICKLE


def _not_torch(path: Path, err: BaseException) -> str:
    """One line saying what ``path`` is instead of a torch checkpoint.

    torch's own messages are several paragraphs, or a bare memo index ("101") when the pickle
    reader meets text; the first bytes of the file usually say more.
    """
    head = _head(path)
    if "WeightsUnpickler error" in str(err):  # a pickled module or other Python objects
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = found[1] if found else _first_line(err)
        return (f"{path} holds pickled Python objects, not only tensors (torch.load(weights_only="
                f"True) refused {what}); save the model's state_dict() instead")
    if not head:
        reason = "the file is empty"
    elif head.startswith(_ZIP):
        detail = _first_line(err, 120).split(". ")[0].rsplit(": ", 1)[-1]
        reason = f"a zip archive that is truncated or not written by torch.save ({detail})"
    elif head.startswith(_PICKLE):
        reason = f"a damaged pickle ({type(err).__name__}: {_first_line(err, 100)})"
    elif head[8:9] == b"{":
        reason = "it is a safetensors file: rename it to .safetensors"
    else:
        text = head[:32].decode("utf-8", errors="replace")
        if all(c.isprintable() or c in "\t\r\n" for c in text[:-1]):  # last: a cut character
            reason = f"it is text starting {text.splitlines()[0]!r}"
        else:
            reason = "it is neither a zip archive (torch.save) nor a pickle"
    return f"{path} is not a torch checkpoint (torch.load failed: {reason})"


def _discover(path: Path) -> tuple[str, list[Path]]:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors", [path]
        if path.suffix in _TORCH_SUFFIXES:
            return "torch", [path]
        raise CheckpointError(f"{path}: unsupported file type (expected .safetensors, .pt, .bin)")
    for fmt, index, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("torch", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
                files = sorted({str(f) for f in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"cannot read the weight index {path / index}") from err
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise CheckpointError(f"{path / index} lists missing shard files: {missing[:3]}")
            return fmt, [path / f for f in files]
        if (path / single).is_file():
            return fmt, [path / single]
    raise CheckpointError(
        f"no weights found in {path} (expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin)"
    )


class Checkpoint:
    """The tensors of a saved checkpoint, described by their headers and loaded on demand."""

    def __init__(self, path: Path, fmt: str, files: list[Path]) -> None:
        self.path = path
        self.format = fmt
        self.files = files
        self.notes: list[str] = []
        self.specs: dict[str, TensorSpec] = {}
        self._open: tuple[Path, Any] | None = None
        self._read = 0
        self._whole: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            found = _safetensors_header(f) if fmt == "safetensors" else self._torch_specs(f)
            dup = next((n for n in found if n in self.specs), None)
            if dup is not None:
                raise CheckpointError(f"tensor {dup!r} appears in two shards of {path}")
            self.specs.update(found)
        if not self.specs:
            raise CheckpointError(f"{path} holds no tensors")

    def _torch_specs(self, f: Path) -> dict[str, TensorSpec]:
        state = self._torch_handle(f)
        specs = {
            n: TensorSpec(n, tuple(t.shape), t.dtype, str(t.dtype).removeprefix("torch."), f)
            for n, t in state.items()
        }
        del state
        return specs

    def _torch_handle(self, f: Path) -> dict[str, torch.Tensor]:
        if f in self._whole:
            return self._whole[f]
        try:
            return _torch_state(f, mmap=True)
        except RuntimeError:
            self.notes.append(f"{f.name} is a legacy torch.save file that cannot be memory-mapped; "
                              "it was loaded whole")
            self._whole[f] = _torch_state(f, mmap=False)
            return self._whole[f]

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def load(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, read from its file (memory-mapped where the format allows)."""
        spec = self.specs[name]
        if (
            self._open is None
            or self._open[0] != spec.file
            or self._read >= RECYCLE_BYTES
            or self.format == "safetensors"
        ):
            self.close()
            self._open = (spec.file, self._handle(spec.file))
            self._read = 0
        self._read += spec.nbytes
        handle = self._open[1]
        try:
            t = handle.get_tensor(name) if self.format == "safetensors" else handle[name]
        except Exception as err:  # a truncated or corrupt file surfaces only here
            raise CheckpointError(f"cannot read tensor {name!r} from {spec.file}: "
                                  f"{_first_line(err)}") from err
        return t.to(device) if t.device != torch.device(device) else t

    def _handle(self, f: Path) -> Any:
        if self.format == "torch":
            return self._torch_handle(f)
        try:
            from safetensors import safe_open
        except ImportError as err:
            raise CheckpointError(
                f"reading {f.name} needs the safetensors package: "
                "pip install 'grail-analysis[hf]' (or pip install safetensors)"
            ) from err
        try:
            return safe_open(str(f), framework="pt")
        except Exception as err:
            raise CheckpointError(f"cannot open {f}: {_first_line(err)}") from err

    def close(self) -> None:
        """Drop the open file (tensors already returned stay valid)."""
        self._open = None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Find the weight files of ``path`` and read their headers (see module docstring)."""
    path = Path(path)
    fmt, files = _discover(path)
    return Checkpoint(path, fmt, files)


def check_labels(given: Sequence[str], count: int, what: str) -> list[str]:
    """``given`` as a list when it names each of ``count`` ``what`` once, distinctly and not
    blank; else one :class:`CheckpointError` that says what to change.

    >>> check_labels(["a", "b"], 2, "runs")
    ['a', 'b']
    """
    if len(given) != count:
        raise CheckpointError(f"--labels has {len(given)} labels for {count} {what}; give one "
                              f"label per {what.removesuffix('s')}")
    for label in given:
        if not label.strip():
            raise CheckpointError("--labels has an empty label")
        if list(given).count(label) > 1:
            raise CheckpointError(f"--labels has {label!r} twice; labels must be distinct")
    return list(given)


def number_repeats(labels: Sequence[str]) -> list[str]:
    """``labels`` with the second and later copies of a label numbered.

    >>> number_repeats(["a", "b", "a"])
    ['a', 'b', 'a #2']
    """
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out
