"""The cron cycle: scenario tests, each asserting the decision taken and the files and records left."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import deployment
import fullprocess
import generate_data
import records
from conftest import build_workspace, write_config
from fullprocess import base_rate_change, cycle_lock, deploy_decision, drift_decision, main
from scoring import ModelComparison
from settings import DriftSettings, load_settings

# Nothing listens on the discard port, so the cycle's API call reports "not reachable" and goes on.
UNREACHABLE_API = {"base_url": "http://127.0.0.1:9"}


@pytest.fixture(autouse=True)
def offline_pip(monkeypatch):
    """The dependency check in a cycle must never leave this machine during tests."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


@pytest.fixture
def cycle_settings(reported):
    """A deployed, reported workspace whose config points apicalls at a port where no API runs."""
    config = json.loads(reported.config_path.read_text())
    write_config(reported.base_dir, **{**config, "api": UNREACHABLE_API})
    return load_settings(reported.config_path)


def run(settings, *flags):
    return main(["--config", str(settings.config_path), *flags])


def last_cycle(settings):
    return records.query(settings.records_path, "SELECT * FROM cycles ORDER BY id DESC LIMIT 1")[0]


def add_batch(settings, name, frame):
    generate_data.write_csv(frame, settings.input_folder / name)


def snapshot(settings):
    """Every file's bytes and modification time, except the records and the cycle log."""
    skipped = {settings.records_path.name, "records.sqlite-wal", "records.sqlite-shm",
               fullprocess.LOCK_NAME}
    return {
        path: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in settings.base_dir.rglob("*")
        if path.is_file() and path.name not in skipped and settings.log_path.parent not in path.parents
    }


# ---------------------------------------------------------------------------------------------
# Scenarios


def test_first_run_ingests_trains_scores_deploys_and_reports(tmp_path, capsys):
    root = tmp_path / "fresh"
    build_workspace(root)
    settings = load_settings(write_config(root, api=UNREACHABLE_API))

    assert run(settings) == 0

    cycle = last_cycle(settings)
    assert (cycle["decision"], cycle["outcome"]) == ("first-deployment", "ok")
    assert cycle["release"] == deployment.current_release(settings).version
    assert settings.report_path.exists() and settings.risk_scores_path.exists()
    assert "API not called" in capsys.readouterr().out
    assert "cycle ok" in settings.log_path.read_text()


def test_nothing_new_touches_no_model_or_data_file(cycle_settings, capsys):
    before = snapshot(cycle_settings)

    assert run(cycle_settings) == 0

    assert snapshot(cycle_settings) == before
    assert last_cycle(cycle_settings)["decision"] == "nothing-new"
    assert "no new data" in capsys.readouterr().out


def test_new_data_without_drift_is_ingested_but_not_retrained(cycle_settings):
    release = deployment.current_release(cycle_settings).version
    model_bytes = cycle_settings.model_path.read_bytes()
    add_batch(cycle_settings, "fresh.csv", generate_data.make_clients(2000, seed=21, id_offset=300_000))

    assert run(cycle_settings) == 0

    cycle = last_cycle(cycle_settings)
    assert cycle["decision"] == "no-drift"
    assert json.loads(cycle["new_files"]) == ["fresh.csv"]
    assert deployment.current_release(cycle_settings).version == release
    assert cycle_settings.model_path.read_bytes() == model_bytes
    assert len(pd.read_csv(cycle_settings.finaldata_path)) == 1200 + 2000
    drift = json.loads(cycle["details"])["drift"]
    assert drift["drifted"] is False
    assert "leavers" in drift["numbers"]


def test_a_roster_alone_brings_the_risk_list_up_to_date(cycle_settings):
    batch = generate_data.make_clients(600, seed=12, id_offset=100_000)  # conftest's batch2.csv
    roster = generate_data.make_roster(batch, seed=4, new_clients=30, id_offset=700_000)
    add_batch(cycle_settings, "roster.csv", roster.frame)
    release = deployment.current_release(cycle_settings).version

    assert run(cycle_settings) == 0

    cycle = last_cycle(cycle_settings)
    assert cycle["decision"] == "no-usable-rows"
    steps = json.loads(cycle["details"])["steps"]
    assert f"a roster of {len(roster.frame)} current clients" in steps[0]
    assert any(step.startswith("risk list: ") for step in steps)
    risk = pd.read_csv(cycle_settings.risk_scores_path, dtype={"corporation": str})
    assert set(roster.frame["corporation"]) <= set(risk["corporation"])
    assert set(risk["model_version"]) == {release}


