"""Latency ratios with their uncertainty: independent rounds, a t interval over them with the coverage it claims
(checked by simulation through the runtime's own round arithmetic), a stopping rule that keeps its error rate,
verdicts against a budget, and llama.cpp's A/B timing in R C R / C R C rounds, timed longer while a caller's
verdict is open."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from evaluators.latency import LatencyProtocol
from evaluators.paired import (CONFIDENCE, MEETS, OVER, UNDECIDED, PairedRatio, look_confidence, looks,
                               round_log_ratio, rounds_ratio)
from planner.budgets import Budget, parse_budget, unclear
from tests.conftest import make_tiny_llama, make_tiny_tokenizer


def test_the_ratio_is_the_geometric_mean_of_the_rounds_and_its_t_interval_narrows_with_more_rounds():
    rng = np.random.default_rng(1)
    logs = np.log(0.3) + rng.normal(0, 0.05, 40)
    few, many = rounds_ratio(logs[:4]), rounds_ratio(logs)
    assert many.ratio == pytest.approx(float(np.exp(logs.mean())))
    # the t interval by hand: mean +- t(0.975, n - 1) * sd / sqrt(n), in logs
    half = 3.182446305284263 * logs[:4].std(ddof=1) / 2
    assert (few.low, few.high) == pytest.approx((np.exp(logs[:4].mean() - half), np.exp(logs[:4].mean() + half)))
    assert many.low < 0.3 < many.high and (few.high - few.low) > 2 * (many.high - many.low)
    assert (many.rounds, few.rounds, many.confidence) == (40, 4, CONFIDENCE)
    assert rounds_ratio(logs[:4], 0.99).high > few.high  # a higher confidence, a wider interval


def test_a_round_is_the_median_step_log_ratio_and_bad_samples_are_refused():
    assert round_log_ratio([2.0, 2.0, 9.0], [4.0, 4.0, 4.0]) == pytest.approx(np.log(0.5))  # one slow step: median
    same = rounds_ratio([np.log(0.5)] * 3)
    assert (same.ratio, same.low, same.high) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="two equal, non-empty"):
        round_log_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        round_log_ratio([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least 2 rounds"):
        rounds_ratio([0.1])


def test_rounds_are_triplets_that_share_no_run_and_cancel_a_drift():
    """R C R, then C R C: each middle run against its neighbours, step by step, as log(candidate / reference); a
    machine slowing steadily across the runs cancels, and no run counts in two rounds."""
    from targets.llamacpp.runtime import round_figures

    drift = np.exp(0.05 * np.arange(9))  # each run 5% slower than the one before
    runs = [([20.0 * d] * 3, [10.0 * d * (0.5 if j % 2 else 1.0)] * 4) for j, d in enumerate(drift)]
    decode, prefill = round_figures(runs)
    assert decode == pytest.approx([np.log(0.5)] * 3) and prefill == pytest.approx([0.0] * 3)
    runs[3] = (runs[3][0], [1e3] * 4)  # a stalled run (the 2nd round's first, a candidate run) moves that round only
    moved, _ = round_figures(runs)
    assert moved[0] == pytest.approx(decode[0]) and moved[2] == pytest.approx(decode[2]) and moved[1] > decode[1] + 1
    assert len(round_figures(runs[:8])[0]) == 2  # an incomplete triplet is no round


def simulated_runs(rng, rounds: int, ratio: float, busy: bool) -> list:
    """R C R C ... runs (3 prefills, 16 steps) of a machine whose speed drifts, with run noise and, busy, bursts."""
    level = np.cumsum(rng.normal(0, 0.03, 3 * rounds))
    runs = []
    for j in range(3 * rounds):
        burst = rng.uniform(0, 0.8) if busy and rng.random() < 0.25 else 0.0
        log_ms = np.log(10 * (ratio if j % 2 else 1.0)) + level[j] + rng.normal(0, 0.02) + burst + rng.normal(0, 0.03, 16)
        runs.append((list(np.exp(log_ms[:3])), list(np.exp(log_ms))))
    return runs


@pytest.mark.parametrize("rounds", [3, 7])
def test_the_interval_covers_the_true_ratio_at_its_level_at_the_rounds_studies_use(rounds):
    """Simulated timings through the runtime's round arithmetic: a drifting machine with bursts of load. The
    95% interval covers the true ratio in 93-97% of 1500 timings at 3 rounds and at 7 (the former cluster
    bootstrap over shared-reference rounds covered about 75% at 3: docs/benchmarks.md section 11)."""
    from targets.llamacpp.runtime import round_figures

    rng = np.random.default_rng(rounds)
    hits = 0
    for i in range(1500):
        decode, _ = round_figures(simulated_runs(rng, rounds, 0.4, busy=i % 2 == 1))
        found = rounds_ratio(decode)
        hits += found.low <= 0.4 <= found.high
    assert 0.93 <= hits / 1500 <= 0.97


def test_timing_on_while_unclear_keeps_the_wrong_verdicts_within_the_level():
    """The stopping rule: look at 3, 6 and 12 rounds, stop once the interval clears a budget set at the true
    ratio (every clear verdict is then wrong). With each look at look_confidence, wrong verdicts stay under 5%;
    looking with 95% each time would not (tested too: about twice as many)."""
    from targets.llamacpp.runtime import round_figures

    schedule = looks(3, 12)
    assert schedule == [3, 6, 12] and look_confidence(schedule) == pytest.approx(1 - 0.05 / 3)
    assert looks(1, 1) == [2] and looks(4, 4) == [4] and looks(3, 20) == [3, 6, 12, 20]
    rng = np.random.default_rng(5)
    wrong = {look_confidence(schedule): 0, CONFIDENCE: 0}
    for i in range(1500):
        decode, _ = round_figures(simulated_runs(rng, 12, 0.4, busy=i % 2 == 1))
        for confidence in wrong:
            for rounds in schedule:
                if rounds_ratio(decode[:rounds], confidence).verdict(0.4) != UNDECIDED:
                    wrong[confidence] += 1
                    break
    assert wrong[look_confidence(schedule)] / 1500 <= 0.05
    assert wrong[CONFIDENCE] / 1500 > 0.07


@pytest.mark.parametrize("low, high, verdict", [(0.26, 0.29, MEETS), (0.26, 0.30, MEETS), (0.31, 0.33, OVER),
                                                (0.29, 0.31, UNDECIDED), (0.30, 0.31, UNDECIDED)])
def test_a_verdict_is_clear_only_when_the_whole_interval_is_on_one_side(low, high, verdict):
    assert PairedRatio((low + high) / 2, low, high, 48).verdict(0.3) == verdict
    budget = parse_budget("latency", "0.3x").resolve({"decode_ms_p50": 10.0})
    row = {"decode_ms_p50": 3.0, "decode_ratio": (low + high) / 2, "decode_interval": [low, high]}
    assert budget.verdict(row) == verdict
    assert unclear([budget])({"decode_ratio": PairedRatio((low + high) / 2, low, high, 48)}) is (verdict == UNDECIDED)


def test_without_an_interval_or_on_an_absolute_budget_the_point_decides():
    budget = parse_budget("latency", "0.3x").resolve({"decode_ms_p50": 10.0})
    assert budget.verdict({"decode_ms_p50": 3.1, "decode_ratio": 0.29}) == MEETS
    absolute = Budget("latency", limit=3.0, text="3ms")
    assert absolute.verdict({"decode_ms_p50": 3.1, "decode_ratio": 0.29, "decode_interval": [0.28, 0.31]}) == OVER
    assert not unclear([absolute])({"decode_ratio": PairedRatio(0.3, 0.2, 0.4, 9)})


@pytest.fixture(scope="module")
def two_ggufs(tmp_path_factory):
    from targets.llamacpp.gguf_file import write_gguf

    folder = tmp_path_factory.mktemp("ab")
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    paths = []
    for name in ("a", "b"):
        path = folder / f"{name}.gguf"
        write_gguf(make_tiny_llama(vocab_size=len(tokenizer)), tokenizer, path)
        paths.append(path)
    return paths


def test_llama_cpp_times_rounds_and_looks_again_only_on_its_schedule_while_the_caller_is_unclear(two_ggufs):
    from targets.llamacpp.runtime import PREFILLS, time_ab

    assert PREFILLS > 1
    protocol = LatencyProtocol(prompt_tokens=8, new_tokens=4, warmup=1, repeats=2, max_repeats=5, threads=1)
    asked = []

    def always(intervals):
        asked.append((intervals["decode_ratio"].rounds, intervals["decode_ratio"].confidence))
        return True

    settled = time_ab(*two_ggufs, protocol)
    # 2 rounds of 3 runs, R C R then C R C: 3 candidate runs, 3 reference runs
    assert settled.rounds == 2 == settled.decode_interval["rounds"] == len(settled.decode_rounds)
    assert settled.decode["n"] == 3 * 4 == settled.reference_decode["n"]
    assert settled.prefill["n"] == 3 * PREFILLS == settled.reference_prefill["n"]
    assert settled.decode_interval["confidence"] == CONFIDENCE  # nobody asked: one look, at the level
    assert settled.decode_ratio == pytest.approx(float(np.exp(np.mean(settled.decode_rounds))))
    for kind in ("decode", "prefill"):
        interval = getattr(settled, f"{kind}_interval")
        assert interval["low"] <= getattr(settled, f"{kind}_ratio") <= interval["high"]
    longer = time_ab(*two_ggufs, protocol, unclear=always)
    # looks at 2, 4 and 5 rounds, each at 1 - 0.05 / 3; at the limit it stops
    assert asked == [(2, pytest.approx(1 - 0.05 / 3)), (4, pytest.approx(1 - 0.05 / 3)), (5, pytest.approx(1 - 0.05 / 3))]
    assert longer.rounds == 5 and longer.decode["n"] + longer.reference_decode["n"] == 15 * 4
    assert (settled.threads, settled.batch_threads) == (1, 1)  # a protocol's threads set both counts
    assert LatencyProtocol(repeats=3).most_repeats == 12
    with pytest.raises(ValueError, match="max_repeats must be an integer >= 3"):
        LatencyProtocol(repeats=3, max_repeats=2)
    once = time_ab(*two_ggufs, replace(protocol, prefills=1))  # a study without a prefill budget
    assert once.prefill["n"] == 3 == once.reference_prefill["n"] and once.decode["n"] == 3 * 4
    assert once.rounds == 2 == len(once.prefill_rounds)
    with pytest.raises(ValueError, match="prefills must be an integer >= 1"):
        LatencyProtocol(prefills=0)


def _read_dropped(path) -> None:
    """Read every page of `path` through a fresh mapping after dropping it from the page cache."""
    import mmap
    import os

    with open(path, "rb") as file:
        os.fsync(file.fileno())  # dirty pages are not dropped
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE))


def test_a_timing_counts_the_bytes_it_read_from_disk_and_says_when_its_figures_are_the_disks(two_ggufs, tmp_path):
    """Files that stay in memory read nothing from storage while timed (from_disk read them in before); a timing
    during which weights come back from disk counts those bytes (its runs', not the loads'), and past DISK_SHARE
    of the timed files' bytes its figures are the disk's."""
    from targets.llamacpp import runtime

    protocol = LatencyProtocol(prompt_tokens=8, new_tokens=4, warmup=1, repeats=2, threads=1)
    in_memory = runtime.time_ab(*two_ggufs, protocol)
    files = sum(path.stat().st_size for path in two_ggufs)
    assert in_memory.files_bytes == files and in_memory.disk_bytes is not None
    assert in_memory.disk_bytes <= runtime.DISK_FLOOR and runtime.from_disk_reason(in_memory) is None
    assert runtime.size_of_files(two_ggufs[0], two_ggufs[0]) == two_ggufs[0].stat().st_size  # a baseline: one file
    evicted = tmp_path / "evicted.bin"
    evicted.write_bytes(np.random.default_rng(0).bytes(8 << 20))
    before = runtime.bytes_read_from_disk()
    _read_dropped(evicted)
    if runtime.bytes_read_from_disk() - before < (4 << 20):
        pytest.skip("this filesystem keeps a dropped file in memory: nothing is read from storage to count")
    rounds = runtime.fresh_rounds(*two_ggufs, protocol)
    loads = []

    def reading_from_disk(k: int) -> list:  # the round's runs read the evicted file, its loads do not
        _read_dropped(evicted)  # not counted: before the runs, as from_disk's own reads are
        loads.append(k)
        return runtime.with_disk_reads(_then_read(run, evicted, i == 1) for i, run in enumerate(rounds(k)))

    from_disk = runtime.timed_rounds(reading_from_disk, protocol, files_bytes=files)
    assert loads == [0, 1] and (8 << 20) * 2 <= from_disk.disk_bytes < (8 << 20) * 3
    reason = runtime.from_disk_reason(from_disk)
    assert reason.startswith(f"timed from disk: {from_disk.disk_bytes / 1e6:.0f} MB read from storage while timed, "
                             f"the files timed being {files / 1e6:.0f} MB")
    assert runtime.from_disk_reason(replace(from_disk, disk_bytes=None)) is None  # the kernel did not say
    small = replace(from_disk, disk_bytes=runtime.DISK_FLOOR, files_bytes=10 * runtime.DISK_FLOOR)
    assert runtime.from_disk_reason(small) is None
    assert runtime.from_disk_reason(replace(small, files_bytes=1000 * runtime.DISK_FLOOR)) is None
    assert runtime.from_disk_reason(replace(small, disk_bytes=runtime.DISK_FLOOR + 1)) is not None
    big = replace(small, disk_bytes=runtime.DISK_FLOOR * 20, files_bytes=1000 * runtime.DISK_FLOOR)
    assert runtime.from_disk_reason(big) is not None  # 2% of the files
    assert runtime.from_disk_reason(replace(big, files_bytes=3000 * runtime.DISK_FLOOR)) is None  # 0.7%


def _then_read(run, path, read: bool):
    if read:
        _read_dropped(path)
    return run


def test_many_candidates_are_timed_against_one_loaded_reference(two_ggufs, monkeypatch):
    from targets.llamacpp import runtime

    loads = []
    real = runtime.loaded

    def counting(path, *args, **kwargs):
        loads.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(runtime, "loaded", counting)
    protocol = LatencyProtocol(prompt_tokens=8, new_tokens=3, warmup=0, repeats=2, threads=1)
    timings = runtime.time_many([two_ggufs[1], two_ggufs[0]], two_ggufs[0], protocol)
    assert loads == ["a.gguf", "b.gguf", "a.gguf"]  # the reference once, then each candidate
    assert [t.rounds for t in timings] == [2, 2] and all(t.decode["n"] == 3 * 3 for t in timings)
    assert all(t.decode_interval["low"] <= t.decode_ratio <= t.decode_interval["high"] for t in timings)


def test_llama_cpp_threads_default_to_the_serving_runtimes_own_counts(monkeypatch, two_ggufs):
    """Unset, the counts are llama-cpp-python's defaults (half the CPUs for decode, all for batches): decode on
    every core stalls at ggml's barriers whenever another process takes a core. Set, both follow it."""
    import os

    from targets.llamacpp.runtime import Threads, loaded, serving_threads, time_ab

    for cpus, expected in [(1, Threads(1, 1)), (2, Threads(1, 2)), (5, Threads(2, 5)), (16, Threads(8, 16))]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert serving_threads() == expected
        assert serving_threads(3) == Threads(3, 3)
    assert Threads(1, 2).as_kwargs() == "n_threads=1, n_threads_batch=2"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    timed = time_ab(*two_ggufs, LatencyProtocol(prompt_tokens=8, new_tokens=2, warmup=0, repeats=1))
    assert (timed.threads, timed.batch_threads) == (1, 2)
    with loaded(two_ggufs[0], 16) as llm:  # what llama.cpp was given
        assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (1, 2)


