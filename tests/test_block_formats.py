"""llama.cpp's block types read and rewritten code by code (block_formats), and error-compensated rounding onto
them (compensated): bit-exact against ggml's own dequantizer, and a lower output error than llama.cpp's rounding
on real calibration activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from targets.llamacpp import ggml_quants
from targets.llamacpp.block_formats import COMPENSABLE, block_format
from targets.llamacpp.compensated import ROW_STATISTICS, base_kind, compensated_kind, compensated_round, output_error


def _weights(rows=48, width=512, seed=0):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((rows, width)) * 0.05).astype(np.float32)
    weight[3, :40] = 0.0  # a zero run: blocks (or sub-blocks) with a zero scale
    weight[5] *= 30.0  # an outlier row
    return weight, (rng.random(width) + 0.1).astype(np.float32)


@pytest.mark.parametrize("kind", COMPENSABLE)
def test_every_code_and_scale_is_read_where_ggml_reads_it(kind):
    """Decoding llama.cpp's blocks by the layout gives ggml's to_float bit for bit, and so does decoding blocks
    rewritten with random codes: every code bit and every scale is where the layout says."""
    fmt = block_format(kind)
    weight, importance = _weights()
    data = ggml_quants.quantize(kind, weight, importance)
    assert np.array_equal(fmt.decode(data), ggml_quants.dequantize(kind, data, weight.shape[1]))
    assert np.array_equal(fmt.with_codes(data, fmt.codes(data)), data)  # codes read back in place: same bytes
    codes = np.random.default_rng(1).integers(0, len(fmt.levels), weight.shape).astype(np.uint8)
    rewritten = fmt.with_codes(data, codes)
    assert np.array_equal(fmt.codes(rewritten), codes)
    assert np.array_equal(fmt.steps(rewritten)[0], fmt.steps(data)[0])  # the scales are untouched
    assert np.array_equal(fmt.decode(rewritten), ggml_quants.dequantize(kind, rewritten, weight.shape[1]))
    if len(fmt.levels) < 256:  # Q8_0's byte holds any code
        with pytest.raises(ValueError, match="codes are below"):
            fmt.with_codes(data, np.full(weight.shape, len(fmt.levels), dtype=np.uint8))


@pytest.mark.parametrize("kind", COMPENSABLE)
def test_without_correlated_inputs_each_code_is_the_nearest_under_llama_cpps_own_scales(kind):
    """With uncorrelated inputs of equal weight (H = I) nothing is carried to the next column: every block keeps the
    scales llama.cpp's quantizer gives it and every weight the nearest code under them, so no weight is further
    from its value than in llama.cpp's own block (whose codes come from a scale it then refines)."""
    weight, importance = _weights(rows=16)
    fmt = block_format(kind)
    data = compensated_round(weight, np.eye(weight.shape[1]), kind, importance, damp=0.0)
    if kind in ROW_STATISTICS:  # quantized block by block: the block's own mean square, not the row's
        reference = np.concatenate([ggml_quants.quantize(kind, weight[:, b:b + fmt.block], importance[b:b + fmt.block])
                                    for b in range(0, weight.shape[1], fmt.block)], axis=1)
    else:
        reference = ggml_quants.quantize(kind, weight, importance)
    assert [np.array_equal(a, b) for a, b in zip(fmt.steps(data), fmt.steps(reference))] == [True, True]
    ours = np.abs(weight - ggml_quants.dequantize(kind, data, weight.shape[1]))
    theirs = np.abs(weight - ggml_quants.dequantize(kind, reference, weight.shape[1]))
    assert (ours <= theirs + 1e-7).all()


def test_the_compensated_kind_names_its_ggml_type():
    assert compensated_kind("Q4_K") == "Q4_K+gptq" and base_kind("Q4_K+gptq") == "Q4_K" and base_kind("Q6_K") == "Q6_K"


@pytest.fixture(scope="module")
def calibrated():
    """The float benchmark model, its calibration windows and two tensors' input covariances."""
    from planner.sources import DataSource, ModelSource, load_corpus, load_model
    from search_spaces.calibration import calibration_batches
    from targets.llamacpp.imatrix import gguf_linear_names, importance_matrix, input_covariances

    model, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m-float"), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    windows = calibration_batches(tokenizer, corpus.train, 8, 128, 0)
    names = ["blk.6.attn_output.weight", "blk.6.ffn_down.weight", "blk.6.attn_k.weight"]
    covariances = input_covariances(model, windows, names)
    imatrix = importance_matrix(model, windows)
    modules = dict(model.named_modules())
    weights = {g: modules[m].weight.detach().float().numpy() for m, g in gguf_linear_names(model).items() if g in names}
    return weights, covariances, imatrix


