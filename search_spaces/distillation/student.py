"""The untrained student: the teacher cut down by importance (prune-then-distill, as NVIDIA's Minitron does),
or, only when asked, a randomly initialised model of the same shape."""
from __future__ import annotations

import copy

import torch
from torch import nn

from evaluators.runtime import model_device, model_dtype
from search_spaces.calibration import calibration_batches
from search_spaces.structure.importance import structural_importance
from search_spaces.structure.shape import Structure, structured_config
from search_spaces.structure.surgery import StructureReport, check_structure, needed_scores, restructure


def derive_student(teacher: nn.Module, structure: Structure, init: str, context, importance_samples: int,
                   importance_seq_len: int) -> tuple[nn.Module, StructureReport | None]:
    """A new student of `structure`; the teacher is left as it was.

    init="teacher": importance scores on calibration text pick the layers, key/value groups and neurons
    kept, and the student starts from exactly those teacher weights. init="random": a fresh model of the
    same config, initialised by transformers under `context.seed`.
    """
    check_structure(teacher, structure)
    if init == "random":
        config = structured_config(teacher.config, structure)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            student = type(teacher)(config)
        return student.to(model_device(teacher), model_dtype(teacher)).eval(), None
    needs = needed_scores(teacher, structure)
    scores = None
    if any(needs.values()):
        batches = calibration_batches(context.tokenizer, context.calibration, importance_samples,
                                      importance_seq_len, context.seed)
        scores = structural_importance(teacher, batches, **needs)
    student = copy.deepcopy(teacher)
    report = restructure(student, structure, scores)
    return student.eval(), report
