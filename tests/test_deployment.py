"""Deployment: releases switch whole through the manifest, are kept, listed, rolled back, verified."""

from __future__ import annotations

import json

import pytest

import deployment
import records
from deployment import current_release, deploy, list_releases, load_deployed_model, rollback
from errors import DeploymentError, ModelNotDeployedError
from scoring import evaluate, load_model, read_test_data, score
from training import train


def retrain_and_deploy(settings):
    """A second release: the data is unchanged, so only the training time makes the version new."""
    train(settings)
    score(settings)
    return deploy(settings)


def test_release_holds_every_file_with_matching_checksums(deployed):
    release = current_release(deployed)

    assert sorted(release.files) == sorted(
        ["trainedmodel.pkl", "model.json", "trainedmodel.json", "latestscore.txt",
         "ingestedfiles.txt", "trainingsample.csv"]
    )
    deployment.verify_release(release)
    assert release.f1 == pytest.approx(float(deployed.score_path.read_text()))


def test_deployed_model_loads_and_predicts(deployed):
    model, release = load_deployed_model(deployed)

    test_rows = read_test_data(deployed)
    features = test_rows[list(deployed.schema.features)]
    trained = load_model(deployed.model_path)
    assert release.is_current
    assert hasattr(model, "predict_proba")
    assert (model.predict_proba(features) == trained.predict_proba(features)).all()
    assert evaluate(model, test_rows, deployed).metrics.f1 == pytest.approx(release.f1)


def test_nothing_deployed_says_how_to_deploy(workspace):
    with pytest.raises(ModelNotDeployedError, match="deployment.py"):
        current_release(workspace)


def test_deploy_before_training_names_what_is_missing(workspace):
    with pytest.raises(DeploymentError, match="trainedmodel.pkl"):
        deploy(workspace)


def test_new_release_becomes_current_and_old_one_is_kept(deployed):
    first = current_release(deployed)

    second = retrain_and_deploy(deployed)

    assert current_release(deployed).version == second.version != first.version
    assert [r.version for r in list_releases(deployed)] == [first.version, second.version]
    actions = records.query(deployed.records_path, "SELECT action, version FROM deployments")
    assert [a["version"] for a in actions] == [first.version, second.version]


def test_rollback_without_version_returns_to_the_previous_release(deployed):
    first = current_release(deployed)
    retrain_and_deploy(deployed)

    restored = rollback(deployed)

    assert restored.version == first.version
    assert current_release(deployed).version == first.version


def test_rollback_to_unknown_version_lists_the_kept_ones(deployed):
    with pytest.raises(DeploymentError, match="kept releases"):
        rollback(deployed, "no-such-version")


def test_tampered_model_is_refused_on_load(deployed):
    release = current_release(deployed)
    release.model_path.write_bytes(b"tampered")

    with pytest.raises(DeploymentError, match="checksum"):
        load_deployed_model(deployed)


def test_crash_while_staging_leaves_the_current_release_serving(deployed, monkeypatch):
    before = current_release(deployed)
    retrain_target = deployed.model_metadata_path
    metadata = json.loads(retrain_target.read_text())
    retrain_target.write_text(json.dumps({**metadata, "version": "crashing-release"}))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(deployment.os, "rename", crash)
    with pytest.raises(OSError):
        deploy(deployed)

    assert current_release(deployed).version == before.version
    load_deployed_model(deployed)
    leftovers = [p.name for p in deployment.releases_folder(deployed).iterdir()]
    assert leftovers == [before.version]


def test_only_the_configured_number_of_releases_is_kept(deployed):
    from settings import DeploymentSettings

    settings = deployed._replace(deployment=DeploymentSettings(keep_releases=2))
    for _ in range(2):
        retrain_and_deploy(settings)

    kept = list_releases(settings)
    assert len(kept) == 2
    assert kept[-1].is_current


