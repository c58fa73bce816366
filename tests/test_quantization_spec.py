"""Quantization specs, search spaces, plans and `suggest`: no model is built here."""
import json

import optuna
import pytest
import torch

from conftest import make_tiny_gpt2, make_tiny_llama
from search_spaces.base import TECHNIQUES
from search_spaces.specs import SpecError
from search_spaces.quantization.grid import effective_group_size
from search_spaces.quantization.plan import plan_layers
from search_spaces.quantization import (
    QUANT_METHODS, STORAGE_SCHEMES, GPTQSettings, LayerOverride, QuantSpace, QuantSpec, available_methods,
    estimate_weight_bytes, presets, scheme_space_defaults, suggest,
)
from search_spaces.quantization.spec import AllocationSettings, method_runs_on
import targets  # noqa: E402,F401  (registers llama.cpp's own quantizer, llama-quant)

QUANTIZATION = TECHNIQUES["quantization"]

EXAMPLES = [
    QuantSpec(),
    QuantSpec(method="rtn", bits={"attn": 8, "mlp": 2, "head": 16}, group_size=None, symmetric=False,
              overrides=(LayerOverride("*.down_proj", 16), LayerOverride("model.layers.0.*", 8))),
    QuantSpec(method="gptq", bits={"attn": 3, "mlp": 3}, group_size=64, gptq=GPTQSettings(samples=8, seq_len=64,
                                                                                         damp=0.05, act_order=False)),
    QuantSpec(method="bnb", bits={"attn": 8, "mlp": 16}),
    QuantSpec(method="bnb", bits={"attn": 4, "mlp": 4}, bnb_4bit_type="fp4"),
    QuantSpec(method="dynamic-int8", bits={"attn": 8, "mlp": 8}, overrides=(LayerOverride("*.o_proj", 16),)),
    QuantSpec(method="llama-quant", bits={"attn": 4, "mlp": 4, "head": 16}, grid="gguf", group_size=32,
              allocation=AllocationSettings(bpw=5.5, types="k", speed=0.1, exclude=("Q2_K",))),
]


def test_every_registered_method_round_trips_on_every_grid_it_stores_on():
    """Whatever is registered (a plug-in's methods and grids too): specs each method's own suggest draws on each
    grid it accepts come back equal from their plain dict, as a recipe stores them."""
    for name, method in QUANT_METHODS.items():
        grids = [scheme.name for scheme in STORAGE_SCHEMES.values() if method.accepts(scheme)]
        assert grids, f"{name} stores on no registered grid"
        for grid in grids:
            space = QuantSpace.from_dict({**scheme_space_defaults(grid), "methods": [name]})
            specs = [spec for _, spec in _sample(space, trials=8)]
            assert {(spec.method, spec.grid) for spec in specs} == {(name, grid)}
            for spec in specs:
                data = json.loads(json.dumps(spec.to_dict()))
                assert data == spec.to_dict() and QuantSpec.from_dict(data) == spec


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda s: s.method)
def test_every_method_round_trips_through_a_plain_dict(spec):
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain types only: what a YAML recipe stores
    assert QuantSpec.from_dict(json.loads(json.dumps(data))) == spec


@pytest.mark.parametrize("data, field", [
    ({"method": "awq"}, "QuantSpec.method"),
    ({"bits": {"attn": 5, "mlp": 4}}, "QuantSpec.bits.attn"),
    ({"bits": {"attn": True, "mlp": 4}}, "QuantSpec.bits.attn"),
    ({"bits": {"attn": 4}}, "QuantSpec.bits.mlp"),
    ({"bits": {"attn": 4, "mlp": 4, "embed": 4}}, "QuantSpec.bits.embed"),
    ({"group_size": 48}, "QuantSpec.group_size"),
    ({"symmetric": "yes"}, "QuantSpec.symmetric"),
    ({"method": "bnb", "bits": {"attn": 3, "mlp": 4}}, "QuantSpec.bits.attn"),
    ({"method": "bnb", "bits": {"attn": 4, "mlp": 8}}, "QuantSpec.bits"),
    ({"method": "bnb", "bits": {"attn": 4, "mlp": 4, "head": 16}}, "QuantSpec.bits.head"),
    ({"method": "bnb", "bnb_4bit_type": "int4"}, "QuantSpec.bnb_4bit_type"),
    ({"method": "dynamic-int8", "bits": {"attn": 4, "mlp": 8}}, "QuantSpec.bits.attn"),
    ({"method": "dynamic-int8", "bits": {"attn": 8, "mlp": 8}, "overrides": [{"pattern": "*", "bits": 4}]},
     "QuantSpec.overrides[0].bits"),
    ({"overrides": [{"pattern": "", "bits": 4}]}, "QuantSpec.overrides[0].pattern"),
    ({"overrides": [{"pattern": "*", "bits": 8}, {"pattern": "*", "bits": 6}]}, "QuantSpec.overrides[1].bits"),
    ({"gptq": {"damp": 2.0}}, "QuantSpec.gptq.damp"),
    ({"gptq": {"samples": 0}}, "QuantSpec.gptq.samples"),
    ({"gptq": {"act_order": "no"}}, "QuantSpec.gptq.act_order"),
    ({"colour": "red"}, "QuantSpec.colour"),
])
def test_bad_spec_values_name_the_field(data, field):
    with pytest.raises(SpecError) as caught:
        QuantSpec.from_dict(data)
    assert str(caught.value).startswith(field), str(caught.value)


