"""The API, through Flask's test client (every endpoint and bad input), and once under gunicorn."""

from __future__ import annotations

import io
import os
import re
import signal
import time

import pandas as pd
import pytest
import requests

import apicalls
import atomicio
import calllist
import deployment
import diagnostics
import generate_data
import records
from app import create_app, status_for
from conftest import TEST_ROWS, assert_refused, running_gunicorn, workspace_state
from errors import (
    ConfigError,
    DataError,
    DataFileNotFound,
    DataNotReady,
    DeploymentError,
    InputTooLarge,
    InsufficientDataError,
    ModelNotDeployedError,
    ModelNotFoundError,
    UnsupportedInput,
)
from ingestion import ingest
from scoring import score
from training import train

TOKEN = "test-token-5f2c"
TEST_FILE = "testdata/testdata.csv"
FEATURES = ["lastmonth_activity", "lastyear_activity", "number_of_employees"]


@pytest.fixture(autouse=True)
def no_token_from_the_environment(monkeypatch):
    monkeypatch.delenv("RISK_API_TOKEN", raising=False)


@pytest.fixture
def client(make_client, deployed):
    return make_client(deployed)


@pytest.fixture
def undeployed_client(make_client, workspace):
    return make_client(workspace)


@pytest.fixture
def token_client(make_client, deployed, monkeypatch):
    monkeypatch.setenv("RISK_API_TOKEN", TOKEN)
    return make_client(deployed)


@pytest.fixture
def rows_of_test_file(deployed) -> list[dict]:
    """The test file's rows without their target, as JSON records in the file's order."""
    frame = pd.read_csv(deployed.base_dir / TEST_FILE, dtype={"corporation": "str"})
    return frame.drop(columns="exited").to_dict(orient="records")


@pytest.fixture
def predict(client):
    """POST /prediction; the answer, once it is known to be a 200."""
    def post(**request):
        response = client.post("/prediction", **request)
        assert response.status_code == 200, response.json
        return response.json
    return post


def retrain_and_deploy(settings) -> str:
    """A new release of the same data: training stamps a new version."""
    train(settings)
    score(settings)
    return deployment.deploy(settings).version


def error_of(response) -> str:
    assert response.is_json
    return response.json["error"]


# --- Health and readiness ----------------------------------------------------------------------


def test_health_answers_without_a_deployment(undeployed_client):
    response = undeployed_client.get("/health")

    assert (response.status_code, response.json) == (200, {"status": "ok"})


def test_ready_names_the_deployed_release(client, deployed):
    response = client.get("/ready")

    assert response.status_code == 200
    assert response.json["model_version"] == deployment.current_release(deployed).version


@pytest.mark.parametrize(
    ("method", "path", "request_args", "command"),
    [
        ("get", "/ready", {}, "deployment.py"),
        ("post", "/prediction", {"json": {"filepath": TEST_FILE}}, "deployment.py"),
        ("get", "/scoring", {}, "deployment.py"),
        ("get", "/summarystats", {}, "ingestion.py"),
        ("get", "/diagnostics", {}, "diagnostics.py"),
        ("get", "/risk", {}, "reporting.py"),
        ("get", "/report", {}, "reporting.py"),
    ],
)
def test_answer_not_produced_yet_is_503_naming_the_command_that_makes_it(
    undeployed_client, method, path, request_args, command
):
    response = getattr(undeployed_client, method)(path, **request_args)

    assert_refused(response, 503, command)


@pytest.mark.parametrize(
    ("path", "command"),
    [("/diagnostics", "diagnostics.py"), ("/risk", "reporting.py"), ("/report", "reporting.py")],
)
def test_answer_a_deployed_workspace_has_not_produced_yet_is_503_naming_the_command(
    client, path, command
):
    response = client.get(path)

    assert_refused(response, 503, command)


# --- Prediction: good input --------------------------------------------------------------------


def test_prediction_of_a_named_file_follows_its_row_order(predict, deployed, rows_of_test_file):
    answer = predict(json={"filepath": TEST_FILE})

    assert answer["ids"] == [row["corporation"] for row in rows_of_test_file]
    assert len(answer["predictions"]) == len(answer["probabilities"]) == TEST_ROWS
    assert answer["model_version"] == deployment.current_release(deployed).version


