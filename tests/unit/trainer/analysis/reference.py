"""Independent float64 numpy references used by several test modules."""

from __future__ import annotations

import numpy as np
import torch


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy().reshape(-1)


def delta32(new: torch.Tensor, old: torch.Tensor) -> np.ndarray:
    """The float32 delta the library works on, computed by numpy (exact for bf16/fp16)."""
    n = new.detach().cpu().float().numpy().reshape(-1)
    o = old.detach().cpu().float().numpy().reshape(-1)
    return (n - o).astype(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (NaN quieted), in numpy."""
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    rounded[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def moments(x: np.ndarray, thresholds=()) -> dict:
    """Reference of every StreamingStats field over a float64 array."""
    finite = np.isfinite(x)
    f = x[finite].astype(np.float64)
    out = {
        "count": int(f.size),
        "nonfinite": int((~finite).sum()),
        "sum": float(f.sum()),
        "sum_sq": float((f * f).sum()),
        "sum_abs": float(np.abs(f).sum()),
        "max_abs": float(np.abs(f).max()) if f.size else 0.0,
        "max": float(f.max()) if f.size else 0.0,
        "min": float(f.min()) if f.size else 0.0,
        "le": {float(t): int((np.abs(f) <= t).sum()) for t in thresholds},
    }
    n = max(f.size, 1)
    out["mean"] = out["sum"] / n
    out["std"] = float(f.std()) if f.size else 0.0
    out["norm_l2"] = float(np.sqrt(out["sum_sq"]))
    return out


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Bit-exact copy of every parameter and buffer, plus grads."""
    out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update(
        {f"g:{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    )
    out.update({f"b:{n}": b.clone() for n, b in model.named_buffers()})
    return out


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        ix = (
            x.view(torch.int16)
            if x.element_size() == 2
            else x.view(torch.int32)
            if x.element_size() == 4
            else x
        )
        iy = (
            y.view(torch.int16)
            if y.element_size() == 2
            else y.view(torch.int32)
            if y.element_size() == 4
            else y
        )
        assert torch.equal(ix, iy), f"{k} changed"
