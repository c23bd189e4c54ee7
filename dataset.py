"""The data contract every stage shares: reading data files and the master dataset, validating rows.

One schema (settings.Schema) says which columns a data file has; this module turns files, request
bodies and frames into typed, validated tables the same way everywhere:

- `read_csv` reads a path or bytes as CSV with the contract's options, and maps every pandas and
  decoding failure to one DataError (the one CSV-error mapping of the project);
- `parse_rows` parses each schema column and gives the reason of every invalid row (ingestion
  quarantines those rows; `validate_frame` refuses the whole table);
- `read_master` and `typed` give the master dataset the types every stage relies on. Typing is one
  function on purpose: held-out rows are matched to master rows by hashing (`row_hashes`), which
  only works when both were typed the same way.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from errors import DataError
from settings import Schema, Settings

# How missing numeric or target cells are written in the files we receive; anything else that is not
# a number is junk and makes its row invalid.
MISSING_MARKERS = ["", "NA", "N/A", "n/a", "na", "NaN", "nan", "null", "NULL", "None", "-"]
TARGET_LABELS = {
    "1": 1, "0": 0, "1.0": 1, "0.0": 0,
    "yes": 1, "no": 0, "y": 1, "n": 0, "true": 1, "false": 0,
}
# Counts are stored as 64-bit integers; beyond 2**53 a float no longer holds every whole number, and
# no client has that many employees or actions.
MAX_COUNT = 2**53
# Below this many cells a plain loop beats pandas' fixed cost per call (an API request is one row).
SMALL_COLUMN = 1000


def read_csv(source: Path | bytes | IO[bytes], schema: Schema, *, name: str) -> pd.DataFrame:
    """Read CSV text with the contract's options; any failure is a DataError naming `name`.

    `source` is a file path, the bytes of a request body, or an open binary stream. The frame is
    not validated yet (see validate_frame and parse_rows).
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        return pd.read_csv(source, **csv_read_options(schema))
    except pd.errors.EmptyDataError:
        raise DataError(f"{name} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise DataError(f"{name} cannot be read as CSV: {first_line}") from None


def read_master(settings: Settings) -> pd.DataFrame:
    """The master dataset with the schema's column types; empty if nothing was ingested yet."""
    schema = settings.schema
    path = settings.finaldata_path
    if not path.exists():
        return empty_frame(schema)
    frame = read_csv(path, schema, name=f"master dataset {path}")
    missing = [c for c in schema.columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"master dataset {path} lacks column(s) {', '.join(missing)}: it was made with another "
            "schema; move it away and ingest again"
        )
    return typed(frame[list(schema.columns)], schema)


def empty_frame(schema: Schema) -> pd.DataFrame:
    """A master dataset with no rows, typed."""
    return typed(pd.DataFrame({c: pd.Series(dtype="str") for c in schema.columns}), schema)


def typed(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Already validated columns, typed as the master dataset keeps them (see frame_of)."""
    text = set(schema.id_columns + schema.categorical_features)
    values = {
        column: frame[column].to_numpy(dtype=object) if column in text
        else as_numbers(frame[column].to_numpy())
        for column in schema.columns
    }
    return frame_of(values, schema.columns, schema, frame.index)


def csv_read_options(schema: Schema) -> dict:
    """pandas.read_csv options that read a data file as ingestion does: ids and categories stay
    text, and the usual spellings of a missing cell are missing."""
    text_columns = schema.id_columns + schema.categorical_features
    na_values = {c: MISSING_MARKERS for c in schema.numeric_features + (schema.target,)}
    na_values.update({c: [""] for c in text_columns})
    return {
        "dtype": {c: "str" for c in text_columns},
        "keep_default_na": False,
        "na_values": na_values,
        "skipinitialspace": True,
    }


def read_dataset(path: Path, schema: Schema, *, require_target: bool = True) -> pd.DataFrame:
    """Read a labelled (or, for predictions, unlabelled) data file, refusing any invalid row.

    Unlike ingestion, which quarantines bad rows and goes on, a dataset used for scoring or
    predictions must be whole: one bad row is an error that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    frame = read_csv(path, schema, name=f"data file {path}")
    return validate_frame(frame, schema, source=str(path), require_target=require_target)


def validate_frame(
    frame: pd.DataFrame, schema: Schema, *, source: str, require_target: bool = True
) -> pd.DataFrame:
    """Check a whole table against the schema; return it typed, or raise naming the bad rows."""
    names = {str(column).strip(): column for column in frame.columns}
    needed = schema.columns if require_target else schema.id_columns + schema.features
    missing = [c for c in needed if c not in names]
    if missing:
        raise DataError(
            f"{source} lacks required column(s) {', '.join(missing)} "
            f"(found: {', '.join(names) or 'none'})"
        )
    if frame.empty:
        raise DataError(f"{source} has no data rows")
    labelled = schema.target in names
    cells = {c: frame[names[c]].to_numpy() for c in schema.columns if c in names}
    if not labelled:
        cells[schema.target] = np.zeros(len(frame))  # a valid label, dropped again below
    index = pd.RangeIndex(len(frame))
    values, bad = parse_rows(cells, index, schema)
    if len(bad):
        examples = "; ".join(
            f"row {index + 1}: {reason}" for index, reason in bad.head(3).items()
        )
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{source} has {len(bad)} invalid row(s): {examples}{more}")
    columns = schema.columns if labelled else schema.id_columns + schema.features
    return frame_of(values, columns, schema, index)


def parse_rows(
    cells: dict[str, np.ndarray], index: pd.Index, schema: Schema
) -> tuple[dict[str, np.ndarray], pd.Series]:
    """Parse the cells of every schema column, and give the reason of every invalid row.

    Returns the parsed columns as arrays (text stripped, a blank cell missing; numbers as
    float64 with NaN; the target as 0/1, NaN where it is not a label) and the reasons, indexed by
    `index`, naming each problem a row has. Checks run on whole columns and messages are built only
    for the rows that fail, so a million clean rows cost a handful of array operations and a single
    row (an API request) costs little more than a function call.
    """
    values: dict[str, np.ndarray] = {}
    failures: list[tuple[np.ndarray, np.ndarray, str]] = []  # (failing rows, raw cells, message)

    def check(mask: np.ndarray, raw: np.ndarray, message: str) -> None:
        if mask.any():
            failures.append((np.flatnonzero(mask), raw, message))

    for column in schema.id_columns + schema.categorical_features:
        values[column] = _stripped(cells[column])
    for column in schema.id_columns:
        check(pd.isna(values[column]), values[column], f"missing client id ({column})")

    for column in schema.numeric_features:
        raw = cells[column]
        numbers = values[column] = as_numbers(raw)
        check(~pd.isna(raw) & np.isnan(numbers), raw, f"{column} {{value}} is not a number")
        check(np.isinf(numbers), raw, f"{column} {{value}} is not finite")
        if column in schema.count_columns:
            finite = np.isfinite(numbers)
            with np.errstate(invalid="ignore"):
                check(numbers < 0, raw, f"{column} {{value}} is negative")
                check(finite & (np.mod(numbers, 1, where=finite, out=np.zeros_like(numbers)) != 0),
                      raw, f"{column} {{value}} is not a whole number")
                check(finite & (numbers > MAX_COUNT), raw, f"{column} {{value}} is too large")

    raw_target = cells[schema.target]
    values[schema.target] = labels = _target_labels(raw_target)
    missing_target = pd.isna(raw_target)
    check(missing_target, raw_target, f"missing target ({schema.target})")
    check(~missing_target & np.isnan(labels), raw_target,
          f"target {schema.target} {{value}} is not a label (0/1, yes/no, true/false)")

    reasons: dict[int, list[str]] = {}
    for rows, raw, message in failures:
        for row in rows:
            reasons.setdefault(int(row), []).append(message.format(value=f"'{raw[row]}'"))
    ordered = sorted(reasons)
    return values, pd.Series(
        ["; ".join(reasons[row]) for row in ordered], index=index[ordered], dtype="str"
    )


def _stripped(cells: np.ndarray) -> np.ndarray:
    """Text without surrounding blanks, as objects; a missing or blank cell becomes NaN."""
    if len(cells) < SMALL_COLUMN:
        return np.array([_stripped_text(cell) for cell in cells] or [], dtype=object)
    text = pd.Series(cells, dtype=object, copy=False)
    stripped = text.astype("str").str.strip()
    return stripped.where(text.notna() & (stripped != "")).to_numpy(dtype=object)


def _stripped_text(cell: object) -> object:
    if cell is None or (isinstance(cell, float) and cell != cell):  # None or NaN: missing
        return float("nan")
    return str(cell).strip() or float("nan")


def as_numbers(cells: np.ndarray) -> np.ndarray:
    """float64 values, NaN where a cell is missing or not a number."""
    if cells.dtype.kind in "iuf":
        return cells.astype("float64")
    numbers = pd.to_numeric(pd.Series(cells, copy=False), errors="coerce")
    return numbers.to_numpy(dtype="float64", na_value=np.nan)


def _target_labels(cells: np.ndarray) -> np.ndarray:
    """1.0 or 0.0 for every understood label, NaN for anything else."""
    if cells.dtype.kind in "iuf":
        numbers = cells.astype("float64")
        return np.where((numbers == 0) | (numbers == 1), numbers, np.nan)
    # Map each distinct spelling once, not each of a million cells.
    codes, spellings = pd.factorize(cells)
    mapped = np.array(
        [TARGET_LABELS.get(str(spelling).strip().lower(), np.nan) for spelling in spellings]
        + [np.nan],
        dtype="float64",
    )
    return mapped[codes]  # code -1 (a missing cell) picks the trailing NaN


def frame_of(
    values: dict[str, np.ndarray], names: tuple[str, ...], schema: Schema, index: pd.Index
) -> pd.DataFrame:
    """Parsed, valid columns as the master dataset types them (counts as nullable integers)."""
    columns = {}
    for column in names:
        cells = values[column]
        if column in schema.id_columns or column in schema.categorical_features:
            columns[column] = pd.array(cells, dtype="str")
        elif column in schema.count_columns or column == schema.target:
            missing = np.isnan(cells)
            columns[column] = pd.arrays.IntegerArray(
                np.where(missing, 0, cells).astype("int64"), missing
            )
        else:
            columns[column] = cells
    return pd.DataFrame(columns, index=index)


def row_hashes(frame: pd.DataFrame, schema: Schema) -> pd.Series:
    """A 64-bit hash of each row's schema columns, to match rows between tables cheaply.

    Both tables must have been typed by this module (typed or frame_of): the same row read twice
    hashes the same only when its cells have the same types.
    """
    return pd.util.hash_pandas_object(frame[list(schema.columns)], index=False)
