"""On-disk cache of trained models (distilled students, healed pruned models), so a study that samples the
same one twice trains it once, and a longer run continues a shorter one instead of starting again.

Entries of one training run share a *lineage* (a hash of everything the run depends on but its length:
teacher, starting model, training settings, training split, seed); an entry is the run after `steps` steps,
a folder `<root>/students/<lineage>/steps-<n>/` holding the model as `save_pretrained` writes it
(safetensors) plus `entry.json`: the key material, the training report and the size and SHA-256 of every
file. Beside it `optimizer-<n>.pt` holds the AdamW state at that step, which a continuation needs; only
the longest run of a lineage keeps it (it is as large as two copies of the weights), the manifest records
its hash, and it is read with `weights_only=True`. Writes are atomic: an entry is built in a temporary
folder and renamed into place, so a reader sees a whole entry or none (when two workers race, the first
rename wins). On load every file is checked against the manifest and the model loaded from safetensors
only; an entry that fails is removed, reported with a warning, and treated as a miss so the caller
rebuilds it; an optimizer file that fails its hash is ignored (that entry is then not continued).
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

from search_spaces.hashing import sha256_file

FORMAT = 2  # bump when the entry layout or the fields of the stored report change: old entries then miss
MANIFEST = "entry.json"


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
    """The lineage of a training run: SHA-256 of its key material (everything but its length) as canonical JSON."""
    text = json.dumps({"format": FORMAT, **material}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class StudentCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "students"

    def path(self, lineage: str, steps: int) -> Path:
        return self.root / key_of(lineage, steps)

    def optimizer_path(self, lineage: str, steps: int) -> Path:
        return self.root / lineage / f"optimizer-{steps}.pt"

    def load(self, lineage: str, steps: int, model_class: type, dtype: torch.dtype,
             device) -> tuple[nn.Module, dict] | None:
        """(model, stored report) of `lineage` after `steps` steps, or None on a miss or a corrupt entry
        (which is removed)."""
        folder = self.path(lineage, steps)
        if not folder.exists():
            return None
        try:
            manifest = self._manifest(folder)
            if manifest.get("format") != FORMAT or manifest.get("key") != key_of(lineage, steps):
                raise ValueError("manifest does not describe this key")
            for name, facts in manifest["files"].items():
                if not _matches(folder / name, facts):
                    raise ValueError(f"{name} does not match its recorded size and hash")
            model = model_class.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001 - any failure means the entry cannot be trusted
            warnings.warn(f"student cache entry {folder} is corrupt ({exc}); removing it and rebuilding",
                          RuntimeWarning, stacklevel=2)
            self._discard(folder)
            return None
        return model.to(device).eval(), manifest["report"]

    def resumable(self, lineage: str, steps: int) -> int | None:
        """The longest run of `lineage` shorter than `steps` that still has its optimizer state, or None."""
        found = [n for n in self._optimizer_steps(lineage) if n < steps and self.path(lineage, n).exists()]
        return max(found, default=None)

    def _optimizer_steps(self, lineage: str) -> list[int]:
        """The step counts of `lineage` whose optimizer state is on disk."""
        return [int(p.stem.split("-")[1]) for p in (self.root / lineage).glob("optimizer-*.pt")]

    def optimizer_state(self, lineage: str, steps: int) -> dict | None:
        """The AdamW state after `steps` steps, or None when it is gone or does not match the manifest."""
        file = self.optimizer_path(lineage, steps)
        try:
            facts = self._manifest(self.path(lineage, steps)).get("optimizer")
            if not facts or not _matches(file, facts):
                return None
            return torch.load(file, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError):
            return None

    def store(self, lineage: str, steps: int, model: nn.Module, material: dict[str, Any], report: dict[str, Any],
              optimizer_state: dict | None = None) -> Path:
        """Write an entry atomically (an entry another process completed first is kept as it is), with its
        optimizer state; shorter runs of the lineage then drop theirs (this one continues further)."""
        final = self.path(lineage, steps)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".tmp-{steps}-{uuid.uuid4().hex}"
        optimizer = {}
        try:
            if optimizer_state is not None:
                optimizer_file = self.optimizer_path(lineage, steps)
                partial = final.parent / f".tmp-optimizer-{uuid.uuid4().hex}"
                with open(partial, "wb") as handle:  # a handle: torch's own file writer refuses some names
                    torch.save(optimizer_state, handle)
                optimizer = {"optimizer": _facts(partial)}
                os.replace(partial, optimizer_file)
            model.save_pretrained(staging, safe_serialization=True)
            files = {p.name: _facts(p) for p in sorted(staging.iterdir()) if p.is_file()}
            manifest = {"format": FORMAT, "key": key_of(lineage, steps), "material": material, "report": report,
                        "files": files, **optimizer}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
            os.rename(staging, final)
        except OSError:
            if not final.exists():  # else another worker's rename won: keep its entry, drop ours
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if optimizer:
            for older in self._optimizer_steps(lineage):
                if older < steps:
                    self.optimizer_path(lineage, older).unlink(missing_ok=True)
        return final

    @staticmethod
    def _manifest(folder: Path) -> dict:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))

    def _discard(self, folder: Path) -> None:
        """Move aside first (atomic), then delete, so no reader ever sees a half-deleted entry."""
        trash = folder.parent / f".trash-{folder.name}-{uuid.uuid4().hex}"
        try:
            os.rename(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)


def key_of(lineage: str, steps: int) -> str:
    """The key of one entry: its lineage and its length."""
    return f"{lineage}/steps-{steps}"


def _facts(file: Path) -> dict:
    """What the manifest records of a file: its size and SHA-256."""
    return {"size": file.stat().st_size, "sha256": sha256_file(file)}


def _matches(file: Path, facts: dict) -> bool:
    return file.stat().st_size == facts["size"] and sha256_file(file) == facts["sha256"]
