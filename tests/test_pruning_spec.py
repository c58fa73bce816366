"""The pruning technique's contract: spec and space round-trip through dicts, bad values name their field,
suggest works with a real Optuna trial, apply respects the registry entry."""
from __future__ import annotations

import optuna
import pytest
from conftest import SAMPLE_TEXT, make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer

from evaluators.corpus import Document
from search_spaces.base import TECHNIQUES, BuildContext
from search_spaces.specs import SpecError
from search_spaces.pruning import PruneSpace, PruneSpec, apply, estimate, report_of, suggest

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_spec_round_trips_through_a_plain_dict():
    spec = PruneSpec(depth_keep=0.8, mlp_keep=0.75, heads_keep=0.67, sparsity={"attn": 0.25, "mlp": 0.5},
                     method="magnitude", calibration_samples=8, calibration_seq_len=64)
    data = spec.to_dict()
    assert data["sparsity"] == {"attn": 0.25, "mlp": 0.5} and data["method"] == "magnitude"
    assert PruneSpec.from_dict(data) == spec
    assert PruneSpec.from_dict({}) == PruneSpec()
    assert PruneSpec.from_dict({"mlp_keep": 1}).mlp_keep == 1.0
    assert spec.summary() == "prune(depth 0.8, mlp 0.75, heads 0.67, magnitude attn 0.25 mlp 0.5)"


@pytest.mark.parametrize("data, field", [
    ({"mlp_keep": 0}, "PruneSpec.mlp_keep"),
    ({"depth_keep": 1.5}, "PruneSpec.depth_keep"),
    ({"heads_keep": "half"}, "PruneSpec.heads_keep"),
    ({"sparsity": {"head": 0.5}}, "PruneSpec.sparsity.head"),
    ({"sparsity": {"mlp": 1.0}}, "PruneSpec.sparsity.mlp"),
    ({"pattern": "2:4", "sparsity": {"mlp": 0.3}}, "PruneSpec.sparsity.mlp"),
    ({"pattern": "3:4"}, "PruneSpec.pattern"),
    ({"method": "sparsegpt"}, "PruneSpec.method"),
    ({"calibration_samples": 0}, "PruneSpec.calibration_samples"),
    ({"bogus": 1}, "PruneSpec.bogus"),
])
def test_bad_spec_values_name_their_field(data, field):
    with pytest.raises(SpecError, match=rf"^{field}\b"):
        PruneSpec.from_dict(data)


@pytest.mark.parametrize("data, field", [
    ({"mlp_keep": []}, "PruneSpace.mlp_keep"),
    ({"depth_keep": [1.0, 1.5]}, r"PruneSpace.depth_keep\[1\]"),
    ({"sparsity": {"mlp": [0.0, 0.0]}}, "PruneSpace.sparsity.mlp"),
    ({"pattern": ["dense"]}, r"PruneSpace.pattern\[0\]"),
    ({"enabled": []}, "PruneSpace.enabled"),
])
def test_bad_space_values_name_their_field(data, field):
    with pytest.raises(SpecError, match=rf"^{field}"):
        PruneSpace.from_dict(data)


def test_space_round_trips_and_narrows():
    space = PruneSpace(mlp_keep=(1.0, 0.5), sparsity={"mlp": (0.0, 0.5)}, pattern=("unstructured", "2:4"))
    assert PruneSpace.from_dict(space.to_dict()) == space
    assert PruneSpace.from_dict({"depth_keep": [0.9]}).depth_keep == (0.9,)


