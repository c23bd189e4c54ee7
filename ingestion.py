"""Ingestion: compile every new source file into the master dataset and record what was read.

New data is recognised by content: a file is new when no earlier ingestion recorded its checksum,
so a file replaced under the same name is ingested again and the same bytes under a new name are
not. Every input row ends up in exactly one place: the master dataset (finaldata.csv), the count of
duplicates, or the quarantine file with its reason. A file that cannot be used at all is rejected
whole, with its reason, and the others still go in.

pandas is imported inside the functions that read data, so that fullprocess.py can ask "is there new
data?" through find_new_files() without paying for it.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import atomicio
import records
from errors import DataError, run_cli
from settings import Schema, Settings, add_config_argument, load_settings

if TYPE_CHECKING:
    import argparse

    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

# How missing numeric or target cells are written in the files we receive; anything else that is not
# a number is junk and quarantines its row.
MISSING_MARKERS = ["", "NA", "N/A", "n/a", "na", "NaN", "nan", "null", "NULL", "None", "-"]
TARGET_LABELS = {
    "1": 1, "0": 0, "1.0": 1, "0.0": 0,
    "yes": 1, "no": 0, "y": 1, "n": 0, "true": 1, "false": 0,
}
# Counts are stored as 64-bit integers; beyond 2**53 a float no longer holds every whole number, and
# no client has that many employees or actions.
MAX_COUNT = 2**53


class SourceFile(NamedTuple):
    """A data file in the input folder, identified by its content."""

    path: Path
    checksum: str
    size: int
    mtime_ns: int


class FileOutcome:
    """What became of one input file: filled in as the file is read, then checked for duplicates.

    A plain class rather than a dataclass, because defining dataclasses at import slows the cron
    check that imports this module every 10 minutes.
    """

    __slots__ = (
        "file", "checksum", "status", "rows_read", "accepted", "duplicate", "quarantined",
        "missing_cells", "reason", "ignored_columns",
    )

    def __init__(self, file: str, checksum: str, status: str) -> None:
        self.file = file
        self.checksum = checksum
        self.status = status  # ingested | rejected
        self.rows_read = 0
        self.accepted = 0
        self.duplicate = 0
        self.quarantined = 0
        self.missing_cells = 0
        self.reason: str | None = None
        self.ignored_columns: list[str] = []

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def line(self) -> str:
        if self.status == "rejected":
            return f"  {self.file}: REJECTED: {self.reason}"
        text = (
            f"  {self.file}: {self.rows_read} rows read, {self.accepted} accepted, "
            f"{self.duplicate} duplicate, {self.quarantined} quarantined"
        )
        if self.missing_cells:
            text += f" ({self.missing_cells} missing cells kept for imputation)"
        if self.ignored_columns:
            text += f"; ignored columns: {', '.join(self.ignored_columns)}"
        return text


class IngestReport(NamedTuple):
    """The outcome of one ingestion run."""

    run_id: str
    files: list[FileOutcome]
    unchanged: list[str]
    total_rows: int
    finaldata_path: Path
    quarantine_path: Path

    @property
    def ingested(self) -> list[FileOutcome]:
        return [f for f in self.files if f.status == "ingested"]

    @property
    def rejected(self) -> list[FileOutcome]:
        return [f for f in self.files if f.status == "rejected"]

    @property
    def accepted_rows(self) -> int:
        return sum(f.accepted for f in self.files)

    def summary(self) -> str:
        if not self.files:
            return (
                f"No new data: the {len(self.unchanged)} file(s) in the input folder hold content already seen. "
                f"Master dataset: {self.total_rows} rows in {self.finaldata_path}"
            )
        quarantined = sum(f.quarantined for f in self.files)
        lines = [f"Ingested {len(self.ingested)} new file(s), rejected {len(self.rejected)}:"]
        lines += [outcome.line() for outcome in self.files]
        lines.append(
            f"Added {self.accepted_rows} rows; master dataset now {self.total_rows} rows "
            f"in {self.finaldata_path}"
        )
        if quarantined:
            lines.append(f"{quarantined} row(s) quarantined with reasons in {self.quarantine_path}")
        return "\n".join(lines)


def list_source_files(settings: Settings) -> list[Path]:
    """The data files in the input folder: visible .csv files, never temporary or partial ones."""
    folder = settings.input_folder
    if not folder.is_dir():
        raise DataError(f"input folder {folder} does not exist or is not a folder")
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() == ".csv" and not path.name.startswith(".") and path.is_file()
    )


def find_new_files(settings: Settings) -> list[SourceFile]:
    """Source files whose content no earlier ingestion has seen, in name order.

    Cheap enough for the every-10-minutes check: a file whose name, size and modification time match
    an earlier record reuses that record's checksum instead of being read again.
    """
    seen_checksums, known_stats = _ingestion_memory(settings)
    new_files: list[SourceFile] = []
    checksums_this_run: set[str] = set()
    for path in list_source_files(settings):
        stat = path.stat()
        checksum = known_stats.get((str(path), stat.st_size, stat.st_mtime_ns))
        if checksum is None:
            checksum = atomicio.sha256_of(path)
        if checksum in seen_checksums or checksum in checksums_this_run:
            continue
        checksums_this_run.add(checksum)
        new_files.append(SourceFile(path, checksum, stat.st_size, stat.st_mtime_ns))
    return new_files


def _ingestion_memory(settings: Settings) -> tuple[set[str], dict[tuple[str, int, int], str]]:
    rows = records.query(
        settings.records_path, "SELECT file, checksum, size, mtime_ns FROM ingestions"
    )
    seen = {row["checksum"] for row in rows}
    stats = {(row["file"], row["size"], row["mtime_ns"]): row["checksum"] for row in rows}
    return seen, stats


def ingest(settings: Settings) -> IngestReport:
    """Compile every new source file into the master dataset; record what was read."""
    import pandas as pd

    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + os.urandom(3).hex()
    all_files = list_source_files(settings)
    new_files = find_new_files(settings)
    new_paths = {f.path for f in new_files}
    unchanged = [p.name for p in all_files if p not in new_paths]

    schema = settings.schema
    master = read_master(settings)
    outcomes: list[FileOutcome] = []
    batches: list[pd.DataFrame] = []
    quarantine_batches: list[pd.DataFrame] = []
    for source in new_files:
        outcome, valid, quarantined = _read_source(source, schema)
        outcomes.append(outcome)
        if valid is not None:
            batches.append(valid.assign(_file=len(outcomes) - 1))
        if quarantined is not None and len(quarantined):
            quarantine_batches.append(quarantined)

    added = _append_without_duplicates(master, batches, outcomes, schema)
    total_rows = len(master) + len(added)
    if len(added):
        atomicio.write_with(settings.latest_batch_path, lambda p: added.to_csv(p, index=False))
        _append_rows_file(settings.finaldata_path, settings.latest_batch_path)
    elif not settings.finaldata_path.exists() and new_files:
        atomicio.write_with(settings.finaldata_path, lambda p: master.to_csv(p, index=False))
    if quarantine_batches:
        _append_quarantine(settings, quarantine_batches)

    _record(settings, run_id, new_files, outcomes)
    _write_ingested_files_list(settings)
    report = IngestReport(
        run_id=run_id,
        files=outcomes,
        unchanged=unchanged,
        total_rows=total_rows,
        finaldata_path=settings.finaldata_path,
        quarantine_path=settings.quarantine_path,
    )
    for outcome in report.rejected:
        log.warning("rejected %s: %s", outcome.file, outcome.reason)
    return report


def _append_rows_file(master_path: Path, rows_path: Path) -> None:
    """Atomically make master = master + the data lines of rows_path (both CSVs of the same columns).

    Copying bytes is far cheaper than formatting a million rows as CSV again, and the new rows were
    just formatted once for the latest-batch file.
    """
    import shutil

    with atomicio.atomic_path(master_path) as temp_path, open(temp_path, "wb") as target:
        with open(rows_path, "rb") as rows:
            header = rows.readline()
            if master_path.exists():
                with open(master_path, "rb") as master:
                    shutil.copyfileobj(master, target)
            else:
                target.write(header)
            shutil.copyfileobj(rows, target)


def read_master(settings: Settings) -> pd.DataFrame:
    """The master dataset with the schema's column types; empty if nothing was ingested yet."""
    import pandas as pd

    schema = settings.schema
    path = settings.finaldata_path
    if not path.exists():
        return _empty_frame(schema)
    frame = pd.read_csv(path, **csv_read_options(schema))
    missing = [c for c in schema.columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"master dataset {path} lacks column(s) {', '.join(missing)}: it was made with another "
            "schema; move it away and ingest again"
        )
    return _typed(frame[list(schema.columns)], schema)


