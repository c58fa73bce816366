"""Deployment targets: GGUF grids and files bit for bit, llama.cpp's tokens and logits against transformers',
the target chosen and refused up front, and relative budgets on same-run ratios."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from search_spaces import BuildContext
from search_spaces.quantization import QUANT_METHODS, STORAGE_SCHEMES, QuantSpace, QuantSpec, apply
from search_spaces.quantization.grid import GGUF_GRID, StorageGrid, round_to_nearest
from search_spaces.quantization.pack import pack_gguf
from search_spaces.specs import SpecError
from tests.conftest import make_tiny_llama, make_tiny_tokenizer, methods_rounding_onto

import llama_cpp  # noqa: F401  (required: a broken install fails here)
from gguf import GGMLQuantizationType, GGUFReader, quants

from targets import LLAMA_CPP, TRANSFORMERS, TargetError, choose
from targets.llamacpp.gguf_file import UnsupportedForGGUF, gguf_tensors, write_gguf
from targets.llamacpp.runtime import loaded

GGUF_TYPES = [(8, True, "Q8_0"), (4, True, "Q4_0"), (4, False, "Q4_1"), (5, True, "Q5_0"), (5, False, "Q5_1")]


@pytest.mark.parametrize("bits, symmetric, name", GGUF_TYPES)
def test_gguf_blocks_decode_with_gguf_to_exactly_the_evaluated_weights(bits, symmetric, name):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 96, generator=generator) * 0.05
    weight[5, :32] = 0  # an all-zero block: zero scale
    weight[7, 32:64] = 0.25  # a constant block
    fmt = StorageGrid(bits, 32, symmetric, GGUF_GRID)
    quantized = round_to_nearest(weight, fmt, torch.float32)
    assert fmt.gguf_type == name
    blocks = pack_gguf(quantized)
    decoded = quants.dequantize(blocks, GGMLQuantizationType[name])
    assert np.array_equal(decoded, quantized.dequantize().numpy())
    # as accurate as llama.cpp's own quantizer (gguf's port of it) on the same weights
    theirs = quants.dequantize(quants.quantize(weight.numpy(), GGMLQuantizationType[name]), GGMLQuantizationType[name])
    ours_error = ((decoded - weight.numpy()) ** 2).mean()
    assert ours_error <= ((theirs - weight.numpy()) ** 2).mean() * 1.01
    assert quantized.dequantize()[5, :32].abs().max() == 0


def test_gguf_specs_are_checked():
    with pytest.raises(SpecError, match="QuantSpec.group_size"):
        QuantSpec(method="rtn", bits={"attn": 4, "mlp": 4}, group_size=64, grid="gguf")
    with pytest.raises(SpecError, match="QuantSpec.bits.attn"):
        QuantSpec(method="rtn", bits={"attn": 3, "mlp": 4}, group_size=32, grid="gguf")
    with pytest.raises(SpecError, match="QuantSpec.grid"):
        QuantSpec(method="bnb", bits={"attn": 8, "mlp": 8}, grid="gguf")
    with pytest.raises(SpecError, match="QuantSpec.bits.attn"):  # 5 bits: GGUF only
        QuantSpec(method="rtn", bits={"attn": 5, "mlp": 4})
    spec = QuantSpec(method="gptq", bits={"attn": 4, "mlp": 8, "head": 16}, group_size=32, symmetric=False, grid="gguf")
    assert spec.summary() == "quant(gptq Q4_1/Q8_0/hF16)"


def test_the_llama_cpp_space_holds_only_what_gguf_serves():
    defaults = QuantSpace.from_dict(LLAMA_CPP.space_defaults()["quantization"])
    assert defaults.grid == "gguf" and defaults.bits == (4, 5, 8, 16) and defaults.group_sizes == (32,)
    spaces = LLAMA_CPP.fit_spaces({"quantization": QuantSpace(), "pruning": None}, make_tiny_llama())
    quant = spaces["quantization"]
    # what rounds onto gguf, whatever is registered: llama.cpp's own quantizer too, no library's own layers
    assert quant.methods == ("none", *methods_rounding_onto("gguf")) and quant.grid == "gguf" and quant.group_sizes == (32,)
    assert {"rtn", "gptq", "llama-quant"} <= set(quant.methods) and not {"bnb", "dynamic-int8"} & set(quant.methods)
    assert quant.bits == (4, 8, 16) and all(b in (None, 4, 8, 16) for b in quant.head_bits)
    with pytest.raises(SpecError, match=r"QuantSpace.bits\[0\]"):  # a study file asking GGUF for 3 bits
        QuantSpace.from_dict({**LLAMA_CPP.space_defaults()["quantization"], "bits": [3, 4]})
    kept = TRANSFORMERS.fit_spaces({"quantization": QuantSpace()}, None)["quantization"]
    compressed = STORAGE_SCHEMES["compressed-tensors"]
    assert kept.methods == tuple(m for m in QuantSpace().methods if m == "none" or QUANT_METHODS[m].accepts(compressed))
    assert {"rtn", "gptq", "bnb", "dynamic-int8"} <= set(kept.methods) and "llama-quant" not in kept.methods


def _context(tokenizer):
    return BuildContext(tokenizer=tokenizer, calibration=None, device=torch.device("cpu"), seed=0)


def _read_back(path) -> dict[str, np.ndarray]:
    reader = GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = np.asarray(data, dtype=np.float32).reshape(data.shape)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _runtime_logits(path, ids):
    with loaded(path, 64, 1, logits_all=True) as llm:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])


TEXT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate, 1623."


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_written_gguf_runs_in_llama_cpp_with_torch_logits(arch, tmp_path):
    """A quantized candidate of each served architecture, written and read back bit for bit, gives llama.cpp
    logits equal to the torch evaluation of the same weights (rotary layout, biases, heads and all)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16 if arch == "qwen2" else 32,  # llama.cpp's qwen2: heads span the width
                                  max_position_embeddings=128, tie_word_embeddings=arch != "mistral")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    spec = QuantSpec(method="rtn", bits={"attn": 8, "mlp": 4, "head": 16}, group_size=32, grid="gguf")
    model = apply(model, spec, _context(tokenizer))
    path = tmp_path / "model.gguf"
    write_gguf(model, tokenizer, path)
    back = _read_back(path)
    expected = {name: data for name, data, _ in gguf_tensors(model)}
    assert set(back) == set(expected)
    for name, data in expected.items():
        want = quants.dequantize(data, GGUFReader(str(path)).tensors[list(back).index(name)].tensor_type)
        assert np.array_equal(back[name], np.asarray(want, dtype=np.float32)), name
    assert ("blk.0.attn_q.bias" in back) is (arch == "qwen2")
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:40]
    theirs, ours = _runtime_logits(path, ids), _logits(model, ids)
    # llama.cpp rounds activations to 8 bits for its integer matmuls: a few % of the logits' spread, where a
    # wrong rotary layout or head split is of the order of the spread itself
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max(), np.abs(theirs - ours).max() / np.abs(ours).max()


