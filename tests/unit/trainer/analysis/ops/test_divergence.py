"""LogitsReference.compare against a float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grail.trainer.analysis.ops import divergence
from grail.trainer.analysis.ops.divergence import LogitsReference, compare_logits, kl_divergence


@pytest.fixture(autouse=True)
def _both_paths(kernel_path, monkeypatch):
    """Every test on the eager row blocks and on the compiled comparison (kernels.compare_rows),
    by the default of ``LogitsReference(fused=...)``."""
    monkeypatch.setattr(LogitsReference.__init__, "__defaults__", (kernel_path == "fused",))
    return kernel_path


def test_the_compiled_comparison_is_taken_where_it_applies(_both_paths, monkeypatch):
    from grail.trainer.analysis import kernels

    calls, refs = [], []
    real, real_ref = kernels.compare_rows, kernels.reference_rows
    monkeypatch.setattr(kernels, "compare_rows", lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setattr(kernels, "reference_rows", lambda a: refs.append(real_ref(a)) or refs[-1])
    a, b = _pair(9, 300, 0.3)
    _assert_close(LogitsReference(a).compare(b), _reference(a, b))
    LogitsReference(a.double()).compare(b)  # compared in float32 either way
    LogitsReference(a[:1]).compare(b[:1])  # one row: declined (Dynamo specialises size 1)
    if _both_paths == "fused":
        assert [c is not None for c in calls] == [True, True, False]
        assert [r is not None for r in refs] == [True, True, False]
    else:
        assert calls == refs == []


def _reference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """float64 numpy loop over rows; rows with a non-finite logit on either side are skipped."""
    a64 = a.float().double().numpy()
    b64 = b.float().double().numpy()
    n, v = a64.shape
    kl = cos = sq = agree = 0.0
    rows = bad = 0
    for i in range(n):
        x, y = a64[i], b64[i]
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            bad += 1
            continue
        logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        logq = y - (y.max() + np.log(np.exp(y - y.max()).sum()))
        kl += max(0.0, float(np.sum(np.exp(logp) * (logp - logq))))
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        if nx > 0 and ny > 0:
            cos += float(x @ y) / (nx * ny)
        elif nx == 0 and ny == 0:
            cos += 1.0
        sq += float(np.sum((x - y) ** 2))
        agree += float(np.argmax(x) == np.argmax(y))
        rows += 1
    if rows == 0:
        return {"kl": math.nan, "cosine": math.nan, "mse": math.nan, "top1_agree": math.nan,
                "nonfinite_rows": bad}  # fmt: skip
    return {
        "kl": kl / rows,
        "cosine": cos / rows,
        "mse": sq / (rows * v),
        "top1_agree": agree / rows,
        "nonfinite_rows": bad,
    }


def _assert_close(got: dict[str, float], ref: dict[str, float]) -> None:
    assert set(got) == {"kl", "cosine", "mse", "top1_agree", "nonfinite_rows"}
    assert got["nonfinite_rows"] == ref["nonfinite_rows"]
    assert isinstance(got["nonfinite_rows"], int)
    for key in ("kl", "cosine", "mse", "top1_agree"):
        assert isinstance(got[key], float), key
    if math.isnan(ref["kl"]):  # no finite row: everything is NaN
        assert all(math.isnan(got[k]) for k in ("kl", "cosine", "mse", "top1_agree")), got
        return
    assert got["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-7)
    assert got["cosine"] == pytest.approx(ref["cosine"], rel=1e-6, abs=1e-7)
    assert got["mse"] == pytest.approx(ref["mse"], rel=1e-5, abs=1e-12)
    assert got["top1_agree"] == ref["top1_agree"]  # exact: a count over rows


def _pair(n: int, v: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, v, generator=g) * 3
    b = a + noise * torch.randn(n, v, generator=g)
    return a, b


@pytest.mark.parametrize(
    ("n", "v", "noise"), [(1, 2, 1.0), (5, 7, 0.1), (64, 500, 0.3), (3, 11, 5.0)]
)
def test_compare_matches_float64_reference(n, v, noise):
    a, b = _pair(n, v, noise, seed=n + v)
    _assert_close(LogitsReference(a).compare(b), _reference(a, b))


def test_kl_is_asymmetric_and_reference_plays_p():
    a, b = _pair(20, 30, 1.0)
    assert kl_divergence(a, b) == pytest.approx(_reference(a, b)["kl"], rel=1e-4)
    assert kl_divergence(b, a) == pytest.approx(_reference(b, a)["kl"], rel=1e-4)
    assert abs(kl_divergence(a, b) - kl_divergence(b, a)) > 1e-3
    assert compare_logits(a, b) == LogitsReference(a).compare(b)


def test_one_reference_many_comparisons():
    a, b = _pair(16, 40, 0.5)
    ref = LogitsReference(a)
    for seed in range(3):
        _, c = _pair(16, 40, 0.5 * (seed + 1), seed=seed + 10)
        _assert_close(ref.compare(c), _reference(a, c))
    before = a.clone()
    ref.compare(b)
    assert torch.equal(a, before)


@pytest.mark.parametrize(("n", "v"), [(1, 3), (7, 1000), (33, 4099), (3, 50_257)])
def test_identical_logits_give_exactly_zero_kl_and_full_agreement(n, v):
    a, _ = _pair(n, v, 0.0, seed=v)
    for other in (a, a.clone()):
        r = LogitsReference(a).compare(other)
        assert r["kl"] == 0.0
        assert r["top1_agree"] == 1.0
        assert r["mse"] == 0.0
        assert r["cosine"] == 1.0
        assert r["nonfinite_rows"] == 0


def test_identical_logits_from_a_view_at_an_odd_offset():
    # the same values stored at a different alignment must still compare as identical
    v = 1001
    big = torch.randn(20 * v + 1, generator=torch.Generator().manual_seed(3))
    a = big[1:].view(20, v)
    r = LogitsReference(a.clone()).compare(a)
    assert r["kl"] == 0.0 and r["top1_agree"] == 1.0 and r["cosine"] == 1.0


def test_low_precision_inputs_are_compared_in_float32():
    a, b = _pair(10, 20, 0.5)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    _assert_close(LogitsReference(a16).compare(b16), _reference(a16, b16))
    assert LogitsReference(a16).logits.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_compare_exactly_as_their_float32_copy(dtype, monkeypatch):
    """Half-precision logits are upcast a block (or, compiled, a slice) of rows at a time: the
    sums are bit for bit those of the whole float32 copy, non-finite rows and the exact path
    for widely spread rows included."""
    from grail.trainer.analysis import kernels

    monkeypatch.setattr(divergence, "_BLOCK_ELEMENTS", 64)  # several row blocks ...
    a, b = _pair(13, 40, 0.5, seed=41)
    b[3, 5] = float("inf")
    b[7, 1] = 200.0  # d < -60 at an entry: this row takes the exact path
    half = b.to(dtype)
    with kernels.settings.override(split_numel=100):  # ... and compiled slices
        ref = LogitsReference(a)
        assert ref.compare_sums(half) == ref.compare_sums(half.float())
        assert ref.kl_sums(half) == ref.kl_sums(half.float())
        assert ref.compare(half)["nonfinite_rows"] == 1


@pytest.mark.parametrize("rows", [0, 1])
def test_half_precision_logits_with_fewer_than_two_rows(rows):
    """No compared position (a probe batch that is all padding) or one: the comparison is the
    float32 copy's on both paths, and never an error."""
    a, b = _pair(max(rows, 1), 30, 0.5, seed=43)
    a, b = a[:rows], b[:rows].to(torch.bfloat16)
    ref = LogitsReference(a)
    assert ref.compare_sums(b) == ref.compare_sums(b.float())
    assert ref.kl_sums(b, top1=True) == ref.kl_sums(b.float(), top1=True)


