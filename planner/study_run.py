"""Running a search end to end: load the model once, measure the baseline once per study, seed the study
with hand-picked candidates, run trials until the study's count, and pick the recommended candidate."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from tqdm import tqdm

from evaluators.memory import weight_bytes
from evaluators.perplexity import check_protocol
from planner import assets, workers
from planner.budgets import Budget, of_kind
from planner.candidates import describe, smallest_candidate, starting_points
from planner.errors import Interrupted, PlannerError, SearchStopped
from planner.recipes import Recipe, Stage, save_recipe
from planner.search import OBJECTIVES, Workbench, create_or_load, measure_baseline, objective, resolve_spaces
from planner.settings import SearchSettings, make_settings
from planner.sources import (DataSource, ModelSource, content_hash, load_corpus, load_model, resolve_device,
                             resolve_dtype)
from search_spaces import TECHNIQUES, BuildContext


@dataclass
class SearchOutcome:
    study: optuna.Study
    budgets: list[Budget]
    baseline: dict
    front: list[optuna.trial.FrozenTrial]
    recommended: optuna.trial.FrozenTrial | None
    closest: list[optuna.trial.FrozenTrial]


def prepare(settings: SearchSettings, study: optuna.Study | None = None, verbose: bool = False) -> Workbench:
    """Load the model, corpus and spaces, check that the memory budget can be met at all, and (with a study)
    take the study's baseline, measuring it the first time."""
    budgets = settings.budgets()
    model_source, data_source = ModelSource.parse(settings.model), DataSource.parse(settings.data)
    device = resolve_device(settings.device)
    corpus = load_corpus(data_source)
    model, tokenizer = load_model(model_source, device, resolve_dtype(settings.dtype, device),
                                  settings.trust_remote_code)
    model_hash = content_hash(model_source)
    spaces = resolve_spaces(settings, model)
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, device=device, seed=settings.seed,
                           cache_dir=assets.cache_root() / "students", model_id=f"{settings.model}@{model_hash}",
                           progress=verbose)
    bench = Workbench(settings, model, tokenizer, corpus, context, spaces, budgets, baseline={}, model_hash=model_hash)
    try:
        check_protocol(model, tokenizer, corpus.eval, settings.perplexity_protocol())
    except ValueError as exc:  # CorpusError included
        raise PlannerError(f"perplexity protocol: {exc}") from None
    _require_a_fitting_candidate(bench)
    if study is not None:
        join(bench, study)
    return bench


def join(bench: Workbench, study: optuna.Study) -> None:
    """Check the study is for this model, then take (or measure) its baseline and resolve the budgets."""
    stored = study.user_attrs.get("model")
    if stored and stored != {"source": bench.settings.model, "content_hash": bench.model_hash}:
        raise PlannerError(f"study '{bench.settings.study}' was made for model {stored['source']} "
                           f"({stored['content_hash'][:19]}...), not {bench.settings.model}")
    bench.baseline = study.user_attrs.get("baseline") or _measure_baseline(bench, study)
    bench.budgets = [b.resolve(bench.baseline) for b in bench.budgets]
    study.set_user_attr("budgets", [b.to_dict() for b in bench.budgets])


def _require_a_fitting_candidate(bench: Workbench) -> None:
    """A memory budget that no candidate of the space can meet is refused before anything runs or is stored."""
    memory = of_kind(bench.budgets, "memory")
    if memory is None:
        return
    limit = memory.resolve({"weight_bytes": weight_bytes(bench.model).total_bytes}).limit
    size, stages = smallest_candidate(bench.model, bench.spaces)
    if size > limit:
        raise PlannerError(f"no candidate of the search space fits the memory budget of {limit / 1e6:.1f} MB: "
                           f"the smallest, {describe(stages)}, stores {size / 1e6:.1f} MB "
                           "(raise the budget or widen the space: fewer bits, smaller keep ratios)")


