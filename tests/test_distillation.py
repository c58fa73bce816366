"""Distillation on tiny random models: the loss, the training loop, the student cache, the technique contract."""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import optuna
import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer

import search_spaces.distillation as distillation
import search_spaces.distillation.runs as runs
from evaluators.corpus import Document
from evaluators.memory import weight_bytes
from search_spaces.base import TECHNIQUES, BuildContext
from search_spaces.specs import SpecError
from search_spaces.distillation.train import kd_loss
from search_spaces.distillation import DistillSpace, DistillSpec, apply, estimate, key_material, report_of, suggest
from search_spaces.distillation.cache import student_key

optuna.logging.set_verbosity(optuna.logging.WARNING)
TOKENIZER = make_tiny_tokenizer()
DOCS = (Document("sonnet", SAMPLE_TEXT * 20),)
SPEC = DistillSpec(depth_keep=0.5, mlp_keep=0.5, steps=6, batch_size=2, seq_len=16, lr=1e-3,
                   importance_samples=4, importance_seq_len=16)


def teacher(make=make_tiny_llama):
    return make(vocab_size=len(TOKENIZER))


def context(cache_dir=None, **changes) -> BuildContext:
    fields = dict(tokenizer=TOKENIZER, calibration=DOCS, seed=0, cache_dir=cache_dir, model_id="tiny-llama",
                  progress=False)
    return BuildContext(**{**fields, **changes})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(5))


# --- the loss ----------------------------------------------------------------------------------------