def _study(trials):
    import optuna

    study = optuna.create_study(directions=["minimize"] * 2)
    study.set_metric_names(["kl", "decode_ms_p50"])
    for kl, ratio, interval in trials:
        metrics = {"kl": kl, "decode_ms_p50": 10 * ratio, "decode_ratio": ratio, "decode_interval": interval,
                   "perplexity": 20.0, "weight_mb": 90.0}
        budget = parse_budget("latency", "0.3x").resolve({"decode_ms_p50": 10.0})
        attrs = {"metrics": metrics, "label": f"kl {kl}", "stages": []}
        if budget.verdict(metrics) == UNDECIDED:
            attrs["undecided"] = ["latency"]
        study.add_trial(optuna.trial.create_trial(values=[kl, 10 * ratio], user_attrs=attrs,
                                                  constraints={"latency": budget.violation(metrics)}))
    return study, [budget]


def test_an_undecided_candidate_is_never_recommended_over_one_that_clearly_meets_the_budget():
    from planner.outcome import decide
    from planner.report import format_outcome

    # trial 0: best KL, interval straddles 0.3x; trial 1: clear, worse KL and dominated by trial 0
    study, budgets = _study([(0.02, 0.29, [0.28, 0.31]), (0.05, 0.295, [0.29, 0.299])])
    outcome = decide(study, budgets, {"decode_ms_p50": 10.0})
    assert outcome.recommended.number == 1 and [t.number for t in outcome.front] == [0, 1]
    text = format_outcome(outcome)
    assert "? = not clearly within the latency budget: its interval straddles it, or it did not hold" in text
    assert any(line.startswith("? ") and "kl 0.02" in line for line in text.splitlines())
    assert any(line.startswith("* ") and "kl 0.05" in line for line in text.splitlines())
    # with no clear candidate, the best undecided one is recommended (and still marked in its row)
    study, budgets = _study([(0.02, 0.29, [0.28, 0.31])])
    assert decide(study, budgets, {"decode_ms_p50": 10.0}).recommended.number == 0


