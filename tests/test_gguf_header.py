"""The llama.cpp target's own GGUF header reader and the zero-block retyped copy its decode cost model times
(targets/llamacpp/gguf_header.py): the reader agrees with gguf-py's on every tensor and scalar; the copy holds
exactly the tensors, types and bytes llama-quantize writes for the same per-tensor types, and llama.cpp runs it."""
from __future__ import annotations

import numpy as np
import pytest

from targets.llamacpp import writer
from targets.llamacpp.gguf_header import GGUFFormatError, read_header, stored_bytes, write_zeroed
from targets.llamacpp.quantize import fallback_type, quantize_gguf
from targets.llamacpp.runtime import loaded
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

# ffn_down's 512-wide rows take every K- and i-quant block; the other matrices' 320-wide rows only 32-blocks
# (llama.cpp's fallbacks)
WIDE = dict(hidden_size=320, intermediate_size=512, num_attention_heads=4, num_key_value_heads=1,
            num_hidden_layers=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def float_gguf(tmp_path_factory):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    path = tmp_path_factory.mktemp("header") / "f32.gguf"
    writer.write(model, tokenizer, path)
    return path


def _gguf_py(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape.tolist())), int(t.n_bytes),
                        int(t.data_offset)) for t in reader.tensors}
    return reader, tensors


def test_the_header_reader_agrees_with_gguf_py_on_every_tensor_and_scalar(float_gguf, tmp_path):
    quantized = tmp_path / "mixed.gguf"
    quantize_gguf(float_gguf, quantized, "Q4_K_M")  # a preset's mixture: several types, fallbacks on 64-wide rows
    for path in (float_gguf, quantized):
        reader, tensors = _gguf_py(path)
        header = read_header(path)
        assert {t.name: (t.kind, t.shape, t.n_bytes, header.data_start + t.offset) for t in header.tensors} == tensors
        scalars = {f.name: f.contents() for f in reader.fields.values()
                   if not f.name.startswith("GGUF.") and len(f.types) == 1}
        assert header.fields == scalars and scalars["general.architecture"] == "llama"
    assert len(set(read_header(quantized).types().values())) >= 3


@pytest.mark.parametrize("kind", ["Q4_K", "IQ4_XS", "Q2_K", "Q6_K", "Q4_0", "Q8_0"])
def test_a_zeroed_copy_holds_what_llama_quantize_writes_and_llama_cpp_runs_it(float_gguf, tmp_path, kind):
    header = read_header(float_gguf)
    types = {t.name: fallback_type(kind, t.shape[-1]) for t in header.tensors if len(t.shape) == 2}
    assert len(set(types.values())) == (1 if kind in ("Q4_0", "Q8_0") else 2)  # the 320-wide rows fall back
    quantized, zeroed = tmp_path / "q.gguf", tmp_path / "z.gguf"
    quantize_gguf(float_gguf, quantized, "Q8_0", overrides=types)
    assert write_zeroed(float_gguf, zeroed, types) == read_header(quantized).types()
    (_, want), (reader, got) = _gguf_py(quantized), _gguf_py(zeroed)
    assert {n: v[:3] for n, v in got.items()} == {n: v[:3] for n, v in want.items()}
    source = {t.name: np.asarray(t.data) for t in _gguf_py(float_gguf)[0].tensors}
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.name in types:
            assert not data.view(np.uint8).any(), tensor.name
        else:  # the norms, copied byte for byte
            assert np.array_equal(data, source[tensor.name]), tensor.name
    with loaded(zeroed, 32, 1) as llm:
        llm.eval([1, 2, 3])
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        assert np.isfinite(logits).all()