def test_non_finite_rows_are_excluded_and_counted():
    a, b = _pair(12, 9, 0.7, seed=5)
    a[1, 3] = float("nan")
    a[4, 0] = float("inf")
    b[4, 1] = float("nan")  # same row twice: counted once
    b[7, 8] = -float("inf")
    b[11, :] = float("nan")
    got = LogitsReference(a).compare(b)
    ref = _reference(a, b)
    assert ref["nonfinite_rows"] == 4
    _assert_close(got, ref)
    keep = [i for i in range(12) if i not in (1, 4, 7, 11)]
    _assert_close(got | {"nonfinite_rows": 4}, _reference(a[keep], b[keep]) | {"nonfinite_rows": 4})
    assert all(math.isfinite(got[k]) for k in ("kl", "cosine", "mse", "top1_agree"))


def test_all_rows_non_finite_give_nan_not_agreement():
    a, b = _pair(5, 4, 0.1)
    b[:, 0] = float("nan")
    r = LogitsReference(a).compare(b)
    assert r["nonfinite_rows"] == 5
    for key in ("kl", "cosine", "mse", "top1_agree"):
        assert math.isnan(r[key]), key
    r = LogitsReference(torch.full((3, 4), float("inf"))).compare(torch.zeros(3, 4))
    assert math.isnan(r["top1_agree"]) and r["nonfinite_rows"] == 3


