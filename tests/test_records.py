"""The records database: tables are made on first use, also in a database from an older version."""

from __future__ import annotations

import sqlite3

import records


def test_older_database_without_the_schema_marker_gets_the_missing_tables(tmp_path):
    database = tmp_path / "records.sqlite"
    connection = sqlite3.connect(database)
    connection.execute(records.SCHEMA["ingestions"])  # made before the other tables existed
    connection.close()

    records.add(database, "cycles", {"started": records.utc_now(), "outcome": "ok"})

    assert records.query(database, "SELECT outcome FROM cycles") == [{"outcome": "ok"}]