def test_bad_requests_say_what_is_wrong(float_gguf, tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        read_header(not_gguf)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(float_gguf.read_bytes()[:2000])
    with pytest.raises(GGUFFormatError, match="ends inside its GGUF header"):
        read_header(cut)
    with pytest.raises(KeyError, match="no tensor 'blk.9.attn_q.weight'"):
        write_zeroed(float_gguf, tmp_path / "z.gguf", {"blk.9.attn_q.weight": "Q4_0"})
    with pytest.raises(ValueError, match="Q4_K stores rows in blocks of 256; a 320-wide row"):
        write_zeroed(float_gguf, tmp_path / "z.gguf", {"blk.0.attn_k.weight": "Q4_K"})
    assert stored_bytes("Q4_0", (3, 64)) == 3 * 2 * 18 and stored_bytes("F32", (2, 5)) == 40


def test_the_decode_cost_files_are_zeroed_copies_not_quantized(monkeypatch, tmp_path):
    """decode_costs writes its files without llama-quantize (the cost is what 12 quantizations took)."""
    from types import SimpleNamespace

    from search_spaces.base import BuildContext
    from targets.llamacpp import allocated, quantize, runtime, sensitivity

    def never(*args, **kwargs):
        raise AssertionError("decode costs quantized a file")

    seen = []

    def fake_time_many(paths, source, protocol):
        for path in paths:
            header = read_header(path)
            seen.append(header.types())
            assert not any(np.fromfile(path, np.uint8, count=t.n_bytes, offset=header.data_start + t.offset).any()
                           for t in header.tensors if t.kind != "F32")
        return [SimpleNamespace(decode_ratio=0.5) for _ in paths]

    monkeypatch.setattr(quantize, "quantize_gguf", never)
    monkeypatch.setattr(runtime, "time_many", fake_time_many)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    context = BuildContext(tokenizer=tokenizer, calibration=[], seed=0, cache_dir=None, model_id=None, progress=False)
    costs = allocated.decode_costs(model, context)
    assert set(costs) == set(sensitivity.MENUS["all"])
    # one file per distinct written mix, each with the type (or fallback) asked for on every matrix
    assert len(seen) == len({fallback_type(k, 512) + fallback_type(k, 320) for k in sensitivity.MENUS["all"]})
    assert any(set(types.values()) == {"IQ4_XS", "IQ4_NL", "F32"} for types in seen)


def test_a_large_models_decode_costs_are_timed_on_its_first_layers(monkeypatch):
    """Past COST_PARAMETERS the cost files hold only the model's first decoder layers (at least
    COST_LEAST_LAYERS); the model itself keeps all of them, and a smaller model is timed whole."""
    from types import SimpleNamespace

    from search_spaces.base import BuildContext
    from targets.llamacpp import allocated, runtime

    blocks = []

    def fake_time_many(paths, source, protocol):
        for path in [source, *paths]:
            blocks.append({t.name.split(".")[1] for t in read_header(path).tensors if t.name.startswith("blk.")})
        return [SimpleNamespace(decode_ratio=0.5) for _ in paths]

    monkeypatch.setattr(runtime, "time_many", fake_time_many)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=6)
    context = BuildContext(tokenizer=tokenizer, calibration=[], seed=0, cache_dir=None, model_id=None, progress=False)
    assert allocated.cost_layers(model) is None  # far under COST_PARAMETERS: all six
    allocated.decode_costs(model, context)
    assert blocks and all(kept == {str(i) for i in range(6)} for kept in blocks)

    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    rest = sum(p.numel() for p in model.parameters()) - 6 * per_layer
    monkeypatch.setattr(allocated, "COST_LEAST_LAYERS", 2)
    monkeypatch.setattr(allocated, "COST_PARAMETERS", rest + 3 * per_layer)
    assert allocated.cost_layers(model) == 3
    monkeypatch.setattr(allocated, "COST_PARAMETERS", rest)  # not even one layer: the least
    assert allocated.cost_layers(model) == 2
    blocks.clear()
    allocated.decode_costs(model, context)
    assert blocks and all(kept == {"0", "1"} for kept in blocks)  # the reference too: a ratio of like to like
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