def _measure_baseline(bench: Workbench, study: optuna.Study) -> dict:
    tqdm.write("planner: measuring the uncompressed model (the baseline)")
    row, details = measure_baseline(bench)
    study.set_user_attr("model", {"source": bench.settings.model, "content_hash": bench.model_hash})
    study.set_user_attr("baseline", row)
    study.set_user_attr("baseline_measurements", details)
    return row


def finished(study: optuna.Study) -> int:
    return sum(workers.finished(t) for t in study.get_trials(deepcopy=False))


def trial_line(trial: optuna.trial.FrozenTrial, total: int) -> str:
    row = trial.user_attrs.get("metrics", {})
    label = trial.user_attrs.get("label", "?")
    if trial.state == optuna.trial.TrialState.FAIL:
        reason = trial.user_attrs.get("failure") or trial.user_attrs.get("interrupted", "unknown")
        return f"trial {trial.number:>3}/{total} FAILED  {label}: {reason}"
    feasible = all(v <= 0 for v in trial.constraints.values())
    ppl = f"ppl {row['perplexity']:7.2f}" if "perplexity" in row else "ppl    n/a "
    decode = f"decode {row['decode_ms_p50']:6.1f} ms" if "decode_ms_p50" in row else "decode    n/a  "
    seconds = trial.user_attrs.get("seconds", {}).get("total", 0.0)
    note = (trial.user_attrs.get("rejected") or trial.user_attrs.get("skipped_perplexity")
            or (f"same candidate as trial {trial.user_attrs['duplicate_of']}" if "duplicate_of" in trial.user_attrs
                else ""))
    return (f"trial {trial.number:>3}/{total} {'ok  ' if feasible else 'over'} {ppl}  {decode}  "
            f"{row.get('weight_mb', 0):7.1f} MB  {seconds:5.1f} s  {label}" + (f"  ({note})" if note else ""))


def open_study(settings: SearchSettings, verbose: bool = False) -> tuple[optuna.Study, Workbench]:
    """Create or continue the study: baseline measured once, hand-picked candidates queued once, and the
    settings stored so that `planner worker` processes can join with nothing but the storage URL."""
    bench = prepare(settings, verbose=verbose)  # bad input fails here, before the study is created
    study = create_or_load(settings)
    join(bench, study)
    if not study.get_trials(deepcopy=False):
        memory = of_kind(bench.budgets, "memory")
        for params in starting_points(bench.model, bench.spaces, memory and memory.limit, settings.trials):
            study.enqueue_trial(params, skip_if_exists=True)
    study.set_user_attr("settings", stored_settings(settings))
    return study, bench


def stored_settings(settings: SearchSettings) -> dict:
    # The storage URL stays out: it may hold a password, and workers are given it anyway.
    return {k: v for k, v in settings.to_dict().items() if k != "storage"}


def settings_of(study: optuna.Study, storage: str, overrides: dict) -> SearchSettings:
    """The settings a study was created with, for a worker joining it (its own flags override them)."""
    stored = study.user_attrs.get("settings")
    if not stored:
        raise PlannerError(f"study '{study.study_name}' was not created by planner (no stored settings); "
                           "create it with `planner create` or `planner search`")
    return make_settings(stored, {**overrides, "storage": storage})


