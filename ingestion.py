"""Ingestion: compile every new source file into the master dataset and record what was read.

New data is recognised by content: a file is new when no earlier ingestion recorded its checksum,
so a file replaced under the same name is ingested again and the same bytes under a new name are
not. Every input row ends up in exactly one place: the master dataset (finaldata.csv), the count of
duplicates, or the quarantine file with its reason. Whatever goes wrong with one file (reading,
parsing, converting, hashing it) rejects that file alone, with its reason, and the others still go
in; a rejected file is recorded by checksum, so it is not read again until its content changes. A
file that may still be being written (modified in the last `ingestion.settle_seconds`, or changed
while it was read) is left for the next run.

A file with the schema's columns but no target is a roster: the company's current clients at that
moment, outcome unknown. Its valid rows go to their own dataset (rosters.csv), never into the master
dataset, since they are not training data; the risk list ranks them.

A file is read `ingestion.chunk_rows` rows at a time, so memory stays bounded whatever its size;
duplicates are found by comparing row hashes with the master dataset's. One run is a transaction:
the master dataset, the rosters, the quarantine and the records change together or not at all (see
_commit and recover), and the run holds the pipeline lock, so a run by hand and a cron cycle never
interleave.

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
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import atomicio
import records
from errors import EXIT_ALL_REJECTED, DataError, StorageError, run_cli
from locks import held_since, pipeline_lock
from settings import Schema, Settings, add_config_argument, load_settings

if TYPE_CHECKING:
    import argparse
    from typing import IO

    import numpy as np
    import pandas as pd

    from dataset import Chunk, RowHashes

log = logging.getLogger(__name__)

# The journal of a run that is appending (see _commit); the pending rows of a run, beside it.
JOURNAL_NAME = ".ingestion-journal.json"
BATCH_PREFIX = ".ingestion-batch-"
QUARANTINE_COLUMNS = ("source_file", "source_line", "reason")
# The checksum recorded for a file that could not be read: its size and modification time stand in
# for its content, so that it is not rejected again every cycle, yet is read once it can be.
UNREADABLE = "unreadable:"
# A long file says how far it has got this often.
PROGRESS_SECONDS = 10.0
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
    problem: str | None = None  # why the file cannot be read at all


class Scan:
    """What the input folder holds, compared with what earlier ingestions recorded.

    A plain class: a NamedTuple costs the cron check, which imports this module, far more to define.
    """

    __slots__ = ("new", "settling", "unchanged")

    def __init__(
        self, new: list[SourceFile], settling: list[Path], unchanged: list[str]
    ) -> None:
        self.new = new
        self.settling = settling  # modified too recently: perhaps still being written
        self.unchanged = unchanged


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
        self.status = status  # ingested | rejected | waiting (left for the next run)
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

    def set_aside(self, status: str, reason: str) -> FileOutcome:
        """Mark the file rejected or waiting: none of its rows were used, whatever was counted."""
        self.__init__(self.file, self.checksum, status)
        self.reason = reason
        return self

    def line(self) -> str:
        if self.status == "rejected":
            return f"  {self.file}: REJECTED: {self.reason}"
        if self.status == "waiting":
            return f"  {self.file}: left for the next run: {self.reason}"
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
    def waiting(self) -> list[FileOutcome]:
        return [f for f in self.files if f.status == "waiting"]

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
        waiting = f", left {len(self.waiting)} for the next run" if self.waiting else ""
        lines = [
            f"Ingested {len(self.ingested)} new file(s), rejected {len(self.rejected)}{waiting}:"
        ]
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
    an earlier record reuses that record's checksum instead of being read again. A file modified in
    the last `ingestion.settle_seconds` is not new yet (see scan_input_folder).
    """
    return scan_input_folder(settings).new


