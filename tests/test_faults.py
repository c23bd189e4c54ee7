"""Faults: a run stopped at any step, a run by hand during a cycle, a full disk, stale outputs.

Each ingestion and deployment step is interrupted in turn, and the next run must end in exactly the
state an uninterrupted run leaves. Most stops raise `Killed` from the step in-process; two tests
kill a child process with SIGKILL at a step, so that no handler or `finally` runs at all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

import deployment
import diagnostics
import fullprocess
import generate_data
import ingestion
import locks
import records
from conftest import PROJECT_DIR, write_config
from errors import EXIT_BUSY, EXIT_USER_ERROR, CycleBusyError, StorageError, run_cli
from scoring import score
from settings import DeploymentSettings, load_settings
from training import train


class Killed(BaseException):
    """Stands in for kill -9: not an Exception, so no `except Exception` handles it."""


def stop_at(patch: pytest.MonkeyPatch, owner: object, name: str, call: int = 1, after=False):
    """Make the `call`-th call of owner.name raise Killed, before it does anything or after."""
    original = getattr(owner, name)
    calls = 0

    def stopping(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call and not after:
            raise Killed(name)
        result = original(*args, **kwargs)
        if calls == call:
            raise Killed(name)
        return result

    patch.setattr(owner, name, stopping)


def copy_workspace(settings, root: Path):
    shutil.copytree(settings.base_dir, root)
    return load_settings(root / "config.json")


def run_child(code: str) -> int:
    """Run Python code in a child process from the project folder; its exit code."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, check=False
    )
    return done.returncode


# ---------------------------------------------------------------------------------------------
# Ingestion stopped at each step


def ingestion_state(settings):
    """What ingestion leaves: its files' bytes, what it recorded of each file, hidden leftovers."""
    folder = settings.output_folder
    files = {
        path.name: path.read_bytes() if path.exists() else None
        for path in (settings.finaldata_path, settings.rosters_path, settings.quarantine_path,
                     settings.latest_batch_path, settings.ingested_files_path)
    }
    recorded = [
        (Path(row["file"]).name, row["checksum"], row["status"], row["rows_read"], row["accepted"],
         row["duplicate"], row["quarantined"], row["missing_cells"], row["reason"])
        for row in records.query(settings.records_path, "SELECT * FROM ingestions ORDER BY id")
    ]
    recorded += [
        (Path(row["file"]).name, row["snapshot"], row["master_position"], row["clients"],
         row["duplicate_ids"], row["new_clients"], row["quarantined"])
        for row in records.query(settings.records_path, "SELECT * FROM rosters ORDER BY id")
    ]
    leftovers = sorted(
        path.name for path in folder.iterdir()
        if path.name.startswith(".") and path.name != locks.LOCK_NAME
    )
    return files, recorded, leftovers


ROSTER = (
    "corporation,lastmonth_activity,lastyear_activity,number_of_employees\n"
    "aaaaaa,1,10,3\nbbbbbb,2,20,4\naaaaaa,7,70,7\ncccccc,x,30,5\n"
)


@pytest.fixture
def new_batch(workspace):
    """A workspace with ingested data and four new files: dirty rows, duplicates, a roster (a
    client twice, a bad cell), a bad file."""
    ingestion.ingest(workspace)
    generate_data.make_dirty(300, seed=4, id_offset=700_000).to_csv(
        workspace.input_folder / "dirty.csv", index=False
    )
    generate_data.write_csv(
        generate_data.make_clients(200, seed=5, id_offset=800_000),
        workspace.input_folder / "new.csv",
    )
    (workspace.input_folder / "roster.csv").write_text(ROSTER)
    (workspace.input_folder / "rejected.csv").write_text("not,a,dataset\n1,2,3\n")
    return workspace


@pytest.fixture
def uninterrupted(new_batch, tmp_path):
    """The state one uninterrupted ingestion of the new batch leaves."""
    reference = copy_workspace(new_batch, tmp_path / "reference")
    ingestion.ingest(reference)
    return ingestion_state(reference)


