"""ParameterNaming: layer and component groups from parameter names, for several architectures."""

from __future__ import annotations

import random

import pytest
from torch import nn

from grail.trainer.analysis.core.naming import ParameterNaming, split_name
from tests.conftest import tiny_gpt2, tiny_qwen2


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _groups(naming: ParameterNaming) -> dict[str, tuple[str | None, str]]:
    return {n: (naming.layer(n), naming.component(n)) for n in naming.names}


# --- split_name ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "model.layers.3.self_attn.q_proj.weight",
            ("model.layers", 3, "self_attn.q_proj", "weight"),
        ),
        ("transformer.h.11.mlp.c_proj.bias", ("transformer.h", 11, "mlp.c_proj", "bias")),
        ("lm_head.weight", (None, None, "lm_head", "weight")),
        ("0.weight", ("", 0, "", "weight")),
        ("cls_token", (None, None, "", "cls_token")),
        ("model.layers.2.mlp.experts.7.w1.weight", ("model.layers", 2, "mlp.experts.w1", "weight")),
    ],
)
def test_split_name(name, expected):
    assert split_name(name) == expected


# --- Qwen2 (Llama family) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_names():
    return _names(tiny_qwen2(layers=4))


def test_qwen2_layers_and_components(qwen_names):
    n = ParameterNaming(qwen_names)
    assert n.layer("model.layers.3.self_attn.q_proj.weight") == "layer_3"
    assert n.component("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert n.component("model.layers.3.self_attn.q_proj.bias") == "q_proj"
    assert n.layer("model.layers.0.mlp.down_proj.weight") == "layer_0"
    assert n.component("model.layers.0.mlp.down_proj.weight") == "down_proj"
    assert n.component("model.layers.1.input_layernorm.weight") == "input_layernorm"
    for name, comp in [
        ("model.embed_tokens.weight", "embed_tokens"),
        ("model.norm.weight", "norm"),
        ("lm_head.weight", "lm_head"),
    ]:
        assert n.layer(name) is None
        assert n.component(name) == comp
    assert n.layers() == ["layer_0", "layer_1", "layer_2", "layer_3"]
    assert set(n.components()) == {
        "embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
        "down_proj", "input_layernorm", "post_attention_layernorm", "norm", "lm_head",
    }  # fmt: skip


def test_every_layer_parameter_is_in_exactly_its_layer(qwen_names):
    n = ParameterNaming(qwen_names)
    for name in qwen_names:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            assert n.layer(name) == f"layer_{int(parts[2])}"
        else:
            assert n.layer(name) is None


# --- GPT-2 ----------------------------------------------------------------------------------


def test_gpt2_layers_and_components():
    names = _names(tiny_gpt2(layers=4))
    n = ParameterNaming(names)
    assert n.layer("transformer.h.3.attn.c_attn.weight") == "layer_3"
    assert n.component("transformer.h.3.attn.c_attn.weight") == "c_attn"
    # c_proj exists in attention and in the MLP: they must not be merged
    attn = n.component("transformer.h.0.attn.c_proj.weight")
    mlp = n.component("transformer.h.0.mlp.c_proj.weight")
    assert attn != mlp
    assert (attn, mlp) == ("attn.c_proj", "mlp.c_proj")
    assert n.component("transformer.h.2.attn.c_proj.bias") == attn
    assert n.component("transformer.h.1.mlp.c_fc.weight") == "c_fc"
    assert n.layer("transformer.wte.weight") is None
    assert n.component("transformer.wte.weight") == "wte"
    assert n.component("transformer.ln_f.bias") == "ln_f"
    assert n.layers() == [f"layer_{i}" for i in range(4)]
    assert len(set(n.components())) == len(n.components())


# --- plain nn.Sequential ----------------------------------------------------------------------


def test_sequential_mlp():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    n = ParameterNaming(_names(model))
    assert _groups(n) == {
        "0.weight": ("layer_0", "weight"),
        "0.bias": ("layer_0", "bias"),
        "2.weight": ("layer_2", "weight"),
        "2.bias": ("layer_2", "bias"),
    }
    assert n.layers() == ["layer_0", "layer_2"]
    assert n.components() == ["weight", "bias"]


def test_sequential_inside_a_module_with_head():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
            self.head = nn.Linear(3, 1)

    n = ParameterNaming(_names(Net()))
    assert n.layer("body.2.weight") == "layer_2"
    assert n.component("body.2.weight") == "weight"
    assert n.layer("head.weight") is None
    assert n.component("head.bias") == "head"


# --- T5-like encoder-decoder -----------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_names():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2
    )
    return _names(T5ForConditionalGeneration(cfg))


