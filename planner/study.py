"""A study's life: open (or create) it in its storage, check it is the same study (model, objectives), measure
the baseline once, seed it with hand-picked candidates, run trials until its count, and decide its outcome.

`planner search` = open_study + run_study; `planner create` = open_study (+ a deadline); `planner worker` =
load_stored + settings_of + join + run_study. Every figure a trial stores comes from `planner.trial`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

import optuna
from tqdm import tqdm

from evaluators.kl import ReferenceDistributions
from evaluators.memory import dtype_name, weight_bytes
from evaluators.perplexity import check_protocol
from evaluators.runtime import model_dtype
from planner import assets, footprint, workers
from planner import objectives as objective_registry
from planner.budgets import Budget, of_kind
from planner.candidates import describe, smallest_candidate, starting_points
from planner.confirm import confirm
from planner.errors import Interrupted, PlannerError, SearchStopped, check_writable
from planner.outcome import Outcome, decide
from planner.report import not_counted, trial_line
from planner.samplers import make_sampler
from planner.settings import StudySettings, make_settings
from planner.sources import (DataSource, ModelSource, content_hash, load_corpus, load_model, model_config,
                             resolve_device, resolve_dtype)
from planner.storage import default_storage_url, open_storage
from planner.trial import Workbench, measure_baseline, measure_stock, objective
from search_spaces import TECHNIQUES, BuildContext, SpecError
from targets import TargetError
from targets import choose as choose_target

def storage_url(settings: StudySettings) -> str:
    return settings.storage or default_storage_url(settings.study)


def check_recipe_path(settings: StudySettings) -> None:
    """The recipe a search will write must be writable before the search runs, not after it. The default
    (studies/<study>-recipe.yaml) lives where default study databases do: that folder is created as for them."""
    path = settings.recipe_path()
    if settings.recipe is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path, "recipe")


def load_stored(study_name: str, storage: str | None) -> optuna.Study:
    """An existing study (never a new one), or one line naming the studies the storage holds."""
    url = storage or default_storage_url(study_name)
    opened = open_storage(url, must_exist=True)
    try:
        return optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(opened)]
        raise PlannerError(f"no study '{study_name}' in {url} (it holds: {', '.join(names) or 'none'})") from None


def check_objectives(study: optuna.Study, objectives: tuple[str, ...]) -> None:
    """A study keeps the objectives it was created with: its stored values would mean something else."""
    stored = tuple(study.metric_names or ())
    if stored and stored != tuple(objectives):
        raise PlannerError(f"study '{study.study_name}' optimises {', '.join(stored)}, not {', '.join(objectives)} "
                           "(use another --study name, or the study's own objectives)")


def check_target(study: optuna.Study, target: str) -> None:
    """A study keeps the target it was created with: its figures were measured in that runtime."""
    stored = study.user_attrs.get("target")
    if stored is not None and stored != target:
        raise PlannerError(f"study '{study.study_name}' measures candidates for target {stored}, not {target} "
                           "(use another --study name, or --target " + stored + ")")


def check_budgets(study: optuna.Study, budgets: list[Budget], baseline: dict) -> None:
    """A study keeps the budgets it was created with: its trials' constraints were judged against them, so a
    new budget would mix two verdicts on one front."""
    stored = study.user_attrs.get("budgets")
    if stored is None or not baseline:
        return
    wanted = [b.resolve(baseline) for b in budgets]
    if [b.to_dict() for b in wanted] != stored:
        had = ", ".join(Budget(**b).describe() for b in stored) or "no budget"
        asked = ", ".join(b.describe() for b in wanted) or "no budget"
        raise PlannerError(f"study '{study.study_name}' was made with {had}, not {asked} "
                           "(use another --study name, or the study's own budget)")


def _existing(settings: StudySettings) -> optuna.Study | None:
    """The study if the storage already holds it; read only, so a refused run leaves the database untouched."""
    try:
        opened = open_storage(storage_url(settings), must_exist=True)
    except PlannerError:  # no database file yet: nothing to check, and nothing created here
        return None
    if settings.study not in {s.study_name for s in optuna.get_all_study_summaries(opened)}:
        return None
    return optuna.load_study(study_name=settings.study, storage=opened)


def resolve_spaces(settings: StudySettings, model, defaults: dict | None = None) -> dict:
    """Each technique's space: defaults (the technique's, then the target's `space_defaults`) narrowed by the
    study file, fitted to the model; None when off."""
    unknown = sorted(set(settings.space) - set(TECHNIQUES))
    if unknown:
        raise PlannerError(f"space.{unknown[0]}: unknown technique (known: {', '.join(sorted(TECHNIQUES))})")
    spaces = {}
    for name, technique in TECHNIQUES.items():
        given = settings.space.get(name, {})
        if given is False:
            spaces[name] = None
            continue
        given = {} if given is True else given
        given = {**(defaults or {}).get(name, {}), **technique.space_defaults_for(given), **given}
        try:
            space = technique.space_type.from_dict(given, f"space.{name}")
        except SpecError as exc:
            raise PlannerError(str(exc)) from None
        spaces[name], reasons = technique.fit(space, model)
        for line in left_out(name, space, spaces[name], reasons):
            tqdm.write(line)
    return spaces


def methods_left_out(target, given: dict, fitted: dict, model=None) -> list[str]:
    """One line per technique and reason whose methods the target left out of its space: what its artifact
    cannot hold, or what the model itself cannot take (`Target.methods_unfit`)."""
    unfit = {} if model is None else target.methods_unfit(model)
    lines = []
    for name, space in given.items():
        kept = fitted.get(name)
        methods, kept_methods = getattr(space, "methods", None), getattr(kept, "methods", None)
        if isinstance(methods, tuple) and isinstance(kept_methods, tuple):
            dropped = [m for m in methods if m not in kept_methods]
            held = [m for m in dropped if m not in unfit]
            if held:
                lines.append(f"planner: space.{name}.methods: {', '.join(held)} left out: the {target.name} "
                             f"target ships {target.artifact}, which cannot hold them")
            lines += [f"planner: space.{name}.methods: {m} left out: {unfit[m]}" for m in dropped if m in unfit]
    return lines


def left_out(name: str, space, fitted, reasons: dict[str, str]) -> list[str]:
    """One line per space field whose choices fitting dropped for this model, saying why where it is known."""
    lines = []
    for field, why in reasons.items():
        given, kept = getattr(space, field, None), getattr(fitted, field, None)
        if isinstance(given, tuple) and isinstance(kept, tuple):
            dropped = [c for c in given if c not in kept]
            if dropped:
                lines.append(f"planner: space.{name}.{field}: {', '.join(map(str, dropped))} left out: {why}")
    return lines


def prepare(settings: StudySettings, study: optuna.Study | None = None, verbose: bool = False) -> Workbench:
    """Load the model, corpus and spaces, check that the memory budget can be met at all, and (with a study)
    take the study's baseline, measuring it the first time."""
    budgets = settings.budgets()
    objectives = settings.objective_names()
    model_source, data_source = ModelSource.parse(settings.model), DataSource.parse(settings.data)
    device = resolve_device(settings.device)
    precision = held_precision(model_source, settings, device)  # a model that cannot fit: refused before any fetch
    corpus = load_corpus(data_source)
    model, tokenizer = load_model(model_source, device, resolve_dtype(precision.dtype, device),
                                  settings.trust_remote_code)
    model_hash = content_hash(model_source)
    try:
        target = choose_target(settings.target, device.type, model, tokenizer)
    except TargetError as exc:
        raise PlannerError(str(exc)) from None
    check_compare(settings.compare_names(), target)
    check_objectives_measured(objectives, target)
    resolved = resolve_spaces(settings, model, target.space_defaults())
    check_grid_ships(resolved, target)
    spaces = target.fit_spaces(resolved, model)
    for line in methods_left_out(target, resolved, spaces, model):
        tqdm.write(line)
    spaces = fit_budget(spaces, memory_limit(budgets, model))
    if not precision.training:
        spaces = footprint.without_training(spaces)
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, device=device, seed=settings.seed,
                           cache_dir=assets.cache_root(), model_id=f"{settings.model}@{model_hash}",
                           progress=verbose)
    bench = Workbench(settings, model, tokenizer, corpus, context, spaces, budgets, baseline={}, model_hash=model_hash,
                      objectives=objectives, target=target)
    try:
        check_protocol(model, tokenizer, corpus.eval, settings.perplexity_protocol())
    except ValueError as exc:  # CorpusError included
        raise PlannerError(f"perplexity protocol: {exc}") from None
    _require_a_fitting_candidate(bench)
    if study is not None:
        join(bench, study)
    return bench


