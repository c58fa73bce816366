"""`llama-quant`: llama.cpp's own quantizer with a type per tensor chosen by the planner's allocation.

Checked against llama.cpp itself: the in-process quantizer (ggml_quants) writes the bytes llama-quantize
writes; the allocation keeps within its byte target and its type menu; a built candidate is written with the
planned type per tensor (or llama.cpp's stated fallback), its tied embedding quantized in place, the importance
matrix and llama-quantize's metadata in the file; a study on the llama.cpp target searches it under a memory
budget at a preset's size and ships the GGUF with its imatrix file; the transformers target leaves it out.
"""
from __future__ import annotations

import json
import os

import copy
import itertools
from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch
import yaml

import cli
import targets  # noqa: F401  (registers llama-quant)
from planner.storage import open_storage
from search_spaces import TECHNIQUES
from search_spaces.base import BuildContext
from search_spaces.quantization import QuantSpace, QuantSpec, fit_to_scheme
from search_spaces.quantization.allocation import Option
from search_spaces.quantization.spec import AllocationSettings
from search_spaces.specs import SpecError
from targets.llamacpp import ggml_quants, sensitivity, writer
from targets.llamacpp.allocated import PLAN_ATTRIBUTE, choose_types, predicted_decode, sensitivity_tables, tables_kl
from targets.llamacpp.gguf_header import read_float_tensor
from targets.llamacpp.imatrix import collected_by_llama_imatrix, importance_matrix, read_imatrix_file
from targets.llamacpp.quantize import fallback_type, quantize_gguf, tensor_types, type_bytes
from targets.llamacpp.runtime import loaded
from tests.conftest import SAMPLE_TEXT, make_tiny_llama, make_tiny_tokenizer
from tests.llama_cpp_imatrix_loader import load_like_llama_quantize

WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


class Doc:
    def __init__(self, text):
        self.text = text


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def context(tokenizer, tmp_path_factory):
    return BuildContext(tokenizer=tokenizer, calibration=[Doc(SAMPLE_TEXT * 4)], seed=0,
                        cache_dir=tmp_path_factory.mktemp("cache"), model_id="tiny-wide", progress=False)


def spec(bpw=5.0, types="all") -> QuantSpec:
    return QuantSpec(method="llama-quant", bits={"attn": 4, "mlp": 4, "head": 16}, grid="gguf", group_size=32,
                     allocation=AllocationSettings(bpw=bpw, types=types, samples=4, seq_len=32))


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "Q2_K"])
def test_the_in_process_quantizer_writes_the_bytes_llama_quantize_writes(tokenizer, tmp_path, kind):
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    windows = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    matrix = importance_matrix(model, windows, head=True)
    source = tmp_path / "f32.gguf"
    writer.write(model, tokenizer, source)
    out = tmp_path / "q.gguf"
    quantize_gguf(source, out, "Q8_0", overrides={"blk.0.ffn_down.weight": kind, "blk.1.ffn_gate.weight": kind},
                  imatrix=matrix)
    from gguf import GGUFReader

    stored = {t.name: np.asarray(t.data).view(np.uint8).reshape(-1) for t in GGUFReader(str(out)).tensors}
    for name, module in (("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj),
                         ("blk.1.ffn_gate.weight", model.model.layers[1].mlp.gate_proj)):
        mine = ggml_quants.quantize(kind, module.weight.detach().numpy(), matrix[name])
        assert np.array_equal(mine.reshape(-1), stored[name]), name
        restored = ggml_quants.dequantize(kind, mine, module.weight.shape[1])
        from gguf import quants

        assert np.array_equal(restored, quants.dequantize(mine, getattr(__import__("gguf").GGMLQuantizationType, kind)))


def test_the_in_process_quantizer_refuses_what_ggml_would_abort_on():
    weight = np.ones((4, 256), dtype=np.float32)
    with pytest.raises(ValueError, match="IQ2_XXS needs an importance matrix"):
        ggml_quants.quantize("IQ2_XXS", weight)
    with pytest.raises(ValueError, match="blocks of 256; a 96-wide row does not fit"):
        ggml_quants.quantize("Q4_K", np.ones((4, 96), dtype=np.float32))
    with pytest.raises(ValueError, match="3 values for 256 columns"):
        ggml_quants.quantize("Q4_0", weight, np.ones(3, dtype=np.float32))


def test_sampled_rows_estimate_the_whole_tensors_error():
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((2048, 256)).astype(np.float32))
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(256, 2048, bias=False)
    model.proj.weight.data = weight
    tensor = sensitivity.Tensor("blk.0.ffn_up.weight", ("proj",), None, (2048, 256))
    full = sensitivity.type_options(model, [tensor], ["Q4_0"], rows=2048)["blk.0.ffn_up.weight"][0]
    sampled = sensitivity.type_options(model, [tensor], ["Q4_0"], rows=256)["blk.0.ffn_up.weight"][0]
    assert full.bytes == sampled.bytes == 2048 * 256 // 32 * 18
    assert sampled.error == pytest.approx(full.error, rel=0.05) and sampled.error != full.error


def test_a_compensated_options_ratio_is_measured_on_fewer_rows_of_a_wide_tensor_and_scales_all_rows_error():
    """The ratio of the compensated rounding's output error to llama.cpp's rounding's costs rows x width^2: a wide
    tensor measures it on fewer of the sampled rows (as many weights as 128 rows of 1536, at least 32), and the
    error it scales stays the importance-weighted error of all sampled rows (the plain option's)."""
    from targets.llamacpp import compensated

    assert [sensitivity.compensated_rows(w) for w in (576, 1536, 2048, 8192, 16384)] == [128, 128, 96, 32, 32]
    rng = np.random.default_rng(0)
    width, rows = 256, 512
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(width, rows, bias=False)
    model.proj.weight.data = torch.from_numpy(rng.standard_normal((rows, width)).astype(np.float32))
    inputs = rng.standard_normal((4096, width)).astype(np.float32) * np.linspace(0.2, 3, width, dtype=np.float32)
    inputs[:, 1::2] += inputs[:, ::2]  # correlated inputs: something to compensate
    covariance = inputs.T @ inputs / len(inputs)
    importance = np.ascontiguousarray(covariance.diagonal())
    tensor = sensitivity.Tensor("blk.0.ffn_down.weight", ("proj",), importance, (rows, width))
    plain = sensitivity.type_options(model, [tensor], ["Q4_0"])[tensor.gguf_name][0]
    found = sensitivity.compensated_options(model, [tensor], ["Q4_0"], {tensor.gguf_name: covariance},
                                            ratio_rows=lambda w: 16, threads=1)[tensor.gguf_name]
    assert [o.kind for o in found] == ["Q4_0+gptq"]
    sampled = model.proj.weight.detach().numpy()[sensitivity.sampled_rows(rows, sensitivity.ROWS)]
    part = sampled[sensitivity.sampled_rows(len(sampled), 16)]
    ours = ggml_quants.dequantize("Q4_0", compensated.compensated_round(part, covariance, "Q4_0", importance), width)
    theirs, _ = ggml_quants.roundtrip("Q4_0", part, importance)
    ratio = compensated.output_error(part, ours, covariance) / compensated.output_error(part, theirs, covariance)
    assert 0 < ratio < 0.95
    assert found[0].error == pytest.approx(plain.error * ratio, rel=1e-6)