def test_kd_loss_terms_match_their_definitions():
    generator = torch.Generator().manual_seed(0)
    student, teacher_logits = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    ids = torch.randint(0, 11, (2, 5), generator=generator)
    t = 3.0
    p = F.softmax(teacher_logits / t, dim=-1)
    kl = (p * (p.log() - F.log_softmax(student / t, dim=-1))).sum(-1).mean()
    ce = F.cross_entropy(student[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(kd_loss(student, teacher_logits, ids, t, 1.0), t * t * kl)
    torch.testing.assert_close(kd_loss(student, teacher_logits, ids, t, 0.0), ce)
    torch.testing.assert_close(kd_loss(student, teacher_logits, ids, t, 0.25), 0.25 * t * t * kl + 0.75 * ce)
    assert kd_loss(student, student, ids, t, 1.0).abs() < 1e-6


# --- training ------------------------------------------------------------------------------------------

def test_distilled_student_has_the_spec_shape_and_estimated_size():
    model = teacher()
    predicted = estimate(model, SPEC)
    student = apply(model, SPEC, context())
    config = student.config
    assert (config.num_hidden_layers, config.intermediate_size, config.num_key_value_heads) == (1, 32, 2)
    assert weight_bytes(student).total_bytes == predicted.weight_bytes
    # embedding vocab x 32 + one layer (attention 3072, half-width MLP 3 * 32*32, norms 64) + final norm 32
    expected = len(TOKENIZER) * 32 + 3072 + 3072 + 64 + 32
    assert sum(p.numel() for p in student.parameters()) == predicted.parameters == expected


def test_training_lowers_the_loss_clips_gradients_and_leaves_the_teacher_alone(monkeypatch):
    model = teacher()
    model.train()  # the caller's mode must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clips = []
    original_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, **kw: clips.append(max_norm) or original_clip(params, max_norm, **kw))
    spec = DistillSpec(depth_keep=0.5, steps=20, batch_size=2, seq_len=16, lr=3e-3, grad_clip=0.5,
                       importance_samples=4, importance_seq_len=16)
    student = apply(model, spec, context())
    report = report_of(student)
    assert report.final_loss < report.first_loss
    assert clips == [0.5] * 20
    assert report.steps == 20 and report.seconds_per_step > 0 and not report.cache_hit
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not student.training


def test_training_is_deterministic_under_the_seed():
    first = apply(teacher(), SPEC, context())
    second = apply(teacher(), SPEC, context())
    other = apply(teacher(), SPEC, context(seed=1))
    assert torch.equal(logits(first, IDS), logits(second, IDS))
    assert not torch.equal(logits(first, IDS), logits(other, IDS))


def test_random_init_is_a_fresh_model_of_the_same_shape():
    spec = DistillSpec.from_dict({**SPEC.to_dict(), "init": "random"})
    random_student = apply(teacher(), spec, context())
    pruned_student = apply(teacher(), SPEC, context())
    assert random_student.config.num_hidden_layers == pruned_student.config.num_hidden_layers == 1
    assert report_of(random_student).structure is None
    assert not torch.equal(logits(random_student, IDS), logits(pruned_student, IDS))


def test_progress_bar_shows_the_running_loss_only_when_asked(capsys):
    apply(teacher(), SPEC, context(progress=True))
    assert "loss=" in capsys.readouterr().err
    apply(teacher(), SPEC, context(progress=False))
    assert "loss=" not in capsys.readouterr().err


def test_gpt2_students_lose_layers_and_width():
    student = apply(teacher(make_tiny_gpt2), SPEC, context(model_id="tiny-gpt2"))
    assert (student.config.n_layer, student.config.n_inner) == (1, 64)


# --- the cache -----------------------------------------------------------------------------------------

def _no_training(*args, **kwargs):
    raise AssertionError("a cache hit must not train")


def test_second_request_is_a_cache_hit_that_trains_nothing(tmp_path, monkeypatch):
    model = teacher()
    first = apply(model, SPEC, context(tmp_path))
    assert not report_of(first).cache_hit
    monkeypatch.setattr(runs, "train_student", _no_training)
    monkeypatch.setattr(distillation, "derive_student", _no_training)
    second = apply(model, SPEC, context(tmp_path))
    report = report_of(second)
    assert report.cache_hit and report.cache_key == report_of(first).cache_key
    assert (report.trained_steps, report.steps) == (0, 6)
    assert report.seconds_per_step == report_of(first).seconds_per_step  # the cost of the run that made it
    assert torch.equal(logits(first, IDS), logits(second, IDS))
    lineage = tmp_path / "students" / report.cache_key.split("/")[0]
    assert sorted(p.name for p in lineage.iterdir()) == ["optimizer-6.pt", "steps-6"]  # no temporary leftovers


def test_a_longer_run_continues_the_cached_shorter_one_and_equals_training_in_one_go(tmp_path, monkeypatch):
    """The multi-fidelity check: 50 steps, then 50 more from the cached weights and optimizer state, give the
    weights 100 steps in one go give (same seed and data order), and the continuation trains 50 steps only."""
    model = teacher()
    spec = replace(SPEC, steps=50, lr=3e-3)
    short = apply(model, spec, context(tmp_path / "rungs"))
    trained_steps = []
    original = runs.train_student

    def counting(*args, **kwargs):
        stats, state = original(*args, **kwargs)
        trained_steps.append(stats.steps)
        return stats, state

    monkeypatch.setattr(runs, "train_student", counting)
    monkeypatch.setattr(distillation, "derive_student", _no_training)  # continued, never derived again
    continued = apply(model, replace(spec, steps=100), context(tmp_path / "rungs"))
    monkeypatch.undo()
    one_go = apply(model, replace(spec, steps=100), context(tmp_path / "one-go"))
    report = report_of(continued)
    assert trained_steps == [50]
    assert (report.steps, report.resumed_from, report.trained_steps, report.cache_hit) == (100, 50, 50, False)
    assert (report_of(one_go).resumed_from, report_of(one_go).trained_steps) == (0, 100)
    for (name, a), (_, b) in zip(continued.state_dict().items(), one_go.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(logits(short, IDS), logits(continued, IDS), atol=1e-4)  # the 50 more steps did train
    # Only the tip of a lineage keeps its optimizer state (it is the size of two copies of the weights).
    lineage = tmp_path / "rungs" / "students" / report.cache_key.split("/")[0]
    assert sorted(p.name for p in lineage.iterdir()) == ["optimizer-100.pt", "steps-100", "steps-50"]


def test_a_run_whose_optimizer_state_is_damaged_trains_from_the_start(tmp_path):
    model = teacher()
    short = apply(model, replace(SPEC, steps=3), context(tmp_path))
    state = tmp_path / "students" / report_of(short).cache_key.split("/")[0] / "optimizer-3.pt"
    state.write_bytes(state.read_bytes()[:-4] + b"0000")
    longer = report_of(apply(model, SPEC, context(tmp_path)))
    assert (longer.resumed_from, longer.trained_steps) == (0, 6)


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path):
    model = teacher()
    first = apply(model, SPEC, context(tmp_path))
    weights = tmp_path / "students" / report_of(first).cache_key / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # same size, different bytes
    with pytest.warns(RuntimeWarning, match="corrupt"):
        rebuilt = apply(model, SPEC, context(tmp_path))
    assert not report_of(rebuilt).cache_hit
    assert torch.equal(logits(first, IDS), logits(rebuilt, IDS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report_of(apply(model, SPEC, context(tmp_path))).cache_hit


def test_missing_manifest_is_corrupt_too(tmp_path):
    model = teacher()
    first = apply(model, SPEC, context(tmp_path))
    (tmp_path / "students" / report_of(first).cache_key / "entry.json").unlink()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert not report_of(apply(model, SPEC, context(tmp_path))).cache_hit


def test_key_covers_teacher_spec_data_and_seed():
    model = teacher()
    base = student_key(key_material(model, SPEC, context()))
    assert base == student_key(key_material(teacher(), SPEC, context()))
    changed = [
        key_material(model, DistillSpec.from_dict({**SPEC.to_dict(), "lr": 2e-3}), context()),
        key_material(model, SPEC, context(seed=1)),
        key_material(model, SPEC, context(model_id="other")),
        key_material(model, SPEC, context(calibration=(Document("sonnet", SAMPLE_TEXT * 21),))),
    ]
    assert len({base} | {student_key(m) for m in changed}) == 1 + len(changed)
    # The length is not part of the lineage: a longer run of the same student continues a shorter one.
    assert student_key(key_material(model, replace(SPEC, steps=7), context())) == base


def test_without_a_model_id_the_teacher_weights_identify_it():
    one, two = teacher(), teacher()
    with torch.no_grad():
        two.model.norm.weight[0] += 1
    keys = {student_key(key_material(m, SPEC, context(model_id=""))) for m in (one, two)}
    assert len(keys) == 2


# --- spec, space, suggest, registry --------------------------------------------------------------------

def test_spec_round_trips_and_names_bad_fields():
    assert DistillSpec.from_dict(SPEC.to_dict()) == SPEC
    for data, field in [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"), ({"steps": 0}, "steps"),
                        ({"lr": -1.0}, "lr"), ({"init": "zeros"}, "init"), ({"mlp_keep": 0.0}, "mlp_keep"),
                        ({"seq_len": 1}, "seq_len"), ({"depth_keep": 1.0, "mlp_keep": 1.0}, "depth_keep")]:
        with pytest.raises(SpecError, match=rf"^DistillSpec\.{field}\b"):
            DistillSpec.from_dict({**SPEC.to_dict(), **data})
    assert DistillSpec.from_dict({"depth_keep": 1.0, "init": "random"}).init == "random"
    assert SPEC.summary() == "distill(depth 0.5, mlp 0.5, 6 steps)"


def test_space_round_trips_and_names_bad_fields():
    space = DistillSpace(steps=(10, 20), lr=(1e-4, 3e-4))
    assert DistillSpace.from_dict(space.to_dict()) == space
    with pytest.raises(SpecError, match=r"^DistillSpace\.steps\[1\]"):
        DistillSpace.from_dict({"steps": [10, 0]})
    with pytest.raises(SpecError, match=r"^DistillSpace\.steps: rungs must ascend"):
        DistillSpace.from_dict({"steps": [20, 10]})
    with pytest.raises(SpecError, match=r"^DistillSpace\.promote_top"):
        DistillSpace.from_dict({"promote_top": 0})
    with pytest.raises(SpecError, match=r"^DistillSpace\.grad_clip"):
        DistillSpace.from_dict({"grad_clip": 0})


def test_suggest_with_real_trials():
    space = DistillSpace(depth_keep=(1.0, 0.5), mlp_keep=(1.0, 0.5), steps=(5, 10, 20), temperature=(1.0, 2.0))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    specs = []
    for _ in range(40):
        trial = study.ask()
        spec = suggest(trial, space)
        if spec is not None:
            assert DistillSpec.from_dict(spec.to_dict()) == spec and not spec.structure.is_identity
            assert "distillation.steps" not in trial.params  # the planner's rungs decide the steps
            specs.append(spec)
        study.tell(trial, 1.0)
    assert 5 < len(specs) < 40
    assert {s.steps for s in specs} == {5}  # every new student is screened at the first rung


def test_fitted_space_and_registry():
    fitted = TECHNIQUES["distillation"].fit_space(DistillSpace(depth_keep=(0.9, 0.5), heads_keep=(1.0, 0.5)), teacher(make_tiny_gpt2))
    assert fitted.heads_keep == (1.0,) and fitted.depth_keep == (0.9, 0.5)
    technique = TECHNIQUES["distillation"]
    assert (technique.order, technique.spec_type, technique.space_type) == (10, DistillSpec, DistillSpace)
    assert math.isclose(DistillSpec().alpha, 0.5)


# --- healing: a pruned model distilled from the uncompressed one, through the same cached runs ----------

def test_healing_trains_the_cut_model_against_the_teacher_and_continues_its_cached_run(tmp_path, monkeypatch):
    import search_spaces.pruning as pruning

    source = teacher()
    spec = pruning.PruneSpec(depth_keep=0.5, mlp_keep=0.5, calibration_samples=4, calibration_seq_len=16,
                             heal_steps=3, heal_seq_len=16, heal_lr=1e-3)
    built = lambda s, cache: pruning.apply(copy.deepcopy(source), s, context(cache, teacher=source))  # noqa: E731
    cut_only = built(replace(spec, heal_steps=0), None)
    healed = built(spec, tmp_path)
    report = pruning.report_of(healed)
    assert (report.healing.steps, report.healing.trained_steps) == (3, 3)
    assert healed.config.num_hidden_layers == cut_only.config.num_hidden_layers == 1
    assert not torch.allclose(logits(cut_only, IDS), logits(healed, IDS), atol=1e-4)
    assert report.structure.kept_layers == pruning.report_of(cut_only).structure.kept_layers
    assert spec.summary() == "prune(depth 0.5, mlp 0.5, healed 3 steps)"
    monkeypatch.setattr(pruning, "cut", _no_training)  # a cached or continued heal never cuts again
    again = pruning.report_of(built(spec, tmp_path))
    assert again.healing.cache_hit and again.structure.kept_layers == report.structure.kept_layers
    longer = pruning.report_of(built(replace(spec, heal_steps=6), tmp_path)).healing
    assert (longer.resumed_from, longer.trained_steps) == (3, 3)


def test_healing_refuses_what_it_cannot_heal():
    from search_spaces.pruning import PruneSpec

    with pytest.raises(SpecError, match=r"^PruneSpec\.heal_steps: healing trains a structurally cut model"):
        PruneSpec(sparsity={"mlp": 0.5}, mlp_keep=0.5, heal_steps=4)
    with pytest.raises(SpecError, match=r"^PruneSpec\.heal_steps"):
        PruneSpec(heal_steps=4)