@pytest.mark.parametrize("interval, undecided", [([0.28, 0.31], ["latency"]), ([0.27, 0.29], None), (None, None)])
def test_a_trial_records_which_budgets_its_interval_leaves_undecided(interval, undecided):
    import optuna

    from planner.trial import constrain

    budget = parse_budget("latency", "0.3x").resolve({"decode_ms_p50": 10.0})
    trial = optuna.create_study().ask()
    row = {"decode_ms_p50": 2.9, "decode_ratio": 0.29, **({"decode_interval": interval} if interval else {})}
    assert constrain(trial, [budget], row) is True
    assert trial.user_attrs.get("undecided") == undecided


def test_a_confirmation_decides_over_the_first_timing():
    from planner.outcome import CONFIRMATIONS, decide

    # trial 0 best and clear at first, but its re-timing was over: trial 1 (clear, never re-timed) is recommended
    study, budgets = _study([(0.02, 0.27, [0.26, 0.28]), (0.05, 0.27, [0.26, 0.28])])
    study.set_user_attr(CONFIRMATIONS, {"0": {"decode_ratio": 0.31, "verdicts": {"latency": "over"}}})
    outcome = decide(study, budgets, {"decode_ms_p50": 10.0})
    assert outcome.recommended.number == 1 and outcome.doubtful == {0}
    # an undecided trial whose re-timing clearly meets the budget is clear again
    study, budgets = _study([(0.02, 0.29, [0.28, 0.31]), (0.05, 0.27, [0.26, 0.28])])
    study.set_user_attr(CONFIRMATIONS, {"0": {"decode_ratio": 0.28, "verdicts": {"latency": "meets"}}})
    assert decide(study, budgets, {"decode_ms_p50": 10.0}).recommended.number == 0
    # a re-timing that could not run leaves the first timing in charge
    study.set_user_attr(CONFIRMATIONS, {"0": {"failure": "OSError: no", "verdicts": {}}})
    assert decide(study, budgets, {"decode_ms_p50": 10.0}).recommended.number == 1