@pytest.mark.parametrize(
    "request_args",
    [
        {"data": {"filepath": TEST_FILE}},
        {"data": {"filepath": TEST_FILE}, "content_type": "multipart/form-data"},
        {"query_string": {"filepath": TEST_FILE}},
    ],
    ids=["urlencoded-form", "multipart-form", "query-parameter"],
)
def test_prediction_takes_the_filepath_as_form_field_or_query_parameter(predict, request_args):
    assert predict(**request_args) == predict(json={"filepath": TEST_FILE})


def test_prediction_of_records_matches_the_same_rows_in_a_file(predict, rows_of_test_file):
    from_records = predict(json={"records": rows_of_test_file[:25]})
    from_file = predict(json={"filepath": TEST_FILE})

    assert from_records["ids"] == from_file["ids"][:25]
    assert from_records["predictions"] == from_file["predictions"][:25]
    assert from_records["probabilities"] == pytest.approx(from_file["probabilities"][:25])


def test_prediction_reads_numbers_given_as_json_strings_like_numbers(predict, rows_of_test_file):
    rows = rows_of_test_file[:5]
    as_text = [{key: str(value) for key, value in row.items()} for row in rows]

    assert predict(json={"records": as_text}) == predict(json={"records": rows})


def test_prediction_of_a_csv_body_matches_the_same_file_by_name(predict, deployed):
    body = (deployed.base_dir / TEST_FILE).read_bytes()

    from_body = predict(data=body, content_type="text/csv")
    from_file = predict(json={"filepath": TEST_FILE})

    assert from_file.pop("resolved_path") == TEST_FILE
    assert "resolved_path" not in from_body
    assert from_body == from_file


def test_prediction_treats_null_as_a_missing_value_imputed_with_the_training_median(
    predict, deployed, rows_of_test_file
):
    row = {**rows_of_test_file[0], "number_of_employees": None}
    median = pd.read_csv(deployed.finaldata_path)["number_of_employees"].median()
    model, _ = deployment.load_deployed_model(deployed)
    with_median = pd.DataFrame([{**row, "number_of_employees": median}])[FEATURES]

    answer = predict(json={"records": [row]})

    assert 0 <= answer["probabilities"][0] <= 1
    assert answer["probabilities"][0] == pytest.approx(
        model.predict_proba(with_median)[0, 1], rel=1e-9
    )


# --- Prediction: bad input ---------------------------------------------------------------------


GOOD_ROW = {
    "corporation": "abcdef", "lastmonth_activity": 30, "lastyear_activity": 400,
    "number_of_employees": 12,
}
CSV_HEADER = "corporation,lastmonth_activity,lastyear_activity,number_of_employees\n"


