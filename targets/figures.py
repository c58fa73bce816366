"""A candidate's figures as one metrics row (what Optuna's objectives and budgets read), shared by targets.

Row keys are those of planner.objectives' registry and budgets: ``weight_bytes`` is what the target's
runtime holds resident for the weights; ``disk_bytes`` what the artifact stores (the same where the
runtime loads it as is); latencies in ms, and, where the target times candidates against a reference in
the same run, ``decode_ratio`` / ``prefill_ratio`` (relative budgets compare these).
"""
from __future__ import annotations

# A candidate this far over a latency budget is not worth its perplexity run.
LATENCY_SKIP_FACTOR = 1.5


def metrics_row(label: str, weight: int, latency=None, perplexity=None, kl=None, **figures) -> dict:
    row = {"weight_bytes": weight, "weight_mb": weight / 1e6, "stages": label}
    if latency is not None:
        row.update(decode_ms_p50=latency.decode.p50_ms, prefill_ms_p50=latency.prefill.p50_ms)
    row.update({k: v for k, v in figures.items() if v is not None})
    if perplexity is not None:
        row.update(perplexity=perplexity.perplexity, bits_per_byte=perplexity.bits_per_byte)
    if kl is not None:
        row.update(kl=kl.kl_mean, top1_agreement=kl.top1_agreement)
    return row


def hopeless_latency(budgets, row: dict):
    """The first latency or prefill budget the measured figure is more than LATENCY_SKIP_FACTOR times over."""
    return next((b for b in budgets if b.kind in ("latency", "prefill") and b.limit is not None
                 and b.metric in row and b.violation(row) > LATENCY_SKIP_FACTOR - 1), None)


def skip_if_hopeless(bench, row: dict, trial) -> bool:
    """Record on the trial why perplexity is not worth measuring; True when it is not."""
    hopeless = hopeless_latency(bench.budgets, row)
    if hopeless is None or trial is None:
        return False
    figure = (f"{row[hopeless.ratio_metric]:.2f}x the reference" if hopeless.uses_ratio(row)
              else f"{row[hopeless.metric]:.2f} ms")
    trial.set_user_attr("skipped_perplexity", f"{hopeless.kind} {figure} is over {LATENCY_SKIP_FACTOR}x the budget")
    return True