class _Target:
    """Re-times each candidate at the next of the given ratios (a fake target: what confirm does with them)."""

    def __init__(self, ratios):
        self.ratios, self.requests = list(ratios), []

    def measure(self, request, model, label):
        from targets.base import Measured

        self.requests.append(request)
        ratio = self.ratios.pop(0)
        return Measured({"decode_ratio": ratio, "decode_interval": [ratio - 0.005, ratio + 0.005],
                         "decode_ms_p50": 10 * ratio}, {})


def _bench(study_budgets, target):
    from types import SimpleNamespace

    from planner.trial import CandidateSteps
    from planner.candidates import BuiltCandidate

    steps = CandidateSteps(build=lambda model, stages, context, screen=None: BuiltCandidate(object(), {}))
    protocol = LatencyProtocol(repeats=3)
    request = lambda may_skip=True: __import__("targets.base", fromlist=["Request"]).Request(  # noqa: E731
        None, None, [], None, protocol, frozenset({"latency", "perplexity"}), scorers=(object,))
    return SimpleNamespace(budgets=study_budgets, baseline={"decode_ms_p50": 10.0}, steps=steps, target=target,
                           model=None, context=None, request=request)


def test_the_confirmation_stage_retimes_down_the_front_until_one_holds():
    from planner.confirm import CONFIRM_REPEATS, confirm
    from planner.outcome import CONFIRMATIONS, decide

    # three near the 0.3x budget, best KL first; far from it: trial 3 (0.1x) needs no re-timing
    study, budgets = _study([(0.01, 0.29, [0.285, 0.295]), (0.02, 0.28, [0.275, 0.285]), (0.03, 0.27, [0.26, 0.28]),
                             (0.04, 0.10, [0.09, 0.11])])
    target = _Target([0.32, 0.29])  # trial 0 does not hold on re-timing, trial 1 does
    said = []
    confirm(study, _bench(budgets, target), say=said.append)
    stored = study.user_attrs[CONFIRMATIONS]
    assert set(stored) == {"0", "1"} and stored["0"]["verdicts"] == {"latency": "over"}
    assert stored["1"]["verdicts"] == {"latency": "meets"}
    assert decide(study, budgets, {"decode_ms_p50": 10.0}).recommended.number == 1
    assert [r.latency.repeats for r in target.requests] == [3 * CONFIRM_REPEATS] * 2
    assert all(r.evaluators == {"latency"} and r.scorers == () for r in target.requests)
    assert "it does not hold: not recommended" in said[1] and said[2].startswith("planner: confirming trial 1")
    # a second run of the stage re-times nothing: the recommendation is confirmed
    confirm(study, _bench(budgets, _Target([])), say=said.append)
    assert len(said) == 4