@pytest.mark.parametrize(
    ("request_args", "status", "message"),
    [
        ({}, 400, "no input"),
        ({"data": "", "content_type": "application/json"}, 400, "no input"),
        ({"data": "{not json", "content_type": "application/json"}, 400, "not valid JSON"),
        ({"json": ["abcdef", 1, 2, 3]}, 400, "unexpected JSON body"),
        ({"json": {"rows": [GOOD_ROW]}}, 400, "unexpected JSON body"),
        ({"json": {"records": [GOOD_ROW], "filepath": TEST_FILE}}, 400, "unexpected JSON body"),
        ({"json": {"records": []}}, 400, "non-empty list"),
        ({"json": {"records": GOOD_ROW}}, 400, "non-empty list"),
        ({"json": {"records": [GOOD_ROW, "abcdef"]}}, 400, "record 2 is not an object"),
        ({"json": {"records": [{k: v for k, v in GOOD_ROW.items() if k != "lastyear_activity"}]}},
         400, "record 1 lacks lastyear_activity"),
        ({"json": {"records": [{**GOOD_ROW, "lastmonth_activity": "lots"}]}},
         400, "lastmonth_activity 'lots' is not a number"),
        ({"json": {"records": [{**GOOD_ROW, "number_of_employees": True}]}},
         400, "number_of_employees is true"),
        ({"json": {"records": [{**GOOD_ROW, "number_of_employees": [12]}]}},
         400, "number_of_employees is [12]"),
        ({"json": {"records": [GOOD_ROW, {**GOOD_ROW, "lastmonth_activity": -4}]}},
         400, "row 2: lastmonth_activity '-4' is negative"),
        ({"json": {"records": [{**GOOD_ROW, "corporation": None}]}}, 400, "missing client id"),
        ({"data": "", "content_type": "text/csv"}, 400, "no input"),
        ({"data": "corporation,lastmonth_activity\nabc,3\n", "content_type": "text/csv"},
         400, "lacks required column(s) lastyear_activity, number_of_employees"),
        ({"data": CSV_HEADER, "content_type": "text/csv"}, 400, "no data rows"),
        ({"data": CSV_HEADER + "abc,3,x40,5\n", "content_type": "text/csv"},
         400, "lastyear_activity 'x40' is not a number"),
        ({"data": "abc,3,40,5", "content_type": "text/plain"}, 415, "cannot read a body of type"),
        ({"data": {"csv": TEST_FILE}}, 400, "the form has no filepath field"),
        ({"json": {"filepath": TEST_FILE}, "query_string": {"filepath": TEST_FILE}},
         400, "not both"),
    ],
    ids=[
        "empty-body", "empty-json", "invalid-json", "json-list", "json-unknown-key",
        "json-two-inputs", "no-records", "records-not-a-list", "record-not-an-object",
        "record-missing-column", "record-not-a-number", "record-boolean", "record-nested-value",
        "record-negative-count", "record-without-id", "empty-csv", "csv-missing-column",
        "csv-header-only", "csv-not-a-number", "unsupported-content-type",
        "form-without-filepath", "body-and-query",
    ],
)
def test_prediction_rejects_bad_input_naming_the_problem(client, request_args, status, message):
    response = client.post("/prediction", **request_args)

    assert_refused(response, status, message)


@pytest.mark.parametrize(
    ("filepath", "status", "message"),
    [
        ("../workspace/testdata/testdata.csv", 400, "must not contain '..'"),
        ("testdata/../testdata/testdata.csv", 400, "must not contain '..'"),
        ("models/trainingsample.csv", 400, "outside the data folders"),
        ("production_deployment/riskscores.csv", 400, "outside the data folders"),
        ("config.csv", 404, "no file 'config.csv' in the data folders"),
        ("config.json", 400, "not a .csv file"),
        ("ingesteddata/ingestedfiles.txt", 400, "not a .csv file"),
        ("", 400, "must be a file name"),
        (42, 400, "must be a file name"),
        ("{workspace}/config.json.csv", 400, "outside the data folders"),
        ("/etc/passwd.csv", 400, "outside the data folders"),
        ("testdata/absent.csv", 404, "no file 'testdata/absent.csv'"),
        ("sourcedata/nofolder/absent.csv", 404, "no file 'sourcedata/nofolder/absent.csv'"),
    ],
    ids=[
        "parent-first", "parent-within", "model-folder", "deployment-folder", "project-folder",
        "not-csv", "not-csv-in-data-folder", "empty", "not-text",
        "absolute-in-the-project-folder", "absolute-elsewhere", "absent-file", "absent-folder",
    ],
)
def test_prediction_refuses_a_filepath_outside_the_data_folders_or_absent(
    client, deployed, filepath, status, message
):
    if isinstance(filepath, str):
        filepath = filepath.format(workspace=deployed.base_dir)

    response = client.post("/prediction", json={"filepath": filepath})

    assert_refused(response, status, message)


@pytest.mark.parametrize(
    ("link", "target", "filepath"),
    [
        ("testdata/link.csv", "outside/secret.csv", "testdata/link.csv"),
        ("sourcedata/linked", "outside", "sourcedata/linked/secret.csv"),
        ("testdata/inside.csv", "testdata/testdata.csv", "testdata/inside.csv"),
    ],
    ids=["file-link-out", "folder-link-out", "file-link-within"],
)
def test_prediction_refuses_a_symbolic_link_inside_a_data_folder(
    client, deployed, link, target, filepath
):
    outside = deployed.base_dir / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_bytes((deployed.base_dir / TEST_FILE).read_bytes())
    (deployed.base_dir / link).symlink_to(deployed.base_dir / target)

    response = client.post("/prediction", json={"filepath": filepath})

    assert_refused(response, 400, "symbolic link")


