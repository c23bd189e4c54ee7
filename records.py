"""The records database: what every stage did and measured, in one SQLite file beside the outputs.

Each stage adds rows (an ingestion per file, a roster snapshot, a training, a score, a deployment, a
diagnostics run, a pipeline cycle, an alert delivered or not, a risk list and its track record) so
that the report can draw trends and a person can see what happened with `sqlite3`.
Times are UTC ISO-8601 strings; structured details are stored as JSON text.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from errors import StorageError

# Stored in the database's user_version once its tables exist; raise it when SCHEMA gains a table.
SCHEMA_VERSION = 7

SCHEMA = {
    "ingestions": """
        CREATE TABLE IF NOT EXISTS ingestions (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            time TEXT NOT NULL,
            file TEXT NOT NULL,
            checksum TEXT NOT NULL,
            size INTEGER,
            mtime_ns INTEGER,
            status TEXT NOT NULL,          -- ingested | rejected
            rows_read INTEGER NOT NULL DEFAULT 0,
            accepted INTEGER NOT NULL DEFAULT 0,
            duplicate INTEGER NOT NULL DEFAULT 0,
            quarantined INTEGER NOT NULL DEFAULT 0,
            missing_cells INTEGER NOT NULL DEFAULT 0,
            reason TEXT
        )""",
    "rosters": """
        CREATE TABLE IF NOT EXISTS rosters (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            time TEXT NOT NULL,
            file TEXT NOT NULL,
            checksum TEXT NOT NULL,
            snapshot INTEGER NOT NULL,        -- its number in the snapshot column of rosters.csv
            master_position INTEGER NOT NULL, -- master rows known when it arrived: those are older
            rows_read INTEGER NOT NULL,
            clients INTEGER NOT NULL,         -- current clients it lists (one row each)
            duplicate_ids INTEGER NOT NULL,   -- rows left out because a later row had the same id
            new_clients INTEGER NOT NULL,     -- ids in no earlier labeled row or roster
            quarantined INTEGER NOT NULL
        )""",
    "trainings": """
        CREATE TABLE IF NOT EXISTS trainings (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            model_version TEXT NOT NULL,
            data_checksum TEXT NOT NULL,
            rows INTEGER NOT NULL,
            threshold REAL NOT NULL,
            seconds REAL,
            details TEXT
        )""",
    "scores": """
        CREATE TABLE IF NOT EXISTS scores (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            purpose TEXT NOT NULL,         -- test | drift-check | candidate | ...
            model_version TEXT,
            model_path TEXT NOT NULL,
            data_path TEXT NOT NULL,
            data_checksum TEXT,
            rows INTEGER NOT NULL,
            f1 REAL NOT NULL,
            f1_low REAL,
            f1_high REAL,
            precision REAL,
            recall REAL,
            roc_auc REAL,
            leaver_share REAL,
            threshold REAL
        )""",
    "deployments": """
        CREATE TABLE IF NOT EXISTS deployments (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            action TEXT NOT NULL,          -- deploy | rollback
            version TEXT NOT NULL,
            previous_version TEXT,
            f1 REAL
        )""",
    "stage_runs": """
        CREATE TABLE IF NOT EXISTS stage_runs (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            stage TEXT NOT NULL,           -- ingestion | training | scoring | deployment | reporting
            seconds REAL NOT NULL,
            rows INTEGER                   -- rows the stage worked on, where that means something
        )""",
    "diagnostics": """
        CREATE TABLE IF NOT EXISTS diagnostics (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            model_version TEXT,
            payload TEXT NOT NULL
        )""",
    "cycles": """
        CREATE TABLE IF NOT EXISTS cycles (
            id INTEGER PRIMARY KEY,
            started TEXT NOT NULL,
            finished TEXT,
            seconds REAL,
            new_files TEXT,
            decision TEXT,
            details TEXT,
            release TEXT,
            outcome TEXT NOT NULL,
            message TEXT
        )""",
    "calibrations": """
        CREATE TABLE IF NOT EXISTS calibrations (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            purpose TEXT NOT NULL,         -- as in scores: test (the release's own) | ...
            model_version TEXT,
            data_path TEXT NOT NULL,
            rows INTEGER NOT NULL,
            brier REAL NOT NULL,
            ece REAL NOT NULL,             -- expected calibration error over the curve's bins
            curve TEXT NOT NULL            -- JSON, per bin: low, high, rows, mean_predicted,
                                           -- observed_share
        )""",
    "estimates": """
        CREATE TABLE IF NOT EXISTS estimates (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            roster TEXT NOT NULL,          -- the roster file estimated on
            model_version TEXT NOT NULL,   -- the release whose predictions are estimated
            master_rows INTEGER NOT NULL,  -- rows of finaldata.csv then: later rows bring outcomes
            rows INTEGER NOT NULL,
            threshold REAL NOT NULL,
            f1 REAL NOT NULL, f1_low REAL, f1_high REAL,
            precision REAL, precision_low REAL, precision_high REAL,
            recall REAL, recall_low REAL, recall_high REAL,
            leaver_share REAL, leaver_share_low REAL, leaver_share_high REAL,
            predicted_leaver_share REAL,
            release_f1 REAL, release_f1_low REAL, release_f1_high REAL,
            allowed_drop REAL,
            estimated_drop INTEGER,        -- 1: the estimated F1 fell beyond noise
            covariate_drift INTEGER,       -- 1: its features drifted from the training sample
            warning INTEGER,               -- 1: an early warning was raised
            drift TEXT,                    -- JSON: per-feature drift against the training sample
            realised_time TEXT,            -- filled in when outcomes of its clients arrive
            realised_rows INTEGER,         -- clients whose outcome is known
            realised_f1 REAL, realised_precision REAL, realised_recall REAL,
            realised_leaver_share REAL,
            estimated_f1_known REAL        -- the estimate for those same clients
        )""",
    "estimate_predictions": """
        CREATE TABLE IF NOT EXISTS estimate_predictions (
            id INTEGER PRIMARY KEY,
            estimate_id INTEGER NOT NULL,  -- estimates.id
            client TEXT NOT NULL,
            probability REAL NOT NULL,
            predicted INTEGER NOT NULL
        )""",
    "call_lists": """
        CREATE TABLE IF NOT EXISTS call_lists (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            model_version TEXT NOT NULL,      -- the release that ranked it
            roster TEXT,                      -- the newest roster snapshot it ranks (file), if any
            master_rows INTEGER NOT NULL,     -- the data it was made from: rows of finaldata.csv
            roster_rows INTEGER NOT NULL,     -- ... and of rosters.csv
            ranked INTEGER NOT NULL,          -- current clients ranked
            from_rosters INTEGER NOT NULL,    -- ... whose newest row is a roster snapshot
            left_not_ranked INTEGER NOT NULL, -- clients whose newest row says they left
            top_n INTEGER NOT NULL,
            top_clients TEXT NOT NULL,        -- JSON list of the top group, highest risk first
            data_stamp TEXT NOT NULL,         -- release and data sizes: is the list current?
            file_stamp TEXT                   -- riskscores.csv as written (size, mtime)
        )""",
    "call_list_results": """
        CREATE TABLE IF NOT EXISTS call_list_results (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            list_id INTEGER NOT NULL,         -- call_lists.id
            outcomes_through INTEGER NOT NULL, -- master rows read for outcomes
            top_known INTEGER NOT NULL,       -- clients of the top group whose outcome arrived
            top_left INTEGER NOT NULL,        -- ... of whom left
            ranked_known INTEGER NOT NULL,    -- ranked clients whose outcome arrived
            ranked_left INTEGER NOT NULL,
            precision REAL,                   -- top_left / top_known
            precision_low REAL,
            precision_high REAL,
            leaver_share REAL,                -- ranked_left / ranked_known
            lift REAL,                        -- precision / leaver_share
            lift_low REAL,
            lift_high REAL
        )""",
    "alerts": """
        CREATE TABLE IF NOT EXISTS alerts (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            event TEXT NOT NULL,           -- drift | deployed | cycle-failed | ... (alerts.py)
            key TEXT NOT NULL,             -- the condition; a sent key is not repeated for a while
            text TEXT NOT NULL,
            payload TEXT,                  -- the JSON delivered
            channel TEXT NOT NULL,         -- webhook | command
            status TEXT NOT NULL,          -- sent | failed
            attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            exit_code INTEGER
        )""",
}


# Lookups in tables that grow by thousands of rows a cycle: without an index each reads the whole
# table (a year of weekly rosters of 10,000 clients is half a million predictions).
INDEXES = (
    # Holds every column estimation.record_realised reads: it matches predictions by client.
    "CREATE INDEX IF NOT EXISTS estimate_predictions_by_client "
    "ON estimate_predictions (client, estimate_id, predicted, probability)",
)

# Columns added to tables after their first release; databases made earlier gain them on connect.
ADDED_COLUMNS = {
    "scores": {
        "roc_auc_low": "REAL",
        "roc_auc_high": "REAL",
        "top_rows": "INTEGER",
        "top_precision": "REAL",
        "top_precision_low": "REAL",
        "top_precision_high": "REAL",
    },
}


def utc_now() -> str:
    """The current time as a UTC ISO-8601 string, the form every record uses."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def connect(database: Path) -> Iterator[sqlite3.Connection]:
    """The records database, its tables made; commit on success, roll back on error.

    The connection stays open for this thread's next use of the same file (see _Held). A connect()
    inside another one of the same thread shares its transaction: it commits when the outer ends.
    A full disk or a database another process keeps locked is a StorageError naming what to free.
    """
    database = Path(database)
    try:
        held = _held(database)
        if held.depth:
            held.depth += 1
            try:
                yield held.connection
            finally:
                held.depth -= 1
            return
        held.depth = 1
        try:
            with held.connection:
                yield held.connection
        except sqlite3.Error:
            _forget(held)  # whatever went wrong, the next use starts from a new connection
            raise
        finally:
            held.depth = 0
    except sqlite3.OperationalError as error:
        storage_error = _storage_error(database, error)
        if storage_error is None:
            raise
        raise storage_error from error


class _Held:
    """An open connection to one database file, kept for this thread's next connect().

    Opening one, setting WAL mode and closing it (which checkpoints the log) took ~1.7 ms here; an
    insert and its commit on an open one ~0.04 ms. A drift cycle uses the records ~45 times.
    """

    def __init__(self, database: Path, connection: sqlite3.Connection) -> None:
        self.key = _key(database)
        self.connection = connection
        self.file = _file_identity(database)  # a file replaced or removed gets a new connection
        self.depth = 0  # connect() calls of this thread inside one another


# Connections are per thread (sqlite3 refuses to share one) and per process: after a fork the
# parent's connections are left alone, neither used nor closed, as SQLite requires.
_threads = threading.local()
_left_by_parent: list[_Held] = []
# Beyond this many files a thread keeps open, the least recently used one is closed (the test
# suite alone opens thousands of databases in one process).
MAX_HELD_CONNECTIONS = 8


def _held(database: Path) -> _Held:
    pool = _pool()
    key = _key(database)
    held = pool.get(key)
    if held is not None and not held.depth and held.file != _file_identity(database):
        _forget(held)
        held = None
    if held is None:
        held = pool[key] = _Held(database, _open(database))
        for stale in [h for h in pool.values() if not h.depth][:-MAX_HELD_CONNECTIONS]:
            _forget(stale)
    pool[key] = pool.pop(key)  # the most recently used last
    return held


def _pool() -> dict[str, _Held]:
    if getattr(_threads, "pid", None) != os.getpid():
        _left_by_parent.extend(getattr(_threads, "pool", {}).values())
        _threads.pool, _threads.pid = {}, os.getpid()
    return _threads.pool


def _open(database: Path) -> sqlite3.Connection:
    database.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(database, timeout=30)
    try:
        connection.row_factory = sqlite3.Row
        # WAL lets the API read while a cycle writes; in WAL mode NORMAL sync cannot corrupt the
        # database and spares an fsync per record, which the 10-minute no-op cycle would pay.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        _create_tables(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def _forget(held: _Held) -> None:
    _pool().pop(held.key, None)
    held.connection.close()


def close_connections() -> None:
    """Close this thread's open connections (each is opened again when next used)."""
    for held in list(_pool().values()):
        _forget(held)


# Closing the last connection checkpoints the write-ahead log into the database and removes it.
atexit.register(close_connections)


def _key(database: Path) -> str:
    return os.path.abspath(database)


def _file_identity(database: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(database)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def _storage_error(database: Path, error: sqlite3.OperationalError) -> StorageError | None:
    """The actionable form of a full disk or a held lock; None for any other database error."""
    text = str(error).lower()
    if "disk is full" in text:  # SQLITE_FULL: "database or disk is full"
        return StorageError(
            f"the records database {database} cannot grow: the disk holding {database.parent} is "
            "full; free space there (old logs, source files already ingested, releases beyond "
            "deployment.keep_releases) and run again"
        )
    if "database is locked" in text:
        return StorageError(
            f"the records database {database} stayed locked for 30 s: another process holds a "
            "write transaction open (an `sqlite3` shell with an unfinished transaction?); end it "
            "and run again"
        )
    return None


def _create_tables(connection: sqlite3.Connection) -> None:
    """Create the tables a database lacks; one that has them all says so in its user_version.

    Checking the marker spares the cron no-op cycle the CREATE statements on every connection.
    """
    if connection.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    for statement in SCHEMA.values():
        connection.execute(statement)
    for table, columns in ADDED_COLUMNS.items():
        present = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        for column, kind in columns.items():
            if column not in present:
                connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    for statement in INDEXES:
        connection.execute(statement)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def add(database: Path, table: str, values: Mapping[str, Any]) -> int:
    """Insert one record into `table`; dict and list values are stored as JSON. Returns its id."""
    if table not in SCHEMA:
        raise ValueError(f"no table {table!r} in the records database")
    columns = list(values)
    row = [_to_column(values[c]) for c in columns]
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )
    with connect(database) as connection:
        return int(connection.execute(sql, row).lastrowid)


def add_many(
    database: Path, table: str, columns: list[str], rows: Iterable[tuple[Any, ...]]
) -> None:
    """Insert many records of plain values into `table` in one transaction."""
    if table not in SCHEMA:
        raise ValueError(f"no table {table!r} in the records database")
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )
    with connect(database) as connection:
        connection.executemany(sql, rows)


