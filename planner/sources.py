"""Where models and corpora come from, resolved end to end here: `builtin:NAME`, local folders and files, hub
ids, `datasets` names. The study, `evaluate` and `apply` all go through this module's public functions: parse a
source, load it, hash a model's weights.

Parsing a source is cheap and checks what can be checked without loading (unknown built-in names,
missing paths); loading does the real work and turns library errors into one-line PlannerErrors. A built-in
source is the one that needs the asset store (planner/assets.py: the pinned packages, fetched and built once
into the cache); this module asks it two things only: whether a name is built in (`_builtin`), and the folder
and recorded facts of a fetched asset (`_fetched`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from evaluators.corpus import Corpus, CorpusError, Document, load_split_folders, read_documents, split_documents
from planner import assets
from planner.errors import PlannerError, first_line
from search_spaces.hashing import sha256_file

BUILTIN = "builtin:"
DEFAULT_MODEL = BUILTIN + "smollm2-135m"
DEFAULT_DATA = BUILTIN + "shakespeare"
# owner/name as the Hugging Face hub spells repository ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _builtin(kind: str, spec: str) -> str:
    """The built-in asset's name in `spec` (`builtin:NAME`); an unknown one is refused with the known names."""
    return assets.lookup(kind, spec[len(BUILTIN):]).name


def _fetched(kind: str, name: str) -> tuple[Path, dict]:
    """A built-in asset's folder, fetched and built first if it is not in the cache, and the facts its marker
    records (a corpus's split rule, a model's weight hashes)."""
    folder = assets.ensure(assets.lookup(kind, name))
    return folder, assets.read_marker(folder)


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote
    kind: str  # "builtin" | "local" | "hub"
    location: str  # built-in name, folder path, or hub id

    @classmethod
    def parse(cls, spec: str) -> "ModelSource":
        if spec.startswith(BUILTIN):
            return cls(spec, "builtin", _builtin("model", spec))
        path = Path(spec).expanduser()
        if path.exists():
            if not path.is_dir():
                raise PlannerError(f"model path {spec} is a file; pass the folder that holds config.json")
            if not (path / "config.json").is_file():
                raise PlannerError(f"model folder {spec} has no config.json (not a Hugging Face model folder)")
            return cls(spec, "local", str(path.resolve()))
        if HUB_ID.match(spec) and not spec.startswith((".", "~")):
            return cls(spec, "hub", spec)
        raise PlannerError(f"model path {spec} does not exist (and is not a hub id like owner/name)")


@dataclass(frozen=True)
class DataSource:
    spec: str
    kind: str  # "builtin" | "path" | "datasets"
    location: str
    config: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "DataSource":
        if spec.startswith(BUILTIN):
            return cls(spec, "builtin", _builtin("corpus", spec))
        path = Path(spec).expanduser()
        if path.exists():
            return cls(spec, "path", str(path.resolve()))
        looks_like_path = spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in {".txt", ".md", ".text"}
        if looks_like_path or not spec.strip():
            raise PlannerError(f"data path {spec} does not exist")
        name, _, config = spec.partition(":")
        return cls(spec, "datasets", name, config or None)


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PlannerError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlannerError(f"device {name} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise PlannerError(f"device {name} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise PlannerError(f"unknown dtype '{name}' (use auto, {', '.join(dtypes)})")
    return dtypes[name]


def _pretrained_location(source: ModelSource) -> str:
    """What from_pretrained loads: a built-in model's fetched folder, a local folder, a hub id."""
    return str(_fetched("model", source.location)[0]) if source.kind == "builtin" else source.location


def model_config(source: ModelSource, trust_remote_code: bool = False):
    """The model's config alone (no weights read), or a one-line PlannerError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_pretrained_location(source), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - hub/IO/parse errors all become one line
        raise PlannerError(f"cannot load the model config of {source.spec}: {first_line(exc)}") from None


def load_model(source: ModelSource, device=None, dtype=None, trust_remote_code: bool = False):
    """(model, tokenizer) on the device in eval mode. Refuses models that are not causal LMs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or resolve_device()
    location = _pretrained_location(source)
    config = model_config(source, trust_remote_code)
    if not is_causal_lm(config, trust_remote_code):
        raise PlannerError(
            f"{source.spec} is a '{config.model_type}' model, not a causal language model (decoder with an LM head)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001
        raise PlannerError(f"cannot load model {source.spec}: {first_line(exc)}") from None
    return model.to(device).eval(), tokenizer


def is_causal_lm(config, trust_remote_code: bool = False) -> bool:
    """A decoder with an LM head. Encoders such as BERT have a causal-LM class in transformers, but
    only as a decoder when `is_decoder` is set; without it they are masked LMs."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True
    if getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return False
    return type(config) not in MODEL_FOR_MASKED_LM_MAPPING or bool(getattr(config, "is_decoder", False))


def load_corpus(source: DataSource) -> Corpus:
    try:
        if source.kind == "builtin":
            folder, facts = _fetched("corpus", source.location)
            return load_split_folders(source.spec, folder, facts["split_rule"])
        if source.kind == "path":
            return split_documents(source.spec, read_documents(Path(source.location)))
        return _load_datasets_corpus(source)
    except CorpusError as exc:
        raise PlannerError(str(exc)) from None


def _load_datasets_corpus(source: DataSource) -> Corpus:
    """A `datasets` corpus: its own train split for training, its test (or validation) split held out."""
    try:
        import datasets

        loaded = datasets.load_dataset(source.location, source.config)
    except Exception as exc:  # noqa: BLE001
        raise PlannerError(f"cannot load dataset {source.spec}: {first_line(exc)}") from None
    held_out = next((s for s in ("test", "validation") if s in loaded), None)
    if "train" not in loaded or held_out is None:
        raise PlannerError(f"dataset {source.spec} needs a train split and a test or validation split; it has {list(loaded)}")
    column = _text_column(loaded["train"], source.spec)
    train = Document(f"{source.spec}/train", "\n".join(loaded["train"][column]))
    evaluation = Document(f"{source.spec}/{held_out}", "\n".join(loaded[held_out][column]))
    if not evaluation.text.strip():
        raise PlannerError(f"dataset {source.spec} has an empty {held_out} split")
    return Corpus(source.spec, (train,), (evaluation,), f"the dataset's own splits: train / {held_out}")


def _text_column(split, spec: str) -> str:
    if "text" in split.column_names:
        return "text"
    for name, feature in split.features.items():
        if getattr(feature, "dtype", None) == "string":
            return name
    raise PlannerError(f"dataset {spec} has no text column (columns: {split.column_names})")


def content_hash(source: ModelSource) -> str:
    """sha256 over the model's weight files (names and bytes), so a recipe can tell its model apart."""
    import hashlib

    if source.kind == "builtin":  # its weights' hashes, recorded when it was built
        digests = _fetched("model", source.location)[1]["weights_sha256"]
        return "sha256:" + hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    folder = Path(source.location)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source.location, local_files_only=True))
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return "sha256:" + digest.hexdigest()
