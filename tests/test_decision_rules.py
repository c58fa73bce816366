"""The decision rules the table tests of test_decisions.py left open, each found by mutation testing
(bench/mutation.sh): a figure registered by a plug-in (its column, a maximised objective ranked as such), the
registry's small queries, a non-finite budget, the skip message on a same-run ratio, what a workbench's request
carries (the device, the skip rule), a handed-over candidate freed on the target's word, the wiring of a trial's
steps (rungs, shaped model, storage notes, size estimate), a training record and the stored types on the label,
the stock comparison (`compare`: comparable rows, which candidates dominate a setting, a setting measured or
failed), and latency verdicts with their uncertainty (a ratio interval straddling a budget: undecided, timed
longer, marked on the trial, never recommended over a clear candidate).

Fast, as test_decisions.py: hand-made trials and its table-driven Lab, no model, no corpus, no storage file.
These tests are part of the mutation run's test command (`[tool.mutmut]` in pyproject.toml).
"""
from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from types import SimpleNamespace

import optuna
import pytest
from test_decisions import BASELINE, COMPLETE, Lab, LabTarget, RecordingTrial, numbers, study_of

from planner import objectives as registry
from planner.budgets import parse_budget
from planner.candidates import BuiltCandidate
from planner.errors import PlannerError
from planner.objectives import (MAXIMIZE, METRICS, MINIMIZE, OBJECTIVES, UNMEASURED_PERPLEXITY_FACTOR, Metric,
                                Objective, accuracy_objectives, column_order, needs_reference, register_figure,
                                unregister_figure)
from planner.outcome import best_trials, comparable, decide
from planner.recipes import Stage, plain_stages
from planner.trial import hopeless, measure, measure_stock, objective
from search_spaces.distillation import DistillSpace, DistillSpec
from targets.base import Measured

optuna.logging.set_verbosity(optuna.logging.WARNING)

# The project's own columns (its lines of FIGURES), in order; a plug-in's figures may sit among them.
OWN_COLUMNS = ("perplexity", "bits_per_byte", "kl", "top1_agreement", "decode_ms_p50", "decode_ratio",
               "prefill_ms_p50", "prefill_ratio", "weight_mb")


@pytest.fixture
def lab():
    return Lab()


# ---------------------------------------------------------------------------------------------------
# The registry: columns, a figure registered by a plug-in, its small queries
# ---------------------------------------------------------------------------------------------------


def test_column_order_is_every_figure_but_the_exact_byte_count():
    columns = column_order()
    assert len(columns) == len(set(columns)) and "weight_bytes" not in columns
    assert set(columns) == (set(OBJECTIVES) | set(METRICS)) - {"weight_bytes"}  # whatever is registered
    assert [c for c in columns if c in OWN_COLUMNS] == list(OWN_COLUMNS)  # the project's own in their order


@pytest.fixture
def registered():
    """Register figures for one test; whatever happens, the registry is as it was afterwards."""
    names, before = [], (column_order(), dict(OBJECTIVES), dict(METRICS))

    def add(figure, before=None):
        names.append(figure.name)
        return register_figure(figure, before)

    yield add
    for name in names:
        unregister_figure(name)
    assert (column_order(), OBJECTIVES, METRICS) == before


def test_a_registered_metric_takes_its_column_and_leaves_again(registered):
    columns = column_order()
    tokens = Metric("tokens_per_s", "tokens/s", "tok/s", "{:.1f}", "latency")
    assert registered(tokens, before="weight_mb") is tokens
    at = columns.index("weight_mb")
    assert column_order() == columns[:at] + ("tokens_per_s",) + columns[at:]
    assert METRICS["tokens_per_s"] is tokens and "tokens_per_s" not in OBJECTIVES
    assert OBJECTIVES["kl"].kind == "accuracy" and METRICS["bits_per_byte"].unit == "bits"  # the rest as it was
    unregister_figure("tokens_per_s")
    assert column_order() == columns and "tokens_per_s" not in METRICS
    assert registry.metric("weight_bytes").unit == "bytes"


@pytest.mark.parametrize("before", [None, "no_such_figure"])
def test_a_registered_figure_goes_last_unless_placed(registered, before):
    columns = column_order()
    score = registered(Objective("score", "score", "", "{:.2f}", "latency", direction=MAXIMIZE), before)
    assert column_order() == columns + ("score",)
    assert OBJECTIVES["score"] is score and "score" not in METRICS


def test_a_figure_is_registered_once(registered):
    columns = column_order()
    registered(Metric("tokens_per_s", "tokens/s", "tok/s", "{:.1f}", "latency"))
    for name in ("kl", "bits_per_byte", "tokens_per_s"):  # an objective's name, a metric's, a registered one's
        with pytest.raises(ValueError, match=rf"^figure '{name}' is already registered$"):
            register_figure(Metric(name, name, "", "{}", "latency"))
    assert column_order() == columns + ("tokens_per_s",)


