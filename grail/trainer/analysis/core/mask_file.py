"""Changed sets saved to disk: the criterion, the file format, a streaming writer, a lazy reader.

A *mask file* holds, for every parameter, the set of entries that a fine-tune changed under a
:class:`ChangeCriterion`. It is a safetensors file (readable by ``safetensors`` and by this module,
which needs no extra package) with one 1-D ``uint8`` tensor per parameter, named as the
parameter: its ``ceil(numel / 8)`` bytes are the flags, bit ``i % 8`` of byte ``i // 8`` for
flat entry ``i`` (:mod:`.bits`; ``numpy.unpackbits(b, bitorder="little")[:numel]`` reads it
too). The safetensors metadata (strings only) records:

==================  =============================================================================
metadata key        content
==================  =============================================================================
``format``          ``grail-analysis mask`` (what :func:`load_mask` checks first)
``format_version``  ``1``
``criterion``       ``exact``, ``threshold``, ``keep_ratio`` or ``bf16_view``
``criterion_value`` the threshold or kept fraction (``repr`` of a float), empty otherwise
``shapes``          JSON ``{name: [dims]}``, in file order
``counts``          JSON ``{name: changed entries}``
``num_params``      entries in all parameters; ``changed`` the changed ones;
                    ``density`` = changed / num_params
``inputs``          JSON ``{"base": {...}, "tuned": {...}}``: path, format and each file's SHA-256
``created_by``      ``grail-analysis`` and its version
==================  =============================================================================

:class:`MaskWriter` streams: flags arrive chunk by chunk, tensor by tensor, are packed and
appended to a scratch file next to the target; :meth:`MaskWriter.finish` then writes the header
(whose counts are only known at the end) and the data, and renames the result into place. Memory
is one chunk.

:class:`SavedMask` (from :func:`load_mask`) reads and checks only the header when it is opened;
a parameter's bytes are read the first time they are needed and then kept packed (one bit per
entry). ``mask[name]`` is the boolean tensor in the parameter's shape.

Decisions where the design is silent:

* ``exact`` and ``threshold 0`` are the same set (``|Δ| > 0`` in float32 is exact: it is zero
  iff the stored values are equal); the file says which was asked for.
* A file whose header is not a grail-analysis mask, or whose tensors do not have the packed size
  of the recorded shapes, is a :class:`MaskFileError` (a ``ValueError`` with a one-line message)
  when it is opened, not when a tensor is first read.
* :meth:`SavedMask.check_shapes` (for the online comparison) requires every parameter it is given
  to be in the mask with the same shape; parameters of the mask that it is not given (frozen ones
  under ``trainable_only``, say) are returned, not an error.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> writer = MaskWriter(path, {"w": (2, 3)}, ChangeCriterion("threshold", 1e-6))
    >>> writer.write("w", torch.tensor([True, False, False]))
    >>> writer.write("w", torch.tensor([False, True, True]))
    >>> writer.finish()["density"]
    0.5
    >>> mask = load_mask(path)
    >>> mask.criterion, mask.shapes
    (ChangeCriterion(kind='threshold', value=1e-06), {'w': (2, 3)})
    >>> mask["w"].tolist()
    [[True, False, False], [False, True, True]]
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bits import pack_bits, packed_size, popcount, unpack_bits

__all__ = [
    "CRITERIA",
    "FORMAT",
    "ChangeCriterion",
    "MaskFileError",
    "MaskWriter",
    "SavedMask",
    "load_mask",
]

FORMAT = "grail-analysis mask"
FORMAT_VERSION = "1"
#: Kinds of changed sets: stored value differs, |Δ| > T, the top fraction of |Δ| (exact global
#: top-k), bf16-rounded value differs.
CRITERIA = ("exact", "threshold", "keep_ratio", "bf16_view")
_MAX_HEADER = 100 << 20


class MaskFileError(ValueError):
    """A mask file that cannot be written, read or used; the message is one line."""


@dataclass(frozen=True)
class ChangeCriterion:
    """Which entries count as changed: ``kind`` in :data:`CRITERIA`; ``value`` is the threshold
    (``threshold``) or the kept fraction in (0, 1] (``keep_ratio``), None otherwise."""

    kind: str
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in CRITERIA:
            raise MaskFileError(f"unknown changed-set criterion {self.kind!r} (one of {CRITERIA})")
        v = self.value
        if self.kind == "threshold":
            if v is None or not math.isfinite(v) or v < 0:
                raise MaskFileError(f"a threshold must be a finite number >= 0, got {v!r}")
        elif self.kind == "keep_ratio":
            if v is None or not 0.0 < v <= 1.0:
                raise MaskFileError(f"a keep ratio must be in (0, 1], got {v!r}")
        elif v is not None:
            raise MaskFileError(f"criterion {self.kind!r} takes no value, got {v!r}")
        if v is not None:
            object.__setattr__(self, "value", float(v) + 0.0)  # -0.0 is 0.0

    def describe(self) -> str:
        """In words: ``"|dW| > 1e-06"``, ``"stored value differs"``, ..."""
        if self.kind == "threshold":
            return f"|dW| > {self.value:g}"
        if self.kind == "keep_ratio":
            return f"largest {self.value:.4g} of |dW| (exact global top-k)"
        return "stored value differs" if self.kind == "exact" else "bf16-rounded value differs"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "text": self.describe()}


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class MaskWriter:
    """Write a mask file tensor by tensor (see module docstring).

    Args:
        path: the ``.safetensors`` file to write (replaced if it exists).
        shapes: ``name -> shape`` of every parameter, in the order they will be written.
        criterion: what the flags mean.
    """

    def __init__(
        self, path: str | Path, shapes: Mapping[str, Sequence[int]], criterion: ChangeCriterion
    ) -> None:
        self.path = Path(path)
        self.shapes = {str(n): tuple(int(d) for d in s) for n, s in shapes.items()}
        self.criterion = criterion
        self.counts: dict[str, int] = {}
        self._order = list(self.shapes)
        self._index = 0
        self._seen = 0
        self._pending = torch.zeros(0, dtype=torch.bool)
        self._scratch = self.path.with_name(self.path.name + ".partial-data")
        try:
            self._fh = open(self._scratch, "wb")  # noqa: SIM115 - closed in finish/abort
        except OSError as err:
            raise MaskFileError(f"cannot write {self._scratch}: {err.strerror or err}") from err
        self._skip_empty()

    def _numel(self, name: str) -> int:
        return math.prod(self.shapes[name])

    def _skip_empty(self) -> None:
        while self._index < len(self._order) and self._numel(self._order[self._index]) == 0:
            self.counts[self._order[self._index]] = 0
            self._index += 1

    def write(self, name: str, flags: torch.Tensor) -> None:
        """Append the flags of the next entries of ``name`` (the tensor being written)."""
        if self._index >= len(self._order) or name != self._order[self._index]:
            expected = self._order[self._index] if self._index < len(self._order) else "nothing"
            raise MaskFileError(f"mask writer got {name!r} but expects {expected!r} next")
        flat = flags.reshape(-1).to("cpu", torch.bool)
        numel = self._numel(name)
        if self._seen + flat.numel() > numel:
            raise MaskFileError(f"mask writer got more than {numel} flags for {name!r}")
        self._seen += flat.numel()
        self.counts[name] = self.counts.get(name, 0) + int(flat.sum())
        flat = torch.cat([self._pending, flat]) if self._pending.numel() else flat
        last = self._seen == numel
        body = flat.numel() if last else flat.numel() // 8 * 8
        self._fh.write(pack_bits(flat[:body]).numpy().tobytes())
        self._pending = flat[body:].clone()
        if last:
            self._index += 1
            self._seen = 0
            self._skip_empty()

    def finish(self, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write the file; returns its metadata (``density``, ``changed``, ... as numbers)."""
        if self._index < len(self._order):
            self.abort()
            raise MaskFileError(f"mask writer closed before {self._order[self._index]!r} was "
                                "complete")
        self._fh.close()
        num_params = sum(self._numel(n) for n in self._order)
        changed = sum(self.counts.values())
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "criterion": self.criterion.kind,
            "criterion_value": "" if self.criterion.value is None else repr(self.criterion.value),
            "shapes": _json({n: list(s) for n, s in self.shapes.items()}),
            "counts": _json(self.counts),
            "num_params": str(num_params),
            "changed": str(changed),
            "density": repr(changed / num_params if num_params else math.nan),
            "inputs": _json(dict(inputs or {})),
            "created_by": _creator(),
        }
        header: dict[str, Any] = {"__metadata__": meta}
        offset = 0
        for n in self._order:
            size = packed_size(self._numel(n))
            header[n] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
            offset += size
        text = _json(header).encode()
        text += b" " * (-len(text) % 8)
        target = self.path.with_name(self.path.name + ".partial")
        try:
            with open(target, "wb") as out, open(self._scratch, "rb") as data:
                out.write(struct.pack("<Q", len(text)) + text)
                while block := data.read(1 << 20):
                    out.write(block)
            os.replace(target, self.path)
        except OSError as err:
            raise MaskFileError(f"cannot write {self.path}: {err.strerror or err}") from err
        finally:
            self._scratch.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
        return {**meta, "num_params": num_params, "changed": changed,
                "density": float(meta["density"])}

    def abort(self) -> None:
        """Drop what was written (nothing is left at ``path``)."""
        self._fh.close()
        self._scratch.unlink(missing_ok=True)


