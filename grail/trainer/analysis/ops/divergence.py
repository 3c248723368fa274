r"""How different are two sets of logits: pure tensor functions with exact definitions.

For logits :math:`a, b \in \mathbb{R}^{N \times V}` (one row per compared position, already
restricted to unmasked tokens) and :math:`P = \mathrm{softmax}(a)`, :math:`Q = \mathrm{softmax}(b)`:

* ``kl``: :math:`\frac{1}{N}\sum_i \max(0, \sum_v P_{iv}(\log P_{iv} - \log Q_{iv}))`. With
  :math:`d = a - b`, centred on its mean under :math:`P` (the KL ignores a constant shift of a
  row), a row's KL is :math:`P \cdot d + \log(1 + P \cdot \mathrm{expm1}(-d))`: both terms come
  from the difference itself, so a KL of 1e-9 keeps its relative accuracy (two float32
  log-softmaxes of ~10 would leave only rounding noise). Rows where some
  :math:`d_v < -60` (the product of an underflowed probability and a huge :math:`e^{-d}` would
  be lost) use two log-softmaxes instead. The clamp removes rounding noise around an exact 0.
  On a CPU, whose ``expm1`` is not vectorised, rows with every :math:`-d_v \le 1/2` evaluate it
  as :math:`2\tanh(-d/2) / (1 - \tanh(-d/2))` (within 3 float32 roundings). The reverse KL(Q || P)
  comes from the same pass (:meth:`LogitsReference.kl_sums_both`);
* ``cosine``: :math:`\frac{1}{N}\sum_i \frac{a_i \cdot b_i}{\lVert a_i\rVert\lVert b_i\rVert}`,
  each row's term clamped to [-1, 1] (rounding can carry nearly parallel rows past 1);
* ``mse``: :math:`\frac{1}{NV}\sum_{i,v}(a_{iv} - b_{iv})^2`;
* ``top1_agree``: fraction of rows with :math:`\arg\max a_i = \arg\max b_i`.

Rows where either side has a non-finite logit are excluded and counted (``nonfinite_rows``); with
no finite row left every value is NaN, never a reassuring 1.0. Work is done in row blocks with
buffers allocated once, so the temporaries stay small when the vocabulary is large and no
operation pays for a fresh allocation.

Example:
    >>> import torch
    >>> a = torch.tensor([[2.0, 0.0, -1.0]])
    >>> r = LogitsReference(a).compare(a)
    >>> r["kl"], r["cosine"], r["mse"], r["top1_agree"]
    (0.0, 1.0, 0.0, 1.0)
"""

from __future__ import annotations

import itertools
import math

import torch

from .. import kernels
from ..core.scratch import ScratchBuffers
from .comparisons import Comparisons, means

__all__ = [
    "Comparisons",  # from .comparisons
    "LogitsReference",
    "compare_logits",
    "first_argmax",
    "kl_divergence",
    "means",  # from .comparisons
]

_BLOCK_ELEMENTS = 1 << 18  # logits per row block (1 MiB of float32)