def scan_input_folder(settings: Settings) -> Scan:
    """Sort the input folder's files into new, still settling, and seen before."""
    seen_checksums, known_stats = _ingestion_memory(settings)
    settle_ns = int(settings.ingestion.settle_seconds * 1e9)
    now_ns = time.time_ns()
    new_files: list[SourceFile] = []
    settling: list[Path] = []
    unchanged: list[str] = []
    checksums_this_run: set[str] = set()
    for path in list_source_files(settings):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed since the folder was listed
            continue
        checksum = known_stats.get((str(path), stat.st_size, stat.st_mtime_ns))
        problem = None
        if checksum is None or checksum.startswith(UNREADABLE):
            if checksum is None and 0 <= now_ns - stat.st_mtime_ns < settle_ns:
                settling.append(path)
                continue
            checksum, problem = _checksum(path, stat)
        if checksum in seen_checksums or checksum in checksums_this_run:
            unchanged.append(path.name)
            continue
        checksums_this_run.add(checksum)
        new_files.append(SourceFile(path, checksum, stat.st_size, stat.st_mtime_ns, problem))
    return Scan(new_files, settling, unchanged)


def _checksum(path: Path, stat: os.stat_result) -> tuple[str, str | None]:
    """The file's SHA-256, or, when it cannot be read, a stand-in and the reason."""
    try:
        return atomicio.sha256_of(path), None
    except OSError as error:
        return f"{UNREADABLE}{stat.st_size}:{stat.st_mtime_ns}", f"cannot be read: {error}"


def _ingestion_memory(settings: Settings) -> tuple[set[str], dict[tuple[str, int, int], str]]:
    rows = records.query(
        settings.records_path, "SELECT file, checksum, size, mtime_ns FROM ingestions"
    )
    seen = {row["checksum"] for row in rows}
    stats = {(row["file"], row["size"], row["mtime_ns"]): row["checksum"] for row in rows}
    return seen, stats


def ingest(settings: Settings) -> IngestReport:
    """Compile every new source file into the master dataset; record what was read.

    Holds the pipeline lock; first finishes or undoes a run that was killed (recover).
    """
    with pipeline_lock(settings, "ingestion"):
        started = time.perf_counter()
        recover(settings)
        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + os.urandom(3).hex()
        scan = scan_input_folder(settings)
        known = _master_row_hashes(settings)
        master_rows = len(known)
        compiled: list[tuple[SourceFile, FileOutcome]] = []
        if scan.new:
            batch = Batch(settings, run_id)
            try:
                rosters: list[tuple[FileOutcome, pd.DataFrame, int]] = []
                for source in scan.new:
                    outcome, roster = _compile_file(source, settings, known, batch)
                    compiled.append((source, outcome))
                    if roster is not None:  # newer than the master rows known so far
                        rosters.append((outcome, roster, master_rows + batch.new_rows))
                snapshots = _add_snapshots(settings, run_id, rosters, batch) if rosters else []
                recorded = [(s, o) for s, o in compiled if o.status != "waiting"]
                if recorded:
                    _commit(settings, run_id, recorded, snapshots, batch)
            finally:
                batch.close()
        outcomes = [outcome for _, outcome in compiled]
        outcomes += [_settling(path, settings) for path in scan.settling]
        report = IngestReport(
            run_id=run_id,
            files=sorted(outcomes, key=lambda outcome: outcome.file),
            unchanged=scan.unchanged,
            total_rows=master_rows + sum(
                o.accepted for o in outcomes if o.status == "ingested" and o.kind == "labeled"
            ),
            finaldata_path=settings.finaldata_path,
            quarantine_path=settings.quarantine_path,
        )
        for outcome in report.rejected:
            log.warning("rejected %s: %s", outcome.file, outcome.reason)
        for outcome in report.waiting:
            log.info("left %s for the next run: %s", outcome.file, outcome.reason)
        if compiled:
            records.add_stage_run(
                settings.records_path, "ingestion", time.perf_counter() - started,
                sum(outcome.rows_read for outcome in outcomes),
            )
        return report


def _master_row_hashes(settings: Settings) -> RowHashes:
    """The hashes of the master dataset's rows, read a chunk at a time."""
    from dataset import RowHashes, read_master_chunks, row_hashes

    hashes = RowHashes()
    for chunk in read_master_chunks(settings, settings.ingestion.chunk_rows):
        hashes.add(row_hashes(chunk, settings.schema).to_numpy())
    return hashes


def _settling(path: Path, settings: Settings) -> FileOutcome:
    return FileOutcome(file=path.name, checksum="", status="waiting").set_aside(
        "waiting",
        f"modified less than {settings.ingestion.settle_seconds:g} s ago "
        "(ingestion.settle_seconds): it may still be being written",
    )


# ---------------------------------------------------------------------------------------------
# One file: read a chunk at a time into the run's batch.


