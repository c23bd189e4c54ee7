"""Diagnostics: predictions, statistics, missing data, timing, dependencies and data drift."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_config

import diagnostics
import generate_data
import records
import scoring
from deployment import current_release, load_deployed_model
from errors import DataError, InsufficientDataError, ModelNotDeployedError
from dataset import read_dataset
from ingestion import ingest
from settings import Settings, load_settings


@pytest.fixture
def index_answers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand in for pip: every package's latest version is 99.0; returns the names asked for."""
    asked: list[str] = []

    def answer(name: str, timeout: float) -> dict:
        asked.append(name)
        return {"latest": "99.0", "error": None, "checked_at": records.utc_now()}

    monkeypatch.setattr(diagnostics, "ask_index", answer)
    return asked


def _with_diagnostics(settings: Settings, **options) -> Settings:
    return settings._replace(diagnostics=settings.diagnostics._replace(**options))


def _test_frame(settings: Settings) -> pd.DataFrame:
    return read_dataset(settings.test_data_files()[0], settings.schema)


def _add_batch(settings: Settings, frame: pd.DataFrame, name: str) -> None:
    """Put a new source file in the input folder and ingest it: it becomes the newest batch."""
    generate_data.write_csv(frame, settings.input_folder / name)
    ingest(settings)


# --- Predictions -------------------------------------------------------------------------------


def test_predictions_have_one_entry_per_row_in_input_order(deployed):
    frame = _test_frame(deployed)
    reordered = frame.iloc[::-1].reset_index(drop=True)

    forward = diagnostics.model_predictions(deployed, frame)
    backward = diagnostics.model_predictions(deployed, reordered)

    assert len(backward.predictions) == len(backward.probabilities) == len(reordered)
    assert backward.ids == reordered["corporation"].tolist()
    assert backward.probabilities == forward.probabilities[::-1]


def test_prediction_classes_and_probabilities_are_the_models_own(deployed):
    model, release = load_deployed_model(deployed)
    frame = _test_frame(deployed)
    features = frame[list(deployed.schema.features)]

    result = scoring.predict_frame(model, release.version, frame, deployed.schema)

    assert result.model_version == release.version
    assert result.predictions == model.predict(features).tolist()
    np.testing.assert_allclose(result.probabilities, model.predict_proba(features)[:, 1])


def test_prediction_of_a_csv_file_equals_that_of_its_rows(deployed):
    path = deployed.test_data_files()[0]

    from_file = diagnostics.model_predictions(deployed, path)
    from_frame = diagnostics.model_predictions(deployed, pd.read_csv(path, dtype="str"))

    assert from_file.as_dict() == from_frame.as_dict()


def test_prediction_needs_no_target_column(deployed):
    unlabelled = pd.read_csv(deployed.test_data_files()[0]).drop(columns=["exited"]).head(5)

    result = diagnostics.model_predictions(deployed, unlabelled)

    assert len(result.predictions) == 5


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda f: f.drop(columns=["lastyear_activity"]), "lastyear_activity"),
        (lambda f: f.assign(lastmonth_activity="lots"), "not a number"),
        (lambda f: f.head(0), "no data rows"),
    ],
    ids=["missing column", "non-numeric value", "no rows"],
)
def test_prediction_rejects_invalid_data_naming_the_problem(deployed, change, words):
    frame = change(pd.read_csv(deployed.test_data_files()[0], dtype="str"))

    with pytest.raises(DataError, match=words):
        diagnostics.model_predictions(deployed, frame)


def test_prediction_without_a_deployed_model_says_so(workspace):
    with pytest.raises(ModelNotDeployedError):
        diagnostics.model_predictions(workspace, workspace.test_data_files()[0])


# --- Summary statistics and missing data -------------------------------------------------------


HAND_DATA = """corporation,lastmonth_activity,lastyear_activity,number_of_employees,exited
aaa,1,10,5,0
bbb,,20,,1
ccc,3,30,,0
ddd,10,40,7,1
"""


@pytest.fixture
def hand_workspace(tmp_path: Path) -> Settings:
    """A workspace whose master dataset is four rows written by hand, with three empty cells."""
    root = tmp_path / "hand"
    (root / "sourcedata").mkdir(parents=True)
    (root / "sourcedata" / "hand.csv").write_text(HAND_DATA)
    generate_data.write_csv(generate_data.make_clients(50, seed=5), root / "testdata" / "test.csv")
    settings = load_settings(write_config(root))
    ingest(settings)
    return settings


