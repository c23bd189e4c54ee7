"""Scoring: F1 alone in latestscore.txt, the full metrics with an F1 interval in the records."""

from __future__ import annotations

import numpy as np
import pytest

import records
from errors import DataError
from scoring import compute_metrics, main, score
from settings import ScoringSettings


def test_score_writes_f1_alone_and_records_full_metrics(deployed):
    report = score(deployed)

    assert float(deployed.score_path.read_text()) == pytest.approx(report.metrics.f1)
    row = records.query(deployed.records_path, "SELECT * FROM scores ORDER BY id DESC LIMIT 1")[0]
    assert row["f1"] == pytest.approx(report.metrics.f1)
    assert row["rows"] == 400
    assert row["f1_low"] <= row["f1"] <= row["f1_high"]
    assert 0.5 < row["roc_auc"] <= 1
    assert 0 < row["leaver_share"] < 1
    assert row["model_version"] == report.model_version


def test_metrics_match_hand_computed_values():
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    predictions = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    probabilities = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.1, 0.05])

    metrics = compute_metrics(truth, probabilities, predictions, ScoringSettings())

    assert metrics.precision == pytest.approx(2 / 3)
    assert metrics.recall == pytest.approx(2 / 3)
    assert metrics.f1 == pytest.approx(2 / 3)
    assert metrics.leaver_share == pytest.approx(3 / 8)
    assert metrics.roc_auc == pytest.approx(14 / 15)


def test_f1_interval_narrows_with_more_rows():
    rng = np.random.default_rng(0)
    widths = []
    for rows in (200, 20_000):
        truth = rng.integers(0, 2, rows)
        predictions = np.where(rng.random(rows) < 0.8, truth, 1 - truth)
        metrics = compute_metrics(truth, predictions.astype(float), predictions, ScoringSettings())
        assert metrics.f1_low < metrics.f1 < metrics.f1_high
        widths.append(metrics.f1_high - metrics.f1_low)

    assert widths[1] < widths[0] / 5


def test_scoring_another_model_leaves_latestscore_alone(deployed):
    from deployment import current_release

    before = deployed.score_path.read_text()
    release = current_release(deployed)

    report = score(deployed, model_path=release.model_path)

    assert report.model_version == release.version
    assert report.score_path is None
    assert deployed.score_path.read_text() == before


def test_scoring_on_invalid_test_data_names_the_problem(deployed):
    test_file = deployed.test_data_files()[0]
    test_file.write_text(test_file.read_text() + "zzz,lots,1,1,1\n")

    with pytest.raises(DataError, match="'lots' is not a number"):
        score(deployed)


def test_command_line_prints_metrics(deployed, capsys):
    assert main(["--config", str(deployed.config_path)]) == 0

    output = capsys.readouterr().out
    assert "F1" in output and "bootstrap interval" in output


def test_paired_comparison_finds_a_clearly_worse_candidate():
    from scoring import compare_predictions

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 2000)
    deployed = np.where(rng.random(2000) < 0.9, truth, 1 - truth)
    worse = np.where(rng.random(2000) < 0.6, truth, 1 - truth)

    comparison = compare_predictions(truth, worse, deployed, ScoringSettings())

    assert comparison.candidate_significantly_worse
    assert comparison.difference_low <= comparison.difference <= comparison.difference_high


def test_paired_comparison_of_a_model_with_itself_is_no_change():
    from scoring import compare_predictions

    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, 500)
    predictions = np.where(rng.random(500) < 0.8, truth, 1 - truth)

    comparison = compare_predictions(truth, predictions, predictions, ScoringSettings())

    assert comparison.difference == comparison.difference_low == comparison.difference_high == 0
    assert not comparison.candidate_significantly_worse


@pytest.mark.parametrize("rows", [5, 60, 2000])
def test_roc_auc_matches_scikit_learn_with_ties(rows):
    from sklearn.metrics import roc_auc_score

    from scoring import roc_auc

    rng = np.random.default_rng(rows)
    truth = np.r_[0, 1, rng.integers(0, 2, rows - 2)]
    scores = np.round(rng.random(rows), 1)  # coarse values: many ties

    assert roc_auc(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)