INGESTION_STEPS = {
    "reading a file": dict(owner=ingestion, name="split_rows", call=2),
    "numbering the snapshots": dict(owner=ingestion, name="_add_snapshots"),
    "writing the batch": dict(owner=ingestion.Batch, name="write", call=2),
    "opening the journal": dict(owner=ingestion, name="_open_journal"),
    "appending to the master dataset": dict(owner=ingestion, name="_append_rows_file"),
    "appending to the rosters": dict(owner=ingestion, name="_append_rows_file", call=2),
    "appending to the quarantine": dict(owner=ingestion, name="_append_rows_file", call=3),
    "recording the files": dict(owner=ingestion, name="_record"),
    "after recording the files": dict(owner=ingestion, name="_record", after=True),
    "publishing the newest batch": dict(owner=ingestion.os, name="replace", call=5, after=True),
    "listing the ingested files": dict(owner=ingestion, name="_write_ingested_files_list"),
    "closing the journal": dict(owner=ingestion, name="_close_journal"),
}


@pytest.mark.parametrize("step", INGESTION_STEPS.values(), ids=INGESTION_STEPS.keys())
def test_ingestion_stopped_at_any_step_ends_as_an_uninterrupted_one_when_run_again(
    new_batch, uninterrupted, monkeypatch, step
):
    with monkeypatch.context() as patch:
        stop_at(patch, **step)
        with pytest.raises(Killed):
            ingestion.ingest(new_batch)

    ingestion.ingest(new_batch)

    assert ingestion_state(new_batch) == uninterrupted


def test_ingestion_killed_between_appending_and_recording_is_undone_not_counted_twice(
    new_batch, uninterrupted
):
    killed_at_record = f"""
import os, signal, ingestion
ingestion._record = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
ingestion.main(["--config", {str(new_batch.config_path)!r}])
"""
    assert run_child(killed_at_record) == -signal.SIGKILL
    assert (new_batch.output_folder / ingestion.JOURNAL_NAME).exists()

    report = ingestion.ingest(new_batch)

    new_file = next(f for f in report.ingested if f.file == "new.csv")
    assert (new_file.accepted, new_file.duplicate) == (200, 0)
    assert ingestion_state(new_batch) == uninterrupted


def test_temporary_files_of_killed_runs_are_removed_by_the_next_ingestion(new_batch):
    stale = new_batch.output_folder / ".finaldata.csv.0123456789ab.tmp"
    stale.write_text("half a master dataset")
    os.utime(stale, (0, 0))

    ingestion.ingest(new_batch)

    assert not stale.exists()


# ---------------------------------------------------------------------------------------------
# Deployment stopped at each step


def deployment_state(settings):
    manifest = deployment.read_manifest(settings)
    switches = records.query(
        settings.records_path,
        "SELECT action, version, previous_version FROM deployments ORDER BY id",
    )
    return (
        manifest["current"],
        [(entry["version"], entry["action"]) for entry in manifest["history"]],
        sorted(path.name for path in deployment.releases_folder(settings).iterdir()),
        sorted(path.name for path in settings.deployment_folder.iterdir() if path.name[0] == "."),
        [tuple(row.values()) for row in switches],
    )