def test_summary_statistics_match_values_computed_by_hand(hand_workspace):
    statistics = diagnostics.summary_statistics(hand_workspace)

    # lastmonth_activity holds 1, 3, 10 and one gap: mean 14/3, sample variance 67/3.
    assert statistics["lastmonth_activity"] == pytest.approx(
        {"mean": 14 / 3, "median": 3.0, "std": math.sqrt(67 / 3), "min": 1.0, "max": 10.0,
         "count": 3}
    )
    assert statistics["lastyear_activity"] == pytest.approx(
        {"mean": 25.0, "median": 25.0, "std": math.sqrt(500 / 3), "min": 10.0, "max": 40.0,
         "count": 4}
    )
    assert statistics["number_of_employees"] == pytest.approx(
        {"mean": 6.0, "median": 6.0, "std": math.sqrt(2), "min": 5.0, "max": 7.0, "count": 2}
    )


def test_missing_data_is_the_percentage_of_empty_cells_per_column(hand_workspace):
    assert diagnostics.missing_data(hand_workspace) == pytest.approx({
        "corporation": 0.0,
        "lastmonth_activity": 25.0,
        "lastyear_activity": 0.0,
        "number_of_employees": 50.0,
        "exited": 0.0,
    })


@pytest.mark.parametrize("check", [diagnostics.summary_statistics, diagnostics.missing_data])
def test_statistics_before_any_ingestion_ask_for_ingestion(workspace, check):
    with pytest.raises(InsufficientDataError, match="run ingestion.py"):
        check(workspace)


# --- Timing ------------------------------------------------------------------------------------


