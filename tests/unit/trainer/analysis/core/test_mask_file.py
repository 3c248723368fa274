"""Bit-packed sets and mask files: numpy's layout, round trips, lazy reads, one-line errors."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from grail.trainer.analysis import MaskFileError, SavedMask, load_mask
from grail.trainer.analysis.core.bits import pack_bits, packed_size, popcount, unpack_bits
from grail.trainer.analysis.core.mask_file import ChangeCriterion, MaskWriter
from grail.trainer.analysis.metrics.mask_overlap import pack_bits as overlap_pack_bits

SHAPES = {"a.weight": (7, 13), "empty": (0, 4), "b.bias": (1,), "c.weight": (3, 5, 11)}


def _flags(seed: int = 0, density: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.random(s) < density for n, s in SHAPES.items()}


def _write(path, flags, criterion=None, chunks=(5, 1, 17, 3)):
    """Write ``flags`` in chunks of uneven sizes (not multiples of 8)."""
    writer = MaskWriter(path, SHAPES, criterion or ChangeCriterion("threshold", 1e-6))
    for name, f in flags.items():
        flat, pos, k = torch.from_numpy(f.reshape(-1)), 0, 0
        while pos < flat.numel():
            n = chunks[k % len(chunks)]
            writer.write(name, flat[pos : pos + n])
            pos, k = pos + n, k + 1
    return writer.finish({"base": {"path": "b"}, "tuned": {"path": "t"}})


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 1001])
def test_pack_bits_is_numpy_little_bit_order(n):
    flags = np.random.default_rng(n).random(n) < 0.4
    packed = pack_bits(torch.from_numpy(flags))
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n)
    assert packed.numpy().tobytes() == np.packbits(flags, bitorder="little").tobytes()
    assert popcount(packed) == int(flags.sum())


def test_pack_bits_matches_the_mask_overlap_layout():
    flags = torch.rand(1003, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(pack_bits(flags), overlap_pack_bits(flags.to(torch.uint8)))


def test_unpack_bits_reads_any_range():
    flags = np.random.default_rng(2).random(203) < 0.5
    packed = pack_bits(torch.from_numpy(flags))
    for start, n in [(0, 203), (1, 7), (5, 100), (8, 8), (13, 0), (200, 3), (7, 1)]:
        assert unpack_bits(packed, n, start).tolist() == flags[start : start + n].tolist()
    with pytest.raises(IndexError):
        unpack_bits(packed, 10, 200)


def test_round_trip_in_uneven_chunks(tmp_path):
    flags = _flags()
    path = tmp_path / "m.safetensors"
    info = _write(path, flags)
    total = sum(f.size for f in flags.values())
    changed = sum(int(f.sum()) for f in flags.values())
    assert info["changed"] == changed and info["num_params"] == total
    assert info["density"] == changed / total
    mask = load_mask(path)
    assert isinstance(mask, SavedMask) and list(mask) == list(SHAPES)
    assert mask.shapes == SHAPES and mask.criterion == ChangeCriterion("threshold", 1e-6)
    assert (mask.num_params, mask.changed, mask.density) == (total, changed, changed / total)
    assert mask.inputs == {"base": {"path": "b"}, "tuned": {"path": "t"}}
    for name, f in flags.items():
        got = mask[name]
        assert got.dtype == torch.bool and tuple(got.shape) == f.shape
        assert np.array_equal(got.numpy(), f)
        assert mask.count(name) == mask.counts[name] == int(f.sum())
        for start, n in [(0, f.size), (3, max(0, f.size - 5)), (f.size // 2, f.size // 3)]:
            flat = f.reshape(-1)[start : start + n]
            assert mask.flags(name, start, n).tolist() == flat.tolist()


def test_the_file_is_plain_safetensors(tmp_path):
    from safetensors import safe_open

    flags = _flags(3)
    path = tmp_path / "m.safetensors"
    _write(path, flags, ChangeCriterion("bf16_view"))
    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata()
        assert meta["format"] == "grail-analysis mask" and meta["criterion"] == "bf16_view"
        assert json.loads(meta["shapes"]) == {n: list(s) for n, s in SHAPES.items()}
        for name, f in flags.items():
            raw = fh.get_tensor(name)
            assert raw.dtype == np.uint8 and raw.shape == (packed_size(f.size),)
            unpacked = np.unpackbits(raw, bitorder="little")[: f.size].reshape(f.shape)
            assert np.array_equal(unpacked.astype(bool), f)


def test_bits_are_read_lazily_and_kept_packed(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path, _flags(4))
    mask = load_mask(path)
    assert mask.loaded_bytes() == 0
    mask["a.weight"]
    assert mask.loaded_bytes() == packed_size(7 * 13)
    mask["a.weight"]
    assert mask.loaded_bytes() == packed_size(7 * 13)


def test_a_writer_that_fails_leaves_no_file(tmp_path):
    path = tmp_path / "m.safetensors"
    writer = MaskWriter(path, {"w": (4,)}, ChangeCriterion("exact"))
    with pytest.raises(MaskFileError, match="expects 'w'"):
        writer.write("v", torch.ones(4, dtype=torch.bool))
    with pytest.raises(MaskFileError, match="more than 4"):
        writer.write("w", torch.ones(5, dtype=torch.bool))
    writer.write("w", torch.ones(2, dtype=torch.bool))
    with pytest.raises(MaskFileError, match="before 'w' was complete"):
        writer.finish()
    assert list(tmp_path.iterdir()) == []


def _rewrite_header(path, change):
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda h: h["__metadata__"].pop("format"), "is not a grail-analysis mask file"),
        (lambda h: h["__metadata__"].update(format_version="9"), "format version '9'"),
        (lambda h: h.pop("b.bias"), "'b.bias' is missing"),
        (lambda h: h["a.weight"].update(dtype="F32"), "'a.weight' is missing or is not"),
        (lambda h: h["__metadata__"].update(shapes="[1"), "malformed metadata"),
        (lambda h: h["__metadata__"].update(criterion="magic"), "unknown changed-set criterion"),
    ],
)
def test_damaged_files_fail_with_one_line(tmp_path, damage, message):
    path = tmp_path / "m.safetensors"
    _write(path, _flags(5))
    _rewrite_header(path, damage)
    with pytest.raises(MaskFileError, match=message) as info:
        load_mask(path)
    assert "\n" not in str(info.value)


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(MaskFileError, match="does not exist"):
        load_mask(tmp_path / "nope.safetensors")
    path = tmp_path / "m.safetensors"
    _write(path, _flags(6))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(MaskFileError, match="truncated"):
        load_mask(path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, tmp_path / "weights.safetensors")
    with pytest.raises(MaskFileError, match="not a grail-analysis mask file"):
        load_mask(tmp_path / "weights.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, not a mask at all")
    with pytest.raises(MaskFileError, match="not a safetensors mask file"):
        load_mask(tmp_path / "text.safetensors")


def test_check_shapes_names_what_does_not_fit(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path, _flags(7))
    mask = load_mask(path)
    assert mask.check_shapes({"a.weight": (7, 13), "b.bias": [1]}) == ["empty", "c.weight"]
    with pytest.raises(MaskFileError, match=r"1 parameters are not in it \(x\)"):
        mask.check_shapes({"a.weight": (7, 13), "x": (2,)})
    with pytest.raises(MaskFileError, match=r"a.weight \[13, 7\] vs \[7, 13\]"):
        mask.check_shapes({"a.weight": (13, 7)})


@pytest.mark.parametrize(
    ("kind", "value"),
    [("threshold", -1.0), ("threshold", None), ("threshold", float("nan")), ("keep_ratio", 0.0),
     ("keep_ratio", 1.5), ("exact", 0.1), ("bf16", None)],
)
def test_criteria_are_validated(kind, value):
    with pytest.raises(MaskFileError):
        ChangeCriterion(kind, value)


def test_the_recorded_inputs_survive_the_round_trip(tmp_path):
    digest = hashlib.sha256(b"x").hexdigest()
    path = tmp_path / "m.safetensors"
    writer = MaskWriter(path, {"w": (3,)}, ChangeCriterion("keep_ratio", 0.5))
    writer.write("w", torch.tensor([True, False, True]))
    writer.finish({"base": {"files": [{"file": "f", "sha256": digest}]}})
    mask = load_mask(path)
    assert mask.inputs["base"]["files"][0]["sha256"] == digest
    assert mask.criterion.describe().startswith("largest 0.5 of |dW|")
    assert "density 0.6667" in repr(mask)
