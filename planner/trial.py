"""One trial of a study: sample a candidate, judge it from its spec, build it, measure it, report its objectives
and budgets to Optuna, and store every figure on the trial. Cheap checks run before expensive ones."""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field, replace

import optuna

from evaluators.kl import ReferenceDistributions
from evaluators.memory import release_freed_memory
from evaluators.scoring import ScoringSetup
from planner import candidates
from planner import objectives as objective_registry
from planner import deadline, rungs, workers
from planner import budgets as budget_rules
from planner.budgets import Budget, of_kind
from planner.errors import first_line
from planner.recipes import Stage, plain_stages
from planner.settings import StudySettings
from search_spaces import BuildContext
from search_spaces.compute import float32_compute
from targets import TRANSFORMERS, Measured, Request, Target
from targets.figures import metrics_row
from targets.transformers_target import measure_torch

# What a trial that reuses a measured twin copies from it.
TWIN_ATTRS = ("metrics", "measurements", "estimated_weight_bytes", "rejected", "skipped_perplexity", "screened")
# A candidate this far over a latency budget is not worth its perplexity run.
LATENCY_SKIP_FACTOR = 1.5


@dataclass(frozen=True)
class CandidateSteps:
    """How a trial turns parameters into a built candidate (planner.candidates by default). A field of the
    workbench, so a benchmark replay or a test passes its own steps instead of patching modules."""

    suggest_stages: object = candidates.suggest_stages
    describe: object = candidates.describe
    shaped_model: object = candidates.shaped_model
    storage_notes: object = candidates.storage_notes
    estimate_weight_bytes: object = candidates.estimate_weight_bytes
    aim: object = candidates.aim
    build: object = candidates.build


DEFAULT_STEPS = CandidateSteps()


@dataclass
class Workbench:
    """What every trial shares: the source model, its tokenizer and corpus, the build context, the baseline."""

    settings: StudySettings
    model: object
    tokenizer: object
    corpus: object
    context: BuildContext
    spaces: dict
    budgets: list[Budget]
    baseline: dict
    model_hash: str = ""  # sha256 over the source model's weight files
    reference: ReferenceDistributions | None = None  # the base model's next-token distributions (kl)
    objectives: tuple[str, ...] = field(default=objective_registry.DEFAULT)
    target: Target = TRANSFORMERS  # where candidates ship and are measured (targets/)
    steps: CandidateSteps = field(default_factory=lambda: DEFAULT_STEPS)  # read when the workbench is made

    def evaluators(self) -> set[str]:
        needed = objective_registry.evaluators_for(self.objectives)
        if any(b.kind in ("latency", "prefill") for b in self.budgets):
            needed.add("latency")
        return needed

    def request(self, may_skip: bool = True) -> Request:
        """What the target is asked to measure: protocols, held-out text, scorers, and the skip rule (never for
        the baseline: every figure of the reference is measured)."""
        needed = self.evaluators()
        setup = ScoringSetup(self.reference, str(self.context.device))
        return Request(self.model, self.tokenizer, self.corpus.eval, self.settings.perplexity_protocol(),
                       budget_rules.with_prefills(self.settings.latency_protocol(), self.budgets), frozenset(needed),
                       objective_registry.scorers(needed, setup), self.context.device,
                       (lambda row: hopeless(self.budgets, row)) if may_skip else (lambda row: None),
                       unclear=budget_rules.unclear(self.budgets))


def _release(built: candidates.BuiltCandidate) -> None:
    """The built candidate freed once its artifact is written, and the heap's free pages handed back: the runtime
    maps the candidate's and the reference's files next, and they must stay in memory while timed."""
    built.model = None
    release_freed_memory()