def test_new_labeled_data_without_drift_brings_the_risk_list_up_to_date(cycle_settings):
    fresh = generate_data.make_clients(300, seed=31, id_offset=310_000)
    add_batch(cycle_settings, "fresh.csv", fresh)

    assert run(cycle_settings) == 0

    assert last_cycle(cycle_settings)["decision"] == "no-drift"
    risk = pd.read_csv(cycle_settings.risk_scores_path, dtype={"corporation": str})
    assert set(fresh.loc[fresh["exited"] == 0, "corporation"]) <= set(risk["corporation"])


def test_drifted_data_is_retrained_redeployed_and_reported(cycle_settings):
    old_release = deployment.current_release(cycle_settings).version
    add_batch(cycle_settings, "drifted.csv",
              generate_data.make_clients(2000, seed=22, drifted=True, id_offset=400_000))

    assert run(cycle_settings) == 0

    cycle = last_cycle(cycle_settings)
    assert cycle["decision"] == "drift-redeployed"
    new_release = deployment.current_release(cycle_settings).version
    assert new_release != old_release
    assert cycle["release"] == new_release
    details = json.loads(cycle["details"])
    assert details["drift"]["drifted"] is True
    assert details["drift"]["numbers"]["drop"] > details["drift"]["numbers"]["allowed_drop"]
    assert cycle_settings.report_path.exists()
    risk = pd.read_csv(cycle_settings.risk_scores_path)
    master = pd.read_csv(cycle_settings.finaldata_path)
    assert len(risk) == (master["exited"] == 0).sum()  # every client who has not left


def test_retrained_model_that_is_worse_is_not_deployed(cycle_settings, monkeypatch):
    import training

    learn = training.fit_model

    def learn_to_flag_nobody(frame, schema, options, sample_weight=None):  # a retrain gone wrong
        model, info = learn(frame, schema, options, sample_weight)
        model.set_params(threshold=1.01)
        return model, info

    monkeypatch.setattr(training, "fit_model", learn_to_flag_nobody)
    old_release = deployment.current_release(cycle_settings).version
    add_batch(cycle_settings, "drifted.csv",
              generate_data.make_clients(2000, seed=23, drifted=True, id_offset=500_000))

    assert run(cycle_settings) == 0

    cycle = last_cycle(cycle_settings)
    assert cycle["decision"] == "drift-kept-deployed"
    assert deployment.current_release(cycle_settings).version == old_release
    assert "keeping the deployed model" in cycle["message"]
    assert json.loads(cycle["details"])["deploy"]["numbers"]["evaluated_on"] == "the held-out new rows"


def test_drift_retrain_holds_out_new_rows_and_scores_the_release_on_them(cycle_settings, monkeypatch):
    monkeypatch.setattr(fullprocess, "after_deployment", lambda settings, cycle: [])
    add_batch(cycle_settings, "drifted.csv",
              generate_data.make_clients(2000, seed=28, drifted=True, id_offset=550_000))

    assert run(cycle_settings) == 0

    metadata = json.loads(cycle_settings.model_metadata_path.read_text())
    assert metadata["training_data"]["held_out_rows"] == 600
    # The changed relation is learnt best from the changed batch alone (issue 10): 2000 - 600 rows.
    assert metadata["training_data"]["plan"].startswith("since the change")
    assert metadata["training_data"]["rows"] == 2000 - 600
    release = deployment.current_release(cycle_settings)
    holdout_score = records.query(
        cycle_settings.records_path,
        "SELECT f1, rows FROM scores WHERE purpose = 'drift-holdout' AND model_version = ?",
        (release.version,),
    )
    assert [row["rows"] for row in holdout_score] == [600]
    assert release.f1 == pytest.approx(holdout_score[0]["f1"])