def run_study(study: optuna.Study, bench: Workbench, quiet: bool = False) -> SearchOutcome:
    """Run trials here until the study holds its count (shared with any other worker), then the outcome."""
    settings = bench.settings
    if finished(study) < settings.trials:
        # A bar only on a terminal: in logs it is noise, and the per-trial lines say the same.
        bar = tqdm(total=settings.trials, initial=finished(study), desc="trials", unit="trial",
                   disable=quiet or not sys.stderr.isatty(), leave=False)

        def report(study_, trial):
            bar.update(1)
            if not quiet:
                tqdm.write(trial_line(trial, settings.trials))

        started = time.perf_counter()
        try:
            result = workers.run_trials(study, objective(bench), settings.trials, settings.timeout,
                                        callbacks=(report,), say=tqdm.write)
        except KeyboardInterrupt:
            bar.close()
            raise Interrupted(f"interrupted: {finished(study)} finished trials are saved in study "
                              f"'{study.study_name}'; the trial in progress will run again when you rerun "
                              "the same command") from None
        bar.close()
        if not quiet:
            tqdm.write(f"planner: {finished(study)} trials in the study ({time.perf_counter() - started:.0f} s, "
                       f"{result.ran} trial(s) run by this process)")
        if result.failed_in_a_row >= workers.MAX_CONSECUTIVE_FAILURES:
            raise SearchStopped(f"stopped: the last {result.failed_in_a_row} trials all failed "
                               f"(last: {result.last_failure}); see `planner review` for each trial's reason")
    return outcome(study, bench.budgets, bench.baseline)


def run_search(settings: SearchSettings, verbose: bool = False, quiet: bool = False) -> SearchOutcome:
    study, bench = open_study(settings, verbose)
    return run_study(study, bench, quiet)


def measured(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == optuna.trial.TrialState.COMPLETE and "perplexity" in trial.user_attrs.get("metrics", {})


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def outcome(study: optuna.Study, budgets: list[Budget], baseline: dict) -> SearchOutcome:
    trials = [t for t in study.get_trials(deepcopy=False) if measured(t)]
    good = [t for t in trials if feasible(t) and "duplicate_of" not in t.user_attrs]  # a twin shows once
    front = [t for t in good if not any(_dominates(o, t) for o in good)]
    front.sort(key=lambda t: t.values[0])
    recommended = front[0] if front else None
    # Closest: from every trial with figures, measured in full or not (a latency miss skips perplexity).
    sized = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
             if "metrics" in t.user_attrs]
    closest = [] if recommended else sorted(sized, key=lambda t: sum(max(v, 0) for v in t.constraints.values()))[:3]
    return SearchOutcome(study, budgets, baseline, front, recommended, closest)


def best_trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """For each objective, the measured trial that minimises it (feasible or not: the user sees both)."""
    trials = [t for t in study.get_trials(deepcopy=False) if measured(t)]
    return {name: min(trials, key=lambda t, i=i: t.values[i]) for i, name in enumerate(OBJECTIVES)} if trials else {}


def _dominates(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    return all(x <= y for x, y in zip(a.values, b.values)) and any(x < y for x, y in zip(a.values, b.values))


def recipe_for(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> Recipe:
    """The recipe of a measured trial, from what the study stored (no model needed)."""
    import torch
    import transformers

    import planner

    model = study.user_attrs.get("model")
    if not model:
        raise PlannerError(f"study '{study.study_name}' has no baseline yet (no search has run in it)")
    stages = tuple(Stage(s["technique"], TECHNIQUES[s["technique"]].spec_type.from_dict(s["spec"]))
                   for s in trial.user_attrs.get("stages", []))
    settings = study.user_attrs.get("settings", {})
    return Recipe(
        model_source=model["source"],
        model_hash=model["content_hash"],
        stages=stages,
        budget=tuple(study.user_attrs.get("budgets", [])),
        metrics={"summary": trial.user_attrs.get("metrics", {}), **trial.user_attrs.get("measurements", {})},
        provenance={
            "study": study.study_name,
            "trial": trial.number,
            "seed": settings.get("seed", 0),
            "data": settings.get("data"),
            "planner": planner.__version__,
            "torch": str(torch.__version__),  # a str subclass that YAML's safe dumper refuses
            "transformers": str(transformers.__version__),
            "optuna": str(optuna.__version__),
        },
    )


def write_recipe(study: optuna.Study, trial: optuna.trial.FrozenTrial, path: Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise PlannerError(f"cannot write {path}: folder {path.parent} does not exist")
    save_recipe(recipe_for(study, trial), path)
    return path


def objectives_of(trial: optuna.trial.FrozenTrial) -> dict:
    return dict(zip(OBJECTIVES, trial.values or ()))