class Batch:
    """The rows one run adds, written as they are read: the new rows (with a header, as the newest
    batch keeps them), the quarantined rows, and the rosters' snapshots. A file's share is taken out
    again if the file is rejected or left for later. Hidden files beside the outputs, removed when
    the run ends."""

    __slots__ = (
        "rows_path", "quarantine_path", "rosters_path", "new_rows", "quarantined_rows",
        "roster_rows", "_rows", "_quarantine", "_rosters",
    )

    def __init__(self, settings: Settings, run_id: str) -> None:
        import pandas as pd

        folder = settings.output_folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rows_path = folder / f"{BATCH_PREFIX}{run_id}.rows.csv"
        self.quarantine_path = folder / f"{BATCH_PREFIX}{run_id}.quarantine.csv"
        self.rosters_path = folder / f"{BATCH_PREFIX}{run_id}.rosters.csv"
        self.new_rows = self.quarantined_rows = self.roster_rows = 0
        schema = settings.schema
        with atomicio.storage_errors(self.rows_path):
            # Text files, as pandas writes CSV fastest; tell() and seek() still give byte offsets.
            self._rows: IO[str] = _open_for_rows(self.rows_path)
            self._quarantine: IO[str] = _open_for_rows(self.quarantine_path)
            self._rosters: IO[str] = _open_for_rows(self.rosters_path)
            for stream, columns in (
                (self._rows, schema.columns),
                (self._quarantine, (*QUARANTINE_COLUMNS, *schema.columns)),
                (self._rosters, (*schema.id_columns, *schema.features, SNAPSHOT_COLUMN,
                                 MASTER_POSITION_COLUMN)),
            ):
                pd.DataFrame(columns=list(columns)).to_csv(stream, index=False)

    def mark(self) -> tuple[int, int, int, int]:
        return self._rows.tell(), self._quarantine.tell(), self.new_rows, self.quarantined_rows

    def rewind(self, mark: tuple[int, int, int, int]) -> None:
        """Take out everything written since `mark`."""
        rows_at, quarantine_at, self.new_rows, self.quarantined_rows = mark
        for stream, position in ((self._rows, rows_at), (self._quarantine, quarantine_at)):
            stream.seek(position)
            stream.truncate()

    def write(self, new_rows: pd.DataFrame, quarantined: pd.DataFrame | None) -> None:
        with atomicio.storage_errors(self.rows_path):
            if len(new_rows):
                new_rows.to_csv(self._rows, header=False, index=False)
                self.new_rows += len(new_rows)
        self.write_quarantined(quarantined)

    def write_quarantined(self, quarantined: pd.DataFrame | None) -> None:
        if quarantined is not None and len(quarantined):
            with atomicio.storage_errors(self.quarantine_path):
                quarantined.to_csv(self._quarantine, header=False, index=False)
            self.quarantined_rows += len(quarantined)

    def write_snapshot(self, rows: pd.DataFrame) -> None:
        with atomicio.storage_errors(self.rosters_path):
            rows.to_csv(self._rosters, header=False, index=False)
            self.roster_rows += len(rows)

    def flush(self) -> None:
        """Put the batch on disk before anything refers to it."""
        with atomicio.storage_errors(self.rows_path):
            for stream in (self._rows, self._quarantine, self._rosters):
                stream.flush()
                os.fsync(stream.fileno())

    def close(self) -> None:
        """Close the files; remove them unless a run in progress (its journal) still needs them."""
        for stream in (self._rows, self._quarantine, self._rosters):
            stream.close()
        journal_path = self.rows_path.parent / JOURNAL_NAME
        if not journal_path.exists():
            self.rows_path.unlink(missing_ok=True)
        self.quarantine_path.unlink(missing_ok=True)
        self.rosters_path.unlink(missing_ok=True)


def _open_for_rows(path: Path) -> IO[str]:
    # Write-only: a text file open for reading too resets its decoder on every write, and
    # pandas writes a row at a time (0.9 s of a million rows' 5 s). tell, seek and truncate,
    # all a rewind needs, work without reading.
    return open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115 -- closed by Batch.close