@pytest.mark.parametrize("data, field", [
    ({"methods": ["awq"]}, "QuantSpace.methods[0]"),
    ({"methods": []}, "QuantSpace.methods"),
    ({"bits": [4, 5]}, "QuantSpace.bits[1]"),
    ({"head_bits": [None, 7]}, "QuantSpace.head_bits[1]"),
    ({"group_sizes": [100]}, "QuantSpace.group_sizes[0]"),
    ({"symmetric": [1]}, "QuantSpace.symmetric[0]"),
    ({"bnb_modes": ["int4"]}, "QuantSpace.bnb_modes[0]"),
    ({"bits": [4, 4]}, "QuantSpace.bits"),
    ({"device": "tpu:what"}, "QuantSpace.device"),
    ({"gptq": {"seq_len": 2}}, "QuantSpace.gptq.seq_len"),
])
def test_bad_space_values_name_the_field(data, field):
    with pytest.raises(SpecError) as caught:
        QuantSpace.from_dict(data)
    assert str(caught.value).startswith(field), str(caught.value)


def test_space_round_trips_and_is_registered():
    space = QuantSpace(methods=("none", "gptq"), bits=(3, 4), head_bits=(), group_sizes=(None, 64),
                       gptq=GPTQSettings(samples=4))
    assert QuantSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    technique = TECHNIQUES["quantization"]
    assert (technique.order, technique.spec_type, technique.space_type) == (30, QuantSpec, QuantSpace)
    model, spec = make_tiny_llama(), QuantSpec(bits={"attn": 4, "mlp": 8})
    assert technique.weight_bytes(model, spec) == estimate_weight_bytes(model, spec)
    assert technique.presets(space) == presets(space)


def test_summaries_are_short_and_say_what_matters():
    assert [spec.summary() for spec in EXAMPLES] == [
        "quant(rtn 4/4 g128)",
        "quant(rtn 8/2/h16 per-channel asym +2 overrides)",
        "quant(gptq 3/3 g64)",
        "quant(bnb int8 8/16)",
        "quant(bnb fp4 4/4)",
        "quant(dynamic-int8 8/8 +1 overrides)",
        "quant(llama-quant 5.5bpw k gptq -Q2_K speed 0.1)",
    ]


# ---------------------------------------------------------------------------------------------------
# suggest, with real Optuna trials
# ---------------------------------------------------------------------------------------------------


