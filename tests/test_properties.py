"""Properties of the data contract, over inputs nobody thought to write down (Hypothesis).

Every input row ends as an accepted row or as a quarantined row with a reason: never an exception,
never lost, never both.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import calllist
from dataset import (
    MAX_COUNT,
    MISSING_MARKERS,
    SMALL_COLUMN,
    RowHashes,
    as_numbers,
    first_sightings,
    frame_of,
    is_missing,
    parse_rows,
    read_chunks,
    read_header,
)
from ingestion import split_rows
from settings import Schema

SCHEMA = Schema()
# No example database in the repository; a slow first example (pandas warming up) is no failure.
CHECKS = settings(
    max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# Cells as files bring them: numbers of every shape and size, the spellings of a missing value and
# of a label, and any text at all (but NUL and lone surrogates, which no UTF-8 text file holds).
any_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12
)
number_text = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.integers(-(10**400), 10**400).map(str),
    st.floats().map(repr),
    st.sampled_from(
        ["inf", "-Infinity", "1e400", "1e20", "2.5", " 7 ", "0x10", "1_000", "٣", "+3"]
    ),
)
label_text = st.sampled_from(
    ["0", "1", "yes", "No", "y", "TRUE", "false", "1.0", "maybe", "2", " 1 "]
)
cell = st.one_of(number_text, label_text, st.sampled_from(MISSING_MARKERS), any_text)
row = st.fixed_dictionaries({column: st.one_of(st.none(), cell) for column in SCHEMA.columns})


@CHECKS
@given(st.lists(row, min_size=1, max_size=40))
def test_every_row_is_valid_or_has_a_reason(rows):
    cells = {c: np.array([r[c] for r in rows], dtype=object) for c in SCHEMA.columns}

    values, reasons = parse_rows(cells, pd.RangeIndex(len(rows)), SCHEMA)

    assert reasons.index.is_unique and (reasons.str.len() > 0).all()
    valid = np.setdiff1d(np.arange(len(rows)), reasons.index)
    typed = frame_of({c: v[valid] for c, v in values.items()}, SCHEMA.columns, SCHEMA, valid)
    assert typed["corporation"].notna().all()
    assert typed["exited"].isin([0, 1]).all()
    for column in SCHEMA.count_columns:
        counts = typed[column].dropna()
        assert ((counts >= 0) & (counts <= MAX_COUNT)).all()


@settings(CHECKS, max_examples=50)  # each example reads a file with pandas, chunk by chunk
@given(
    st.lists(
        st.tuples(row, st.lists(st.one_of(st.just(""), any_text), max_size=3)),
        min_size=1, max_size=25,
    ),
    st.integers(4, 16),
)
def test_every_line_of_a_file_is_accepted_or_quarantined_with_a_reason(lines, chunk_rows):
    text = io.StringIO()
    writer = csv.writer(text)  # quotes a field holding \r or \n, which would end its line
    writer.writerow(SCHEMA.columns)
    for cells, extra_fields in lines:
        writer.writerow([cells[c] if cells[c] is not None else "" for c in SCHEMA.columns]
                        + extra_fields)
    stream = io.BytesIO(text.getvalue().encode())

    columns = read_header(stream, name="the file")
    accepted = quarantined = 0
    for chunk in read_chunks(stream, columns, SCHEMA, name="the file", chunk_rows=chunk_rows):
        valid, bad = split_rows(chunk, SCHEMA, "the file")
        accepted += len(valid)
        if bad is not None:
            quarantined += len(bad)
            assert (bad["reason"].str.len() > 0).all()
            assert not set(bad.index) & set(valid.index)

    assert accepted + quarantined == len(lines)


# Cells as a JSON request brings them: numbers of any size, text, null, and NaN.
json_cell = st.one_of(
    st.none(), st.integers(-(10**30), 10**30), st.floats(), cell, st.just(float("nan"))
)


@CHECKS
@given(st.lists(json_cell, min_size=1, max_size=20))
def test_a_short_column_is_read_as_pandas_reads_a_long_one(cells):
    short = np.array(cells + [None], dtype=object)[:-1]  # objects, whatever the cells are
    long = np.array(cells * SMALL_COLUMN + [None], dtype=object)[:-1]  # pandas' own path

    assert np.array_equal(is_missing(short), is_missing(long)[: len(cells)])
    assert np.array_equal(as_numbers(short), as_numbers(long)[: len(cells)], equal_nan=True)


@CHECKS
@given(st.lists(st.integers(0, 2**64 - 1)), st.lists(st.integers(0, 2**64 - 1)))
def test_row_hashes_know_exactly_the_hashes_added(added, asked):
    hashes = RowHashes()
    for half in (added[: len(added) // 2], added[len(added) // 2 :]):
        hashes.add(np.array(half, dtype=np.uint64))

    found = hashes.contains(np.array(asked, dtype=np.uint64))

    assert found.tolist() == [value in set(added) for value in asked]


@CHECKS
@given(st.lists(st.integers(0, 20)), st.lists(st.integers(0, 20)))
def test_first_sightings_are_rows_neither_seen_before_nor_repeated(seen_before, rows):
    seen = RowHashes()
    seen.add(np.array(seen_before, dtype=np.uint64))

    first = first_sightings(np.array(rows, dtype=np.uint64), seen)

    expected = [
        value not in seen_before and value not in rows[:position]
        for position, value in enumerate(rows)
    ]
    assert first.tolist() == expected


# --- The risk list's CSV writer ----------------------------------------------------------------

list_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)


@st.composite
def list_tables(draw: st.DrawFn) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Tables shaped like a risk list: ranks, ids (some already encoded, as the ranking passes
    them), probabilities, a nullable rank, and text of few distinct values as categories."""
    rows = draw(st.integers(0, 30))
    ids = draw(st.lists(list_text, min_size=rows, max_size=rows, unique=True))
    words = draw(st.lists(list_text, min_size=1, max_size=4, unique=True))
    before = draw(
        st.lists(st.one_of(st.none(), st.integers(0, 10**9)), min_size=rows, max_size=rows)
    )
    table = pd.DataFrame({
        "rank": np.arange(1, rows + 1),
        "id": pd.Series(ids, dtype=object),
        "probability": draw(st.lists(
            st.one_of(st.floats(0, 1), st.just(float("nan"))), min_size=rows, max_size=rows
        )),
        "reason": pd.Categorical.from_codes(
            draw(st.lists(st.integers(0, len(words) - 1), min_size=rows, max_size=rows)), words
        ),
        "rank_before": pd.array(before, dtype="Int64"),
    })
    encoded = calllist._utf8(table["id"].to_numpy(dtype=object)) if draw(st.booleans()) else None
    return table, {} if encoded is None else {"id": encoded}


