"""The report's verdicts: masks read against the base, and checkpoints where nothing moved."""

from __future__ import annotations

import math

from grail.trainer.analysis.report import headline
from grail.trainer.analysis.report.text import (
    base_reference,
    metric_rows,
    quality_sentence,
    unchanged_sentence,
)

RANDOM = "a random mask of the same size"


def _rows(m, from_base=False):
    return {q: (v, s) for q, v, s in metric_rows(m, "float32", from_base=from_base)}


def test_mask_recovering_little_of_the_base_kl_is_not_the_tuned_model():
    # a short fine-tune: the base is already within 3.5e-5 of the tuned model, and the top 0.01%
    # recovers 1% of that; the absolute cut-off alone would say "Practically the tuned model"
    s = quality_sentence(3.5e-5, 7e-5, 1.0, RANDOM, base_kl=3.535e-5, base_top1=1.0)
    assert s.startswith("About as far from the tuned model as the base (KL 3.5e-05 nats/token, "
                        "recovering 1.0% of the base's 3.5e-05)")
    assert "Top-1 agreement 100.0%, the base's 100.0%." in s
    assert "Practically" not in s and "Close" not in s
    assert "Practically the tuned model" in quality_sentence(3.5e-5, 7e-5, 1.0, RANDOM)


def test_close_needs_half_of_the_base_kl_and_a_better_top1_than_the_base():
    # keep 10% at KL 5e-3: the cut-off says close, but the base itself is at 6e-3
    s = quality_sentence(5e-3, 0.02, 0.26, RANDOM, base_kl=6e-3, base_top1=0.26)
    assert s.startswith("Partway from the base to the tuned model (KL 0.005 nats/token, "
                        "recovering 16.7% of the base's 0.006)")
    # most of the base's KL recovered, but top-1 agreement no better than the untouched base's
    s = quality_sentence(5e-3, 0.02, 0.26, RANDOM, base_kl=0.05, base_top1=0.26)
    assert s.startswith("Partway from the base to the tuned model") and "Close" not in s
    assert quality_sentence(5e-3, 0.02, 0.9, RANDOM, base_kl=0.012,
                            base_top1=0.26).startswith("Close to the tuned model")
    # 80% recovered is close but not "practically", however small the KL
    assert quality_sentence(2e-4, 1e-3, 1.0, RANDOM, base_kl=1e-3,
                            base_top1=1.0).startswith("Close to the tuned model")
    s = quality_sentence(1e-4, 1e-3, 0.99, RANDOM, base_kl=0.01, base_top1=0.5)
    assert s.startswith("Practically the tuned model (KL 0.0001 nats/token, recovering 99.0% of "
                        "the base's 0.01); 10x closer than a random mask")
    s = quality_sentence(0.03, 0.05, 0.6, RANDOM, base_kl=0.1, base_top1=0.5)
    assert s.startswith("Noticeably different from the tuned model (KL 0.03 nats/token, "
                        "recovering 70.0% of the base's 0.1)")


def test_mask_further_than_the_base_and_a_base_with_the_tuned_outputs():
    s = quality_sentence(2e-3, 3e-3, 0.9, RANDOM, base_kl=1e-3, base_top1=0.95)
    assert s.startswith("Further from the tuned model than the base (KL 0.002 nats/token, "
                        "above the base's 0.001)")
    s = quality_sentence(2e-3, 3e-3, 0.9, RANDOM, base_kl=0.0, base_top1=1.0)  # no division
    assert s.startswith("Further from the tuned model than the base (KL 0.002 nats/token, "
                        "above the base's 0)")


def test_without_the_base_kl_top1_no_better_than_the_base_rules_out_closeness():
    s = quality_sentence(1e-4, 1e-3, 0.26, RANDOM, base_top1=0.26)
    assert s.startswith("No closer to the tuned model than the base in top-1 agreement")
    assert quality_sentence(1e-4, 1e-3, 0.3, RANDOM,
                            base_top1=0.26).startswith("Practically the tuned model")