def _compile_file(
    source: SourceFile, settings: Settings, known: RowHashes, batch: Batch
) -> tuple[FileOutcome, pd.DataFrame | None]:
    """Read one new file into the batch, and say what became of it and of each of its rows; for a
    roster, also its rows (a client listed twice keeps its last row), to be numbered as a snapshot.

    Whatever goes wrong with the file itself rejects it alone, with the reason; a file that changed
    while it was read is left for the next run. Either way its rows leave the batch again. Only a
    full disk, which is no fault of the file, stops the run.
    """
    from dataset import RowHashes, first_sightings, row_hashes

    outcome = FileOutcome(file=source.path.name, checksum=source.checksum, status="rejected")
    if source.problem:
        outcome.reason = source.problem
        return outcome, None
    mark = batch.mark()
    file_rows = RowHashes()
    roster_chunks: list[pd.DataFrame] = []
    try:
        for valid, quarantined in _read_source(source, settings, outcome):
            if outcome.kind == "roster":  # the company's client list: held whole, it is short
                roster_chunks.append(valid)
                batch.write_quarantined(quarantined)
                continue
            hashes = row_hashes(valid, settings.schema).to_numpy()
            is_new = first_sightings(hashes, known, file_rows)
            new_rows = int(is_new.sum())
            file_rows.add(hashes[is_new])
            batch.write(valid if new_rows == len(valid) else valid[is_new], quarantined)
            outcome.accepted += new_rows
            outcome.duplicate += len(valid) - new_rows
        roster = _last_row_of_each_client(roster_chunks, outcome, settings.schema)
    except StorageError:
        raise
    except DataError as error:
        batch.rewind(mark)
        return outcome.set_aside("rejected", str(error)), None
    except Exception as error:  # any failure of one file rejects that file, never the run
        log.warning("reading %s failed", source.path, exc_info=True)
        batch.rewind(mark)
        first_line = (str(error).strip().splitlines() or [""])[0]
        return outcome.set_aside("rejected", f"{type(error).__name__}: {first_line}"), None
    change = _changed_since_scan(source)
    if change:
        batch.rewind(mark)
        return outcome.set_aside("waiting", change), None
    known.update(file_rows)
    outcome.status = "ingested"
    return outcome, roster


def _last_row_of_each_client(
    chunks: list[pd.DataFrame], outcome: FileOutcome, schema: Schema
) -> pd.DataFrame | None:
    """A roster's valid rows, a client listed twice keeping its last row; None for a labeled file."""
    if outcome.kind != "roster":
        return None
    import pandas as pd

    from dataset import frame_of

    columns = schema.id_columns + schema.features
    rows = (
        pd.concat(chunks) if chunks
        else frame_of({c: [] for c in columns}, columns, schema, pd.RangeIndex(0))
    )
    superseded = rows.duplicated(subset=list(schema.id_columns), keep="last").to_numpy()
    outcome.duplicate = int(superseded.sum())
    rows = rows.loc[~superseded]
    outcome.accepted = len(rows)
    outcome.missing_cells = int(rows[list(schema.features)].isna().to_numpy().sum())
    return rows


def _read_source(
    source: SourceFile, settings: Settings, outcome: FileOutcome
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame | None]]:
    """Read and check one file a chunk at a time: yield each chunk's valid rows and its quarantined
    rows, and count them in `outcome`. A file that cannot be used at all raises DataError."""
    from dataset import read_chunks, read_header

    schema = settings.schema
    with open(source.path, "rb") as stream:
        columns = read_header(stream, name="the file")
        problem = _column_problem(columns, schema)
        if problem:
            raise DataError(problem)
        if schema.target not in columns:  # the schema but no target: a roster of current clients
            outcome.kind = "roster"
        outcome.ignored_columns = [c for c in columns if c not in schema.columns]
        report_at = time.monotonic() + PROGRESS_SECONDS
        chunks = read_chunks(
            stream, columns, schema, name="the file", chunk_rows=settings.ingestion.chunk_rows
        )
        for chunk in chunks:
            labeled = outcome.kind == "labeled"
            valid, quarantined = split_rows(chunk, schema, source.path.name, labeled=labeled)
            outcome.rows_read += len(chunk.frame)
            outcome.quarantined += 0 if quarantined is None else len(quarantined)
            if labeled:  # a roster's are counted once its repeated clients are dropped
                outcome.missing_cells += int(valid[list(schema.features)].isna().to_numpy().sum())
            if time.monotonic() >= report_at:
                log.info(
                    "%s: %d rows read, %.0f%% of %.0f MB", source.path.name, outcome.rows_read,
                    100 * stream.tell() / max(source.size, 1), source.size / 1e6,
                )
                report_at = time.monotonic() + PROGRESS_SECONDS
            yield valid, quarantined
    if not outcome.rows_read:
        raise DataError("the file has a header but no data rows")