@CHECKS
@given(list_tables())
def test_the_risk_list_file_reads_back_as_the_table_it_was_written_from(tmp_path_factory, made):
    table, encoded = made
    path = tmp_path_factory.mktemp("list") / "riskscores.csv"

    calllist.write_list(path, table, encoded)

    read = pd.read_csv(
        path, dtype={"id": str, "reason": str}, keep_default_na=False,
        na_values={"probability": [""], "rank_before": [""]},
    )
    assert list(read.columns) == list(table.columns)
    assert read["rank"].tolist() == table["rank"].tolist()
    assert read["id"].tolist() == table["id"].tolist()
    assert read["reason"].tolist() == table["reason"].tolist()
    np.testing.assert_allclose(
        read["probability"].to_numpy(dtype="float64"),
        table["probability"].round(6).to_numpy(dtype="float64"), atol=5e-7,
    )
    assert read["rank_before"].astype("Int64").tolist() == table["rank_before"].tolist()


@CHECKS
@given(
    st.lists(st.binary(max_size=20).filter(lambda raw: b"\x00" not in raw), max_size=40),
    st.lists(st.sampled_from([0.1, 0.5, 0.9]), max_size=40),
)
def test_the_risk_order_is_by_probability_then_by_id_bytes(ids, probabilities):
    rows = min(len(ids), len(probabilities))
    ids = np.array(ids[:rows] or [b""], dtype="S")[:rows]
    probabilities = np.array(probabilities[:rows], dtype="float64")

    order = calllist._risk_order(probabilities, ids)

    assert sorted(order.tolist()) == list(range(rows))
    expected = sorted(range(rows), key=lambda row: (-probabilities[row], ids[row], row))
    assert order.tolist() == expected


@CHECKS
@given(st.lists(st.integers(0, 9), max_size=50))
def test_each_client_code_finds_its_first_and_last_row(codes):
    clients = 12  # some codes have no row
    array = np.array(codes, dtype="int64")

    first, last = calllist.first_rows(array, clients), calllist.last_rows(array, clients)

    for code in range(clients):
        rows = [row for row, value in enumerate(codes) if value == code]
        assert first[code] == (rows[0] if rows else -1)
        assert last[code] == (rows[-1] if rows else -1)