@pytest.mark.parametrize("direction, value, ranked", [(MINIMIZE, 3.0, 3.0), (MAXIMIZE, 3.0, -3.0),
                                                       (MAXIMIZE, -2.5, 2.5)])
def test_a_maximised_objective_is_ranked_negated(direction, value, ranked):
    assert Objective("x", "x", "", "{}", "latency", direction=direction).minimised(value) == ranked


@pytest.mark.parametrize("evaluator", ["latency", "energy"])
def test_an_objective_no_target_measures_is_refused_before_the_study_is_created(registered, tiny_study_file,
                                                                                tmp_path, capsys, evaluator):
    """A registered objective the study's target never produces would be optimised as its stand-in on every
    trial (a constant): refused in one line before the study is created, whichever evaluator it names."""
    import cli
    from planner.storage import open_storage

    registered(Objective("energy_j", "energy J", "J", "{:.1f}", evaluator))
    code = cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "2", "--target", "transformers",
                     "--objectives", "perplexity,energy_j", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == (
        "planner: error: objective energy_j: the transformers target does not produce that figure (it measures "
        "decode_ms_p50, disk_bytes, prefill_ms_p50, weight_bytes, weight_mb and scores logits); leave it out of "
        "--objectives")
    assert optuna.get_all_study_names(open_storage(f"sqlite:///{tmp_path}/tiny.db")) == []


def test_what_a_target_says_it_produces_is_what_its_rows_hold():
    """Target.figures against the rows the targets write: metrics_row's keys, and llama.cpp's timed figures."""
    from types import SimpleNamespace

    from targets import TARGETS
    from targets.base import ROW_FIGURES
    from targets.figures import metrics_row
    from targets.llamacpp.target import latency_figures

    timing = SimpleNamespace(decode=SimpleNamespace(p50_ms=1.0), prefill=SimpleNamespace(p50_ms=2.0))
    assert set(metrics_row("x", 10, timing, disk_bytes=12)) - {"stages"} == ROW_FIGURES
    ab = SimpleNamespace(decode={"p50_ms": 1.0}, prefill={"p50_ms": 2.0}, decode_ratio=0.5, prefill_ratio=0.6,
                         decode_interval={"low": 0.4, "high": 0.6, "confidence": 0.95}, rounds=3,
                         prefill_interval={"low": 0.5, "high": 0.7})
    timed, _ = latency_figures(ab)
    numbers = {k for k, v in timed.items() if isinstance(v, float) and not k.startswith("latency_")}
    assert numbers <= TARGETS["llama.cpp"].figures and {"decode_ratio", "prefill_ratio"} <= numbers
    assert all(ROW_FIGURES <= target.figures for target in TARGETS.values())


@pytest.fixture
def throughput(registered):
    """A maximised cost objective, as a plug-in would add it: more tokens per second is better."""
    return registered(Objective("tokens_per_s", "tokens/s", "tok/s", "{:.1f}", "latency", direction=MAXIMIZE,
                                unmeasured=lambda baseline: 0.0))


def throughput_study(*trials):
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.set_metric_names(["perplexity", "tokens_per_s"])
    for values, excess in trials:
        study.add_trial(optuna.trial.create_trial(
            values=list(values), constraints={"latency": excess},
            user_attrs={"metrics": {"perplexity": values[0], "tokens_per_s": values[1]}}))
    return study


def test_a_maximised_objective_decides_the_front_and_the_best(throughput):
    # trial 0 is as accurate as trial 1 and faster (50 > 30 tokens/s): it dominates; trial 2 trades accuracy
    study = throughput_study(((10.0, 50.0), -0.1), ((10.0, 30.0), -0.1), ((9.0, 20.0), -0.1), ((8.0, 90.0), 0.5))
    outcome = decide(study, [], BASELINE)
    assert numbers(outcome.front) == [2, 0] and outcome.recommended.number == 2
    assert {name: t.number for name, t in best_trials(study).items()} == {"perplexity": 3, "tokens_per_s": 3}
    study = throughput_study(((10.0, 50.0), -0.1), ((10.0, 30.0), -0.1), ((9.0, 20.0), -0.1))
    assert {name: t.number for name, t in best_trials(study).items()} == {"perplexity": 2, "tokens_per_s": 0}


def test_an_undecided_candidate_beside_the_front_is_ranked_by_a_maximised_objective_too(throughput):
    # trial 1 (50 tokens/s) would dominate trial 0 (30): shown beside it, undecided; trial 0 recommended
    study = throughput_study(((10.0, 30.0), -0.1), ((10.0, 50.0), -0.1))
    study.set_user_attr("confirmations", {"1": {"verdicts": {"latency": "undecided"}}})
    outcome = decide(study, [], BASELINE)
    assert numbers(outcome.front) == [0, 1] and outcome.recommended.number == 0 and outcome.doubtful == {1}