def test_evaluate_scores_known_rows_through_the_prediction_path(deployed):
    from deployment import load_deployed_model
    from scoring import evaluate, read_test_data

    model, _ = load_deployed_model(deployed)
    frame = read_test_data(deployed)

    evaluation = evaluate(model, frame, deployed)

    assert evaluation.probabilities == pytest.approx(model.predict_proba(frame)[:, 1], abs=1e-12)
    assert (evaluation.predictions == model.predict(frame)).all()
    assert evaluation.metrics.rows == len(frame)


# --- The model in use: model.json, numpy alone -------------------------------------------------


def test_json_model_and_pickle_give_the_same_probabilities_on_the_test_data(deployed):
    from deployment import current_release
    from scoring import load_deployed, load_model, read_test_data

    served, release = load_deployed(deployed)
    pickled = load_model(release.model_path, release.files["trainedmodel.pkl"])
    frame = read_test_data(deployed)

    probabilities = served.scorer.probabilities(frame)

    assert served.model is None and served.version == current_release(deployed).version
    assert np.abs(probabilities - pickled.predict_proba(frame)[:, 1]).max() <= 1e-12
    assert ((probabilities >= served.threshold) == pickled.predict(frame)).all()


def test_scoring_and_the_api_import_neither_scikit_learn_nor_scipy():
    import subprocess
    import sys

    from conftest import PROJECT_DIR

    code = (
        "import sys, scoring, app\n"
        "print(' '.join(m for m in ('sklearn', 'scipy') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
    )

    assert done.stdout.strip() == ""


def test_scoring_a_release_without_model_json_falls_back_to_its_pickle(deployed):
    from conftest import as_older_release
    from scoring import evaluate, load_deployed, read_test_data

    as_older_release(deployed)

    served, _ = load_deployed(deployed)

    assert served.scorer is None and hasattr(served.model, "predict_proba")
    f1 = evaluate(served, read_test_data(deployed), deployed).metrics.f1
    assert f1 == pytest.approx(float(deployed.score_path.read_text()))


def test_model_json_made_from_another_model_is_refused(deployed):
    import json

    import atomicio
    from deployment import current_release
    from errors import DeploymentError
    from scoring import load_served_model

    release = current_release(deployed)
    path = release.folder / "model.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_sha256": "0" * 64}))
    # Even with its checksum recorded, it must not stand for the release's pickle.
    release = release._replace(files={**release.files, "model.json": atomicio.sha256_of(path)})

    with pytest.raises(DeploymentError, match="another model"):
        load_served_model(release)


# --- Reasons -------------------------------------------------------------------------------------


def test_reasons_name_the_category_and_add_up_to_the_log_odds(tmp_path):
    import pandas as pd

    from conftest import build_workspace, write_config
    from dataset import read_dataset
    from ingestion import ingest
    from scoring import calibrated_probabilities, explain, linear_scorer
    from settings import load_settings
    from training import train

    build_workspace(tmp_path)
    for path in [*(tmp_path / "sourcedata").glob("*.csv"), tmp_path / "testdata/testdata.csv"]:
        frame = pd.read_csv(path)
        # Most leavers are in the south: the category carries real weight.
        frame["region"] = np.where(frame["exited"] == 1, "south", "north")
        frame.loc[::3, "region"] = "north"
        frame.to_csv(path, index=False)
    settings = load_settings(write_config(tmp_path, schema={"categorical_features": ["region"]}))
    ingest(settings)
    model = train(settings).model
    frame = read_dataset(settings.test_data_files()[0], settings.schema).head(50)
    frame.loc[0, "region"] = "unseen"

    why = explain(model, frame)

    weights = linear_scorer(model).categorical[0]["weights"]
    region = list(why.features).index("region")
    assert why.contributions[1, region] == weights[frame["region"].iloc[1]]
    assert why.contributions[0, region] == 0.0  # a category unseen in training adds nothing
    probabilities = model.predict_proba(frame)[:, 1]
    np.testing.assert_allclose(
        calibrated_probabilities(why.logits(), linear_scorer(model).calibration), probabilities,
        rtol=1e-9,
    )
    south = int(np.flatnonzero(frame["region"].to_numpy() == "south")[0])
    assert "region south: raises risk" in [reason["text"] for reason in why.as_records()[south]]


@pytest.mark.parametrize(
    ("value", "text"),
    [(12.0, "12"), (340.4, "340"), (1523.6, "1524"), (33.14, "33.1"), (0.25, "0.25"), (0.0, "0")],
)
def test_numbers_in_reasons_read_as_a_manager_reads_them(value, text):
    from scoring import number_text

    assert number_text(value) == text