class LogitsReference:
    """Logits of the full update, with what every comparison reuses computed once.

    ``fused`` (a flag, or a :class:`~grail.trainer.analysis.kernels.Use`, whose work is then
    timed for the ``"auto"`` compile policy) computes through the compiled row kernels where
    they apply.
    """

    def __init__(self, logits: torch.Tensor, fused: bool | kernels.Use = False) -> None:
        # the softmax and row sums the kernels replace, timed for the "auto" policy
        with kernels.timed(fused):
            self._prepare(logits, fused)

    def _prepare(self, logits: torch.Tensor, fused: bool | kernels.Use) -> None:
        self.logits = _rows(logits)
        self.fused = fused  # compiled (kernels.reference_rows, compare_rows) where they apply
        self.top1 = first_argmax(self.logits)
        rows = kernels.reference_rows(self.logits) if fused else None
        if rows is not None:
            self.probs, self.mass, self.norm = rows
            self.finite = _finite_rows(self.logits, self.norm)
            self._norm_eager: torch.Tensor | None = None  # computed if an eager compare needs it
            return
        norm = _row_norms(self.logits)
        self.finite = _finite_rows(self.logits, norm)
        self.norm = self._norm_eager = norm.double()
        self.probs = torch.softmax(self.logits, dim=-1)
        self.mass = self.probs.sum(dim=-1).double()  # 1 up to rounding

    def compare_sums(self, other: torch.Tensor) -> list[float]:
        """Per-row sums ``[kl, cosine, squared error, top-1 agreements, rows, nonfinite rows]``.

        Sums, not means, so that comparisons over several batches (ranks) combine exactly;
        :func:`means` turns them into :meth:`compare`'s numbers.
        """
        with kernels.timed(self.fused):  # the work the kernels replace, for the "auto" policy
            return self._compare_sums(other)

    def _compare_sums(self, other: torch.Tensor) -> list[float]:
        other = self._other(other)
        rows = self._fused_rows(other) if self.fused else None
        if rows is None:
            kl, dots, sq, norm_a, norm_b, min_diff, top1 = self._compare_eager(other)
            return self._sums(other, kl, dots, sq, norm_a, norm_b, min_diff, top1)
        kl = rows["pd"] / self.mass + torch.log1p(rows["pe"] / self.mass)
        top1 = first_argmax(other)
        norms = rows["norm_a"], rows["norm_b"]
        return self._sums(other, kl, rows["dots"], rows["sq"], *norms, rows["min_diff"], top1)

    def kl_sums(self, other: torch.Tensor, top1: bool = False) -> list[float]:
        """:meth:`compare_sums` for a caller that reads only the KL (and, with ``top1``, the
        top-1 agreement): the same KL sum, rows and non-finite rows (bit for bit with the eager
        comparison; the agreements exactly), NaN for the other sums. About
        0.6x the work of a full comparison (no dot products or norms; an argmax only with
        ``top1``), always on the
        eager path (the compiled comparison computes every sum in one pass and is no faster
        than this on a CPU; so this work is not timed for the compile policy either). Under a
        compiled reference the KL then differs from :meth:`compare_sums`' in the last float32
        digits of the eager path (relative ~1e-7; ~1e-4 for a KL below 1e-7).
        """
        return self._kl_sums(other, top1, reverse=False)[0]

    def kl_sums_both(self, other: torch.Tensor, top1: bool = False) -> tuple[list[float], ...]:
        """:meth:`kl_sums` of ``other`` (KL(P || Q)), and the same sums for KL(Q || P): the
        reverse KL from the same pass, with no softmax of ``other``. With ``x`` the centred
        ``b - a``, ``Q = P e^x / (1 + w)`` for ``w = P.expm1(x)``, so
        ``KL(Q || P) = (P.x + P.(x expm1(x))) / (1 + w) - log1p(w)``: every term again from the
        difference itself (relative accuracy for a tiny KL), at ~15% more work than the
        forward KL alone. The reverse sums hold NaN for the agreements (they are symmetric: the
        forward sums have them with ``top1``).

        >>> a, b = torch.randn(4, 50), torch.randn(4, 50)
        >>> forward, backward = LogitsReference(a).kl_sums_both(b)
        >>> alone = LogitsReference(b).kl_sums(a)
        >>> abs(backward[0] / alone[0] - 1) < 1e-5, backward[4:] == alone[4:]
        (True, True)
        """
        return self._kl_sums(other, top1, reverse=True)

    def _kl_sums(self, other: torch.Tensor, top1: bool, reverse: bool) -> tuple[list[float], ...]:
        other = self._other(other)
        n, v = other.shape
        rows = _KlRows(n, other.device, reverse)
        diff_buf, *spare = _scratch(n, v, 3 if reverse else 2, other.device)
        for s, e in _blocks(n, v):
            diff = torch.sub(
                self.logits[s:e], other[s:e].float(), out=diff_buf[: (e - s) * v].view(e - s, v)
            )
            self._block_kl(s, e, diff, rows, *spare)
        # P.d is finite exactly when the row of ``other`` is (or it overflowed): a non-finite
        # entry makes its product with P (>= 0) non-finite
        ok = self.finite & _finite_rows(other, rows.centre)
        forward = rows.kl(self.mass)
        backward = rows.reverse_kl(self.mass) if reverse else None
        # a row is recomputed in both directions when either result is unsafe
        either = forward if backward is None else forward + backward
        redo = self._redo_rows(either, rows.min_diff(), ok)
        zero = torch.zeros((), dtype=torch.float64, device=other.device)
        good = int(ok.sum())
        nan = math.nan
        agree = float((ok & (first_argmax(other) == self.top1)).sum()) if top1 else nan

        def sums(kl: torch.Tensor, flip: bool, agreements: float) -> list[float]:
            kl = self._exact_rows(other, kl, redo, flip)
            total = float(torch.where(ok, kl, zero).sum())
            return [total, nan, nan, agreements, float(good), float(n - good)]

        if backward is None:
            return (sums(forward, False, agree),)
        return sums(forward, False, agree), sums(backward, True, nan)

    def _other(self, other: torch.Tensor) -> torch.Tensor:
        """``other`` as compared: on the reference's device, unit stride along the classes, in
        its own dtype if float32, bfloat16 or float16 (upcast a block of rows at a time: exact,
        and no whole float32 copy), else float32."""
        other = _rows(other.to(self.logits.device), keep_half=True)
        if other.shape != self.logits.shape:
            raise ValueError(
                f"logits shapes differ: {tuple(self.logits.shape)} vs {tuple(other.shape)}"
            )
        return other

    def _fused_rows(self, other: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """:func:`~grail.trainer.analysis.kernels.compare_rows` of ``other``; half-precision
        logits go in float32 row slices of about ``kernels.settings.split_numel`` entries (per-row
        sums do not depend on the slicing). ``None``: compare eagerly (also below two rows,
        which the kernel declines)."""
        if other.dtype == torch.float32:
            return kernels.compare_rows(self.logits, other, self.probs, self.mass)
        n, v = other.shape
        if n < 2:
            return None
        size = kernels.settings.split_numel
        parts = min(max(1, -(-n * v // size)), n // 2)  # >= 2 rows a slice
        bounds = [n * i // parts for i in range(parts + 1)]
        slices = []
        for s, e in itertools.pairwise(bounds):
            rows = kernels.compare_rows(
                self.logits[s:e], other[s:e].float(), self.probs[s:e], self.mass[s:e]
            )
            if rows is None:
                return None
            slices.append(rows)
        return {k: torch.cat([r[k] for r in slices]) for k in slices[0]}

    def _block_kl(
        self,
        s: int,
        e: int,
        diff: torch.Tensor,
        rows: _KlRows,
        prod: torch.Tensor,
        spare: torch.Tensor | None = None,
    ) -> None:
        """Rows ``s:e`` of ``rows`` from ``diff = a - b`` of that block (overwritten);
        ``prod`` (and ``spare``, for the reverse KL's sum) a scratch buffer of a block."""
        # KL(P||Q) = -P.x + log(1 + P.expm1(x)) with x = c - d, d = a - b, both terms from d
        # directly (no difference of two log-sum-exps): relative accuracy even for a tiny KL.
        # The KL ignores a constant shift of a row of d, so x is centred on d's P-mean c:
        # logits that moved together (as softmax allows) would otherwise make both terms
        # large and their sum inaccurate. The block holds y = x / 2 (exact: a power of 2).
        p = self.probs[s:e]
        centre = rows.centre[s:e]
        _rowdot(p, diff, prod, out=centre)
        half_centre = centre.double().div_(2 * self.mass[s:e]).to(diff.dtype)
        y = torch.add(half_centre[:, None], diff, alpha=-0.5, out=diff)
        top = rows.top[s:e]
        if y.shape[-1]:
            torch.amax(y, dim=-1, out=top)
        rows.py[s:e] = _rowdot(p, y, prod)  # ~0: what the centring left in float32
        if rows.pz is None or spare is None:
            rows.pe[s:e] = _rowdot(p, _half_expm1(y, prod, top, y), prod)
            return
        h = _half_expm1(y, prod, top, spare)  # y kept: the reverse KL needs y * h
        rows.pz[s:e] = _rowdot(p, torch.mul(y, h, out=spare[: y.numel()].view_as(y)), spare)
        rows.pe[s:e] = _rowdot(p, h, prod)

    def _exact_where_needed(
        self, other: torch.Tensor, kl: torch.Tensor, min_diff: torch.Tensor, ok: torch.Tensor
    ) -> torch.Tensor:
        """``kl`` with the rows where ``exp(-d)`` loses the entries at which P underflows
        recomputed from two log-softmaxes, clamped at 0 (rounding noise around an exact 0)."""
        return self._exact_rows(other, kl, self._redo_rows(kl, min_diff, ok), flip=False)

    @staticmethod
    def _redo_rows(kl: torch.Tensor, min_diff: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Indices of the finite rows that :meth:`_exact_rows` recomputes."""
        return (ok & ((min_diff < -_EXP_SAFE) | ~torch.isfinite(kl))).nonzero().flatten()

    def _exact_rows(
        self, other: torch.Tensor, kl: torch.Tensor, redo: torch.Tensor, flip: bool
    ) -> torch.Tensor:
        """``kl`` (of ``KL(Q || P)`` with ``flip``) with the rows ``redo`` recomputed from two
        log-softmaxes, clamped at 0."""
        step = _block_rows(other.shape[1])
        for i in range(0, redo.numel(), step):  # in row blocks, like everything else
            rows = redo[i : i + step]
            a, b = self.logits[rows], other[rows].float()
            kl[rows] = _kl_rows(b, a) if flip else _kl_rows(a, b)
        return kl.clamp_(min=0.0)

    def _compare_eager(self, other: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-row ``kl, a.b, sum d^2, a.a, b.b, min dc, top-1`` in row blocks (see
        :meth:`compare_sums`)."""
        n, v = other.shape
        f64 = {"dtype": torch.float64, "device": other.device}
        dots, sq, norm_b = (torch.empty(n, **f64) for _ in range(3))
        rows = _KlRows(n, other.device)
        top1 = torch.empty(n, dtype=torch.int64, device=other.device)
        diff_buf, prod = _scratch(n, v, 2, other.device)
        for s, e in _blocks(n, v):
            a, b = self.logits[s:e], other[s:e].float()
            diff = torch.sub(a, b, out=diff_buf[: (e - s) * v].view(e - s, v))
            sq[s:e] = _rowdot(diff, diff, prod)
            self._block_kl(s, e, diff, rows, prod)
            dots[s:e] = _rowdot(a, b, prod)
            norm_b[s:e] = _rowdot(b, b, prod)
            top1[s:e] = first_argmax(b)
        if self._norm_eager is None:  # the reference was compiled, this comparison is not
            self._norm_eager = _row_norms(self.logits).double()
        kl, min_diff = rows.kl(self.mass), rows.min_diff()
        return kl, dots, sq, self._norm_eager, norm_b, min_diff, top1

    def _sums(
        self,
        other: torch.Tensor,
        kl: torch.Tensor,
        dots: torch.Tensor,
        sq: torch.Tensor,
        norm_a: torch.Tensor,
        norm_b: torch.Tensor,
        min_diff: torch.Tensor,
        top1: torch.Tensor,
    ) -> list[float]:
        """:meth:`compare_sums`' result from the per-row values (float64 where summed)."""
        n, v = other.shape
        f64 = {"dtype": torch.float64, "device": other.device}
        ok = self.finite & _finite_rows(other, norm_b)
        kl = self._exact_where_needed(other, kl, min_diff, ok)
        # both norms from the loop of the dot product: identical rows give a cosine of 1
        norm_a, norm_b = norm_a.double(), norm_b.double()
        denom = (norm_a * norm_b).sqrt()
        both_zero = (norm_a == 0) & (norm_b == 0)  # identical zero vectors: similarity 1
        cos = torch.where(denom > 0, dots / denom, both_zero.to(denom.dtype))
        cos = cos.clamp_(-1.0, 1.0)  # rounding of nearly parallel rows can pass 1 by ~1e-9
        agree = (top1 == self.top1).to(torch.float64)
        zero = torch.zeros((), **f64)
        sums = torch.stack([torch.where(ok, x, zero).sum() for x in (kl, cos, sq, agree)])
        kl_s, cos_s, sq_s, agree_s = sums.tolist()
        good = int(ok.sum())
        return [kl_s, cos_s, sq_s / max(v, 1), agree_s, float(good), float(n - good)]

    def compare(self, other: torch.Tensor) -> dict[str, float]:
        """``kl, cosine, mse, top1_agree, nonfinite_rows`` of ``other`` against the reference."""
        return means(self.compare_sums(other))


class _KlRows:
    """Per-row pieces of the KLs that :meth:`LogitsReference._block_kl` fills block by block
    (one float64 tail for all rows after the loop, not a few tiny operations per block):
    ``centre`` = P.d (float32), ``py`` = P.y, ``pe`` = P.h and, for the reverse KL, ``pz`` =
    P.(y h), with ``y = x / 2`` for the centred ``x = c - d`` and ``h = expm1(x) / 2``;
    ``top`` = max y."""

    def __init__(self, n: int, device: torch.device, reverse: bool = False) -> None:
        self.centre, self.top = (torch.zeros(n, device=device) for _ in range(2))
        f64 = {"dtype": torch.float64, "device": device}
        self.py, self.pe = torch.zeros(n, **f64), torch.zeros(n, **f64)
        self.pz = torch.zeros(n, **f64) if reverse else None

    def _normalised(self, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``P.x`` and ``P.expm1(x)`` for P normalised by its row sums ``mass``."""
        return self.py.mul(2).div_(mass), self.pe.mul(2).div_(mass)

    def kl(self, mass: torch.Tensor) -> torch.Tensor:
        """Row KL(P || Q) = ``-P.x + log1p(P.expm1(x))``."""
        u, w = self._normalised(mass)
        return torch.log1p(w).sub_(u)

    def reverse_kl(self, mass: torch.Tensor) -> torch.Tensor:
        """Row KL(Q || P) = ``(P.x + P.(x expm1(x))) / (1 + P.expm1(x)) - log1p(P.expm1(x))``
        (:meth:`LogitsReference.kl_sums_both`)."""
        assert self.pz is not None
        u, w = self._normalised(mass)
        z = self.pz.mul(4).div_(mass)
        return (u + z).div_(w + 1).sub_(torch.log1p(w))

    def min_diff(self) -> torch.Tensor:
        """The minimum of the centred ``d`` per row (``-2 max y``)."""
        return self.top.mul(-2)


_EXP_SAFE = 60.0  # exp(60) * smallest float32 * 2^18 classes is far below anything reported


_TANH_SAFE = 0.25  # largest x / 2 for which 2 tanh(x/2) / (1 - tanh(x/2)) is within 3 roundings


def _half_expm1(
    y: torch.Tensor, out: torch.Tensor, top: torch.Tensor, den: torch.Tensor
) -> torch.Tensor:
    """``expm1(2 y) / 2`` of a block of rows into ``out``; ``top`` is each row's maximum of
    ``y``; ``den`` a buffer of ``y``'s size (``y`` itself where it is no longer needed).

    On a CPU, ``expm1`` is not vectorised (~4-9x the time of ``tanh``), so a row whose every
    ``y <= 0.25`` takes ``tanh(y) / (1 - tanh(y))``, the same function, within 3 float32
    roundings of the true value over that range (``1 - tanh(y) >= 0.75`` cannot cancel; torch's
    ``expm1`` is within 1-2). A row whose logits moved further apart takes ``expm1``: the choice
    is per row, so a row's value does not depend on the rows beside it. Other devices take
    ``expm1`` (no synchronisation per block).

    >>> y = torch.tensor([[-3.0, 1e-9, 0.2], [0.1, 2.0, -1.0]])
    >>> got = _half_expm1(y.clone(), torch.empty(6), y.amax(dim=-1), torch.empty(6))
    >>> torch.allclose(got, torch.expm1(2 * y) / 2, rtol=3e-7, atol=0)
    True
    """
    out = out[: y.numel()].view_as(y)
    # rows for expm1 (NaN rows stay: NaN either way); not looked for off the CPU (a sync)
    far = (top > _TANH_SAFE).nonzero().flatten() if y.device.type == "cpu" else None
    if far is None or far.numel() == y.shape[0]:
        return torch.mul(y, 2, out=out).expm1_().mul_(0.5)
    exact = torch.expm1(y[far] * 2).mul_(0.5) if far.numel() else None  # before y is overwritten
    t = torch.tanh(y, out=out)
    one = torch.ones((), dtype=y.dtype, device=y.device)
    h = t.div_(torch.sub(one, t, out=den[: y.numel()].view_as(y)))
    if exact is not None:
        h[far] = exact
    return h


def _block_rows(v: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(v, 1))


def _blocks(n: int, v: int) -> list[tuple[int, int]]:
    step = _block_rows(v)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _scratch(n: int, v: int, count: int, device: torch.device) -> list[torch.Tensor]:
    """``count`` float32 buffers for one row block: allocated once per comparison, not once per
    operation, and freed with it (nothing is held between comparisons)."""
    size = min(n, _block_rows(v)) * v
    buffers = ScratchBuffers()
    return [buffers.get(device, size, slot=i) for i in range(count)]


def _rowdot(
    a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Row-wise dot products (float32, into ``out`` if given), the product written into
    ``scratch``."""
    return torch.sum(torch.mul(a, b, out=scratch[: a.numel()].view_as(a)), -1, out=out)


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms (float32) by the kernel of the dot products, :func:`_rowdot` in the
    same row blocks: identical rows give a cosine of exactly 1, and the error stays ~1e-7
    (float32 vector_norm errs by ~1e-6 at 150k classes, a large part of the informative
    1 - cosine)."""
    n, v = x.shape
    norm = torch.empty(n, dtype=torch.float32, device=x.device)
    scratch = _scratch(n, v, 1, x.device)[0]
    for s, e in _blocks(n, v):
        norm[s:e] = _rowdot(x[s:e], x[s:e], scratch)
    return norm


_HALF = (torch.bfloat16, torch.float16)


def _rows(logits: torch.Tensor, keep_half: bool = False) -> torch.Tensor:
    """float32 (or, with ``keep_half``, bfloat16/float16 as given) with unit stride along the
    classes (the views below need it)."""
    x = logits.detach()
    x = x if keep_half and x.dtype in _HALF else x.float()
    return x if x.ndim != 2 or x.stride(-1) == 1 else x.contiguous()


def _finite_rows(x: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Rows without NaN/Inf. A finite sum of squares proves it; rows whose sum is not finite
    (a non-finite entry, or squares overflowing) are checked entry by entry."""
    finite = torch.isfinite(sq_norm)
    check = (~finite).nonzero().flatten()
    if check.numel():
        finite[check] = torch.isfinite(x[check]).all(dim=-1)
    return finite


def _kl_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row KL from two log-softmaxes: robust to any spread of the logits."""
    logp = torch.log_softmax(a, dim=-1)
    return torch.linalg.vecdot(logp.exp(), logp - torch.log_softmax(b, dim=-1)).double()


_ARGMAX_WIDTH = 128  # columns per segment of first_argmax


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a 2-D tensor without NaN - the first index of each row's
    maximum - from a vectorised ``amax`` over fixed segments of the row: the first segment whose
    maximum equals the row's maximum holds the first occurrence, found by an argmax inside that
    segment only (a plain CPU argmax is about ten times slower than amax).

    >>> x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    >>> first_argmax(x).tolist(), x.argmax(dim=-1).tolist()
    ([1, 0], [1, 0])
    """
    n, v = x.shape
    w = _ARGMAX_WIDTH
    k = v // w
    if k < 2 or x.stride(-1) != 1:
        return x.argmax(dim=-1)
    body = x[:, : k * w].unflatten(1, (k, w))
    seg_max = body.amax(dim=-1)
    seg = seg_max.argmax(dim=-1)
    inside = body[torch.arange(n, device=x.device), seg].argmax(dim=-1)
    idx = seg * w + inside
    if v > k * w:  # a tail shorter than a segment: it wins only with a strictly larger max
        tail_max, tail_idx = x[:, k * w :].max(dim=-1)
        body_max = seg_max.gather(1, seg[:, None]).squeeze(1)
        idx = torch.where(tail_max > body_max, tail_idx + k * w, idx)
    return idx


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """One-off :meth:`LogitsReference.compare` (``reference`` plays P in the KL)."""
    return LogitsReference(reference).compare(other)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), clamped at 0 per row."""
    return compare_logits(p_logits, q_logits)["kl"]
