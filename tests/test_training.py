"""Training: a deterministic pipeline, an F1-tuned threshold inside the model, readable metadata."""

from __future__ import annotations

import json
import pickle

import pandas as pd
import pytest

import generate_data
import records
from errors import InsufficientDataError, ModelNotFoundError, DeploymentError
from ingestion import ingest
from scoring import load_model
from training import main, train

HEADER = "corporation,lastmonth_activity,lastyear_activity,number_of_employees,exited\n"


def test_model_is_saved_with_metadata_a_person_can_read(workspace):
    ingest(workspace)

    result = train(workspace)

    metadata = json.loads(workspace.model_metadata_path.read_text())
    assert metadata["version"] == result.version
    assert metadata["training_data"]["rows"] == 1200
    assert metadata["features"] == list(workspace.schema.features)
    assert set(metadata["library_versions"]) >= {"python", "scikit-learn", "pandas", "numpy"}
    assert 0.0 < metadata["threshold"] < 1.0
    assert "cross-validation" in metadata["threshold_source"]
    assert metadata["training_metrics"]["cv_f1"] > 0.5
    assert records.query(workspace.records_path, "SELECT model_version FROM trainings") == [
        {"model_version": result.version}
    ]


def test_predictions_use_the_tuned_threshold(workspace):
    ingest(workspace)
    result = train(workspace)
    frame = pd.read_csv(workspace.finaldata_path)[list(workspace.schema.features)]

    probabilities = result.model.predict_proba(frame)[:, 1]
    predictions = result.model.predict(frame)

    threshold = result.metadata["threshold"]
    assert ((probabilities >= threshold) == (predictions == 1)).all()


def test_training_is_deterministic_for_the_same_data(workspace):
    ingest(workspace)
    first = train(workspace)
    frame = pd.read_csv(workspace.finaldata_path)

    second = train(workspace)

    assert first.metadata["threshold"] == second.metadata["threshold"]
    features = frame[list(workspace.schema.features)]
    assert (first.model.predict_proba(features) == second.model.predict_proba(features)).all()


def test_id_column_is_never_a_feature(workspace):
    ingest(workspace)
    model = train(workspace).model
    frame = pd.read_csv(workspace.finaldata_path)

    shuffled_ids = frame.assign(corporation=frame["corporation"].sample(frac=1, random_state=1).values)

    assert (model.predict_proba(frame) == model.predict_proba(shuffled_ids)).all()


def test_missing_feature_cells_are_imputed_with_the_training_median(workspace):
    (workspace.input_folder / "gaps.csv").write_text(HEADER + "gap1,,100,5,1\ngap2,3,,,0\n")
    ingest(workspace)

    model = train(workspace).model

    features = list(workspace.schema.features)
    frame = pd.DataFrame({"lastmonth_activity": [None], "lastyear_activity": [None],
                          "number_of_employees": [None]})
    medians = pd.read_csv(workspace.finaldata_path)[features].median().to_frame().T
    assert model.predict_proba(frame).shape == (1, 2)
    assert model.predict_proba(frame) == pytest.approx(model.predict_proba(medians), rel=1e-12)


def test_one_class_only_is_a_clear_error(workspace):
    for path in workspace.input_folder.iterdir():
        path.unlink()
    (workspace.input_folder / "stayers.csv").write_text(HEADER + "a,1,2,3,0\nb,4,5,6,0\n")
    ingest(workspace)

    with pytest.raises(InsufficientDataError, match="only clients who stayed"):
        train(workspace)


def test_tiny_data_trains_with_the_default_threshold_and_says_so(workspace):
    for path in workspace.input_folder.iterdir():
        path.unlink()
    tiny = generate_data.make_clients(16, seed=4)
    tiny.loc[:3, "exited"] = [1, 1, 0, 0]  # both classes, whatever the draw
    generate_data.write_csv(tiny, workspace.input_folder / "tiny.csv")
    ingest(workspace)

    result = train(workspace)

    assert result.metadata["threshold"] == 0.5
    assert result.metadata["threshold_source"].startswith("default")
    assert result.metadata["training_metrics"]["cv_f1"] is None


def test_training_without_ingested_data_says_to_ingest(workspace):
    with pytest.raises(InsufficientDataError, match="run ingestion.py"):
        train(workspace)


def test_load_model_refuses_a_file_that_differs_from_its_checksum(workspace):
    ingest(workspace)
    result = train(workspace)
    workspace.model_path.write_bytes(pickle.dumps("not the model"))

    with pytest.raises(DeploymentError, match="checksum"):
        load_model(workspace.model_path, result.metadata["model_sha256"])


def test_load_model_without_a_model_says_to_train(tmp_path):
    with pytest.raises(ModelNotFoundError, match="run training.py"):
        load_model(tmp_path / "trainedmodel.pkl")


def test_command_line_trains_and_prints_a_summary(workspace, capsys):
    ingest(workspace)

    assert main(["--config", str(workspace.config_path)]) == 0

    out = capsys.readouterr().out
    metadata = json.loads(workspace.model_metadata_path.read_text())
    assert "decision threshold" in out
    assert f"Trained model {metadata['version']} on 1200 rows" in out
    assert records.query(workspace.records_path, "SELECT model_version FROM trainings") == [
        {"model_version": metadata["version"]}
    ]
    assert hasattr(load_model(workspace.model_path, metadata["model_sha256"]), "predict_proba")