def test_no_retiming_starts_past_the_deadline_or_when_one_took_longer_than_is_left():
    import time

    from planner.confirm import confirm
    from planner.outcome import CONFIRMATIONS

    def near_budget():
        return _study([(0.01, 0.29, [0.285, 0.295]), (0.02, 0.28, [0.275, 0.285])])

    study, budgets = near_budget()
    target, said = _Target([]), []
    confirm(study, _bench(budgets, target), say=said.append, ends=time.time() - 1)
    assert target.requests == [] and said == ["planner: trial 0 not re-timed (the deadline has passed): judged by "
                                              "its own timing"]
    # the study's re-timing of trial 1 took 5 minutes: with 4 left, trial 0's does not start; with 6 it does
    study, budgets = near_budget()
    study.set_user_attr(CONFIRMATIONS, {"1": {"verdicts": {"latency": "over"}, "seconds": 300.0}})
    said = []
    confirm(study, _bench(budgets, target), say=said.append, ends=time.time() + 240)
    assert target.requests == [] and "a re-timing took 5.0 min, 4.0 min left before the deadline" in said[0]
    confirm(study, _bench(budgets, _Target([0.29])), say=said.append, ends=time.time() + 360)
    assert study.user_attrs[CONFIRMATIONS]["0"]["verdicts"] == {"latency": "meets"}
    # none measured yet: the first starts while any time is left
    study, budgets = near_budget()
    confirm(study, _bench(budgets, _Target([0.29])), say=lambda line: None, ends=time.time() + 1)
    assert study.user_attrs[CONFIRMATIONS]["0"]["verdicts"] == {"latency": "meets"}