def test_choose_types_keeps_to_the_menu_as_written_and_the_byte_target():
    tables = {"tensors": {"a": {"width": 576, "size": 576 * 64}, "b": {"width": 512, "size": 512 * 64}},
              "options": {"a": [Option("Q4_0", 100, 5.0), Option("Q5_0", 120, 2.0), Option("Q8_0", 200, 0.1)],
                          "b": [Option("Q4_K", 90, 4.0), Option("Q4_0", 100, 4.5), Option("Q8_0", 200, 0.2)]}}
    chosen = choose_types(tables, ["Q4_K", "Q8_0"], 250)  # on 576-wide rows Q4_K is written as Q5_0
    assert {n: o.kind for n, o in chosen.items()} == {"a": "Q5_0", "b": "Q4_K"}
    chosen = choose_types(tables, ["Q4_K", "Q8_0"], 1000)
    assert {n: o.kind for n, o in chosen.items()} == {"a": "Q8_0", "b": "Q8_0"}
    assert sum(o.bytes for o in choose_types(tables, ["Q4_0", "Q5_0", "Q8_0"], 250).values()) <= 250
    # an excluded type is not chosen where another type falls back to it (Q4_K -> Q5_0 on 576-wide rows)
    assert choose_types(tables, ["Q4_K", "Q8_0"], 250, exclude=("Q5_0",))["a"].kind == "Q8_0"


def test_a_speed_weight_buys_faster_types_with_predicted_kl():
    tables = {"tensors": {"a": {"width": 512, "size": 100}, "b": {"width": 512, "size": 300}},
              "options": {"a": [Option("Q4_0", 50, 1.0), Option("Q4_K", 50, 0.5)],
                          "b": [Option("Q4_0", 150, 1.0), Option("Q4_K", 150, 0.9)]}}
    costs = {"Q4_0": 0.2, "Q4_K": 0.6}  # decode ratio of the whole model in each type
    assert {n: o.kind for n, o in choose_types(tables, ["Q4_0", "Q4_K"], 200).items()} == {"a": "Q4_K", "b": "Q4_K"}
    # speed 1: b's 0.1 KL is worth less than its 3/4 x 0.4 decode; a's 0.5 KL more than its 1/4 x 0.4
    fast = choose_types(tables, ["Q4_0", "Q4_K"], 200, costs, speed=1.0)
    assert {n: o.kind for n, o in fast.items()} == {"a": "Q4_K", "b": "Q4_0"}
    assert sum(tables_kl(tables, fast)) == pytest.approx(1.5)  # the KL alone, without the decode term
    assert predicted_decode(tables, fast, costs) == pytest.approx(0.25 * 0.6 + 0.75 * 0.2)


def test_gain_groups_are_one_role_in_one_band_of_layers():
    names = [f"blk.{i}.{role}.weight" for i in range(8) for role in ("attn_v", "ffn_down")] + ["token_embd.weight"]
    groups = sensitivity.gain_groups([sensitivity.Tensor(n, (n,), None, (32, 32)) for n in names], buckets=4)
    assert sorted(groups) == sorted([f"{r}@{b}" for r in ("attn_v", "ffn_down") for b in range(4)] + ["token_embd.weight"])
    assert [t.gguf_name for t in groups["attn_v@1"]] == ["blk.2.attn_v.weight", "blk.3.attn_v.weight"]


@pytest.mark.parametrize("tied", [True, False])
def test_kl_gains_replaying_the_layers_before_a_group_measure_what_full_passes_measure(tokenizer, tied):
    """Each group's pass computes only the layers from its first on (the float pass's outputs replayed before
    it), and its KL is exactly the full pass's; the head's group computes no decoder layer."""
    from targets.llamacpp.imatrix import importance_matrix

    model = make_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=8, tie_word_embeddings=tied)
    windows = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    tensors = sensitivity.quantizable(model, importance_matrix(model, windows, head=True))
    calls = [0] * 8

    def count(index):
        def hook(module, args, output):
            calls[index] += 1
        return hook

    for index, layer in enumerate(model.model.layers):  # the block's own modules run only when it is computed
        layer.mlp.register_forward_hook(count(index))
    replayed = sensitivity.kl_gains(model, tensors, windows)
    groups = sensitivity.gain_groups(tensors)
    # the float pass, then a group's pass from its band's first layer (layers 0-1, 2-3, 4-5, 6-7 in 4 bands)
    assert calls == [1 + sum(1 for g in groups.values() if min(_layer(t) for t in g) <= i) for i in range(8)]
    full = sensitivity.kl_gains(model, tensors, windows, replay=False)
    assert replayed == full and len(full) == len(tensors) and len({kl for kl, _ in full.values()}) > 8
    assert all(layer.forward.__func__ is type(layer).forward for layer in model.model.layers)  # put back


def _layer(tensor) -> int:
    """The first decoder layer a tensor's group changes: its block, 0 for the embedding (tied or not), past the
    last for an untied head."""
    parts = tensor.gguf_name.split(".")
    return int(parts[1]) if parts[0] == "blk" else 0 if parts[0] == "token_embd" else 8