SPARSE = {
    "sparse/kl_at_keep_0.0001": 3.5e-5, "sparse/kl_at_keep_0.0001_random": 3.6e-5,
    "sparse/kept_ratio_at_keep_0.0001": 1e-4, "sparse/top1_agree_at_keep_0.0001": 1.0,
    "sparse/kl_at_keep_0.1": 8e-6, "sparse/kl_at_keep_0.1_random": 3e-5,
    "sparse/kept_ratio_at_keep_0.1": 0.1, "sparse/top1_agree_at_keep_0.1": 1.0,
    "lowrank/kl_at_r1": 3e-5, "lowrank/top1_agree_at_r1": 1.0, "sparse/kl_at_budget_r1": 3e-5,
    "drift/kl_now_base": 3.53e-5, "drift/kl_base_now": 9e-5, "drift/top1_agree": 1.0,
    "param_change/exact_unchanged_ratio": 0.2, "param_change/bf16_unchanged_ratio": 0.3,
}


def test_diff_rows_and_card_read_masks_against_the_base_and_run_rows_do_not():
    assert base_reference(SPARSE) == (3.53e-5, 1.0)  # KL(P_tuned || P_base), as sparse/kl
    assert base_reference({"drift/kl_now_base": float("nan")}) == (None, None)
    diff = _rows(SPARSE, from_base=True)
    tiny = diff["Keep the largest 0.01% of changes"][1]
    assert tiny.startswith("About as far from the tuned model as the base (KL 3.5e-05 nats/token, "
                           "recovering 0.8% of the base's 3.5e-05)")
    assert diff["Keep the largest 10.0% of changes"][1].startswith("Close to the tuned model")
    assert diff["LoRA rank 1"][1].startswith("Partway from the base to the tuned model (KL 3e-05")
    run = _rows(SPARSE)  # a run's sparse/* is one interval's update: drift/* is no reference
    assert run["Keep the largest 0.01% of changes"][1].startswith("Practically the tuned model")
    chosen = [e for e in headline.entries([set(SPARSE)]) if e.kind == "mask"]
    card = headline.cards(chosen, [("diff", SPARSE)], "float32", from_base=True)[0]
    assert card.reading.startswith("Close to the tuned model (KL 8e-06 nats/token, recovering")
    m = {**SPARSE, "sparse/kl_at_keep_0.1": 3.5e-5}
    card = headline.cards(chosen, [("diff", m)], "float32", from_base=True)[0]
    assert card.reading.startswith("About as far from the tuned model as the base")
    card = headline.cards(chosen, [("run", m)])[0]
    assert card.reading.startswith("Practically the tuned model")


IDENTICAL = {
    "param_change/relative_norm": 0.0, "param_change/norm_l2": 0.0,
    "param_change/norm_max": 0.0, "param_change/exact_unchanged_ratio": 1.0,
    "param_change/bf16_unchanged_ratio": 1.0, "param_change/layer_0/mean_abs_delta": 0.0,
    "param_change/layer_1/mean_abs_delta": 0.0, "param_change/component/q_proj/mean_abs_delta": 0.0,
    "param_change/component/k_proj/mean_abs_delta": 0.0,
    "sparse/kl_at_keep_0.1": 0.0, "sparse/kl_at_keep_0.1_random": 0.0,
    "sparse/kept_ratio_at_keep_0.1": 0.0, "sparse/top1_agree_at_keep_0.1": 1.0,
    "lowrank/energy_at_r1": float("nan"), "lowrank/energy_at_r8": float("nan"),
    "lowrank/kl_at_r1": 0.0, "sparse/kl_at_budget_r1": 0.0,
    "drift/kl_now_base": 0.0, "drift/kl_base_now": 0.0, "drift/top1_agree": 1.0,
}


def test_identical_checkpoints_say_no_entry_moved():
    for dtype in ("float32", "bfloat16", None):
        s = unchanged_sentence(1.0, 1.0, dtype)
        assert s == ("No entry moved: the weights are identical in the analysed parameters "
                     "(no update).")
    rows = _rows(IDENTICAL, from_base=True)
    text = " ".join(f"{v} {s}" for v, s in rows.values())
    assert "is sparse" not in text and "inf" not in text and "far from low-rank" not in text
    assert rows["Largest layer"] == ("none", "No layer moved (mean |dW| 0 in each).")
    assert rows["Largest component"] == ("none", "No component moved (mean |dW| 0 in each).")
    assert rows["Keep the largest 10.0% of changes"][1] == "Nothing to keep: no entry moved."
    assert rows["LoRA rank 1"][1] == "Nothing to keep: no entry moved."
    assert rows["Low-rank energy"][1] == "Nothing to decompose: no entry moved."
    chosen = headline.entries([set(IDENTICAL)])
    cards = {c.title: c.reading for c in headline.cards(chosen, [("diff", IDENTICAL)],
                                                        "float32", from_base=True)}
    assert cards["KL: largest 10% vs random 10%"] == "Nothing to keep: no entry moved."
    assert cards["Unchanged entries"].startswith("No entry moved")


