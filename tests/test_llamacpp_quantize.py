"""llama.cpp's own quantizer (targets/llamacpp/quantize.py) and the planner's importance matrix (imatrix.py).

Tiny random Llama models written as F32 GGUF: one 576 wide with an 80-wide MLP (rows that fit neither the
256-wide super-blocks nor, for ffn_down, 32-wide blocks: the built-in model's shape problem and worse), one
256 wide with a 512-wide MLP (every block fits). Every claim about what llama.cpp writes is checked against
the file it wrote.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llama_cpp  # noqa: E402,F401  (required: a missing runtime fails the suite)
import gguf  # noqa: E402,F401

from gguf import GGUFReader  # noqa: E402

from targets.llamacpp import imatrix as im  # noqa: E402
from targets.llamacpp import quantize as q  # noqa: E402
from targets.llamacpp.gguf_file import write_gguf  # noqa: E402
from targets.llamacpp.runtime import loaded  # noqa: E402
from tests.conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from tests.llama_cpp_imatrix_loader import NotLoadable, load_like_llama_quantize  # noqa: E402

SHAPES = {"narrow": dict(hidden_size=576, intermediate_size=80, num_attention_heads=9, num_key_value_heads=3),
          "wide": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)}
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
           "Q6_K", "Q8_0", "IQ4_XS", "IQ3_S", "IQ2_XXS", "F16")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """{shape name: (model, F32 GGUF path, importance matrix with the head's entry)}; "untied" too."""
    folder = tmp_path_factory.mktemp("quantize")
    out = {}
    windows = torch.randint(0, len(tokenizer), (4, 24), generator=torch.Generator().manual_seed(0))
    for name, shape in {**SHAPES, "untied": {**SHAPES["wide"], "tie_word_embeddings": False}}.items():
        model = make_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=1, **shape)
        path = folder / f"{name}.gguf"
        write_gguf(model, tokenizer, path)
        out[name] = (model, path, im.importance_matrix(model, windows, head=True))
    return out


def quantizable(path) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape in q.tensor_shapes(path).items() if q._quantizable(name, shape)}