@pytest.mark.parametrize("compensate", [False, True])
def test_a_built_candidate_is_written_with_the_planned_types_and_its_imatrix(tokenizer, context, tmp_path, compensate):
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    chosen = replace(spec(bpw=5.0), allocation=AllocationSettings(bpw=5.0, speed=0.5, samples=4, seq_len=32,
                                                                  compensate=compensate))
    estimate = TECHNIQUES["quantization"].weight_bytes(model, chosen)
    built = TECHNIQUES["quantization"].apply(model, chosen, context)
    plan = getattr(built, PLAN_ATTRIBUTE)
    weights = sum(p.numel() for n, p in built.named_parameters() if n.endswith("proj.weight")) + \
        built.model.embed_tokens.weight.numel()
    assert plan.bytes <= 5.0 * weights / 8  # the byte target
    assert "token_embd.weight" in plan.types and "output.weight" not in plan.types  # tied: one tensor, in place
    assert set(plan.types.values()) <= set(sensitivity.MENUS["all"]) | {"F16"}
    path = tmp_path / "model.gguf"
    info = writer.write(built, tokenizer, path)
    written = tensor_types(path)
    assert "output.weight" not in written
    assert {n: written[n] for n in plan.types} == plan.types
    assert info["tensor_types"] == written and info["predicted_kl"] == plan.predicted_kl
    # per-type decode ratios were timed and cached; the plan's prediction is their mean weighted by tensor size
    costs = json.loads(next(context.cache_dir.rglob("decode-*-threads.json")).read_text())
    assert set(costs) == set(sensitivity.MENUS["all"]) and all(ratio > 0 for ratio in costs.values())
    sizes = {t.gguf_name: t.size for t in sensitivity.quantizable(built, {})}
    assert plan.predicted_decode == pytest.approx(
        sum(sizes[n] * costs.get(k, 1.0) for n, k in plan.types.items()) / sum(sizes.values()))
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["quantize.imatrix.entries_count"] == len(plan.imatrix)
    assert fields["general.quantization_version"] == 2
    # quantized with the plan's importance matrix: the bytes are what ggml writes given those values
    # (an MLP tensor, whose rows the writer does not permute, in a type whose bytes depend on those values)
    mlp = {f"blk.{i}.ffn_{part}.weight": getattr(built.model.layers[i].mlp, f"{part}_proj")
           for i in range(2) for part in ("gate", "up", "down")}
    def stored(name):
        return np.asarray(next(t for t in reader.tensors if t.name == name).data).view(np.uint8).reshape(-1)

    # with compensation, every tensor whose tables predict less KL so (here: all it may write) is written with its
    # compensated blocks, whose codes differ from llama.cpp's rounding of the same weights
    assert bool(plan.compensated) == compensate and info["compensated_tensors"] == sorted(plan.compensated)
    assert ("+gptqx" in info["stored"]) == compensate
    assert set(plan.compensated) <= {n for n in plan.types if n.startswith("blk.")}
    if compensate:  # each row's blocks where the writer put the row (llama's q and k rows are permuted)
        setattr(built, PLAN_ATTRIBUTE, replace(plan, compensated={}))
        writer.write(built, tokenizer, tmp_path / "rounded.gguf")
        setattr(built, PLAN_ATTRIBUTE, plan)
        rounded = {t.name: t for t in GGUFReader(str(tmp_path / "rounded.gguf")).tensors}
        assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight"} <= set(plan.compensated)
        for name in plan.compensated:
            kind, width = plan.types[name], rounded[name].shape[0]
            ours = ggml_quants.dequantize(kind, stored(name), int(width))
            theirs = ggml_quants.dequantize(kind, np.asarray(rounded[name].data).view(np.uint8), int(width))
            assert np.linalg.norm(ours - theirs) < 0.5 * np.linalg.norm(theirs), name
            # and nothing else than those blocks differs from llama.cpp's file
            assert not np.array_equal(ours, theirs)
        # llama.cpp is handed the compensated tensors as zeros (its own rounding of them is replaced whole), and the
        # file is byte for byte the one written from their weights
        handed = {}

        def quantize_seen(src, *args, **kwargs):
            handed.update({n: np.any(read_float_tensor(src, n)) for n in plan.compensated})
            return quantize_gguf(src, *args, **kwargs)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(writer, "quantize_gguf", quantize_seen)
            writer.write(built, tokenizer, tmp_path / "zeroed.gguf")
            assert handed == dict.fromkeys(plan.compensated, False)
            patch.setattr(writer, "zero_tensors", lambda *a: None)
            writer.write(built, tokenizer, tmp_path / "whole.gguf")
            assert set(handed.values()) == {True}
        assert (tmp_path / "zeroed.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes() == path.read_bytes()
        with pytest.MonkeyPatch.context() as patch:  # a rebuild reads its blocks back: no covariance computed
            patch.setattr(sensitivity, "compensable_inputs", lambda *a, **k: pytest.fail("covariances recomputed"))
            rebuilt = getattr(TECHNIQUES["quantization"].apply(make_tiny_llama(vocab_size=len(tokenizer), **WIDE),
                                                               chosen, context), PLAN_ATTRIBUTE)
        assert rebuilt.compensated.keys() == plan.compensated.keys()
        assert all(np.array_equal(rebuilt.compensated[n], plan.compensated[n]) for n in plan.compensated)
    for name in (n for n in mlp if n in plan.compensated and plan.types[n] != "F16"):
        assert not np.array_equal(stored(name), ggml_quants.quantize(
            plan.types[name], mlp[name].weight.detach().numpy(), plan.imatrix[name]).reshape(-1))
    quantized_mlp = [n for n in mlp if plan.types[n] != "F16"]
    assert {n for n in quantized_mlp if n in plan.compensated} == (set(quantized_mlp) if compensate else set())
    for name in (n for n in quantized_mlp if n not in plan.compensated and plan.types[n] != "Q8_0"):
        assert np.array_equal(stored(name), ggml_quants.quantize(
            plan.types[name], mlp[name].weight.detach().numpy(), plan.imatrix[name]).reshape(-1))
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    assert tensor_bytes <= estimate  # the spec's size is an upper bound: a memory budget never lets one through
    with loaded(path, 64, 1) as llm:
        generated = list(itertools.islice(llm.generate([1, 2, 3], temp=0.0), 8))
        assert len(generated) == 8 and all(0 <= t < len(tokenizer) for t in generated)
    imatrix_path = writer.write_imatrix(built, tmp_path)
    matrix, info = read_imatrix_file(imatrix_path)  # what llama-imatrix collects: the blocks (tied: no head)
    assert set(matrix) == {n for n in plan.imatrix if n.startswith("blk.")} and info["chunk_size"] == 32
    assert all(np.allclose(matrix[n], plan.imatrix[n], rtol=1e-5) for n in matrix)


def test_a_family_restricts_the_types_and_the_cache_serves_the_second_build(tokenizer, context, tmp_path):
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    built = TECHNIQUES["quantization"].apply(model, spec(bpw=6.0, types="legacy"), context)
    types = set(getattr(built, PLAN_ATTRIBUTE).types.values())
    assert types <= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}, types
    excluded = replace(spec(), allocation=AllocationSettings(bpw=6.0, types="legacy", exclude=("Q4_1", "Q5_1", "Q8_0"),
                                                             samples=4, seq_len=32))
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    types = set(getattr(TECHNIQUES["quantization"].apply(model, excluded, context), PLAN_ATTRIBUTE).types.values())
    assert types <= {"Q4_0", "Q5_0"}, types
    windows = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    first = sensitivity_tables(model, windows, context)
    from targets.llamacpp import allocated

    with pytest.MonkeyPatch.context() as patch:  # same key: read from the cache, nothing computed
        patch.setattr(allocated, "importance_matrix", lambda *a, **k: pytest.fail("importance matrix recomputed"))
        patch.setattr(sensitivity, "kl_gains", lambda *a, **k: pytest.fail("KL gains recomputed"))
        again = sensitivity_tables(model, windows, context)
    assert first["options"] == again["options"] and first["tensors"] == again["tensors"]
    assert all(np.array_equal(first["imatrix"][n], again["imatrix"][n]) for n in first["imatrix"])
    assert not any(o.kind.endswith("+gptq") for opts in first["options"].values() for o in opts)
    # the compensated options only when asked for, computed once, beside the same table (its gains)
    with_compensated = sensitivity_tables(model, windows, context, compensate=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sensitivity, "kl_gains", lambda *a, **k: pytest.fail("KL gains recomputed"))
        patch.setattr(sensitivity, "compensated_options", lambda *a, **k: pytest.fail("compensation recomputed"))
        assert sensitivity_tables(model, windows, context, compensate=True)["options"] == with_compensated["options"]
    for name, options in with_compensated["options"].items():
        plain = {o.kind for o in first["options"][name]}
        assert [o for o in options if o.kind in plain] == first["options"][name]
        compensable = plain - {"F16"} if name != "token_embd.weight" else set()  # a lookup table: never
        assert {o.kind[:-5] for o in options if o.kind.endswith("+gptq")} == compensable
    folders = set((context.cache_dir / "llama-sensitivity").iterdir())
    other = sensitivity_tables(model, windows.roll(1, dims=1), context)  # another text: the same tokens, moved
    assert len(set((context.cache_dir / "llama-sensitivity").iterdir()) - folders) == 1  # its own entry
    assert not all(np.array_equal(other["imatrix"][n], first["imatrix"][n]) for n in first["imatrix"])