def held_precision(source: ModelSource, settings: StudySettings, device) -> footprint.Precision:
    """The precision the model is held in and whether training fits (footprint.choose_precision, on the CPU: a GPU's
    `auto` is its 16-bit type already, and its memory is not this machine's); its line printed when it is not
    plain float32 with training."""
    if device.type != "cpu":
        return footprint.Precision(settings.dtype, True, None)
    config = model_config(source, settings.trust_remote_code)
    precision = footprint.choose_precision(footprint.parameter_count(config, settings.trust_remote_code),
                                           settings.dtype, footprint.checkpoint_dtype(config),
                                           footprint.available_memory(), source.spec)
    if precision.note:
        tqdm.write(f"planner: {precision.note}")
    return precision


def check_grid_ships(spaces: dict, target) -> None:
    """The quantization space's grid is one the target's artifact can hold (refused before anything runs)."""
    quant = spaces.get("quantization")
    why = quant and target.cannot_store(quant.grid)
    if why:
        raise PlannerError(f"space.quantization.grid: {why}")


def check_objectives_measured(objectives: tuple[str, ...], target) -> None:
    """Every objective is a figure the target produces: scored from its runtime's logits (any target, any
    scorer), or one of the row figures it measures (`Target.figures`). Else the objective would be a constant
    on every trial: refused before the study is created."""
    for name in objectives:
        if objective_registry.OBJECTIVES[name].scorer is None and name not in target.figures:
            raise PlannerError(f"objective {name}: the {target.name} target does not produce that figure (it "
                               f"measures {', '.join(sorted(target.figures))} and scores logits); leave it out "
                               "of --objectives")


