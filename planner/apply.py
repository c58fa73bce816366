"""`planner apply`: rebuild a recipe's candidate, ship it as its target's artifact (a GGUF file, a checkpoint
folder), then load that artifact fresh in the target's runtime and re-measure it against the recipe."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from typing import Callable
from pathlib import Path

from planner import assets
from planner.candidates import build, shipped_stages
from evaluators.paired import CONFIDENCE
from planner.budgets import MEETS, UNDECIDED, Budget, row_confidence, shown_ratio, timed_ratio, unclear
from planner.errors import PlannerError
from planner.recipes import Recipe, load_recipe
from planner.settings import StudySettings
from planner.sources import (DEFAULT_DATA, DataSource, ModelSource, content_hash, load_corpus, load_model,
                             resolve_device, resolve_dtype)
from search_spaces import TECHNIQUES, BuildContext
from targets import TargetError, check_usable

# Rebuilding is deterministic (fixed seeds), but kernels may sum in another order on another machine, and
# a runtime reads its artifact with its own kernels.
PERPLEXITY_TOLERANCE = 0.01  # relative
# The same-run decode ratio to the reference varies with the machine's load: a re-timed ratio whose whole
# confidence interval lies this much (relative) above the recorded ratio fails; anything less does not.
DECODE_RATIO_TOLERANCE = 0.25
# apply times the artifact once, looking again while a verdict (a budget, the slowdown limit) is unclear, for up
# to this many times the study's most rounds; every round it took is judged together (evaluators.paired: the
# looks' confidence keeps a wrong verdict as rare as the level says), so a stretch of rounds taken while another
# job held the cores widens the interval rather than failing a deployment.
APPLY_EXTENSION = 3


@dataclass
class ApplyResult:
    folder: Path
    artifact: Path
    target: str
    perplexity: float
    recorded_perplexity: float | None
    weight_bytes: int
    recorded_weight_bytes: int | None
    decode_ratio: float | None = None
    recorded_decode_ratio: float | None = None
    decode_ms: float | None = None
    budget_note: str = ""
    how_to_load: str = ""  # the target's line telling how to serve the artifact
    decode_interval: tuple | None = None  # the judged ratio's confidence interval (low, high)
    decode_rounds: int | None = None  # the rounds it is of
    confidence: float = CONFIDENCE  # the interval's
    # times the shipped artifact again as apply first timed it (latency only): a metrics row (benchmarks)
    timing: Callable[[], dict] | None = field(default=None, repr=False)


def check_output(folder: Path, force: bool) -> None:
    """Fail early if the checkpoint could not be written there; create nothing (a failed apply leaves no folder)."""
    if folder.exists():
        if not folder.is_dir():
            raise PlannerError(f"output folder {folder} is a file")
        if any(folder.iterdir()) and not force:
            raise PlannerError(f"output folder {folder} is not empty (use --force to overwrite)")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PlannerError(f"cannot create output folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PlannerError(f"output folder {folder} is not writable ({existing} is read-only)")


def recipe_target(recipe: Recipe, asked: str | None, recipe_path: Path):
    """The recipe's target; a different one asked for is refused (its figures were measured elsewhere)."""
    from targets import TARGETS

    name = recipe.provenance.get("target", "transformers")
    if name not in TARGETS:
        raise PlannerError(f"recipe {recipe_path} is for an unknown target '{name}'")
    if asked not in (None, "auto") and asked != name:
        raise PlannerError(f"recipe {recipe_path} was measured for target {name}, not {asked} "
                           f"(run a search with --target {asked} for a recipe of that target)")
    return TARGETS[name]


def check_grids(recipe: Recipe, target, recipe_path: Path) -> None:
    """Every stage that rounds onto a storage grid names one the target's artifact holds (what the study
    checked; a recipe edited by hand is refused here in one line, not by the writer)."""
    for stage in recipe.stages:
        method = getattr(stage.spec, "quant_method", None)
        why = method is not None and method.grid and target.cannot_store(stage.spec.grid)
        if why:
            raise PlannerError(f"recipe {recipe_path}: {why}")


