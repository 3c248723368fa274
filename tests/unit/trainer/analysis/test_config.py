"""AnalysisConfig: validation of every field, presets, serialisation."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grail.trainer.analysis.config import SNAPSHOT_DTYPES, AnalysisConfig, format_threshold
from grail.trainer.analysis.metrics.sparse_quality import format_keep_ratio

FIELDS = [f.name for f in dataclasses.fields(AnalysisConfig)]
BOOL_FIELDS = [f.name for f in dataclasses.fields(AnalysisConfig) if f.type in ("bool", bool)]


def _raises(field: str, value, **extra):
    """Constructing with ``field=value`` raises a ValueError naming the field and the value."""
    with pytest.raises(ValueError) as info:
        AnalysisConfig(**{field: value}, **extra)
    msg = str(info.value)
    assert f"AnalysisConfig.{field}=" in msg, msg
    assert repr(value) in msg, msg
    return msg


# --- defaults -------------------------------------------------------------------------------


def test_defaults_match_the_design():
    cfg = AnalysisConfig()
    assert cfg.interval == 100
    assert cfg.snapshot_device == "cpu"
    assert cfg.snapshot_dtype == "auto"
    assert cfg.trainable_only is False
    assert cfg.param_change_enabled is True
    assert cfg.param_change_thresholds == [0.0, 1e-8, 1e-6, 1e-4]
    assert cfg.param_change_per_layer is False
    assert cfg.param_change_track_components is False
    assert cfg.param_change_track_sign_flips is False
    assert cfg.sparse_quality_enabled is True
    assert cfg.sparse_quality_thresholds == [1e-6]
    assert cfg.sparse_quality_include_random is True
    assert cfg.sparse_quality_seed == 0
    assert cfg.component_map == {}


def test_defaults_are_not_shared_between_instances():
    a, b = AnalysisConfig(), AnalysisConfig()
    a.param_change_thresholds.append(1.0)
    a.component_map["x"] = "y"
    assert b.param_change_thresholds == [0.0, 1e-8, 1e-6, 1e-4]
    assert b.component_map == {}


def test_every_bool_field_is_known():
    # The bool check iterates over fields by annotation; make sure it sees all of them.
    assert len(BOOL_FIELDS) >= 15
    assert "trainable_only" in BOOL_FIELDS and "low_rank_quality_enabled" in BOOL_FIELDS


# --- integers -------------------------------------------------------------------------------

INT_FIELDS = [
    # (field, lowest valid, highest valid or None)
    ("interval", 1, None),
    ("sparse_quality_seed", 0, 2**63 - 1),
    ("sparse_quality_max_tokens", 1, None),
    ("histogram_samples", 0, 10_000_000),
    ("low_rank_exact_max_dim", 1, None),
    ("low_rank_oversampling", 0, 256),
    ("low_rank_power_iterations", 0, 32),
]


@pytest.mark.parametrize(("field", "low", "high"), INT_FIELDS)
def test_integer_fields_accept_their_range(field, low, high):
    assert getattr(AnalysisConfig(**{field: low}), field) == low
    if high is not None:
        assert getattr(AnalysisConfig(**{field: high}), field) == high
    else:
        assert getattr(AnalysisConfig(**{field: 10**6}), field) == 10**6


@pytest.mark.parametrize(("field", "low", "high"), INT_FIELDS)
def test_integer_fields_reject_out_of_range(field, low, high):
    msg = _raises(field, low - 1)
    assert f">= {low}" in msg or f"[{low}, {high}]" in msg
    if high is not None:
        msg = _raises(field, high + 1)
        assert f"[{low}, {high}]" in msg


@pytest.mark.parametrize(("field", "low", "high"), INT_FIELDS)
@pytest.mark.parametrize("bad", [True, False, 2.0, "3", None, [1]])
def test_integer_fields_reject_non_integers(field, low, high, bad):
    msg = _raises(field, bad)
    assert "integer" in msg


# --- booleans -------------------------------------------------------------------------------


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0])
def test_bool_fields_reject_non_bools(field, bad):
    msg = _raises(field, bad)
    assert "True or False" in msg


@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_bool_fields_accept_both_values(field):
    for value in (True, False):
        assert getattr(AnalysisConfig(**{field: value}), field) is value


# --- snapshot device and dtype ---------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "xpu:0"])
def test_snapshot_device_accepts_device_strings_without_checking_availability(device):
    assert AnalysisConfig(snapshot_device=device).snapshot_device == device


@pytest.mark.parametrize("device", ["gpu", "meta", "", "cuda:x", "cpu:-1:2", "tpu"])
def test_snapshot_device_rejects_unknown_devices(device):
    msg = _raises("snapshot_device", device)
    assert "cpu" in msg and "cuda" in msg


@pytest.mark.parametrize("device", [None, 0, ["cpu"]])
def test_snapshot_device_rejects_non_strings(device):
    _raises("snapshot_device", device)


@pytest.mark.parametrize("dtype", sorted(SNAPSHOT_DTYPES))
def test_snapshot_dtype_accepts_known_names(dtype):
    assert AnalysisConfig(snapshot_dtype=dtype).snapshot_dtype == dtype


@pytest.mark.parametrize("dtype", ["fp32", "float64", "bf16", "", None, 32, ["auto"], {"a": 1}])
def test_snapshot_dtype_rejects_everything_else(dtype):
    msg = _raises("snapshot_dtype", dtype)
    for name in SNAPSHOT_DTYPES:
        assert repr(name) in msg


def test_snapshot_dtype_rejects_torch_dtypes():
    import torch

    _raises("snapshot_dtype", torch.float32)


# --- component map --------------------------------------------------------------------------


def test_component_map_accepts_str_to_str():
    cfg = AnalysisConfig(component_map={"q_proj": "attn", "k_proj": "attn"})
    assert cfg.component_map == {"q_proj": "attn", "k_proj": "attn"}


@pytest.mark.parametrize(
    "bad", [[("q_proj", "attn")], {"q_proj": ""}, {"q_proj": 1}, {1: "attn"}, "q_proj", None]
)
def test_component_map_rejects_bad_values(bad):
    msg = _raises("component_map", bad)
    assert "dict" in msg


# --- thresholds ---------------------------------------------------------------------------

THRESHOLD_FIELDS = ["param_change_thresholds", "sparse_quality_thresholds", "gradient_thresholds"]


@pytest.mark.parametrize("field", THRESHOLD_FIELDS)
def test_thresholds_are_sorted_deduplicated_floats(field):
    cfg = AnalysisConfig(**{field: [1e-4, 0, 1e-6, 1e-4]})
    values = getattr(cfg, field)
    assert values == [0.0, 1e-6, 1e-4]
    assert all(type(v) is float for v in values)


@pytest.mark.parametrize("field", THRESHOLD_FIELDS)
def test_thresholds_accept_tuple_and_scalar(field):
    assert getattr(AnalysisConfig(**{field: (1e-3, 1e-5)}), field) == [1e-5, 1e-3]
    assert getattr(AnalysisConfig(**{field: 1e-5}), field) == [1e-5]


@pytest.mark.parametrize("field", THRESHOLD_FIELDS)
@pytest.mark.parametrize("bad", [-1e-6, math.nan, math.inf, -math.inf, "1e-6", None, True, [1e-6]])
def test_thresholds_reject_bad_entries(field, bad):
    values = [1e-4, bad]
    msg = _raises(field, values)
    assert "finite number >= 0" in msg
    assert f"(got {bad!r})" in msg


@pytest.mark.parametrize("field", THRESHOLD_FIELDS)
@pytest.mark.parametrize("bad", ["1e-6", None, {1e-6: 1}])
def test_thresholds_reject_non_lists(field, bad):
    _raises(field, bad)


@pytest.mark.parametrize("field", THRESHOLD_FIELDS)
@pytest.mark.parametrize(("a", "b"), [(1.5e-6, 2e-6), (1e-6, 1.2e-6), (0.95e-4, 1e-4)])
def test_thresholds_with_colliding_keys_are_rejected(field, a, b):
    assert format_threshold(a) == format_threshold(b)  # the premise of the test
    msg = _raises(field, [a, b])
    assert repr(format_threshold(a)) in msg
    assert repr(a) in msg and repr(b) in msg


def test_thresholds_that_format_differently_are_accepted():
    cfg = AnalysisConfig(param_change_thresholds=[1e-6, 3e-6, 1e-5, 0.0])
    keys = [format_threshold(t) for t in cfg.param_change_thresholds]
    assert keys == ["0e+00", "1e-06", "3e-06", "1e-05"]


def test_format_threshold_is_the_design_format():
    for t in (0.0, 1e-8, 1e-6, 1e-4, 0.5, 3.0):
        assert format_threshold(t) == f"{t:.0e}"
    assert format_threshold(1e-6) == "1e-06"
    assert format_threshold(0.0) == "0e+00"


def test_negative_zero_threshold_is_stored_and_formatted_as_zero():
    assert format_threshold(-0.0) == "0e+00"
    for field in THRESHOLD_FIELDS:
        for values in ([-0.0], [1e-6, -0.0], -0.0, [-0.0, 0.0]):
            stored = getattr(AnalysisConfig(**{field: values}), field)
            assert stored[0] == 0.0 and math.copysign(1.0, stored[0]) == 1.0, (field, values)
            assert format_threshold(stored[0]) == f"{stored[0]:.0e}" == "0e+00"


def test_empty_thresholds():
    _raises("param_change_thresholds", [])
    _raises("gradient_thresholds", [])
    # sparse quality may run on keep ratios alone ...
    cfg = AnalysisConfig(sparse_quality_thresholds=[], sparse_quality_keep_ratios=[0.1])
    assert cfg.sparse_quality_thresholds == []
    # ... or be disabled; enabled with neither is an error naming the field
    assert AnalysisConfig(sparse_quality_thresholds=[], sparse_quality_enabled=False)
    msg = _raises("sparse_quality_thresholds", [])
    assert "keep ratios" in msg


# --- keep ratios, ranks, tolerance ------------------------------------------------------------


def test_keep_ratios_sorted_floats():
    cfg = AnalysisConfig(sparse_quality_keep_ratios=[0.5, 1, 0.01])
    assert cfg.sparse_quality_keep_ratios == [0.01, 0.5, 1.0]
    assert all(type(v) is float for v in cfg.sparse_quality_keep_ratios)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0000001, 2, math.nan, math.inf, True, "0.1", None])
def test_keep_ratios_reject_values_outside_unit_interval(bad):
    msg = _raises("sparse_quality_keep_ratios", [0.1, bad])
    assert "(0, 1]" in msg
    assert f"(got {bad!r})" in msg


@pytest.mark.parametrize("bad", [0.1, None, "0.1"])
def test_keep_ratios_reject_non_lists(bad):
    _raises("sparse_quality_keep_ratios", bad)


def test_keep_ratios_reject_duplicates():
    msg = _raises("sparse_quality_keep_ratios", [0.1, 0.1])
    assert "unique" in msg


@pytest.mark.parametrize(
    ("a", "b"), [(0.1, 0.1000000001), (0.01, 0.0100000004), (0.3333333, 0.33333334)]
)
def test_keep_ratios_with_colliding_keys_are_rejected(a, b):
    assert a != b and format_keep_ratio(a) == format_keep_ratio(b)  # the premise
    for values in ([a, b], [b, 0.5, a]):
        msg = _raises("sparse_quality_keep_ratios", values)
        assert repr(a) in msg and repr(b) in msg
        assert repr(format_keep_ratio(a)) in msg


def test_keep_ratios_that_format_differently_are_accepted():
    cfg = AnalysisConfig(sparse_quality_keep_ratios=[0.1, 0.100001, 0.01])
    assert [format_keep_ratio(r) for r in cfg.sparse_quality_keep_ratios] == [
        "keep_0.01", "keep_0.1", "keep_0.100001"
    ]


def test_ranks_sorted():
    assert AnalysisConfig(low_rank_ranks=(64, 1, 8)).low_rank_ranks == [1, 8, 64]


@pytest.mark.parametrize("bad", [[], [0], [-1], [1.0], [True], ["1"], [1, 1], 4, None])
def test_ranks_rejected(bad):
    msg = _raises("low_rank_ranks", bad)
    assert "rank" in msg or "integers >= 1" in msg


@pytest.mark.parametrize("good", [1e-6, 0.1, 0.999999])
def test_adam_sign_tolerance_accepts_open_unit_interval(good):
    assert AnalysisConfig(adam_sign_tolerance=good).adam_sign_tolerance == good


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.5, math.nan, math.inf, True, "0.1", None])
def test_adam_sign_tolerance_rejected(bad):
    msg = _raises("adam_sign_tolerance", bad)
    assert "(0, 1)" in msg


def test_adam_sign_tolerance_int_free_float():
    assert type(AnalysisConfig(adam_sign_tolerance=0.25).adam_sign_tolerance) is float


# --- presets ------------------------------------------------------------------------------


FAMILIES = [
    "param_change_enabled",
    "sparse_quality_enabled",
    "gradient_enabled",
    "adam_sign_enabled",
    "low_rank_enabled",
]


def test_minimal_preset_is_param_change_only():
    cfg = AnalysisConfig.minimal()
    assert cfg.interval == 500
    assert {f: getattr(cfg, f) for f in FAMILIES} == {
        f: f == "param_change_enabled" for f in FAMILIES
    }
    assert not cfg.param_change_per_layer and not cfg.param_change_track_components


def test_comprehensive_preset_turns_everything_on():
    cfg = AnalysisConfig.comprehensive()
    assert cfg.interval == 50
    families = [f for f in FIELDS if f.endswith("_enabled")]
    assert families and all(getattr(cfg, f) is True for f in families), {
        f: getattr(cfg, f) for f in families
    }
    breakdowns = [f for f in FIELDS if "per_layer" in f or "track_" in f]
    assert breakdowns and all(getattr(cfg, f) is True for f in breakdowns), {
        f: getattr(cfg, f) for f in breakdowns
    }


@pytest.mark.parametrize("preset", [AnalysisConfig.minimal, AnalysisConfig.comprehensive])
def test_preset_overrides_win_and_are_validated(preset):
    cfg = preset(interval=7, sparse_quality_seed=3)
    assert cfg.interval == 7 and cfg.sparse_quality_seed == 3
    with pytest.raises(ValueError, match=r"AnalysisConfig\.interval=0"):
        preset(interval=0)
    with pytest.raises(TypeError):
        preset(no_such_option=1)


def test_minimal_can_reenable_sparse_quality():
    assert AnalysisConfig.minimal(sparse_quality_enabled=True).sparse_quality_enabled is True


# --- serialisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        AnalysisConfig(),
        AnalysisConfig.minimal(),
        AnalysisConfig.comprehensive(component_map={"a": "b"}),
    ],
)
def test_to_dict_from_dict_round_trip(cfg):
    data = cfg.to_dict()
    assert sorted(data) == sorted(FIELDS)
    assert AnalysisConfig.from_dict(data) == cfg
    # JSON-ready: survives a text round trip unchanged
    assert AnalysisConfig.from_dict(json.loads(json.dumps(data))) == cfg


def test_to_dict_returns_copies():
    cfg = AnalysisConfig(component_map={"q_proj": "attn"}, sparse_quality_keep_ratios=[0.1])
    data = cfg.to_dict()
    data["param_change_thresholds"].append(0.5)
    data["sparse_quality_thresholds"].clear()
    data["sparse_quality_keep_ratios"].append(0.2)
    data["low_rank_ranks"].append(128)
    data["component_map"]["k_proj"] = "attn"
    data["interval"] = 3
    assert cfg == AnalysisConfig(component_map={"q_proj": "attn"}, sparse_quality_keep_ratios=[0.1])
    assert cfg.to_dict() != data


def test_from_dict_unknown_keys_list_the_valid_ones():
    with pytest.raises(ValueError) as info:
        AnalysisConfig.from_dict({"interval": 10, "intervall": 5, "zzz": 1})
    msg = str(info.value)
    assert "['intervall', 'zzz']" in msg
    for name in FIELDS:
        assert re.search(rf"'{name}'", msg), name


@pytest.mark.parametrize("bad", [None, [("interval", 10)], "interval=10", 3])
def test_from_dict_of_a_non_mapping_says_a_dict_is_expected(bad):
    with pytest.raises(TypeError, match=r"from_dict expects a dict") as info:
        AnalysisConfig.from_dict(bad)
    assert type(bad).__name__ in str(info.value)


def test_from_dict_accepts_any_mapping():
    from types import MappingProxyType

    assert AnalysisConfig.from_dict(MappingProxyType({"interval": 7})) == AnalysisConfig(interval=7)


def test_from_dict_partial_uses_defaults_and_validates():
    assert AnalysisConfig.from_dict({"interval": 10}) == AnalysisConfig(interval=10)
    assert AnalysisConfig.from_dict({}) == AnalysisConfig()
    with pytest.raises(ValueError, match="interval"):
        AnalysisConfig.from_dict({"interval": -1})


_finite_threshold = st.one_of(
    st.just(0.0), st.floats(min_value=1e-12, max_value=10.0, allow_nan=False)
)


def _unique_keys(values: list[float]) -> list[float]:
    seen: dict[str, float] = {}
    for v in values:
        seen.setdefault(format_threshold(v), v)
    return list(seen.values())


_configs = st.builds(
    AnalysisConfig,
    interval=st.integers(1, 10**6),
    snapshot_device=st.sampled_from(["cpu", "cuda", "cuda:3", "mps"]),
    snapshot_dtype=st.sampled_from(sorted(SNAPSHOT_DTYPES)),
    trainable_only=st.booleans(),
    component_map=st.dictionaries(st.text(max_size=8), st.text(min_size=1, max_size=8), max_size=3),
    param_change_thresholds=st.lists(_finite_threshold, min_size=1, max_size=5).map(_unique_keys),
    param_change_per_layer=st.booleans(),
    sparse_quality_thresholds=st.lists(_finite_threshold, min_size=1, max_size=3).map(_unique_keys),
    sparse_quality_seed=st.integers(0, 2**63 - 1),
    sparse_quality_keep_ratios=st.lists(
        st.floats(min_value=1e-6, max_value=1.0, exclude_min=False), max_size=3
    ).map(lambda rs: list({format_keep_ratio(r): r for r in rs}.values())),
    sparse_quality_max_tokens=st.integers(1, 10**5),
    adam_sign_tolerance=st.floats(min_value=1e-6, max_value=0.999),
    histogram_samples=st.integers(0, 10**5),
    low_rank_ranks=st.lists(st.integers(1, 512), min_size=1, max_size=4, unique=True),
    low_rank_oversampling=st.integers(0, 64),
)


@settings(max_examples=60, deadline=None)
@given(_configs)
def test_round_trip_property(cfg):
    data = cfg.to_dict()
    again = AnalysisConfig.from_dict(data)
    assert again == cfg
    assert again.to_dict() == data
    assert AnalysisConfig.from_dict(json.loads(json.dumps(data))) == cfg
    # validation is idempotent: stored values are already normalised
    assert again.param_change_thresholds == sorted(set(data["param_change_thresholds"]))


# --- error messages stay one readable line ---------------------------------------------------


def _long_error(field: str, value) -> str:
    with pytest.raises(ValueError) as info:
        AnalysisConfig(**{field: value})
    msg = str(info.value)
    assert f"AnalysisConfig.{field}=" in msg and "\n" not in msg
    assert len(msg) < 600, len(msg)
    return msg


def test_long_threshold_list_is_cut_in_the_error_but_names_the_bad_value():
    values = [1e-6 * (1 + i / 1000) for i in range(3000)] + [-1.0]
    msg = _long_error("param_change_thresholds", values)
    assert "(3001 values)" in msg and "(got -1.0)" in msg
    assert repr(values[0]) in msg and repr(values[9]) in msg and repr(values[10]) not in msg


def test_long_threshold_list_collision_names_both_values():
    values = [10.0**-k for k in range(1, 40)] + [1.5e-6, 2e-6]
    msg = _long_error("sparse_quality_thresholds", values)
    assert "(41 values)" in msg and "1.5e-06 and 2e-06" in msg


def test_long_keep_ratio_list_is_cut_in_the_error():
    values = [i / 2000 for i in range(1, 2001)] + [0.1000000001]
    msg = _long_error("sparse_quality_keep_ratios", values)
    assert "(2001 values)" in msg and "0.1 and 0.1000000001" in msg


def test_long_component_map_is_cut_in_the_error():
    bad = {f"proj_{i}": "group" for i in range(500)}
    bad["q_proj"] = ""
    msg = _long_error("component_map", bad)
    assert "(501 entries)" in msg and "'proj_0': 'group'" in msg


def test_short_lists_are_shown_whole():
    values = [1e-4] * 9 + [-1.0]
    msg = _raises("param_change_thresholds", values)  # repr(values) is in the message
    assert "values)" not in msg


def test_from_dict_many_unknown_keys_are_cut():
    data = {f"unknown_{i:04d}": i for i in range(1000)}
    with pytest.raises(ValueError) as info:
        AnalysisConfig.from_dict(data)
    msg = str(info.value)
    assert "unknown_0000" in msg and "(1000 values)" in msg and "unknown_0999" not in msg
    assert "'interval'" in msg  # the valid keys are still listed
