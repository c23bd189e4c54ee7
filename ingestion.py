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

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import atomicio
import records
from errors import DataError, run_cli
from settings import Schema, Settings, add_config_argument, load_settings

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class SourceFile:
    """A data file in the input folder, identified by its content."""

    path: Path
    checksum: str
    size: int
    mtime_ns: int


@dataclass
class FileOutcome:
    """What became of one input file."""

    file: str
    checksum: str
    status: str  # ingested | rejected
    rows_read: int = 0
    accepted: int = 0
    duplicate: int = 0
    quarantined: int = 0
    missing_cells: int = 0
    reason: str | None = None
    ignored_columns: list[str] = field(default_factory=list)

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


@dataclass
class IngestReport:
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
    frame = pd.read_csv(path, **_read_options(schema))
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


def _read_options(schema: Schema) -> dict:
    text_columns = schema.id_columns + schema.categorical_features
    na_values = {c: MISSING_MARKERS for c in schema.numeric_features + (schema.target,)}
    na_values.update({c: [""] for c in text_columns})
    return {
        "dtype": {c: "str" for c in text_columns},
        "keep_default_na": False,
        "na_values": na_values,
        "skipinitialspace": True,
    }


def _typed(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Give validated columns the types the master dataset keeps (counts as nullable integers)."""
    import pandas as pd

    columns = {}
    for column in schema.columns:
        values = frame[column]
        if column in schema.id_columns or column in schema.categorical_features:
            columns[column] = values.astype("str").where(values.notna())
        elif column in schema.count_columns or column == schema.target:
            columns[column] = pd.to_numeric(values).astype("Int64")
        else:
            columns[column] = pd.to_numeric(values).astype("float64")
    return pd.DataFrame(columns, index=frame.index)


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
        frame = pd.read_csv(path, **_read_options(schema))
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
    frame = frame.rename(columns=lambda c: str(c).strip())
    needed = schema.columns if require_target else schema.id_columns + schema.features
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(
            f"{source} lacks required column(s) {', '.join(missing)} "
            f"(found: {', '.join(map(str, frame.columns)) or 'none'})"
        )
    if frame.empty:
        raise DataError(f"{source} has no data rows")
    present = [c for c in schema.columns if c in frame.columns]
    labelled = schema.target in frame.columns
    frame = frame[present].reset_index(drop=True)
    if not labelled:
        frame = frame.assign(**{schema.target: "0"})
    frame = _stripped_text(frame, schema)
    bad = _row_problems(frame, schema)
    if len(bad):
        examples = "; ".join(
            f"row {index + 1}: {reason}" for index, reason in bad.head(3).items()
        )
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{source} has {len(bad)} invalid row(s): {examples}{more}")
    typed = _typed(_coerced(frame, schema), schema)
    return typed if labelled else typed.drop(columns=[schema.target])


def _read_source(
    source: SourceFile, schema: Schema
) -> tuple[FileOutcome, pd.DataFrame | None, pd.DataFrame | None]:
    """Read and validate one file: its outcome, its valid rows, and its quarantined rows."""
    import pandas as pd

    outcome = FileOutcome(file=source.path.name, checksum=source.checksum, status="rejected")
    try:
        frame = pd.read_csv(source.path, **_read_options(schema))
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
    frame = _stripped_text(frame[list(schema.columns)], schema)
    reasons = _row_problems(frame, schema)
    bad = frame.index.isin(reasons.index)
    outcome.quarantined = int(bad.sum())
    valid = _typed(_coerced(frame.loc[~bad], schema), schema)
    outcome.missing_cells = int(valid[list(schema.features)].isna().to_numpy().sum())

    quarantined = None
    if bad.any():
        quarantined = frame.loc[bad].astype("str").where(frame.loc[bad].notna(), "")
        quarantined.insert(0, "reason", reasons)
        # Line numbers as a person sees them in an editor: the header is line 1.
        quarantined.insert(0, "source_line", frame.index[bad] + 2)
        quarantined.insert(0, "source_file", source.path.name)
    return outcome, valid, quarantined


def _row_problems(frame: pd.DataFrame, schema: Schema) -> pd.Series:
    """The reason of every invalid row (indexed like `frame`), naming each problem the row has.

    The checks run on whole columns; messages are only built for the rows that fail, which are few,
    so a million clean rows cost a handful of vectorised comparisons.
    """
    import numpy as np
    import pandas as pd

    failures: list[tuple[np.ndarray, pd.Series, str]] = []  # (positions, raw values, message)

    def check(mask: object, raw: pd.Series, message: str) -> None:
        positions = np.flatnonzero(np.asarray(mask, dtype=bool))
        if len(positions):
            failures.append((positions, raw, message))

    for column in schema.id_columns:
        check(frame[column].isna().to_numpy(), frame[column], f"missing client id ({column})")

    for column in schema.numeric_features:
        raw = frame[column]
        numbers = _as_numbers(raw)
        check(raw.notna().to_numpy() & np.isnan(numbers), raw, f"{column} {{value}} is not a number")
        check(np.isinf(numbers), raw, f"{column} {{value}} is not finite")
        if column in schema.count_columns:
            with np.errstate(invalid="ignore"):
                check(numbers < 0, raw, f"{column} {{value}} is negative")
                finite = np.isfinite(numbers)
                check(finite & (np.mod(numbers, 1, where=finite, out=np.zeros_like(numbers)) != 0),
                      raw, f"{column} {{value}} is not a whole number")
                check(finite & (numbers > MAX_COUNT), raw, f"{column} {{value}} is too large")

    target = frame[schema.target]
    labels = _target_labels(target)
    check(target.isna().to_numpy(), target, f"missing target ({schema.target})")
    check(target.notna().to_numpy() & labels.isna().to_numpy(), target,
          f"target {schema.target} {{value}} is not a label (0/1, yes/no, true/false)")

    reasons: dict[int, list[str]] = {}
    for positions, raw, message in failures:
        values = raw.to_numpy()
        for position in positions:
            reasons.setdefault(int(position), []).append(
                message.format(value=f"'{values[position]}'")
            )
    ordered = sorted(reasons)
    return pd.Series(
        ["; ".join(reasons[p]) for p in ordered], index=frame.index[ordered], dtype="str"
    )


def _as_numbers(values: pd.Series) -> np.ndarray:
    """float64 values, NaN where a cell is missing or not a number."""
    import pandas as pd

    return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=float("nan"))


def _target_labels(target: pd.Series) -> pd.Series:
    """0/1 for every understood label, missing for anything else."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(target):
        return target.astype("Float64").where(target.isin([0, 1]))
    # Map each distinct spelling once, not each of a million cells.
    codes, spellings = pd.factorize(target)
    labels = [TARGET_LABELS.get(str(s).strip().lower()) for s in spellings]
    mapped = pd.array([labels[c] if c >= 0 else None for c in range(len(spellings))] + [None],
                      dtype="Float64")
    return pd.Series(mapped[codes], index=target.index)


def _coerced(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Valid rows with numbers parsed and labels mapped to 0/1."""
    import pandas as pd

    frame = frame.copy()
    for column in schema.numeric_features:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame[schema.target] = _target_labels(frame[schema.target])
    return frame


def _stripped_text(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Ids and categories without surrounding blanks; a blank cell is a missing one."""
    frame = frame.copy()
    for column in schema.id_columns + schema.categorical_features:
        text = frame[column].astype("str").str.strip()
        frame[column] = text.where(frame[column].notna() & (text != ""))
    return frame


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
