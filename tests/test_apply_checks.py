"""`planner apply`'s checks made to fail: a shipped artifact whose bytes differ from the recipe's by one, whose
perplexity is more than 1% off, or that decodes more than the tolerance slower is refused in one line; at the
edges (equal bytes, 0.99% off, faster) it passes."""
from __future__ import annotations

import re
import tomllib

import pytest
import yaml

import cli
from conftest import TINY_EVALUATION
from planner.apply import DECODE_RATIO_TOLERANCE, PERPLEXITY_TOLERANCE, check
from planner.errors import PlannerError
from planner.recipes import RECIPE_VERSION, Recipe, save_recipe
from planner.sources import ModelSource, content_hash
from search_spaces import TECHNIQUES
from search_spaces.quantization import QuantSpec

PERPLEXITY, BYTES, RATIO = 20.0, 1_000_000, 0.5


def make_recipe(summary: dict, model: str = "builtin:smollm2-135m", model_hash: str = "sha256:abc",
                provenance: dict | None = None, **metrics) -> Recipe:
    """A valid recipe, validated from the plain dict a recipe file holds: 8-bit RTN, the given recorded figures."""
    spec = QuantSpec(method="rtn", bits={"attn": 8, "mlp": 8}, group_size=32).to_dict()
    return Recipe.from_dict({
        "version": RECIPE_VERSION,
        "model": {"source": model, "content_hash": model_hash},
        "stages": [{"technique": "quantization", "spec": spec}],
        "metrics": {"summary": summary, **metrics},
        "provenance": {"study": "checks", "trial": 0, "seed": 0, "target": "transformers", **(provenance or {})},
    }, TECHNIQUES)


RECORDED = {"perplexity": PERPLEXITY, "weight_bytes": BYTES, "decode_ratio": RATIO}


def measured(**changes) -> dict:
    """The re-measured metrics row of the shipped artifact: the recorded figures unless changed."""
    return {**RECORDED, "decode_ms_p50": 3.0, **changes}


def run_check(recipe, row, tmp_path):
    return check(recipe, row, tmp_path, tmp_path / "model.gguf", "transformers")


def test_an_artifact_that_matches_passes_and_reports_both_figures(tmp_path):
    result = run_check(make_recipe(RECORDED), measured(), tmp_path)
    assert (result.perplexity, result.recorded_perplexity) == (PERPLEXITY, PERPLEXITY)
    assert (result.weight_bytes, result.recorded_weight_bytes) == (BYTES, BYTES)
    assert (result.decode_ratio, result.recorded_decode_ratio, result.decode_ms) == (RATIO, RATIO, 3.0)
    assert (result.folder, result.artifact.name, result.target) == (tmp_path, "model.gguf", "transformers")


@pytest.mark.parametrize("delta", [1, -1])
def test_one_byte_more_or_less_than_recorded_fails_naming_both_counts(tmp_path, delta):
    with pytest.raises(PlannerError, match=f"^the shipped model.gguf stores {BYTES + delta} bytes, "
                                           f"the recipe recorded {BYTES}$"):
        run_check(make_recipe(RECORDED), measured(weight_bytes=BYTES + delta), tmp_path)


def test_a_recorded_file_size_is_what_the_bytes_are_checked_against(tmp_path):
    # llama.cpp records the GGUF's size on disk: that is compared, not the tensor bytes beside it.
    recorded = {**RECORDED, "disk_bytes": BYTES + 4096}
    row = measured(disk_bytes=BYTES + 4096)
    assert run_check(make_recipe(recorded), row, tmp_path).weight_bytes == BYTES + 4096
    with pytest.raises(PlannerError, match=f"stores {BYTES + 4097} bytes, the recipe recorded {BYTES + 4096}$"):
        run_check(make_recipe(recorded), measured(disk_bytes=BYTES + 4097), tmp_path)


def _recipes_recording_perplexity():
    """The recorded perplexity in the summary, or (older recipes) only under metrics.perplexity."""
    summary = {k: v for k, v in RECORDED.items() if k != "perplexity"}
    return {"summary": make_recipe(RECORDED),
            "measurements": make_recipe(summary, perplexity={"perplexity": PERPLEXITY, "protocol": {}})}


@pytest.mark.parametrize("where", ["summary", "measurements"])
@pytest.mark.parametrize("off", [0.0099, -0.0099])
def test_a_perplexity_within_one_percent_passes(tmp_path, where, off):
    result = run_check(_recipes_recording_perplexity()[where], measured(perplexity=PERPLEXITY * (1 + off)), tmp_path)
    assert result.recorded_perplexity == PERPLEXITY