def add_all(database: Path, rows_by_table: Mapping[str, list[Mapping[str, Any]]]) -> None:
    """Insert records into several tables in one transaction: all of them are stored, or none."""
    unknown = sorted(set(rows_by_table) - set(SCHEMA))
    if unknown:
        raise ValueError(f"no table {', '.join(unknown)} in the records database")
    with connect(database) as connection:
        for table, rows in rows_by_table.items():
            if not rows:
                continue
            columns = list(rows[0])
            sql = (
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)})"
            )
            connection.executemany(sql, [[_to_column(row[c]) for c in columns] for row in rows])


def update(database: Path, table: str, record_id: int, values: Mapping[str, Any]) -> None:
    """Change fields of one record, e.g. to finish a cycle record started earlier."""
    if table not in SCHEMA:
        raise ValueError(f"no table {table!r} in the records database")
    assignments = ", ".join(f"{column} = ?" for column in values)
    row = [_to_column(v) for v in values.values()] + [record_id]
    with connect(database) as connection:
        connection.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", row)


def query(database: Path, sql: str, parameters: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a SELECT as dicts; an absent database has no rows."""
    if not Path(database).exists():
        return []
    with connect(database) as connection:
        return [dict(row) for row in connection.execute(sql, parameters)]


def add_stage_run(database: Path, stage: str, seconds: float, rows: int | None = None) -> None:
    """Record how long a stage took when it really ran, so diagnostics read timings, not redo them."""
    add(database, "stage_runs",
        {"time": utc_now(), "stage": stage, "seconds": round(seconds, 4), "rows": rows})


def _to_column(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, Path):
        return str(value)
    return value
