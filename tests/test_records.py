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


def outcomes(database):
    return [row["outcome"] for row in records.query(database, "SELECT outcome FROM cycles")]


def test_a_record_after_the_database_was_replaced_goes_into_the_new_file(tmp_path):
    database = tmp_path / "records.sqlite"
    records.add(database, "cycles", {"started": records.utc_now(), "outcome": "before"})
    aside = tmp_path / "aside"
    aside.mkdir()
    for path in list(tmp_path.glob("records.sqlite*")):  # as a person moving it aside would
        path.rename(aside / path.name)

    records.add(database, "cycles", {"started": records.utc_now(), "outcome": "after"})

    assert outcomes(database) == ["after"]
    records.close_connections()
    assert outcomes(aside / "records.sqlite") == ["before"]


def test_records_added_inside_a_failed_outer_transaction_are_rolled_back_with_it(tmp_path):
    database = tmp_path / "records.sqlite"

    class Interrupted(Exception):
        pass

    try:
        with records.connect(database):
            records.add(database, "cycles", {"started": records.utc_now(), "outcome": "inner"})
            raise Interrupted
    except Interrupted:
        pass
    records.add(database, "cycles", {"started": records.utc_now(), "outcome": "next"})

    assert outcomes(database) == ["next"]


def test_a_failed_statement_leaves_the_records_usable(tmp_path):
    database = tmp_path / "records.sqlite"
    try:
        with records.connect(database) as connection:
            connection.execute("SELECT * FROM no_such_table")
    except sqlite3.OperationalError:
        pass

    records.add(database, "cycles", {"started": records.utc_now(), "outcome": "ok"})

    assert outcomes(database) == ["ok"]


def test_each_thread_writes_through_its_own_connection(tmp_path):
    import threading

    database = tmp_path / "records.sqlite"
    records.add(database, "cycles", {"started": records.utc_now(), "outcome": "main"})
    failures = []

    def add_from_a_thread():
        try:
            records.add(database, "cycles", {"started": records.utc_now(), "outcome": "thread"})
        except Exception as error:  # reported below: an assertion here would vanish with it
            failures.append(error)
        finally:
            records.close_connections()

    thread = threading.Thread(target=add_from_a_thread)
    thread.start()
    thread.join()

    assert failures == []
    assert sorted(outcomes(database)) == ["main", "thread"]


def test_a_thread_keeps_only_a_few_databases_open(tmp_path):
    databases = [
        tmp_path / f"{number}.sqlite" for number in range(records.MAX_HELD_CONNECTIONS + 5)
    ]
    for database in databases:
        records.add(database, "cycles", {"started": records.utc_now(), "outcome": database.stem})

    assert len(records._pool()) == records.MAX_HELD_CONNECTIONS
    assert [outcomes(database) for database in databases] == [[d.stem] for d in databases]
