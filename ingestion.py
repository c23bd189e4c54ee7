"""Ingestion: compile every new source file into the master dataset and record what was read.

New data is recognised by content: a file is new when no earlier ingestion recorded its checksum,
so a file replaced under the same name is ingested again and the same bytes under a new name are
not. Every input row ends up in exactly one place: the master dataset (finaldata.csv), the count of
duplicates, or the quarantine file with its reason. A file that cannot be used at all is rejected
whole, with its reason, and the others still go in.

A file with the schema's columns but no target is a roster: the company's current clients at that
moment, outcome unknown. Its valid rows go to their own dataset (rosters.csv), never into the master
dataset, since they are not training data; the risk list ranks them.

How a data file is read and validated is the data contract's (dataset.py). This module keeps what is
ingestion's own: discovering new files, compiling them into the master dataset, the quarantine and
the records. pandas and the data contract are imported only by the functions that compile, so that
fullprocess.py can ask "is there new data?" through find_new_files() without paying for them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
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

# Columns the roster dataset (rosters.csv) keeps after the schema's ids and features: which
# snapshot a row belongs to (1, 2, ... in the order rosters arrived), and how many master rows were
# known when it arrived. A master row at a lower position is older than the snapshot, any other
# row newer.
SNAPSHOT_COLUMN = "snapshot"
MASTER_POSITION_COLUMN = "master_position"


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
        "missing_cells", "reason", "ignored_columns", "kind", "new_clients",
    )

    def __init__(self, file: str, checksum: str, status: str) -> None:
        self.file = file
        self.checksum = checksum
        self.status = status  # ingested | rejected
        self.kind = "labeled"  # labeled | roster
        self.new_clients = 0  # a roster's ids that no earlier row or roster had
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
        if self.kind == "roster":
            return (
                f"  {self.file}: roster of {self.accepted} current clients ({self.new_clients} not "
                f"seen before): {self.rows_read} rows read, {self.duplicate} duplicate ids (newest "
                f"row kept), {self.quarantined} quarantined"
            )
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
        """Labeled rows added to the master dataset."""
        return sum(f.accepted for f in self.files if f.kind == "labeled")

    @property
    def roster_clients(self) -> int:
        """Current clients listed by the rosters this run ingested."""
        return sum(f.accepted for f in self.files if f.kind == "roster")

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
        if any(f.kind == "roster" for f in self.ingested):
            lines.append(
                f"Roster snapshot(s) of {self.roster_clients} current clients added beside it, "
                "to be ranked, never trained on"
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

    from dataset import read_master

    started = time.perf_counter()
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + os.urandom(3).hex()
    all_files = list_source_files(settings)
    new_files = find_new_files(settings)
    new_paths = {f.path for f in new_files}
    unchanged = [p.name for p in all_files if p not in new_paths]

    schema = settings.schema
    master = read_master(settings)
    outcomes: list[FileOutcome] = []
    batches: list[pd.DataFrame] = []
    snapshots: dict[int, pd.DataFrame] = {}
    quarantine_batches: list[pd.DataFrame] = []
    for source in new_files:
        outcome, valid, quarantined = _read_source(source, schema)
        outcomes.append(outcome)
        if valid is not None and outcome.kind == "roster":
            snapshots[len(outcomes) - 1] = valid
        elif valid is not None:
            batches.append(valid.assign(_file=len(outcomes) - 1))
        if quarantined is not None and len(quarantined):
            quarantine_batches.append(quarantined)

    added = _append_without_duplicates(master, batches, outcomes, schema)
    roster_records = _append_snapshots(settings, master, added, snapshots, outcomes)
    total_rows = len(master) + len(added)
    if len(added):
        atomicio.write_with(settings.latest_batch_path, lambda p: added.to_csv(p, index=False))
        _append_rows_file(settings.finaldata_path, settings.latest_batch_path)
    elif not settings.finaldata_path.exists() and new_files:
        atomicio.write_with(settings.finaldata_path, lambda p: master.to_csv(p, index=False))
    if quarantine_batches:
        _append_quarantine(settings, quarantine_batches)

    _record(settings, run_id, new_files, outcomes)
    for values in roster_records:
        records.add(settings.records_path, "rosters", {"run_id": run_id, **values})
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
    records.add_stage_run(
        settings.records_path, "ingestion", time.perf_counter() - started,
        sum(f.rows_read for f in outcomes),
    )
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


def _read_source(
    source: SourceFile, schema: Schema
) -> tuple[FileOutcome, pd.DataFrame | None, pd.DataFrame | None]:
    """Read and validate one file: its outcome, its valid rows, and its quarantined rows."""
    from dataset import frame_of, parse_rows, read_csv

    outcome = FileOutcome(file=source.path.name, checksum=source.checksum, status="rejected")
    try:
        frame = read_csv(source.path, schema, name="the file")
    except DataError as error:
        outcome.reason = str(error)
        return outcome, None, None

    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in schema.columns if c not in frame.columns]
    # The schema's columns without the target: a roster of current clients, outcome unknown.
    is_roster = missing == [schema.target]
    if missing and not is_roster:
        outcome.reason = (
            f"missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(frame.columns) or 'none'}): neither a labeled batch "
            f"({', '.join(schema.columns)}) nor a roster (the same without {schema.target})"
        )
        return outcome, None, None
    if frame.columns.duplicated().any():
        repeated = sorted(set(frame.columns[frame.columns.duplicated()]))
        outcome.reason = f"column(s) {', '.join(repeated)} appear more than once"
        return outcome, None, None
    if frame.empty:
        outcome.reason = "the file has a header but no data rows"
        return outcome, None, None
    if is_roster:
        return _read_roster(source, frame, schema, outcome)

    outcome.status = "ingested"
    outcome.rows_read = len(frame)
    outcome.ignored_columns = [c for c in frame.columns if c not in schema.columns]
    frame = frame[list(schema.columns)]
    cells = {column: frame[column].to_numpy() for column in schema.columns}
    values, reasons = parse_rows(cells, frame.index, schema)
    bad = frame.index.isin(reasons.index)
    outcome.quarantined = int(bad.sum())
    valid = frame_of(
        {c: v[~bad] for c, v in values.items()}, schema.columns, schema, frame.index[~bad]
    )
    outcome.missing_cells = int(valid[list(schema.features)].isna().to_numpy().sum())
    return outcome, valid, _quarantined_rows(source, frame, bad, reasons)


def _quarantined_rows(
    source: SourceFile, frame: pd.DataFrame, bad: Any, reasons: pd.Series
) -> pd.DataFrame | None:
    """The rows of `frame` marked `bad`, as text, with their file, line and reason."""
    if not bad.any():
        return None
    quarantined = frame.loc[bad].astype("str").where(frame.loc[bad].notna(), "")
    quarantined.insert(0, "reason", reasons)
    # Line numbers as a person sees them in an editor: the header is line 1.
    quarantined.insert(0, "source_line", frame.index[bad] + 2)
    quarantined.insert(0, "source_file", source.path.name)
    return quarantined


# --- Rosters: current clients, outcome unknown ---------------------------------------------------


def _read_roster(
    source: SourceFile, frame: pd.DataFrame, schema: Schema, outcome: FileOutcome
) -> tuple[FileOutcome, pd.DataFrame, pd.DataFrame | None]:
    """Validate a roster's rows like any other; a client listed twice keeps its last row."""
    import numpy as np

    from dataset import frame_of, parse_rows

    columns = schema.id_columns + schema.features
    outcome.kind = "roster"
    outcome.status = "ingested"
    outcome.rows_read = len(frame)
    outcome.ignored_columns = [c for c in frame.columns if c not in columns]
    frame = frame[list(columns)]
    cells = {column: frame[column].to_numpy() for column in columns}
    cells[schema.target] = np.zeros(len(frame))  # a valid label: a roster has none to check
    values, reasons = parse_rows(cells, frame.index, schema)
    bad = frame.index.isin(reasons.index)
    outcome.quarantined = int(bad.sum())
    valid = frame_of({c: values[c][~bad] for c in columns}, columns, schema, frame.index[~bad])
    superseded = valid.duplicated(subset=list(schema.id_columns), keep="last").to_numpy()
    outcome.duplicate = int(superseded.sum())
    valid = valid.loc[~superseded]
    outcome.accepted = len(valid)
    outcome.missing_cells = int(valid[list(schema.features)].isna().to_numpy().sum())
    return outcome, valid, _quarantined_rows(source, frame, bad, reasons)