@pytest.mark.parametrize("objectives, accuracy", [
    (("weight_mb", "kl", "decode_ms_p50", "perplexity"), ["kl", "perplexity"]),  # in the order given
    (("perplexity", "weight_mb"), ["perplexity"]),
    (("decode_ms_p50", "weight_mb"), []),
])
def test_accuracy_objectives(objectives, accuracy):
    assert accuracy_objectives(objectives) == accuracy


@pytest.mark.parametrize("evaluators, needed", [
    ({"memory", "perplexity", "kl"}, True),  # kl compares against the base model's distributions
    ({"kl"}, True),
    ({"memory", "perplexity", "latency"}, False),
    (set(), False),
])
def test_needs_reference(evaluators, needed):
    assert needs_reference(evaluators) is needed


# ---------------------------------------------------------------------------------------------------
# Budgets and the latency skip
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, text", [("latency", "1e999ms"), ("memory", "1e400x"), ("prefill", "2E999 s")])
def test_a_budget_too_large_for_a_float_is_refused(kind, text):
    with pytest.raises(PlannerError, match=rf"^{kind} budget '{text}' must be a finite number$"):
        parse_budget(kind, text)


@pytest.mark.parametrize("kind, text, row, message", [
    ("latency", "0.5x", {"decode_ms_p50": 1.0, "decode_ratio": 0.8}, "latency 0.80x the reference"),
    ("prefill", "0.5x", {"prefill_ms_p50": 1.0, "prefill_ratio": 1.25, "decode_ratio": 0.1},
     "prefill 1.25x the reference"),
    ("latency", "0.5x", {"decode_ms_p50": 16.0}, "latency 16.00 ms"),  # no ratio: the resolved 10 ms limit
    ("latency", "5ms", {"decode_ms_p50": 8.0, "decode_ratio": 0.1}, "latency 8.00 ms"),  # absolute: the ms
])
def test_the_skip_message_names_the_figure_that_decided(kind, text, row, message):
    budget = parse_budget(kind, text).resolve({"decode_ms_p50": 10.0, "prefill_ms_p50": 10.0})
    assert hopeless([budget], row) == f"{message} is over 1.5x the budget"


# ---------------------------------------------------------------------------------------------------
# What a workbench asks of its target, and a handed-over candidate freed on the target's word
# ---------------------------------------------------------------------------------------------------


def test_the_request_carries_the_study_device_and_the_skip_rule(lab):
    bench = replace(lab.bench(["latency:20ms"], objectives=("kl", "weight_mb")),
                    context=SimpleNamespace(device="cuda:1"))
    request = bench.request()
    assert request.device == "cuda:1" and request.device is bench.context.device
    scorers = {scorer.name: scorer for scorer in (make() for make in request.scorers)}
    assert set(scorers) == {"perplexity", "kl"}
    assert scorers["kl"].accumulator.device == "cuda:1" and scorers["kl"].accumulator.reference == "reference"
    slow = {"decode_ms_p50": 40.0}
    assert request.hopeless(slow) == "latency 40.00 ms is over 1.5x the budget"  # a trial's rule by default
    assert request.hopeless({"decode_ms_p50": 20.0}) is None
    assert bench.request(may_skip=False).hopeless(slow) is None  # the baseline's: every figure measured


class Model:
    """A built model that can be watched (a weak reference) and told apart by its name."""

    def __init__(self, name: str):
        self.name = name


class ReleasingTarget(LabTarget):
    """Measures from the table, then says it needs the model no more (its artifact is written)."""

    def measure(self, request, model, label):
        measured = super().measure(request, model, label)
        watched = weakref.ref(model)
        del model
        request.release()
        gc.collect()
        self.alive_after_release = watched() is not None
        return measured


def test_a_handed_over_candidate_is_freed_when_the_target_releases_it(lab):
    bench = replace(lab.bench(), target=ReleasingTarget(lab))
    built = BuiltCandidate(Model("a"), {"fake": 0.25})
    row, _ = measure(bench, built, [], RecordingTrial(), "fake(a)")
    assert row["perplexity"] == 22.0 and row["stages"] == "fake(a)"
    assert bench.target.alive_after_release is False and built.model is None
    kept = Model("a")  # a plain model (the baseline) is the caller's: never released
    measure(bench, kept, [])
    assert bench.target.alive_after_release is True and kept.name == "a"


# ---------------------------------------------------------------------------------------------------
# A trial's steps: rungs from the study, the shaped model handed on, training and stored types recorded
# ---------------------------------------------------------------------------------------------------


