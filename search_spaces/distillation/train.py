"""Knowledge-distillation training: the student learns the teacher's softened next-token distribution.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, next token)

(T^2 keeps the soft term's gradient scale independent of T, as in Hinton et al.). The teacher runs in
eval mode under no_grad; the student trains with dropout off (it starts from the teacher's weights, and
a deterministic loss makes short runs comparable), AdamW, a 10-step linear warm-up then 1/sqrt(step) decay,
and gradient-norm clipping. Deterministic for a seed: the batches are fixed up front and torch's RNG is
seeded inside a forked RNG state, so the caller's random state is untouched.

Resumable, for multi-fidelity rungs: the learning-rate schedule does not know the run's length (a short
warm-up, then inverse square-root decay), so a 50-step run is exactly the first half of a 100-step one, and
`train_student(..., start_step=50, optimizer_state=...)` continues it from its weights and AdamW state.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from evaluators.runtime import model_device
from search_spaces.compute import float32_compute
from search_spaces.distillation.teacher import TeacherStates

WARMUP_STEPS = 10
SMOOTHING = 0.9  # running loss shown on the progress bar: exponential moving average


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    temperature: float
    alpha: float
    grad_clip: float


@dataclass(frozen=True)
class TrainStats:
    steps: int  # trained by this call (start_step .. settings.steps - 1)
    seconds: float  # the training loop only (teacher and student forwards, backward, optimizer)
    first_loss: float
    final_loss: float  # running average at the end

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) over every position + (1 - alpha) * next-token cross-entropy."""
    vocab = student_logits.shape[-1]
    loss = student_logits.new_zeros(())
    if alpha > 0:
        student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1).reshape(-1, vocab)
        teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1).reshape(-1, vocab)
        kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
        loss = loss + alpha * temperature ** 2 * kl
    if alpha < 1:
        ce = F.cross_entropy(student_logits[:, :-1].float().reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
        loss = loss + (1 - alpha) * ce
    return loss


def lr_factor(step: int) -> float:
    """The learning rate at `step` as a fraction of the peak: linear warm-up, then 1 / sqrt(step). It does not
    depend on the run's length, so a shorter run is a prefix of a longer one."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    return math.sqrt(WARMUP_STEPS / (step + 1))


def _adamw(parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for these tensors (about 5x faster steps on a CPU)."""
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)


def train_student(student: nn.Module, teacher: nn.Module, batches: torch.Tensor, settings: TrainSettings,
                  seed: int, progress: bool = True, start_step: int = 0,
                  optimizer_state: dict | None = None,
                  teacher_states: TeacherStates | None = None) -> tuple[TrainStats, dict]:
    """Train `student` in place from `start_step` to `settings.steps` against `teacher`, on `batches`
    ((steps - start_step) * batch_size, seq_len token ids: the windows of those steps). `optimizer_state` is
    the AdamW state the run that reached `start_step` returned. `teacher_states`: the teacher's stored states of
    the stream's windows (window step * batch_size onwards a step), read where stored, stored where not. Returns
    the stats and the AdamW state now."""
    steps = settings.steps - start_step
    if steps < 1 or batches.shape[0] < steps * settings.batch_size:
        raise ValueError(f"{batches.shape[0]} windows for steps {start_step}..{settings.steps} of {settings.batch_size}")
    if start_step and optimizer_state is None:
        raise ValueError(f"resuming at step {start_step} needs the optimizer state of the run that got there")
    device = model_device(student)
    teacher_training = teacher.training
    teacher.eval()
    student.eval()  # dropout off, see the module docstring; gradients flow regardless of the mode
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = _adamw(parameters, settings.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    running = first = None
    bar = tqdm(range(start_step, settings.steps), desc="distill", unit="step", disable=not progress, leave=False)
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for step in bar:
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * lr_factor(step)
                row = (step - start_step) * settings.batch_size
                ids = batches[row:row + settings.batch_size].to(device)
                with torch.no_grad(), float32_compute(teacher):
                    teacher_logits = (teacher(input_ids=ids, use_cache=False).logits if teacher_states is None
                                      else teacher_states.logits(teacher, ids, step * settings.batch_size))
                with float32_compute(student):  # the backward pass needs nothing it installs
                    student_logits = student(input_ids=ids, use_cache=False).logits
                loss = kd_loss(student_logits, teacher_logits, ids, settings.temperature, settings.alpha)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
                optimizer.step()
                value = loss.item()
                first = value if first is None else first
                running = value if running is None else SMOOTHING * running + (1 - SMOOTHING) * value
                bar.set_postfix(loss=f"{running:.3f}")
    finally:
        bar.close()
        teacher.train(teacher_training)
        optimizer.zero_grad(set_to_none=True)
    student.eval()
    return TrainStats(steps, time.perf_counter() - started, first, running), optimizer.state_dict()
