"""The overlap report: its sentences follow the numbers, and the page stands alone."""

from __future__ import annotations

import re

import pytest

from grail.trainer.analysis.report.overlap import (
    lift_sentence,
    pair_sentences,
    render_overlap_report,
)

EXACT = {"kind": "exact", "value": None, "text": "stored value differs"}
BF16 = {"kind": "bf16_view", "value": None, "text": "bf16-rounded value differs"}


def _m(a, b, lift, **extra):
    jr = a * b / (a + b - a * b)
    return {"density_a": a, "density_b": b, "jaccard": lift * jr, "jaccard_random": jr,
            "jaccard_lift": lift, **extra}


def _pair(main, contrast, crit=BF16, a="A", b="B"):
    return {"a": a, "b": b, "global": main, "contrast": {"criterion": crit, **contrast}}


@pytest.mark.parametrize(
    ("main", "contrast", "crit", "expected"),
    [
        (_m(1.0, 1.0, 1.0), _m(0.5, 0.5, 1.7), BF16, "exists only in the bf16 view"),
        (_m(0.5, 0.5, 1.7), _m(1.0, 1.0, 1.0), EXACT, "exists only in the bf16 view"),
        (_m(0.3, 0.3, 1.02), _m(0.2, 0.2, 0.98), BF16, "no more sharing than chance"),
        (_m(0.3, 0.3, 2.0), _m(0.2, 0.2, 2.05), BF16, "does not depend on the precision"),
        (_m(0.3, 0.3, 2.0), _m(0.05, 0.05, 1.0), BF16, "too small to survive bf16 rounding"),
        (_m(0.3, 0.3, 1.3), _m(0.1, 0.1, 3.0), BF16, "coincide more between the runs"),
        (_m(0.3, 0.3, 2.0), _m(0.3, 0.3, 2.0), BF16, "the same sets"),
    ],
)
def test_the_contrast_is_read_from_the_numbers(main, contrast, crit, expected):
    text = " ".join(pair_sentences(_pair(main, contrast, crit), EXACT, []))
    assert expected in text, text


def test_lift_sentences():
    assert "2.1× more changed weights" in lift_sentence("A", "B", _m(0.1, 0.1, 2.1))
    assert "2.0× fewer" in lift_sentence("A", "B", _m(0.1, 0.1, 0.5))
    assert "about as many" in lift_sentence("A", "B", _m(0.1, 0.1, 1.01))
    assert "no entry changed" in lift_sentence("A", "B", {"jaccard_lift": None})
    dense = pair_sentences(_pair(_m(1.0, 1.0, 1.0), _m(1.0, 1.0, 1.0)), EXACT, [])
    assert any("cannot single out a subnetwork" in s for s in dense)


def test_signs_and_top_k_are_described():
    g = _m(0.2, 0.2, 1.5, sign_agreement=0.9, cosine=0.4,
           **{"topk_jaccard_at_keep_0.01": 0.05, "topk_jaccard_at_keep_0.01_random": 0.005})
    text = " ".join(pair_sentences(_pair(g, _m(0.1, 0.1, 1.5)), EXACT, [0.01]))
    assert "agree in sign on 90.0%" in text and "10.0% would conflict" in text
    assert "largest 1.0% of updates overlap 10.0×" in text


def test_the_page_is_self_contained_and_escapes_labels():
    labels = ["<a>", "b&c", "plain"]
    pairs = []
    for i in range(3):
        for j in range(i + 1, 3):
            pairs.append({**_pair(_m(0.3, 0.4, 1.0 + i + j), _m(0.2, 0.2, 1.1), a=labels[i],
                                  b=labels[j]),
                          "cells": {"layers": ["layer_0", "other"], "components": ["q", "head"],
                                    "jaccard_lift": [[1.2, None], [None, 0.9]]}})
    doc = {"criterion": EXACT, "keep_ratios": [], "pairs": pairs,
           "runs": {lab: {"density": 0.3, "changed": 3, "num_params": 10, "path": lab}
                    for lab in labels},
           "inputs": {"base": {"path": "base", "format": "safetensors", "files": []},
                      "runs": {"<a>": {"path": "<a>.pt", "format": "torch", "files": []}}},
           "compared": {"num_params": 10}, "notes": ["a <note>"], "versions": {"torch": "x"}}
    page = render_overlap_report(doc)
    assert page.startswith("<!DOCTYPE html>") and page.count("<img") == 1 + len(pairs)
    assert "<a>" not in page  # the page has no links: a raw "<a>" would be the label
    assert "&lt;a&gt; and b&amp;c share" in page and "a &lt;note&gt;" in page
    assert not re.search(r"(src|href)=['\"]https?:", page)