class StudentLab(Lab):
    """One distillation stage, its depth sampled, its steps left to the rungs; built as table candidate 'a'."""

    def suggest_stages(self, trial, spaces):
        return [Stage("distillation", DistillSpec(depth_keep=trial.suggest_categorical("depth", [0.5, 0.7]),
                                                  steps=144))]

    @staticmethod
    def describe(stages, notes=None):
        return " + ".join(f"student({s.spec.depth_keep}, {s.spec.steps} steps)" for s in stages)

    @staticmethod
    def notes(base_model, stages, shaped=None):
        return {}

    def estimate(self, base_model, stages, shaped=None, beyond=None):
        return 150_000_000

    def build(self, base_model, stages, context, screen=None):
        self.calls["build"].append(stages[0].spec.steps)
        return BuiltCandidate(Model("a"), {"distillation": 1.0})


def student(depth: float, steps: int) -> list[dict]:
    return plain_stages([Stage("distillation", DistillSpec(depth_keep=depth, steps=steps))])


@pytest.mark.parametrize("depth, steps, built, twin", [
    (0.5, 8, [8], None),  # the better student moves up a rung: built again with 8 steps
    (0.7, 4, [], 1),  # the other stays at 4 steps: the very candidate of trial 1, its figures reused
])
def test_a_trial_trains_at_the_rung_the_study_gives_its_lineage(depth, steps, built, twin):
    """Two students were measured at the first rung (4 steps); the sampler asks for 144 steps."""
    lab = StudentLab()
    bench = replace(lab.bench(), spaces={"distillation": DistillSpace(steps=(4, 8, 16))})
    study = optuna.create_study(directions=["minimize"] * 3)
    for measured_depth, score in ((0.5, 20.0), (0.7, 30.0)):
        study.add_trial(optuna.trial.create_trial(values=[score, 8.0, 150.0], user_attrs={
            "stages": student(measured_depth, 4), "metrics": {"perplexity": score}}))
    study.enqueue_trial({"depth": depth})
    study.optimize(objective(bench), n_trials=1)
    trial = study.trials[-1]
    assert trial.state == COMPLETE and lab.calls["build"] == built
    assert trial.user_attrs["stages"] == student(depth, steps)
    assert trial.user_attrs["label"] == f"student({depth}, {steps} steps)"
    assert trial.user_attrs.get("duplicate_of") == twin


SHAPED = object()  # what a shaped model stands for: only its identity is checked


class WiredLab(Lab):
    """Records what the shaped model, the storage notes and the size estimate were given."""

    def __init__(self):
        super().__init__()
        self.steps = replace(self.steps, shaped_model=self.shaped_model)
        self.given = {}

    def shaped_model(self, base_model, stages):
        self.given["shaped_model"] = (base_model, [s.spec.name for s in stages])
        return SHAPED

    def notes(self, base_model, stages, shaped=None):
        self.given["storage_notes"] = (base_model, [s.spec.name for s in stages], shaped)
        return super().notes(base_model, stages, shaped)

    def estimate(self, base_model, stages, shaped=None, beyond=None):
        self.given["estimate"] = (base_model, [s.spec.name for s in stages], shaped)
        return super().estimate(base_model, stages, shaped)


def test_the_shaped_model_reaches_the_storage_notes_and_the_size_estimate():
    lab = WiredLab()
    bench = lab.bench()
    study = lab.run(bench, "a")
    assert study.trials[0].state == COMPLETE
    assert lab.given == {"shaped_model": (bench.model, ["a"]), "storage_notes": (bench.model, ["a"], SHAPED),
                         "estimate": (bench.model, ["a"], SHAPED)}


TRAINING = {"distillation": {"steps": 16, "resumed_from": 8, "seconds": 1.5}}


class RecordingLab(Lab):
    """Candidate 'b' trained (a training record) and its artifact says what it stores (runtime details)."""

    def __init__(self):
        super().__init__()
        self.target = StoringTarget(self)

    def build(self, base_model, stages, context, screen=None):
        built = super().build(base_model, stages, context, screen)
        if stages[0].spec.name == "b":
            built.training = TRAINING
        return built


class StoringTarget(LabTarget):
    def measure(self, request, model, label):
        measured = super().measure(request, model, label)
        if model.name == "b":
            measured.details["runtime"] = {"stored": "q4_K x 7, f16 x 2", "runtime": "lab"}
        return measured


def test_a_trial_records_its_training_and_what_its_artifact_stores():
    lab = RecordingLab()
    study = lab.run(lab.bench(), "a", "b")
    plain, trained = study.trials
    assert trained.state == COMPLETE and trained.user_attrs["training"] == TRAINING
    assert trained.user_attrs["label"] == "fake(b) [q4_K x 7, f16 x 2]"
    assert trained.user_attrs["measurements"]["runtime"]["stored"] == "q4_K x 7, f16 x 2"
    assert trained.user_attrs["metrics"]["stages"] == "fake(b)"  # the row: as measured
    assert plain.user_attrs["label"] == "fake(a)" and "training" not in plain.user_attrs


# ---------------------------------------------------------------------------------------------------
# compare: the target's stock settings against the study's measured candidates
# ---------------------------------------------------------------------------------------------------