def test_next_batch_from_the_changed_process_is_not_drift_again(cycle_settings, monkeypatch):
    monkeypatch.setattr(fullprocess, "after_deployment", lambda settings, cycle: [])
    add_batch(cycle_settings, "drifted1.csv",
              generate_data.make_clients(2000, seed=29, drifted=True, id_offset=560_000))
    run(cycle_settings)
    add_batch(cycle_settings, "drifted2.csv",
              generate_data.make_clients(2000, seed=30, drifted=True, id_offset=570_000))

    assert run(cycle_settings) == 0

    assert last_cycle(cycle_settings)["decision"] == "no-drift"


def test_bad_file_among_new_ones_is_rejected_and_the_rest_processed(cycle_settings):
    (cycle_settings.input_folder / "broken.csv").write_text("not,a,dataset\n1,2,3\n")
    add_batch(cycle_settings, "fresh.csv", generate_data.make_clients(500, seed=24, id_offset=600_000))

    assert run(cycle_settings) == 0

    ingested = records.query(
        cycle_settings.records_path,
        "SELECT file, status FROM ingestions WHERE run_id = (SELECT MAX(run_id) FROM ingestions)",
    )
    statuses = {row["file"].rsplit("/", 1)[-1]: row["status"] for row in ingested}
    assert statuses == {"broken.csv": "rejected", "fresh.csv": "ingested"}
    assert last_cycle(cycle_settings)["outcome"] == "ok"


def test_second_cycle_started_while_one_runs_exits_at_once(cycle_settings, capsys):
    add_batch(cycle_settings, "fresh.csv", generate_data.make_clients(100, seed=25, id_offset=700_000))

    with cycle_lock(cycle_settings):
        assert run(cycle_settings) == 0

    assert "skipped: a cycle is running" in capsys.readouterr().out
    assert [f.path.name for f in fullprocess.ingestion.find_new_files(cycle_settings)] == ["fresh.csv"]


def test_crash_during_deployment_leaves_the_previous_release_serving(cycle_settings, monkeypatch):
    old_release = deployment.current_release(cycle_settings).version
    add_batch(cycle_settings, "drifted.csv",
              generate_data.make_clients(2000, seed=26, drifted=True, id_offset=800_000))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(deployment.os, "rename", crash)
    with pytest.raises(OSError, match="disk full"):
        run(cycle_settings)

    assert last_cycle(cycle_settings)["outcome"] == "failed"
    model, release = deployment.load_deployed_model(cycle_settings)
    assert release.version == old_release
    test_rows = pd.read_csv(cycle_settings.test_data_files()[0])
    assert len(model.predict(test_rows[list(cycle_settings.schema.features)])) == len(test_rows)


def test_force_retrains_and_redeploys_without_new_data(cycle_settings):
    old_release = deployment.current_release(cycle_settings).version

    assert run(cycle_settings, "--force") == 0

    assert last_cycle(cycle_settings)["decision"] == "forced-redeploy"
    assert deployment.current_release(cycle_settings).version != old_release


def test_dry_run_says_what_it_would_do_and_changes_nothing(cycle_settings, capsys):
    add_batch(cycle_settings, "fresh.csv", generate_data.make_clients(100, seed=27, id_offset=900_000))
    before = snapshot(cycle_settings)

    assert run(cycle_settings, "--dry-run") == 0

    assert "would ingest 1 new file(s) (fresh.csv)" in capsys.readouterr().out
    assert snapshot(cycle_settings) == before
    assert records.query(cycle_settings.records_path, "SELECT * FROM cycles") == []


# ---------------------------------------------------------------------------------------------
# The decisions


def test_drop_within_sampling_noise_is_not_drift():
    decision = drift_decision(0.70, (0.66, 0.74), 0.67, (0.63, 0.71), DriftSettings())

    assert not decision.drifted
    assert decision.numbers["allowed_drop"] > 0.03


def test_drop_beyond_sampling_noise_is_drift():
    decision = drift_decision(0.70, (0.66, 0.74), 0.40, (0.35, 0.45), DriftSettings())

    assert decision.drifted
    assert "fell from 0.700 to 0.400" in decision.reason


def test_raw_rule_counts_any_drop_beyond_the_tolerance():
    assert drift_decision(0.70, (0.66, 0.74), 0.69, (0.6, 0.8), DriftSettings(rule="raw")).drifted
    assert not drift_decision(
        0.70, (0.66, 0.74), 0.69, (0.6, 0.8), DriftSettings(rule="raw", tolerance=0.02)
    ).drifted