def test_the_compared_presets_and_llama_quant_share_one_importance_matrix(tokenizer, monkeypatch, tmp_path):
    """The study's importance matrix (what every compared preset is quantized with) is the one llama-quant's
    tables start from on the source model: computed once, whichever asks first."""
    from targets.llamacpp import allocated, stock

    computed = []
    real = allocated.importance_matrix
    monkeypatch.setattr(allocated, "importance_matrix", lambda *a, **k: computed.append(1) or real(*a, **k))
    cached = BuildContext(tokenizer=tokenizer, calibration=[Doc(SAMPLE_TEXT * 40)], seed=0, cache_dir=tmp_path,
                          model_id="tiny-shared", progress=False)
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    imatrix, tokens, chunk, _ = stock.study_imatrix(model, cached)
    defaults = AllocationSettings()
    windows = allocated.calibration_batches(tokenizer, cached.calibration, defaults.samples, defaults.seq_len, 0)
    tables = sensitivity_tables(model, windows, cached)
    assert len(computed) == 1 and tokens == windows.numel() and chunk == defaults.seq_len
    assert all(np.array_equal(tables["imatrix"][n], imatrix[n]) for n in imatrix)
    stock.study_imatrix(model, replace(cached, cache_dir=None))  # nowhere to keep it: computed again
    assert len(computed) == 2
    # a study's own calibration sizes for llama-quant are the presets' too
    from search_spaces.quantization.spec import AllocationSpace
    from targets.llamacpp.target import LlamaCppTarget

    target = LlamaCppTarget()
    target.fit_spaces({"quantization": QuantSpace(allocation=AllocationSpace(samples=4, seq_len=32))}, model)
    _, tokens, chunk, dataset = target._study_imatrix(model, cached)
    assert (tokens, chunk) == (4 * 32, 32) and dataset == "planner: 4 x 32 tokens of the calibration (training) split"


def _filling(fill: float | None, bpw: float = 7.0) -> QuantSpec:
    return replace(spec(bpw=bpw), allocation=replace(spec().allocation, bpw=bpw, fill=fill))


def test_an_allocation_aimed_at_a_budget_gets_the_bits_that_fill_it_on_the_candidates_shapes():
    model, quant, limit = make_tiny_llama(vocab_size=300, **WIDE), TECHNIQUES["quantization"], 900_000
    resolved = {}
    for fill in (1.0, 0.8):
        aimed = quant.aim(_filling(fill), model, limit)
        bpw = aimed.allocation.bpw
        size = quant.weight_bytes(model, aimed)
        # the most bits (to 1/1000) whose exact stored bytes fit fill x the budget
        assert size <= fill * limit < quant.weight_bytes(model, _filling(fill, round(bpw + 0.001, 3)))
        assert size > 0.99 * fill * limit
        assert aimed.allocation.fill == fill and QuantSpec.from_dict(aimed.to_dict()) == aimed  # a recipe pins both
        resolved[fill] = bpw
    assert resolved[0.8] < resolved[1.0]
    assert f"llama-quant {resolved[1.0]:.2f}bpw=100%budget all" in quant.describe(quant.aim(_filling(1.0), model, limit))
    assert quant.aim(spec(bpw=5.0), model, limit) == spec(bpw=5.0)  # a spec with a bpw of its own is left alone
    over = quant.aim(_filling(1.0), model, 100_000)  # below the family's smallest types: over, rejected unbuilt
    assert quant.weight_bytes(model, over) > 100_000


def test_a_built_allocation_aimed_at_a_budget_writes_a_file_within_it(tokenizer, context, tmp_path):
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    limit = 0.85 * TECHNIQUES["quantization"].weight_bytes(model, spec(bpw=6.0))
    aimed = TECHNIQUES["quantization"].aim(_filling(1.0), model, limit)
    built = TECHNIQUES["quantization"].apply(model, aimed, context)
    path = tmp_path / "model.gguf"
    writer.write(built, tokenizer, path)
    from gguf import GGUFReader

    stored = sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)
    assert 0.9 * limit <= stored <= limit  # the budget spent, not left on the table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_what_a_gguf_stores_beyond_the_held_tensors_is_in_the_estimate(tokenizer, tmp_path, dtype):
    """A 16-bit model's norms are written in F32: the estimate of a float and of an RTN candidate on the llama.cpp
    target is the file's tensor bytes, exactly (the converter's extra tensors: tests/test_convert.py)."""
    from gguf import GGUFReader
    from planner.candidates import Stage, estimate_weight_bytes
    from targets.llamacpp.target import LlamaCppTarget

    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE).to(dtype)
    beyond = LlamaCppTarget().stored_beyond
    assert beyond(model) == (0 if dtype == torch.float32 else 2 * (2 * 2 + 1) * WIDE["hidden_size"])
    rtn = QuantSpec(method="rtn", bits={"attn": 4, "mlp": 8}, group_size=32, grid="gguf")
    for stages in ([], [Stage("quantization", rtn)]):
        built = TECHNIQUES["quantization"].apply(copy.deepcopy(model), rtn, None) if stages else model
        path = tmp_path / f"{len(stages)}.gguf"
        writer.write(built, tokenizer, path)
        stored = sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)
        assert estimate_weight_bytes(model, stages, beyond=beyond) == stored, stages