def test_read_back_equals_the_evaluated_weights_in_transformers_layout(tmp_path):
    """Undo llama.cpp's q/k row order and every tensor equals the candidate's own weight, exactly."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2)
    model = apply(model, QuantSpec(method="rtn", bits={"attn": 4, "mlp": 5}, group_size=32, symmetric=False,
                                   grid="gguf"), _context(tokenizer))
    path = tmp_path / "model.gguf"
    write_gguf(model, tokenizer, path)
    back = _read_back(path)
    head_dim = 16
    for index, layer in enumerate(model.model.layers):
        for name, module, heads in (("attn_q", layer.self_attn.q_proj, 4), ("attn_k", layer.self_attn.k_proj, 2)):
            rows = back[f"blk.{index}.{name}.weight"]
            unpermuted = rows.reshape(heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)
            assert np.array_equal(unpermuted, module.weight.detach().numpy())
        assert np.array_equal(back[f"blk.{index}.ffn_down.weight"], layer.mlp.down_proj.weight.detach().numpy())
    assert np.array_equal(back["token_embd.weight"], model.model.embed_tokens.weight.detach().numpy())


def test_unsupported_models_are_refused_up_front():
    from tests.conftest import make_tiny_gpt2

    tokenizer = make_tiny_tokenizer()
    gpt2 = make_tiny_gpt2(vocab_size=len(tokenizer))
    # GPT-2 goes to llama.cpp's converter, which (at this runtime's commit) reads a transformers-4 config key
    # transformers 5 no longer writes: refused up front with the converter's own reason, in one line.
    reason = LLAMA_CPP.unsupported(gpt2, tokenizer)
    assert reason.startswith("llama.cpp's converter (llama.cpp ") and "\n" not in reason
    assert choose("auto", "cpu", gpt2, tokenizer) is TRANSFORMERS
    llama = make_tiny_llama(vocab_size=len(tokenizer))
    assert choose("auto", "cpu", llama, tokenizer) is LLAMA_CPP
    assert choose("auto", "cuda", llama, tokenizer) is TRANSFORMERS or LLAMA_CPP.unavailable("cuda") is None
    with pytest.raises(TargetError, match="target llama.cpp cannot be used here: llama.cpp's converter"):
        choose("llama.cpp", "cpu", gpt2, tokenizer)
    with pytest.raises(TargetError, match="unknown target 'onnx'"):
        choose("onnx", "cpu", llama, tokenizer)
    if not torch.cuda.is_available():
        with pytest.raises(TargetError, match="vLLM needs a CUDA GPU"):
            choose("vllm", "cpu", llama, tokenizer)


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused():
    from tokenizers import pre_tokenizers

    tokenizer = make_tiny_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    llama = make_tiny_llama(vocab_size=len(tokenizer))
    # neither the planner's writer nor llama.cpp's converter knows this pre-tokenizer: refused, saying so
    assert "BPE pre-tokenizer was not recognized" in LLAMA_CPP.unsupported(llama, tokenizer)
    with pytest.raises(UnsupportedForGGUF):
        write_gguf(llama, tokenizer, "/nonexistent/never-written.gguf")


def test_qwen2_heads_narrower_than_the_width_are_left_out_of_the_space():
    from transformers import AutoConfig, AutoModelForCausalLM

    from search_spaces.pruning import PruneSpace

    def qwen2(**extra):
        config = AutoConfig.for_model("qwen2", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, **extra)
        return AutoModelForCausalLM.from_config(config)

    pruning = PruneSpace(heads_keep=(1.0, 0.5))
    assert LLAMA_CPP.fit_spaces({"pruning": pruning}, qwen2())["pruning"].heads_keep == (1.0,)
    assert LLAMA_CPP.fit_spaces({"pruning": pruning}, make_tiny_llama())["pruning"].heads_keep == (1.0, 0.5)
    with pytest.raises(UnsupportedForGGUF, match="qwen2 graph needs attention heads that span the hidden size"):
        write_gguf(qwen2(head_dim=8), make_tiny_tokenizer(), "/nonexistent/never-written.gguf")


def test_the_vllm_target_ships_a_compressed_tensors_checkpoint(tmp_path):
    """vLLM's half that runs without a GPU: the checkpoint it would serve (pack-quantized, with its config)."""
    import json

    from planner.recipes import Stage
    from targets import VLLM

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    spec = QuantSpec(method="gptq", bits={"attn": 4, "mlp": 4}, group_size=32)
    model = apply(model, QuantSpec(method="rtn", bits={"attn": 4, "mlp": 4}, group_size=32), _context(tokenizer))
    fitted = VLLM.fit_spaces({"quantization": QuantSpace()}, model)["quantization"].methods
    assert fitted == ("none", *methods_rounding_onto("compressed-tensors"))  # whatever is registered
    assert {"rtn", "gptq"} <= set(fitted) and not {"bnb", "dynamic-int8", "llama-quant"} & set(fitted)
    folder = VLLM.ship(model, tokenizer, [Stage("quantization", spec)], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert (folder / "tokenizer.json").is_file() and list(folder.glob("*.safetensors"))


def test_each_model_is_timed_against_its_own_reference(tmp_path):
    """One process measuring two models (apply after a search, the test suite) writes a reference per model."""
    from types import SimpleNamespace

    tokenizer = make_tiny_tokenizer()
    first = make_tiny_llama(vocab_size=len(tokenizer))
    second = make_tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        second.model.norm.weight.fill_(2.0)
    path_first = LLAMA_CPP.prepare(SimpleNamespace(model=first, tokenizer=tokenizer))
    assert LLAMA_CPP.prepare(SimpleNamespace(model=first, tokenizer=tokenizer)) == path_first  # written once
    path_second = LLAMA_CPP.prepare(SimpleNamespace(model=second, tokenizer=tokenizer))
    assert path_second != path_first
    assert np.all(_read_back(path_second)["output_norm.weight"] == 2.0)
