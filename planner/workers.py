"""Running a study's trials from one or many processes until the study holds its trial count.

Every process (`planner search`, `planner worker`) runs the same loop over the shared storage:
- a trial counts toward the study's count when it bought an answer: a candidate built and measured, or
  failed by its own candidate (an exception, out of memory, NaN); running and waiting trials count until
  they end. A draw that repeats a measured candidate (`duplicate_of`) or that its spec puts over the memory
  budget (`rejected`) stays in the study, so the sampler learns from it, but does not count: the user's
  trial count buys distinct, possibly feasible candidates. At most `MAX_DRAWS` draws per counted trial are
  made (a space with fewer distinct candidates than the count ends there). Trials cut short by a dead
  process or Ctrl-C do not count and are retried with the same parameters;
- a process whose trial would exceed the count (two workers asking at once) sees it from the trial
  numbers, records that trial as pruned (`surplus`) and stops, so the count is exact;
- a process that finds the count reached while others still run waits for them: if one of them dies,
  its trial is retried here. A trial cut short is found three ways, and each ends the same (`interrupted`
  noted on the dead trial before it is failed, then exactly one retry, queued by whichever process's FAIL
  took effect): its owner on this host is gone (seen from its pid at once); it has no owner for
  `OWNERLESS_SECONDS` of this process's watching (the process died between Optuna creating the trial and
  the trial recording its owner); or its heartbeat went stale (RDB storages, any host: `planner.storage`
  notes the trial inside Optuna's own stale-trial check, and its callback is `retry_stale`).
"""
from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import optuna
import psutil

TrialState = optuna.trial.TrialState
POLL_SECONDS = 2.0
# Consecutive failed trials after which a process gives up: a space where everything fails is a setup problem.
MAX_CONSECUTIVE_FAILURES = 5
# Draws (trials of any kind) per trial of the count, before a process decides the space holds no more
# distinct candidates: twins and spec rejections cost well under a second each.
MAX_DRAWS = 4
# Draws in a row that the deadline leaves unstarted (deadline.py) after which a process stops: what the sampler
# proposes no longer fits the time left, and drawing on would only fill the study with unstarted trials.
MAX_LATE_IN_A_ROW = 8


# A study's own deadline (epoch seconds), set by `planner create --timeout`; on a trial, the nearer of it and the
# process's --timeout: the deadline the trial ran under (deadline.py decides from it whether to start).
DEADLINE_ATTR = "deadline"


def finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Complete, or failed by its own candidate (a trial cut short by its process carries no "failure")."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "failure" in trial.user_attrs)


NOT_STARTED = "not_started"  # trial attribute: why a candidate was not started before the deadline (deadline.py)


def measured(trial: optuna.trial.FrozenTrial, section: str, name: str):
    """One figure of what the target recorded of the trial's candidate (its `measurements`; a twin holds its
    source's), None where it recorded none."""
    return (trial.user_attrs.get("measurements") or {}).get(section, {}).get(name)


def timed_from_disk(trial: optuna.trial.FrozenTrial) -> str | None:
    """Why the trial's latency figures are the disk's, not the runtime's (the target says; None: they are not)."""
    return measured(trial, "latency", "from_disk")


def repeat(trial: optuna.trial.FrozenTrial) -> bool:
    """A draw that bought no new answer: the twin of a measured candidate, over the memory budget by its spec, or
    predicted to run past the deadline."""
    return bool({"duplicate_of", "rejected", NOT_STARTED} & trial.user_attrs.keys())


def answered(trial: optuna.trial.FrozenTrial) -> bool:
    """Finished with a new answer: a candidate measured, or failed by its own candidate."""
    return finished(trial) and not repeat(trial)


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Toward the study's trial count: answered, or still to finish (running or queued)."""
    return answered(trial) or trial.state in (TrialState.RUNNING, TrialState.WAITING)


def owner() -> dict:
    """Who runs a trial: enough to tell later, from the same host, whether that process is gone."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _alive(worker: dict) -> bool:
    try:
        return abs(psutil.Process(worker["pid"]).create_time() - worker["started"]) < 1.0
    except (psutil.NoSuchProcess, KeyError, TypeError):
        return False


def stopped_by(stop: KeyboardInterrupt) -> str:
    """What stopped a trial: Ctrl-C, or the termination signal cli.py turns into the same interruption."""
    return f"stopped by {stop.args[0]}" if stop.args else "stopped with Ctrl-C"


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """Queue the parameters of a trial that was cut short, so the next free process runs it again."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retry_reason": reason})