def test_no_rows():
    r = LogitsReference(torch.zeros(0, 10)).compare(torch.zeros(0, 10))
    assert math.isnan(r["kl"]) and r["nonfinite_rows"] == 0


def test_zero_vectors():
    a = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, -1.0, 0.5]])
    b = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, -2.0, 1.0]])
    r = LogitsReference(a).compare(b)
    ref = _reference(a, b)
    _assert_close(r, ref)
    # rows: both zero -> 1, one zero -> 0, one zero -> 0, parallel -> 1
    assert r["cosine"] == pytest.approx(0.5, abs=1e-7)
    one = LogitsReference(a[:1]).compare(b[:1])
    assert one["kl"] == 0.0 and one["cosine"] == 1.0 and one["mse"] == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        LogitsReference(torch.zeros(3, 4)).compare(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="shapes differ"):
        LogitsReference(torch.zeros(3, 4)).compare(torch.zeros(2, 4))


def test_many_row_blocks_forced(monkeypatch):
    monkeypatch.setattr(divergence, "_BLOCK_ELEMENTS", 64)  # 10 classes: 6 rows per block
    a, b = _pair(50, 10, 0.8, seed=9)
    a[3, 2] = float("nan")
    b[13:19] = float("inf")  # one whole block of non-finite rows (rows 12..17 and 18)
    b[49, 0] = float("nan")  # in the last, partial block
    got = LogitsReference(a).compare(b)
    _assert_close(got, _reference(a, b))
    monkeypatch.undo()
    single = LogitsReference(a).compare(b)
    assert got["nonfinite_rows"] == single["nonfinite_rows"] == 8
    for key in ("kl", "cosine", "mse", "top1_agree"):
        assert got[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9)


def test_large_vocabulary_is_processed_in_row_blocks():
    v = divergence._BLOCK_ELEMENTS // 7 + 3  # 6 rows per block
    assert divergence._BLOCK_ELEMENTS // v == 6
    a, b = _pair(20, v, 0.2, seed=11)
    b[8, 5] = float("nan")
    _assert_close(LogitsReference(a).compare(b), _reference(a, b))


def test_cosine_is_accurate_for_a_large_vocabulary():
    # 1 - cosine is the informative part; it must not drown in float32 norm rounding
    a, b = _pair(4, 151_936, 0.1, seed=13)
    got, ref = LogitsReference(a).compare(b), _reference(a, b)
    assert 1 - got["cosine"] == pytest.approx(1 - ref["cosine"], rel=1e-3)