COMPARED = ("kl", "decode_ms_p50", "weight_mb")
STOCK_BASELINE = {"kl": 0.0, "decode_ms_p50": 10.0, "weight_mb": 500.0, "perplexity": 20.0}


@pytest.mark.parametrize("objectives, row, expected", [
    # latency from its same-run ratio times the baseline's ms, whatever the row's own ms say
    (COMPARED, {"kl": 0.1, "decode_ms_p50": 4.0, "decode_ratio": 0.3, "weight_mb": 100.0}, (0.1, 3.0, 100.0)),
    (COMPARED, {"kl": 0.1, "decode_ms_p50": 4.0, "weight_mb": 100.0}, (0.1, 4.0, 100.0)),  # no ratio: the ms
    # unmeasured figures take their stand-ins (100x the baseline's perplexity, the baseline's ms)
    (("perplexity", "decode_ms_p50"), {"weight_mb": 100.0}, (UNMEASURED_PERPLEXITY_FACTOR * 20.0, 10.0)),
    (("perplexity", "weight_mb"), {"perplexity": 21.0, "decode_ratio": 0.5, "weight_mb": 99.0}, (21.0, 99.0)),
])
def test_comparable(objectives, row, expected):
    assert comparable(objectives, row, STOCK_BASELINE) == pytest.approx(expected)


def test_comparable_without_the_baseline_figure_keeps_the_row_ms():
    row = {"kl": 0.1, "decode_ms_p50": 4.0, "decode_ratio": 0.3, "weight_mb": 100.0}
    assert comparable(COMPARED, row, {"kl": 0.0, "weight_mb": 500.0}) == (0.1, 4.0, 100.0)


def test_comparable_ranks_a_maximised_objective_negated(throughput):
    assert comparable(("perplexity", "tokens_per_s"), {"perplexity": 21.0, "tokens_per_s": 40.0}, {}) == (21.0, -40.0)


def metrics(kl, ratio, mb, ms=5.0):
    return {"kl": kl, "decode_ms_p50": ms, "decode_ratio": ratio, "weight_mb": mb, "weight_bytes": int(mb * 1e6),
            "perplexity": 21.0, "stages": "x"}


def stock_study(trials, stock, budgets):
    """trials: (metrics, extra user attrs, state); constraints from the budgets as a trial would set them."""
    study = optuna.create_study(study_name="s", directions=["minimize"] * 3)
    study.set_metric_names(list(COMPARED))
    for row, attrs in trials:
        study.add_trial(optuna.trial.create_trial(
            values=[row.get(n, 0.0) for n in COMPARED],
            constraints={b.kind: b.violation(row) if b.metric in row else 1.0 for b in budgets},
            user_attrs={"metrics": row, **attrs}))
    if stock is not None:
        study.set_user_attr("stock", stock)
    return study


def compared(trials, stock, budgets=()):
    budgets = [parse_budget(*b.split(":")).resolve({"weight_bytes": 500_000_000}) for b in budgets]
    return {c.name: c for c in decide(stock_study(trials, stock, budgets), budgets, STOCK_BASELINE).compared}


PRESET = metrics(0.05, 0.35, 103.7, ms=3.4)


def test_a_preset_lists_the_candidates_that_dominate_it_within_budget_first():
    trials = [(metrics(0.01, 0.30, 103.0), {}),  # 0: better in all three, over the 103.5 MB budget
              (metrics(0.03, 0.33, 101.0, ms=9.0), {}),  # 1: better in all (its ms read slower: another run)
              (metrics(0.02, 0.40, 100.0), {}),  # 2: a slower ratio: does not dominate
              (metrics(0.05, 0.35, 103.7), {}),  # 3: equal in every objective: does not dominate
              (metrics(0.03, 0.33, 101.0, ms=9.0), {"duplicate_of": 1}),  # 4: trial 1's twin, listed once
              # 5: better in all, but not measured in full (no perplexity: skipped): never compared
              ({"kl": 0.0, "decode_ms_p50": 1.0, "decode_ratio": 0.1, "weight_mb": 50.0, "weight_bytes": 50_000_000,
                "stages": "x"}, {"skipped_perplexity": "latency"}),
              (metrics(0.04, 0.20, 100.0), {})]  # 6: better in all, within the budget
    budgets = ["memory:102MB"]
    found = compared(trials, {"Q4_K_M": {"label": "llama.cpp Q4_K_M", "metrics": PRESET}}, budgets)
    preset = found["Q4_K_M"]
    assert preset.dominated_by == [1, 6, 0]  # within the budget first, each group by number
    assert preset.label == "llama.cpp Q4_K_M" and preset.row == PRESET and preset.failure is None
    assert preset.meets_budget is False  # 103.7 MB over 102 MB


