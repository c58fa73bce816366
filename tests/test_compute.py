"""A 16-bit model's passes without gradients computed in float32 where the CPU has no 16-bit instructions."""
from __future__ import annotations

import pytest
import torch

from search_spaces import compute
from search_spaces.compute import computes_slowly, float32_compute
from tests.conftest import make_tiny_llama


def _pair():
    """A bfloat16 tiny Llama and a float32 one holding the very same (bfloat16-rounded) weights."""
    half = make_tiny_llama().to(torch.bfloat16)
    full = make_tiny_llama()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    return half, full


def test_float32_compute_gives_the_float32_models_logits_and_leaves_the_model_as_it_was():
    half, full = _pair()
    before = {n: (p, p.dtype) for n, p in half.named_parameters()}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = full(input_ids=ids).logits
        plain = half(input_ids=ids).logits
        with float32_compute(half, when=True):
            computed = half(input_ids=ids).logits
    assert computed.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(computed, expected, rtol=1e-5, atol=1e-5)
    assert (plain.float() - expected).abs().max() > 10 * (computed - expected).abs().max()
    assert {n: (p, p.dtype) for n, p in half.named_parameters()} == before  # the same objects, still bfloat16
    assert not half.model.layers[0].input_layernorm._forward_pre_hooks  # nothing left installed
    assert "forward" not in half.model.layers[0].mlp.up_proj.__dict__


def test_a_forward_that_raises_puts_the_parameters_back():
    half, _ = _pair()
    weight = half.model.layers[0].mlp.down_proj.weight

    class Stop(Exception):
        pass

    def stop(module, args):
        raise Stop

    handle = half.model.layers[0].mlp.act_fn.register_forward_pre_hook(stop)  # inside the MLP, after up_proj ran
    with pytest.raises(Stop), torch.inference_mode(), float32_compute(half, when=True):
        half(input_ids=torch.zeros((1, 4), dtype=torch.long))
    handle.remove()
    assert half.model.layers[0].mlp.down_proj.weight is weight
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_gradients_through_it_are_the_float32_models_in_the_weights_precision():
    """Training a 16-bit model within it: every weight gets the float32 twin's gradient, rounded to its own
    precision, and no float32 copy of a linear layer's weight is kept for the backward pass."""
    half, full = _pair()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    full(input_ids=ids, labels=ids).loss.backward()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, t.shape)) or t, lambda t: t):
        with float32_compute(half, when=True):
            loss = half(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.dtype == torch.float32
    for (name, ours), theirs in zip(half.named_parameters(), full.parameters()):
        assert ours.grad is not None and ours.grad.dtype == torch.bfloat16, name
        # bfloat16 keeps 8 bits; the tied embedding's lookup gradient is summed in it (as torch trains it anyway)
        scale = theirs.grad.abs().max().item()
        torch.testing.assert_close(ours.grad.float(), theirs.grad, rtol=1e-2, atol=1e-2 * scale)
    up = half.model.layers[0].mlp.up_proj.weight
    assert (torch.float32, up.shape) not in kept and (torch.bfloat16, up.shape) in kept
    assert "forward" not in half.model.layers[0].mlp.up_proj.__dict__  # the instance's forward removed again


def test_only_a_16_bit_model_on_a_cpu_without_its_instructions_computes_slowly(monkeypatch):
    half, full = _pair()
    monkeypatch.setattr(compute, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert computes_slowly(half) and not computes_slowly(full)
    assert computes_slowly(make_tiny_llama().to(torch.float16))
    monkeypatch.setattr(compute, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert not computes_slowly(half) and computes_slowly(make_tiny_llama().to(torch.float16))
    monkeypatch.setattr(compute, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_fp16"}))
    assert not computes_slowly(half) and not computes_slowly(make_tiny_llama().to(torch.float16))


@pytest.mark.parametrize("flags, exact", [(frozenset({"avx2"}), True), (frozenset({"avx512_bf16"}), False)])
def test_the_calibration_passes_compute_in_float32_where_the_cpu_needs_it(monkeypatch, flags, exact):
    """The importance matrix, the KL gains and the pruning statistics of a bfloat16 model are those of its float32
    twin on a CPU without bfloat16 instructions; computed in bfloat16 where it has them."""
    from search_spaces.structure.importance import structural_importance
    from targets.llamacpp import sensitivity
    from targets.llamacpp.imatrix import importance_matrix

    monkeypatch.setattr(compute, "cpu_flags", lambda: flags)
    half, full = _pair()
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    ours, theirs = importance_matrix(half, windows), importance_matrix(full, windows)
    close = all(torch.allclose(torch.as_tensor(ours[n]), torch.as_tensor(theirs[n]), rtol=1e-4, atol=1e-6)
                for n in theirs)
    assert close == exact
    # the KL gains' probe weights are written into the model in its precision, so their KL differs anyway: the
    # float32 pass is seen in the dtype of the logits they compare
    logits = []
    handle = half.lm_head.register_forward_hook(lambda module, args, output: logits.append(output.dtype))
    sensitivity.kl_gains(half, sensitivity.quantizable(half, ours), windows[:2])
    handle.remove()
    assert logits and set(logits) == {torch.float32 if exact else torch.bfloat16}
    scores = [structural_importance(m, windows, heads=False, neurons=False).layers.double() for m in (half, full)]
    assert torch.allclose(*scores, rtol=1e-4) == exact


@pytest.mark.parametrize("flags, computed", [(frozenset({"avx2"}), torch.float32),
                                             (frozenset({"avx512_bf16"}), torch.bfloat16)])
def test_distillation_computes_in_float32_where_the_cpu_needs_it(monkeypatch, flags, computed):
    from search_spaces.distillation.train import TrainSettings, train_student

    monkeypatch.setattr(compute, "cpu_flags", lambda: flags)
    teacher, _ = _pair()
    student, _ = _pair()
    seen = {"teacher": [], "student": []}
    for name, model in (("teacher", teacher), ("student", student)):
        model.lm_head.register_forward_hook(lambda module, args, output, name=name: seen[name].append(output.dtype))
    settings = TrainSettings(steps=2, batch_size=2, lr=1e-4, temperature=1.0, alpha=0.5, grad_clip=1.0)
    train_student(student, teacher, torch.randint(0, 128, (4, 16)), settings, seed=0, progress=False)
    assert seen == {"teacher": [computed] * 2, "student": [computed] * 2}
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