@pytest.mark.builtin
def test_the_covariance_diagonal_is_the_importance_matrix_and_shared_inputs_share_it(calibrated):
    weights, covariances, imatrix = calibrated
    for name, covariance in covariances.items():
        assert covariance.shape == (weights[name].shape[1],) * 2
        np.testing.assert_allclose(np.diag(covariance), imatrix[name], rtol=1e-5)
    assert not np.shares_memory(covariances["blk.6.attn_k.weight"], covariances["blk.6.attn_output.weight"])


@pytest.mark.builtin
@pytest.mark.parametrize("name,kind", [("blk.6.attn_output.weight", k) for k in ("Q4_0", "IQ4_NL", "Q5_1", "Q8_0")]
                         + [("blk.6.ffn_down.weight", k) for k in ("Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K")])
def test_compensation_lowers_the_output_error_of_llama_cpps_importance_weighted_rounding(calibrated, name, kind):
    """On the float benchmark model's real calibration activations, each type's compensated blocks give a
    projection output error under 0.7x that of llama.cpp's quantizer with the importance matrix (measured:
    0.2-0.5x), in exactly the bytes that type stores."""
    weights, covariances, imatrix = calibrated
    weight, covariance = weights[name], covariances[name]
    data = compensated_round(weight, covariance, kind, imatrix[name])
    rounded, stored = ggml_quants.roundtrip(kind, weight, imatrix[name])
    assert data.nbytes == stored
    restored = ggml_quants.dequantize(kind, data, weight.shape[1])
    assert np.array_equal(restored, block_format(kind).decode(data))
    assert output_error(weight, restored, covariance) < 0.7 * output_error(weight, rounded, covariance)


def test_several_types_rounded_in_one_loop_are_each_types_own_rounding():
    """32- and 256-wide types share one column loop (their rows side by side): each comes out as it does alone."""
    from targets.llamacpp.compensated import compensated_rounds

    weight, importance = _weights(rows=16)
    rng = np.random.default_rng(3)
    inputs = rng.standard_normal((2048, weight.shape[1])).astype(np.float32) * importance
    covariance = inputs.T @ inputs / len(inputs)
    kinds = ["Q4_K", "Q5_0", "IQ4_NL", "Q6_K", "IQ4_XS"]
    together = compensated_rounds(weight, covariance, kinds, importance)
    for kind in kinds:
        assert np.array_equal(together[kind], compensated_round(weight, covariance, kind, importance)), kind


def test_tensors_rounded_side_by_side_give_what_one_at_a_time_gives_and_keep_torchs_threads():
    from targets.llamacpp.compensated import concurrently

    rng = np.random.default_rng(4)
    jobs = []
    for seed in range(4):
        weight, importance = _weights(rows=8, width=256, seed=seed)
        inputs = rng.standard_normal((512, 256)).astype(np.float32)
        jobs.append((weight, inputs.T @ inputs / 512, importance))
    threads, seen = torch.get_num_threads(), []

    def rounded(job):
        seen.append(torch.get_num_threads())  # torch single-threaded for every job, not only inside each loop
        return compensated_round(job[0], job[1], "Q4_K", job[2])
    side_by_side = concurrently(rounded, jobs, threads=2)
    assert seen == [1] * len(jobs) and torch.get_num_threads() == threads
    for job, blocks in zip(jobs, side_by_side):  # in order, and each as rounded alone
        assert np.array_equal(blocks, compensated_round(job[0], job[1], "Q4_K", job[2]))


def test_a_layers_tensors_round_side_by_side_one_layer_at_a_time_with_their_factors_freed_between(monkeypatch):
    from targets.llamacpp import compensated
    from targets.llamacpp.compensated import FactorCache, block_of, layer_by_layer

    rng = np.random.default_rng(5)
    inputs = {layer: rng.standard_normal((256, 64)).astype(np.float32) for layer in range(3)}
    covariances = {layer: x.T @ x / 256 for layer, x in inputs.items()}
    names = [f"blk.{layer}.{role}.weight" for layer in range(3) for role in ("attn_q", "attn_k", "ffn_up")]
    computed, events = [], []
    factor_of = compensated.hessian_factor
    monkeypatch.setattr(compensated, "hessian_factor", lambda c, damp: computed.append(id(c)) or factor_of(c, damp))
    factors = FactorCache()

    def work(name):
        events.append(("work", block_of(name)))
        return name, factors(covariances[int(name.split(".")[1])])

    results = layer_by_layer(work, names, block_of, threads=2, done=lambda: (events.append(("done",)),
                                                                               factors.clear()))
    assert [name for name, _ in results] == names  # in order
    assert sorted(computed) == sorted(id(c) for c in covariances.values())  # once per input, shared by its layer
    assert events == [e for layer in range(3) for e in [("work", f"blk.{layer}")] * 3 + [("done",)]]
    assert not factors._factors  # nothing held after the last layer
    assert block_of("blk.12.ffn_down.weight") == "blk.12" and block_of("output.weight") == "output.weight"