@pytest.mark.parametrize("where", ["summary", "measurements"])
@pytest.mark.parametrize("off", [0.0101, -0.0101])
def test_a_perplexity_more_than_one_percent_off_fails(tmp_path, where, off):
    assert PERPLEXITY_TOLERANCE == 0.01  # what the README promises
    shipped = PERPLEXITY * (1 + off)
    with pytest.raises(PlannerError, match=re.escape(f"the shipped model.gguf scores perplexity {shipped:.3f}, the "
                                                     f"recipe {PERPLEXITY:.3f}: more than 1% apart")):
        run_check(_recipes_recording_perplexity()[where], measured(perplexity=shipped), tmp_path)


@pytest.mark.parametrize("ratio", [RATIO / 2, RATIO, RATIO * (1 + DECODE_RATIO_TOLERANCE)])
def test_decoding_faster_as_fast_or_up_to_the_tolerance_slower_passes(tmp_path, ratio):
    assert run_check(make_recipe(RECORDED), measured(decode_ratio=ratio), tmp_path).decode_ratio == ratio


LIMIT = RATIO * (1 + DECODE_RATIO_TOLERANCE)


def test_decoding_more_than_the_tolerance_slower_fails(tmp_path):
    slower = LIMIT * 1.01
    with pytest.raises(PlannerError, match=re.escape(
            f"the shipped model.gguf decodes at {slower:.3f}x the reference over 1 rounds; the recipe recorded "
            f"{RATIO:.3f}x: clearly more than {DECODE_RATIO_TOLERANCE:.0%} slower")):
        run_check(make_recipe(RECORDED), measured(decode_ratio=slower), tmp_path)


def test_a_slow_reading_whose_interval_reaches_back_under_the_limit_is_noise_not_a_failure(tmp_path):
    row = measured(decode_ratio=LIMIT * 1.1, decode_interval=[LIMIT * 0.99, LIMIT * 1.2], latency_rounds=12,
                   latency_confidence=1 - 0.05 / 4)
    result = run_check(make_recipe(RECORDED), row, tmp_path)
    assert result.decode_ratio == LIMIT * 1.1 and result.decode_rounds == 12
    assert result.decode_interval == (LIMIT * 0.99, LIMIT * 1.2) and result.confidence == 1 - 0.05 / 4
    clear = {**row, "decode_interval": [LIMIT * 1.01, LIMIT * 1.2]}
    with pytest.raises(PlannerError, match=re.escape(
            f"decodes at {LIMIT * 1.1:.3f}x (98.8% interval {LIMIT * 1.01:.3f}-{LIMIT * 1.2:.3f}) the reference over "
            f"12 rounds; ")):
        run_check(make_recipe(RECORDED), clear, tmp_path)


def test_apply_times_once_looking_on_for_longer_than_a_study_while_unclear_and_judges_all_its_rounds(
        tmp_path, monkeypatch):
    """apply's timing: the study's protocol with APPLY_EXTENSION x its most rounds, and the rule that keeps it
    going while the slowdown limit or a budget is straddled; its one row is what check judges."""
    from planner import apply as apply_module
    from evaluators.paired import PairedRatio

    recipe = make_recipe({**RECORDED, "decode_interval": [0.45, 0.55]})
    limit = 0.55 * (1 + DECODE_RATIO_TOLERANCE)
    rule = apply_module.unclear_rule(recipe)
    assert rule({"decode_ratio": PairedRatio(limit, limit * 0.9, limit * 1.1, 3)})  # straddles the limit
    assert not rule({"decode_ratio": PairedRatio(limit, limit * 1.01, limit * 1.1, 3)})  # clearly slower
    assert not rule({"decode_ratio": PairedRatio(0.5, 0.45, 0.55, 3)})  # clearly within
    from evaluators.latency import LatencyProtocol
    from evaluators.perplexity import PerplexityProtocol
    from targets.base import Request

    study = Request(None, None, [], PerplexityProtocol(), LatencyProtocol(repeats=3), frozenset({"latency"}))
    timing = apply_module.timing_request(study, recipe)
    assert timing.latency.repeats == 3 and timing.latency.most_repeats == 12 * apply_module.APPLY_EXTENSION > 12
    assert timing.unclear({"decode_ratio": PairedRatio(limit, limit * 0.9, limit * 1.1, 3)})


@pytest.mark.parametrize("interval, word", [((0.26, 0.29), "MEETS"), ((0.31, 0.33), "OVER"),
                                            ((0.29, 0.31), "WITHIN NOISE of")])
def test_the_budget_note_judges_the_ratio_and_its_interval_as_the_study_did(tmp_path, interval, word):
    budget = {"kind": "latency", "limit": 4.63, "relative": 0.3, "text": "0.3x"}
    recipe = make_recipe(RECORDED)
    recipe = type(recipe).from_dict({**recipe.to_dict(), "budget": [budget]}, TECHNIQUES)
    ratio = sum(interval) / 2
    # 4.71 ms is over the 4.63 ms the relative budget resolved to on the study's baseline: the ratio is judged
    note = run_check(recipe, measured(decode_ratio=ratio, decode_interval=list(interval), decode_ms_p50=4.71),
                     tmp_path).budget_note
    assert note == (f"{word} latency <= 0.3x the uncompressed model: {ratio:.3f}x (95% interval "
                    f"{interval[0]:.3f}-{interval[1]:.3f}) in the same run")