def test_an_allocation_filling_a_budget_leaves_room_for_what_the_file_adds(tokenizer, context, tmp_path):
    """On a bfloat16 model the allocation aimed at the whole budget on the llama.cpp target writes a file within
    it: the norms' F32 bytes are left room for (without them it lands over, as a 1.24 B study's did by 54 KB)."""
    from gguf import GGUFReader
    from planner.candidates import Stage, aim, estimate_weight_bytes
    from targets.llamacpp.target import LlamaCppTarget

    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE).to(torch.bfloat16)
    quant, beyond = TECHNIQUES["quantization"], LlamaCppTarget().stored_beyond
    limit = 0.85 * quant.weight_bytes(model, spec(bpw=6.0))
    stages = aim(model, [Stage("quantization", _filling(1.0))], limit, beyond=beyond)
    assert limit - 1000 < quant.weight_bytes(model, stages[0].spec) + beyond(model) <= limit  # room: the F32 norms
    estimate = estimate_weight_bytes(model, stages, beyond=beyond)
    built = quant.apply(model, stages[0].spec, context)
    writer.write(built, tokenizer, tmp_path / "model.gguf")
    stored = sum(int(t.n_bytes) for t in GGUFReader(str(tmp_path / "model.gguf")).tensors)
    assert 0.9 * limit <= stored <= estimate <= limit


def test_a_budgeted_space_samples_a_share_of_the_budget_and_seeds_all_of_it_first():
    from planner.candidates import CornerTrial

    quant = TECHNIQUES["quantization"]
    space = fit_to_scheme(QuantSpace(methods=("none", "llama-quant")), "gguf")
    assert not quant.fit_budget(space, None).allocation.budgeted
    assert "llama-quant.bpw" in quant.presets(space)[0]  # no memory budget: the bpw grid
    budgeted = quant.fit_budget(space, 1e6)
    presets = quant.presets(budgeted)
    assert [p["llama-quant.fill"] for p in presets] == [1.0] and not any("llama-quant.bpw" in p for p in presets)
    seeded = quant.suggest(CornerTrial(quant.qualified(presets[0])), budgeted)
    assert seeded.allocation.fill == 1.0
    # the smallest share, in the widest family only (its smallest types are every family's least)
    assert [(p["llama-quant.fill"], p["llama-quant.types"]) for p in quant.smallest(budgeted)] == [(0.8, "all")]
    assert [p["llama-quant.types"] for p in quant.smallest(space)] == list(space.allocation.types)
    no_fill = replace(space, allocation=replace(space.allocation, fill=()))
    assert not quant.fit_budget(no_fill, 1e6).allocation.budgeted  # fill = [] keeps the bpw grid under a budget
    with pytest.raises(SpecError, match="AllocationSettings.fill"):
        AllocationSettings(fill=1.5)


def test_pinned_types_are_built_as_they_are_and_only_on_their_own_shape(tokenizer, context, monkeypatch):
    """A recipe's pinned types (what the measured file held) are what a rebuild quantizes to, with no allocation
    solved; types of another shape are refused naming the first tensor that differs."""
    from targets.llamacpp import allocated

    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    measured = {"runtime": {"tensor_types": {**{t.gguf_name: kind for t, kind in zip(
        sensitivity.quantizable(model, {}), itertools.cycle(["Q4_K", "Q6_K", "IQ4_XS", "Q8_0"]))},
        "output_norm.weight": "F32"}}}
    pinned = TECHNIQUES["quantization"].pin(spec(bpw=5.0), measured)
    assert dict(pinned.allocation.pinned) == measured["runtime"]["tensor_types"]
    assert QuantSpec.from_dict(pinned.to_dict()) == pinned  # as a recipe holds it
    assert TECHNIQUES["quantization"].pin(spec(), {}) == spec()  # nothing measured: nothing pinned
    monkeypatch.setattr(allocated, "choose_types", lambda *a, **k: pytest.fail("the allocation was solved"))
    built = TECHNIQUES["quantization"].apply(model, pinned, context)
    plan = getattr(built, PLAN_ATTRIBUTE)
    assert plan.types == {n: k for n, k in measured["runtime"]["tensor_types"].items() if n != "output_norm.weight"}
    assert plan.predicted_kl is None and plan.bytes == sum(
        type_bytes(plan.types[t.gguf_name], t.shape) for t in sensitivity.quantizable(model, {}))
    smaller = make_tiny_llama(vocab_size=len(tokenizer), **{**WIDE, "num_hidden_layers": 1})
    with pytest.raises(SpecError, match=r"blk.1.attn_k.weight is not quantized here \(the types of another"):
        TECHNIQUES["quantization"].apply(smaller, pinned, context)
    less = dict(pinned.allocation.pinned)
    del less["blk.0.ffn_up.weight"]
    with pytest.raises(SpecError, match="pinned: no type for blk.0.ffn_up.weight"):
        TECHNIQUES["quantization"].apply(make_tiny_llama(vocab_size=len(tokenizer), **WIDE), replace(
            pinned, allocation=replace(pinned.allocation, pinned=tuple(less.items()))), context)
    with pytest.raises(SpecError, match=r"AllocationSettings.pinned: expected a list of \[tensor name, type name\]"):
        AllocationSettings(pinned=(("blk.0.attn_q.weight",),))
    # compensated tensors are pinned as <type>+gptq and rounded again; the embedding (a lookup) never is
    measured["runtime"]["compensated_tensors"] = ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    pinned = TECHNIQUES["quantization"].pin(spec(bpw=5.0), measured)
    kinds = dict(pinned.allocation.pinned)
    assert kinds["blk.0.attn_q.weight"] == measured["runtime"]["tensor_types"]["blk.0.attn_q.weight"] + "+gptq"
    assert sum(k.endswith("+gptq") for k in kinds.values()) == 2
    plan = getattr(TECHNIQUES["quantization"].apply(make_tiny_llama(vocab_size=len(tokenizer), **WIDE), pinned, context),
                   PLAN_ATTRIBUTE)
    assert sorted(plan.compensated) == ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    assert plan.types["blk.0.attn_q.weight"] == measured["runtime"]["tensor_types"]["blk.0.attn_q.weight"]
    embedding = {**kinds, "token_embd.weight": "Q8_0+gptq"}
    with pytest.raises(SpecError, match=r"pinned: token_embd.weight cannot be Q8_0\+gptq"):
        TECHNIQUES["quantization"].apply(make_tiny_llama(vocab_size=len(tokenizer), **WIDE), replace(
            pinned, allocation=replace(pinned.allocation, pinned=tuple(embedding.items()))), context)


