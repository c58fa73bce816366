"""Study storage behind one interface: any Optuna storage URL, SQLite under studies/ by default.

- `sqlite:///studies/NAME.db` (default) and other SQLAlchemy URLs such as `postgresql://user@host/db`
  (several machines) go to Optuna's RDBStorage, with a heartbeat so a killed worker's trial is noted, failed
  and retried once (`NotingRDBStorage`, `workers.retry_stale`);
- `journal:PATH` (or a path ending in .log / .journal) is a journal file, safe for several processes on
  one machine.
Every Optuna tool (optuna-dashboard included) opens these stores as they are.
"""
from __future__ import annotations

from pathlib import Path

import optuna

from planner import workers
from planner.errors import PlannerError, first_line

STUDIES_DIR = Path("studies")
HEARTBEAT_SECONDS = 60
JOURNAL_PREFIX = "journal:"
# An unreachable database server fails in seconds rather than hanging (psycopg, PyMySQL).
CONNECT_ARGS = {"connect_timeout": 10}
# How long a process waits for another's SQLite transaction before "database is locked" (a busy machine can
# hold one for seconds; pysqlite's default is 5 s).
SQLITE_WAIT_SECONDS = 60
RDB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2", "mysql", "mysql+pymysql")


def default_storage_url(study_name: str) -> str:
    return f"sqlite:///{STUDIES_DIR / study_name}.db"


def open_storage(url: str, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """An Optuna storage for the URL; problems become one-line PlannerErrors. With must_exist, a file
    storage that is not there is an error instead of a new empty store (for review and export)."""
    if url.startswith(JOURNAL_PREFIX) or url.endswith((".log", ".journal")):
        path = Path(url.removeprefix(JOURNAL_PREFIX)).expanduser()
        _require_folder(path.parent, url)
        _require_file(path, url, must_exist)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in RDB_SCHEMES:
        raise PlannerError(f"storage '{url}' is not a storage URL (use sqlite:///PATH.db, postgresql://..., "
                           "or journal:PATH)")
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path:
            raise PlannerError(f"storage '{url}' names no database file (use sqlite:///PATH.db)")
        _require_folder(Path(path).expanduser().parent, url, create=Path(path).parent == STUDIES_DIR)
        _require_file(Path(path).expanduser(), url, must_exist)
    if scheme == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; planner installs psycopg (3).
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    sqlite = scheme == "sqlite"
    try:
        storage = NotingRDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=2 * HEARTBEAT_SECONDS,
            heartbeat_stale_trial_callback=workers.retry_stale,
            engine_kwargs={"connect_args": {"timeout": SQLITE_WAIT_SECONDS, "isolation_level": None}} if sqlite
            else {"pool_pre_ping": True, "connect_args": CONNECT_ARGS},
        )
    except Exception as exc:  # noqa: BLE001 - driver/connection errors become one line
        raise PlannerError(f"cannot open storage {_shown(url)}: {first_line(exc)}") from None
    if sqlite:
        serialize_transactions(storage.engine)
    return storage


class NotingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose stale-trial check notes each stale trial as `interrupted` while it still runs.

    Optuna fails a trial whose heartbeat went stale in `fail_stale_trials`, which every process calls, and
    Optuna's own trial loop calls it too (before each trial): a finished trial takes no attribute, so the note
    is written here, between finding a trial stale and failing it, whichever path called the check."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        return [trial_id for trial_id in stale if workers.note_interrupted(self, trial_id, workers.STALE_REASON)]


def serialize_transactions(engine) -> None:
    """Begin every SQLite transaction IMMEDIATE: with the write lock, so no other process reads between its
    reads and its writes. Optuna claims a queued trial by reading that it is WAITING and then writing RUNNING,
    with SELECT ... FOR UPDATE to keep others out, which SQLite ignores; and pysqlite opens a transaction only at
    the first write. So two workers could both read WAITING and both run the trial, and the second to finish
    stopped with "Cannot tell a COMPLETE trial" (optuna/optuna#4002; seen on a busy machine). The connections are
    opened in autocommit mode (isolation_level None) so pysqlite's own BEGIN does not come first."""
    import sqlalchemy

    sqlalchemy.event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))


def _shown(url: str) -> str:
    """A database URL as it may be printed: without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse has no password to hide
        return url


def _require_folder(folder: Path, url: str, create: bool = False) -> None:
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir():
        raise PlannerError(f"storage {url}: folder {folder} does not exist")


def _require_file(path: Path, url: str, must_exist: bool) -> None:
    if must_exist and not path.is_file():
        raise PlannerError(f"storage {url}: {path} does not exist (no study has been stored there)")


def list_studies(url: str | None = None) -> list[dict]:
    """Name, trial count and storage of every study in `url`, or without one in every studies/*.db."""
    urls = [url] if url else [f"sqlite:///{p}" for p in sorted(STUDIES_DIR.glob("*.db"))]
    return [{"study": s.study_name, "trials": s.n_trials, "storage": u}
            for u in urls for s in optuna.get_all_study_summaries(open_storage(u, must_exist=True))]