def _column_problem(columns: list[str], schema: Schema) -> str | None:
    """Why a file with this header cannot be used at all, or None. The schema's columns make a
    labeled batch; the same without the target, a roster."""
    missing = [c for c in schema.columns if c not in columns]
    if missing and missing != [schema.target]:
        return (
            f"missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(columns) or 'none'}): neither a labeled batch "
            f"({', '.join(schema.columns)}) nor a roster (the same without {schema.target})"
        )
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        return f"column(s) {', '.join(repeated)} appear more than once"
    return None


def split_rows(
    chunk: Chunk, schema: Schema, file_name: str, *, labeled: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Sort a chunk's rows: the valid ones, typed as the master dataset keeps them, and the others
    as read, each with its file, line and reason, as the quarantine keeps them (None if none).

    A roster's rows (`labeled` False) have no target: none is checked, and none is kept.
    """
    import numpy as np
    import pandas as pd

    from dataset import frame_of, parse_rows

    columns = schema.columns if labeled else schema.id_columns + schema.features
    frame = chunk.frame[list(columns)]
    cells = {column: frame[column].to_numpy() for column in columns}
    if not labeled:
        cells[schema.target] = np.zeros(len(frame))  # a valid label, dropped again below
    values, reasons = parse_rows(cells, frame.index, schema)
    if len(chunk.extra_fields):
        reasons = pd.concat([reasons, chunk.extra_fields]).groupby(level=0).agg("; ".join)
    bad = frame.index.isin(reasons.index)
    valid = frame_of({c: values[c][~bad] for c in columns}, columns, schema, frame.index[~bad])
    if not bad.any():
        return valid, None
    quarantined = _as_written(frame.loc[bad])
    quarantined.insert(0, "reason", reasons)
    # Line numbers as a person sees them in an editor: the header is line 1.
    quarantined.insert(0, "source_line", frame.index[bad] + 2)
    quarantined.insert(0, "source_file", file_name)
    # The quarantine has every column of the schema: a roster's rows leave the target blank.
    return valid, quarantined.reindex(columns=[*QUARANTINE_COLUMNS, *schema.columns], fill_value="")


def _as_written(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows as text, as the file most likely wrote them, whichever chunk they were read in: a whole
    number read as a float (pandas does when its column has a blank in that chunk) loses the ".0"
    it never had, and a missing cell is blank."""
    import numpy as np

    text = rows.astype("str")
    for column in rows.columns:
        cells = rows[column]
        if cells.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                whole = (cells % 1 == 0) & (cells.abs() < 2**53)
            text.loc[whole, column] = cells[whole].astype("int64").astype("str")
    return text.where(rows.notna(), "")


def _changed_since_scan(source: SourceFile) -> str | None:
    """Why the file read may not be the file that was hashed, or None."""
    try:
        stat = source.path.stat()
    except FileNotFoundError:
        return "it was removed while it was read"
    if (stat.st_size, stat.st_mtime_ns) != (source.size, source.mtime_ns):
        return "it changed while it was read: it may still be being written"
    return None


def _add_snapshots(
    settings: Settings, run_id: str, rosters: list[tuple[FileOutcome, pd.DataFrame, int]],
    batch: Batch,
) -> list[dict[str, Any]]:
    """Number this run's rosters as snapshots, count their new clients, put them in the batch;
    return their records.

    A client is new when no master row, earlier roster or labeled row of this run has its id.
    """
    from dataset import RowHashes, id_hashes, read_ids

    schema = settings.schema
    batch.flush()
    known = RowHashes()
    for path in (settings.finaldata_path, settings.rosters_path, batch.rows_path):
        for ids in read_ids(path, schema, settings.ingestion.chunk_rows):
            known.add(id_hashes(ids, schema))
    last = records.query(settings.records_path, "SELECT MAX(snapshot) AS last FROM rosters")
    number = (last[0]["last"] if last else None) or 0
    snapshot_records = []
    for outcome, rows, position in rosters:
        if outcome.status != "ingested":
            continue
        number += 1
        clients = id_hashes(rows, schema)
        outcome.new_clients = int((~known.contains(clients)).sum())
        known.add(clients)
        batch.write_snapshot(
            rows.assign(**{SNAPSHOT_COLUMN: number, MASTER_POSITION_COLUMN: position})
        )
        snapshot_records.append({
            "run_id": run_id, "time": records.utc_now(), "file": outcome.file,
            "checksum": outcome.checksum, "snapshot": number, "master_position": position,
            "rows_read": outcome.rows_read, "clients": outcome.accepted,
            "duplicate_ids": outcome.duplicate, "new_clients": outcome.new_clients,
            "quarantined": outcome.quarantined,
        })
    return snapshot_records


# ---------------------------------------------------------------------------------------------
# The transaction: append, record, finish; or, after a kill, finish or undo.


def _commit(
    settings: Settings, run_id: str, compiled: list[tuple[SourceFile, FileOutcome]],
    snapshots: list[dict[str, Any]], batch: Batch,
) -> None:
    """Append the batch to the master dataset, the rosters and the quarantine, and record its files
    and snapshots: all or none.

    The journal notes the files' lengths before anything is appended, and the records, stored in
    one transaction, are the commit. A run killed before the commit is undone by the next one
    (recover), which cuts the files back to the noted lengths; a run killed after it is finished by
    the next one.
    """
    batch.flush()
    journal = {
        "run_id": run_id,
        **{f"{name}_bytes": _size_or_none(path) for name, path in _appended_files(settings)},
        "batch": batch.rows_path.name,
        "new_rows": batch.new_rows,
    }
    _open_journal(settings, journal)
    if batch.new_rows or not settings.finaldata_path.exists():
        _append_rows_file(settings.finaldata_path, batch.rows_path)
    if batch.roster_rows:
        _append_rows_file(settings.rosters_path, batch.rosters_path)
    if batch.quarantined_rows:
        _append_rows_file(settings.quarantine_path, batch.quarantine_path)
    _record(settings, run_id, compiled, snapshots)
    _finish(settings, journal)


def _appended_files(settings: Settings) -> list[tuple[str, Path]]:
    """The files a run appends to, by the name the journal notes their length under."""
    return [
        ("finaldata", settings.finaldata_path),
        ("rosters", settings.rosters_path),
        ("quarantine", settings.quarantine_path),
    ]


def _finish(settings: Settings, journal: dict[str, Any]) -> None:
    """What follows a recorded run: its new rows become the newest batch (what drift is checked
    on), the binary copy of the master dataset and the list of ingested files are written again,
    and the journal is closed."""
    from dataset import update_master_copy

    batch_rows = settings.output_folder / journal["batch"]
    if journal["new_rows"] and batch_rows.exists():
        with atomicio.storage_errors(settings.latest_batch_path):
            os.replace(batch_rows, settings.latest_batch_path)
    update_master_copy(settings)
    _write_ingested_files_list(settings)
    _close_journal(settings)


def recover(settings: Settings) -> None:
    """Finish or undo an ingestion that was killed, so that the master dataset, the quarantine and
    the records agree again, and remove the files killed runs left. Called under the lock."""
    journal_path = _journal_path(settings)
    if journal_path.exists():
        journal = atomicio.read_json(journal_path)
        if _is_recorded(settings, journal["run_id"]):
            log.warning("finishing ingestion %s, stopped after it was recorded", journal["run_id"])
            _finish(settings, journal)
        else:
            log.warning(
                "undoing ingestion %s, stopped before it was recorded: its appends cut off",
                journal["run_id"],
            )
            for name, path in _appended_files(settings):
                _cut_back(path, journal.get(f"{name}_bytes", _size_or_none(path)))
            _close_journal(settings)
    for leftover in settings.output_folder.glob(f"{BATCH_PREFIX}*"):
        leftover.unlink()
    outputs = [
        path.name for path in (
            settings.finaldata_path, settings.rosters_path, settings.quarantine_path,
            settings.latest_batch_path, settings.ingested_files_path, journal_path,
            settings.master_copy_path,
        )
    ]
    if settings.output_folder.is_dir():
        atomicio.remove_leftovers(settings.output_folder, held_since(settings) or 0.0, outputs)


def _cut_back(path: Path, length: int | None) -> None:
    """Make `path` its first `length` bytes again (None: it did not exist)."""
    if length is None:
        path.unlink(missing_ok=True)
        return
    size = path.stat().st_size if path.exists() else 0
    if size == length:
        return
    if size < length:
        raise DataError(
            f"{path} is shorter ({size} bytes) than before the interrupted ingestion "
            f"({length} bytes): it was changed by hand; restore it from a backup"
        )
    with (
        atomicio.atomic_path(path) as temp_path,
        open(path, "rb") as whole,
        open(temp_path, "wb") as kept,
    ):
        remaining = length
        while remaining:
            block = whole.read(min(remaining, 1 << 20))
            if not block:  # shrunk meanwhile; nothing else writes it under the lock
                break
            kept.write(block)
            remaining -= len(block)


def _journal_path(settings: Settings) -> Path:
    return settings.output_folder / JOURNAL_NAME


def _open_journal(settings: Settings, journal: dict[str, Any]) -> None:
    """From here until the journal is closed, a stopped run is finished or undone by the next."""
    atomicio.write_json(_journal_path(settings), journal)


def _close_journal(settings: Settings) -> None:
    """The run is complete: no later run has anything to finish or undo."""
    _journal_path(settings).unlink(missing_ok=True)


def _size_or_none(path: Path) -> int | None:
    return path.stat().st_size if path.exists() else None


def _is_recorded(settings: Settings, run_id: str) -> bool:
    return bool(records.query(
        settings.records_path, "SELECT 1 FROM ingestions WHERE run_id = ? LIMIT 1", (run_id,)
    ))


def _append_rows_file(master_path: Path, rows_path: Path) -> None:
    """Atomically make master = master + the data lines of rows_path (CSVs of the same columns).

    Copying bytes is far cheaper than formatting a million rows as CSV again, and the new rows were
    formatted once already, as they were read.
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


def _record(
    settings: Settings, run_id: str, compiled: list[tuple[SourceFile, FileOutcome]],
    snapshots: list[dict[str, Any]],
) -> None:
    """Record every file and roster snapshot of the run, in one transaction: the run's commit."""
    time = records.utc_now()
    ingestions = [
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
        }
        for source, outcome in compiled
    ]
    records.add_all(settings.records_path, {"ingestions": ingestions, "rosters": snapshots})


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