def test_base_rate_change_is_flagged_only_beyond_chance():
    assert base_rate_change(0.25, 2000, 0.26, 2000)["changed"] is False
    assert base_rate_change(0.25, 2000, 0.40, 2000)["changed"] is True


@pytest.mark.parametrize(
    ("difference_high", "forced", "deploys"),
    [(-0.01, False, False), (0.02, False, True), (-0.01, True, True)],
    ids=["significantly-worse", "not-worse", "forced"],
)
def test_deploy_decision(difference_high, forced, deploys):
    comparison = ModelComparison(
        rows=2000, candidate_f1=0.6, deployed_f1=0.65,
        difference_low=-0.08, difference_high=difference_high,
    )

    assert deploy_decision(comparison, "the test data", forced=forced).deploy is deploys


def test_unknown_drift_rule_is_a_config_error(tmp_path):
    from errors import ConfigError

    build_workspace(tmp_path)
    with pytest.raises(ConfigError, match="drift.rule"):
        load_settings(write_config(tmp_path, drift={"rule": "vibes"}))


def test_cycle_log_rotates_when_it_grows_too_large(cycle_settings):
    cycle_settings.log_path.parent.mkdir(parents=True, exist_ok=True)
    cycle_settings.log_path.write_text("x" * 2_000_000)

    assert run(cycle_settings) == 0

    rotated = cycle_settings.log_path.with_name(cycle_settings.log_path.name + ".1")
    assert rotated.stat().st_size == 2_000_000
    assert "cycle ok" in cycle_settings.log_path.read_text()


@pytest.mark.parametrize(
    "argv",
    [["--config", "cfg.json"], ["--config=cfg.json"], ["--config", "cfg.json", "--dry-run"],
     ["--force", "--config", "cfg.json"], ["--conf", "cfg.json"], [],
     ["--config", "cfg.json", "--quiet"], ["--quiet", "--config", "cfg.json"]],
)
def test_command_line_is_read_as_argparse_reads_it(argv):
    expected = fullprocess.argument_parser().parse_args(argv)

    assert vars(fullprocess.parse_args(argv)) == vars(expected)


def test_quiet_cycle_prints_nothing_on_success(cycle_settings, capsys):
    assert run(cycle_settings, "--quiet") == 0

    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cycle ok" in cycle_settings.log_path.read_text()


CRONTAB_STUB = """#!/bin/sh
# A stand-in for crontab(1): -l prints the table, - replaces it with standard input.
table="$CRONTAB_FILE"
case "$1" in
  -l) [ -f "$table" ] || { echo "no crontab for $USER" >&2; exit 1; }; cat "$table" ;;
  -) new=$(cat); printf '%s\\n' "$new" > "$table" ;;  # read it all first, as crontab does
  *) echo "unexpected crontab arguments: $*" >&2; exit 2 ;;
esac
"""


def test_crontab_one_liner_installed_twice_leaves_one_job_and_keeps_the_others(tmp_path):
    import os
    import re
    import shutil
    import subprocess

    from conftest import PROJECT_DIR

    readme = (PROJECT_DIR / "README.md").read_text()
    one_liner = re.search(r"```sh\n(\(crontab -l[^\n]*)\n```", readme).group(1)
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "crontab").write_text(CRONTAB_STUB)
    (bin_folder / "crontab").chmod(0o755)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(PROJECT_DIR / "cronjob.txt", project / "cronjob.txt")
    table = tmp_path / "crontab.txt"
    table.write_text("0 3 * * * /usr/bin/backup --nightly\n")
    environment = {**os.environ, "PATH": f"{bin_folder}:{os.environ['PATH']}",
                   "CRONTAB_FILE": str(table)}

    for _ in range(2):
        subprocess.run(["bash", "-c", one_liner], cwd=project, env=environment, check=True)

    lines = table.read_text().splitlines()
    assert lines[0] == "0 3 * * * /usr/bin/backup --nightly"
    jobs = [line for line in lines if "fullprocess" in line]
    assert len(jobs) == 1
    assert f"cd {project} && " in jobs[0] and "--quiet" in jobs[0]
    assert "@PROJECT@" not in table.read_text()