def _creator() -> str:
    try:
        from importlib.metadata import version

        return f"grail-analysis {version('grail-analysis')}"
    except Exception:  # not installed as a distribution (a source checkout)
        return "grail-analysis"


class SavedMask(Mapping[str, torch.Tensor]):
    """A mask file, opened lazily: ``mask[name]`` is a boolean tensor in the parameter's shape.

    Attributes: ``path``, ``criterion``, ``shapes`` (name -> shape, file order), ``counts``
    (changed entries per parameter), ``num_params``, ``changed``, ``density``, ``inputs``,
    ``metadata`` (the raw strings).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta, entries, self._data_start = _read_header(self.path)
        where = f"mask file {self.path}"
        try:
            value = meta.get("criterion_value", "")
            self.criterion = ChangeCriterion(meta["criterion"], float(value) if value else None)
            shapes = json.loads(meta["shapes"]).items()
            self.shapes = {n: tuple(int(d) for d in s) for n, s in shapes}
            self.counts = {n: int(c) for n, c in json.loads(meta.get("counts", "{}")).items()}
            self.num_params = int(meta["num_params"])
            self.changed = int(meta["changed"])
            self.density = float(meta["density"])
            self.inputs = json.loads(meta.get("inputs", "{}"))
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise MaskFileError(f"{where} has malformed metadata ({type(err).__name__}: "
                                f"{err})") from None
        self.metadata = dict(meta)
        self._offsets: dict[str, tuple[int, int]] = {}
        for n, shape in self.shapes.items():
            info = entries.get(n)
            size = packed_size(math.prod(shape))
            ok = (isinstance(info, dict) and info.get("dtype") == "U8"
                  and info.get("shape") == [size] and len(info.get("data_offsets", ())) == 2
                  and info["data_offsets"][1] - info["data_offsets"][0] == size)
            if not ok:
                raise MaskFileError(f"{where}: tensor {n!r} is missing or is not {size} packed "
                                    f"bytes for shape {list(shape)}")
            self._offsets[n] = (int(info["data_offsets"][0]), size)
        extra = sorted(set(entries) - set(self.shapes))
        if extra:
            raise MaskFileError(f"{where} holds tensors without a recorded shape: {extra[:3]}")
        end = max((o + s for o, s in self._offsets.values()), default=0)
        if self._data_start + end > self.path.stat().st_size:
            raise MaskFileError(f"{where} is truncated")
        self._packed: dict[str, torch.Tensor] = {}

    # --- Mapping ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        return unpack_bits(self.packed(name), math.prod(shape)).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return (f"SavedMask({str(self.path)!r}, {self.criterion.describe()}, "
                f"{len(self)} tensors, density {self.density:.4g})")

    # --- packed access ---------------------------------------------------------------------------
    def packed(self, name: str) -> torch.Tensor:
        """The stored bytes of ``name`` (uint8, CPU), read on first use and then kept."""
        t = self._packed.get(name)
        if t is None:
            offset, size = self._offsets[name]
            try:
                raw = np.fromfile(self.path, dtype=np.uint8, count=size,
                                  offset=self._data_start + offset)
            except OSError as err:
                raise MaskFileError(f"cannot read {name!r} from {self.path}: "
                                    f"{err.strerror or err}") from err
            if raw.size != size:
                raise MaskFileError(f"mask file {self.path} is truncated at {name!r}")
            t = self._packed[name] = torch.from_numpy(raw)
        return t

    def flags(self, name: str, start: int, n: int, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
        """Boolean flags of the flat entries ``start .. start + n - 1`` of ``name`` on
        ``device`` (only the bytes that cover them are moved)."""
        packed = self.packed(name)
        lo, hi = start // 8, packed_size(start + n)
        return unpack_bits(packed[lo:hi].to(device), n, start - 8 * lo)

    def count(self, name: str) -> int:
        """Changed entries of ``name`` (from the stored bits)."""
        return popcount(self.packed(name))

    def loaded_bytes(self) -> int:
        """Bytes held in memory: the parameters read so far, one bit per entry."""
        return sum(t.numel() for t in self._packed.values())

    def check_shapes(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """Raise :class:`MaskFileError` unless every given parameter is in the mask with the same
        shape; returns the mask's parameters that were not given (they are not compared)."""
        missing = [n for n in shapes if n not in self.shapes]
        wrong = [f"{n} {list(s)} vs {list(self.shapes[n])} in the mask"
                 for n, s in shapes.items()
                 if n in self.shapes and tuple(int(d) for d in s) != self.shapes[n]]
        if missing or wrong:
            what = []
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                what.append(f"{len(missing)} parameters are not in it ({', '.join(missing[:3])}"
                            f"{more})")
            if wrong:
                more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
                what.append(f"{len(wrong)} shapes differ ({'; '.join(wrong[:3])}{more})")
            raise MaskFileError(f"mask file {self.path} does not fit the model: "
                                + "; ".join(what))
        return [n for n in self.shapes if n not in shapes]


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, Any], int]:
    """``(metadata, tensor entries, data start)`` of a mask file; MaskFileError otherwise."""
    if not path.is_file():
        raise MaskFileError(f"mask file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= size <= _MAX_HEADER:
                raise MaskFileError(f"{path} is not a safetensors mask file (bad header size)")
            header = json.loads(fh.read(size))
    except OSError as err:
        raise MaskFileError(f"cannot read mask file {path}: {err.strerror or err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MaskFileError(f"{path} is not a safetensors mask file (header is not JSON)"
                            ) from None
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MaskFileError(f"{path} is not a grail-analysis mask file (write one with "
                            "grail-analysis mask BASE TUNED --out FILE.safetensors)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MaskFileError(f"mask file {path} has format version "
                            f"{meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    return meta, header, 8 + size


def load_mask(path: str | Path) -> SavedMask:
    """Open a mask file written by ``grail-analysis mask`` (header only; see :class:`SavedMask`).

    Raises:
        MaskFileError: the file is missing, is not a mask file, or is damaged.
    """
    return SavedMask(path)