def _file_contents(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_stage_timing_leaves_every_workspace_file_byte_identical(deployed):
    before = _file_contents(deployed.base_dir)

    timings = diagnostics.stage_timings(deployed)

    assert _file_contents(deployed.base_dir) == before
    assert set(timings) == {"ingestion", "training"}
    assert all(seconds > 0 for seconds in timings.values())


# --- Dependencies ------------------------------------------------------------------------------


def _requirements(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text(text)
    return path


@pytest.mark.runs_pip
def test_dependency_check_offline_answers_unknown_with_the_reason(deployed, tmp_path, monkeypatch):
    # pip reads these before its config files: an index nobody listens on, and nothing else.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    settings = _with_diagnostics(deployed, pip_timeout_seconds=10.0)
    requirements = _requirements(tmp_path, f"numpy=={np.__version__}\npandas=={pd.__version__}\n")

    rows = diagnostics.dependency_status(settings, requirements_path=requirements)

    assert [row["package"] for row in rows] == ["numpy", "pandas"]
    for row in rows:
        assert row["latest"] == "unknown"
        assert "offline" in row["latest_error"]
        assert row["installed"] == row["pinned"]


def test_dependency_table_compares_pinned_installed_and_latest(deployed, tmp_path, index_answers):
    requirements = _requirements(
        tmp_path,
        "# comment\n"
        f"numpy=={np.__version__}  # pinned to what runs\n"
        "pandas==0.1\n"
        "surely-not-installed-package==1.0\n",
    )

    rows = {
        row["package"]: row
        for row in diagnostics.dependency_status(deployed, requirements_path=requirements)
    }

    assert rows["numpy"]["installed"] == np.__version__
    assert rows["numpy"]["latest"] == "99.0"
    assert rows["numpy"]["flags"] == ["outdated"]
    assert "installed differs from pin" in rows["pandas"]["flags"]
    assert "not installed" in rows["surely-not-installed-package"]["flags"]


def test_dependency_flags_a_version_other_than_the_models_training(deployed, tmp_path,
                                                                    index_answers):
    metadata_path = current_release(deployed).metadata_path
    metadata = json.loads(metadata_path.read_text())
    metadata["library_versions"]["numpy"] = "1.0.0"
    metadata_path.write_text(json.dumps(metadata))
    requirements = _requirements(tmp_path, f"numpy=={np.__version__}\n")

    [row] = diagnostics.dependency_status(deployed, requirements_path=requirements)

    assert row["trained_with"] == "1.0.0"
    assert "differs from training" in row["flags"]


def test_dependency_answers_are_reused_until_refresh_is_asked(deployed, tmp_path, index_answers):
    requirements = _requirements(tmp_path, "numpy==1.0\npandas==1.0\n")

    diagnostics.dependency_status(deployed, requirements_path=requirements)
    diagnostics.dependency_status(deployed, requirements_path=requirements)
    assert sorted(index_answers) == ["numpy", "pandas"]

    diagnostics.dependency_status(deployed, requirements_path=requirements, refresh=True)
    assert sorted(index_answers) == ["numpy", "numpy", "pandas", "pandas"]


def test_dependency_answers_expire_after_the_cache_time(deployed, tmp_path, index_answers):
    requirements = _requirements(tmp_path, "numpy==1.0\n")
    no_cache = _with_diagnostics(deployed, dependency_cache_hours=0.0)

    diagnostics.dependency_status(no_cache, requirements_path=requirements)
    diagnostics.dependency_status(no_cache, requirements_path=requirements)

    assert index_answers == ["numpy", "numpy"]


# --- Data drift --------------------------------------------------------------------------------


def _fresh_clients(seed: int, offset: int) -> pd.DataFrame:
    return generate_data.make_clients(600, seed=seed, id_offset=offset)


def _shifted_clients(seed: int, offset: int) -> pd.DataFrame:
    """Clients whose monthly activity fell to a third and whose companies are three times larger."""
    clients = generate_data.make_clients(600, seed=seed, id_offset=offset)
    return clients.assign(
        lastmonth_activity=clients["lastmonth_activity"] // 3,
        number_of_employees=clients["number_of_employees"] * 3,
    )


# The deployed workspace's training sample has 1,200 rows: more than 1,000 selects the distances,
# a limit above it the tests.
SAMPLE_SIZES = pytest.mark.parametrize(
    ("small_sample_rows", "method"),
    [(1000, "distance"), (10_000, "p-value test")],
    ids=["distances", "p-value tests"],
)


@SAMPLE_SIZES
def test_drift_is_flagged_on_a_batch_whose_features_shifted(deployed, small_sample_rows, method):
    settings = _with_diagnostics(deployed, drift_small_sample_rows=small_sample_rows)
    _add_batch(settings, _shifted_clients(seed=31, offset=300_000), "shifted.csv")

    drift = diagnostics.data_drift(settings)

    assert drift["dataset_drift"] is True
    assert {"lastmonth_activity", "number_of_employees"} <= set(drift["drifted_features"])
    assert (drift["features"][0]["p_value"] is not None) == (method == "p-value test")


@SAMPLE_SIZES
def test_no_drift_on_a_fresh_sample_of_the_same_process(deployed, small_sample_rows, method):
    settings = _with_diagnostics(deployed, drift_small_sample_rows=small_sample_rows)
    _add_batch(settings, _fresh_clients(seed=32, offset=300_000), "fresh.csv")

    drift = diagnostics.data_drift(settings)

    assert drift["dataset_drift"] is False
    assert drift["current"]["rows"] == 600


def test_drift_reports_the_change_in_the_share_of_leavers(deployed):
    batch = generate_data.make_clients(600, seed=33, drifted=True, id_offset=300_000)
    _add_batch(deployed, batch, "drifted.csv")
    reference = pd.read_csv(current_release(deployed).training_sample_path)

    leavers = diagnostics.data_drift(deployed)["leavers"]

    assert leavers["reference_share"] == pytest.approx(reference["exited"].mean())
    assert leavers["current_share"] == pytest.approx(batch["exited"].mean())
    assert leavers["change"] == pytest.approx(batch["exited"].mean() - reference["exited"].mean())
    assert 0 < leavers["p_value"] < 1


def test_categorical_features_get_a_categorical_test(deployed):
    schema = deployed.schema._replace(categorical_features=("region",))
    reference = pd.DataFrame({"region": ["north"] * 300 + ["south"] * 300 + ["east"] * 300,
                              "exited": [0, 1, 0] * 300})
    current = pd.DataFrame({"region": ["north"] * 500 + ["west"] * 100, "exited": [0, 1] * 300})
    schema = schema._replace(numeric_features=(), count_columns=())

    drift = diagnostics.compare_datasets(reference, current, schema, deployed.diagnostics)

    [region] = drift["features"]
    assert region["test"] == "chi-squared"
    assert region["drifted"] is True


def test_drift_without_a_new_batch_says_what_to_do(deployed):
    deployed.latest_batch_path.unlink()

    with pytest.raises(DataError, match="ingest new data"):
        diagnostics.data_drift(deployed)


def test_drift_of_a_batch_file_without_a_feature_column_names_it(deployed):
    batch = pd.read_csv(deployed.latest_batch_path).drop(columns=["lastyear_activity"])
    batch.to_csv(deployed.latest_batch_path, index=False)

    with pytest.raises(DataError, match="lacks column.s. lastyear_activity: ingest new data"):
        diagnostics.data_drift(deployed)


# --- Running them all --------------------------------------------------------------------------


def test_a_diagnostics_run_is_recorded_and_served_as_the_latest(deployed, index_answers):
    payload = diagnostics.run_diagnostics(deployed)

    assert diagnostics.latest_diagnostics(deployed) == payload
    assert payload["model_version"] == current_release(deployed).version
    assert payload["data_drift"]["dataset_drift"] is False
    json.dumps(payload, allow_nan=False)  # strict JSON: no NaN anywhere


def test_latest_diagnostics_is_none_before_the_first_run(workspace):
    assert diagnostics.latest_diagnostics(workspace) is None


def test_sections_that_cannot_run_say_why_and_the_others_still_run(workspace):
    ingest(workspace)

    payload = diagnostics.run_diagnostics(workspace, dependencies=False)

    assert payload["data_drift"] is None
    assert "no model is deployed" in payload["unavailable"]["data_drift"]
    assert payload["summary_statistics"]["lastyear_activity"]["count"] > 0
    assert payload["model_version"] is None


def test_command_prints_json_with_every_section(deployed, capsys, index_answers):
    assert diagnostics.main(["--config", str(deployed.config_path), "--json"]) == 0

    payload = json.loads(capsys.readouterr().out)
    assert {"summary_statistics", "missing_data", "stage_timings", "dependencies", "data_drift",
            "model_version", "time"} <= set(payload)


def test_command_prints_a_readable_summary(deployed, capsys):
    arguments = ["--config", str(deployed.config_path), "--no-dependencies"]

    assert diagnostics.main(arguments) == 0

    out = capsys.readouterr().out
    assert "Summary statistics" in out
    assert "no dataset drift" in out
    assert "skipped on request" in out


def test_stage_timings_are_read_from_the_records_not_measured_again(deployed, monkeypatch):
    def no_scratch_run(settings):
        raise AssertionError("stage timings were measured again")

    monkeypatch.setattr(diagnostics, "stage_timings", no_scratch_run)
    records.add_stage_run(deployed.records_path, "ingestion", 0.5, 1200)
    records.add_stage_run(deployed.records_path, "training", 1.25, 1200)

    payload = diagnostics.run_diagnostics(deployed, dependencies=False)

    assert payload["stage_timings"]["ingestion"] == 0.5
    assert payload["stage_timings"]["training"] == 1.25
    assert payload["stage_timings_source"] == "recorded when each stage last ran"


def test_every_stage_records_how_long_it_ran(deployed):
    rows = records.query(deployed.records_path, "SELECT stage, seconds, rows FROM stage_runs")

    assert {row["stage"] for row in rows} == {"ingestion", "training", "scoring", "deployment"}
    assert all(row["seconds"] > 0 for row in rows)
    training = next(row for row in rows if row["stage"] == "training")
    assert training["rows"] == 1200


def test_time_stages_measures_on_a_scratch_copy_on_request(deployed, monkeypatch):
    monkeypatch.setattr(diagnostics, "stage_timings", lambda settings: {"ingestion": 9.0})

    payload = diagnostics.run_diagnostics(deployed, dependencies=False, time_stages=True)

    assert payload["stage_timings"] == {"ingestion": 9.0}
    assert payload["stage_timings_source"] == "measured now on a scratch copy"


def test_a_slow_package_index_does_not_hold_diagnostics_up(deployed, monkeypatch):
    import threading

    answered = threading.Event()

    def slow_status(settings, refresh=False):
        answered.wait(10)
        return []

    monkeypatch.setattr(diagnostics, "dependency_status", slow_status)
    settings = deployed._replace(
        diagnostics=deployed.diagnostics._replace(dependency_wait_seconds=0.05)
    )
    try:
        payload = diagnostics.run_diagnostics(settings)
    finally:
        answered.set()

    assert payload["dependencies"] is None
    assert "still being asked" in payload["unavailable"]["dependencies"]
    assert payload["summary_statistics"] is not None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wasserstein_distance_matches_scipy(seed):
    from scipy import stats

    rng = np.random.default_rng(seed)
    reference = np.log1p(rng.poisson(30, 500)).astype(float)  # few distinct values: many ties
    current = np.log1p(rng.poisson(25, 3000)).astype(float)

    assert diagnostics.wasserstein_distance(reference, current) == pytest.approx(
        stats.wasserstein_distance(reference, current), rel=1e-12
    )
