"""Ingestion: every new file compiled once, every row accounted for, bad input rejected with reasons."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

import generate_data
import records
from errors import DataError
from dataset import read_dataset, read_master, read_master_chunks
from ingestion import find_new_files, ingest, main

HEADER = "corporation,lastmonth_activity,lastyear_activity,number_of_employees,exited\n"


def ingestion_rows(settings):
    return records.query(settings.records_path, "SELECT * FROM ingestions ORDER BY id")


def test_first_ingestion_compiles_every_source_file(workspace):
    report = ingest(workspace)

    master = read_master(workspace)
    assert [f.file for f in report.ingested] == ["batch1.csv", "batch2.csv"]
    assert len(master) == report.total_rows == report.accepted_rows == 1200
    assert list(master.columns) == list(workspace.schema.columns)
    assert workspace.ingested_files_path.read_text().splitlines() == ["batch1.csv", "batch2.csv"]
    assert [row["status"] for row in ingestion_rows(workspace)] == ["ingested", "ingested"]


def test_second_run_without_new_files_changes_nothing(workspace):
    ingest(workspace)
    before = workspace.finaldata_path.read_bytes()

    report = ingest(workspace)

    assert report.files == []
    assert workspace.finaldata_path.read_bytes() == before
    assert len(ingestion_rows(workspace)) == 2
    assert "No new data" in report.summary()


def test_replaced_file_is_ingested_again(workspace):
    ingest(workspace)
    replacement = generate_data.make_clients(50, seed=99, id_offset=500_000)
    generate_data.write_csv(replacement, workspace.input_folder / "batch1.csv")

    report = ingest(workspace)

    assert [f.file for f in report.ingested] == ["batch1.csv"]
    assert report.accepted_rows == 50
    assert len(read_master(workspace)) == 1250


def test_same_bytes_under_a_new_name_are_not_ingested_twice(workspace):
    ingest(workspace)
    shutil.copyfile(workspace.input_folder / "batch1.csv", workspace.input_folder / "copy.csv")

    assert find_new_files(workspace) == []
    assert ingest(workspace).files == []


@pytest.mark.parametrize(
    "name",
    [".hidden.csv", "upload.csv.tmp", "upload.csv.part", "notes.txt"],
)
def test_hidden_partial_and_non_csv_files_are_never_read(workspace, name):
    (workspace.input_folder / name).write_text(HEADER + "zzz,1,2,3,1\n")

    report = ingest(workspace)

    assert name not in [f.file for f in report.files]


def test_duplicate_rows_are_counted_not_added(workspace):
    ingest(workspace)
    old_rows = pd.read_csv(workspace.input_folder / "batch1.csv").head(10)
    new_rows = generate_data.make_clients(5, seed=7, id_offset=600_000)
    generate_data.write_csv(pd.concat([old_rows, new_rows, new_rows.head(2)]),
                            workspace.input_folder / "more.csv")

    outcome = ingest(workspace).files[0]

    assert (outcome.rows_read, outcome.accepted, outcome.duplicate) == (17, 5, 12)
    assert len(read_master(workspace)) == 1205


def test_every_row_of_a_dirty_file_is_accounted_for(workspace):
    dirty = generate_data.make_dirty(500, seed=3, id_offset=700_000)
    expected = generate_data.dirty_expectations(500, seed=3)
    dirty.to_csv(workspace.input_folder / "dirty.csv", index=False)

    report = ingest(workspace)
    outcome = next(f for f in report.files if f.file == "dirty.csv")

    assert outcome.rows_read == expected.rows
    assert outcome.duplicate == expected.duplicates
    assert outcome.quarantined == expected.quarantined
    assert outcome.accepted == expected.accepted
    assert outcome.missing_cells == expected.missing_feature_rows
    quarantine = pd.read_csv(workspace.quarantine_path, dtype=str, keep_default_na=False)
    assert len(quarantine) == expected.quarantined
    assert (quarantine["source_file"] == "dirty.csv").all()
    assert (quarantine["reason"] != "").all()
    assert "quarantined" in report.summary()


def test_quarantine_gives_a_reason_and_line_for_each_bad_row(workspace):
    bad_rows = [
        "aaa,abc,10,3,1",     # not a number
        "bbb,-5,10,3,0",      # negative count
        "ccc,2.5,10,3,0",     # not a whole number
        "ddd,1,10,3,maybe",   # not a label
        "eee,1,10,3,",        # no target
        ",1,10,3,0",          # no client id
    ]
    good_rows = ["fff,1,10,3,yes", "ggg,,10,3,FALSE", "hhh,n/a,10,3,1"]
    (workspace.input_folder / "mixed.csv").write_text(HEADER + "\n".join(bad_rows + good_rows) + "\n")

    ingest(workspace)

    quarantine = pd.read_csv(workspace.quarantine_path, dtype=str, keep_default_na=False)
    reasons = dict(zip(quarantine["source_line"].astype(int), quarantine["reason"], strict=True))
    assert reasons == {
        2: "lastmonth_activity 'abc' is not a number",
        3: "lastmonth_activity '-5' is negative",
        4: "lastmonth_activity '2.5' is not a whole number",
        5: "target exited 'maybe' is not a label (0/1, yes/no, true/false)",
        6: "missing target (exited)",
        7: "missing client id (corporation)",
    }
    master = read_master(workspace).set_index("corporation")
    assert master.loc[["fff", "ggg", "hhh"], "exited"].tolist() == [1, 0, 1]
    assert master.loc[["ggg", "hhh"], "lastmonth_activity"].isna().all()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (HEADER.encode(), "no data rows"),
        (b"corporation,exited\nabc,1\n", "missing required column(s) lastmonth_activity"),
        (b"\xff\xfe\x00garbage\x00\xff", "cannot be read"),
        (HEADER.encode() + b'abc,"1,2\n', "cannot be read"),
        (HEADER.encode() + b"abc,1,2,3,1\nabc,1,2,3,1,x,x,x,x\n", "line 3 has 9 fields, the header 5"),
        (HEADER.encode() + b"abc,1,2,3,1,x,x,x,x\n", "more than 5 + 3 fields"),
        (b"corporation,corporation," + HEADER.encode() + b"a,b,abc,1,2,3,1\n", "more than once"),
    ],
    ids=["empty", "header-only", "missing-columns", "binary", "broken-quotes", "far-too-long",
         "far-too-long-first", "repeated-column"],
)
def test_unusable_file_is_rejected_whole_and_others_still_go_in(workspace, content, reason):
    (workspace.input_folder / "bad.csv").write_bytes(content)

    report = ingest(workspace)

    rejected = {f.file: f.reason for f in report.rejected}
    assert reason in rejected["bad.csv"]
    assert len(read_master(workspace)) == 1200
    assert "REJECTED" in report.summary()


def test_rejected_file_is_not_retried_until_it_changes(workspace):
    (workspace.input_folder / "bad.csv").write_text("nonsense\n")
    ingest(workspace)

    assert find_new_files(workspace) == []
    (workspace.input_folder / "bad.csv").write_text(HEADER + "zzz,1,2,3,1\n")
    assert [f.path.name for f in find_new_files(workspace)] == ["bad.csv"]


def test_extra_columns_are_ignored_and_reported(workspace):
    (workspace.input_folder / "extra.csv").write_text(
        "region," + HEADER + "north,zzz,1,2,3,1\n"
    )

    outcome = next(f for f in ingest(workspace).files if f.file == "extra.csv")

    assert outcome.accepted == 1
    assert outcome.ignored_columns == ["region"]


def test_outputs_are_written_atomically_without_leftovers(workspace):
    ingest(workspace)

    leftovers = [p.name for p in workspace.output_folder.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_latest_batch_holds_only_the_rows_of_the_newest_ingestion(workspace):
    ingest(workspace)
    generate_data.write_csv(generate_data.make_clients(40, seed=5, id_offset=800_000),
                            workspace.input_folder / "new.csv")

    ingest(workspace)

    assert len(pd.read_csv(workspace.latest_batch_path)) == 40


def test_unchanged_file_is_not_read_again(workspace, monkeypatch):
    ingest(workspace)
    import atomicio

    def fail(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(atomicio, "sha256_of", fail)
    assert find_new_files(workspace) == []


def test_touched_file_with_same_content_is_not_new(workspace):
    ingest(workspace)
    path = workspace.input_folder / "batch1.csv"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))

    assert find_new_files(workspace) == []


def test_read_dataset_refuses_invalid_rows_naming_them(tmp_path, workspace):
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "aaa,1,2,3,1\nbbb,x,2,3,0\n")

    with pytest.raises(DataError, match=r"1 invalid row\(s\): row 2: lastmonth_activity 'x'"):
        read_dataset(path, workspace.schema)


def test_command_line_prints_the_report(workspace, capsys):
    assert main(["--config", str(workspace.config_path)]) == 0

    assert "Ingested 2 new file(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("cell", "reason"),
    [("inf", "is not finite"), ("1e20", "is too large"), ("-inf", "is not finite")],
)
def test_impossible_counts_are_quarantined(workspace, cell, reason):
    (workspace.input_folder / "odd.csv").write_text(HEADER + f"zzz,{cell},2,3,1\n")

    ingest(workspace)

    quarantine = pd.read_csv(workspace.quarantine_path, dtype=str, keep_default_na=False)
    assert reason in quarantine["reason"].iloc[0]


def test_text_cells_are_stripped_alike_in_small_and_large_columns():
    import numpy as np

    from dataset import SMALL_COLUMN, _stripped

    cells = np.array([" abc ", "", "   ", None, float("nan"), "x", 42], dtype=object)
    large = np.concatenate([cells] * (SMALL_COLUMN // len(cells) + 1))

    small_result = pd.Series(_stripped(cells))
    large_result = pd.Series(_stripped(large)[: len(cells)])

    assert small_result.isna().tolist() == [False, True, True, True, True, False, False]
    assert small_result.equals(large_result)
    assert small_result.dropna().tolist() == ["abc", "x", "42"]


# ---------------------------------------------------------------------------------------------
# One bad file never stops the others (issue 12, defect 1)


def quarantine_of(settings):
    return pd.read_csv(settings.quarantine_path, dtype=str, keep_default_na=False)


def test_file_whose_lines_end_in_a_comma_is_read_without_shifting_columns(workspace):
    (workspace.input_folder / "commas.csv").write_text(HEADER + "zzz,1,2,3,1,\nyyy,4,5,6,0,\n")

    outcome = next(f for f in ingest(workspace).files if f.file == "commas.csv")

    assert (outcome.status, outcome.accepted, outcome.quarantined) == ("ingested", 2, 0)
    master = read_master(workspace).set_index("corporation")
    assert master.loc["zzz"].tolist() == [1, 2, 3, 1]
    assert master.loc["yyy"].tolist() == [4, 5, 6, 0]


@pytest.mark.parametrize("extra", ["junk", ",more", "7,8,9"], ids=["one", "two", "three"])
def test_fields_beyond_the_header_quarantine_only_their_row(workspace, extra):
    (workspace.input_folder / "ragged.csv").write_text(
        HEADER + f"zzz,1,2,3,1\nyyy,4,5,6,0,{extra}\nxxx,7,8,9,1\n"
    )

    outcome = next(f for f in ingest(workspace).files if f.file == "ragged.csv")

    assert (outcome.accepted, outcome.quarantined) == (2, 1)
    [reason] = quarantine_of(workspace)["reason"]
    assert reason.startswith("the line has more fields than the header")


@pytest.mark.parametrize(
    ("cell", "reason"),
    [("9" * 400, "is too large"), ("-" + "9" * 400, "is too large"), ("1e400", "is not finite")],
    ids=["400-digit", "negative-400-digit", "beyond-float"],
)
def test_numbers_beyond_float_range_are_quarantined_with_a_reason(workspace, cell, reason):
    (workspace.input_folder / "huge.csv").write_text(HEADER + f"zzz,{cell},2,3,1\nyyy,1,2,3,0\n")

    outcome = next(f for f in ingest(workspace).files if f.file == "huge.csv")

    assert (outcome.accepted, outcome.quarantined) == (1, 1)
    assert reason in quarantine_of(workspace)["reason"].iloc[0]


def test_quarantine_reason_cuts_a_long_cell_short(workspace):
    (workspace.input_folder / "long.csv").write_text(HEADER + f"zzz,{'x' * 5000},2,3,1\n")

    ingest(workspace)

    [reason] = quarantine_of(workspace)["reason"]
    assert len(reason) < 120 and "(5000 characters)" in reason


@pytest.fixture
def unreadable(workspace, monkeypatch):
    """batch2.csv cannot be opened (as for a file of another user; tests may run as root)."""
    import atomicio

    hash_file = atomicio.sha256_of
    state = {"readable": False}

    def sha256_of(path):
        if path.name == "batch2.csv" and not state["readable"]:
            raise PermissionError(13, "Permission denied", str(path))
        return hash_file(path)

    monkeypatch.setattr(atomicio, "sha256_of", sha256_of)
    return state


def test_file_that_cannot_be_read_is_rejected_and_the_others_go_in(workspace, unreadable):
    report = ingest(workspace)

    assert [f.file for f in report.ingested] == ["batch1.csv"]
    [rejected] = report.rejected
    assert rejected.file == "batch2.csv" and "Permission denied" in rejected.reason
    assert len(read_master(workspace)) == 600


def test_file_that_cannot_be_read_is_not_retried_until_it_can_be(workspace, unreadable):
    ingest(workspace)
    assert find_new_files(workspace) == []

    unreadable["readable"] = True

    assert [f.path.name for f in find_new_files(workspace)] == ["batch2.csv"]
    assert ingest(workspace).accepted_rows == 600


@pytest.mark.parametrize(
    "step", ["read_chunks", "parse_rows", "frame_of", "row_hashes"],
    ids=["reading", "parsing", "converting", "hashing"],
)
def test_any_failure_with_one_file_rejects_that_file_alone(workspace, monkeypatch, step):
    import dataset

    (workspace.input_folder / "poison.csv").write_text(HEADER + "poison,1,2,3,1\n")
    original = getattr(dataset, step)

    def failing_on_poison(*args, **kwargs):
        if "poison" in repr(args):  # the file's stream, cells, values or rows
            raise TypeError(f"unexpected trouble in {step}")
        return original(*args, **kwargs)

    monkeypatch.setattr(dataset, step, failing_on_poison)
    report = ingest(workspace)

    assert {f.file: f.reason for f in report.rejected} == {
        "poison.csv": f"TypeError: unexpected trouble in {step}"
    }
    assert len(read_master(workspace)) == 1200
    statuses = {row["file"].rsplit("/", 1)[-1]: row["status"] for row in ingestion_rows(workspace)}
    assert statuses["poison.csv"] == "rejected"


# ---------------------------------------------------------------------------------------------
# Large and growing files (defects 6 and 8)


def test_a_file_is_read_in_chunks_with_the_result_of_reading_it_whole(workspace, monkeypatch):
    import dataset

    dirty = generate_data.make_dirty(500, seed=3, id_offset=700_000)
    dirty.to_csv(workspace.input_folder / "dirty.csv", index=False)
    whole = workspace
    chunked = workspace._replace(
        output_folder=workspace.output_folder.with_name("chunked"),
        ingestion=workspace.ingestion._replace(chunk_rows=37),
    )
    chunk_sizes = []
    read_chunks = dataset.read_chunks

    def counted(stream, *args, **kwargs):
        for chunk in read_chunks(stream, *args, **kwargs):
            if stream.name.endswith("dirty.csv"):
                chunk_sizes.append(len(chunk.frame))
            yield chunk

    ingest(whole)
    monkeypatch.setattr(dataset, "read_chunks", counted)
    ingest(chunked)

    assert chunk_sizes == [37] * 13 + [19]
    for name in ("finaldata.csv", "quarantine.csv", "latestbatch.csv"):
        written = (chunked.output_folder / name).read_bytes()
        assert written == (whole.output_folder / name).read_bytes()
    counts = "SELECT rows_read, accepted, duplicate, quarantined, missing_cells FROM ingestions"
    assert records.query(chunked.records_path, counts) == records.query(whole.records_path, counts)


def test_a_long_file_logs_its_progress(workspace, monkeypatch, caplog):
    import ingestion

    monkeypatch.setattr(ingestion, "PROGRESS_SECONDS", 0.0)
    settings = workspace._replace(ingestion=workspace.ingestion._replace(chunk_rows=200))

    with caplog.at_level("INFO", logger="ingestion"):
        ingest(settings)

    progress = [r.getMessage() for r in caplog.records if "rows read" in r.getMessage()]
    assert [line.split(",")[0] for line in progress] == [
        f"batch{file}.csv: {rows} rows read" for file in (1, 2) for rows in (200, 400, 600)
    ]


def test_file_modified_within_the_settle_time_is_left_for_the_next_run(workspace):
    settling = workspace._replace(ingestion=workspace.ingestion._replace(settle_seconds=3600))

    report = ingest(settling)

    assert [f.file for f in report.waiting] == ["batch1.csv", "batch2.csv"]
    assert "may still be being written" in report.summary()
    assert find_new_files(settling) == [] and ingestion_rows(workspace) == []
    assert [f.file for f in ingest(workspace).ingested] == ["batch1.csv", "batch2.csv"]


def test_file_that_grows_while_it_is_read_is_left_whole_for_the_next_run(workspace, monkeypatch):
    import dataset

    ingest(workspace)
    growing = workspace.input_folder / "growing.csv"
    generate_data.write_csv(generate_data.make_clients(100, seed=8, id_offset=900_000), growing)
    settings = workspace._replace(ingestion=workspace.ingestion._replace(chunk_rows=30))
    read_chunks = dataset.read_chunks

    def still_being_written(stream, *args, **kwargs):
        for number, chunk in enumerate(read_chunks(stream, *args, **kwargs)):
            if stream.name == str(growing) and number == 1:  # a writer appends half a line
                with open(growing, "a") as writer:
                    writer.write("abc,1,")
            yield chunk

    monkeypatch.setattr(dataset, "read_chunks", still_being_written)
    report = ingest(settings)
    monkeypatch.undo()

    assert [(f.file, f.status) for f in report.files] == [("growing.csv", "waiting")]
    assert not workspace.quarantine_path.exists()
    assert len(ingestion_rows(workspace)) == 2
    with open(growing, "a") as stream:
        stream.write("2,3,1\n")
    outcome = ingest(settings).files[0]
    assert (outcome.status, outcome.accepted, outcome.duplicate, outcome.quarantined) == (
        "ingested", 101, 0, 0
    )


# --- Rosters: current clients, outcome unknown ---------------------------------------------------

ROSTER_HEADER = "corporation,lastmonth_activity,lastyear_activity,number_of_employees\n"


def roster_rows(settings):
    return records.query(settings.records_path, "SELECT * FROM rosters ORDER BY id")


def test_roster_goes_beside_the_master_dataset_as_a_numbered_snapshot(workspace):
    ingest(workspace)
    master = workspace.finaldata_path.read_bytes()
    (workspace.input_folder / "roster.csv").write_text(ROSTER_HEADER + "aaa,1,10,3\nbbb,2,20,4\n")
    (workspace.input_folder / "roster2.csv").write_text(ROSTER_HEADER + "aaa,0,10,3\n")

    report = ingest(workspace)

    assert workspace.finaldata_path.read_bytes() == master
    assert report.accepted_rows == 0 and report.roster_clients == 3
    snapshots = pd.read_csv(workspace.rosters_path, dtype={"corporation": str})
    assert snapshots[["corporation", "snapshot", "master_position"]].values.tolist() == [
        ["aaa", 1, 1200], ["bbb", 1, 1200], ["aaa", 2, 1200],
    ]
    assert [(r["file"].rsplit("/", 1)[-1], r["clients"], r["new_clients"])
            for r in roster_rows(workspace)] == [("roster.csv", 2, 2), ("roster2.csv", 1, 0)]
    assert "roster of 2 current clients (2 not seen before)" in report.summary()
    assert [row["status"] for row in ingestion_rows(workspace)][-2:] == ["ingested", "ingested"]


def test_roster_is_newer_than_the_labeled_files_read_before_it(workspace):
    (workspace.input_folder / "c_roster.csv").write_text(ROSTER_HEADER + "aaa,1,10,3\n")
    (workspace.input_folder / "d_batch.csv").write_text(HEADER + "zzz,1,10,3,1\n")

    ingest(workspace)

    snapshots = pd.read_csv(workspace.rosters_path)
    # batch1.csv and batch2.csv are read before it, d_batch.csv after.
    assert snapshots["master_position"].tolist() == [1200]
    assert len(read_master(workspace)) == 1201


def test_roster_cells_that_fail_validation_are_quarantined_with_the_reason(workspace):
    (workspace.input_folder / "roster.csv").write_text(
        ROSTER_HEADER + "aaa,abc,10,3\nbbb,-2,20,4\n,1,1,1\nccc,,30,5\n"
    )

    outcome = next(f for f in ingest(workspace).files if f.file == "roster.csv")

    quarantine = pd.read_csv(workspace.quarantine_path, dtype=str, keep_default_na=False)
    assert dict(zip(quarantine["source_line"].astype(int), quarantine["reason"], strict=True)) == {
        2: "lastmonth_activity 'abc' is not a number",
        3: "lastmonth_activity '-2' is negative",
        4: "missing client id (corporation)",
    }
    assert (outcome.quarantined, outcome.accepted, outcome.missing_cells) == (3, 1, 1)
    assert "exited" not in "".join(quarantine["reason"])  # a roster never lacks a target


def test_roster_listing_a_client_twice_keeps_its_last_row_and_counts_the_other(workspace):
    (workspace.input_folder / "roster.csv").write_text(
        ROSTER_HEADER + "aaa,1,10,3\nbbb,2,20,4\naaa,7,70,7\n"
    )

    outcome = next(f for f in ingest(workspace).files if f.file == "roster.csv")

    snapshots = pd.read_csv(workspace.rosters_path, dtype={"corporation": str})
    assert snapshots.set_index("corporation").loc["aaa", "lastmonth_activity"] == 7
    assert (outcome.rows_read, outcome.duplicate, outcome.accepted) == (3, 1, 2)
    assert "1 duplicate ids (newest row kept)" in outcome.line()


def test_file_that_is_neither_a_labeled_batch_nor_a_roster_says_so_in_one_line(workspace):
    (workspace.input_folder / "notes.csv").write_text("corporation,comment\nabc,call back\n")

    report = ingest(workspace)

    [rejected] = report.rejected
    assert "neither a labeled batch" in rejected.reason and "nor a roster" in rejected.reason
    assert "\n" not in rejected.reason
    assert len(read_master(workspace)) == 1200


def test_every_new_file_rejected_exits_with_its_own_code_and_leaves_the_master_as_it_was(
    workspace, capsys
):
    from errors import EXIT_ALL_REJECTED

    ingest(workspace)
    master = workspace.finaldata_path.read_bytes()
    (workspace.input_folder / "broken.csv").write_text("not,a,dataset\n1,2,3\n")

    assert main(["--config", str(workspace.config_path)]) == EXIT_ALL_REJECTED

    assert "every new file was rejected" in capsys.readouterr().err
    assert workspace.finaldata_path.read_bytes() == master


def test_rebuild_moves_every_old_file_aside_and_ingests_again(workspace, capsys):
    ingest(workspace)
    rows_before = len(read_master(workspace))
    old_master = workspace.finaldata_path.read_bytes()

    assert main(["--config", str(workspace.config_path), "--rebuild"]) == 0

    aside = next(workspace.output_folder.glob("before-rebuild-*"))
    assert (aside / "finaldata.csv").read_bytes() == old_master
    assert (aside / workspace.records_path.name).exists()
    assert len(read_master(workspace)) == rows_before
    assert "Moved the old master dataset" in capsys.readouterr().out


def test_master_of_another_schema_says_to_rebuild(workspace):
    ingest(workspace)
    changed = workspace._replace(schema=workspace.schema._replace(
        numeric_features=workspace.schema.numeric_features + ("revenue",)))

    with pytest.raises(DataError, match="ingestion.py --rebuild"):
        read_master(changed)


# --- The master dataset's binary copy ----------------------------------------------------------


def read_master_csv(settings):
    """The master dataset as its CSV alone says: what the binary copy must always agree with."""
    settings.master_copy_path.unlink(missing_ok=True)
    return read_master(settings)


def test_the_binary_copy_holds_the_master_dataset_after_every_ingestion(workspace, monkeypatch):
    ingest(workspace)
    (workspace.input_folder / "later.csv").write_text(
        HEADER + "with-gaps,,NA,3,1\n\"comma, quote \"\" and é\",4,5,,0\n"
    )
    ingest(workspace)
    assert workspace.master_copy_path.exists()

    def no_csv_parsing(*args, **kwargs):
        raise AssertionError("the CSV was parsed although the copy holds it")

    with monkeypatch.context() as patched:
        patched.setattr("dataset.read_csv", no_csv_parsing)
        from_copy = read_master(workspace)

    pd.testing.assert_frame_equal(from_copy, read_master_csv(workspace))
    assert from_copy["corporation"].iloc[-1] == 'comma, quote " and é'
    assert pd.isna(from_copy["lastyear_activity"].iloc[-2])


def test_a_master_dataset_changed_by_hand_is_read_from_its_csv_not_from_the_copy(workspace):
    ingest(workspace)
    text = workspace.finaldata_path.read_text()
    first_row = text.splitlines()[1]
    edited = first_row[:-1] + ("0" if first_row[-1] == "1" else "1")  # the label, same size
    workspace.finaldata_path.write_text(text.replace(first_row, edited, 1))

    master = read_master(workspace)

    assert master["exited"].iloc[0] == int(edited[-1])


def test_a_copy_that_cannot_be_read_is_passed_over_and_made_again(workspace, caplog):
    ingest(workspace)
    workspace.master_copy_path.write_bytes(b"not a numpy file")

    assert len(read_master(workspace)) == 1200
    assert "cannot be read" in caplog.text

    generate_data.write_csv(
        generate_data.make_clients(10, seed=5, id_offset=900_000),
        workspace.input_folder / "more.csv",
    )
    ingest(workspace)
    pd.testing.assert_frame_equal(read_master(workspace), read_master_csv(workspace))


def test_a_copy_that_cannot_be_made_never_fails_the_ingestion(workspace, monkeypatch, caplog):
    ingest(workspace)
    assert workspace.master_copy_path.exists()

    def no_copy(*args, **kwargs):
        raise DataError("a cell of column corporation holds a NUL, which the copy cannot")

    monkeypatch.setattr("dataset._copy_arrays", no_copy)
    generate_data.write_csv(
        generate_data.make_clients(10, seed=5, id_offset=900_000),
        workspace.input_folder / "more.csv",
    )
    report = ingest(workspace)

    assert [f.file for f in report.ingested] == ["more.csv"]
    assert not workspace.master_copy_path.exists()  # a stale copy is not left behind either
    assert "no binary copy of the master dataset" in caplog.text
    assert len(read_master(workspace)) == 1210


def test_the_master_dataset_read_a_chunk_at_a_time_from_its_copy_is_the_csvs(workspace):
    ingest(workspace)
    (workspace.input_folder / "later.csv").write_text(
        HEADER + "with-gaps,,NA,3,1\n\"comma, quote \"\" and é\",4,5,,0\n"
    )
    ingest(workspace)  # the copy grows by the appended lines alone
    from_copy = list(read_master_chunks(workspace, 7))

    workspace.master_copy_path.unlink()
    from_csv = list(read_master_chunks(workspace, 7))

    assert len(from_copy) == len(from_csv) == -(-1202 // 7)
    for copied, parsed in zip(from_copy, from_csv, strict=True):
        pd.testing.assert_frame_equal(copied, parsed)