def test_prediction_of_a_named_file_with_a_bad_row_names_the_row(
    client, deployed, rows_of_test_file
):
    rows = rows_of_test_file[:3]
    rows[2]["lastyear_activity"] = "unknown!"
    pd.DataFrame(rows).to_csv(deployed.input_folder / "typo.csv", index=False)

    response = client.post("/prediction", json={"filepath": "sourcedata/typo.csv"})

    assert response.status_code == 400
    assert error_of(response).startswith("sourcedata/typo.csv has 1 invalid row(s): row 3: ")
    assert "lastyear_activity 'unknown!' is not a number" in error_of(response)


@pytest.mark.parametrize(
    "framing",
    [
        {},
        # A chunked body has no Content-Length; werkzeug would cut it at the limit unless refused.
        {"headers": {"Transfer-Encoding": "chunked"},
         "environ_base": {"wsgi.input_terminated": True}},
    ],
    ids=["content-length", "chunked"],
)
def test_body_over_the_size_limit_is_refused_with_413(make_client, deployed, framing):
    limited = deployed._replace(api=deployed.api._replace(max_request_bytes=1000))
    client = make_client(limited)
    body = (CSV_HEADER + "abcdef,30,400,12\n" * 100).encode()

    response = client.post(
        "/prediction", input_stream=io.BytesIO(body), content_type="text/csv", **framing
    )

    assert response.status_code == 413
    assert response.is_json


def test_error_quoting_a_huge_input_is_cut_short(client):
    response = client.post("/prediction", data="x" * 100_000 + "\n1\n", content_type="text/csv")

    assert response.status_code == 400
    assert len(error_of(response)) < 3000


# --- Releases: a new one is served at once, a broken one never ---------------------------------


def test_new_release_is_served_on_the_next_request_without_restart(client, predict, deployed):
    first = predict(json={"filepath": TEST_FILE})["model_version"]

    second = retrain_and_deploy(deployed)

    assert second != first
    assert predict(json={"filepath": TEST_FILE})["model_version"] == second
    assert client.get("/ready").json["model_version"] == second


def test_release_failing_its_checksum_is_refused_not_replaced_by_the_cached_model(
    client, predict, deployed
):
    predict(json={"filepath": TEST_FILE})
    release = deployment.current_release(deployed)
    with open(release.model_path, "ab") as model_file:
        model_file.write(b"tampered")
    # Rewriting the manifest (as a rollback to this release would) makes every server look again.
    atomicio.write_json(deployment.manifest_path(deployed), deployment.read_manifest(deployed))

    prediction = client.post("/prediction", json={"filepath": TEST_FILE})
    readiness = client.get("/ready")

    assert prediction.status_code == readiness.status_code == 503
    assert "checksum" in error_of(prediction)


# --- Scoring, statistics, diagnostics ----------------------------------------------------------


def test_scoring_reports_the_deployed_model_f1_on_the_test_data(client, deployed):
    response = client.get("/scoring")

    assert response.status_code == 200
    assert response.json["f1"] == pytest.approx(deployment.current_release(deployed).f1)
    assert response.json["rows"] == TEST_ROWS
    assert response.json["test_data"] == [TEST_FILE]


def test_scoring_follows_a_change_of_the_test_data(client, deployed):
    client.get("/scoring")
    generate_data.write_csv(
        generate_data.make_clients(150, seed=31, id_offset=500_000), deployed.base_dir / TEST_FILE
    )

    assert client.get("/scoring").json["rows"] == 150


def test_summary_statistics_are_those_of_the_master_dataset(client, deployed):
    response = client.get("/summarystats")

    assert response.status_code == 200
    assert response.json["statistics"] == diagnostics.summary_statistics(deployed)
    assert set(response.json["statistics"]) == set(FEATURES)
    master = pd.read_csv(deployed.finaldata_path)
    for feature, statistics in response.json["statistics"].items():
        assert statistics["mean"] == pytest.approx(master[feature].mean())
        assert statistics["median"] == pytest.approx(master[feature].median())
        assert statistics["count"] == master[feature].count()


def test_diagnostics_serve_the_latest_recorded_run(client, deployed):
    diagnostics.run_diagnostics(deployed, dependencies=False)
    latest = diagnostics.run_diagnostics(deployed, dependencies=False)

    response = client.get("/diagnostics")

    assert response.status_code == 200
    assert response.json == latest