@pytest.mark.parametrize("budgets, meets", [
    ([], True),
    (["memory:103.7MB"], True),  # exactly at the budget meets it
    (["memory:103.6MB"], False),
    (["memory:200MB", "latency:1ms"], False),  # one budget missed is enough
    (["memory:200MB", "latency:3.4ms"], True),
])
def test_whether_a_preset_meets_the_budget(budgets, meets):
    found = compared([], {"Q4_K_M": {"label": "llama.cpp Q4_K_M", "metrics": PRESET}}, budgets)
    assert found["Q4_K_M"].meets_budget is meets and found["Q4_K_M"].dominated_by == []


def test_a_preset_not_measured_says_why_and_the_next_is_compared_all_the_same():
    stock = {"IQ1_S": {"label": "llama.cpp IQ1_S", "failure": "QuantizeError: no"},
             "Q2_K": {},  # nothing recorded: named by its key
             "Q4_0": {"metrics": {}},
             "Q4_K_M": {"metrics": PRESET}}  # no label stored: its name
    found = compared([(metrics(0.01, 0.30, 100.0), {})], stock)
    assert list(found) == ["IQ1_S", "Q2_K", "Q4_0", "Q4_K_M"]
    failed = found["IQ1_S"]
    assert (failed.label, failed.row, failed.failure, failed.meets_budget, failed.dominated_by) == (
        "llama.cpp IQ1_S", {}, "QuantizeError: no", False, [])
    assert (found["Q2_K"].label, found["Q2_K"].failure, found["Q2_K"].meets_budget) == ("Q2_K", "not measured", False)
    assert found["Q4_0"].failure == "not measured" and found["Q4_0"].row == {}
    assert (found["Q4_K_M"].label, found["Q4_K_M"].failure, found["Q4_K_M"].meets_budget) == ("Q4_K_M", None, True)
    assert found["Q4_K_M"].dominated_by == [0]


def test_a_study_without_stock_compares_nothing():
    assert compared([(metrics(0.01, 0.30, 100.0), {})], None) == {}
    assert compared([], {}) == {}


class StockTarget(LabTarget):
    """A stock tool in the table: 'Q4_0' measured as candidate 'a' would be, anything else refused."""

    name = "lab"

    def measure_stock(self, request, name, context):
        self.asked = (name, context, request.hopeless({"decode_ms_p50": 1000.0}))
        if name == "Q4_0":
            return Measured({"stages": "lab Q4_0 [q4_0 x 7]", "perplexity": 23.0, "weight_bytes": 1},
                            {"runtime": {"file_type": name}})
        if name == "plain":
            return Measured({"perplexity": 24.0}, {})
        raise RuntimeError("x" * 600 + "\nsecond line")


@pytest.mark.parametrize("name, expected", [
    ("Q4_0", {"label": "lab Q4_0 [q4_0 x 7]", "metrics": {"stages": "lab Q4_0 [q4_0 x 7]", "perplexity": 23.0,
                                                          "weight_bytes": 1},
              "measurements": {"runtime": {"file_type": "Q4_0"}}}),
    ("plain", {"label": "lab plain", "metrics": {"perplexity": 24.0}, "measurements": {}}),  # no label in the row
    ("IQ1_S", {"label": "lab IQ1_S", "failure": "RuntimeError: " + "x" * 500}),  # one line of at most 500
])
def test_measure_stock(lab, name, expected):
    bench = replace(lab.bench(["latency:20ms"]), target=StockTarget(lab))
    assert measure_stock(bench, name) == expected
    # the study's build context, and never a skip: a stock setting is measured in full
    assert bench.target.asked == (name, bench.context, None)


# ---------------------------------------------------------------------------------------------------
# Latency verdicts with their uncertainty: a same-run ratio's interval straddling a relative budget
# ---------------------------------------------------------------------------------------------------

RATIO_BASELINE = {"decode_ms_p50": 10.0, "prefill_ms_p50": 10.0, "weight_bytes": 500_000_000}


def ratio_budget(text: str = "latency:0.3x"):
    return parse_budget(*text.split(":")).resolve(RATIO_BASELINE)