def _append_snapshots(
    settings: Settings,
    master: pd.DataFrame,
    added: pd.DataFrame,
    snapshots: dict[int, pd.DataFrame],
    outcomes: list[FileOutcome],
) -> list[dict[str, Any]]:
    """Append this run's rosters to rosters.csv, each as a numbered snapshot; their records.

    Files are read in name order, so a roster is newer than the master rows before it: the master
    dataset's rows, plus the rows of the labeled files read before it in this run.
    """
    import shutil

    import pandas as pd

    from dataset import read_csv

    if not snapshots:
        return []
    schema = settings.schema
    path = settings.rosters_path
    earlier = (
        read_csv(path, schema, name=f"roster dataset {path}")
        if path.exists() else pd.DataFrame(columns=[*schema.id_columns, SNAPSHOT_COLUMN])
    )
    known = set(_client_keys(master, schema)) | set(_client_keys(added, schema))
    known |= set(_client_keys(earlier, schema))
    number = int(earlier[SNAPSHOT_COLUMN].max()) if len(earlier) else 0
    frames, roster_records = [], []
    for index, rows in snapshots.items():
        outcome = outcomes[index]
        number += 1
        position = len(master) + sum(
            earlier_outcome.accepted for earlier_outcome in outcomes[:index]
            if earlier_outcome.kind == "labeled" and earlier_outcome.status == "ingested"
        )
        keys = _client_keys(rows, schema)
        outcome.new_clients = sum(1 for key in keys if key not in known)
        known.update(keys)
        frames.append(rows.assign(**{SNAPSHOT_COLUMN: number, MASTER_POSITION_COLUMN: position}))
        roster_records.append({
            "time": records.utc_now(), "file": outcome.file, "checksum": outcome.checksum,
            "snapshot": number, "master_position": position, "rows_read": outcome.rows_read,
            "clients": outcome.accepted, "duplicate_ids": outcome.duplicate,
            "new_clients": outcome.new_clients, "quarantined": outcome.quarantined,
        })
    new_rows = pd.concat(frames, ignore_index=True)

    def write(temp_path: Path) -> None:
        if path.exists():
            shutil.copyfile(path, temp_path)
        new_rows.to_csv(temp_path, mode="a", header=not path.exists(), index=False)

    atomicio.write_with(path, write)
    return roster_records