def rebuild(settings: Settings) -> tuple[Path, IngestReport]:
    """Move the master dataset, the rosters, the quarantine and the ingestion records aside into a
    dated folder, then ingest every source file again: for a schema that changed under the data.

    Nothing is deleted: the files move, and the records database is copied whole before its
    ingestion and roster rows are cleared, so every earlier record is still in the dated folder.
    """
    import shutil
    import sqlite3

    with pipeline_lock(settings, "ingestion --rebuild"):
        recover(settings)
        aside = settings.output_folder / f"before-rebuild-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        aside.mkdir(parents=True)
        for path in (settings.finaldata_path, settings.master_copy_path, settings.rosters_path,
                     settings.quarantine_path, settings.ingested_files_path,
                     settings.latest_batch_path):
            if path.exists():
                os.replace(path, aside / path.name)
        if settings.records_path.exists():
            with records.connect(settings.records_path) as connection:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            shutil.copyfile(settings.records_path, aside / settings.records_path.name)
            with records.connect(settings.records_path) as connection:
                for table in ("ingestions", "rosters"):
                    try:
                        connection.execute(f"DELETE FROM {table}")
                    except sqlite3.OperationalError:  # a table this database never had
                        pass
        log.info("moved the old master dataset and its records aside into %s", aside)
        return aside, ingest(settings)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import argparse  # here, not at the top: fullprocess.py imports this module on its fast path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    parser.add_argument(
        "--rebuild", action="store_true",
        help="move the master dataset, rosters, quarantine and ingestion records aside into a "
        "dated folder and ingest every source file again (after a change of schema)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    if args.rebuild:
        aside, report = rebuild(settings)
        print(f"Moved the old master dataset and its records into {aside}")
    else:
        report = ingest(settings)
    print(report.summary())
    if report.files and not report.ingested and len(report.rejected) == len(report.files):
        print(f"every new file was rejected ({len(report.rejected)}): nothing new went in",
              file=sys.stderr)
        return EXIT_ALL_REJECTED
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