def test_cosine_of_nearly_parallel_rows_never_exceeds_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5000, generator=g) * 5
    b = a + torch.randn(8, 5000, generator=g) * 1e-6  # unclamped, rounding gives 1 + 4e-9
    assert 1 - 1e-7 < LogitsReference(a).compare(b)["cosine"] <= 1.0


def test_vocabulary_larger_than_a_block():
    v = divergence._BLOCK_ELEMENTS + 5  # a single row per block
    a, b = _pair(2, v, 0.1, seed=12)
    _assert_close(LogitsReference(a).compare(b), _reference(a, b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compare_on_cuda():
    a, b = _pair(40, 3000, 0.4, seed=14)
    b[3, 1] = float("nan")
    got = LogitsReference(a.cuda()).compare(b.cuda())
    _assert_close(got, _reference(a, b))
    same = LogitsReference(a.cuda()).compare(a.cuda())
    assert same["kl"] == 0.0 and same["top1_agree"] == 1.0
    # a CPU tensor compared with a CUDA reference is moved, not rejected
    _assert_close(LogitsReference(a.cuda()).compare(b), _reference(a, b))


@pytest.mark.parametrize(
    ("n", "v"), [(5, 1), (5, 255), (6, 256), (9, 32_000), (4, 1000), (4, 50_257)]
)
def test_first_argmax_is_the_first_maximum(n, v):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(n, v, generator=g).to(torch.bfloat16).float()  # bf16 values: many ties
    x[0] = x[0].max()  # a row of one value: index 0
    if v > 300:
        x[1, 7] = x[1, -1] = x[1].max() + 1  # tie between the first segment and the tail
        x[2, -1] = x[2].max() + 1  # the tail alone
        x[3, 130] = x[3, 129] = x[3].max() + 1  # tie inside one segment
    got = divergence.first_argmax(x)
    assert got.tolist() == np.argmax(x.numpy(), axis=-1).tolist()
    assert got.tolist() == x.argmax(dim=-1).tolist()
    signed_zero = torch.tensor([[-1.0] * 300 + [-0.0, 0.0, -2.0]])
    assert divergence.first_argmax(signed_zero).tolist() == [300]


def test_tiny_kl_keeps_its_relative_accuracy():
    # a fine-tune's masked variants differ by ~1e-4 in the logits: KL ~ 1e-9, far below the
    # rounding of two float32 log-softmaxes of ~10 (which would leave nothing but noise)
    a, b = _pair(16, 32_000, 1e-4, seed=21)
    got, ref = LogitsReference(a).compare(b), _reference(a, b)
    assert 0 < ref["kl"] < 1e-7
    assert got["kl"] == pytest.approx(ref["kl"], rel=1e-3)


@pytest.mark.parametrize("shift", [-20.0, -10.0, -2.0, 3.0, 10.0, 30.0])
def test_tiny_kl_of_logits_that_moved_together(shift):
    # a constant shift of a row changes nothing in the softmax; the KL must not see it
    a, b = _pair(8, 32_000, 1e-3, seed=24)
    b += shift
    got, ref = LogitsReference(a).compare(b), _reference(a, b)
    assert 0 < ref["kl"] < 1e-5
    assert got["kl"] == pytest.approx(ref["kl"], rel=1e-3)


def test_widely_spread_logits_take_the_exact_path(monkeypatch):
    a, b = _pair(6, 50, 0.1, seed=22)
    a[:, 3] = -150.0
    b[:, 3] = 0.0  # d = -150: exp(-d) overflows
    a[4, 3], b[4, 3] = -90.0, -20.0  # d = -70: exp(-d) is finite, P(3) underflows
    taken = []
    exact = divergence._kl_rows
    monkeypatch.setattr(divergence, "_kl_rows", lambda x, y: taken.append(len(x)) or exact(x, y))
    got, ref = LogitsReference(a).compare(b), _reference(a, b)
    _assert_close(got, ref)
    assert sum(taken) == 6  # every row, the finite-but-spread one included


def test_exact_path_runs_in_row_blocks(monkeypatch):
    monkeypatch.setattr(divergence, "_BLOCK_ELEMENTS", 64)  # 10 classes: 6 rows per block
    a, b = _pair(20, 10, 0.3, seed=25)
    a[:, 2] = -50.0  # P(2) ~ 0, so centring leaves d(2) near -100 in every row
    b[:, 2] = 50.0
    taken = []
    exact = divergence._kl_rows
    monkeypatch.setattr(divergence, "_kl_rows", lambda x, y: taken.append(len(x)) or exact(x, y))
    _assert_close(LogitsReference(a).compare(b), _reference(a, b))
    assert taken == [6, 6, 6, 2]


def test_logits_that_require_grad_are_compared_without_a_graph():
    a, b = _pair(4, 30, 0.5, seed=26)
    a.requires_grad_(True)
    b.requires_grad_(True)
    _assert_close(LogitsReference(a).compare(b), _reference(a.detach(), b.detach()))
    assert kl_divergence(a, b) > 0


def test_overflowing_squares_are_still_finite_rows():
    a, b = _pair(4, 8, 0.5, seed=23)
    a[1, 2] = 1e20  # its square overflows float32; the row is finite all the same
    b[1, 2] = 1e20
    r = LogitsReference(a).compare(b)
    assert r["nonfinite_rows"] == 0
    assert r["top1_agree"] == _reference(a, b)["top1_agree"]


def test_identical_rows_give_cosine_one_when_only_the_reference_was_compiled(_both_paths):
    # a non-contiguous other side is compared eagerly against a compiled reference
    a = _pair(8, 1000, 0.1)[0]
    other = torch.cat([a, torch.zeros(8, 5)], dim=1)[:, :1000]
    r = LogitsReference(a).compare(other)
    assert r["cosine"] == 1.0 and r["kl"] == 0.0 and r["top1_agree"] == 1.0
    same = LogitsReference(a).compare(a)  # aliased: declined by the kernel, exact either way
    assert same["cosine"] == 1.0 and same["kl"] == 0.0


def test_row_kernels_compile_once_per_side_of_the_wide_row_limit(_both_paths):
    """Dynamo's graphs of each row kernel never outnumber the signatures it counts (a graph
    the count missed would bring its recompile limit, which turns every kernel off, closer)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from grail.trainer.analysis import kernels

    if _both_paths != "fused":
        pytest.skip("compiled path only")
    for v in (100, 5000, 32_000, 3000, 151_936):
        a, b = _pair(4, v, 0.1)
        _assert_close(LogitsReference(a).compare(b), _reference(a, b))
    assert kernels.disabled_reason() is None
    for kernel, fn in (
        (kernels.rows._REFERENCE, kernels.rows._reference),
        (kernels.rows._COMPARE, kernels.rows._compare),
    ):
        assert len(_debug_get_cache_entry_list(fn.__code__)) <= len(kernel._signatures)
        assert {key[-1] for key in kernel._signatures} == {False, True}  # both sides compiled


# --- KL only (attribution reads nothing else) ----------------------------------------------
def _kl_only_cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    plain = _pair(12, 9, 0.7, seed=31)
    spread = _pair(6, 50, 0.1, seed=32)
    spread[0][:, 3], spread[1][:, 3] = -150.0, 0.0  # the exact path
    broken = _pair(12, 9, 0.7, seed=33)
    broken[0][1, 3] = float("nan")
    broken[1][4, 1] = float("inf")
    broken[1][11, :] = float("nan")
    huge = _pair(4, 8, 0.5, seed=34)
    huge[0][1, 2] = huge[1][1, 2] = 3e38  # row sums overflow; the rows are finite
    tiny = _pair(20, 30000, 1e-4, seed=35)  # three row blocks (8 rows of 30000 a block)
    return [plain, spread, broken, huge, tiny]


@pytest.mark.parametrize("case", range(5))
def test_kl_sums_equal_the_full_comparison_bit_for_bit(case):
    """Bit for bit with the eager comparison; with the compiled one (the fixture's other path)
    to its float32 rounding."""
    a, b = _kl_only_cases()[case]
    eager = LogitsReference(a, False)
    full, kl_only = eager.compare_sums(b), eager.kl_sums(b)
    assert kl_only[0] == full[0] and kl_only[4:] == full[4:]  # KL sum, rows, non-finite rows
    assert all(math.isnan(x) for x in kl_only[1:4])
    ref = LogitsReference(a)  # compiled under the fused fixture
    full, kl_only = ref.compare_sums(b), ref.kl_sums(b)
    assert kl_only[0] == pytest.approx(full[0], rel=1e-3) and kl_only[4:] == full[4:]
    if case == 0:  # and the KL is the float64 reference's
        assert kl_only[0] / kl_only[4] == pytest.approx(_reference(a, b)["kl"], rel=1e-5)


@pytest.mark.parametrize("case", range(5))
def test_kl_sums_with_top1_count_the_agreements_of_the_full_comparison(case):
    a, b = _kl_only_cases()[case]
    ref = LogitsReference(a, False)
    full, sums = ref.compare_sums(b), ref.kl_sums(b, top1=True)
    assert sums[0] == full[0] and sums[3:] == full[3:]  # KL, agreements, rows, non-finite
    assert math.isnan(sums[1]) and math.isnan(sums[2])
    c = divergence.Comparisons(ref, kl_only=True, top1=True)
    c.add("x", b)
    assert c.results()["x"]["top1_agree"] == ref.compare(b)["top1_agree"]


def test_comparisons_in_kl_only_mode_report_kl_and_nonfinite_rows():
    a, b = _kl_only_cases()[2]
    c = divergence.Comparisons(LogitsReference(a), kl_only=True)
    c.add("x", b)
    got, want = c.results()["x"], LogitsReference(a, False).compare(b)
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-6)
    assert got["nonfinite_rows"] == want["nonfinite_rows"]
    assert math.isnan(got["cosine"]) and math.isnan(got["top1_agree"])


def _reverse_cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The KL-only cases, and tiny KLs under a common shift of the logits (the centring)."""
    g = torch.Generator().manual_seed(36)
    a = torch.randn(16, 3000, generator=g) * 3
    shifted = [(a, a + noise * torch.randn(16, 3000, generator=g) + shift)
               for noise, shift in ((1e-4, 5.0), (1e-6, 0.5), (2.0, 1.0))]
    return _kl_only_cases() + shifted


@pytest.mark.parametrize("case", range(8))
def test_reverse_kl_from_the_same_pass_matches_float64(case):
    """KL(Q || P) from the differences against P's reference equals the float64 KL with the
    roles exchanged; the forward sums are kl_sums' bit for bit; rows counted alike."""
    a, b = _reverse_cases()[case]
    ref = LogitsReference(a, False)
    forward, backward = ref.kl_sums_both(b, top1=True)
    assert forward == pytest.approx(ref.kl_sums(b, top1=True), nan_ok=True, rel=0, abs=0)
    want = _reference(b, a)
    assert backward[4:] == forward[4:] and backward[5] == want["nonfinite_rows"]
    assert math.isnan(backward[3])  # agreements: with the forward sums
    rel = 2e-4 if case == 4 else 1e-5  # case 4: a KL of 5e-9 (float32 differences of logits)
    assert backward[0] / backward[4] == pytest.approx(want["kl"], rel=rel)
    assert backward[0] / backward[4] != pytest.approx(forward[0] / forward[4], rel=1e-3) or (
        case in (4, 5, 6)  # tiny KLs are symmetric to first order
    )


def test_comparisons_report_the_reverse_kl_under_its_own_label():
    a, b = _reverse_cases()[0]
    c = divergence.Comparisons(LogitsReference(a), kl_only=True, top1=True)
    c.add("x", b, reverse="x_back")
    got = c.results()
    assert got["x_back"]["kl"] == pytest.approx(LogitsReference(b, False).compare(a)["kl"],
                                                rel=1e-5)
    assert got["x"]["kl"] == pytest.approx(LogitsReference(a, False).compare(b)["kl"], rel=1e-6)
    assert math.isnan(got["x_back"]["top1_agree"]) and got["x"]["top1_agree"] > 0
    with pytest.raises(ValueError, match="kl_only"):
        divergence.Comparisons(LogitsReference(a)).add("y", b, reverse="y_back")


def test_comparisons_refuse_a_label_used_twice_before_comparing():
    a, b = _reverse_cases()[0]
    c = divergence.Comparisons(LogitsReference(a), kl_only=True)
    c.add("x", b, reverse="x_back")
    for label, reverse in (("x", None), ("y", "x_back"), ("x_back", None), ("z", "z")):
        with pytest.raises(ValueError, match="used twice"):
            c.add(label, b, reverse=reverse)
    assert list(c.results()) == ["x", "x_back"]  # nothing was added by the refused calls


def _mixed_blocks() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of every kind, spread over several row blocks: tiny KLs (the tanh form), wide
    moves (expm1), an underflowing P (the log-softmax path) and non-finite rows, late ones
    included."""
    a, b = _pair(24, 40, 1e-3, seed=37)
    b[3] = a[3] + 3.0 * torch.randn(40, generator=torch.Generator().manual_seed(1))  # expm1
    b[9] += 0.7  # a common shift only: KL 0
    a[14, 5], b[14, 5] = -150.0, 0.0  # P underflows where Q does not
    b[17, 2] = float("inf")
    a[21, 0] = float("nan")
    b[23, :] = float("nan")
    b[22] = a[22] + 2.0  # shifted, then a wide move in one entry
    b[22, 7] -= 4.0
    return a, b


@pytest.mark.parametrize("block", [40, 120, 1 << 18])
def test_both_kls_over_row_blocks_match_float64_and_each_row_alone(block, monkeypatch):
    """Whatever the blocks, both KLs equal float64 and the sum of each row compared alone: a
    row's value depends on that row only (the tanh/expm1 choice is per row)."""
    monkeypatch.setattr(divergence, "_BLOCK_ELEMENTS", block)
    a, b = _mixed_blocks()
    forward, backward = LogitsReference(a, False).kl_sums_both(b, top1=True)
    alone = [LogitsReference(a[i : i + 1], False).kl_sums_both(b[i : i + 1], top1=True)
             for i in range(a.shape[0])]
    for got, i in ((forward, 0), (backward, 1)):
        assert got[0] == pytest.approx(sum(r[i][0] for r in alone), rel=1e-12)
        assert got[4:] == [sum(r[i][4] for r in alone), sum(r[i][5] for r in alone)]
    assert forward[3] == sum(r[0][3] for r in alone)
    want_f, want_b = _reference(a, b), _reference(b, a)
    assert forward[5] == want_f["nonfinite_rows"] == 3
    assert forward[0] / forward[4] == pytest.approx(want_f["kl"], rel=1e-5)
    assert backward[0] / backward[4] == pytest.approx(want_b["kl"], rel=1e-5)


def test_kls_do_not_depend_on_the_scale_of_the_reference_probabilities():
    """Both KLs divide P's sums by its row sum: a reference whose probabilities sum to 1.5
    (as float32 rounding makes them sum to 1 +- 1e-7) gives the same KLs."""
    a, b = _reverse_cases()[0]
    ref = LogitsReference(a, False)
    want = ref.kl_sums_both(b)
    ref.probs, ref.mass = ref.probs * 1.5, ref.mass * 1.5
    got = ref.kl_sums_both(b)
    for g, w in zip(got, want, strict=True):
        assert g[0] == pytest.approx(w[0], rel=1e-6) and g[4:] == w[4:]
