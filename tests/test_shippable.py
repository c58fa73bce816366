"""Every candidate a study can recommend, its target can ship: for every registered target and every quantization
method its fitted space keeps, a candidate is built, shipped as the target's artifact and loaded back as it
serves; a method a target's space leaves out is named in one line saying why."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch

from planner.candidates import build, shipped_stages, suggest_stages
from planner.settings import StudySettings
from planner.study import methods_left_out, resolve_spaces
from search_spaces import BuildContext
from search_spaces.quantization.methods.base import QUANT_METHODS
from search_spaces.quantization.spec import available_methods
from targets import TARGETS
from evaluators.corpus import Document
from tests.conftest import SAMPLE_TEXT, make_tiny_llama, make_tiny_tokenizer


def _fitted(target, model):
    given = resolve_spaces(StudySettings(space={"pruning": False, "distillation": False}), model,
                           target.space_defaults())
    return given, target.fit_spaces(given, model)


def _pairs():
    model = make_tiny_llama(vocab_size=len(make_tiny_tokenizer()))
    for target in TARGETS.values():
        _, fitted = _fitted(target, model)
        for method in available_methods(fitted["quantization"]):  # what its trials can draw on this machine
            if method != "none":
                yield target.name, method


@pytest.mark.parametrize("target_name, method", list(_pairs()))
def test_every_method_a_targets_space_keeps_ships_and_loads(target_name, method, tmp_path):
    target = TARGETS[target_name]
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    model = make_tiny_llama(vocab_size=len(tokenizer))
    _, fitted = _fitted(target, model)
    quant = fitted["quantization"]  # llama-quant's calibration kept small, and no decode-cost timing
    quant = replace(quant, allocation=replace(quant.allocation, samples=4, seq_len=32, speed=(0.0,)))
    spaces = {name: (quant if name == "quantization" else None) for name in fitted}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"quantization.method": method})  # the method's other choices drawn at random
    stages = suggest_stages(study.ask(), spaces)
    assert stages[-1].spec.method == method
    calibration = [Document("calibration", SAMPLE_TEXT * 8)]
    context = BuildContext(tokenizer=tokenizer, calibration=calibration, device=torch.device("cpu"), seed=0,
                           progress=False)
    candidate = build(model, shipped_stages(stages), context).model
    artifact = target.ship(candidate, tokenizer, stages, tmp_path)
    assert artifact.exists()
    if target.unavailable("cpu") is not None:  # vLLM without a GPU: its export half (a checkpoint) is what runs here
        assert (tmp_path / "config.json").is_file()
        return
    if target_name == "llama.cpp":
        from targets.llamacpp.runtime import loaded

        ids = [1, 2, 3, 4, 5, 6]
        with loaded(artifact, 32, 1, logits_all=True) as llm:
            assert len(llm.tokenize(b"To be", add_bos=False)) > 0 and llm.n_vocab() == len(tokenizer)
            llm.eval(ids)
            served = np.array(llm.scores[:len(ids)], dtype=np.float32)
        with torch.no_grad():
            expected = candidate(torch.tensor([ids])).logits[0].numpy()
        # the file computes the candidate's function: the same weights where the candidate holds its grid's
        # values (llama.cpp rounds activations to 8 bits in its quantized matmuls); llama-quant's candidate is
        # the float model its file was quantized from, so there only the shape of the logits must agree
        assert np.corrcoef(served.ravel(), expected.ravel())[0, 1] > 0.9
        if method != "llama-quant":
            assert np.abs(served - expected).max() <= 0.05 * np.abs(expected).max()
        return
    if "compressed-tensors" not in target.artifacts:  # a format this test cannot read: the target's own runtime
        assert_serves_what_it_measured(target, model, tokenizer, build(model, stages, context).model, artifact)
        return
    from targets.transformers_target import load_shipped

    served = load_shipped(artifact)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = build(model, stages, context).model(ids).logits
        # as the study measured it (a compressed-tensors checkpoint decompresses with its own rounding)
        assert torch.allclose(served(ids).logits, expected, atol=2e-3)


def assert_serves_what_it_measured(target, model, tokenizer, candidate, artifact) -> None:
    """The artifact, loaded fresh from disk by the target, scores the perplexity the target measured on the built
    candidate (what `apply` checks to 1%; here to a millionth)."""
    from evaluators.latency import LatencyProtocol
    from evaluators.perplexity import PerplexityProtocol
    from planner.objectives import scorers
    from targets.base import Request

    request = Request(model, tokenizer, [Document("held-out", SAMPLE_TEXT * 3)], PerplexityProtocol(32, 32),
                      LatencyProtocol(), frozenset({"memory", "perplexity"}), scorers({"perplexity"}, None))
    target.prepare(request)
    measured = target.measure(request, candidate, "candidate").row["perplexity"]
    # both in the target's runtime: the same weights score the same to a millionth (every weight 1% off moves the
    # tiny model's perplexity by about 1.5e-5)
    assert target.measure_shipped(request, artifact).row["perplexity"] == pytest.approx(measured, rel=1e-6)


def test_a_method_a_target_leaves_out_is_named_in_one_line():
    model = make_tiny_llama(vocab_size=len(make_tiny_tokenizer()))
    given, fitted = _fitted(TARGETS["llama.cpp"], model)
    lines = methods_left_out(TARGETS["llama.cpp"], given, fitted)
    assert lines == [f"planner: space.quantization.methods: {', '.join(m for m in given['quantization'].methods if m not in fitted['quantization'].methods)} "
                     "left out: the llama.cpp target ships one GGUF file (model.gguf), which cannot hold them"]
    assert "dynamic-int8" in lines[0] and "llama-quant" not in lines[0]
    known = set(QUANT_METHODS)
    for target in TARGETS.values():
        g, f = _fitted(target, model)
        assert set(g["quantization"].methods) - {"none"} <= known