def _empty_frame(schema: Schema) -> pd.DataFrame:
    import pandas as pd

    return _typed(pd.DataFrame({c: pd.Series(dtype="str") for c in schema.columns}), schema)


def _typed(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Already validated columns, typed as the master dataset keeps them (see _frame_of)."""
    text = set(schema.id_columns + schema.categorical_features)
    values = {
        column: frame[column].to_numpy(dtype=object) if column in text
        else _as_numbers(frame[column].to_numpy())
        for column in schema.columns
    }
    return _frame_of(values, schema.columns, schema, frame.index)


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
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    try:
        frame = pd.read_csv(path, **csv_read_options(schema))
    except pd.errors.EmptyDataError:
        raise DataError(f"data file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise DataError(f"data file {path} cannot be read as CSV: {first_line}") from None
    return validate_frame(frame, schema, source=str(path), require_target=require_target)


def validate_frame(
    frame: pd.DataFrame, schema: Schema, *, source: str, require_target: bool = True
) -> pd.DataFrame:
    """Check a whole table against the schema; return it typed, or raise naming the bad rows."""
    import numpy as np
    import pandas as pd

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
    values, bad = _parse_rows(cells, index, schema)
    if len(bad):
        examples = "; ".join(
            f"row {index + 1}: {reason}" for index, reason in bad.head(3).items()
        )
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{source} has {len(bad)} invalid row(s): {examples}{more}")
    columns = schema.columns if labelled else schema.id_columns + schema.features
    return _frame_of(values, columns, schema, index)


def _read_source(
    source: SourceFile, schema: Schema
) -> tuple[FileOutcome, pd.DataFrame | None, pd.DataFrame | None]:
    """Read and validate one file: its outcome, its valid rows, and its quarantined rows."""
    import pandas as pd

    outcome = FileOutcome(file=source.path.name, checksum=source.checksum, status="rejected")
    try:
        frame = pd.read_csv(source.path, **csv_read_options(schema))
    except pd.errors.EmptyDataError:
        outcome.reason = "the file is empty"
        return outcome, None, None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as error:
        outcome.reason = f"cannot be read as CSV: {str(error).strip().splitlines()[0]}"
        return outcome, None, None

    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in schema.columns if c not in frame.columns]
    if missing:
        outcome.reason = (
            f"missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(frame.columns) or 'none'})"
        )
        return outcome, None, None
    if frame.columns.duplicated().any():
        repeated = sorted(set(frame.columns[frame.columns.duplicated()]))
        outcome.reason = f"column(s) {', '.join(repeated)} appear more than once"
        return outcome, None, None
    if frame.empty:
        outcome.reason = "the file has a header but no data rows"
        return outcome, None, None

    outcome.status = "ingested"
    outcome.rows_read = len(frame)
    outcome.ignored_columns = [c for c in frame.columns if c not in schema.columns]
    frame = frame[list(schema.columns)]
    cells = {column: frame[column].to_numpy() for column in schema.columns}
    values, reasons = _parse_rows(cells, frame.index, schema)
    bad = frame.index.isin(reasons.index)
    outcome.quarantined = int(bad.sum())
    valid = _frame_of(
        {c: v[~bad] for c, v in values.items()}, schema.columns, schema, frame.index[~bad]
    )
    outcome.missing_cells = int(valid[list(schema.features)].isna().to_numpy().sum())

    quarantined = None
    if bad.any():
        quarantined = frame.loc[bad].astype("str").where(frame.loc[bad].notna(), "")
        quarantined.insert(0, "reason", reasons)
        # Line numbers as a person sees them in an editor: the header is line 1.
        quarantined.insert(0, "source_line", frame.index[bad] + 2)
        quarantined.insert(0, "source_file", source.path.name)
    return outcome, valid, quarantined


def _parse_rows(
    cells: dict[str, np.ndarray], index: pd.Index, schema: Schema
) -> tuple[dict[str, np.ndarray], pd.Series]:
    """Parse the cells of every schema column, and give the reason of every invalid row.

    Returns the parsed columns as arrays (text stripped, a blank cell missing; numbers as
    float64 with NaN; the target as 0/1, NaN where it is not a label) and the reasons, indexed by
    `index`, naming each problem a row has. Checks run on whole columns and messages are built only
    for the rows that fail, so a million clean rows cost a handful of array operations and a single
    row (an API request) costs little more than a function call.
    """
    import numpy as np
    import pandas as pd

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
        numbers = values[column] = _as_numbers(raw)
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


# Below this many cells a plain loop beats pandas' fixed cost per call (an API request is one row).
SMALL_COLUMN = 1000


def _stripped(cells: np.ndarray) -> np.ndarray:
    """Text without surrounding blanks, as objects; a missing or blank cell becomes NaN."""
    import numpy as np
    import pandas as pd

    if len(cells) < SMALL_COLUMN:
        return np.array([_stripped_text(cell) for cell in cells] or [], dtype=object)
    text = pd.Series(cells, dtype=object, copy=False)
    stripped = text.astype("str").str.strip()
    return stripped.where(text.notna() & (stripped != "")).to_numpy(dtype=object)


def _stripped_text(cell: object) -> object:
    if cell is None or (isinstance(cell, float) and cell != cell):  # None or NaN: missing
        return float("nan")
    return str(cell).strip() or float("nan")


def _as_numbers(cells: np.ndarray) -> np.ndarray:
    """float64 values, NaN where a cell is missing or not a number."""
    import numpy as np
    import pandas as pd

    if cells.dtype.kind in "iuf":
        return cells.astype("float64")
    numbers = pd.to_numeric(pd.Series(cells, copy=False), errors="coerce")
    return numbers.to_numpy(dtype="float64", na_value=np.nan)


def _target_labels(cells: np.ndarray) -> np.ndarray:
    """1.0 or 0.0 for every understood label, NaN for anything else."""
    import numpy as np
    import pandas as pd

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


def _frame_of(
    values: dict[str, np.ndarray], names: tuple[str, ...], schema: Schema, index: pd.Index
) -> pd.DataFrame:
    """Parsed, valid columns as the master dataset types them (counts as nullable integers)."""
    import numpy as np
    import pandas as pd

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


def _append_without_duplicates(
    master: pd.DataFrame,
    batches: list[pd.DataFrame],
    outcomes: list[FileOutcome],
    schema: Schema,
) -> pd.DataFrame:
    """The new rows that are in neither the master dataset nor an earlier row of this run."""
    import pandas as pd

    if not batches:
        return _empty_frame(schema)
    columns = list(schema.columns)
    new_rows = pd.concat(batches, ignore_index=True)
    stacked = pd.concat([master[columns], new_rows[columns]], ignore_index=True)
    is_duplicate = stacked.duplicated(keep="first").to_numpy()[len(master):]
    duplicate_counts = new_rows.loc[is_duplicate, "_file"].value_counts()
    for file_index, outcome in enumerate(outcomes):
        if outcome.status == "ingested":
            outcome.duplicate = int(duplicate_counts.get(file_index, 0))
            outcome.accepted = outcome.rows_read - outcome.quarantined - outcome.duplicate
    return new_rows.loc[~is_duplicate, columns].reset_index(drop=True)


def _append_quarantine(settings: Settings, batches: list[pd.DataFrame]) -> None:
    import pandas as pd

    frames = []
    if settings.quarantine_path.exists():
        frames.append(pd.read_csv(settings.quarantine_path, dtype="str", keep_default_na=False))
    frames += batches
    combined = pd.concat(frames, ignore_index=True)
    atomicio.write_with(settings.quarantine_path, lambda p: combined.to_csv(p, index=False))


def _record(
    settings: Settings, run_id: str, sources: list[SourceFile], outcomes: list[FileOutcome]
) -> None:
    time = records.utc_now()
    for source, outcome in zip(sources, outcomes, strict=True):
        records.add(
            settings.records_path,
            "ingestions",
            {
                "run_id": run_id,
                "time": time,
                "file": str(source.path),
                "checksum": source.checksum,
                "size": source.size,
                "mtime_ns": source.mtime_ns,
                "status": outcome.status,
                "rows_read": outcome.rows_read,
                "accepted": outcome.accepted,
                "duplicate": outcome.duplicate,
                "quarantined": outcome.quarantined,
                "missing_cells": outcome.missing_cells,
                "reason": outcome.reason,
            },
        )


def ingested_file_names(settings: Settings) -> list[str]:
    """Every file ever ingested into the master dataset, oldest first (one line each)."""
    rows = records.query(
        settings.records_path,
        "SELECT file, MIN(id) AS first FROM ingestions WHERE status = 'ingested' "
        "GROUP BY file ORDER BY first",
    )
    return [Path(row["file"]).name for row in rows]


def _write_ingested_files_list(settings: Settings) -> None:
    names = ingested_file_names(settings)
    atomicio.write_text(settings.ingested_files_path, "".join(f"{name}\n" for name in names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import argparse  # here, not at the top: fullprocess.py imports this module on its fast path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    report = ingest(settings)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