def test_t5_two_trunks_get_prefixed_layers(t5_names):
    n = ParameterNaming(t5_names)
    assert n.layer("encoder.block.1.layer.0.SelfAttention.q.weight") == "encoder.block.layer_1"
    assert n.layer("decoder.block.1.layer.0.SelfAttention.q.weight") == "decoder.block.layer_1"
    # the sub-layer index inside a block does not create a second level of layers
    assert n.layer("decoder.block.2.layer.2.DenseReluDense.wo.weight") == "decoder.block.layer_2"
    assert n.layers() == [
        "encoder.block.layer_0",
        "encoder.block.layer_1",
        "decoder.block.layer_0",
        "decoder.block.layer_1",
        "decoder.block.layer_2",
    ]
    for name in (
        "shared.weight",
        "encoder.final_layer_norm.weight",
        "decoder.final_layer_norm.weight",
    ):
        assert n.layer(name) is None
    assert n.component("shared.weight") == "shared"
    # self- and cross-attention projections of the same name stay apart
    self_q = n.component("decoder.block.0.layer.0.SelfAttention.q.weight")
    cross_q = n.component("decoder.block.0.layer.1.EncDecAttention.q.weight")
    assert self_q != cross_q
    assert self_q == n.component("encoder.block.1.layer.0.SelfAttention.q.weight")
    assert n.component("encoder.final_layer_norm.weight") != n.component(
        "decoder.final_layer_norm.weight"
    )


def test_single_trunk_with_prefix_stays_unprefixed():
    names = ["encoder.block.0.w.weight", "encoder.block.1.w.weight", "head.weight"]
    n = ParameterNaming(names)
    assert [n.layer(x) for x in names] == ["layer_0", "layer_1", None]


# --- MoE, PEFT ------------------------------------------------------------------------------


def test_moe_experts_grouped_into_one_component():
    names = [
        f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
        for layer in range(2)
        for e in range(8)
        for proj in ("gate_proj", "up_proj", "down_proj")
    ]
    names += [f"model.layers.{layer}.mlp.gate.weight" for layer in range(2)]
    names += [f"model.layers.{layer}.mlp.shared_expert.gate_proj.weight" for layer in range(2)]
    n = ParameterNaming(names)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        comps = {n.component(x) for x in names if ".experts." in x and proj in x}
        assert len(comps) == 1, comps
    assert n.layer("model.layers.1.mlp.experts.7.down_proj.weight") == "layer_1"
    routed = n.component("model.layers.0.mlp.experts.3.gate_proj.weight")
    shared = n.component("model.layers.0.mlp.shared_expert.gate_proj.weight")
    assert routed != shared
    assert n.component("model.layers.0.mlp.gate.weight") not in (routed, shared)
    # no expert index leaks into a group name
    assert not any(ch.isdigit() for c in n.components() for ch in c)


def test_fused_moe_experts_from_a_real_model():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    names = _names(MixtralForCausalLM(cfg))
    n = ParameterNaming(names)
    expert_params = [x for x in names if ".experts." in x]
    assert expert_params
    assert len({n.component(x) for x in expert_params}) == 1
    assert {n.layer(x) for x in expert_params} == {"layer_0", "layer_1"}