def test_list_and_rollback_from_the_command_line(deployed, capsys):
    version = current_release(deployed).version

    assert deployment.main(["--config", str(deployed.config_path), "--list"]) == 0
    assert f"* {version}" in capsys.readouterr().out

    retrain_and_deploy(deployed)
    assert deployment.main(["--config", str(deployed.config_path), "--rollback"]) == 0
    assert f"production now serves release {version}" in capsys.readouterr().out
    assert current_release(deployed).version == version


# ---------------------------------------------------------------------------------------------
# After runs that were killed (issue 12)


def test_deploy_removes_staging_folders_and_temporary_files_of_killed_runs(deployed):
    import os

    staging = deployment.releases_folder(deployed) / ".staging-20260101T000000Z-abc-123456"
    staging.mkdir()
    (staging / "trainedmodel.pkl").write_bytes(b"half a model")
    manifest_temp = deployed.deployment_folder / ".manifest.json.0123456789ab.tmp"
    manifest_temp.write_text('{"current": ')
    for leftover in (staging / "trainedmodel.pkl", staging, manifest_temp):
        os.utime(leftover, (0, 0))  # last written long before this run took the lock

    deploy(deployed)

    assert not staging.exists() and not manifest_temp.exists()


def test_deploying_the_current_release_again_changes_nothing(deployed):
    manifest = deployment.read_manifest(deployed)

    release = deploy(deployed)

    assert release.version == manifest["current"]
    assert deployment.read_manifest(deployed) == manifest
    assert len(records.query(deployed.records_path, "SELECT * FROM deployments")) == 1


def test_a_switch_that_was_never_recorded_is_recorded_by_the_next_deployment(deployed, monkeypatch):
    first = current_release(deployed).version
    train(deployed)
    score(deployed)
    with monkeypatch.context() as patch:
        patch.setattr(deployment.records, "add", lambda *args, **kwargs: None)  # the lost write
        second = deploy(deployed).version

    deploy(deployed)

    rows = records.query(deployed.records_path, "SELECT action, version, previous_version "
                         "FROM deployments ORDER BY id")
    assert [tuple(row.values()) for row in rows] == [
        ("deploy", first, None), ("deploy", second, first)
    ]


# ---------------------------------------------------------------------------------------------
# Outputs made from a release say which one


def test_outputs_of_the_served_release_are_in_step(reported):
    assert deployment.outputs_out_of_step(reported) == {}


def test_a_new_release_puts_every_output_out_of_step(reported):
    reported_version = current_release(reported).version

    retrain_and_deploy(reported)

    assert deployment.outputs_out_of_step(reported) == {
        "report.pdf": reported_version, "confusionmatrix.png": reported_version,
        "riskscores.csv": reported_version, "diagnostics": reported_version,
    }


def test_a_missing_output_is_out_of_step(reported):
    reported.risk_scores_path.unlink()

    assert deployment.outputs_out_of_step(reported) == {"riskscores.csv": None}


def test_nothing_deployed_has_no_outputs_to_keep_in_step(workspace):
    assert deployment.outputs_out_of_step(workspace) == {}



def test_release_list_says_what_each_f1_was_measured_on(deployed, capsys):
    from deployment import main

    assert main(["--config", str(deployed.config_path), "--list"]) == 0

    listing = capsys.readouterr().out
    assert "on the test data (400 rows; interval " in listing
    assert "0.6" in listing or "0.7" in listing  # three places, not seventeen
    assert not any(len(part) > 6 and part.startswith("0.") for part in listing.split())


def test_course_files_beside_the_releases_are_those_of_the_served_release(deployed):
    from deployment import COURSE_FILES, current_release, deploy, rollback

    first = current_release(deployed)
    for name in COURSE_FILES:
        assert (deployed.deployment_folder / name).read_bytes() == (first.folder / name).read_bytes()

    train(deployed)
    score(deployed)
    second = deploy(deployed)
    assert (deployed.deployment_folder / "trainedmodel.pkl").read_bytes() == (
        second.folder / "trainedmodel.pkl").read_bytes()

    rollback(deployed)

    for name in COURSE_FILES:
        assert (deployed.deployment_folder / name).read_bytes() == (first.folder / name).read_bytes()