def _sample(space, trials=150, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = []
    for _ in range(trials):
        trial = study.ask()
        drawn.append((trial, suggest(trial, space)))
        study.tell(trial, 0.0)
    return drawn


def test_suggest_draws_only_valid_specs_that_run_on_the_device():
    space = QuantSpace()
    drawn = _sample(space)
    specs = [spec for _, spec in drawn if spec is not None]
    # every registered method that stores on the default grid is reachable on the CPU (llama-quant: on gguf only)
    default = STORAGE_SCHEMES[space.grid]
    assert {s.method for s in specs} == {n for n, m in QUANT_METHODS.items() if m.accepts(default)}
    assert {"rtn", "gptq", "bnb", "dynamic-int8"} <= {s.method for s in specs}
    gguf = _sample(QuantSpace(grid="gguf", bits=(4, 5, 8, 16), group_sizes=(32,), head_bits=(None, 16, 8, 4)), 60)
    assert "llama-quant" in {spec.method for _, spec in gguf if spec is not None}
    assert any(spec is None for _, spec in drawn)  # and so is "no quantization"
    for trial, spec in drawn:
        if spec is None:
            assert trial.params["quantization.method"] == "none"
            continue
        assert QuantSpec.from_dict(spec.to_dict()) == spec  # re-validated from its dict
        assert method_runs_on(spec.method, space.device)
        assert all(b in QUANT_METHODS[spec.method].bits for b in spec.bits.values())
        if all(b == 16 for b in spec.bits.values()):  # conditional parameters: grid settings only when used
            assert not any(name.endswith("group_size") for name in trial.params)
    heads = {s.bits.get("head") for s in specs if s.method in ("rtn", "gptq")}
    assert heads == {None, 16, 8, 4}


def test_suggest_never_offers_a_method_the_device_cannot_run():
    space = QuantSpace(device="cuda")  # no GPU needed: only the space's device is consulted
    assert "dynamic-int8" not in available_methods(space)
    assert all(spec is None or spec.method != "dynamic-int8" for _, spec in _sample(space, trials=60))
    with pytest.raises(SpecError, match="QuantSpace.methods"):
        suggest(optuna.create_study().ask(), QuantSpace(methods=("dynamic-int8",), device="cuda"))


def test_suggest_follows_a_narrowed_space_and_can_be_switched_off():
    space = QuantSpace(methods=("gptq",), bits=(3,), head_bits=(), group_sizes=(None,), gptq=GPTQSettings(samples=4))
    for _, spec in _sample(space, trials=5):
        assert spec == QuantSpec(method="gptq", bits={"attn": 3, "mlp": 3}, group_size=None,
                                 gptq=GPTQSettings(samples=4))
    trial = optuna.create_study().ask()
    assert suggest(trial, QuantSpace(enabled=False)) is None
    assert trial.params == {}


def test_presets_switch_the_stage_off_then_give_hand_picked_candidates():
    space = QuantSpace()
    study = optuna.create_study()
    specs = []
    for params in [QUANTIZATION.off(space), *presets(space)]:
        study.enqueue_trial(QUANTIZATION.qualified(params))
        trial = study.ask()
        specs.append(suggest(trial, space))
        study.tell(trial, 0.0)
    assert specs[0] is None
    drawn = [(s.method, s.bits["attn"], s.bits["mlp"]) for s in specs[1:]]
    # each available method's own presets, method by method in registry order (a plug-in's among them)
    assert [m for m, _, _ in drawn] == [m.name for m in QUANT_METHODS.values() if m.name in available_methods(space)
                                        for _ in m.presets(space)]
    assert [d for d in drawn if d[0] in ("rtn", "gptq", "dynamic-int8")] == [  # the project's own, by hand
        ("rtn", 8, 8), ("rtn", 4, 4), ("gptq", 4, 4), ("dynamic-int8", 8, 8)]
    narrow = QuantSpace(methods=("gptq",), bits=(3, 4), mixed=False)  # cannot switch off, no rtn
    assert QUANTIZATION.off(narrow) == {}
    assert [QUANTIZATION.qualified(p) for p in presets(narrow)] == [
        {"quantization.method": "gptq", "quantization.gptq.bits": 4}]


def test_bnb_and_dynamic_suggestions_use_their_own_bit_widths():
    drawn = _sample(QuantSpace(methods=("bnb", "dynamic-int8")), trials=80)
    modes = {(s.method, s.bnb_mode if s.method == "bnb" else None) for _, s in drawn}
    assert modes == {("bnb", "int8"), ("bnb", "nf4"), ("bnb", "fp4"), ("dynamic-int8", None)}
    quantized_groups = set()
    for _, spec in drawn:
        assert set(spec.bits) == {"attn", "mlp"}
        quantized = {group for group, bits in spec.bits.items() if bits < 16}
        assert quantized and len({spec.bits[g] for g in quantized}) == 1  # something quantized, in one mode
        quantized_groups.add(frozenset(quantized))
    assert quantized_groups == {frozenset({"attn", "mlp"}), frozenset({"attn"}), frozenset({"mlp"})}


# ---------------------------------------------------------------------------------------------------
# Plans: which layer gets which format
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, requested, used", [
    (576, 128, 64), (576, 64, 64), (1536, 128, 128), (32, 128, 32), (48, 32, None), (100, 64, None), (576, None, None),
])
def test_group_size_halves_until_it_divides_the_input_width(width, requested, used):
    assert effective_group_size(width, requested) == used