@pytest.mark.parametrize("budget, row, verdict", [
    ("latency:0.3x", {"decode_ms_p50": 3.1, "decode_ratio": 0.29, "decode_interval": [0.28, 0.31]}, "undecided"),
    ("latency:0.3x", {"decode_ms_p50": 3.1, "decode_ratio": 0.31, "decode_interval": [0.30, 0.33]}, "undecided"),
    ("latency:0.3x", {"decode_ms_p50": 3.1, "decode_ratio": 0.29, "decode_interval": [0.26, 0.30]}, "meets"),
    ("latency:0.3x", {"decode_ms_p50": 2.0, "decode_ratio": 0.32, "decode_interval": [0.31, 0.33]}, "over"),
    ("latency:0.3x", {"decode_ms_p50": 3.1, "decode_ratio": 0.30}, "meets"),  # no interval: the point, at the budget
    ("latency:0.3x", {"decode_ms_p50": 2.0, "decode_ratio": 0.31}, "over"),
    ("latency:0.3x", {"decode_ms_p50": 2.0, "decode_ratio": 0.31, "decode_interval": []}, "over"),
    ("latency:0.3x", {"decode_ms_p50": 3.0}, "meets"),  # no ratio: the ms against the resolved 3 ms
    ("latency:0.3x", {"decode_ms_p50": 2.0, "decode_ratio": 0.29, "prefill_interval": [0.28, 0.31]}, "meets"),
    ("latency:3ms", {"decode_ms_p50": 3.1, "decode_ratio": 0.29, "decode_interval": [0.28, 0.31]}, "over"),  # ms
    ("prefill:0.5x", {"prefill_ms_p50": 9.0, "prefill_ratio": 0.45, "prefill_interval": [0.4, 0.6],
                      "decode_interval": [0.1, 0.2]}, "undecided"),
    ("memory:0.5x", {"weight_bytes": 250_000_000, "decode_ratio": 0.5, "decode_interval": [0.4, 0.6]}, "meets"),
])
def test_a_budget_verdict_is_undecided_only_where_its_ratio_interval_straddles_it(budget, row, verdict):
    assert ratio_budget(budget).verdict(row) == verdict


def paired(low: float, high: float):
    from evaluators.paired import PairedRatio

    return PairedRatio((low + high) / 2, low, high, 48)


@pytest.mark.parametrize("budgets, intervals, unclear_now", [
    (["latency:0.3x"], {"decode_ratio": (0.28, 0.31)}, True),
    (["latency:0.3x"], {"decode_ratio": (0.30, 0.33)}, True),  # from the budget up: still open
    (["latency:0.3x"], {"decode_ratio": (0.26, 0.30)}, False),  # up to the budget: clearly within it
    (["latency:0.3x"], {"decode_ratio": (0.31, 0.33)}, False),  # clearly over
    (["latency:0.3x"], {"prefill_ratio": (0.28, 0.31)}, False),  # another figure's interval
    (["latency:3ms"], {"decode_ratio": (0.28, 0.31)}, False),  # an absolute budget is judged on the ms
    (["memory:0.5x"], {"decode_ratio": (0.4, 0.6)}, False),
    (["latency:0.3x", "prefill:0.5x"], {"decode_ratio": (0.2, 0.25), "prefill_ratio": (0.4, 0.6)}, True),
    ([], {"decode_ratio": (0.28, 0.31)}, False),
])
def test_a_target_times_longer_while_a_ratio_interval_straddles_a_budget(lab, budgets, intervals, unclear_now):
    from planner.budgets import unclear

    parsed = [ratio_budget(b) for b in budgets]
    given = {name: paired(*bounds) for name, bounds in intervals.items()}
    assert unclear(parsed)(given) is unclear_now
    bench = replace(lab.bench(), budgets=parsed)
    assert bench.request().unclear(given) is unclear_now  # the rule a workbench hands its target
    assert bench.request(may_skip=False).unclear(given) is unclear_now


@pytest.mark.parametrize("row, undecided, constraints", [
    ({"decode_ms_p50": 3.1, "decode_ratio": 0.29, "decode_interval": [0.28, 0.31], "prefill_ms_p50": 9.0,
      "prefill_ratio": 0.45, "prefill_interval": [0.4, 0.6], "weight_bytes": 100},
     ["latency", "prefill"], {"latency": 0.29 / 0.3 - 1, "prefill": 0.45 / 0.5 - 1, "memory": 100 / 1e9 - 1}),
    ({"decode_ms_p50": 3.1, "decode_ratio": 0.29, "decode_interval": [0.26, 0.30], "prefill_ms_p50": 9.0,
      "prefill_ratio": 0.45, "weight_bytes": 100}, None, {"latency": 0.29 / 0.3 - 1, "prefill": 0.45 / 0.5 - 1,
                                                           "memory": 100 / 1e9 - 1}),
    # the budget's own figure not measured: violated, never undecided, whatever intervals the row holds
    ({"decode_ratio": 0.29, "decode_interval": [0.28, 0.31], "prefill_ms_p50": 9.0, "prefill_ratio": 0.45,
      "prefill_interval": [0.40, 0.5], "weight_bytes": 100}, None,
     {"latency": 1.0, "prefill": 0.45 / 0.5 - 1, "memory": 100 / 1e9 - 1}),
])
def test_a_trial_records_the_budgets_its_intervals_leave_undecided(row, undecided, constraints):
    from planner.trial import constrain

    trial = RecordingTrial()
    budgets = [ratio_budget("latency:0.3x"), ratio_budget("prefill:0.5x"), ratio_budget("memory:1GB")]
    assert constrain(trial, budgets, row) is (constraints["latency"] <= 0)
    assert trial.constraints == pytest.approx(constraints)
    assert trial.user_attrs.get("undecided") == undecided
    assert set(trial.user_attrs) <= {"undecided"}


UNDECIDED = {"undecided": ["latency"]}

