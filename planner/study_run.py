"""Running a search end to end: load the model once, measure the baseline once per study, seed the study
with hand-picked candidates, run trials until the study's count, and pick the recommended candidate."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from tqdm import tqdm

from planner import assets
from planner.budgets import Budget
from planner.candidates import hand_picked
from planner.errors import PlannerError
from planner.recipes import Recipe, Stage, save_recipe
from planner.search import OBJECTIVES, Workbench, create_or_load, measure, objective, resolve_spaces
from planner.settings import SearchSettings
from planner.sources import (DataSource, ModelSource, content_hash, load_corpus, load_model, resolve_device,
                             resolve_dtype)
from search_spaces import TECHNIQUES, BuildContext

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)


@dataclass
class SearchOutcome:
    study: optuna.Study
    budgets: list[Budget]
    baseline: dict
    front: list[optuna.trial.FrozenTrial]
    recommended: optuna.trial.FrozenTrial | None
    closest: list[optuna.trial.FrozenTrial]


def prepare(settings: SearchSettings, study: optuna.Study, verbose: bool = False) -> Workbench:
    budgets = settings.budgets()
    model_source, data_source = ModelSource.parse(settings.model), DataSource.parse(settings.data)
    device = resolve_device(settings.device)
    corpus = load_corpus(data_source)
    model, tokenizer = load_model(model_source, device, resolve_dtype(settings.dtype, device),
                                  settings.trust_remote_code)
    model_hash = content_hash(model_source)
    stored = study.user_attrs.get("model")
    if stored and stored != {"source": settings.model, "content_hash": model_hash}:
        raise PlannerError(f"study '{settings.study}' was made for model {stored['source']} "
                           f"({stored['content_hash'][:19]}...), not {settings.model}")
    spaces = resolve_spaces(settings, model)
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, device=device, seed=settings.seed,
                           cache_dir=assets.cache_root() / "students", model_id=f"{settings.model}@{model_hash}",
                           progress=verbose)
    bench = Workbench(settings, model, tokenizer, corpus, context, spaces, budgets, baseline={})
    bench.baseline = study.user_attrs.get("baseline") or _measure_baseline(bench, study, model_hash)
    bench.budgets = [b.resolve(bench.baseline) for b in budgets]
    study.set_user_attr("budgets", [b.to_dict() for b in bench.budgets])
    return bench


def _measure_baseline(bench: Workbench, study: optuna.Study, model_hash: str) -> dict:
    tqdm.write("planner: measuring the uncompressed model (the baseline)")
    row, details = measure(bench, bench.model, [])
    study.set_user_attr("model", {"source": bench.settings.model, "content_hash": model_hash})
    study.set_user_attr("baseline", row)
    study.set_user_attr("baseline_measurements", details)
    study.set_user_attr("settings", {k: v for k, v in bench.settings.to_dict().items() if k != "storage"})
    return row


def finished(study: optuna.Study) -> int:
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))


def trial_line(trial: optuna.trial.FrozenTrial, total: int) -> str:
    row = trial.user_attrs.get("metrics", {})
    label = trial.user_attrs.get("label", "?")
    if trial.state == optuna.trial.TrialState.FAIL:
        return f"trial {trial.number:>3}/{total} FAILED  {label}: {trial.user_attrs.get('failure', 'unknown')}"
    feasible = all(v <= 0 for v in trial.constraints.values())
    ppl = f"ppl {row['perplexity']:7.2f}" if "perplexity" in row else "ppl    n/a "
    decode = f"decode {row['decode_ms_p50']:6.1f} ms" if "decode_ms_p50" in row else "decode    n/a  "
    seconds = trial.user_attrs.get("seconds", {}).get("total", 0.0)
    note = trial.user_attrs.get("rejected") or trial.user_attrs.get("skipped_perplexity") or ""
    return (f"trial {trial.number:>3}/{total} {'ok  ' if feasible else 'over'} {ppl}  {decode}  "
            f"{row.get('weight_mb', 0):7.1f} MB  {seconds:5.1f} s  {label}" + (f"  ({note})" if note else ""))


def run_search(settings: SearchSettings, verbose: bool = False, quiet: bool = False) -> SearchOutcome:
    study = create_or_load(settings)
    bench = prepare(settings, study, verbose)
    if not study.get_trials(deepcopy=False):
        for params in hand_picked(bench.spaces):
            study.enqueue_trial(params, skip_if_exists=True)
    remaining = settings.trials - finished(study)
    if remaining > 0:
        # A bar only on a terminal: in logs it is noise, and the per-trial lines say the same.
        bar = tqdm(total=remaining, desc="trials", unit="trial", disable=quiet or not sys.stderr.isatty(), leave=False)

        def report(study_, trial):
            bar.update(1)
            if not quiet:
                tqdm.write(trial_line(trial, settings.trials))

        started = time.perf_counter()
        try:
            study.optimize(objective(bench), n_trials=remaining, timeout=settings.timeout, catch=(Exception,),
                           callbacks=[report], gc_after_trial=True)
        finally:
            bar.close()
        if not quiet:
            tqdm.write(f"planner: {finished(study)} trials in the study ({time.perf_counter() - started:.0f} s this run)")
    return outcome(study, bench.budgets, bench.baseline)


def measured(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == optuna.trial.TrialState.COMPLETE and "perplexity" in trial.user_attrs.get("metrics", {})


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def outcome(study: optuna.Study, budgets: list[Budget], baseline: dict) -> SearchOutcome:
    trials = [t for t in study.get_trials(deepcopy=False) if measured(t)]
    good = [t for t in trials if feasible(t)]
    front = [t for t in good if not any(_dominates(o, t) for o in good)]
    front.sort(key=lambda t: t.values[0])
    recommended = front[0] if front else None
    closest = [] if recommended else sorted(trials, key=lambda t: sum(max(v, 0) for v in t.constraints.values()))[:3]
    return SearchOutcome(study, budgets, baseline, front, recommended, closest)


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