def test_linear_scorer_gives_the_models_own_probabilities_and_classes(workspace):
    import numpy as np

    from dataset import read_dataset
    from scoring import linear_scorer

    (workspace.input_folder / "gaps.csv").write_text(HEADER + "gap1,,100,5,1\ngap2,3,,,0\n")
    ingest(workspace)
    model = train(workspace).model
    frame = read_dataset(workspace.test_data_files()[0], workspace.schema)
    frame.loc[:9, "lastmonth_activity"] = pd.NA

    scorer = linear_scorer(model)

    expected = model.predict_proba(frame)[:, 1]
    assert np.allclose(scorer.probabilities(frame), expected, rtol=1e-12, atol=1e-15)
    assert ((scorer.probabilities(frame) >= scorer.threshold) == model.predict(frame)).all()


def test_linear_scorer_handles_categorical_features(tmp_path):
    import numpy as np

    from conftest import build_workspace, write_config
    from dataset import read_dataset
    from settings import load_settings
    from scoring import linear_scorer

    build_workspace(tmp_path)
    for path in list((tmp_path / "sourcedata").glob("*.csv")) + [tmp_path / "testdata/testdata.csv"]:
        frame = pd.read_csv(path)
        frame["region"] = np.where(frame["number_of_employees"] > 30, "north", "south")
        frame.loc[::7, "region"] = None
        frame.to_csv(path, index=False)
    settings = load_settings(write_config(
        tmp_path, schema={"categorical_features": ["region"]}
    ))
    ingest(settings)
    model = train(settings).model
    frame = read_dataset(settings.test_data_files()[0], settings.schema)
    frame.loc[:3, "region"] = "unseen"

    scorer = linear_scorer(model)

    assert np.allclose(scorer.probabilities(frame), model.predict_proba(frame)[:, 1], rtol=1e-12)


# (A categorical column without values stops the pipeline itself: its encoder gets no column.)
@pytest.mark.parametrize("column_without_values", [None, "lastmonth_activity"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_linear_gives_the_log_odds_of_the_pipeline_fitted_on_the_same_rows(
    column_without_values, weighted
):
    import warnings

    import numpy as np

    from scoring import model_input
    from settings import ModelSettings, Schema
    from training import build_pipeline, fit_linear

    schema = Schema(categorical_features=("region",))
    frame = generate_data.make_clients(1_500, seed=4)
    frame["region"] = np.where(frame["number_of_employees"] > 30, "north", "south")
    frame.loc[::7, "region"] = None
    frame.loc[::5, "lastyear_activity"] = np.nan
    if column_without_values:  # as a data file with the column left empty reads
        frame[column_without_values] = np.nan
    features = model_input(frame, schema)
    target = frame["exited"].to_numpy(dtype=int)
    weights = np.random.default_rng(0).uniform(0.1, 1, len(frame)) if weighted else None
    with warnings.catch_warnings():  # the pipeline's imputer warns that it drops the empty column
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # the median of no value
        pipeline = build_pipeline(schema, ModelSettings()).fit(
            features, target, **({"classifier__sample_weight": weights} if weighted else {})
        )
        expected = pipeline.decision_function(features)

    fitted = fit_linear(features, target, schema, ModelSettings(), weights)

    assert np.allclose(fitted.logits(features), expected, rtol=0, atol=1e-9)
    assert fitted.features == ("lastmonth_activity", "lastyear_activity", "number_of_employees",
                               "region")


def test_a_model_of_another_shape_has_no_linear_scorer():
    from sklearn.dummy import DummyClassifier

    from scoring import linear_scorer

    assert linear_scorer(DummyClassifier()) is None


def test_model_json_holds_the_fitted_arithmetic_a_person_can_read(workspace):
    ingest(workspace)

    result = train(workspace)

    plain = json.loads(workspace.model_json_path.read_text())
    medians = pd.read_csv(workspace.finaldata_path)[list(workspace.schema.features)].median()
    assert plain["version"] == result.version
    assert plain["features"] == list(workspace.schema.features)
    assert {term["column"]: term["fill"] for term in plain["numeric"]} == medians.to_dict()
    assert {term["log1p"] for term in plain["numeric"]} == {"after-imputing"}
    assert plain["threshold"] == result.metadata["threshold"]
    assert plain["model_sha256"] == result.metadata["model_sha256"]
    assert plain["library_versions"] == result.metadata["library_versions"]
    assert plain["largest_difference_from_predict_proba"] <= 1e-12
    assert result.metadata["model_json_sha256"]


def test_training_stops_rather_than_write_a_model_json_that_differs_from_the_model(
    workspace, monkeypatch
):
    import training

    def shifted(model):
        params = linear_model_params(model)
        return {**params, "intercept": params["intercept"] + 1e-6}

    linear_model_params = training.linear_model_params
    monkeypatch.setattr(training, "linear_model_params", shifted)
    ingest(workspace)

    with pytest.raises(RuntimeError, match="differ from predict_proba"):
        train(workspace)
    assert not workspace.model_json_path.exists()
