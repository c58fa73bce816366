"""An allocation refined by measured KL (targets/llamacpp/refine.py) on a tiny model: every kept move lowers the
measured KL, the bytes stay within the target, the KL it reports is the one a full forward pass measures, and the
model's weights come back as they were."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import targets  # noqa: F401  (registers llama-quant)
from search_spaces import TECHNIQUES
from search_spaces.base import BuildContext
from search_spaces.quantization.spec import AllocationSettings, QuantSpec
from targets.llamacpp import allocated, ggml_quants, sensitivity
from targets.llamacpp.allocated import PLAN_ATTRIBUTE, allowed_options, choose_types, menu_of, sensitivity_tables
from targets.llamacpp.compensated import base_kind
from targets.llamacpp.refine import refine
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    windows = torch.randint(0, len(tokenizer), (6, 32), generator=torch.Generator().manual_seed(3))
    context = BuildContext(tokenizer=tokenizer, calibration=[], seed=0, cache_dir=None, model_id="", progress=False)
    tables = sensitivity_tables(model, windows, context)
    return model, windows, tables


def _decoded(tables):
    widths = {n: t["width"] for n, t in tables["tensors"].items()}

    def decoded(name, kind, weight):
        assert not kind.endswith("+gptq")
        return weight if kind == "F16" else ggml_quants.roundtrip(base_kind(kind), weight, tables["imatrix"].get(name))[0]
    return decoded, widths


def _kl(model, windows, reference) -> float:
    logits = model(input_ids=windows, use_cache=False).logits.float().log_softmax(-1)
    return float(torch.nn.functional.kl_div(logits, reference, log_target=True, reduction="none").sum(-1).mean())


@torch.inference_mode()
def test_refinement_keeps_only_moves_that_lower_the_measured_kl_within_the_bytes(setup):
    model, windows, tables = setup
    settings = AllocationSettings(bpw=4.5, compensate=False)
    target = 4.5 * sum(t["size"] for t in tables["tensors"].values()) / 8
    allowed = allowed_options(tables, menu_of(settings), compensate=False)
    # from the smallest option of every tensor, the bytes left to spend: moves that spend them must be found
    chosen = {n: min(opts, key=lambda o: (o.bytes, o.error)) for n, opts in allowed.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    decoded, _ = _decoded(tables)
    kl = {(n, o.kind): o.error for n, opts in tables["options"].items() for o in opts}
    out = refine(model, allowed, chosen, target, windows, decoded, lambda n, o: kl[(n, o.kind)], evaluations=12)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # restored
    assert 0 < out.evaluations <= 12 and out.kept == len(out.measured_kl) - 1
    assert all(b < a for a, b in zip(out.measured_kl, out.measured_kl[1:]))
    assert sum(o.bytes for o in out.chosen.values()) <= target
    assert out.kept and out.chosen != chosen
    # the KL it reports for its final choice is what a full pass (no replayed layers) measures with those weights
    reference = model(input_ids=windows, use_cache=False).logits.float().log_softmax(-1)
    weights = sensitivity.weights_of(model, sensitivity.quantizable(model, {}))
    try:
        for name, option in out.chosen.items():
            weights[name].copy_(torch.from_numpy(decoded(name, option.kind, before_weight(before, model, name))))
        assert _kl(model, windows, reference) == pytest.approx(out.measured_kl[-1], rel=1e-4)
    finally:
        for name, parameter in model.named_parameters():
            parameter.copy_(before[name])
    assert out.report()["measured_kl"] == [out.measured_kl[0], out.measured_kl[-1]]


def before_weight(before, model, name) -> np.ndarray:
    module = next(t.modules[0] for t in sensitivity.quantizable(model, {}) if t.gguf_name == name)
    return before[f"{module}.weight"].float().numpy()


def test_no_evaluations_leave_the_allocation_as_it_was(setup):
    model, windows, tables = setup
    settings = AllocationSettings(bpw=5.0)
    target = 5.0 * sum(t["size"] for t in tables["tensors"].values()) / 8
    chosen = choose_types(tables, menu_of(settings), target)
    decoded, _ = _decoded(tables)
    out = refine(model, allowed_options(tables, menu_of(settings)), chosen, target, windows,
                 lambda n, k, w: w, lambda n, o: 0.0, evaluations=0)
    assert out.chosen == chosen and out.evaluations == 0 and len(out.measured_kl) == 1


def test_a_refined_build_records_predicted_against_measured_kl(setup, tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    from tests.conftest import SAMPLE_TEXT

    class Doc:
        def __init__(self, text):
            self.text = text

    context = BuildContext(tokenizer=tokenizer, calibration=[Doc(SAMPLE_TEXT * 40)], seed=0, cache_dir=tmp_path,
                           model_id="tiny-refine", progress=False)
    spec = QuantSpec(method="llama-quant", bits={"attn": 4, "mlp": 4, "head": 16}, grid="gguf", group_size=32,
                     allocation=AllocationSettings(bpw=4.5, samples=6, seq_len=32, refine=6,
                                                              compensate=True))
    built = TECHNIQUES["quantization"].apply(model, spec, context)
    plan = getattr(built, PLAN_ATTRIBUTE)
    report = plan.refinement
    assert report["evaluations"] <= 6 and report["measured_kl"][1] <= report["measured_kl"][0]
    assert report["predicted_kl"][1] == pytest.approx(plan.predicted_kl)
    assert plan.compensated  # the refined choice's compensated tensors are written too
    unrefined = replace(spec, allocation=replace(spec.allocation, refine=0))
    assert getattr(TECHNIQUES["quantization"].apply(make_tiny_llama(vocab_size=len(tokenizer), **WIDE), unrefined,
                                                    context), PLAN_ATTRIBUTE).refinement is None