def test_the_specs_checks_and_labels():
    assert spec(bpw=5.5, types="k").summary() == "quant(llama-quant 5.5bpw k gptq)"  # compensated codes: default
    fast = QuantSpec(method="llama-quant", bits={"attn": 4, "mlp": 4, "head": 16}, grid="gguf", group_size=32,
                     allocation=AllocationSettings(bpw=4.5, types="legacy", speed=0.3, compensate=False))
    assert fast.summary() == "quant(llama-quant 4.5bpw legacy speed 0.3)"
    without = AllocationSettings(types="legacy", exclude=("Q4_1", "Q5_1"), compensate=False)
    assert QuantSpec(method="llama-quant", bits={"attn": 4, "mlp": 4, "head": 16}, grid="gguf", group_size=32,
                     allocation=without).summary() == "quant(llama-quant 5bpw legacy -Q4_1,Q5_1)"
    with pytest.raises(SpecError, match="exclude: leaves no type of the legacy family"):
        QuantSpec(method="llama-quant", bits={"attn": 4, "mlp": 4, "head": 16}, grid="gguf", group_size=32,
                  allocation=AllocationSettings(types="legacy", exclude=("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")))
    with pytest.raises(SpecError, match="AllocationSettings.types"):
        AllocationSettings(types="fancy")
    with pytest.raises(SpecError, match="does not round onto compressed-tensors"):
        QuantSpec(method="llama-quant", bits={"attn": 4, "mlp": 4})
    space = QuantSpace(methods=("none", "rtn", "llama-quant"))
    assert "llama-quant" not in fit_to_scheme(space, "compressed-tensors").methods
    assert "llama-quant" in fit_to_scheme(space, "gguf").methods


