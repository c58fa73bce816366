"""The teacher's side of a training step, computed once a study: its last hidden state of every training window,
on disk, so every later run against the same teacher on the same windows (the next student, a longer rung of
another lineage, a healed cut) runs only the teacher's output head instead of the whole teacher.

Window i of a study's training stream is fixed by (seed, i) (`calibration.training_windows`), so the teacher's
states of window i are the same for every student. A step's windows are computed together, as the step's batch,
and keyed by the batch size too, so a state read back is bit for bit the one a run without the cache would
compute (same machine, same torch). Logits are not stored: a 1.24 B Llama's 128 k vocabulary makes them 64x its
2048-wide hidden state (66 MB a 128-token window in float32); the head (a fifth of that model's multiplications) runs again.

A teacher whose logits are not its output head applied to its base model's last hidden state (a final soft-cap, a
logit scale) is found on the first step (the split is compared with the whole forward, once per teacher object)
and then runs whole, uncached. Files are written whole under a temporary name and renamed (two workers racing
write the same bytes); read with `weights_only=True`; one that does not load or has the wrong shape is computed
again.
"""
from __future__ import annotations

import os
import uuid
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from search_spaces.distillation.cache import student_key

# teacher -> whether its logits are its head on its base model's last hidden state, exactly (checked once)
_SPLITS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


class TeacherStates:
    """The teacher's last hidden states of one training stream's windows, in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.read = 0  # windows this object served from disk
        self.computed = 0  # windows it ran the teacher for

    @classmethod
    def of_run(cls, cache_dir: Path | None, material: dict, batch_size: int, seq_len: int) -> "TeacherStates | None":
        """The states of the stream a run with lineage `material` trains on (runs/lineage_material: the teacher,
        its dtype, the training split, the seed; a teacher built by earlier stages, pruning.heal_material, says
        so), None without a cache directory."""
        if cache_dir is None:
            return None
        teacher = {k: material[k] for k in ("teacher", "teacher_dtype", "data", "seed", "teacher_upstream")
                   if k in material}
        key = student_key({"teacher_states": teacher, "batch_size": batch_size, "seq_len": seq_len})
        return cls(Path(cache_dir) / "teacher-states" / key)

    def logits(self, teacher: nn.Module, ids: torch.Tensor, first_window: int) -> torch.Tensor:
        """The teacher's logits of `ids` (a step's windows, `first_window` onwards), from stored states where all
        of them are stored. Call under no_grad and the teacher's compute context."""
        paths = [self.folder / f"{first_window + i}.pt" for i in range(ids.shape[0])]
        split = _SPLITS.get(teacher)
        if split is False:
            return teacher(input_ids=ids, use_cache=False).logits
        head = teacher.get_output_embeddings()  # None where there is none: the check below says it does not split
        stored = self._load(paths, ids)
        if stored is not None:
            self.read += len(paths)
            return head(stored)
        try:
            hidden = teacher.base_model(input_ids=ids, use_cache=False).last_hidden_state
            logits = head(hidden)
        except (AttributeError, TypeError, RuntimeError):  # no base model or head of the usual form
            if split:  # a teacher that split before: this is a real failure, not its form
                raise
            hidden = logits = None
        if split is None:  # checked once a teacher: its logits must be its head on that state, bit for bit
            whole = teacher(input_ids=ids, use_cache=False).logits
            split = logits is not None and logits.shape == whole.shape and torch.equal(logits, whole)
            _SPLITS[teacher] = split
            if not split:
                return whole
        self.computed += len(paths)
        self._store(paths, hidden)
        return logits

    def _load(self, paths: list[Path], ids: torch.Tensor) -> torch.Tensor | None:
        if not all(path.is_file() for path in paths):
            return None
        try:
            states = [torch.load(path, map_location=ids.device, weights_only=True) for path in paths]
        except Exception:  # noqa: BLE001 (a torn or foreign file is computed again, whatever torch raised)
            return None
        if any(not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[0] != ids.shape[1] for s in states):
            return None
        return torch.stack(states)

    def _store(self, paths: list[Path], hidden: torch.Tensor) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for path, state in zip(paths, hidden):
                partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
                torch.save(state.detach().cpu().clone(), partial)
                os.replace(partial, path)
        except OSError as exc:  # a full or read-only disk costs later runs the teacher's forward, not this one
            warnings.warn(f"could not store the teacher's states in {self.folder}: {exc}", RuntimeWarning,
                          stacklevel=3)