def test_a_recommendation_far_from_the_budget_is_not_retimed():
    from planner.confirm import confirm

    study, budgets = _study([(0.01, 0.2, [0.19, 0.21])])
    target = _Target([])
    confirm(study, _bench(budgets, target), say=lambda line: None)
    assert target.requests == [] and "confirmations" not in study.user_attrs


def test_a_llama_cpp_study_confirms_its_recommendation_near_a_ratio_budget(tiny_study_file, tmp_path, capsys,
                                                                            monkeypatch):
    """End to end on the tiny model: the recommended candidate near the budget is rebuilt and re-timed in
    llama.cpp, and the outcome recommends one that holds. Every candidate counts as near here (CONFIRM_NEAR
    lowered: a 2-layer model's ratios are timer noise around 1, well under the 1.5x budget), so
    the stage must run whatever the timings say."""
    import optuna

    import cli
    from planner import confirm
    from planner.confirm import CONFIRM_MOST, near
    from planner.outcome import CONFIRMATIONS, stored_outcome
    from planner.storage import open_storage

    monkeypatch.setattr(confirm, "CONFIRM_NEAR", 1e-6)

    text = tiny_study_file.read_text()
    tiny_study_file.write_text(text[:text.index("[space.distillation]")] + "[space]\ndistillation = false\n"
                               'pruning = false\n[space.quantization]\nmethods = ["rtn"]\n')
    code = cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "3", "--target", "llama.cpp",
                     "--latency-budget", "1.5x", "--objectives", "perplexity,decode_ms_p50"])
    out, err = capsys.readouterr()
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))
    outcome = stored_outcome(study)
    confirmed = study.user_attrs.get(CONFIRMATIONS, {})
    chosen = outcome.recommended
    assert chosen is not None and near(chosen, outcome.budgets) and 1 <= len(confirmed) <= CONFIRM_MOST
    for number, entry in confirmed.items():
        assert entry["verdicts"]["latency"] in ("meets", "over", "undecided") and entry["latency_rounds"] >= 4
        assert f"planner: confirming trial {number} (latency " in err + out
    # it held on re-timing; or no candidate did (then the best one is recommended, marked not clear); or the
    # stage re-timed as many as it may
    held = confirmed.get(str(chosen.number), {}).get("verdicts") == {"latency": "meets"}
    assert held or chosen.number in outcome.doubtful or len(confirmed) == CONFIRM_MOST