def test_suggest_with_real_trials_returns_valid_specs_or_none():
    space = PruneSpace(depth_keep=(1.0, 0.5), mlp_keep=(1.0, 0.75, 0.5), heads_keep=(1.0, 0.5),
                       sparsity={"attn": (0.0, 0.25), "mlp": (0.0, 0.5)}, method=("magnitude", "wanda"),
                       pattern=("unstructured", "2:4"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    specs = []
    for _ in range(120):
        trial = study.ask()
        spec = suggest(trial, space)
        if spec is not None:
            assert PruneSpec.from_dict(spec.to_dict()) == spec
            assert not spec.is_identity
            if spec.pattern == "2:4":
                assert set(spec.sparsity.values()) <= {0.0, 0.5}
            specs.append(spec)
        study.tell(trial, 1.0)
    assert 20 < len(specs) < 120  # the stage is sometimes off
    healed = [s for s in specs if s.heal_steps]
    assert healed and {s.heal_steps for s in healed} == {space.heal_steps[0]}  # screened at the first rung
    assert not any(s.is_sparse or s.structure.is_identity for s in healed)  # only structural cuts are healed
    assert {s.pattern for s in specs} == {"unstructured", "2:4"}
    assert any(s.structure.is_identity for s in specs) and any(not s.structure.is_identity for s in specs)


def test_suggest_off_and_fixed_choices_record_no_parameters():
    study = optuna.create_study()
    trial = study.ask()
    assert suggest(trial, PruneSpace(enabled=(False,))) is None
    spec = suggest(trial, PruneSpace(enabled=(True,), depth_keep=(0.5,), mlp_keep=(1.0,), heads_keep=(1.0,),
                                     heal=(False,)))
    assert spec == PruneSpec(depth_keep=0.5)
    assert trial.params == {}


def test_fitted_space_drops_what_the_model_cannot_take():
    gpt2 = TECHNIQUES["pruning"].fit_space(PruneSpace(heads_keep=(1.0, 0.5), depth_keep=(1.0, 0.9, 0.5)), make_tiny_gpt2())
    assert gpt2.heads_keep == (1.0,) and gpt2.depth_keep == (1.0, 0.5)
    llama = TECHNIQUES["pruning"].fit_space(PruneSpace(heads_keep=(1.0, 0.5)), make_tiny_llama())
    assert llama.heads_keep == (1.0, 0.5)


def test_the_planners_fit_leaves_2_4_out_where_a_width_is_not_a_multiple_of_4():
    technique, space = TECHNIQUES["pruning"], PruneSpace(pattern=("unstructured", "2:4"), heads_keep=(1.0, 0.5))
    odd, reasons = technique.fit(space, make_tiny_llama(intermediate_size=62))  # down_proj reads 62 columns
    assert odd.pattern == ("unstructured",) and odd.heads_keep == (1.0, 0.5) and "heads_keep" not in reasons
    assert "rounds to all of them" in reasons["depth_keep"]  # 2 layers: 0.9 and 0.8 keep both
    assert technique.fit_space(space, make_tiny_llama(intermediate_size=62)) == odd
    assert technique.fit(space, make_tiny_llama())[0].pattern == ("unstructured", "2:4")
    gpt2 = technique.fit(PruneSpace(heads_keep=(1.0, 0.5)), make_tiny_gpt2())[1]
    assert "derives the head width" in gpt2["heads_keep"]


def test_registered_and_applied_in_place_with_a_report():
    technique = TECHNIQUES["pruning"]
    assert (technique.order, technique.spec_type, technique.space_type) == (20, PruneSpec, PruneSpace)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    context = BuildContext(tokenizer=tokenizer, calibration=[Document("s", SAMPLE_TEXT * 10)], progress=False)
    spec = PruneSpec(depth_keep=0.5, mlp_keep=0.5, calibration_samples=4, calibration_seq_len=16)
    predicted = estimate(model, spec)
    result = technique.apply(model, spec, context)
    assert result is model  # documented: pruning works in place
    report = report_of(result)
    assert len(report.structure.kept_layers) == 1 and report.structure.shape.intermediate == 32
    assert sum(p.numel() for p in model.parameters()) == predicted.parameters


def test_apply_refuses_gpt2_head_pruning_naming_the_field():
    tokenizer = make_tiny_tokenizer()
    context = BuildContext(tokenizer=tokenizer, calibration=[Document("s", SAMPLE_TEXT)], progress=False)
    with pytest.raises(SpecError, match=r"^PruneSpec\.heads_keep: gpt2 derives the head width"):
        apply(make_tiny_gpt2(vocab_size=len(tokenizer)), PruneSpec(heads_keep=0.5), context)