def test_diagnostics_post_records_a_new_run(client, deployed, monkeypatch):
    run = diagnostics.run_diagnostics
    # The timing and dependency sections take seconds and are diagnostics.py's own business here.
    monkeypatch.setattr(
        diagnostics, "run_diagnostics",
        lambda settings, **_: run(settings, dependencies=False),
    )

    response = client.post("/diagnostics")

    assert response.status_code == 200
    assert response.json == diagnostics.latest_diagnostics(deployed)
    assert len(records.query(deployed.records_path, "SELECT id FROM diagnostics")) == 1


@pytest.mark.parametrize("value", ["1", "true"])
def test_diagnostics_get_refuses_a_refresh_and_points_to_post(client, deployed, value):
    response = client.get(f"/diagnostics?refresh={value}")

    assert_refused(response, 400, "POST /diagnostics")
    assert records.query(deployed.records_path, "SELECT id FROM diagnostics") == []


# --- Risk list and report ----------------------------------------------------------------------


@pytest.fixture
def risk_list(deployed) -> pd.DataFrame:
    calllist.rebuild_call_list(deployed)
    return calllist.read_list(deployed.risk_scores_path, deployed.schema)


@pytest.mark.parametrize(("query", "expected"), [("", 10), ("?top=3", 3), ("?top=100000", None)])
def test_risk_returns_the_highest_risk_clients_first(client, risk_list, query, expected):
    expected = expected or len(risk_list)

    response = client.get(f"/risk{query}")

    assert response.status_code == 200
    clients = response.json["clients"]
    assert response.json["top"] == len(clients) == expected
    assert [c["corporation"] for c in clients] == risk_list["corporation"].head(expected).tolist()
    assert [c["rank"] for c in clients] == list(range(1, expected + 1))


@pytest.mark.parametrize(
    ("path", "query", "message"),
    [
        *[pytest.param("/risk", {"top": top}, "top must be a whole number of at least 1",
                       id=f"top={top}") for top in ["0", "-3", "ten", "1.5", "", "²"]],
        *[pytest.param("/diagnostics", {"refresh": value}, "refresh must be 1 or 0",
                       id=f"refresh={value}") for value in ["maybe", "2"]],
    ],
)
def test_query_argument_that_is_not_understood_is_400_naming_it(
    client, risk_list, path, query, message
):
    response = client.get(path, query_string=query)

    assert_refused(response, 400, message)


def test_risk_entries_carry_their_reasons_change_and_the_latest_track_record(
    client, deployed, risk_list
):
    roster = generate_data.make_roster(
        generate_data.make_clients(600, seed=12, id_offset=100_000), seed=5  # batch2's stayers
    )
    generate_data.write_csv(roster.frame, deployed.input_folder / "roster.csv")
    ingest(deployed)
    calllist.rebuild_call_list(deployed)
    generate_data.write_csv(generate_data.make_outcomes(roster, seed=6),
                            deployed.input_folder / "outcomes.csv")
    ingest(deployed)
    listed = calllist.rebuild_call_list(deployed)

    answer = client.get("/risk?top=3").json

    first = answer["clients"][0]
    assert set(first) >= {"rank", "corporation", "probability", "model_version", "reasons",
                          "change", "rank_before", "moved_by"}
    assert first["reasons"] and first["reasons"][0].endswith(": raises risk")
    assert answer["ranked_clients"] == listed.ranked
    assert answer["left_not_ranked"] == listed.left_not_ranked
    result = listed.results[-1]  # the list of the roster, recorded last
    assert answer["track_record"]["list_id"] == result["list_id"]
    assert answer["track_record"]["precision"] == pytest.approx(result["precision"])


def test_risk_counts_come_from_the_records_as_soon_as_they_describe_the_file(
    client, deployed, risk_list
):
    listed = calllist.latest_list(deployed)
    # The file is written before its record is completed: a request in between sees no record.
    records.update(deployed.records_path, "call_lists", listed["id"], {"file_stamp": "pending"})
    lagging = client.get("/risk").json
    records.update(deployed.records_path, "call_lists", listed["id"],
                   {"file_stamp": listed["file_stamp"]})

    answer = client.get("/risk").json

    assert lagging["left_not_ranked"] is None
    assert lagging["ranked_clients"] == len(risk_list)  # counted in the file meanwhile
    assert answer["left_not_ranked"] == listed["left_not_ranked"]
    assert answer["ranked_clients"] == listed["ranked"]