def test_both_files_are_timed_as_read_back_from_disk(monkeypatch, two_ggufs):
    """How a file's pages were written must not change its speed (a byte copy of a GGUF read up to 10% apart
    while still in the page cache from its writing): before loading, each file is written out (fsync: dirty
    pages are not dropped), dropped from the page cache and read back in whole, so both come back the same way;
    every round in loads of its own, the outer model of its triplet first (the reference in R C R, the
    candidate in C R C)."""
    import os

    from targets.llamacpp import runtime

    calls = []
    real_fsync, real_advise = os.fsync, os.posix_fadvise
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: (
        calls.append(("advise", os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice)),
        real_advise(fd, offset, length, advice)))
    read = {}
    real_read = os.read

    def counted_read(fd, size):
        data = real_read(fd, size)
        name = os.readlink(f"/proc/self/fd/{fd}")
        read[name] = read.get(name, 0) + len(data)
        return data

    monkeypatch.setattr(os, "read", counted_read)
    real_loaded = runtime.loaded

    def loaded(path, *args, **kwargs):
        calls.append(("load", str(path)))
        return real_loaded(path, *args, **kwargs)

    monkeypatch.setattr(runtime, "loaded", loaded)
    runtime.time_ab(*two_ggufs, LatencyProtocol(prompt_tokens=8, new_tokens=2, warmup=0, repeats=1, threads=1))
    a, b = (str(p) for p in two_ggufs)  # candidate a, reference b; 1 repeat is 2 rounds (a t interval's least)
    whole = os.POSIX_FADV_DONTNEED

    def session(first, second):
        return [("fsync", first), ("advise", first, 0, 0, whole), ("fsync", second), ("advise", second, 0, 0, whole),
                ("load", first), ("load", second)]
    assert calls == session(b, a) + session(a, b)
    assert {name: read.get(name) for name in (a, b)} == {a: 2 * os.path.getsize(a), b: 2 * os.path.getsize(b)}