def test_overrides_match_by_glob_and_the_first_match_wins():
    spec = QuantSpec(bits={"attn": 4, "mlp": 4}, overrides=(LayerOverride("model.layers.0.*", 8),
                                                            LayerOverride("*.down_proj", 2)))
    bits = {p.name: p.fmt.bits for p in plan_layers(make_tiny_llama(), spec).layers}
    assert bits["model.layers.0.mlp.down_proj"] == 8
    assert bits["model.layers.1.mlp.down_proj"] == 2
    assert bits["model.layers.1.self_attn.q_proj"] == 4
    assert len(bits) == 14  # 7 linear layers per block, no head setting: head and embedding untouched


def test_an_override_that_matches_nothing_is_an_error():
    spec = QuantSpec(overrides=(LayerOverride("*.gate_proj", 8),))
    with pytest.raises(SpecError, match=r"QuantSpec.overrides\[0\].pattern"):
        plan_layers(make_tiny_gpt2(), spec)  # GPT-2 has no gate_proj


def test_tied_head_at_16_bits_stays_shared_and_below_16_is_untied():
    model = make_tiny_llama()
    shared = plan_layers(model, QuantSpec(bits={"attn": 4, "mlp": 4, "head": 16})).by_name()
    assert not plan_layers(model, QuantSpec(bits={"attn": 4, "mlp": 4, "head": 16})).untie_head
    assert shared["lm_head"].shared_with == "model.embed_tokens"
    assert shared["model.embed_tokens"].fmt.bits == 16
    untied = plan_layers(model, QuantSpec(bits={"attn": 4, "mlp": 4, "head": 4}))
    assert untied.untie_head
    assert untied.by_name()["lm_head"].fmt.bits == 4 and untied.by_name()["lm_head"].shared_with is None
    assert untied.by_name()["model.embed_tokens"].fmt.bits == 16


def test_plans_read_shapes_only_so_meta_models_work():
    with torch.device("meta"):
        model = make_tiny_gpt2()
    plan = plan_layers(model, QuantSpec(bits={"attn": 4, "mlp": 8}, group_size=32))
    c_fc = plan.by_name()["transformer.h.0.mlp.c_fc"]
    assert (c_fc.out_features, c_fc.in_features, c_fc.transposed, c_fc.fmt.group_size) == (128, 32, True, 32)


@pytest.mark.parametrize("group_size, fallbacks, label", [
    # hidden 32, MLP 64: a group of 64 fits only down_proj (input 64); every other layer halves to 32.
    (64, {"q_proj": 32, "k_proj": 32, "v_proj": 32, "o_proj": 32, "gate_proj": 32, "up_proj": 32},
     "quant(rtn 4/4 g64*)"),
    (32, {}, "quant(rtn 4/4 g32)"),
    (None, {}, "quant(rtn 4/4 per-channel)"),
    # 128 fits nothing: halved to 64 where the input is 64 wide, to 32 elsewhere.
    (128, {"q_proj": 32, "k_proj": 32, "v_proj": 32, "o_proj": 32, "gate_proj": 32, "up_proj": 32,
           "down_proj": 64}, "quant(rtn 4/4 g128*)"),
])
def test_a_group_size_some_layers_cannot_use_is_stated_not_hidden(group_size, fallbacks, label):
    model = make_tiny_llama()
    spec = QuantSpec(bits={"attn": 4, "mlp": 4}, group_size=group_size)
    notes = QUANTIZATION.storage_notes(model, spec)
    used = notes.get("group_size_fallbacks", {})
    assert {name.rsplit(".", 1)[1]: size for name, size in used.items()} == fallbacks
    assert len(used) == (2 * len(fallbacks))  # both decoder layers, named one by one
    assert QUANTIZATION.describe(spec, notes) == label
    # What the notes say is what the plan (and so the packed checkpoint) really uses.
    plan = {p.name: p.fmt.group_size for p in plan_layers(model, spec).layers if p.quantized}
    assert all(plan[name] == size for name, size in used.items())
    assert QUANTIZATION.storage_notes(model, QuantSpec(method="dynamic-int8", bits={"attn": 8, "mlp": 8})) == {}
