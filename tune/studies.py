"""Where a sweep's Optuna studies live: an Optuna RDB storage (SQLite by default, a database server on
a cluster), one study per (task, method) named ``<experiment>/<task>/<method>``, so that several sweeps
share one storage and ``optuna-dashboard <storage>`` shows each study's Pareto front and trial table.

Only the sweep's driver writes to it (the searcher runs there). The checks made before a sweep starts
(:func:`normalise`, :func:`check_storage`, :func:`check_studies`) only read: a storage that does not
exist yet is created when the sweep starts, never by a refused command.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: environment default of ``--optuna-storage`` (set on the cluster's head to its PostgreSQL database)
ENV_STORAGE = "FINEGATES_OPTUNA_STORAGE"
ACCEPTED = ("accepted: sqlite:///<path of a database file> or the SQLAlchemy URL of a database server "
            "(postgresql://user:password@host:port/db)")
#: seconds a SQLite writer waits for a lock (optuna-dashboard may be reading); a server's connect timeout
SQLITE_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 5


class StorageError(ValueError):
    """A bad ``--optuna-storage``. One-line message."""


def study_name(experiment: str, task: str, method: str) -> str:
    return f"{experiment}/{task}/{method}"


def default_storage(mlflow_uri: str) -> str:
    """``$FINEGATES_OPTUNA_STORAGE``, else ``optuna.db`` beside the MLflow SQLite database, else
    ``<cwd>/optuna.db`` (an MLflow server or a directory store)."""
    env = os.environ.get(ENV_STORAGE)
    if env:
        return env
    if mlflow_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(mlflow_uri[len('sqlite:///'):]).resolve().parent / 'optuna.db'}"
    return f"sqlite:///{Path('optuna.db').resolve()}"


def _shown(url: Any) -> str:
    return url.render_as_string(hide_password=True)


def normalise(storage: str) -> str:
    """The storage URL with a SQLite path made absolute. Raises :class:`StorageError` (one line) for a
    string that is no database URL, an in-memory SQLite, an unknown dialect or a missing driver."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(storage)
    except (ArgumentError, ValueError):
        raise StorageError(f"--optuna-storage {storage!r} is not a database URL; {ACCEPTED}") from None
    try:
        dialect = url.get_dialect()
        dialect.import_dbapi()
    except NoSuchModuleError:
        raise StorageError(f"--optuna-storage {_shown(url)!r}: unknown database {url.drivername!r}; "
                           f"{ACCEPTED}") from None
    except ImportError as e:
        raise StorageError(f"--optuna-storage {_shown(url)!r}: its driver is not installed ({e}); install it "
                           "or name an installed one (postgresql+psycopg2://...), or use sqlite:///<path>") from None
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:") or url.database.startswith("file::memory:"):
            raise StorageError(f"--optuna-storage {storage!r} is an in-memory database: the studies would not "
                               f"outlive the sweep; {ACCEPTED}")
        url = url.set(database=str(Path(url.database).expanduser().resolve()))
    return url.render_as_string(hide_password=False)


def _read_engine(storage: str):
    """A SQLAlchemy engine that cannot write (SQLite opened read-only; a server with a connect timeout)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    if url.get_backend_name() == "sqlite":
        return create_engine(f"sqlite:///file:{url.database}?mode=ro&uri=true")
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() in ("postgresql", "mysql") else {}
    return create_engine(url, connect_args=args)


def check_storage(storage: str) -> list[str]:
    """One-line problems of a normalised storage URL: a SQLite path that is a directory or cannot be
    created, a file that is no SQLite database, a server that does not answer, a database that holds
    another application's tables (the MLflow store, say). Reads only."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from finegates.preflight import check_output_dir

    url = make_url(storage)
    shown = _shown(url)
    if url.get_backend_name() == "sqlite":
        db = Path(url.database)
        if db.is_dir():
            return [f"--optuna-storage {shown!r}: {str(db)!r} is a directory; accepted: sqlite:///<path of a "
                    "database file>"]
        if not db.exists():
            return check_output_dir(db, "--optuna-storage")  # its folders can be created
    engine = _read_engine(storage)
    try:
        with engine.connect() as con:
            tables = set(inspect(con).get_table_names())
    except SQLAlchemyError as e:
        why = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:200]
        what = "is not a readable SQLite database" if url.get_backend_name() == "sqlite" else "is unreachable"
        return [f"--optuna-storage {shown!r} {what} ({type(getattr(e, 'orig', None) or e).__name__}: {why}); "
                f"{ACCEPTED}"]
    finally:
        engine.dispose()
    if tables and "studies" not in tables:
        return [f"--optuna-storage {shown!r} holds tables of another application ({', '.join(sorted(tables)[:3])}, "
                "...): not an Optuna storage; accepted: a database of its own (default: optuna.db beside mlflow.db)"]
    return []


def trial_counts(storage: str) -> dict[str, int]:
    """Study name -> number of trials, for every study in the storage ({} when it does not exist yet).
    Reads Optuna's tables directly (``studies``, ``trials``), so that nothing is created or migrated."""
    from sqlalchemy import inspect, text
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    if url.get_backend_name() == "sqlite" and not Path(url.database).is_file():
        return {}
    engine = _read_engine(storage)
    try:
        with engine.connect() as con:
            if "studies" not in inspect(con).get_table_names():
                return {}
            rows = con.execute(text("SELECT s.study_name, count(t.trial_id) FROM studies s LEFT JOIN trials t "
                                    "ON t.study_id = s.study_id GROUP BY s.study_name")).all()
    finally:
        engine.dispose()
    return {name: int(n) for name, n in rows}


def check_studies(storage: str, names: list[str], resuming: bool) -> list[str]:
    """A fresh sweep must not mix into studies of the same name that already have trials; a resumed
    sweep needs its studies in this storage."""
    from sqlalchemy.engine import make_url

    counts = trial_counts(storage)
    shown = _shown(make_url(storage))
    if resuming:
        if not any(n in counts for n in names):
            return [f"--resume: the sweep's Optuna studies ({names[0]}, ...) are not in --optuna-storage {shown!r}; "
                    "accepted: the --optuna-storage the sweep started with"]
        return []
    taken = [n for n in names if counts.get(n)]
    if taken:
        return [f"Optuna study {taken[0]!r} already has {counts[taken[0]]} trials in {shown!r}; accepted: --resume "
                "to continue that sweep, or another --experiment or --optuna-storage"]
    return []


def open_storage(storage: str):
    """The sweep's :class:`optuna.storages.RDBStorage` (created when absent; SQLite waits for locks)."""
    import optuna
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    if url.get_backend_name() == "sqlite":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        kwargs = {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(storage, engine_kwargs=kwargs)