def test_median_layer_that_did_not_move_gives_no_ratio():
    m = {"param_change/layer_0/mean_abs_delta": 2e-4, "param_change/layer_1/mean_abs_delta": 0.0,
         "param_change/layer_2/mean_abs_delta": 0.0}
    assert _rows(m)["Largest layer"] == ("layer_0",
                                         "Mean |dW| 0.0002; the median layer did not move.")
    m["param_change/layer_1/mean_abs_delta"] = 1e-4
    assert _rows(m)["Largest layer"] == ("layer_0", "Mean |dW| 0.0002, 2.0x the median layer.")


def test_a_nan_kl_or_layer_mean_gets_no_verdict():
    """No compared token (a NaN KL) or a NaN layer mean: nothing is claimed."""
    from grail.trainer.analysis.report import text

    nan = float("nan")
    assert quality_sentence(nan, 0.5, None, "a random mask", base_kl=0.1).startswith(
        "Not available.")
    for v, med in ((nan, 0.5), (0.5, nan)):
        _, group, meaning = text._largest("layer", "layer_1", v, med)
        assert group == "layer_1" and "the median layer" not in meaning and "nanx" not in meaning


def test_a_mask_beside_its_random_baseline_reads_as_the_ratio_of_their_kls():
    def cmp(kl, baseline):
        return quality_sentence(kl, baseline, None, RANDOM, base_kl=0.005223).split("; ")[1]

    # a factor of 1.67 is no longer "about as close"
    assert cmp(0.002634, 0.004403) == "1.67x closer than a random mask of the same size."
    assert cmp(1e-4, 1.2e-4) == "about as close as a random mask of the same size."
    assert cmp(1.2e-4, 1e-4) == "about as close as a random mask of the same size."
    assert cmp(0.004, 0.002) == "a random mask of the same size does 2x better."
    assert cmp(1e-4, 1.5e-3) == "15x closer than a random mask of the same size."
    assert cmp(1e-4, 1.25e-4) == "1.25x closer than a random mask of the same size."
    assert cmp(1e-4, 1.98e-4) == "1.98x closer than a random mask of the same size."
    for baseline in (math.nan, math.inf):  # no comparison with a baseline that is not a number
        s = quality_sentence(1e-4, baseline, None, RANDOM, base_kl=0.005223)
        assert "random" not in s and s.startswith("Practically the tuned model")


def test_the_update_size_trend_uses_finite_values_and_says_unchanged():
    from grail.trainer.analysis.report.text import run_summary

    def trend(values):
        records = [{"step": 2 * (i + 1), "metrics": {"param_change/relative_norm": v}}
                   for i, v in enumerate(values)]
        rows = {q: (v, s) for q, v, s in run_summary(records)}
        return rows.get("Update size trend")

    assert trend([0.1, 0.1])[1].endswith("(unchanged).")
    assert trend([0.2, 0.1])[1].endswith("(shrinking).")
    value, said = trend([math.nan, 0.02, 0.017])  # a first measurement logged as null
    assert value == "2.0% -> 1.7%" and "at step 4 and at step 6" in said
    assert trend([math.nan, 0.02]) is None  # one finite value: no trend


def test_the_update_size_sentence_names_the_interval_and_skips_missing_values():
    rows = _rows({"param_change/relative_norm": 0.1})
    said = rows["Update size"][1]
    assert "of the norm of the weights at the start of the interval." in said
    assert "n/a" not in said and "largest" not in said
    rows = _rows({"param_change/relative_norm": 0.1, "param_change/norm_l2": 2.0,
                  "param_change/norm_max": 0.5}, from_base=True)
    assert rows["Update size"][1] == ("||dW||_2 = 2 is 10.0% of the base weights' norm; the "
                                      "largest single change is 0.5.")