def _client_keys(frame: pd.DataFrame, schema: Schema) -> list[str]:
    """Each row's client id as text, several id columns joined by " / " (as scoring names them)."""
    ids = list(schema.id_columns)
    if len(ids) == 1:
        return frame[ids[0]].astype("str").tolist()
    return frame[ids].astype("str").agg(" / ".join, axis=1).tolist()


def _append_without_duplicates(
    master: pd.DataFrame,
    batches: list[pd.DataFrame],
    outcomes: list[FileOutcome],
    schema: Schema,
) -> pd.DataFrame:
    """The new rows that are in neither the master dataset nor an earlier row of this run."""
    import pandas as pd

    from dataset import empty_frame

    if not batches:
        return empty_frame(schema)
    columns = list(schema.columns)
    new_rows = pd.concat(batches, ignore_index=True)
    stacked = pd.concat([master[columns], new_rows[columns]], ignore_index=True)
    is_duplicate = stacked.duplicated(keep="first").to_numpy()[len(master):]
    duplicate_counts = new_rows.loc[is_duplicate, "_file"].value_counts()
    for file_index, outcome in enumerate(outcomes):
        if outcome.status == "ingested" and outcome.kind == "labeled":
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
                # Rows added to the master dataset (master_batches counts on it); a roster's
                # clients go to rosters.csv, and the rosters table says how many.
                "accepted": outcome.accepted if outcome.kind == "labeled" else 0,
                "duplicate": outcome.duplicate,
                "quarantined": outcome.quarantined,
                "missing_cells": outcome.missing_cells,
                "reason": outcome.reason,
            },
        )


def master_batches(settings: Settings, rows: int) -> np.ndarray | None:
    """The ingestion run (batch) each row of the master dataset came from, in the dataset's order.

    Ingestion appends each run's accepted rows at the end of the master dataset, so the recorded
    counts of accepted rows, run by run, say where each batch lies. None when the records do not
    add up to the dataset (it was made or changed outside ingestion).
    """
    import numpy as np

    runs = records.query(
        settings.records_path,
        "SELECT run_id, SUM(accepted) AS accepted FROM ingestions WHERE status = 'ingested' "
        "GROUP BY run_id HAVING SUM(accepted) > 0 ORDER BY MIN(id)",
    )
    if sum(run["accepted"] for run in runs) != rows:
        log.info("the ingestion records do not add up to the %d master rows", rows)
        return None
    return np.repeat([run["run_id"] for run in runs], [run["accepted"] for run in runs])


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