def test_risk_before_any_outcome_has_no_track_record_yet(client, risk_list):
    assert client.get("/risk").json["track_record"] is None


@pytest.mark.parametrize(
    "request_args",
    [
        {"json": {"records": [GOOD_ROW], "explain": True}},
        {"query_string": {"explain": "1"}, "json": {"records": [GOOD_ROW]}},
        {"query_string": {"explain": "1"}, "data": (
            "corporation,lastmonth_activity,lastyear_activity,number_of_employees\n"
            "abcdef,30,400,12\n"
        ), "content_type": "text/csv"},
    ],
    ids=["json-key", "query-with-json", "query-with-csv"],
)
def test_prediction_gives_each_rows_reasons_when_asked(predict, deployed, request_args):
    model, _ = deployment.load_deployed_model(deployed)
    row = pd.DataFrame([GOOD_ROW])
    expected = calllist.ranked_table(model, "", row, deployed.schema)

    answer = predict(**request_args)

    [reasons] = answer["reasons"]
    assert [reason["text"] for reason in reasons] == [
        text for text in expected[list(calllist.REASON_COLUMNS)].iloc[0] if text
    ]
    assert {"feature", "value", "typical", "contribution", "text"} <= set(reasons[0])
    assert reasons[0]["value"] == GOOD_ROW[reasons[0]["feature"]]


def test_prediction_without_explain_gives_no_reasons(predict):
    assert "reasons" not in predict(json={"records": [GOOD_ROW], "explain": False})
    assert "reasons" not in predict(json={"records": [GOOD_ROW]})


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_explain_that_is_not_true_or_false_is_400(client, value):
    response = client.post("/prediction", json={"records": [GOOD_ROW], "explain": value})

    assert_refused(response, 400, '"explain" must be true or false')


def test_report_is_served_as_a_pdf_download(client, deployed):
    atomicio.write_bytes(deployed.report_path, b"%PDF-1.7 stand-in for the report")

    with client.get("/report") as response:
        assert response.status_code == 200
        assert response.mimetype == "application/pdf"
        assert response.headers["Content-Disposition"].startswith("attachment")
        assert response.data == b"%PDF-1.7 stand-in for the report"


# --- What every endpoint shares ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("get", "/nothing-here", 404), ("delete", "/prediction", 405), ("post", "/scoring", 405)],
)
def test_unknown_path_or_method_answers_json(client, method, path, status):
    response = getattr(client, method)(path)

    assert response.status_code == status
    assert error_of(response)


def test_reading_requests_change_no_data_models_deployments_or_records(
    client, predict, deployed, risk_list
):
    before = workspace_state(deployed)
    for path in ["/health", "/ready", "/scoring", "/summarystats", "/diagnostics", "/risk",
                 "/report"]:
        client.get(path)
    predict(json={"filepath": TEST_FILE})

    assert workspace_state(deployed) == before


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (DataError("x"), 400),
        (InsufficientDataError("x"), 400),
        (ModelNotDeployedError("x"), 503),
        (ModelNotFoundError("x"), 503),
        (DeploymentError("x"), 503),
        (ConfigError("x"), 500),
        (DataNotReady("x"), 503),
        (DataFileNotFound("x"), 404),
        (InputTooLarge("x"), 413),
        (UnsupportedInput("x"), 415),
    ],
)
def test_each_pipeline_error_has_its_status(error, status):
    assert status_for(error) == status


# --- Token -------------------------------------------------------------------------------------