def apply_recipe(recipe_path: Path, out: Path, device: str = "auto", force: bool = False,
                 verbose: bool = False, target: str | None = None) -> ApplyResult:
    from planner.trial import Workbench

    recipe = load_recipe(recipe_path, TECHNIQUES)
    out = Path(out)
    check_output(out, force)
    chosen = recipe_target(recipe, target, recipe_path)
    check_grids(recipe, chosen, recipe_path)
    source = ModelSource.parse(recipe.model_source)
    actual_hash = content_hash(source)
    if actual_hash != recipe.model_hash:
        raise PlannerError(f"recipe {recipe_path} was made for other weights of {recipe.model_source} "
                           f"(content hash {recipe.model_hash[:19]}..., this model has {actual_hash[:19]}...)")
    torch_device = resolve_device(device)
    try:
        check_usable(chosen, torch_device.type)
    except TargetError as exc:
        raise PlannerError(str(exc)) from None
    # in the precision the study held it in (recipes before it: float32 on the CPU)
    model, tokenizer = load_model(source, torch_device, resolve_dtype(recipe.provenance.get("dtype", "auto"), torch_device))
    data = recipe.provenance.get("data") or DEFAULT_DATA
    corpus = load_corpus(DataSource.parse(data))
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, device=torch_device,
                           seed=int(recipe.provenance.get("seed", 0)), cache_dir=assets.cache_root(),
                           model_id=f"{recipe.model_source}@{recipe.model_hash}", progress=verbose)
    candidate = build(model, shipped_stages(list(recipe.stages)), context).model
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlannerError(f"cannot create output folder {out}: {exc.strerror}") from None
    try:
        artifact = chosen.ship(candidate, tokenizer, list(recipe.stages), out, runtime=recipe.metrics.get("runtime"))
    except ValueError as exc:  # a candidate with no loadable artifact (the technique or target says why)
        raise PlannerError(f"cannot save this candidate for {chosen.name}: {exc}") from None
    del candidate
    shutil.copyfile(recipe_path, out / "recipe.yaml")
    readable_by_all(out)
    # What apply checks: perplexity, bytes, and decode time when the study measured it (kl needs the study's
    # reference distributions; perplexity from the same logits already says the weights are the ones scored).
    recorded = tuple(recipe.provenance.get("objectives") or ("perplexity", "decode_ms_p50", "weight_mb"))
    objectives = ("perplexity",) + tuple(o for o in recorded if o not in ("perplexity", "kl"))
    settings = StudySettings(model=recipe.model_source, data=data, evaluation=recipe.provenance.get("evaluation") or {},
                             objectives=list(objectives), target=chosen.name)
    bench = Workbench(settings, model, tokenizer, corpus, context, {}, [Budget(**b) for b in recipe.budget], {},
                      objectives=objectives, target=chosen)
    request = timing_request(bench.request(may_skip=False), recipe)
    row = chosen.measure_shipped(request, artifact).row
    result = check(recipe, row, out, artifact, chosen.name)
    result.how_to_load = chosen.how_to_load(artifact, request.latency)
    result.timing = lambda: chosen.measure_shipped(request.latency_only(), artifact).row
    return result


def readable_by_all(folder: Path) -> None:
    """Give every file the umask's usual mode: some writers create weights owner-only (0600), which breaks
    a deployment that reads them as another user."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def timing_request(request, recipe: Recipe):
    """The study's request as apply times the artifact (made on the recipe's budgets: a prefill budget times the
    prefills as the study did; nothing skipped): one timing that may look on, while a verdict is unclear
    (`unclear_rule`), for up to APPLY_EXTENSION times the study's most rounds."""
    longer = replace(request.latency, max_repeats=request.latency.most_repeats * APPLY_EXTENSION)
    return replace(request, latency=longer, unclear=unclear_rule(recipe))


def slowdown_limit(recipe: Recipe) -> float | None:
    """The decode ratio past which a shipped artifact is slower than the recipe says: the tolerance over the top
    of the recorded ratio's interval (the recorded ratio was one noisy timing too), None when nothing was
    recorded."""
    recorded = timed_ratio(recipe.metrics.get("summary") or {}, "decode_ratio")
    return None if recorded is None else recorded[2] * (1 + DECODE_RATIO_TOLERANCE)