def note_interrupted(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Write why a running trial was cut short, before anyone fails it (a finished trial takes no attribute).
    False when it already finished (another process failed it first, or it ended after all)."""
    try:
        storage.set_trial_user_attr(trial_id, "interrupted", reason)
        return True
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def fail_and_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> bool:
    """Note, fail and retry a trial cut short. Only the process whose FAIL takes effect queues the retry, so a
    trial two processes (or two paths) find dead at once is retried exactly once."""
    if not note_interrupted(study._storage, trial._trial_id, reason):
        return False
    try:
        if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another process got there first, and retried it
    retry(study, trial, reason)
    return True


def retry_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna's heartbeat callback (planner.storage): a trial its stale-trial check failed (noted just before by
    the storage) is retried like any other cut short. Optuna calls it only in the process whose FAIL took effect."""
    retry(study, trial, trial.user_attrs.get("interrupted", STALE_REASON))


STALE_REASON = "its process sent no heartbeat for longer than the storage's grace period"
# How long (this process's own clock) a running trial may go without recording its owner before its process
# is taken for dead: a live one records it within a second of Optuna creating the trial.
OWNERLESS_SECONDS = 30.0


class Reaper:
    """Finds the running trials whose process died, in every way one can be seen to have, and hands each to
    `fail_and_retry`. One per process: it remembers when it first saw each ownerless trial."""

    def __init__(self, ownerless_seconds: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.ownerless_seconds = OWNERLESS_SECONDS if ownerless_seconds is None else ownerless_seconds
        self.clock = clock
        self.ownerless_since: dict[int, float] = {}

    def __call__(self, study: optuna.Study) -> list[int]:
        host, reaped = socket.gethostname(), []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            reason = self._dead(trial, host)
            if reason and fail_and_retry(study, trial, reason):
                reaped.append(trial.number)
        # Any host's process that stopped sending heartbeats (RDB storages): Optuna's check, through the planner's
        # storage, which notes each trial before failing it and retries it with `retry_stale`.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return reaped

    def _dead(self, trial: optuna.trial.FrozenTrial, host: str) -> str | None:
        worker = trial.user_attrs.get("worker")
        if worker is None:
            first = self.ownerless_since.setdefault(trial._trial_id, self.clock())
            if self.clock() - first >= self.ownerless_seconds:
                return (f"its process died before the trial recorded its owner (no owner for "
                        f"{self.ownerless_seconds:g} s)")
            return None
        self.ownerless_since.pop(trial._trial_id, None)
        if worker.get("host") == host and not _alive(worker):
            return f"process {worker.get('pid')} on {host} died during the trial"
        return None


def reap_dead(study: optuna.Study) -> list[int]:
    """Fail and retry the running trials whose process has died (e.g. killed with SIGKILL), once."""
    return Reaper()(study)


def rank(study: optuna.Study, number: int) -> int:
    """1-based position of trial `number` among the trials that count, in trial-number order."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.number <= number and counts(t))


def deadline_of(study: optuna.Study, timeout: float | None) -> float | None:
    """The end this process works to (epoch seconds): the nearer of the study's own deadline (`planner create
    --timeout`) and `timeout` seconds from now; None without either."""
    ends = (study.user_attrs.get(DEADLINE_ATTR), None if timeout is None else time.time() + timeout)
    return min([e for e in ends if e is not None], default=None)


@dataclass
class RunResult:
    ran: int = 0
    failed_in_a_row: int = 0
    late_in_a_row: int = 0
    last_failure: str = ""
    timed_out: bool = False
    exhausted: bool = False  # MAX_DRAWS draws per counted trial made: the space holds no more distinct candidates


def run_trials(study: optuna.Study, objective: Callable, target: int, timeout: float | None = None,
               callbacks: tuple = (), say: Callable[[str], None] = print) -> RunResult:
    """Run trials here until `target` trials count in the study (across every process), `timeout` seconds
    pass in this process, the study's own deadline (`planner create --timeout`) passes for every worker,
    `MAX_DRAWS` draws per counted trial were made, or `MAX_LATE_IN_A_ROW` draws in a row were predicted to run past
    the deadline."""
    ends = deadline_of(study, timeout)  # handed to each trial: a candidate predicted to run past it is not started
    result, waiting_said, current = RunResult(), False, {}
    reap = Reaper()

    def guarded(trial: optuna.Trial):
        current["number"] = trial.number
        trial.set_user_attr("worker", owner())
        if ends is not None:
            trial.set_user_attr(DEADLINE_ATTR, ends)
        if rank(study, trial.number) > target:
            trial.set_user_attr("surplus", f"the study already had {target} trials when this one started")
            raise optuna.TrialPruned()
        try:
            return objective(trial)
        except KeyboardInterrupt as stop:
            trial.set_user_attr("interrupted", stopped_by(stop))
            raise

    def after(study_, trial):
        if trial.state == TrialState.PRUNED and "surplus" in trial.user_attrs:
            return
        result.ran += 1
        failed = trial.state == TrialState.FAIL
        result.failed_in_a_row = result.failed_in_a_row + 1 if failed else 0
        result.late_in_a_row = result.late_in_a_row + 1 if NOT_STARTED in trial.user_attrs else 0
        if failed:
            result.last_failure = trial.user_attrs.get("failure", "unknown")
        for callback in callbacks:
            callback(study_, trial)

    while True:
        reaped = reap(study)
        if reaped:
            say(f"planner: trial(s) {', '.join(map(str, reaped))} were cut short by a dead process; retrying")
        trials = study.get_trials(deepcopy=False)
        done = sum(answered(t) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if done >= target:
            return result
        if sum(finished(t) for t in trials) >= MAX_DRAWS * target:
            result.exhausted = True
            return result
        if result.failed_in_a_row >= MAX_CONSECUTIVE_FAILURES:
            return result
        if ends is not None and time.time() >= ends:  # the one end the trials were handed
            result.timed_out = True
            return result
        if result.late_in_a_row >= MAX_LATE_IN_A_ROW:
            say(f"planner: the last {result.late_in_a_row} candidates drawn were predicted to run past the deadline: "
                "stopping before it")
            result.timed_out = True
            return result
        if done + running >= target:
            if not waiting_said:
                say(f"planner: waiting for {running} running trial(s) of other processes")
                waiting_said = True
            time.sleep(POLL_SECONDS)
            continue
        try:
            study.optimize(guarded, n_trials=1, catch=(Exception,), callbacks=[after], gc_after_trial=True)
        except KeyboardInterrupt as stop:
            cut = study.get_trials(deepcopy=False)[current["number"]] if "number" in current else None
            if cut is not None and cut.state == TrialState.FAIL and "interrupted" in cut.user_attrs:
                retry(study, cut, stopped_by(stop))
            raise