ENDPOINTS = [
    ("get", "/ready"), ("post", "/prediction"), ("get", "/prediction"), ("get", "/scoring"),
    ("get", "/summarystats"), ("get", "/diagnostics"), ("post", "/diagnostics"), ("get", "/risk"),
    ("get", "/report"), ("post", "/invocations"), ("get", "/metrics"), ("get", "/nothing-here"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", TOKEN, f"Basic {TOKEN}", "Bearer"],
)
def test_token_is_required_on_every_endpoint_but_health(
    token_client, method, path, authorization
):
    headers = {"Authorization": authorization} if authorization else {}

    response = getattr(token_client, method)(path, headers=headers)

    assert_refused(response, 401, "RISK_API_TOKEN")
    assert response.headers["WWW-Authenticate"].lower().startswith("bearer")


def test_right_token_is_accepted(token_client):
    response = token_client.get("/ready", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/health", "/ping"])
def test_health_checks_need_no_token(token_client, path):
    assert token_client.get(path).status_code == 200


def test_empty_token_is_an_error_at_start_up_not_an_open_api(deployed, monkeypatch):
    monkeypatch.setenv("RISK_API_TOKEN", "")

    with pytest.raises(ConfigError, match="set but empty"):
        create_app(deployed)


def test_token_from_a_token_file_is_required(make_client, deployed):
    token_file = deployed.base_dir / "api-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    client = make_client(deployed._replace(api=deployed.api._replace(token_file="api-token")))

    assert client.get("/ready").status_code == 401
    assert client.get("/ready", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


# --- Under gunicorn ----------------------------------------------------------------------------


@pytest.fixture
def gunicorn_url(deployed, tmp_path):
    with running_gunicorn(deployed, tmp_path / "gunicorn.log") as base_url:
        yield base_url


def test_gunicorn_serves_every_endpoint_and_a_new_release_without_restart(
    deployed, risk_list, gunicorn_url
):
    diagnostics.run_diagnostics(deployed, dependencies=False)
    atomicio.write_bytes(deployed.report_path, b"%PDF-1.7 stand-in for the report")
    first = deployment.current_release(deployed).version

    assert apicalls.main(["--config", str(deployed.config_path), "--url", gunicorn_url]) == 0
    saved = deployed.api_returns_path.read_text()
    assert saved.count("\n200 OK") == len(apicalls.endpoint_calls(deployed))
    assert first in saved

    generate_data.write_csv(
        generate_data.make_clients(400, seed=41, id_offset=300_000),
        deployed.input_folder / "batch3.csv",
    )
    ingest(deployed)
    second = retrain_and_deploy(deployed)

    # Two workers, each with its own cache: every answer, whichever worker gives it, is the new one.
    versions = {
        requests.post(f"{gunicorn_url}/prediction", json={"filepath": TEST_FILE}, timeout=30)
        .json()["model_version"]
        for _ in range(6)
    }
    assert versions == {second}


def test_gunicorn_loads_the_model_once_and_forks_workers_that_start_with_it(deployed, tmp_path):
    log_path = tmp_path / "gunicorn.log"
    with running_gunicorn(deployed, log_path, workers=2) as base_url:
        os.kill(booted_workers(log_path)[0], signal.SIGKILL)  # as a crash would end it
        for _ in range(50):
            if len(booted_workers(log_path)) == 3:
                break
            time.sleep(0.1)
        answers = [requests.get(f"{base_url}/ready", timeout=30) for _ in range(6)]

    assert len(booted_workers(log_path)) == 3  # gunicorn put a new worker in its place
    assert all(answer.status_code == 200 for answer in answers)
    # Loaded by the master before it forked: no worker, not even the new one, loaded it again.
    assert log_path.read_text().count("serving release") == 1


def booted_workers(log_path) -> list[int]:
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", log_path.read_text())]


def test_ready_says_what_the_release_f1_was_measured_on(client):
    answer = client.get("/ready").get_json()

    assert answer["f1_measured_on"] == "the test data"
    assert answer["f1_interval"][0] <= answer["f1"] <= answer["f1_interval"][1]
    assert answer["f1_rows"] == TEST_ROWS


def test_the_api_serves_the_release_without_unpickling_it(make_client, deployed, monkeypatch):
    import scoring

    def refuse(*args, **kwargs):
        raise AssertionError("the API unpickled a model")

    monkeypatch.setattr(scoring.pickle, "loads", refuse)
    client = make_client(deployed)

    response = client.post("/prediction", json={"filepath": TEST_FILE})

    assert response.status_code == 200
    assert len(response.json["probabilities"]) == TEST_ROWS


def test_a_release_without_model_json_is_refused_not_unpickled(make_client, deployed):
    from conftest import as_older_release

    as_older_release(deployed)

    response = make_client(deployed).post("/prediction", json={"filepath": TEST_FILE})

    assert_refused(response, 503, "model.json", "train and deploy again")