def test_a_factor_being_computed_holds_up_only_the_threads_that_need_that_input(monkeypatch):
    """Two inputs' factors asked for at once: the second is computed while the first is still being computed (one
    cache-wide lock made every rounding thread wait for the widest input's factor), each once."""
    import threading

    from targets.llamacpp import compensated
    from targets.llamacpp.compensated import FactorCache

    rng = np.random.default_rng(6)
    wide, narrow = (x.T @ x / 64 for x in (rng.standard_normal((64, n)).astype(np.float32) for n in (32, 16)))
    narrow_done, computed = threading.Event(), []
    factor_of = compensated.hessian_factor

    def slow(covariance, damp):
        if covariance is wide:  # finishes only once the narrow one was computed beside it
            assert narrow_done.wait(timeout=10), "the narrow input's factor waited for the wide one's"
        computed.append(covariance.shape[0])
        return factor_of(covariance, damp)
    monkeypatch.setattr(compensated, "hessian_factor", slow)
    factors = FactorCache()
    results = {}
    wide_thread = threading.Thread(target=lambda: results.update(wide=factors(wide)))
    wide_thread.start()
    results["narrow"] = factors(narrow)
    narrow_done.set()
    wide_thread.join(timeout=20)
    assert computed == [16, 32] and results["wide"][0].shape == (32, 32)
    for which, covariance in (("wide", wide), ("narrow", narrow)):  # asked again: the same factor, not recomputed
        assert factors(covariance) is results[which]
    assert computed == [16, 32]


def test_covariances_a_group_of_blocks_at_a_time_are_the_one_pass_sums_within_the_budget(monkeypatch):
    """Groups of whole decoder blocks within the byte budget (the head last), each pass stopped at the first layer
    past its group and the next one started there (every layer runs once per batch in all), and the same sums as
    one pass over every layer."""
    from search_spaces.calibration import calibration_batches
    from targets.llamacpp.imatrix import covariance_chunks, gguf_linear_names, input_covariance_chunks, \
        input_covariances
    from tests.conftest import SAMPLE_TEXT, make_tiny_llama, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=4, tie_word_embeddings=False)
    windows = calibration_batches(tokenizer, [type("Doc", (), {"text": SAMPLE_TEXT * 8})()], 6, 16, 0)
    names = list(gguf_linear_names(model, head=True).values())
    block = sum(4 * m.in_features ** 2 for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear))
    chunks = covariance_chunks(model, names, budget=2 * block)
    assert [sorted({n.split(".")[1] for n in c}) for c in chunks] == [["0", "1"], ["2", "3"], ["weight"]]
    assert covariance_chunks(model, names, budget=block // 2)[0] == [n for n in names if n.startswith("blk.0.")]
    calls = []
    for index, layer in enumerate(model.model.layers):
        monkeypatch.setattr(layer, "forward", lambda *a, _f=layer.forward, _i=index, **k: calls.append(_i) or _f(*a, **k))
    whole = input_covariances(model, windows, names)
    # tensors fed the very same input share one array (and so one Hessian factor), the others do not
    assert whole["blk.0.attn_q.weight"] is whole["blk.0.attn_v.weight"] is not whole["blk.0.attn_output.weight"]
    assert whole["blk.1.ffn_gate.weight"] is whole["blk.1.ffn_up.weight"] is not whole["blk.1.ffn_down.weight"]
    calls.clear()
    seen, ran = [], []
    for chunk in input_covariance_chunks(model, windows, names, budget=2 * block, batch_size=4):
        ran.append(sorted(set(calls)))  # the layers this group's pass ran
        calls.clear()
        seen.extend(chunk)
        for name, covariance in chunk.items():
            np.testing.assert_array_equal(covariance, whole[name])
    assert ran == [[0, 1], [2, 3], []] and sorted(seen) == sorted(names)
    assert all("forward" in layer.__dict__ for layer in model.model.layers)  # the counting forwards put back