def test_a_prefill_timing_too_spread_to_read_is_left_out_of_the_row_and_said_why():
    """A prefill ratio whose interval spans more than PREFILL_SPREAD is no figure (one busy-machine study stored
    7760 ms for a candidate beside 123 ms for the float model): the row has no prefill figures, decode's stay."""
    from types import SimpleNamespace

    from targets.llamacpp.target import PREFILL_SPREAD, latency_figures

    def timing(low, high):
        return SimpleNamespace(decode={"p50_ms": 10.0}, decode_ratio=0.5,
                               decode_interval={"low": 0.49, "high": 0.51, "confidence": 0.95},
                               rounds=3, prefill={"p50_ms": 40.0}, prefill_ratio=0.8,
                               prefill_interval={"low": low, "high": high})

    row, left_out = latency_figures(timing(0.7, 0.7 * PREFILL_SPREAD))
    assert left_out is None and row["prefill_ratio"] == 0.8 and row["prefill_interval"] == [0.7, 1.4]
    assert row["prefill_ms_p50"] == 40.0 and row["decode_ratio"] == 0.5
    row, left_out = latency_figures(timing(0.7, 0.7 * PREFILL_SPREAD * 1.01))  # just past the spread: out
    assert left_out and "prefill_ratio" not in row
    row, left_out = latency_figures(timing(0.55, 16.7))
    assert not {"prefill_ms_p50", "prefill_ratio", "prefill_interval"} & set(row)
    assert row["decode_ms_p50"] == 10.0 and row["decode_interval"] == [0.49, 0.51] and row["latency_rounds"] == 3
    assert left_out == ("the prefill ratio's 95% interval 0.55-16.70x spans more than 2x (the machine was busy "
                        "while it was timed)")


def test_llama_cpps_target_keeps_a_timing_from_disk_with_the_candidates_figures(two_ggufs, monkeypatch):
    """What from_disk_reason says reaches the candidate's details (and from there its trial: test_decisions)."""
    from evaluators.perplexity import PerplexityProtocol
    from targets import LLAMA_CPP
    from targets.base import Request
    from targets.llamacpp import target as llamacpp_target

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    request = Request(model, tokenizer, [], PerplexityProtocol(32, 32),
                      LatencyProtocol(prompt_tokens=8, new_tokens=2, warmup=0, repeats=2, threads=1),
                      frozenset({"memory", "latency"}), [])
    real = llamacpp_target.time_ab
    plain = LLAMA_CPP.measure_file(request, two_ggufs[1], "b").details["latency"]
    assert "from_disk" not in plain and plain["disk_bytes"] is not None
    monkeypatch.setattr(llamacpp_target, "time_ab",
                        lambda *args, **kwargs: replace(real(*args, **kwargs), disk_bytes=1 << 40))
    said = LLAMA_CPP.measure_file(request, two_ggufs[1], "b").details["latency"]
    assert said["from_disk"].startswith("timed from disk: 1099512 MB read from storage while timed")