def test_a_memory_budgeted_study_at_a_presets_size_ships_an_allocated_gguf(tiny_study_file, tiny_model_dir, tmp_path,
                                                                          capsys, monkeypatch):
    """The size of the tiny model's Q4_K_M file (llama-quantize's preset, written here) as the memory budget:
    llama-quant candidates fit under it (no "nothing fits"), and apply ships model.gguf with imatrix.gguf."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gguf import GGUFReader

    float_file, preset_file = tmp_path / "f32.gguf", tmp_path / "q4km.gguf"
    writer.write(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
                 float_file)
    quantize_gguf(float_file, preset_file, "Q4_K_M")
    preset_bytes = sum(int(t.n_bytes) for t in GGUFReader(str(preset_file)).tensors)
    text = tiny_study_file.read_text().replace('methods = ["none", "rtn", "dynamic-int8"]',
                                               'methods = ["llama-quant"]\n[space.quantization.allocation]\n'
                                               'bpw = [4.5, 5.0, 6.0]\nspeed = [0.0, 1.0]\nsamples = 4\n'
                                               'seq_len = 32\ncompensate = [true]\n')
    tiny_study_file.write_text(text)
    # bytes and accuracy only: a 2-layer model's decode ratio is timer noise, and apply would re-time it
    code = cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "3", "--target", "llama.cpp",
                     "--memory-budget", f"{preset_bytes / 1e6}MB", "--objectives", "perplexity,weight_mb",
                     "--compare", "Q4_K_M,Q2_K", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))
    # the presets compared against: written by llama-quantize with the study's importance matrix, measured as
    # the candidates (the same bytes as the preset written above: the importance matrix changes values, not types)
    stock = study.user_attrs["stock"]
    assert set(stock) == {"Q4_K_M", "Q2_K"} and all("failure" not in e for e in stock.values()), stock
    assert stock["Q4_K_M"]["metrics"]["weight_bytes"] == preset_bytes
    assert stock["Q2_K"]["metrics"]["weight_bytes"] < preset_bytes
    for name, entry in stock.items():
        runtime = entry["measurements"]["runtime"]
        assert runtime["file_type"] == name and runtime["type_counts"] and entry["metrics"]["perplexity"] > 1
        assert entry["label"].startswith(f"llama.cpp {name} + imatrix [")
    assert "Compared with the target's stock tool" in out and "llama.cpp Q4_K_M + imatrix [" in out
    shown = json.loads(_review_json(tmp_path, capsys))["compared"]
    q2k = next(c for c in shown if c["name"] == "Q2_K")
    assert q2k["meets_budget"] and q2k["weight_mb"] == stock["Q2_K"]["metrics"]["weight_mb"]
    measured = [t for t in study.trials if "measurements" in t.user_attrs and "duplicate_of" not in t.user_attrs]
    assert measured
    for trial in measured:
        runtime = trial.user_attrs["measurements"]["runtime"]
        assert runtime["quantizer"] == "llama.cpp" and runtime["type_counts"], runtime
        # the label says what the file holds, read back from it: e.g. "quant(llama-quant 5bpw all) [Q8_0x9 Q4_Kx5]"
        shown = dict((kind, int(count)) for kind, count in
                     (part.split("x") for part in trial.user_attrs["label"].split("[")[1].rstrip("]").split()))
        assert shown == {k: n for k, n in runtime["type_counts"].items() if k not in ("F32", "F16", "BF16")}, \
            trial.user_attrs["label"]
        assert trial.user_attrs["metrics"]["weight_bytes"] <= trial.user_attrs["estimated_weight_bytes"] <= preset_bytes
        assert trial.user_attrs["stages"][-1]["spec"]["allocation"]["fill"] in (1.0, 0.9, 0.8)  # aimed at the budget
    # the first seed after the (over-budget) baseline spends the whole budget
    whole = next(t for t in measured if t.user_attrs["stages"][-1]["spec"]["allocation"]["fill"] == 1.0)
    assert whole.user_attrs["metrics"]["weight_bytes"] >= 0.9 * preset_bytes
    # the recipe of a speed 1 trial (its types chosen with timed decode costs) pins the types read back from the
    # measured file and names its importance matrix: apply, with an empty cache as on another machine, quantizes
    # to exactly those types with the same importance matrix recomputed, solving nothing and timing no costs
    fast = next(t for t in measured if t.user_attrs["stages"][-1]["spec"]["allocation"]["speed"] == 1.0)
    assert cli.main(["export", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--trial",
                     str(fast.number), "-o", str(tmp_path / "recipe.yaml")]) == 0
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe["stages"][-1]["spec"]["method"] == "llama-quant"
    recorded = recipe["metrics"]["runtime"]["tensor_types"]
    compensated = set(recipe["metrics"]["runtime"]["compensated_tensors"])
    assert compensated and compensated <= {n for n in recorded if n.startswith("blk.")}
    # compensated tensors are pinned as such: a rebuild rounds them again with the same calibration tokens
    assert dict(recipe["stages"][-1]["spec"]["allocation"]["pinned"]) == {
        n: f"{k}+gptq" if n in compensated else k for n, k in recorded.items()}
    assert recipe["stages"][-1]["spec"]["allocation"]["speed"] == 1.0
    from targets.llamacpp import allocated
    from targets.llamacpp.imatrix import imatrix_digest

    # the importance matrix of the trial's shape, among those the study cached (one per shape and text)
    cached = []
    for path in (tmp_path / "cache").rglob("imatrix.npz"):
        with np.load(path) as stored:
            cached.append({name: stored[name] for name in stored.files})
    [study_imatrix] = [m for m in cached if imatrix_digest(m) == recipe["metrics"]["runtime"]["imatrix_digest"]]
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "empty-cache"))

    def unsolvable(*args, **kwargs):
        raise AssertionError("apply solved the allocation again")

    monkeypatch.setattr(allocated, "sensitivity_tables", unsolvable)
    monkeypatch.setattr(allocated, "choose_types", unsolvable)
    monkeypatch.setattr(allocated, "decode_costs", unsolvable)
    code = cli.main(["apply", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "deploy")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / "deploy" / "model.gguf").is_file() and (tmp_path / "deploy" / "imatrix.gguf").is_file()
    assert tensor_types(tmp_path / "deploy" / "model.gguf") == recorded
    shipped, _ = load_like_llama_quantize(tmp_path / "deploy" / "imatrix.gguf")  # as llama-quantize reads it
    assert shipped.keys() == {n for n in study_imatrix if collected_by_llama_imatrix(n)}
    assert all(np.allclose(shipped[n], study_imatrix[n], rtol=1e-6) for n in shipped)


def _review_json(tmp_path, capsys) -> str:
    assert cli.main(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--json"]) == 0
    return capsys.readouterr().out


def test_decode_costs_are_timed_with_the_serving_decode_threads_and_cached_per_count(monkeypatch, tokenizer,
                                                                                    tmp_path):
    """The per-type decode costs are timed with the runtime's default decode threads (what a study times with
    unless it sets threads), once per thread count: a cost measured on 2 threads is not reused for 1."""
    import os
    from types import SimpleNamespace

    from targets.llamacpp import allocated, runtime

    timed = []

    def fake_time_many(paths, source, protocol):
        timings = []
        for path in paths:
            written = set(tensor_types(path).values()) - {"F32"}  # the types the cost file holds
            timed.append((written, protocol.threads))
            timings.append(SimpleNamespace(decode_ratio=0.5 if written == {"Q4_0"} else 0.75))
        return timings

    monkeypatch.setattr(runtime, "time_many", fake_time_many)
    context = BuildContext(tokenizer=tokenizer, calibration=[Doc(SAMPLE_TEXT)], seed=0, cache_dir=tmp_path,
                           model_id="tiny-costs", progress=False)
    model = make_tiny_llama(vocab_size=len(tokenizer))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    costs = allocated.decode_costs(model, context)
    assert set(costs) == set(sensitivity.MENUS["all"]) and costs["Q4_0"] == 0.5
    # on 32-wide rows llama.cpp writes every K-quant and IQ type as a 32-block one: each file is timed once
    files = {fallback_type(kind, 32) for kind in sensitivity.MENUS["all"]}
    assert len(timed) == len(files) < len(costs) and costs["Q4_K"] == costs[fallback_type("Q4_K", 32)]
    assert {threads for _, threads in timed} == {2}
    assert json.loads(next(tmp_path.rglob("decode-2-threads.json")).read_text()) == costs
    assert allocated.decode_costs(model, context) == costs and len(timed) == len(files)  # cached
    # another shape of the same source model (a student, a cut) uses the same cost model
    assert allocated.decode_costs(model, replace(context, upstream=({"technique": "pruning"},))) == costs
    assert len(timed) == len(files)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # another count: timed again
    allocated.decode_costs(model, context)
    assert len(timed) == 2 * len(files) and {threads for _, threads in timed[len(files):]} == {1}


def test_a_decode_target_raises_the_speed_weight_only_as_far_as_it_must():
    tables = {"tensors": {"a": {"width": 512, "size": 100}, "b": {"width": 512, "size": 300}},
              "options": {"a": [Option("Q4_0", 50, 1.0), Option("Q4_K", 50, 0.5)],
                          "b": [Option("Q4_0", 150, 1.0), Option("Q4_K", 150, 0.9)]}}
    costs = {"Q4_0": 0.2, "Q4_K": 0.6}
    menu = ["Q4_0", "Q4_K"]
    free = choose_types(tables, menu, 200, costs, decode_target=0.7)  # 0.6 predicted already: as without one
    assert {n: o.kind for n, o in free.items()} == {"a": "Q4_K", "b": "Q4_K"}
    # 0.31: b (3/4 of the weights) must go to Q4_0 (0.25 x 0.6 + 0.75 x 0.2 = 0.3); a keeps its accurate type
    within = choose_types(tables, menu, 200, costs, decode_target=0.31)
    assert {n: o.kind for n, o in within.items()} == {"a": "Q4_K", "b": "Q4_0"}
    assert predicted_decode(tables, within, costs) <= 0.31
    fastest = choose_types(tables, menu, 200, costs, decode_target=0.1)  # out of reach: the fastest choice
    assert {n: o.kind for n, o in fastest.items()} == {"a": "Q4_0", "b": "Q4_0"}
    assert choose_types(tables, menu, 200, None, decode_target=0.1) == free  # no costs timed: nothing to aim by


def test_a_latency_budget_reaches_every_allocation_as_its_decode_target():
    from planner.candidates import CornerTrial
    from planner.study import decode_ratio_limit, fit_budget
    from planner.budgets import parse_budget

    quant = TECHNIQUES["quantization"]
    space = fit_to_scheme(QuantSpace(methods=("llama-quant",)), "gguf")
    relative = [parse_budget("latency", "0.4x").resolve({"decode_ms_p50": 20.0})]
    absolute = [parse_budget("latency", "5ms").resolve({"decode_ms_p50": 20.0})]
    assert decode_ratio_limit(relative, {"decode_ms_p50": 20.0}) == 0.4
    assert decode_ratio_limit(absolute, {"decode_ms_p50": 20.0}) == 0.25
    assert decode_ratio_limit([], {"decode_ms_p50": 20.0}) is None
    fitted = fit_budget({"quantization": space}, None, 0.4)["quantization"]
    drawn = quant.suggest(CornerTrial({}), fitted)
    assert drawn.allocation.decode == 0.4 and "decode<=0.4x" in quant.describe(drawn)
    assert quant.suggest(CornerTrial({}), space).allocation.decode is None


def test_a_types_decode_cost_is_its_own_where_its_file_fell_back_on_most_tensors():
    """Whole-model files timed per type asked for; Q4_K is written as Q5_0 on the narrow tensors: its cost is
    recovered from its file less the Q5_0 part (linear in the tensors' shares), the other types' stand."""
    from targets.llamacpp.allocated import written_type_costs

    sizes = {"narrow.a": 300, "narrow.b": 500, "wide": 200}
    true = {"Q4_K": 0.10, "Q5_0": 0.20, "Q8_0": 0.25}
    written = {"Q4_K": {"narrow.a": "Q5_0", "narrow.b": "Q5_0", "wide": "Q4_K"},
               "Q5_0": dict.fromkeys(sizes, "Q5_0"), "Q8_0": dict.fromkeys(sizes, "Q8_0")}
    ratios = {k: sum(sizes[n] * true[t] for n, t in types.items()) / 1000 for k, types in written.items()}
    assert ratios["Q4_K"] == pytest.approx(0.18)  # the file's own ratio: mostly Q5_0's
    costs = written_type_costs(ratios, written, sizes)
    assert costs == pytest.approx(true)
    # a type written nowhere as itself keeps its file's ratio
    nowhere = {**written, "Q6_K": dict.fromkeys(sizes, "Q8_0")}
    assert written_type_costs({**ratios, "Q6_K": 0.25}, nowhere, sizes)["Q6_K"] == 0.25


def _tensors(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in (*model.named_parameters(), *model.named_buffers())}


def test_a_candidate_of_stages_that_keep_weights_shares_the_base_tensors_and_others_get_their_own(tokenizer, context,
                                                                                                   monkeypatch):
    """llama-quant leaves every weight as it is (llama.cpp rounds the file): its candidate is a copy of the modules on
    the base model's very tensors (no second float copy of a big model), its plan set on the copy only. A stage
    that writes into tensors (unstructured pruning masks in place, training) gets its own copy, unless what it is
    given holds its own tensors already (a student, a new model); the base model comes out of every one unchanged."""
    import planner.candidates
    from planner.candidates import build
    from planner.recipes import Stage
    from evaluators.corpus import Document
    from search_spaces.distillation import DistillSpec
    from search_spaces.pruning import PruneSpec

    copies = []
    real_copy = planner.candidates.own_copy
    monkeypatch.setattr(planner.candidates, "own_copy", lambda m: copies.append(1) or real_copy(m))

    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    before = _tensors(model)
    storage = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    quant = Stage("quantization", spec(bpw=5.0))
    kept = build(model, [quant], context).model
    assert kept is not model and getattr(kept, PLAN_ATTRIBUTE) is not None and not hasattr(model, PLAN_ATTRIBUTE)
    assert {t.untyped_storage().data_ptr() for t in kept.parameters()} <= storage and not copies
    sparse = Stage("pruning", PruneSpec(sparsity={"mlp": 0.5}, method="magnitude", calibration_samples=1,
                                        calibration_seq_len=8))
    for stages in ([sparse], [sparse, quant]):
        cut = build(model, stages, context).model
        assert not {t.untyped_storage().data_ptr() for t in cut.parameters()} & storage and len(copies) == 1
        zeroed = float((cut.model.layers[0].mlp.up_proj.weight == 0).float().mean())
        assert zeroed == pytest.approx(0.5, abs=0.02)  # the masks went into the copy's tensors...
        copies.clear()
    student = Stage("distillation", DistillSpec(depth_keep=0.5, steps=2, batch_size=1, seq_len=16,
                                                importance_samples=2, importance_seq_len=16))
    rtn = Stage("quantization", QuantSpec(method="rtn", bits={"attn": 4, "mlp": 4}, grid="gguf", group_size=32))
    texts = replace(context, calibration=[Document("sample", SAMPLE_TEXT * 8)])
    for stages in ([student, sparse], [student, rtn]):  # a student is its own: written into without a copy
        built = build(model, stages, texts).model
        assert not {t.untyped_storage().data_ptr() for t in built.parameters()} & storage and not copies
    after = _tensors(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # ...never into the base model's


def test_the_tables_factors_serve_the_trials_whole_tensor_rounding_bit_for_bit(tokenizer, tmp_path, monkeypatch):
    """The sensitivity tables keep each compensable tensor's Hessian factor (`FactorStore`, tensors of one input
    linked to one file); a candidate's compensated blocks are then rounded with no calibration pass and no factor
    computed, and are the very bytes rounded from the covariances."""
    from targets.llamacpp import allocated, compensated
    from targets.llamacpp.allocated import CompensatedBlocks, factor_folder

    cached = BuildContext(tokenizer=tokenizer, calibration=[Doc(SAMPLE_TEXT * 4)], seed=0, cache_dir=tmp_path,
                          model_id="tiny-factors", progress=False)
    model = make_tiny_llama(vocab_size=len(tokenizer), **WIDE)
    windows = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(2))
    tables = sensitivity_tables(model, windows, cached, compensate=True)
    folder = factor_folder(allocated._cache_file(cached, allocated._calibration_key(windows)))
    compensable = sorted(n for n, opts in tables["options"].items() if any(o.kind.endswith("+gptq") for o in opts))
    assert sorted(f.name[:-4] for f in folder.iterdir()) == compensable
    q, k = (os.stat(folder / f"blk.0.attn_{r}.weight.npz") for r in ("q", "k"))
    down, up = (os.stat(folder / f"blk.0.ffn_{r}.weight.npz") for r in ("down", "up"))
    assert q.st_ino == k.st_ino and down.st_ino != up.st_ino  # one input, one file
    kinds = {name: "Q4_K+gptq" if i % 2 else "Q5_0+gptq" for i, name in enumerate(compensable)}
    fresh = CompensatedBlocks(model, windows, replace(cached, cache_dir=None), tables["imatrix"]).of(kinds)
    with monkeypatch.context() as patch:
        patch.setattr(sensitivity, "compensable_inputs", lambda *a, **k: pytest.fail("covariances recomputed"))
        patch.setattr(compensated, "hessian_factor", lambda *a, **k: pytest.fail("a factor recomputed"))
        served = CompensatedBlocks(model, windows, cached, tables["imatrix"]).of(kinds)
    assert sorted(served) == sorted(fresh) == compensable
    for name in compensable:
        np.testing.assert_array_equal(served[name], fresh[name])


def test_a_stored_factor_reads_back_as_it_was(tmp_path):
    from targets.llamacpp.compensated import FactorStore, hessian_factor

    rng = np.random.default_rng(3)
    x = rng.standard_normal((96, 40)).astype(np.float32)
    x[:, 7] = 0  # an input never active
    factor = hessian_factor(x.T @ x / 96)
    store = FactorStore(tmp_path / "factors")
    assert store.load("a") is None and not store.has("a")
    store.save("a", factor)
    store.save("b", factor)  # the same input: linked
    upper, dead = FactorStore(tmp_path / "factors").load("b")
    assert torch.equal(upper, factor[0]) and torch.equal(dead, factor[1]) and bool(dead[7])
    assert os.stat(tmp_path / "factors" / "a.npz").st_ino == os.stat(tmp_path / "factors" / "b.npz").st_ino
    assert not [f for f in (tmp_path / "factors").iterdir() if f.name.endswith(".tmp")]
    FactorStore(None).save("a", factor)  # no cache: nothing kept, nothing read
    assert FactorStore(None).load("a") is None