def unclear_rule(recipe: Recipe):
    """apply's rule for timing longer (targets.Request.unclear): the interval straddles the recipe's latency
    budgets or the slowdown limit, so neither verdict is clear yet."""
    budgets = unclear([Budget(**b) for b in recipe.budget])
    limit = slowdown_limit(recipe)

    def rule(intervals: dict) -> bool:
        decode = intervals.get("decode_ratio")
        return budgets(intervals) or (limit is not None and decode is not None and decode.verdict(limit) == UNDECIDED)
    return rule


def check(recipe: Recipe, row: dict, out: Path, artifact: Path, target: str) -> ApplyResult:
    """Fail loudly when the shipped artifact is not the candidate the recipe describes. A decode ratio fails only
    when it is clearly slower than recorded: the whole confidence interval of all of apply's rounds past the
    tolerance."""
    recorded = recipe.metrics.get("summary") or {}
    # Bytes as stored: the artifact's own figure, exact in every target (what a runtime holds once loaded may
    # differ from what it holds before its first forward, e.g. compressed-tensors decompressing on the fly).
    # A stage applied at load ships the model before it: what it serves is the resident figure after loading.
    size_key = "disk_bytes" if "disk_bytes" in recorded and not row.get("applied_at_load") else "weight_bytes"
    perplexity, size = row["perplexity"], row[size_key]
    recorded_ppl = recorded.get("perplexity") or (recipe.metrics.get("perplexity") or {}).get("perplexity")
    recorded_size = recorded.get(size_key)
    if recorded_size is not None and size != recorded_size:
        raise PlannerError(f"the shipped {artifact.name} stores {size} bytes, the recipe recorded {recorded_size}")
    if recorded_ppl is not None and abs(perplexity - recorded_ppl) > PERPLEXITY_TOLERANCE * recorded_ppl:
        raise PlannerError(f"the shipped {artifact.name} scores perplexity {perplexity:.3f}, the recipe "
                           f"{recorded_ppl:.3f}: more than {PERPLEXITY_TOLERANCE:.0%} apart")
    timed, limit = timed_ratio(row, "decode_ratio"), slowdown_limit(recipe)
    if timed is not None and limit is not None and timed[1] > limit:
        raise PlannerError(f"the shipped {artifact.name} decodes at {shown_ratio(row, 'decode_ratio')} the reference "
                           f"over {row.get('latency_rounds', 1)} rounds; the recipe recorded "
                           f"{recorded['decode_ratio']:.3f}x: clearly more than {DECODE_RATIO_TOLERANCE:.0%} slower")
    ratio, interval = (timed[0], timed[1:]) if timed else (None, None)
    return ApplyResult(out, artifact, target, perplexity, recorded_ppl, size, recorded_size, ratio,
                       recorded.get("decode_ratio"), row.get("decode_ms_p50"), _budget_note(recipe, row),
                       decode_interval=interval, decode_rounds=row.get("latency_rounds"),
                       confidence=row_confidence(row))


def _budget_note(recipe: Recipe, row: dict) -> str:
    """The re-timed artifact against the recipe's latency budgets, on the statistic the study judged them by:
    MEETS, OVER, or WITHIN NOISE where the ratio's interval straddles a relative budget (its bytes are checked
    exactly above; what a runtime holds resident is the study's figure, not re-read from a fresh artifact)."""
    notes = []
    for stored in recipe.budget:
        budget = Budget(**stored)
        if budget.kind not in ("latency", "prefill") or budget.metric not in row:
            continue
        verdict = budget.verdict(row)
        word = {MEETS: "MEETS", UNDECIDED: "WITHIN NOISE of"}.get(verdict, "OVER")
        if budget.uses_ratio(row):
            notes.append(f"{word} {budget.kind} <= {budget.relative:g}x the uncompressed model: "
                         f"{shown_ratio(row, budget.ratio_metric)} in the same run")
        else:
            notes.append(f"{word} {budget.kind} <= {budget.limit:.2f} ms: {row[budget.metric]:.2f} ms")
    return "; ".join(notes)