def hopeless(budgets: list[Budget], row: dict) -> str | None:
    """Why scoring a candidate is not worth it: a latency figure more than LATENCY_SKIP_FACTOR over its budget."""
    budget = next((b for b in budgets if b.kind in ("latency", "prefill") and b.limit is not None
                   and b.metric in row and b.violation(row) > LATENCY_SKIP_FACTOR - 1), None)
    if budget is None:
        return None
    figure = (f"{row[budget.ratio_metric]:.2f}x the reference" if budget.uses_ratio(row)
              else f"{row[budget.metric]:.2f} ms")
    return f"{budget.kind} {figure} is over {LATENCY_SKIP_FACTOR}x the budget"


def measure(bench: Workbench, model, stages: list[Stage], trial=None, label: str | None = None) -> tuple[dict, dict]:
    """(metrics row, full evaluator dicts) of a built model as the study's target serves it (targets/); on
    `trial`, why scoring was skipped. `model` may be a BuiltCandidate: its model is then handed over, and the
    target may free it once written as its artifact (`Request.release`)."""
    request = bench.request(may_skip=trial is not None)
    handed_over = isinstance(model, candidates.BuiltCandidate)
    if handed_over:
        request.release = lambda: _release(model)
    # no local name holds a handed-over model: once released, only the target's frame had it
    measured: Measured = bench.target.measure(request, model.model if handed_over else model,
                                              label or bench.steps.describe(stages))
    if measured.skipped and trial is not None:
        trial.set_user_attr("skipped_perplexity", measured.skipped)
    return measured.row, measured.details


# A candidate whose stages before the last (a student, a pruned cut) already score this many times the best
# measured candidate's accuracy figure, in float, is not quantized, written or timed: quantizing it will not
# bring it back (it only adds error), and those are the minutes of a trial.
SCREEN_FACTOR = 2.0


def best_accuracy(study: optuna.Study, name: str) -> float | None:
    """The best measured value of accuracy objective `name` among the study's complete, measured trials."""
    objective = objective_registry.OBJECTIVES[name]
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    values = [t.user_attrs["metrics"][name] for t in complete if name in t.user_attrs.get("metrics", {})]
    return min(values, key=objective.minimised) if values else None


# Trial attribute: the float figures of the model its stages before the last made, as the screen scored them. A
# later candidate on the same stages before the last (a repeat on a cached student or cut) is judged on them
# instead of scoring the same model again (half a minute a repeat at 1.24 B).
UPSTREAM_FIGURES = "upstream_float"


