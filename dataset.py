"""The data contract every stage shares: reading data files and the master dataset, validating rows.

One schema (settings.Schema) says which columns a data file has; this module turns files, request
bodies and frames into typed, validated tables the same way everywhere:

- `read_csv` reads a path or bytes as CSV with the contract's options, and maps every pandas and
  decoding failure to one DataError (the one CSV-error mapping of the project); `read_header` and
  `read_chunks` read a file of any size the same way, a chunk of rows at a time;
- `parse_rows` parses each schema column and gives the reason of every invalid row (ingestion
  quarantines those rows; `validate_frame` refuses the whole table);
- `read_master` and `typed` give the master dataset the types every stage relies on. Typing is one
  function on purpose: held-out rows are matched to master rows by hashing (`row_hashes`), which
  only works when both were typed the same way. `RowHashes` keeps such hashes to tell, chunk by
  chunk, which rows were seen before.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

import atomicio
from errors import DataError, StorageError
from settings import Schema, Settings

if TYPE_CHECKING:
    import hashlib

log = logging.getLogger(__name__)

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
# A data line may hold this many fields more than the header and still be read: empty ones (a line
# ending in a comma) are dropped, others make the row invalid. A longer line makes the file
# unreadable. Their columns' names hold a NUL, which no header can (csv refuses it).
EXTRA_FIELDS = 3
EXTRA_FIELD_NAMES = tuple(f"\0extra{number}" for number in range(EXTRA_FIELDS))
# Values longer than this are cut short in messages, so that a reason stays one readable line.
SHOWN_VALUE_CHARS = 40


def read_csv(
    source: Path | bytes | IO[bytes], schema: Schema, *, name: str,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """Read CSV text with the contract's options; any failure is a DataError naming `name`.

    `source` is a file path, the bytes of a request body, or an open binary stream; `columns`,
    if given, the only columns read (each must be in the header). The frame is not validated
    yet (see validate_frame and parse_rows).
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            # pandas warns, and drops the fields, when the first data line is longer than the
            # header; as an error the table is refused instead of silently losing cells.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(source, usecols=columns, **csv_read_options(schema))
    except pd.errors.EmptyDataError:
        raise DataError(f"{name} is empty") from None
    except pd.errors.ParserWarning:
        raise DataError(
            f"{name} cannot be read as CSV: a data line holds more fields than the header"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as error:
        raise DataError(f"{name} cannot be read as CSV: {_first_line(error)}") from None


def read_header(stream: IO[bytes], *, name: str) -> list[str]:
    """The column names of a data file's header, read from `stream`, left at the first data line.

    Names are stripped; an empty one is called "Unnamed: <position>", as pandas calls it.
    """
    try:
        line = stream.readline()
        while line and not line.strip():  # blank lines before the header, as pandas skips them
            line = stream.readline()
        if not line:
            raise DataError(f"{name} is empty")
        [names] = csv.reader([line.decode("utf-8-sig")])
    except (UnicodeDecodeError, csv.Error, ValueError, OSError) as error:
        raise DataError(f"{name} cannot be read as CSV: {_first_line(error)}") from None
    return [name.strip() or f"Unnamed: {position}" for position, name in enumerate(names)]


class Chunk(NamedTuple):
    """Some consecutive rows of a data file, as read, and the reason of each row whose line held
    fields beyond the header (indexed like the rows)."""

    frame: pd.DataFrame
    extra_fields: pd.Series


def read_chunks(
    stream: IO[bytes], columns: list[str], schema: Schema, *, name: str, chunk_rows: int
) -> Iterator[Chunk]:
    """Read the data lines of `stream` (after read_header) `chunk_rows` rows at a time.

    Rows are indexed by their position among the data lines (0 for the first), over all chunks.
    A failure in any chunk is a DataError naming `name`; the chunks before it were good.
    """
    options = csv_read_options(schema)
    options["dtype"] = {**options["dtype"], **dict.fromkeys(EXTRA_FIELD_NAMES, "str")}
    options.update(header=None, names=[*columns, *EXTRA_FIELD_NAMES], chunksize=chunk_rows)
    try:
        reader = pd.read_csv(stream, **options)
    except pd.errors.EmptyDataError:
        return
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as error:
        raise DataError(f"{name} cannot be read as CSV: {_first_line(error)}") from None
    with reader:
        while True:
            try:
                with warnings.catch_warnings():
                    # A line too long for even the extra fields: pandas warns and drops its cells.
                    warnings.simplefilter("error", pd.errors.ParserWarning)
                    frame = next(reader)
            except StopIteration:
                return
            except pd.errors.ParserWarning:
                raise DataError(
                    f"{name} cannot be read as CSV: a line has more than {len(columns)} + "
                    f"{EXTRA_FIELDS} fields (the header has {len(columns)})"
                ) from None
            except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as error:
                raise DataError(
                    f"{name} cannot be read as CSV: {_field_count_message(error, len(columns))}"
                ) from None
            yield Chunk(frame[columns], _extra_field_reasons(frame[list(EXTRA_FIELD_NAMES)]))


def _extra_field_reasons(extra: pd.DataFrame) -> pd.Series:
    filled = extra.notna().to_numpy()
    if filled.any():  # nearly always not: no line had a field beyond the header
        filled &= (extra != "").to_numpy()
    rows = np.flatnonzero(filled.any(axis=1))
    reasons = [
        "the line has more fields than the header ("
        + ", ".join(_shown(value) for value in extra.iloc[row][filled[row]]) + ")"
        for row in rows
    ]
    return pd.Series(reasons, index=extra.index[rows], dtype="str")


def _field_count_message(error: Exception, header_fields: int) -> str:
    """pandas counts lines from where it started reading (after the header): say it as a person
    counts them in an editor, the header being line 1."""
    text = _first_line(error)
    found = re.search(r"Expected \d+ fields in line (\d+), saw (\d+)", text)
    if not found:
        return text
    line, fields = int(found.group(1)) + 1, int(found.group(2))
    return (
        f"line {line} has {fields} fields, the header {header_fields} (at most "
        f"{EXTRA_FIELDS} more are read, and quarantined)"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def read_master(settings: Settings) -> pd.DataFrame:
    """The master dataset with the schema's column types; empty if nothing was ingested yet.

    Read from its binary copy when that still holds finaldata.csv (see update_master_copy).
    """
    schema = settings.schema
    path = settings.finaldata_path
    if not path.exists():
        return empty_frame(schema)
    copy = _current_copy(settings)
    if copy is None:
        return _read_master_csv(path, schema)
    whole = list(_copy_frames(copy, schema, chunk_rows=max(copy.rows, 1)))
    return whole[0] if whole else empty_frame(schema)


def _read_master_csv(path: Path, schema: Schema) -> pd.DataFrame:
    frame = read_csv(path, schema, name=f"master dataset {path}")
    _require_master_columns(frame.columns, schema, path)
    return typed(frame[list(schema.columns)], schema)


def _require_master_columns(present: Iterable[str], schema: Schema, path: Path) -> None:
    missing = [c for c in schema.columns if c not in set(present)]
    if missing:
        raise DataError(
            f"master dataset {path} lacks column(s) {', '.join(missing)}: it was made with another "
            "schema than config.json's; run `ingestion.py --rebuild` to move it, its records of "
            "ingested files and the quarantine aside into a dated folder and ingest every source "
            "file again (nothing is deleted)"
        )


def read_master_chunks(settings: Settings, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The master dataset `chunk_rows` rows at a time, typed as read_master types it."""
    schema = settings.schema
    path = settings.finaldata_path
    if not path.exists():
        return
    copy = _current_copy(settings)
    if copy is not None:
        yield from _copy_frames(copy, schema, chunk_rows)
        return
    name = f"master dataset {path}"
    with open(path, "rb") as stream:
        columns = read_header(stream, name=name)
        _require_master_columns(columns, schema, path)
        yield from _typed_chunks(stream, columns, schema, name=name, chunk_rows=chunk_rows)


def _typed_chunks(
    stream: IO[bytes], columns: list[str], schema: Schema, *, name: str, chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """The data lines of master-dataset CSV from where `stream` is, typed, a chunk at a time."""
    for chunk in read_chunks(stream, columns, schema, name=name, chunk_rows=chunk_rows):
        yield typed(chunk.frame[list(schema.columns)], schema)


# --- The master dataset's binary copy ----------------------------------------------------------
#
# Every cycle reads the master dataset several times (training, judging plans, diagnostics, the
# risk list, the realised F1) and ingestion once (the hashes of its rows); parsing a million rows
# of CSV takes several times as long as loading their copy in numpy's .npz. finaldata.csv stays the
# master dataset: the copy names the bytes of it that it holds (their length and SHA-256) and is
# read only while they are the file. It holds each number column as float64 (NaN where missing)
# and each text column as one UTF-8 string with a NUL between cells, and a mask of missing cells.


class _MasterCopy(NamedTuple):
    arrays: dict[str, np.ndarray]  # as _copy_arrays makes them
    rows: int
    csv_bytes: int  # the length of the start of finaldata.csv it holds
    csv_sha256: str  # ... and the digest of those bytes


def update_master_copy(settings: Settings) -> None:
    """Bring the binary copy up to date with finaldata.csv; ingestion calls it after each append.

    Rows are only ever appended, so when the copy still holds the start of the file only the lines
    after it are parsed, a chunk at a time. A copy that cannot be made (a text cell holding a NUL,
    which the copy uses to separate texts; a master dataset of another schema; no room on the disk)
    is removed with a warning, and stages read the CSV: the copy never fails the ingestion that
    appended the rows.
    """
    copy_path = settings.master_copy_path
    if not settings.finaldata_path.exists():
        copy_path.unlink(missing_ok=True)
        return
    try:
        arrays = _master_copy_arrays(settings)
        if arrays is not None:
            atomicio.write_with(copy_path, lambda temp_path: _save_arrays(temp_path, arrays))
    except (DataError, OSError, StorageError) as error:
        log.warning("no binary copy of the master dataset (%s): stages read the CSV", error)
        copy_path.unlink(missing_ok=True)


def _master_copy_arrays(settings: Settings) -> dict[str, np.ndarray] | None:
    """What the copy should hold now; None when it holds that already."""
    schema = settings.schema
    path = settings.finaldata_path
    name = f"master dataset {path}"
    copy = _open_copy(settings)
    with open(path, "rb") as stream:
        columns = read_header(stream, name=name)
        _require_master_columns(columns, schema, path)
        digest = _digest_of_prefix(stream, copy.csv_bytes) if copy is not None else None
        if copy is not None and digest is not None and digest.hexdigest() == copy.csv_sha256:
            held, parts = copy.csv_bytes, [copy.arrays]  # the stream is right after those bytes
        else:
            held, parts, digest = 0, [], _digest_of_prefix(stream, 0)
            read_header(stream, name=name)
        chunk_rows = settings.ingestion.chunk_rows
        parts += [_copy_arrays(frame, schema) for frame in _typed_chunks(
            stream, columns, schema, name=name, chunk_rows=chunk_rows)]
        if len(parts) == 1 and held:
            return None  # nothing after the bytes the copy holds
        stream.seek(held)
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
        size = stream.tell()
    return {**_joined_arrays(parts, schema), "csv_bytes": np.array(size),
            "csv_sha256": np.array(digest.hexdigest())}


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)


def _text_columns(schema: Schema) -> set[str]:
    return set(schema.id_columns + schema.categorical_features)


def _copy_arrays(frame: pd.DataFrame, schema: Schema) -> dict[str, np.ndarray]:
    """Typed master-dataset rows as the copy holds them."""
    arrays = {"rows": np.array(len(frame))}
    text = _text_columns(schema)
    for column in schema.columns:
        if column in text:
            cells = frame[column].to_numpy(dtype=object)
            missing = pd.isna(cells)
            joined = "\x00".join(np.where(missing, "", cells).tolist())
            if joined.count("\x00") != max(len(cells) - 1, 0):
                raise DataError(f"a cell of column {column} holds a NUL, which the copy cannot")
            arrays[f"{column}:text"] = np.frombuffer(joined.encode("utf-8"), dtype="uint8")
            arrays[f"{column}:missing"] = missing
        else:
            arrays[f"{column}:numbers"] = frame[column].to_numpy(dtype="float64", na_value=np.nan)
    return arrays


def _joined_arrays(parts: list[dict[str, np.ndarray]], schema: Schema) -> dict[str, np.ndarray]:
    """The arrays of consecutive runs of rows (_copy_arrays) as those of all of them."""
    parts = [part for part in parts if int(part["rows"])]
    joined = {"columns": np.array(schema.columns),
              "rows": np.array(sum(int(part["rows"]) for part in parts))}
    text = _text_columns(schema)
    nul = np.zeros(1, dtype="uint8")
    for column in schema.columns:
        if column in text:
            pieces = [piece for part in parts for piece in (nul, part[f"{column}:text"])][1:]
            joined[f"{column}:text"] = np.concatenate([np.zeros(0, "uint8"), *pieces])
            joined[f"{column}:missing"] = np.concatenate(
                [np.zeros(0, bool), *(part[f"{column}:missing"] for part in parts)])
        else:
            joined[f"{column}:numbers"] = np.concatenate(
                [np.zeros(0), *(part[f"{column}:numbers"] for part in parts)])
    return joined


def _open_copy(settings: Settings) -> _MasterCopy | None:
    """The binary copy as stored; None if there is none, or it is of other columns or unreadable."""
    import zipfile

    copy_path = settings.master_copy_path
    if not copy_path.exists():
        return None
    try:
        with np.load(copy_path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        if arrays["columns"].tolist() != list(settings.schema.columns):
            return None
        return _MasterCopy(
            arrays, int(arrays["rows"]), int(arrays["csv_bytes"]), str(arrays["csv_sha256"])
        )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        log.warning("the binary copy %s cannot be read (%s): reading the CSV", copy_path, error)
        return None


def _current_copy(settings: Settings) -> _MasterCopy | None:
    """The binary copy if it holds finaldata.csv as the file is now; None otherwise."""
    copy = _open_copy(settings)
    path = settings.finaldata_path
    if copy is None or copy.csv_bytes != path.stat().st_size:
        return None
    return copy if atomicio.sha256_of(path) == copy.csv_sha256 else None


def _copy_frames(copy: _MasterCopy, schema: Schema, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The typed rows the copy holds, `chunk_rows` at a time, indexed by their position."""
    text = _text_columns(schema)
    # Where each text column's cells end in its UTF-8, to decode one chunk's cells at a time.
    ends = {} if chunk_rows >= copy.rows else {
        column: np.flatnonzero(copy.arrays[f"{column}:text"] == 0) for column in text
    }
    for start in range(0, copy.rows, chunk_rows):
        stop = min(start + chunk_rows, copy.rows)
        values = {}
        for column in schema.columns:
            if column not in text:
                values[column] = copy.arrays[f"{column}:numbers"][start:stop]
                continue
            utf8 = copy.arrays[f"{column}:text"]
            if ends:
                utf8 = utf8[ends[column][start - 1] + 1 if start else 0:
                            ends[column][stop - 1] if stop < copy.rows else len(utf8)]
            cells = np.array(utf8.tobytes().decode("utf-8").split("\x00"), dtype=object)
            cells[copy.arrays[f"{column}:missing"][start:stop]] = np.nan
            values[column] = cells
        yield frame_of(values, schema.columns, schema, pd.RangeIndex(start, stop))


def _digest_of_prefix(stream: IO[bytes], length: int) -> hashlib._Hash | None:
    """The SHA-256 of the first `length` bytes of `stream`, which is left right after them;
    None if the stream is shorter."""
    import hashlib

    stream.seek(0)
    digest = hashlib.sha256()
    remaining = length
    while remaining > 0:
        block = stream.read(min(remaining, 1 << 22))
        if not block:
            return None
        digest.update(block)
        remaining -= len(block)
    return digest


def empty_frame(schema: Schema) -> pd.DataFrame:
    """A master dataset with no rows, typed."""
    return typed(pd.DataFrame({c: pd.Series(dtype="str") for c in schema.columns}), schema)


def typed(
    frame: pd.DataFrame, schema: Schema, columns: tuple[str, ...] | None = None
) -> pd.DataFrame:
    """Already validated columns (default: all of the schema's), typed as the master dataset keeps
    them (see frame_of)."""
    columns = schema.columns if columns is None else columns
    text = set(schema.id_columns + schema.categorical_features)
    values = {
        column: frame[column].to_numpy(dtype=object) if column in text
        else as_numbers(frame[column].to_numpy())
        for column in columns
    }
    return frame_of(values, columns, schema, frame.index)


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
        # Never take a data column for the index: pandas does when the data lines have one field
        # more than the header (a trailing comma), and every column shifts by one.
        "index_col": False,
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
    cells = {c: frame[names[c]].to_numpy() for c in schema.columns if c in names}
    return validate_cells(cells, len(frame), schema, source=source)


def validate_cells(
    cells: dict[str, np.ndarray], rows: int, schema: Schema, *, source: str,
    master_types: bool = True,
) -> pd.DataFrame:
    """Check columns of `rows` raw cells (each id and feature; the target if labelled) against
    the schema; return them as a table, or raise naming the bad rows.

    The table is typed as the master dataset is (frame_of); without `master_types`, numbers are
    float64 and text is Python strings, the same values in columns that cost a fraction to build:
    for rows that are only predicted, such as an API request's.
    """
    labelled = schema.target in cells
    if not labelled:
        cells = {**cells, schema.target: np.zeros(rows)}  # a valid label, dropped again below
    index = pd.RangeIndex(rows)
    values, bad = parse_rows(cells, index, schema)
    if len(bad):
        examples = "; ".join(
            f"row {index + 1}: {reason}" for index, reason in bad.head(3).items()
        )
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{source} has {len(bad)} invalid row(s): {examples}{more}")
    columns = schema.columns if labelled else schema.id_columns + schema.features
    if not master_types:
        return pd.DataFrame({column: values[column] for column in columns}, index=index)
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
        check(is_missing(values[column]), values[column], f"missing client id ({column})")

    for column in schema.numeric_features:
        raw = cells[column]
        numbers = values[column] = as_numbers(raw)
        check(~is_missing(raw) & np.isnan(numbers), raw, f"{column} {{value}} is not a number")
        infinite = np.isinf(numbers)
        if infinite.any():
            spelled = _spells_infinity(raw, infinite)
            check(spelled, raw, f"{column} {{value}} is not finite")
            check(infinite & ~spelled, raw, f"{column} {{value}} is too large")
        if column in schema.count_columns:
            finite = np.isfinite(numbers)
            with np.errstate(invalid="ignore"):
                check(numbers < 0, raw, f"{column} {{value}} is negative")
                check(finite & (np.mod(numbers, 1, where=finite, out=np.zeros_like(numbers)) != 0),
                      raw, f"{column} {{value}} is not a whole number")
                check(finite & (numbers > MAX_COUNT), raw, f"{column} {{value}} is too large")

    raw_target = cells[schema.target]
    values[schema.target] = labels = _target_labels(raw_target)
    missing_target = is_missing(raw_target)
    check(missing_target, raw_target, f"missing target ({schema.target})")
    check(~missing_target & np.isnan(labels), raw_target,
          f"target {schema.target} {{value}} is not a label (0/1, yes/no, true/false)")

    if not failures:  # nearly always: building even an empty Series is most of a row's cost
        return values, _no_reasons()
    reasons: dict[int, list[str]] = {}
    for rows, raw, message in failures:
        for row in rows:
            reasons.setdefault(int(row), []).append(message.format(value=_shown(raw[row])))
    ordered = sorted(reasons)
    return values, pd.Series(
        ["; ".join(reasons[row]) for row in ordered], index=index[ordered], dtype="str"
    )


@functools.cache
def _no_reasons() -> pd.Series:
    """The reasons of rows that are all valid: none. One shared Series, which nobody changes."""
    return pd.Series([], index=pd.RangeIndex(0), dtype="str")


def _shown(value: object) -> str:
    """A cell as a message quotes it: in quotes, cut short if long, and a whole number read as a
    float (its column had a blank) without the ".0" the file never had."""
    if isinstance(value, float) and value.is_integer() and abs(value) < MAX_COUNT:
        value = int(value)
    text = str(value)
    if len(text) > SHOWN_VALUE_CHARS:
        text = f"{text[:SHOWN_VALUE_CHARS]}... ({len(text)} characters)"
    return f"'{text}'"


def _spells_infinity(raw: np.ndarray, infinite: np.ndarray) -> np.ndarray:
    """Which of the `infinite` cells say infinity ("inf", "-Infinity"), rather than a number too
    large for a float (a 400-digit integer, 1e400)."""
    spelled = np.zeros(len(raw), dtype=bool)
    for row in np.flatnonzero(infinite):
        cell = raw[row]
        spelled[row] = isinstance(cell, float) or str(cell).strip().lstrip("+-").lower() in (
            "inf", "infinity"
        )
    return spelled


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


def is_missing(cells: np.ndarray) -> np.ndarray:
    """pd.isna of a column; a short column of plain cells (an API request) without pandas' cost
    per call, which is most of the time validating one row takes."""
    if len(cells) < SMALL_COLUMN and cells.dtype == object:
        missing = [_plain_missing(cell) for cell in cells.tolist()]
        if None not in missing:
            return np.array(missing, dtype=bool).reshape(len(cells))
    return pd.isna(cells)


def _plain_missing(cell: object) -> bool | None:
    """Whether a cell of a plain type is missing (None or NaN); None for any other type."""
    kind = type(cell)
    if kind is str or kind is int:
        return False
    if kind is float:
        return cell != cell
    return True if cell is None else None


def as_numbers(cells: np.ndarray) -> np.ndarray:
    """float64 values, NaN where a cell is missing or not a number, infinite beyond float range."""
    if cells.dtype.kind in "iuf":
        return cells.astype("float64")
    if cells.dtype.kind == "b":  # a column of true/false: words, not counts
        return np.full(len(cells), np.nan)
    if len(cells) < SMALL_COLUMN:
        numbers = _plain_numbers(cells)
        if numbers is not None:
            return numbers
    try:
        numbers = pd.to_numeric(pd.Series(cells, copy=False), errors="coerce")
    except OverflowError:
        # The CSV parser keeps an integer too long for 64 bits as a Python int, which pandas cannot
        # make a float; as text it becomes an infinity, which parse_rows calls too large.
        as_text = np.array(
            [str(cell) if isinstance(cell, int) else cell for cell in cells], dtype=object
        )
        numbers = pd.to_numeric(pd.Series(as_text, copy=False), errors="coerce")
    return numbers.to_numpy(dtype="float64", na_value=np.nan)


def _plain_numbers(cells: np.ndarray) -> np.ndarray | None:
    """float64 of a short column whose cells are all None, floats or integers within 64 bits, as
    pandas converts them; None if any cell is of another type (text is left to pandas)."""
    numbers = []
    for cell in cells.tolist():
        kind = type(cell)
        if kind is float:
            numbers.append(cell)
        elif kind is int and -(2**63) <= cell < 2**63:
            numbers.append(float(cell))
        elif cell is None:
            numbers.append(np.nan)
        else:
            return None
    return np.array(numbers, dtype="float64").reshape(len(cells))


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
    hashes the same only when its cells have the same types. Each cell is hashed as it is, without
    factorizing first: client ids are nearly all distinct, and it is twice as fast.
    """
    return pd.util.hash_pandas_object(frame[list(schema.columns)], index=False, categorize=False)


def read_ids(path: Path, schema: Schema, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The id columns of a dataset we wrote (the master dataset, the rosters), as text, a chunk
    at a time; nothing if the file does not exist."""
    if not Path(path).exists():
        return
    ids = list(schema.id_columns)
    yield from pd.read_csv(
        path, usecols=ids, dtype=dict.fromkeys(ids, "str"), keep_default_na=False,
        na_values=dict.fromkeys(ids, [""]), chunksize=chunk_rows,
    )


def id_hashes(frame: pd.DataFrame, schema: Schema) -> np.ndarray:
    """A 64-bit hash of each row's client id (all id columns), the same whatever the columns'
    string type, to tell which clients were seen before (RowHashes)."""
    ids = pd.DataFrame({c: frame[c].to_numpy(dtype=object) for c in schema.id_columns})
    return pd.util.hash_pandas_object(ids, index=False, categorize=False).to_numpy()


class RowHashes:
    """Hashes of rows (row_hashes) that answer "seen before?" for a whole chunk of rows at once.

    One sorted array: 8 bytes a row, looked up by binary search, grown by merging sorted runs (a
    linear pass), so that a file of any length is checked against the master dataset in bounded
    memory. Two different rows share a 64-bit hash with a chance of about n²/2⁶⁵, three in a
    hundred million for a million rows: the price of not keeping the rows themselves.
    """

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._sorted)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` were added before."""
        order = np.argsort(hashes)
        found = np.empty(len(hashes), dtype=bool)
        found[order] = self._contains_sorted(hashes[order])
        return found

    def _contains_sorted(self, hashes: np.ndarray) -> np.ndarray:
        # Sorted keys make the binary searches walk the array in order: twice as fast.
        if not len(self._sorted):
            return np.zeros(len(hashes), dtype=bool)
        positions = np.searchsorted(self._sorted, hashes)
        np.minimum(positions, len(self._sorted) - 1, out=positions)
        return self._sorted[positions] == hashes

    def add(self, hashes: np.ndarray) -> None:
        merged = np.concatenate([self._sorted, np.sort(np.asarray(hashes, dtype=np.uint64))])
        merged.sort(kind="stable")  # two sorted runs: timsort merges them in one pass
        self._sorted = merged

    def update(self, other: RowHashes) -> None:
        if not len(self):  # nothing to merge: share the sorted array, which is never changed
            self._sorted = other._sorted
        else:
            self.add(other._sorted)


def first_sightings(hashes: np.ndarray, *seen: RowHashes) -> np.ndarray:
    """Which rows are seen for the first time: in none of the `seen` sets, and not repeating an
    earlier row of `hashes` itself."""
    order = np.argsort(hashes, kind="stable")  # equal hashes stay in row order: the first is first
    ordered = hashes[order]
    first = np.ones(len(hashes), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    for hash_set in seen:
        first &= ~hash_set._contains_sorted(ordered)
    in_row_order = np.empty(len(hashes), dtype=bool)
    in_row_order[order] = first
    return in_row_order
