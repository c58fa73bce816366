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
    assert not half.model.layers[0].mlp.up_proj._forward_pre_hooks  # nothing left installed


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


def test_it_refuses_a_pass_with_gradients():
    half, _ = _pair()
    with float32_compute(half, when=True), pytest.raises(RuntimeError, match="without gradients"):
        half(input_ids=torch.zeros((1, 4), dtype=torch.long))


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