def test_peft_lora_names():
    prefix = "base_model.model.model.layers"
    names = ["base_model.model.model.embed_tokens.weight"]
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            base = f"{prefix}.{layer}.self_attn.{proj}"
            names += [
                f"{base}.base_layer.weight",
                f"{base}.lora_A.default.weight",
                f"{base}.lora_B.default.weight",
            ]
    n = ParameterNaming(names)
    assert n.layer(f"{prefix}.1.self_attn.q_proj.lora_A.default.weight") == "layer_1"
    assert n.layer("base_model.model.model.embed_tokens.weight") is None
    comps = {}
    for proj in ("q_proj", "v_proj"):
        for part in ("base_layer", "lora_A", "lora_B"):
            group = {n.component(x) for x in names if proj in x and part in x}
            assert len(group) == 1, group  # same group in both layers
            (comps[proj, part],) = group
            assert proj in comps[proj, part] and part in comps[proj, part]
    assert len(set(comps.values())) == 6  # A/B/base of q and v all distinct


# --- component_map and determinism -----------------------------------------------------------


def test_component_map_renames(qwen_names):
    mapping = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn"}
    n = ParameterNaming(qwen_names, component_map=mapping)
    plain = ParameterNaming(qwen_names)
    for name in qwen_names:
        expected = mapping.get(plain.component(name), plain.component(name))
        assert n.component(name) == expected
        assert n.layer(name) == plain.layer(name)
    assert "attn" in n.components() and "q_proj" not in n.components()
    assert n.components().count("attn") == 1


def test_component_map_uses_the_shortened_names():
    n = ParameterNaming(_names(tiny_gpt2()), component_map={"attn.c_proj": "attention_out"})
    assert n.component("transformer.h.0.attn.c_proj.weight") == "attention_out"
    assert n.component("transformer.h.0.mlp.c_proj.weight") == "mlp.c_proj"


def test_component_map_is_copied():
    mapping = {"q_proj": "attn"}
    n = ParameterNaming(["model.layers.0.self_attn.q_proj.weight"], component_map=mapping)
    mapping["q_proj"] = "changed"
    assert n.component("model.layers.0.self_attn.q_proj.weight") == "attn"


def test_deterministic_and_independent_of_name_order(t5_names, qwen_names):
    for names in (t5_names, qwen_names, _names(tiny_gpt2())):
        first = _groups(ParameterNaming(names))
        assert _groups(ParameterNaming(list(names))) == first
        shuffled = list(names)
        random.Random(0).shuffle(shuffled)
        assert _groups(ParameterNaming(shuffled)) == first
        assert ParameterNaming(iter(names)).names == list(names)


def test_unknown_name_raises_key_error(qwen_names):
    n = ParameterNaming(qwen_names)
    with pytest.raises(KeyError):
        n.layer("not.a.parameter")
    with pytest.raises(KeyError):
        n.component("not.a.parameter")


def test_empty():
    n = ParameterNaming([])
    assert n.layers() == [] and n.components() == []


def test_path_that_is_a_suffix_of_another_stays_distinct():
    names = ["blocks.0.attn.weight", "blocks.0.cross.attn.weight", "blocks.1.attn.weight"]
    n = ParameterNaming(names)
    assert n.component(names[0]) == n.component(names[2]) == "attn"
    assert n.component(names[1]) == "cross.attn"


def test_works_on_module_tree_of_a_live_model():
    # names from a model wrapped in another module: only the prefix changes
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_qwen2()

    names = _names(Wrapper())
    n = ParameterNaming(names)
    assert n.layer("inner.model.layers.1.mlp.up_proj.weight") == "layer_1"
    assert n.component("inner.model.layers.1.mlp.up_proj.weight") == "up_proj"
    assert n.component("inner.lm_head.weight") == "lm_head"