def test_a_request_without_scorers_never_opens_the_runtime():
    from evaluators.latency import LatencyProtocol
    from evaluators.perplexity import PerplexityProtocol
    from targets.base import Measured, Request
    from targets.figures import scored

    def runtime():
        raise AssertionError("the runtime was opened")

    request = Request(None, None, [], PerplexityProtocol(), LatencyProtocol(), frozenset({"latency"}))
    measured_row = Measured({"decode_ratio": 0.5}, {"latency": {}})
    assert scored(request, measured_row, runtime) is measured_row


def test_a_figure_the_recipe_did_not_record_or_the_target_did_not_time_is_not_checked(tmp_path):
    unrecorded = make_recipe({"weight_bytes": BYTES})
    result = run_check(unrecorded, measured(perplexity=PERPLEXITY * 2, decode_ratio=RATIO * 2), tmp_path)
    assert (result.recorded_perplexity, result.recorded_decode_ratio) == (None, None)
    untimed = {k: v for k, v in measured(perplexity=PERPLEXITY).items() if k not in ("decode_ratio", "decode_ms_p50")}
    assert run_check(make_recipe(RECORDED), untimed, tmp_path).decode_ratio is None


def test_apply_of_a_recipe_whose_bytes_were_edited_fails_in_one_line(tiny_model_dir, text_corpus_dir, tmp_path,
                                                                       capsys, monkeypatch):
    """End to end: the recipe's candidate is rebuilt, shipped and re-measured, and its true byte count is not
    the one recorded in the (edited) recipe."""
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "cache"))
    provenance = {"data": str(text_corpus_dir), "objectives": ["perplexity", "weight_mb"],
                  "evaluation": tomllib.loads(TINY_EVALUATION)["evaluation"]}
    path = tmp_path / "recipe.yaml"
    save_recipe(make_recipe({"weight_bytes": 1}, model=str(tiny_model_dir), provenance=provenance,
                            model_hash=content_hash(ModelSource.parse(str(tiny_model_dir)))), path)
    assert yaml.safe_load(path.read_text())["metrics"]["summary"] == {"weight_bytes": 1}

    code = cli.main(["apply", str(path), "--out", str(tmp_path / "deploy")])
    out, err = capsys.readouterr()
    assert code == PlannerError.exit_code and out == ""
    said = [line for line in err.splitlines() if line.startswith("planner")]  # not the libraries' progress bars
    assert len(said) == 1 and re.fullmatch(r"planner: error: the shipped \S+ stores \d+ bytes, the recipe recorded 1",
                                           said[0]), err
    assert err.endswith(said[0] + "\n")


def test_a_target_may_free_the_built_candidate_once_written():
    """planner.trial.measure hands a BuiltCandidate's model over: after the target's `request.release()` no
    reference is left but the target's own (the float candidate is freed before the runtime loads its file)."""
    import gc
    import weakref
    from types import SimpleNamespace

    import torch

    from evaluators.latency import LatencyProtocol
    from evaluators.perplexity import PerplexityProtocol
    from planner.candidates import BuiltCandidate
    from planner.trial import measure
    from targets.base import Measured, Request

    seen = {}

    class Target:
        def measure(self, request, model, label):
            seen["model"] = weakref.ref(model)
            del model  # "written": the target needs it no more
            request.release()
            gc.collect()
            seen["alive after release"] = seen["model"]() is not None
            return Measured({"weight_bytes": 1}, {})

    request = Request(None, None, [], PerplexityProtocol(), LatencyProtocol(), frozenset())
    bench = SimpleNamespace(request=lambda may_skip: request, target=Target(),
                            steps=SimpleNamespace(describe=lambda stages: "label"))
    built = BuiltCandidate(torch.nn.Linear(4, 4), {})
    measure(bench, built, [])
    assert seen["alive after release"] is False and built.model is None
    kept = torch.nn.Linear(4, 4)  # a plain model (the baseline) is never released
    measure(bench, kept, [])
    assert seen["model"]() is kept


def test_the_slowdown_limit_starts_from_the_top_of_the_recorded_interval(tmp_path):
    # recorded 0.5x (0.45-0.6): a fresh 0.7x (0.68-0.72) is within 25% of 0.6, so not clearly slower
    recorded = {**RECORDED, "decode_interval": [0.45, 0.6]}
    fresh = measured(decode_ratio=0.7, decode_interval=[0.68, 0.72])
    assert run_check(make_recipe(recorded), fresh, tmp_path).decode_ratio == 0.7
    with pytest.raises(PlannerError, match="clearly more than 25% slower"):
        run_check(make_recipe(RECORDED), fresh, tmp_path)  # against a point 0.5x it is