UNDECIDED_CASES = {
    # trial 1 would dominate trial 0, but its interval straddles the budget: both shown, the clear one recommended
    "clear one recommended": ([("ok", (10, 10, 100)), ("ok", (9, 9, 90), -0.5, UNDECIDED)], [1, 0], 0),
    "only undecided: the best of them": ([("ok", (10, 10, 100), -0.5, UNDECIDED), ("ok", (9, 12, 100), -0.5, UNDECIDED),
                                          ("ok", (11, 12, 100), -0.5, UNDECIDED)], [1, 0], 1),
    "undecided and dominated: out": ([("ok", (9, 9, 90)), ("ok", (10, 10, 100), -0.5, UNDECIDED)], [0], 0),
    "an empty mark is no mark": ([("ok", (10, 10, 100)), ("ok", (9, 9, 90), -0.5, {"undecided": []})], [1], 1),
    "ties by number": ([("ok", (10, 10, 100), -0.5, UNDECIDED), ("ok", (10, 9, 110)), ("ok", (10, 8, 120))],
                       [0, 1, 2], 1),
    "clear front among themselves": ([("ok", (10, 10, 100)), ("ok", (11, 9, 100)), ("ok", (12, 12, 120)),
                                      ("ok", (8, 8, 80), -0.5, UNDECIDED)], [3, 0, 1], 0),
}


@pytest.mark.parametrize("specs, front, recommended", UNDECIDED_CASES.values(), ids=UNDECIDED_CASES.keys())
def test_an_undecided_candidate_is_never_recommended_over_a_clear_one(specs, front, recommended):
    outcome = decide(study_of(*specs), [], BASELINE)
    assert numbers(outcome.front) == front
    assert outcome.recommended.number == recommended and outcome.closest == []


def confirmed(**verdicts_by_trial):
    """The study's confirmations (planner.confirm): trial number -> its re-timing's verdicts, or a failure."""
    return {"confirmations": {number[1:]: ({"failure": "RuntimeError: no"} if verdicts == "failed" else
                                           {"verdicts": verdicts, "ratio": 0.29})
                              for number, verdicts in verdicts_by_trial.items()}}


CONFIRMED_CASES = {
    # trial 1 was undecided; re-timed, it clearly meets the budget: no longer in doubt, recommended
    "a re-timing that meets clears it": ([("ok", (10, 10, 100)), ("ok", (9, 9, 90), -0.5, UNDECIDED)],
                                         confirmed(t1={"latency": "meets"}), [1], 1, set()),
    # trial 1 was clear from its interval; re-timed, it did not hold: in doubt, the clear trial 0 recommended
    "a re-timing over the budget puts it in doubt": ([("ok", (10, 10, 100)), ("ok", (9, 9, 90))],
                                                     confirmed(t1={"latency": "over"}), [1, 0], 0, {1}),
    "every budget must be met": ([("ok", (10, 10, 100)), ("ok", (9, 9, 90), -0.5, UNDECIDED)],
                                 confirmed(t1={"latency": "meets", "prefill": "undecided"}), [1, 0], 0, {1}),
    # a re-timing that failed says nothing: the trial's own mark stands
    "a failed re-timing leaves the mark": ([("ok", (10, 10, 100)), ("ok", (9, 9, 90), -0.5, UNDECIDED)],
                                           confirmed(t1="failed"), [1, 0], 0, {1}),
    "a failed re-timing of a clear one": ([("ok", (10, 10, 100)), ("ok", (9, 9, 90))], confirmed(t1="failed"),
                                          [1], 1, set()),
    "another trial's re-timing": ([("ok", (10, 10, 100)), ("ok", (9, 9, 90), -0.5, UNDECIDED)],
                                  confirmed(t0={"latency": "meets"}), [1, 0], 0, {1}),
}


@pytest.mark.parametrize("specs, attrs, front, recommended, doubtful", CONFIRMED_CASES.values(),
                         ids=CONFIRMED_CASES.keys())
def test_a_confirmation_decides_whether_a_candidate_is_in_doubt(specs, attrs, front, recommended, doubtful):
    outcome = decide(study_of(*specs, user_attrs=attrs), [], BASELINE)
    assert numbers(outcome.front) == front and outcome.recommended.number == recommended
    assert outcome.doubtful == doubtful


def test_the_doubtful_are_the_measured_candidates_in_doubt():
    specs = [("ok", (10, 10, 100), -0.5, UNDECIDED), ("ok", (12, 12, 120), -0.5, UNDECIDED),  # dominated: still
             ("ok", (9, 9, 90), 0.5, UNDECIDED), ("rejected", (2000, 10, 60), -0.5, UNDECIDED), ("ok", (11, 8, 100))]
    outcome = decide(study_of(*specs), [], BASELINE)
    assert outcome.doubtful == {0, 1} and numbers(outcome.front) == [0, 4] and outcome.recommended.number == 4