def upstream_figure(study: optuna.Study, upstream: list[dict], name: str) -> float | None:
    """Figure `name` of the model that stored stages `upstream` make, as an earlier trial's screen scored it."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        figures = trial.user_attrs.get(UPSTREAM_FIGURES) or trial.user_attrs.get("screened", {}).get("float") or {}
        if name in figures and trial.user_attrs.get("stages", [])[:-1] == upstream:
            return figures[name]
    return None


@dataclass
class Screen:
    """The rule `candidates.build` judges a candidate by before its last stage: its float accuracy figure `name`
    (the study's first accuracy objective, scored in torch over the same held-out windows, or `known` from an
    earlier trial on the same stages before the last) against SCREEN_FACTOR x the `best` measured one. After a
    call, `figures` holds the figure it judged by."""

    bench: Workbench
    name: str
    best: float
    known: float | None
    figures: dict = field(default_factory=dict)

    def __call__(self, model) -> tuple[str, dict] | None:
        value = self.known
        if value is None:
            needed = {objective_registry.OBJECTIVES[self.name].evaluator}
            request = replace(self.bench.request(may_skip=False), evaluators=frozenset(needed),
                              scorers=objective_registry.scorers(
                                  needed, ScoringSetup(self.bench.reference, str(self.bench.context.device))))
            with float32_compute(model):  # the planner's own figure, not the deployment's: computed fast and exact
                value = measure_torch(request, model, "screen").row[self.name]
        self.figures = {self.name: value}
        if value <= SCREEN_FACTOR * self.best:
            return None
        shown = objective_registry.OBJECTIVES[self.name].shown
        return (f"{self.name} {shown(value)} in float before its last stage, over {SCREEN_FACTOR:g}x the best "
                f"measured ({shown(self.best)}): not quantized or measured", self.figures)


def screen(bench: Workbench, study: optuna.Study, upstream: list[dict]) -> Screen | None:
    """The screen of a candidate whose stored stages before the last are `upstream`; None when nothing is measured
    yet (nothing to compare against)."""
    accuracy = objective_registry.accuracy_objectives(bench.objectives)
    name = accuracy[0] if accuracy else None
    best = None if name is None else best_accuracy(study, name)
    if best is None or objective_registry.OBJECTIVES[name].direction != objective_registry.MINIMIZE or best <= 0:
        return None
    return Screen(bench, name, best, upstream_figure(study, upstream, name))


def measure_baseline(bench: Workbench) -> tuple[dict, dict]:
    """The uncompressed model's figures, after the target's own preparation (its reference, a warm-up)."""
    bench.target.prepare(bench.request())
    return measure(bench, bench.model, [])


def measure_stock(bench: Workbench, name: str) -> dict:
    """The target's stock setting `name` (a study's `compare`) applied to the source model and measured as every
    candidate is: {"label", "metrics", "measurements"}, or {"label", "failure"} when it cannot be made."""
    label = f"{bench.target.name} {name}"
    try:
        measured = bench.target.measure_stock(bench.request(may_skip=False), name, bench.context)
    except Exception as exc:  # recorded and shown, as a failed trial is; the study goes on
        return {"label": label, "failure": f"{type(exc).__name__}: {first_line(exc, 500)}"}
    finally:
        release_memory()
    return {"label": measured.row.get("stages", label), "metrics": measured.row, "measurements": measured.details}


def constrain(trial, budgets: list[Budget], row: dict) -> bool:
    """Report each budget to Optuna as a constraint (<= 0: met); a figure that was not measured counts as
    violated. True when every budget is met."""
    feasible = True
    undecided = []
    for budget in budgets:
        value = budget.violation(row) if budget.metric in row else 1.0
        trial.set_constraint(budget.kind, value)
        feasible = feasible and value <= 0
        if budget.metric in row and budget.verdict(row) == budget_rules.UNDECIDED:
            undecided.append(budget.kind)
    if undecided:  # its interval straddles the budget even after timing longer: never recommended over a clear one
        trial.set_user_attr("undecided", undecided)
    return feasible


def measured_twin(study: optuna.Study, stages: list) -> optuna.trial.FrozenTrial | None:
    """A complete trial of the very same candidate (samplers do propose a point twice)."""
    for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if (other.user_attrs.get("stages") == stages and "metrics" in other.user_attrs
                and workers.NOT_STARTED not in other.user_attrs):  # not started then; a later deadline may allow it
            return other
    return None


def over_memory_budget(budgets: list[Budget], estimate: int) -> bool:
    memory = of_kind(budgets, "memory")
    return memory is not None and estimate > memory.limit


def objective(bench: Workbench):
    def run(trial: optuna.Trial) -> tuple[float, ...]:
        try:
            return run_trial(trial)
        except Exception as exc:
            # Optuna marks the trial failed and the study goes on; the reason stays readable on the trial.
            trial.set_user_attr("failure", f"{type(exc).__name__}: {first_line(exc, 500)}")
            # Without its traceback the exception no longer holds the frames (and a half-built model).
            failure = exc.with_traceback(None)
        finally:
            release_memory()  # every trial: the next one starts from the model alone
        raise failure

    def finish(trial, started: float, row: dict, seconds: dict | None = None) -> tuple[float, ...]:
        trial.set_user_attr("metrics", row)
        constrain(trial, bench.budgets, row)
        trial.set_user_attr("seconds", {**(seconds or {}), "total": time.perf_counter() - started})
        return objective_registry.values(bench.objectives, row, bench.baseline)

    def run_trial(trial: optuna.Trial) -> tuple[float, ...]:
        started = time.perf_counter()
        steps = bench.steps
        stages = rungs.assign(trial.study, steps.suggest_stages(trial, bench.spaces), bench.spaces)
        shaped = steps.shaped_model(bench.model, stages)
        memory = of_kind(bench.budgets, "memory")
        beyond = bench.target.stored_beyond  # e.g. llama.cpp's norms in F32: counted, and left room for
        stages = steps.aim(bench.model, stages, memory and memory.limit, shaped, beyond=beyond)  # e.g. bpw that fills it
        stored_stages = plain_stages(stages)
        trial.set_user_attr("stages", stored_stages)
        notes = steps.storage_notes(bench.model, stages, shaped)
        label = steps.describe(stages, notes)
        trial.set_user_attr("label", label)
        if notes:  # e.g. the layers a requested group size does not fit, and what they use instead
            trial.set_user_attr("storage_notes", notes)
        twin = measured_twin(trial.study, stored_stages)
        if twin is not None:
            for key in TWIN_ATTRS:
                if key in twin.user_attrs:
                    trial.set_user_attr(key, twin.user_attrs[key])
            trial.set_user_attr("duplicate_of", twin.number)
            return finish(trial, started, twin.user_attrs["metrics"])
        estimate = steps.estimate_weight_bytes(bench.model, stages, shaped, beyond=beyond)
        trial.set_user_attr("estimated_weight_bytes", estimate)
        if over_memory_budget(bench.budgets, estimate):
            trial.set_user_attr("rejected", f"weights {estimate / 1e6:.1f} MB from the spec alone; over the budget")
            return finish(trial, started, metrics_row(label, estimate))
        ends = trial.user_attrs.get(workers.DEADLINE_ATTR)  # set by workers.run_trials under a deadline
        late = None if ends is None else deadline.too_late(trial.study, stored_stages, ends - time.time())
        if late:
            trial.set_user_attr(workers.NOT_STARTED, late)
            return finish(trial, started, metrics_row(label, estimate))
        judge = screen(bench, trial.study, stored_stages[:-1]) if len(stages) > 1 else None  # a stage before the last
        try:
            built = steps.build(bench.model, stages, bench.context, screen=judge)
        except candidates.Screened as screened:
            trial.set_user_attr("screened", {"reason": screened.reason, "float": screened.figures})
            if screened.training:
                trial.set_user_attr("training", screened.training)
            return finish(trial, started, metrics_row(label, estimate), screened.seconds)
        if judge is not None and judge.figures:
            trial.set_user_attr(UPSTREAM_FIGURES, judge.figures)
        try:
            measure_started = time.perf_counter()
            row, details = measure(bench, built, stages, trial, label)
            seconds = {**built.stage_seconds, "measure": time.perf_counter() - measure_started}
            if built.training:  # steps trained, resumed from a cached run, seconds: what a rung cost
                trial.set_user_attr("training", built.training)
        finally:
            del built
            gc.collect()
        if not all(math.isfinite(row[name]) for name in objective_registry.OBJECTIVES if name in row):
            raise FloatingPointError(f"non-finite metrics {row}")
        trial.set_user_attr("measurements", details)
        stored = details.get("runtime", {}).get("stored")
        if stored:  # what the target's artifact really holds, read back from it (llama-quant's types per tensor)
            trial.set_user_attr("label", f"{label} [{stored}]")
        return finish(trial, started, row, seconds)

    return run


def release_memory() -> None:
    """Return a trial's memory before the next one: Python objects, the C heap's free pages, CUDA's cached blocks.
    glibc keeps the pages of freed tensors and arrays mapped for reuse: without the trim, a study's resident memory
    after a stage is what that stage held at its peak, and the next stage's peak lands on top of it."""
    release_freed_memory()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
