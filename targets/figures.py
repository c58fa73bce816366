"""A candidate's figures as one metrics row (what Optuna's objectives and budgets read), shared by targets.

Row keys are those of planner.objectives' registry and budgets: ``weight_bytes`` is what the target's
runtime holds resident for the weights; ``disk_bytes`` what the artifact stores (the same where the
runtime loads it as is); latencies in ms, and, where the target times candidates against a reference in
the same run, ``decode_ratio`` / ``prefill_ratio`` (relative budgets compare these); and whatever the
request's scorers figure from the held-out windows (perplexity, kl, ...).
"""
from __future__ import annotations

import time

from evaluators.perplexity import check_protocol
from evaluators.scoring import score_windows
from targets.base import Measured, Request


def metrics_row(label: str, weight: int, latency=None, **figures) -> dict:
    row = {"weight_bytes": weight, "weight_mb": weight / 1e6, "stages": label}
    if latency is not None:
        row.update(decode_ms_p50=latency.decode.p50_ms, prefill_ms_p50=latency.prefill.p50_ms)
    row.update({k: v for k, v in figures.items() if v is not None})
    return row


def scored(request: Request, measured: Measured, runtime) -> Measured:
    """`measured` with the request's accuracy figures, unless the request's own rule says the candidate is not
    worth scoring (then `skipped` says why and the runtime is never opened). `runtime()` is a context manager
    yielding (windows, device, dtype): `windows(ids)` gives the runtime's logits of each held-out window."""
    if not request.scorers:  # nothing asked of the logits (e.g. a latency-only re-timing): no runtime opened
        return measured
    skipped = request.hopeless(measured.row)
    if skipped:
        return Measured(measured.row, measured.details, skipped)
    started = time.perf_counter()
    encoded = check_protocol(request.model, request.tokenizer, request.held_out, request.perplexity)
    scorers = [make() for make in request.scorers]
    with runtime() as (windows, device, dtype):
        results = score_windows(windows, encoded, request.perplexity, scorers, device, dtype, started)
    row, details = dict(measured.row), dict(measured.details)
    for scorer, result in zip(scorers, results):
        row.update(result.figures())
        details[scorer.name] = result.to_dict()
    return Measured(row, details)
