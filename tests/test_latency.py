import json

import pytest
import torch

from evaluators.latency import (
    LatencyProtocol,
    LatencyResult,
    TimingStats,
    measure_latency,
    percentile,
    timing_stats,
)

# Small enough that a full protocol takes a few tens of milliseconds on the tiny models.
FAST = LatencyProtocol(prompt_tokens=16, new_tokens=5, warmup=1, repeats=3, seed=3)


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tiny_model(request):
    return request.getfixturevalue(request.param)


def test_percentile_interpolates_like_numpy():
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7.0], 90) == 7.0
    assert percentile([10, 20, 30, 40, 50], 25) == pytest.approx(20.0)


def test_timing_stats_from_samples():
    stats = timing_stats([4.0, 1.0, 3.0, 2.0])
    assert stats == TimingStats(n=4, min_ms=1.0, p50_ms=2.5, p90_ms=pytest.approx(3.7), mean_ms=2.5)
    assert stats.to_dict() == {"n": 4, "min_ms": 1.0, "p50_ms": 2.5, "p90_ms": pytest.approx(3.7), "mean_ms": 2.5}


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, -0.5], [float("inf")]])
def test_timing_stats_rejects_bad_samples(bad):
    with pytest.raises(ValueError):
        timing_stats(bad)


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_bad_q(q):
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], q)


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt_tokens", 0),
        ("new_tokens", 0),
        ("warmup", -1),
        ("repeats", 0),
        ("threads", 0),
        ("seed", -1),
        ("repeats", 2.0),
        ("prompt_tokens", True),
        ("threads", "4"),
    ],
)
def test_protocol_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        LatencyProtocol(**{field: value})


def test_protocol_defaults_and_round_trip():
    default = LatencyProtocol()
    assert default.to_dict() == {
        "prompt_tokens": 128, "new_tokens": 32, "warmup": 2, "repeats": 7, "threads": None, "seed": 0,
        "max_repeats": None, "prefills": None
    }
    custom = LatencyProtocol(prompt_tokens=8, new_tokens=2, warmup=0, repeats=1, threads=1, seed=9, prefills=2)
    data = json.loads(json.dumps(custom.to_dict()))
    assert LatencyProtocol.from_dict(data) == custom
    assert LatencyProtocol.from_dict({"repeats": 3}) == LatencyProtocol(repeats=3)


def test_protocol_from_dict_rejects_unknown_keys_and_non_dicts():
    with pytest.raises(ValueError, match="unknown LatencyProtocol keys: bogus"):
        LatencyProtocol.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="needs a dict"):
        LatencyProtocol.from_dict([("repeats", 3)])


def test_measure_latency_result_fields(tiny_model):
    result = measure_latency(tiny_model, FAST)
    assert isinstance(result, LatencyResult)
    assert result.protocol == FAST
    assert result.device == "cpu"
    assert result.timer == "perf_counter"
    assert result.threads == torch.get_num_threads()
    assert len(result.load_average_before) == len(result.load_average_after) == 3
    assert result.prefill.n == FAST.repeats
    assert result.decode.n == FAST.repeats * FAST.new_tokens
    for stats in (result.prefill, result.decode):
        assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms
        assert stats.min_ms <= stats.mean_ms
    # Every timed interval lies inside the wall-clock span of the whole protocol.
    timed_ms = result.prefill.mean_ms * result.prefill.n + result.decode.mean_ms * result.decode.n
    assert timed_ms < result.wall_seconds * 1e3


def test_result_to_dict_is_plain_json(tiny_llama):
    result = measure_latency(tiny_llama, FAST)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["protocol"] == FAST.to_dict()
    assert LatencyProtocol.from_dict(data["protocol"]) == FAST
    assert data["decode"]["n"] == FAST.repeats * FAST.new_tokens
    assert data["load_average_before"] == list(result.load_average_before)
    assert set(data) == {
        "protocol", "device", "timer", "threads", "load_average_before", "load_average_after",
        "prefill", "decode", "wall_seconds",
    }


