"""Distilling a layer-dropped student of the built-in model: it must recover, and be cached."""
from __future__ import annotations

import pytest
import torch

import search_spaces.distillation as distillation
import search_spaces.distillation.runs as runs
from evaluators.perplexity import PerplexityProtocol, measure_perplexity
from search_spaces.base import BuildContext
from search_spaces.distillation.student import derive_student
from search_spaces.distillation import DistillSpec, apply, report_of

pytestmark = pytest.mark.builtin
PROTOCOL = PerplexityProtocol(context_length=256, stride=256, max_tokens=2048)  # held-out text only
# Six of 30 layers dropped; a few dozen small steps (about 1.5 s each on two CPU cores).
SPEC = DistillSpec(depth_keep=0.8, steps=24, batch_size=1, seq_len=128, lr=2e-4, importance_samples=8,
                   importance_seq_len=128)


def _no_training(*args, **kwargs):
    raise AssertionError("a cache hit must not derive or train a student")


def test_distilled_student_beats_its_undistilled_self_and_is_cached(tmp_path, monkeypatch):
    from planner.sources import DataSource, ModelSource, load_corpus, load_model

    teacher, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m"), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, seed=0, cache_dir=tmp_path,
                           model_id="builtin:smollm2-135m", progress=False)

    undistilled, _ = derive_student(teacher, SPEC.structure, "teacher", context, SPEC.importance_samples,
                                    SPEC.importance_seq_len)
    before = measure_perplexity(undistilled, tokenizer, corpus.eval, PROTOCOL).perplexity
    del undistilled
    student = apply(teacher, SPEC, context)
    assert student.config.num_hidden_layers == 24
    after = measure_perplexity(student, tokenizer, corpus.eval, PROTOCOL).perplexity
    assert after < before

    monkeypatch.setattr(runs, "train_student", _no_training)
    monkeypatch.setattr(distillation, "derive_student", _no_training)
    again = apply(teacher, SPEC, context)
    assert report_of(again).cache_hit and report_of(again).steps == 24
    ids = torch.randint(1, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, again(input_ids=ids).logits)
