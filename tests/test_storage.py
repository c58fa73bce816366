import optuna
import pytest

from planner.errors import PlannerError
from planner.samplers import SAMPLERS, make_sampler
from planner.storage import default_storage_url, open_storage


def _run(storage, name, n):
    study = optuna.create_study(storage=storage, study_name=name, directions=["minimize", "minimize"],
                                load_if_exists=True, sampler=make_sampler("random", seed=1))
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=n)
    return study


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_studies_persist_and_resume(tmp_path, kind):
    url = f"sqlite:///{tmp_path}/s.db" if kind == "sqlite" else f"journal:{tmp_path}/s.journal"
    _run(open_storage(url), "demo", 3)
    study = _run(open_storage(url), "demo", 2)  # a second process would reopen it the same way
    assert len(study.trials) == 5


def test_default_url_lives_under_studies():
    assert default_storage_url("demo") == "sqlite:///studies/demo.db"


@pytest.mark.parametrize("url, message", [
    ("mongodb://host/db", "is not a storage URL"),
    ("studies/demo.db", "is not a storage URL"),
    ("sqlite://", "names no database file"),
    ("sqlite:////nonexistent/dir/x.db", "folder /nonexistent/dir does not exist"),
    ("journal:/nonexistent/dir/x.log", "folder /nonexistent/dir does not exist"),
    ("postgresql://nobody@127.0.0.1:9/none", "cannot open storage"),
])
def test_bad_storage_urls_are_one_line(url, message):
    with pytest.raises(PlannerError, match=message) as info:
        open_storage(url)
    assert "\n" not in str(info.value)


def test_samplers_by_name_and_seed():
    assert set(SAMPLERS) == {"tpe", "nsga2", "random"}
    assert isinstance(make_sampler("nsga2", n_trials=40), optuna.samplers.NSGAIISampler)
    assert isinstance(make_sampler(), optuna.samplers.TPESampler)
    with pytest.raises(PlannerError, match="unknown sampler 'cmaes'"):
        make_sampler("cmaes")
    a = optuna.create_study(sampler=make_sampler("tpe", seed=3))
    b = optuna.create_study(sampler=make_sampler("tpe", seed=3))
    for study in (a, b):
        study.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.3) ** 2, n_trials=12)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]


def test_a_queued_trial_is_claimed_by_one_process_only(tmp_path):
    """Two processes' storages on one SQLite file: while one is between reading that a queued trial is WAITING
    and claiming it, the other's claim waits for it, then finds the trial taken. (Without IMMEDIATE transactions
    both claimed it, both ran it, and the second to finish failed with "Cannot tell a COMPLETE trial".)"""
    import threading

    from optuna.trial import TrialState
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path}/race.db"
    first, second = open_storage(url), open_storage(url)
    study = optuna.create_study(storage=first, study_name="race")
    study.enqueue_trial({"x": 1.0})
    trial_id = first.get_all_trials(study._study_id)[0]._trial_id
    claims = {}
    claimer = threading.Thread(target=lambda: claims.update(
        second=second.set_trial_state_values(trial_id, TrialState.RUNNING)))
    with first.engine.connect() as connection, connection.begin():
        read = text("SELECT state FROM trials WHERE trial_id = :id")
        assert connection.execute(read, {"id": trial_id}).scalar_one() == "WAITING"
        claimer.start()
        claimer.join(1.0)
        assert claimer.is_alive() and claims == {}  # the other process waits for this transaction to end
        connection.execute(text("UPDATE trials SET state = 'RUNNING' WHERE trial_id = :id"), {"id": trial_id})
    claimer.join(30)
    assert claims == {"second": False}  # it found the trial running: one process runs it
