"""The teacher's states of the training windows, stored once a study (search_spaces/distillation/teacher.py): a
run that reads them trains exactly as one that runs the whole teacher, runs only the teacher's head, and a
teacher whose logits are not its head on its last hidden state is never split."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_llama, make_tiny_tokenizer

import search_spaces.distillation.teacher as teacher_module
from evaluators.corpus import Document
from search_spaces.base import BuildContext
from search_spaces.distillation import DistillSpec, apply, report_of
from search_spaces.distillation.teacher import TeacherStates
from search_spaces.distillation.train import TrainSettings, train_student

TOKENIZER = make_tiny_tokenizer()
SETTINGS = TrainSettings(steps=3, batch_size=2, lr=1e-3, temperature=2.0, alpha=0.5, grad_clip=1.0)
WINDOWS = torch.randint(0, 100, (6, 16), generator=torch.Generator().manual_seed(1))
MATERIAL = {"teacher": "tiny", "teacher_dtype": "torch.float32", "data": "d", "seed": 0, "kind": "distill"}


def _models(seed: int = 0):
    torch.manual_seed(seed)
    teacher = make_tiny_llama(vocab_size=len(TOKENIZER))
    student = make_tiny_llama(vocab_size=len(TOKENIZER))
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # a student that differs from its teacher, so the soft term has something to teach
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.02)
    return teacher, student


def _trained(teacher, student, states=None):
    stats, _ = train_student(student, teacher, WINDOWS, SETTINGS, seed=0, progress=False, teacher_states=states)
    return stats, {k: v.clone() for k, v in student.state_dict().items()}


def _base_calls(teacher) -> list:
    calls = []
    teacher.base_model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_stored_states_train_the_student_bit_for_bit_as_the_whole_teacher_does(tmp_path):
    teacher, student = _models()
    plain_stats, plain = _trained(teacher, student)
    states = TeacherStates.of_run(tmp_path, MATERIAL, SETTINGS.batch_size, 16)
    _, first = _trained(*_models(), states)  # stores windows 0..5
    assert (states.read, states.computed) == (0, 6)
    assert sorted(p.name for p in states.folder.iterdir()) == [f"{i}.pt" for i in range(6)]  # no partial files

    teacher, student = _models()
    calls = _base_calls(teacher)
    again = TeacherStates.of_run(tmp_path, MATERIAL, SETTINGS.batch_size, 16)
    again_stats, read = _trained(teacher, student, again)
    assert (again.read, again.computed) == (6, 0) and calls == []  # only the head ran
    for name in plain:
        assert torch.equal(plain[name], first[name]) and torch.equal(plain[name], read[name]), name
    assert again_stats.final_loss == plain_stats.final_loss


def test_states_are_keyed_by_teacher_data_seed_batch_and_length_not_by_the_student(tmp_path):
    folder = TeacherStates.of_run(tmp_path, MATERIAL, 2, 16).folder
    other_student = {**MATERIAL, "kind": "heal", "spec": {"mlp_keep": 0.5}}
    assert TeacherStates.of_run(tmp_path, other_student, 2, 16).folder == folder
    for changed in ({"teacher": "other"}, {"teacher_dtype": "torch.bfloat16"}, {"data": "e"}, {"seed": 1},
                    {"teacher_upstream": [{"technique": "distillation"}]}):
        assert TeacherStates.of_run(tmp_path, {**MATERIAL, **changed}, 2, 16).folder != folder
    assert TeacherStates.of_run(tmp_path, MATERIAL, 4, 16).folder != folder
    assert TeacherStates.of_run(tmp_path, MATERIAL, 2, 32).folder != folder
    assert TeacherStates.of_run(None, MATERIAL, 2, 16) is None


def test_a_cut_healed_from_itself_after_earlier_stages_does_not_share_the_source_models_states():
    from search_spaces.pruning import PruneSpec, heal_material

    spec, model = PruneSpec(mlp_keep=0.5, heal_steps=4), make_tiny_llama(vocab_size=len(TOKENIZER))
    base = BuildContext(tokenizer=TOKENIZER, calibration=(), seed=0, model_id="tiny")
    upstream = ({"technique": "distillation", "spec": {}},)
    source = heal_material(model, spec, replace(base, teacher=model, upstream=upstream))
    itself = heal_material(model, spec, replace(base, upstream=upstream))  # no teacher: the built model teaches
    assert "teacher_upstream" not in source and itself["teacher_upstream"] == list(upstream)
    assert "teacher_upstream" not in heal_material(model, spec, base)  # no stages before: the source model
    assert TeacherStates.of_run("/c", source, 2, 16).folder != TeacherStates.of_run("/c", itself, 2, 16).folder


def test_a_teacher_whose_logits_are_not_its_head_on_its_states_runs_whole_and_stores_nothing(tmp_path):
    teacher, student = _models()
    plain_stats, plain = _trained(*_models())

    class Capped(type(teacher)):  # a final soft-cap, as Gemma 2 has: the head alone is not the logits
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 30.0 * torch.tanh(out.logits / 30.0)
            return out

    capped = Capped(teacher.config)
    capped.load_state_dict(teacher.state_dict())
    states = TeacherStates.of_run(tmp_path, MATERIAL, SETTINGS.batch_size, 16)
    _, trained = _trained(capped, student, states)
    assert teacher_module._SPLITS[capped] is False and not states.folder.exists()
    expected_stats, expected = _trained(capped, _models()[1])  # the capped teacher, whole, no states
    assert all(torch.equal(expected[n], trained[n]) for n in expected)
    assert not all(torch.equal(plain[n], trained[n]) for n in plain)  # the cap did change what it taught


def test_a_damaged_state_is_computed_again(tmp_path):
    states = TeacherStates.of_run(tmp_path, MATERIAL, SETTINGS.batch_size, 16)
    _, plain = _trained(*_models(), states)
    (states.folder / "3.pt").write_bytes(b"not a tensor")
    torch.save(torch.zeros(4, 4), states.folder / "2.pt")  # the wrong shape: another length's state
    again = TeacherStates.of_run(tmp_path, MATERIAL, SETTINGS.batch_size, 16)
    _, read = _trained(*_models(), again)
    assert (again.read, again.computed) == (4, 2)  # the step holding windows 2 and 3 ran the teacher again
    assert all(torch.equal(plain[n], read[n]) for n in plain)
    assert torch.load(states.folder / "3.pt", weights_only=True).shape == (16, make_tiny_llama().config.hidden_size)


def test_a_failure_of_a_teacher_that_split_is_raised_not_taken_for_its_form(tmp_path):
    teacher, _ = _models()
    states = TeacherStates.of_run(tmp_path, MATERIAL, SETTINGS.batch_size, 16)
    with torch.no_grad():
        states.logits(teacher, WINDOWS[:2], 0)  # checked: it splits

        def fail(*args, **kwargs):
            raise RuntimeError("out of memory")

        teacher.base_model.forward = fail
        with pytest.raises(RuntimeError, match="out of memory"):
            states.logits(teacher, WINDOWS[2:4], 2)
    assert states.computed == 2


def test_a_second_student_of_a_study_reads_the_first_ones_states(tmp_path):
    docs = (Document("sonnet", SAMPLE_TEXT * 20),)
    context = BuildContext(tokenizer=TOKENIZER, calibration=docs, seed=0, cache_dir=tmp_path, model_id="tiny-llama",
                           progress=False)
    spec = DistillSpec(depth_keep=0.5, mlp_keep=0.5, steps=4, batch_size=2, seq_len=16, lr=1e-3,
                       importance_samples=4, importance_seq_len=16)
    teacher = make_tiny_llama(vocab_size=len(TOKENIZER))
    first = report_of(apply(teacher, spec, context))
    second = report_of(apply(teacher, replace(spec, depth_keep=1.0), context))
    longer = report_of(apply(teacher, replace(spec, depth_keep=1.0, steps=6), context))  # continues: windows 8-11
    assert (first.teacher_windows_read, second.teacher_windows_read, longer.teacher_windows_read) == (0, 8, 0)
    assert first.cache_key != second.cache_key
    assert len(list((tmp_path / "teacher-states").iterdir())) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_a_16_bit_teacher_computed_in_float32_stores_what_its_head_reads(tmp_path, monkeypatch, dtype):
    from search_spaces import compute

    monkeypatch.setattr(compute, "cpu_flags", lambda: frozenset({"avx2"}))  # float32 compute of 16-bit weights
    teacher, student = (m.to(dtype) for m in _models())
    plain_stats, plain = _trained(teacher, student)
    states = TeacherStates.of_run(tmp_path, MATERIAL, SETTINGS.batch_size, 16)
    _trained(*(m.to(dtype) for m in _models()), states)
    again = TeacherStates.of_run(tmp_path, MATERIAL, SETTINGS.batch_size, 16)
    _, read = _trained(*(m.to(dtype) for m in _models()), again)
    assert again.read == 6 and all(torch.equal(plain[n], read[n]) for n in plain)