def test_the_fallback_rule_as_stated():
    assert [q.fallback_type(t, 576) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")] == \
        ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert {q.fallback_type(t, 576) for t in ("IQ1_S", "IQ2_XXS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")} == {"IQ4_NL"}
    assert q.fallback_type("Q4_K", 512) == "Q4_K" and q.fallback_type("Q4_0", 576) == "Q4_0"
    assert q.fallback_type("Q4_K", 80) == q.fallback_type("Q8_0", 80) == "F16"  # 80 is not a multiple of 32
    assert q.fallback_type("BF16", 80) == "BF16" and q.fallback_type("F32", 7) == "F32"
    assert q.quant_type("Q4_K").bits_per_weight == 4.5 and q.quant_type("IQ4_XS").bits_per_weight == 4.25
    assert q.type_bytes("Q4_K", (3, 512)) == 3 * 2 * 144 and q.type_bytes("F16", (2, 5)) == 20
    with pytest.raises(ValueError, match="Q5_0 instead"):
        q.type_bytes("Q4_K", (3, 576))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_menu_type_is_written_as_asked_or_as_its_stated_fallback(tiny, tmp_path, shape):
    _, src, matrix = tiny[shape]
    shapes = quantizable(src)
    for kind in q.MENU_NAMES:
        needs = any(q.requires_imatrix(q.fallback_type(kind, s[-1]), n) for n, s in shapes.items())
        dst = tmp_path / f"{kind}.gguf"
        written = q.quantize_gguf(src, dst, "Q8_0", {name: kind for name in shapes}, imatrix=matrix if needs else None,
                                  threads=1)
        for name, dims in shapes.items():
            assert written[name] == q.fallback_type(kind, dims[-1]), (kind, name)
        for tensor in GGUFReader(str(dst)).tensors:  # the planner's byte count is the file's, tensor by tensor
            dims = tuple(reversed(tensor.shape.tolist()))
            assert int(tensor.n_bytes) == q.type_bytes(tensor.tensor_type.name, dims), (kind, tensor.name)
        assert written["output_norm.weight"] == "F32"  # norms are copied, never quantized
        dst.unlink()


def test_types_that_need_an_importance_matrix_are_refused_without_one(tiny, tmp_path):
    _, src, _ = tiny["wide"]  # 256-wide rows: no fallback hides the IQ type
    for kind in q.MENU_NAMES:
        asked = {"blk.0.ffn_up.weight": kind}
        if q.requires_imatrix(kind, "blk.0.ffn_up.weight"):
            with pytest.raises(q.QuantizeError, match="requires an imatrix.*blk.0.ffn_up.weight"):
                q.quantize_gguf(src, tmp_path / "x.gguf", "Q8_0", asked, threads=1)
            assert not (tmp_path / "x.gguf").exists()
        elif kind in ("Q2_K", "IQ3_S", "IQ4_XS", "Q4_K"):
            q.quantize_gguf(src, tmp_path / "x.gguf", "Q8_0", asked, threads=1)
    # llama.cpp exempts the embedding from its check, but ggml would then abort the process on IQ2_XXS: refused
    q.quantize_gguf(src, tmp_path / "x.gguf", "Q8_0", {"token_embd.weight": "IQ3_XXS"}, threads=1)
    with pytest.raises(q.QuantizeError, match="token_embd.weight would be IQ2_XXS.*abort"):
        q.quantize_gguf(src, tmp_path / "x.gguf", "Q8_0", [("token_embd", "IQ2_XXS")], threads=1)
    with pytest.raises(q.QuantizeError, match="token_embd.weight would be IQ1_S"):
        q.quantize_gguf(src, tmp_path / "x.gguf", "IQ1_S", pure=True,
                        imatrix=tiny["wide"][2] | {"token_embd.weight": [1.0]})  # a wrong-sized entry: none
    # a fallback to IQ4_NL needs none either
    narrow = tiny["narrow"][1]
    assert q.quantize_gguf(narrow, tmp_path / "x.gguf", "Q8_0", {"blk.0.attn_q.weight": "IQ2_XXS"},
                           threads=1)["blk.0.attn_q.weight"] == "IQ4_NL"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_presets_quantize_a_tied_embedding_in_place_and_write_the_file_type(tiny, tmp_path, shape):
    _, src, matrix = tiny[shape]
    width = SHAPES[shape]["hidden_size"]
    for preset in PRESETS:
        dst = tmp_path / f"{preset}.gguf"
        given = matrix if preset in ("IQ2_XXS", "Q4_0") else None  # an imatrix changes some mixtures (Q4_0)
        planned = q.planned_types(src, preset, imatrix=given)  # llama.cpp's dry run: nothing written
        written = q.quantize_gguf(src, dst, preset, imatrix=given, threads=1)
        assert planned == written, preset
        assert "output.weight" not in written  # still tied: the head reads token_embd
        assert written["token_embd.weight"] == q.head_type(preset, width), preset
        fields = GGUFReader(str(dst)).fields
        assert fields["general.file_type"].contents() == q.ftype_id(preset)
        assert fields["general.quantization_version"].contents() == q.QUANTIZATION_VERSION
        dst.unlink()


def test_an_untied_head_gets_the_presets_head_type(tiny, tmp_path):
    _, src, _ = tiny["untied"]
    for preset in ("Q4_0", "Q4_K_M", "Q8_0"):
        written = q.quantize_gguf(src, tmp_path / "x.gguf", preset, threads=1)
        assert written["output.weight"] == q.head_type(preset, 256)
        assert written["token_embd.weight"] == q.PRESETS[preset]


def test_overrides_are_checked_and_regexes_take_the_first_match(tiny, tmp_path):
    _, src, _ = tiny["wide"]
    with pytest.raises(q.QuantizeError, match="ignores tensor overrides under the F16"):
        q.quantize_gguf(src, tmp_path / "x.gguf", "F16", {"blk.0.attn_q.weight": "Q4_0"})
    with pytest.raises(q.QuantizeError, match="no tensor 'blk.9.attn_q.weight'"):
        q.quantize_gguf(src, tmp_path / "x.gguf", "Q4_0", {"blk.9.attn_q.weight": "Q4_0"})
    with pytest.raises(q.QuantizeError, match="never quantizes 'output_norm.weight'"):
        q.quantize_gguf(src, tmp_path / "x.gguf", "Q4_0", {"output_norm.weight": "Q4_0"})
    with pytest.raises(ValueError, match="unknown GGML type 'Q4_7'"):
        q.quantize_gguf(src, tmp_path / "x.gguf", "Q4_0", {"blk.0.attn_q.weight": "Q4_7"})
    written = q.quantize_gguf(src, tmp_path / "x.gguf", "Q4_0", [(r"ffn_(up|gate)", "Q5_K"), ("ffn_", "Q6_K"),
                                                                   (r"\.attn_", "IQ4_XS")], threads=1)
    assert [written[f"blk.0.{n}.weight"] for n in ("ffn_up", "ffn_gate", "ffn_down", "attn_q", "attn_v")] == \
        ["Q5_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_XS"]
    assert q.planned_types(src, "Q4_0", [(r"ffn_(up|gate)", "Q5_K"), ("ffn_", "Q6_K"), (r"\.attn_", "IQ4_XS")]) \
        == written
    with pytest.raises(q.QuantizeError, match="requantizing from type"):
        q.quantize_gguf(tmp_path / "x.gguf", tmp_path / "y.gguf", "Q8_0")


def test_the_importance_matrix_equals_a_direct_computation():
    model = make_tiny_llama(vocab_size=64, num_hidden_layers=2)
    windows = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    matrix = im.importance_matrix(model, windows, batch_size=2)
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name):
        return lambda module, args, out: seen.setdefault(name, []).append(args[0])

    recorders = [module.register_forward_hook(record(name))
                 for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    for handle in recorders:
        handle.remove()
    roles = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    assert set(matrix) == {f"blk.{i}.{role}.weight" for i in range(2) for role in roles.values()}
    for layer in range(2):
        for module, role in roles.items():
            width = matrix[f"blk.{layer}.{role}.weight"].size
            rows = torch.cat(seen[f"model.layers.{layer}.{module}"]).reshape(-1, width)
            expected = np.zeros(rows.shape[1])
            for token in rows.double().numpy():  # an explicit loop: sum of x^2 per column, then / tokens
                for column, value in enumerate(token):
                    expected[column] += value * value
            np.testing.assert_allclose(matrix[f"blk.{layer}.{role}.weight"], expected / rows.shape[0], rtol=1e-5)
        # and from the residual stream itself: q's input is the block's input norm of its hidden state
        normed = model.model.layers[layer].input_layernorm(hidden[layer]).detach().double()
        np.testing.assert_allclose(matrix[f"blk.{layer}.attn_q.weight"],
                                   normed.square().mean(dim=(0, 1)).numpy(), rtol=1e-5)
    whole = im.importance_matrix(model, windows, batch_size=3, head=True)  # batching does not change it
    assert all(np.allclose(whole[name], matrix[name], rtol=1e-6) for name in matrix)
    assert set(whole) - set(matrix) == {"token_embd.weight"}  # a tied head's input, under the shared tensor


def test_the_imatrix_file_round_trips_in_llama_imatrix_format(tiny, tmp_path):
    _, _, matrix = tiny["narrow"]
    path = tmp_path / "imatrix.gguf"
    im.write_imatrix_file(path, matrix, tokens=96, chunk_size=24, datasets=["calibration: tiny windows"])
    back, info = im.read_imatrix_file(path)
    collected = {n for n in matrix if n.startswith("blk.")}  # a tied head: token_embd.weight is not llama-imatrix's
    assert set(back) == collected and "token_embd.weight" in matrix
    for name in collected:
        np.testing.assert_allclose(back[name], matrix[name], rtol=1e-6)
        assert info["counts"][name].tolist() == [96]
    assert info["datasets"] == ["calibration: tiny windows"]
    assert (info["chunk_count"], info["chunk_size"]) == (4, 24)
    reader = GGUFReader(str(path))
    assert "general.architecture" not in reader.fields and reader.fields["general.type"].contents() == "imatrix"
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == [f"{n}.{part}" for n in sorted(collected) for part in ("in_sum2", "counts")]
    down = tensors["blk.0.ffn_down.weight.in_sum2"]
    assert down.tensor_type.name == "F32" and down.shape.tolist() == [80, 1]  # ggml ne: columns, matrices
    assert tensors["blk.0.ffn_down.weight.counts"].shape.tolist() == [1, 1]
    with pytest.raises(ValueError, match="name the calibration data"):
        im.write_imatrix_file(path, matrix, tokens=96, chunk_size=24, datasets=[])
    with pytest.raises(ValueError, match="no entry llama-imatrix collects"):
        im.write_imatrix_file(path, {"token_embd.weight": matrix["token_embd.weight"]}, 96, 24, ["text"])


@pytest.mark.parametrize("shape", ["narrow", "untied"])
def test_llama_quantize_reads_the_imatrix_file_through_ggml(tiny, tmp_path, shape):
    """ggml's own GGUF loader and llama-quantize's rules read back exactly the entries llama-imatrix collects:
    the blocks' inputs and, untied, output.weight (as under --process-output), never token_embd.weight."""
    _, _, matrix = tiny[shape]
    path = tmp_path / "imatrix.gguf"
    im.write_imatrix_file(path, matrix, tokens=96, chunk_size=24, datasets=["calibration: tiny windows", "more"])
    entries, info = load_like_llama_quantize(path)
    blocks = {n for n in matrix if n.startswith("blk.")}
    assert set(entries) == blocks | ({"output.weight"} if shape == "untied" else set())
    assert ("output.weight" in matrix) == (shape == "untied") and "token_embd.weight" not in entries
    for name, values in entries.items():
        np.testing.assert_allclose(values, matrix[name], rtol=1e-6)
        assert info["counts"][name].tolist() == [96]
    assert info["datasets"] == ["calibration: tiny windows", "more"]
    assert (info["chunk_count"], info["chunk_size"]) == (4, 24)
    broken = tmp_path / "broken.gguf"  # the loader is not a rubber stamp: a cut file is refused
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(NotLoadable, match="cannot read"):
        load_like_llama_quantize(broken)


def test_a_quantized_file_loads_and_generates_in_llama_cpp(tiny, tmp_path, tokenizer):
    _, src, matrix = tiny["narrow"]
    meta = im.quantize_metadata(matrix, "imatrix.gguf", ["calibration: tiny windows"], chunk_count=4)
    dst = tmp_path / "q4km.gguf"
    q.quantize_gguf(src, dst, "Q4_K_M", imatrix=matrix, metadata=meta, threads=1)
    fields = GGUFReader(str(dst)).fields
    assert fields["quantize.imatrix.entries_count"].contents() == len(matrix)
    assert fields["quantize.imatrix.file"].contents() == "imatrix.gguf"
    assert fields["quantize.imatrix.chunks_count"].contents() == 4
    q.quantize_gguf(src, tmp_path / "q8.gguf", "Q8_0", threads=1)
    prompt = tokenizer("Shall I compare thee", add_special_tokens=False)["input_ids"]
    logits = {}
    for name, path in (("f32", src), ("q8", tmp_path / "q8.gguf"), ("q4km", dst)):
        with loaded(path, 64, 1, logits_all=True) as llm:
            llm.eval(prompt)
            logits[name] = np.array(llm.scores[:len(prompt)])
            generated = [int(np.argmax(llm.scores[len(prompt) - 1]))]
            for _ in range(6):
                llm.eval(generated[-1:])
                generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        assert np.isfinite(logits[name]).all() and all(0 <= t < len(tokenizer) for t in generated)
    scale = np.abs(logits["f32"]).max()
    assert np.abs(logits["q8"] - logits["f32"]).max() < 0.05 * scale  # 8-bit: near the float logits
    assert 0 < np.abs(logits["q4km"] - logits["f32"]).max() < 0.5 * scale
