"""Structured pruning of the built-in model: importance must beat chance on held-out text."""
from __future__ import annotations

import copy

import pytest
import torch

from evaluators.memory import weight_bytes
from evaluators.perplexity import PerplexityProtocol, measure_perplexity
from search_spaces.base import BuildContext
from search_spaces.pruning import PruneSpec, apply, estimate
from search_spaces.structure.surgery import drop_layers, prune_mlp

pytestmark = pytest.mark.builtin
PROTOCOL = PerplexityProtocol(context_length=256, stride=256, max_tokens=2048)  # held-out text only
CALIBRATION = dict(calibration_samples=8, calibration_seq_len=128)


@pytest.fixture(scope="module")
def builtin():
    from planner.sources import DataSource, ModelSource, load_corpus, load_model

    model, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m"), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, seed=0, progress=False)
    return model, tokenizer, corpus, context


def perplexity(model, tokenizer, corpus) -> float:
    return measure_perplexity(model, tokenizer, corpus.eval, PROTOCOL).perplexity


def test_quarter_of_mlp_neurons_by_importance_beats_a_random_quarter(builtin):
    model, tokenizer, corpus, context = builtin
    spec = PruneSpec(mlp_keep=0.75, **CALIBRATION)
    by_importance = apply(copy.deepcopy(model), spec, context)
    assert by_importance.config.intermediate_size == 1152
    assert weight_bytes(by_importance).total_bytes == estimate(model, spec).weight_bytes
    generator = torch.Generator().manual_seed(0)
    at_random = copy.deepcopy(model)
    prune_mlp(at_random, {i: torch.randperm(1536, generator=generator)[:1152] for i in range(30)})
    assert perplexity(by_importance, tokenizer, corpus) < perplexity(at_random, tokenizer, corpus)


def test_four_layers_dropped_by_importance_beat_four_random_layers(builtin):
    model, tokenizer, corpus, context = builtin
    by_importance = apply(copy.deepcopy(model), PruneSpec(depth_keep=26 / 30, **CALIBRATION), context)
    assert by_importance.config.num_hidden_layers == 26
    important = perplexity(by_importance, tokenizer, corpus)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # two random draws: importance must beat both
        at_random = copy.deepcopy(model)
        drop_layers(at_random, torch.randperm(30, generator=generator)[:26].tolist())
        assert important < perplexity(at_random, tokenizer, corpus)