@pytest.fixture(scope="session")
def _retrained_template(_deployed_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrained") / "workspace"
    shutil.copytree(_deployed_template, root)
    settings = load_settings(root / "config.json")
    train(settings)
    score(settings)
    return root


@pytest.fixture
def retrained(_retrained_template, tmp_path):
    """A deployed workspace with a newer model trained and scored, not yet deployed; one release
    kept, so that deploying it also removes the old one."""
    settings = copy_workspace(load_settings(_retrained_template / "config.json"), tmp_path / "w")
    return settings._replace(deployment=DeploymentSettings(keep_releases=1))


@pytest.fixture
def deployed_uninterrupted(retrained, tmp_path):
    reference = copy_workspace(retrained, tmp_path / "reference")._replace(
        deployment=retrained.deployment
    )
    deployment.deploy(reference)
    return deployment_state(reference)


DEPLOYMENT_STEPS = {
    "staging the release": dict(owner=deployment, name="_stage_release"),
    "copying into the staging folder": dict(owner=shutil, name="copyfile", call=3),
    "naming the release folder": dict(owner=deployment.os, name="rename"),
    "switching the manifest": dict(owner=deployment, name="_switch_to"),
    "after switching the manifest": dict(owner=deployment.atomicio, name="write_json", call=2,
                                         after=True),
    "after recording the switch": dict(owner=deployment.records, name="add", after=True),
    "removing the old release": dict(owner=shutil, name="rmtree"),
}


@pytest.mark.parametrize("step", DEPLOYMENT_STEPS.values(), ids=DEPLOYMENT_STEPS.keys())
def test_deployment_stopped_at_any_step_ends_as_an_uninterrupted_one_when_run_again(
    retrained, deployed_uninterrupted, monkeypatch, step
):
    with monkeypatch.context() as patch:
        stop_at(patch, **step)
        with pytest.raises(Killed):
            deployment.deploy(retrained)
    deployment.load_deployed_model(retrained)  # whichever release serves, it serves whole

    deployment.deploy(retrained)

    assert deployment_state(retrained) == deployed_uninterrupted


def test_deployment_killed_while_writing_the_manifest_leaves_the_old_release_serving(
    retrained, deployed_uninterrupted
):
    serving = deployment.served_version(retrained)
    killed_in_manifest_write = f"""
import os, signal, atomicio, deployment
from settings import load_settings
fsync = atomicio._fsync_file
def fsync_or_die(path):
    if path.name.startswith(".manifest.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(path)
atomicio._fsync_file = fsync_or_die
settings = load_settings({str(retrained.config_path)!r})
deployment.deploy(settings._replace(deployment=settings.deployment._replace(keep_releases=1)))
"""
    assert run_child(killed_in_manifest_write) == -signal.SIGKILL
    assert deployment.served_version(retrained) == serving
    assert any(p.name.startswith(".manifest.json") for p in retrained.deployment_folder.iterdir())

    deployment.deploy(retrained)

    assert deployment_state(retrained) == deployed_uninterrupted


# ---------------------------------------------------------------------------------------------
# A stage run by hand while a cycle runs (defect 3)


@contextmanager
def held_elsewhere(settings, holder="a cycle"):
    """Hold the pipeline lock in another thread, as another process would."""
    taken, done = threading.Event(), threading.Event()

    def hold():
        with locks.pipeline_lock(settings, holder):
            taken.set()
            done.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    taken.wait()
    try:
        yield
    finally:
        done.set()
        thread.join()


def no_wait(settings):
    config = json.loads(settings.config_path.read_text())
    write_config(settings.base_dir, **{**config, "lock": {"wait_seconds": 0}})
    return load_settings(settings.config_path)


@pytest.mark.parametrize(
    ("module", "arguments"),
    [("ingestion", []), ("training", []), ("scoring", []), ("deployment", []),
     ("deployment", ["--rollback"]), ("reporting", [])],
    ids=["ingestion", "training", "scoring", "deployment", "rollback", "reporting"],
)
def test_stage_run_by_hand_during_a_cycle_says_so_and_exits_busy(
    deployed, capsys, module, arguments
):
    import importlib

    settings = no_wait(deployed)
    main = importlib.import_module(module).main
    before = deployment_state(settings), ingestion_state(settings)

    with held_elsewhere(settings):
        exit_code = run_cli(main, ["--config", str(settings.config_path), *arguments])

    assert exit_code == EXIT_BUSY == 75
    error = capsys.readouterr().err
    assert f"error: a cycle is running (pid {os.getpid()}, since " in error
    assert error.rstrip().endswith("try again")
    assert (deployment_state(settings), ingestion_state(settings)) == before


def test_ingestion_by_hand_during_a_cycle_neither_duplicates_rows_nor_records_twice(
    new_batch, uninterrupted
):
    settings = no_wait(new_batch)
    with held_elsewhere(settings), pytest.raises(CycleBusyError):
        ingestion.ingest(settings)

    ingestion.ingest(settings)

    assert ingestion_state(settings) == uninterrupted


def test_stages_called_inside_a_cycle_join_its_lock(new_batch):
    with fullprocess.cycle_lock(new_batch):
        report = ingestion.ingest(new_batch)

    assert [f.file for f in report.ingested] == ["dirty.csv", "new.csv", "roster.csv"]


def test_a_cycle_never_runs_inside_another_run(workspace):
    with locks.pipeline_lock(workspace, "ingestion"), pytest.raises(
        CycleBusyError, match="ingestion is running"
    ), fullprocess.cycle_lock(workspace):
        pass


# ---------------------------------------------------------------------------------------------
# Outputs that describe another release than the served one (defect 2)


@pytest.fixture
def cycle_settings(reported, monkeypatch):
    """A reported workspace whose cycles reach no API and no package index."""
    monkeypatch.setattr(
        diagnostics, "ask_index",
        lambda name, timeout: {"latest": None, "error": "offline", "checked_at": records.utc_now()},
    )
    config = json.loads(reported.config_path.read_text())
    write_config(reported.base_dir, **{**config, "api": {"base_url": "http://127.0.0.1:9"}})
    return load_settings(reported.config_path)


def run_cycle(settings, *flags):
    return fullprocess.main(["--config", str(settings.config_path), *flags])


def last_cycle(settings):
    return records.query(settings.records_path, "SELECT * FROM cycles ORDER BY id DESC LIMIT 1")[0]


def test_report_failing_after_a_deployment_is_said_and_retried_by_the_next_cycle(
    cycle_settings, monkeypatch
):
    import reporting

    def report_fails(settings, **options):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(reporting, "build_report", report_fails)
        assert run_cycle(cycle_settings, "--force") == 0

    served = deployment.served_version(cycle_settings)
    cycle = last_cycle(cycle_settings)
    assert (cycle["outcome"], cycle["release"]) == ("ok, with warnings", served)
    assert cycle["message"].startswith(f"deployed release {served} (was ")
    assert "; report failed: [Errno 28] No space left on device; will retry" in cycle["message"]
    assert deployment.outputs_out_of_step(cycle_settings)

    assert run_cycle(cycle_settings) == 0

    cycle = last_cycle(cycle_settings)
    assert (cycle["decision"], cycle["release"]) == ("nothing-new", served)
    assert "brought the report, risk list and diagnostics in line" in cycle["message"]
    assert deployment.outputs_out_of_step(cycle_settings) == {}
    risk = pd.read_csv(cycle_settings.risk_scores_path)
    assert set(risk["model_version"]) == {served}


def test_cycle_failing_after_the_switch_says_which_release_serves(cycle_settings, monkeypatch):
    def killed_after_switch(settings, *args):
        raise RuntimeError("stopped after the switch")

    monkeypatch.setattr(fullprocess, "after_deployment", killed_after_switch)
    with pytest.raises(RuntimeError):
        run_cycle(cycle_settings, "--force")

    served = deployment.served_version(cycle_settings)
    cycle = last_cycle(cycle_settings)
    assert (cycle["outcome"], cycle["release"]) == ("failed", served)
    assert cycle["message"].startswith(f"deployed {served}, then failed: RuntimeError(")
    log = cycle_settings.log_path.read_text()
    assert f"cycle failed; release {served} is serving" in log
    assert "previous deployment keeps serving" not in log


# ---------------------------------------------------------------------------------------------
# A full disk, a locked database (defect 8)


class _FullDisk(sqlite3.Connection):
    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE")):
            raise sqlite3.OperationalError(self.failure)
        return super().execute(sql, *args)

    def executemany(self, sql, *args):
        raise sqlite3.OperationalError(self.failure)


@pytest.mark.parametrize(
    ("failure", "advice"),
    [("database or disk is full", "is full; free space there"),
     ("database is locked", "stayed locked for 30 s")],
    ids=["disk-full", "locked"],
)
def test_records_database_that_cannot_be_written_says_what_to_free(
    new_batch, monkeypatch, capsys, failure, advice
):
    connect = sqlite3.connect
    monkeypatch.setattr(_FullDisk, "failure", failure, raising=False)
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: connect(*a, factory=_FullDisk, **k))
    records.close_connections()  # the workspace's own, opened before the disk filled

    exit_code = run_cli(ingestion.main, ["--config", str(new_batch.config_path)])

    assert exit_code == EXIT_USER_ERROR
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: the records database {new_batch.records_path}")
    assert advice in line


def test_full_disk_while_writing_an_output_names_the_folder_to_free(tmp_path):
    import atomicio

    def fill_the_disk(path):
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match=f"the disk holding {tmp_path} is full"):
        atomicio.write_with(tmp_path / "report.pdf", fill_the_disk)

    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_ingestion_stops_the_run_without_blaming_a_file(new_batch, monkeypatch):
    before = ingestion_state(new_batch)
    to_csv = pd.DataFrame.to_csv

    def disk_fills_with_the_rows(frame, *args, header=True, **kwargs):
        if header is False:  # the batch's rows, after its header
            raise OSError(28, "No space left on device")
        return to_csv(frame, *args, header=header, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_fills_with_the_rows)
    with pytest.raises(StorageError, match=f"the disk holding {new_batch.output_folder} is full"):
        ingestion.ingest(new_batch)

    assert ingestion_state(new_batch) == before