def test_threads_are_set_for_the_run_and_restored(tiny_gpt2):
    before = torch.get_num_threads()
    seen = []
    tiny_gpt2.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    protocol = LatencyProtocol(prompt_tokens=8, new_tokens=2, warmup=0, repeats=1, threads=1)
    result = measure_latency(tiny_gpt2, protocol)
    assert result.threads == 1
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


def test_threads_restored_after_an_error(tiny_gpt2):
    before = torch.get_num_threads()

    def boom(module, args):
        raise RuntimeError("boom")

    tiny_gpt2.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(tiny_gpt2, LatencyProtocol(prompt_tokens=8, new_tokens=2, threads=1))
    assert torch.get_num_threads() == before


def test_training_flags_are_restored(tiny_llama):
    tiny_llama.train()
    tiny_llama.model.layers[0].eval()  # a mixed state must come back exactly as it was
    flags = {name: m.training for name, m in tiny_llama.named_modules()}
    modes = []
    tiny_llama.register_forward_pre_hook(
        lambda module, args: modes.append((module.training, torch.is_inference_mode_enabled()))
    )
    measure_latency(tiny_llama, LatencyProtocol(prompt_tokens=8, new_tokens=2, warmup=0, repeats=1))
    assert set(modes) == {(False, True)}
    assert {name: m.training for name, m in tiny_llama.named_modules()} == flags


def test_decode_feeds_one_token_through_the_kv_cache(tiny_model):
    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        calls.append((kwargs["input_ids"].shape[1], None if cache is None else cache.get_seq_length()))

    tiny_model.register_forward_pre_hook(record, with_kwargs=True)
    measure_latency(tiny_model, FAST)

    runs = FAST.warmup + FAST.repeats
    steps = 1 + FAST.new_tokens
    assert len(calls) == runs * steps
    for run in range(runs):
        prefill, *decode = calls[run * steps : (run + 1) * steps]
        assert prefill == (FAST.prompt_tokens, None)  # a fresh cache for every run
        # One token per step, and the cache already holds everything before it.
        assert decode == [(1, FAST.prompt_tokens + i) for i in range(FAST.new_tokens)]


def test_same_seed_same_prompt_different_seed_different_prompt(tiny_llama):
    prompts = []
    tiny_llama.register_forward_pre_hook(
        lambda module, args, kwargs: prompts.append(kwargs["input_ids"].clone())
        if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    for seed in (5, 5, 6):
        protocol = LatencyProtocol(prompt_tokens=12, new_tokens=1, warmup=0, repeats=1, seed=seed)
        measure_latency(tiny_llama, protocol)
    assert torch.equal(prompts[0], prompts[1])
    assert not torch.equal(prompts[0], prompts[2])
    assert int(prompts[0].min()) >= 1 and int(prompts[0].max()) < tiny_llama.config.vocab_size


@pytest.mark.parametrize("prompt_tokens, new_tokens", [(250, 7), (257, 1)])
def test_protocol_longer_than_the_context_is_rejected(tiny_model, prompt_tokens, new_tokens):
    protocol = LatencyProtocol(prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup=0, repeats=1)
    with pytest.raises(ValueError, match="exceed the model's 256 positions"):
        measure_latency(tiny_model, protocol)


def test_protocol_filling_the_context_exactly_runs(tiny_gpt2):
    # GPT-2 has a learned table of 256 positions: 250 + 6 uses every one of them and no more.
    result = measure_latency(tiny_gpt2, LatencyProtocol(prompt_tokens=250, new_tokens=6, warmup=0, repeats=1))
    assert result.decode.n == 6


def test_measure_latency_rejects_a_non_protocol(tiny_llama):
    with pytest.raises(ValueError, match="LatencyProtocol"):
        measure_latency(tiny_llama, {"repeats": 1})


def test_models_without_a_config_are_rejected():
    for model in (torch.nn.Module(), torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="no .config"):
            measure_latency(model, FAST)
