"""`planner apply`: rebuild a recipe's candidate from its model, check it against the recipe, save it."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from evaluators.memory import weight_bytes
from evaluators.perplexity import PerplexityProtocol, measure_perplexity
from planner import assets
from planner.candidates import build
from planner.errors import PlannerError
from planner.recipes import Recipe, load_recipe
from planner.sources import DataSource, ModelSource, content_hash, load_corpus, load_model, resolve_device
from search_spaces import TECHNIQUES, BuildContext

# Rebuilding is deterministic (fixed seeds), but kernels may sum in another order on another machine.
PERPLEXITY_TOLERANCE = 0.01  # relative


@dataclass
class ApplyResult:
    folder: Path
    perplexity: float
    recorded_perplexity: float | None
    weight_bytes: int
    recorded_weight_bytes: int | None


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


def apply_recipe(recipe_path: Path, out: Path, device: str = "auto", force: bool = False,
                 verbose: bool = False) -> ApplyResult:
    recipe = load_recipe(recipe_path, TECHNIQUES)
    out = Path(out)
    check_output(out, force)
    source = ModelSource.parse(recipe.model_source)
    actual_hash = content_hash(source)
    if actual_hash != recipe.model_hash:
        raise PlannerError(f"recipe {recipe_path} was made for other weights of {recipe.model_source} "
                           f"(content hash {recipe.model_hash[:19]}..., this model has {actual_hash[:19]}...)")
    torch_device = resolve_device(device)
    model, tokenizer = load_model(source, torch_device)
    data = recipe.provenance.get("data") or "builtin:shakespeare"
    corpus = load_corpus(DataSource.parse(data))
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, device=torch_device,
                           seed=int(recipe.provenance.get("seed", 0)), cache_dir=assets.cache_root() / "students",
                           model_id=f"{recipe.model_source}@{recipe.model_hash}", progress=verbose)
    candidate = build(model, list(recipe.stages), context).model
    result = check(recipe, candidate, tokenizer, corpus, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlannerError(f"cannot create output folder {out}: {exc.strerror}") from None
    save(candidate, recipe, tokenizer, out)
    shutil.copyfile(recipe_path, out / "recipe.yaml")
    readable_by_all(out)
    return result


def readable_by_all(folder: Path) -> None:
    """Give every file the umask's usual mode: some writers create weights owner-only (0600), which breaks
    a deployment that reads them as another user."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def check(recipe: Recipe, model, tokenizer, corpus, out: Path) -> ApplyResult:
    """Re-measure; fail loudly when the rebuilt candidate is not the one the recipe describes."""
    recorded = recipe.metrics.get("perplexity") or {}
    protocol = PerplexityProtocol.from_dict(recorded.get("protocol", {}))
    perplexity = measure_perplexity(model, tokenizer, corpus.eval, protocol).perplexity
    size = weight_bytes(model).total_bytes
    recorded_ppl = recorded.get("perplexity")
    recorded_size = (recipe.metrics.get("memory") or {}).get("total_bytes")
    if recorded_size is not None and size != recorded_size:
        raise PlannerError(f"rebuilt weights are {size} bytes, the recipe recorded {recorded_size}")
    if recorded_ppl is not None and abs(perplexity - recorded_ppl) > PERPLEXITY_TOLERANCE * recorded_ppl:
        raise PlannerError(f"rebuilt perplexity {perplexity:.3f} differs from the recipe's {recorded_ppl:.3f} "
                           f"by more than {PERPLEXITY_TOLERANCE:.0%}")
    return ApplyResult(out, perplexity, recorded_ppl, size, recorded_size)


def save(model, recipe: Recipe, tokenizer, out: Path) -> None:
    """The last stage writes the checkpoint (in its own format where it has one; else plain save_pretrained)."""
    if recipe.stages:
        last = recipe.stages[-1]
        try:
            TECHNIQUES[last.technique].save(model, last.spec, out)
        except ValueError as exc:  # a candidate with no loadable checkpoint format (the technique says why)
            raise PlannerError(f"cannot save this candidate as a checkpoint: {exc}") from None
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