def check_compare(names: tuple[str, ...], target) -> None:
    """Every stock setting a study compares against is one its target offers."""
    known = target.stock()
    if names and not known:
        raise PlannerError(f"compare: the {target.name} target has no stock tool to compare against")
    unknown = next((n for n in names if n not in known), None)
    if unknown is not None:
        raise PlannerError(f"compare: '{unknown}' is not one of the {target.name} target's settings "
                           f"({', '.join(known)})")


def measure_comparisons(bench: Workbench, study: optuna.Study) -> None:
    """The stock settings the study compares against, each measured once (a rerun measures only those missing)."""
    stored = dict(study.user_attrs.get("stock", {}))
    for name in bench.settings.compare_names():
        if name in stored:
            continue
        tqdm.write(f"planner: measuring {name} for comparison ({bench.target.stock()[name]})")
        stored[name] = measure_stock(bench, name)
        study.set_user_attr("stock", stored)


def reference_distributions(bench: Workbench) -> ReferenceDistributions:
    """The base model's next-token distributions over the held-out windows, computed once per model, data and
    protocol and kept in the cache (every trial of every study on them compares against the same file)."""
    protocol = bench.settings.perplexity_protocol()
    identity = f"{bench.settings.model}@{bench.model_hash}|{bench.corpus.source}|{bench.context.device}"
    key = hashlib.sha256(json.dumps([identity, protocol.to_dict()], sort_keys=True).encode()).hexdigest()[:32]
    path = assets.cache_root() / "kl" / f"{key}.safetensors"
    if path.is_file():
        try:
            return ReferenceDistributions.load(path, protocol, identity)
        except (OSError, ValueError):
            pass  # a corrupt or stale file is computed again
    tqdm.write("planner: computing the uncompressed model's next-token distributions (for kl)")
    reference = ReferenceDistributions.compute(bench.model, bench.tokenizer, bench.corpus.eval, protocol,
                                               identity=identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    reference.save(path)
    return reference


def join(bench: Workbench, study: optuna.Study) -> None:
    """Check the study is this one (model, objectives), then take (or measure) its baseline and resolve the
    budgets against it."""
    check_objectives(study, bench.objectives)
    check_target(study, bench.target.name)
    stored = study.user_attrs.get("model")
    if stored and stored != {"source": bench.settings.model, "content_hash": bench.model_hash}:
        raise PlannerError(f"study '{bench.settings.study}' was made for model {stored['source']} "
                           f"({stored['content_hash'][:19]}...), not {bench.settings.model}")
    check_budgets(study, bench.budgets, study.user_attrs.get("baseline", {}))
    check_precision(study, bench.model)
    if objective_registry.needs_reference(bench.evaluators()):
        bench.reference = reference_distributions(bench)
    bench.baseline = study.user_attrs.get("baseline") or _measure_baseline(bench, study)
    bench.budgets = [b.resolve(bench.baseline) for b in bench.budgets]
    memory = of_kind(bench.budgets, "memory")
    bench.spaces = fit_budget(bench.spaces, memory and memory.limit, decode_ratio_limit(bench.budgets, bench.baseline))
    study.set_user_attr("budgets", [b.to_dict() for b in bench.budgets])
    study.set_user_attr("target", bench.target.name)


def check_precision(study: optuna.Study, model) -> None:
    """Every process of a study holds the model in one precision (its candidates and reference are made from it):
    a worker or a resumed run that would hold it otherwise is refused, saying which to pass."""
    held = dtype_name(model_dtype(model))
    stored = study.user_attrs.get("dtype")
    if stored is None:
        study.set_user_attr("dtype", held)
    elif stored != held:
        raise PlannerError(f"study '{study.study_name}' holds the model in {stored}, this process in {held} (pass "
                           f"--dtype {stored}, on a machine with the memory for it)")


def memory_limit(budgets: list[Budget], model) -> float | None:
    """The memory budget in bytes (a relative one resolved against the model's own weights), None without one."""
    memory = of_kind(budgets, "memory")
    if memory is None:
        return None
    return memory.resolve({"weight_bytes": weight_bytes(model).total_bytes}).limit


def fit_budget(spaces: dict, limit: float | None, decode_ratio: float | None = None) -> dict:
    """Each technique's space fitted to the budgets (`Technique.fit_budget`: e.g. allocations that aim at them)."""
    return {name: space if space is None else TECHNIQUES[name].fit_budget(space, limit, decode_ratio)
            for name, space in spaces.items()}


def decode_ratio_limit(budgets: list[Budget], baseline: dict) -> float | None:
    """A latency budget as a decode ratio to the uncompressed model (an absolute one over the baseline's own decode
    time), None without one."""
    latency = of_kind(budgets, "latency")
    if latency is None:
        return None
    if latency.relative is not None:
        return latency.relative
    measured = baseline.get("decode_ms_p50")
    return latency.limit / measured if latency.limit is not None and measured else None


def _require_a_fitting_candidate(bench: Workbench) -> None:
    """A memory budget that no candidate of the space can meet is refused before anything runs or is stored."""
    limit = memory_limit(bench.budgets, bench.model)
    if limit is None:
        return
    size, stages = smallest_candidate(bench.model, bench.spaces, limit, beyond=bench.target.stored_beyond)
    if size > limit:
        raise PlannerError(f"no candidate of the search space fits the memory budget of {limit / 1e6:.1f} MB: "
                           f"the smallest, {describe(stages)}, stores {size / 1e6:.1f} MB "
                           "(raise the budget or widen the space: fewer bits, smaller keep ratios)")


def _measure_baseline(bench: Workbench, study: optuna.Study) -> dict:
    tqdm.write("planner: measuring the uncompressed model (the baseline)")
    row, details = measure_baseline(bench)
    unmeasured = [name for name in bench.objectives if name not in row]
    if unmeasured:  # optimised as its stand-in on every trial, it would be a constant: refused before any trial
        raise PlannerError(f"objective {unmeasured[0]}: the {bench.target.name} target measured no "
                           f"{unmeasured[0]} for the uncompressed model (it does not produce that figure); "
                           "leave it out of --objectives")
    study.set_user_attr("model", {"source": bench.settings.model, "content_hash": bench.model_hash})
    study.set_user_attr("baseline", row)
    study.set_user_attr("baseline_measurements", details)
    return row


def finished(study: optuna.Study) -> int:
    """Trials toward the study's count: distinct candidates measured (or failed); repeats do not count."""
    return sum(workers.answered(t) for t in study.get_trials(deepcopy=False))



def create_or_load(settings: StudySettings) -> optuna.Study:
    sampler = make_sampler(settings.sampler, settings.seed, settings.trials)  # a bad name fails before any store
    objectives = settings.objective_names()  # an existing study's are checked by open_study and join
    study = optuna.create_study(storage=open_storage(storage_url(settings)), study_name=settings.study,
                                sampler=sampler, directions=objective_registry.directions(objectives), load_if_exists=True)
    if study.metric_names is None:
        study.set_metric_names(list(objectives))
    return study


def open_study(settings: StudySettings, verbose: bool = False) -> tuple[optuna.Study, Workbench]:
    """Create or continue the study: baseline measured once, hand-picked candidates queued once, and the
    settings stored so that `planner worker` processes can join with nothing but the storage URL."""
    existing = _existing(settings)  # a study reopened with other objectives fails before the model loads
    if existing is not None:
        check_objectives(existing, settings.objective_names())
    bench = prepare(settings, verbose=verbose)  # bad input fails here, before the study is created
    study = create_or_load(settings)
    join(bench, study)
    measure_comparisons(bench, study)
    if not study.get_trials(deepcopy=False):
        memory = of_kind(bench.budgets, "memory")
        for params in starting_points(bench.model, bench.spaces, memory and memory.limit, settings.trials,
                                      beyond=bench.target.stored_beyond):
            study.enqueue_trial(params, skip_if_exists=True)
    study.set_user_attr("settings", stored_settings(settings))
    return study, bench


def create(settings: StudySettings) -> optuna.Study:
    """`planner create`: the study, ready for workers; its --timeout becomes the study's own deadline."""
    study, _ = open_study(settings)
    if settings.timeout is not None:
        # For the study, not one process: no worker starts a trial after this moment.
        study.set_user_attr(workers.DEADLINE_ATTR, time.time() + settings.timeout)
    return study


def stored_settings(settings: StudySettings) -> dict:
    # The storage URL stays out: it may hold a password, and workers are given it anyway.
    return {k: v for k, v in settings.to_dict().items() if k != "storage"}


def settings_of(study: optuna.Study, storage: str, overrides: dict) -> StudySettings:
    """The settings a study was created with, for a worker joining it (its own flags override them)."""
    stored = study.user_attrs.get("settings")
    if not stored:
        raise PlannerError(f"study '{study.study_name}' was not created by planner (no stored settings); "
                           "create it with `planner create` or `planner search`")
    return make_settings(stored, {**overrides, "storage": storage})


def join_as_worker(study_name: str, storage: str, overrides: dict, verbose: bool = False) -> tuple[optuna.Study, Workbench]:
    """`planner worker`: the stored study with this worker's own sampler, and its workbench."""
    settings = settings_of(load_stored(study_name, storage), storage, overrides)
    study = create_or_load(settings)
    return study, prepare(settings, study, verbose)


def run_study(study: optuna.Study, bench: Workbench, quiet: bool = False, began: float | None = None) -> Outcome:
    """Run trials here until the study holds its count (shared with any other worker), then the outcome. A
    timeout counts from `began` (time.monotonic() when the command started: the baseline and the compared
    presets are part of the time it was given)."""
    settings = bench.settings
    timeout = settings.timeout
    if timeout is not None and began is not None:
        timeout = max(0.0, timeout - (time.monotonic() - began))
    ends = workers.deadline_of(study, timeout)  # the trials' end, and the confirmations' after them
    if finished(study) < settings.trials:
        # A bar only on a terminal: in logs it is noise, and the per-trial lines say the same.
        bar = tqdm(total=settings.trials, initial=finished(study), desc="trials", unit="trial",
                   disable=quiet or not sys.stderr.isatty(), leave=False)
        started, at_start = time.perf_counter(), finished(study)

        def report(study_, trial):
            bar.update(0 if workers.repeat(trial) else 1)
            if not quiet:
                done = finished(study_)
                tqdm.write(trial_line(trial, settings.trials, done)
                           + eta(time.perf_counter() - started, done - at_start, settings.trials - done))

        try:
            result = workers.run_trials(study, objective(bench), settings.trials, timeout,
                                        callbacks=(report,), say=tqdm.write)
        except KeyboardInterrupt:
            bar.close()
            raise Interrupted(f"interrupted: {finished(study)} finished trials are saved in study "
                              f"'{study.study_name}'; the trial in progress will run again when you rerun "
                              "the same command") from None
        bar.close()
        if not quiet:
            extra = not_counted(study)
            tqdm.write(f"planner: {finished(study)} trials in the study ({time.perf_counter() - started:.0f} s, "
                       f"{result.ran} trial(s) run by this process"
                       + (f"; not counted: {extra}" if extra else "") + ")")
            if result.exhausted:
                tqdm.write(f"planner: stopped after {workers.MAX_DRAWS} draws per trial: the space holds no more "
                           "distinct candidates that fit the budget (widen it, or ask for fewer --trials)")
        if result.failed_in_a_row >= workers.MAX_CONSECUTIVE_FAILURES:
            raise SearchStopped(f"stopped: the last {result.failed_in_a_row} trials all failed "
                               f"(last: {result.last_failure}); see `planner review` for each trial's reason")
    confirm(study, bench, say=(lambda line: None) if quiet else tqdm.write, ends=ends)
    return decide(study, bench.budgets, bench.baseline)


def eta(elapsed: float, done_here: int, left: int) -> str:
    """'  [eta 4 min]': the trials left at this process's own pace so far (trials of other workers count as done)."""
    if left <= 0 or done_here <= 0:
        return ""
    seconds = elapsed / done_here * left
    return f"  [eta {seconds / 60:.0f} min]" if seconds >= 90 else f"  [eta {seconds:.0f} s]"


def run_search(settings: StudySettings, verbose: bool = False, quiet: bool = False) -> Outcome:
    began = time.monotonic()
    study, bench = open_study(settings, verbose)
    return run_study(study, bench, quiet, began)
