"""On-disk cache of trained students, so a study that samples the same student twice trains it once.

An entry is a folder `<root>/students/<key>/` holding the student as `save_pretrained` writes it
(safetensors) plus `entry.json`: the key material, the training report and the size and SHA-256 of every
file. The key hashes the teacher's identity, the whole student spec (shape and training settings), the
identity of the training split and the seed. Writes are atomic: the entry is built in a temporary
folder beside it and renamed into place, so a reader sees a whole entry or none (when two workers race,
the first rename wins and the other's copy is discarded). On load every file is checked against the
manifest and the model loaded from safetensors only; an entry that fails is removed, reported with a
warning, and treated as a miss so the caller rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

FORMAT = 1  # bump when the entry layout or the fields of the stored report change: old entries then miss
MANIFEST = "entry.json"
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (the student cache's and the built-in assets' integrity checks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def data_identity(documents: Sequence[Any]) -> str:
    """A hash of the training split: every document's name and text, in order."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.name.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(doc.text.encode("utf-8")).digest())
    return digest.hexdigest()


def weights_identity(model: nn.Module) -> str:
    """A hash of the model's class, config and every state_dict tensor, for a teacher with no model_id."""
    digest = hashlib.sha256(type(model).__name__.encode() + model.config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def student_key(material: dict[str, Any]) -> str:
    """The cache key of a student: SHA-256 of its key material as canonical JSON."""
    text = json.dumps({"format": FORMAT, **material}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class StudentCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "students"

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, model_class: type, dtype: torch.dtype, device) -> tuple[nn.Module, dict] | None:
        """(student, stored report) for `key`, or None on a miss or a corrupt entry (which is removed)."""
        folder = self.path(key)
        if not folder.exists():
            return None
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT or manifest.get("key") != key:
                raise ValueError("manifest does not describe this key")
            for name, facts in manifest["files"].items():
                file = folder / name
                if file.stat().st_size != facts["size"] or sha256_file(file) != facts["sha256"]:
                    raise ValueError(f"{name} does not match its recorded size and hash")
            model = model_class.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001 - any failure means the entry cannot be trusted
            warnings.warn(f"student cache entry {folder} is corrupt ({exc}); removing it and rebuilding",
                          RuntimeWarning, stacklevel=2)
            self._discard(folder)
            return None
        return model.to(device).eval(), manifest["report"]

    def store(self, key: str, model: nn.Module, material: dict[str, Any], report: dict[str, Any]) -> Path:
        """Write an entry atomically; an entry another process completed first is kept as it is."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        staging = self.root / f".tmp-{key}-{uuid.uuid4().hex}"
        try:
            model.save_pretrained(staging, safe_serialization=True)
            files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(staging.iterdir()) if p.is_file()}
            manifest = {"format": FORMAT, "key": key, "material": material, "report": report, "files": files}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
            os.rename(staging, final)
        except OSError:
            if not final.exists():  # else another worker's rename won: keep its entry, drop ours
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def _discard(self, folder: Path) -> None:
        """Move aside first (atomic), then delete, so no reader ever sees a half-deleted entry."""
        trash = self.root / f".trash-{folder.name}-{uuid.uuid4().hex}"
        try:
            os.rename(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)
