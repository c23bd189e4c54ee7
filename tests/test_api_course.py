"""The API as a drop-in for the original course's clients and for MLflow's, and its hardening.

Each course client form runs through Flask's test client and through one gunicorn server shared
by the module; so do MLflow's scoring forms and the metrics. `python app.py` is started once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import deployment
import diagnostics
import generate_data
import records
import app
from app import FILE_KEYS, create_app
from conftest import (
    PROJECT_DIR,
    SOURCE_ROWS,
    deploy_workspace,
    free_port,
    running_gunicorn,
    server_environment,
    wait_until_healthy,
    write_config,
)
from errors import ConfigError, run_cli
from ingestion import ingest
from settings import load_settings

TEST_FILE = "testdata/testdata.csv"
COLUMNS = ["corporation", "lastmonth_activity", "lastyear_activity", "number_of_employees"]
ROW = {"corporation": "abcdef", "lastmonth_activity": 30, "lastyear_activity": 400,
       "number_of_employees": 12}


@pytest.fixture(autouse=True)
def no_token_from_the_environment(monkeypatch):
    monkeypatch.delenv("RISK_API_TOKEN", raising=False)


@pytest.fixture(scope="module")
def course_workspace(_deployed_template, tmp_path_factory):
    """One deployed workspace for the module; the tests here only read it."""
    root = tmp_path_factory.mktemp("course") / "workspace"
    shutil.copytree(_deployed_template, root)
    return load_settings(root / "config.json")


def client_of(settings):
    """A test client of the API for `settings`, built without a token."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RISK_API_TOKEN", raising=False)
        app = create_app(settings)
    app.testing = True
    return app.test_client()


@pytest.fixture(scope="module")
def course_client(course_workspace):
    return client_of(course_workspace)


@pytest.fixture(scope="module")
def gunicorn_server(course_workspace, tmp_path_factory):
    """`gunicorn wsgi:app` with two workers on 127.0.0.1, shared by the module's tests."""
    log_path = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    with running_gunicorn(course_workspace, log_path, workers=2) as base_url:
        yield base_url


class Answer:
    """What an API call answered, whichever way it went."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)


@pytest.fixture(scope="module", params=["flask", "gunicorn"])
def call(request, course_client):
    """call(method, path, json=..., params=..., data=..., headers=...) -> Answer."""
    if request.param == "flask":
        def through_flask(method, path, *, params=None, **kwargs):
            response = course_client.open(path, method=method, query_string=params, **kwargs)
            return Answer(response.status_code, response.content_type or "", response.data)
        return through_flask
    base_url = request.getfixturevalue("gunicorn_server")

    def through_gunicorn(method, path, **kwargs):
        response = requests.request(method, base_url + path, timeout=30, **kwargs)
        return Answer(response.status_code, response.headers.get("Content-Type", ""),
                      response.content)
    return through_gunicorn


def rows_in(settings, relative: str) -> int:
    return len(pd.read_csv(settings.base_dir / relative))


# --- A. What course clients send to POST /prediction -------------------------------------------


COURSE_FORMS = [
    *[pytest.param("POST", {"json": {key: TEST_FILE}}, TEST_FILE, id=f"json-{key}")
      for key in FILE_KEYS],
    pytest.param("POST", {"params": {"filename": TEST_FILE}}, TEST_FILE, id="post-query"),
    pytest.param("GET", {"params": {"filepath": TEST_FILE}}, TEST_FILE, id="get-query"),
    pytest.param("POST", {"data": {"data_file": TEST_FILE}}, TEST_FILE, id="post-form"),
    pytest.param("GET", {"data": {"data_loc": TEST_FILE}}, TEST_FILE, id="get-form"),
    pytest.param("GET", {"params": {"filename": "testdata.csv"}}, TEST_FILE, id="bare-test-name"),
    pytest.param("POST", {"json": {"filename": "batch2.csv"}}, "sourcedata/batch2.csv",
                 id="bare-source-name"),
    pytest.param("POST", {"json": {"data_file": "finaldata.csv"}}, "ingesteddata/finaldata.csv",
                 id="bare-ingested-name"),
    pytest.param("POST", {"json": {"path": "{root}/testdata/testdata.csv"}}, TEST_FILE,
                 id="absolute-json"),
    pytest.param("GET", {"params": {"file": "{root}/sourcedata/batch1.csv"}},
                 "sourcedata/batch1.csv", id="absolute-query"),
]


def with_root(request_args: dict, root: Path) -> dict:
    return {
        kind: {key: value.format(root=root) for key, value in values.items()}
        for kind, values in request_args.items()
    }


@pytest.mark.parametrize(("method", "request_args", "resolved"), COURSE_FORMS)
def test_prediction_takes_every_form_course_clients_send(
    call, course_workspace, method, request_args, resolved
):
    answer = call(method, "/prediction", **with_root(request_args, course_workspace.base_dir))

    assert answer.status == 200, answer.body
    body = answer.json
    assert body["resolved_path"] == resolved
    assert len(body["predictions"]) == len(body["probabilities"]) == len(body["ids"])
    assert len(body["ids"]) == rows_in(course_workspace, resolved)
    assert body["model_version"] == deployment.current_release(course_workspace).version
    assert body["unseen_categories"] == {}


def test_bare_name_is_looked_up_in_the_test_data_folder_first(course_client, course_workspace):
    shutil.copy(course_workspace.base_dir / "sourcedata" / "batch1.csv",
                course_workspace.base_dir / "testdata" / "batch1.csv")
    try:
        answer = course_client.get("/prediction", query_string={"filename": "batch1.csv"})
    finally:
        (course_workspace.base_dir / "testdata" / "batch1.csv").unlink()

    assert answer.json["resolved_path"] == "testdata/batch1.csv"
    assert len(answer.json["ids"]) == SOURCE_ROWS


@pytest.mark.parametrize(
    ("request_args", "status", "message"),
    [
        ({"json": {"filepath": TEST_FILE, "filename": TEST_FILE}}, 400, "filepath, filename"),
        ({"query_string": {"filepath": TEST_FILE, "data_loc": TEST_FILE}}, 400,
         "name a file twice"),
        ({"query_string": [("filepath", TEST_FILE), ("filepath", "testdata.csv")]}, 400,
         "given 2 times"),
        ({"data": {"file": TEST_FILE, "path": TEST_FILE}}, 400, "name a file twice"),
        ({"json": {"filepath": "testdata/" + "a" * 5000 + ".csv"}}, 400, "characters long"),
        ({"json": {"filepath": "testdata/" + "a" * 300 + ".csv"}}, 400, "name is too long"),
        ({"json": {"filename": "absent.csv"}}, 404, "no file 'absent.csv' in the data folders"),
        ({"json": {"filepath": "/dev/null"}}, 400, "not a .csv file"),
        ({"json": {"filepath": "{root}/testdata/../config.csv"}}, 400, "must not contain '..'"),
        ({"json": {"filepath": "{root}/models/trainingsample.csv"}}, 400,
         "outside the data folders"),
        ({"json": {"filepath": "testdata/\ud800.csv"}}, 404, "no file"),
    ],
    ids=["two-json-keys", "two-query-keys", "repeated-query-key", "two-form-fields",
         "over-long-name", "over-long-part", "absent-bare-name", "device", "absolute-traversal",
         "absolute-outside", "unencodable-name"],
)
def test_prediction_refuses_ambiguous_or_unsafe_file_names(
    course_client, course_workspace, request_args, status, message
):
    if "json" in request_args:
        request_args = {"json": {key: value.format(root=course_workspace.base_dir)
                                 for key, value in request_args["json"].items()}}

    answer = course_client.post("/prediction", **request_args)

    assert answer.status_code == status
    assert message in answer.json["error"]


@pytest.mark.parametrize("name", ["pipe.csv", "testdata/pipe.csv"], ids=["bare", "relative"])
def test_prediction_refuses_a_fifo_in_a_data_folder(course_client, course_workspace, name):
    fifo = course_workspace.base_dir / "testdata" / "pipe.csv"
    os.mkfifo(fifo)
    try:
        answer = course_client.post("/prediction", json={"filepath": name})
    finally:
        fifo.unlink()

    assert answer.status_code == 400
    assert "not a regular file" in answer.json["error"]


def test_get_prediction_changes_nothing(course_client, course_workspace):
    before = {p: p.stat().st_mtime_ns for p in course_workspace.base_dir.rglob("*.csv")}

    assert course_client.get("/prediction", query_string={"filepath": TEST_FILE}).status_code == 200

    assert {p: p.stat().st_mtime_ns for p in course_workspace.base_dir.rglob("*.csv")} == before


# --- B. MLflow's scoring protocol ---------------------------------------------------------------


@pytest.fixture(scope="module")
def test_rows(course_workspace) -> pd.DataFrame:
    return pd.read_csv(course_workspace.base_dir / TEST_FILE, dtype={"corporation": "str"}).head(20)


@pytest.fixture(scope="module")
def expected_classes(course_client, test_rows) -> list[int]:
    records_ = test_rows[COLUMNS].to_dict(orient="records")
    return course_client.post("/prediction", json={"records": records_}).json["predictions"]


def mlflow_bodies(rows: pd.DataFrame) -> dict[str, dict]:
    features = COLUMNS[1:]
    return {
        "dataframe_split": {"json": {"dataframe_split": json.loads(
            rows[COLUMNS].to_json(orient="split", index=False))}},
        "dataframe_records": {"json": {"dataframe_records": rows[COLUMNS].to_dict("records")}},
        "instances-records": {"json": {"instances": rows[features].to_dict("records")}},
        "inputs-columns": {"json": {"inputs": rows[features].to_dict("list")}},
        "instances-rows": {"json": {"instances": rows[features].to_numpy().tolist()}},
        "inputs-rows-with-ids": {"json": {"inputs": rows[COLUMNS].to_numpy().tolist()}},
        "csv": {"data": rows.to_csv(index=False), "headers": {"Content-Type": "text/csv"}},
        "csv-without-ids": {"data": rows[features].to_csv(index=False),
                            "headers": {"Content-Type": "text/csv; charset=utf-8"}},
        "with-params": {"json": {"dataframe_records": rows[features].to_dict("records"),
                                 "params": {"unused": 1}}},
    }


@pytest.mark.parametrize(
    "form",
    ["dataframe_split", "dataframe_records", "instances-records", "inputs-columns",
     "instances-rows", "inputs-rows-with-ids", "csv", "csv-without-ids", "with-params"],
)
def test_invocations_answer_the_class_of_each_row_in_every_mlflow_form(
    call, test_rows, expected_classes, form
):
    answer = call("POST", "/invocations", **mlflow_bodies(test_rows)[form])

    assert answer.status == 200, answer.body
    assert answer.json == {"predictions": expected_classes}


@pytest.mark.parametrize(
    ("request_args", "status", "message"),
    [
        ({"json": {"records": [ROW]}}, 400, "exactly one of dataframe_split"),
        ({"json": {"dataframe_records": [ROW], "instances": [ROW]}}, 400,
         "it has dataframe_records, instances"),
        ({"json": [ROW]}, 400, "exactly one of"),
        ({"json": {"dataframe_split": {"columns": COLUMNS, "data": [[1, 2]]}}}, 400,
         "row 1 must be a list of 4 values"),
        ({"json": {"instances": [[1, 2]]}}, 400, "row 1 has 2 values"),
        ({"json": {"inputs": {"lastmonth_activity": [1, 2], "lastyear_activity": [3]}}}, 400,
         "the same length"),
        ({"json": {"dataframe_records": [{**ROW, "lastyear_activity": "lots"}]}}, 400,
         "lastyear_activity 'lots' is not a number"),
        ({"data": "abc", "content_type": "text/plain"}, 415, "cannot read a body of type"),
        ({"data": "x,y\n1,2\n", "content_type": "text/csv; charset=latin-1"}, 415, "UTF-8"),
        ({"data": "", "content_type": "application/json"}, 400, "no input"),
    ],
    ids=["our-records", "two-forms", "a-list", "split-short-row", "short-row",
         "ragged-columns", "not-a-number", "unsupported-type", "not-utf8", "empty"],
)
def test_invocations_refuse_bad_input_as_mlflow_clients_read_it(
    course_client, request_args, status, message
):
    answer = course_client.post("/invocations", **request_args)

    assert answer.status_code == status
    assert message in answer.json["error"]
    assert answer.json["message"] == answer.json["error"]
    assert answer.json["error_code"] == "BAD_REQUEST"


def test_invocations_share_the_size_limit_of_predictions(course_workspace, test_rows):
    limited = course_workspace._replace(
        api=course_workspace.api._replace(max_request_bytes=200))
    client = client_of(limited)

    answer = client.post("/invocations", data=test_rows.to_csv(index=False),
                         content_type="text/csv")

    assert answer.status_code == 413


def test_ping_answers_as_mlflow_does(call):
    answer = call("GET", "/ping")

    assert (answer.status, answer.body) == (200, b"\n")


# --- E. Hardening -------------------------------------------------------------------------------


def test_csv_lines_ending_in_a_comma_never_predict_on_shifted_columns(
    course_client, test_rows, expected_classes
):
    body = "\n".join(line + "," for line in test_rows[COLUMNS].to_csv(index=False).splitlines())

    answer = course_client.post("/prediction", data=body + "\n", content_type="text/csv")

    # Read as if the lines did not end in a comma, as ingestion reads them (README: Ingestion).
    assert answer.status_code == 200
    assert answer.json["ids"] == test_rows["corporation"].tolist()
    assert answer.json["predictions"] == expected_classes


@pytest.mark.parametrize(
    "body",
    ["[" * 100_000 + "]" * 100_000, '{"records": ' + "[" * 50_000 + "]" * 50_000 + "}",
     '{"records": [{"a": ' + "{" * 50_000 + "}" * 50_000 + "}]}"],
    ids=["list", "records", "cell"],
)
def test_deeply_nested_json_is_a_400(course_client, body):
    answer = course_client.post("/prediction", data=body, content_type="application/json")

    assert answer.status_code == 400
    assert answer.json["error"]


@pytest.mark.parametrize("number", [10**400, -(10**400), 2**64], ids=["huge", "minus-huge", "2^64"])
def test_whole_number_too_large_for_a_count_is_a_400(course_client, number):
    row = {**ROW, "lastmonth_activity": number}

    answer = course_client.post("/prediction", json={"records": [row]})

    assert answer.status_code == 400
    assert "lastmonth_activity" in answer.json["error"]


@pytest.mark.parametrize(
    ("method", "path", "request_args"),
    [
        ("get", "/ready", {}),
        ("post", "/prediction", {"json": {"filepath": TEST_FILE}}),
        ("post", "/invocations", {"json": {"dataframe_records": [ROW]}}),
        ("get", "/scoring", {}),
        ("get", "/summarystats", {}),
        ("get", "/diagnostics", {}),
        ("get", "/risk", {}),
        ("get", "/report", {}),
    ],
)
def test_messages_never_show_the_server_folders(workspace, method, path, request_args):
    client = client_of(workspace)

    answer = getattr(client, method)(path, **request_args)

    assert answer.status_code == 503
    assert str(workspace.base_dir.parent) not in answer.json["error"]


def test_gunicorn_refuses_an_over_long_request_line_with_414(gunicorn_server):
    answer = requests.get(f"{gunicorn_server}/health?pad={'x' * 5000}", timeout=30)

    assert answer.status_code == 414  # gunicorn answers it itself, in HTML (README: API)


# --- F. Cells ---------------------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", "   ", "\t"], ids=["empty", "spaces", "tab"])
def test_blank_text_in_json_records_is_a_missing_cell(course_client, blank):
    with_blank = course_client.post(
        "/prediction", json={"records": [{**ROW, "number_of_employees": blank}]})
    with_null = course_client.post(
        "/prediction", json={"records": [{**ROW, "number_of_employees": None}]})

    assert with_blank.status_code == 200
    assert with_blank.json == with_null.json


def test_blank_client_id_is_refused_as_in_csv(course_client):
    answer = course_client.post("/prediction", json={"records": [{**ROW, "corporation": "  "}]})

    assert answer.status_code == 400
    assert "missing client id" in answer.json["error"]


@pytest.fixture(scope="module")
def regional_workspace(tmp_path_factory):
    """A deployed workspace whose model has a categorical feature, region (north or south)."""
    root = tmp_path_factory.mktemp("regional")
    for folder, name, rows, seed in [("sourcedata", "batch1.csv", 600, 61),
                                     ("testdata", "testdata.csv", 200, 62)]:
        frame = generate_data.make_clients(rows, seed=seed, id_offset=seed * 1000)
        frame.insert(1, "region", ["north", "south"] * (rows // 2))
        generate_data.write_csv(frame, root / folder / name)
    schema = {"categorical_features": ["region"]}
    settings = load_settings(write_config(root, schema=schema))
    deploy_workspace(settings)
    return settings


def test_unseen_category_is_accepted_with_no_weight_and_counted(regional_workspace):
    client = client_of(regional_workspace)
    rows = [{**ROW, "region": "west"}, {**ROW, "region": "north"}, {**ROW, "region": "west"}]
    model, _ = deployment.load_deployed_model(regional_workspace)

    answer = client.post("/prediction", json={"records": rows})

    assert answer.status_code == 200, answer.json
    assert answer.json["unseen_categories"] == {"region": 2}
    expected = model.predict_proba(pd.DataFrame(rows)[["lastmonth_activity", "lastyear_activity",
                                                       "number_of_employees", "region"]])[:, 1]
    assert answer.json["probabilities"] == pytest.approx(expected.tolist(), rel=1e-9)


@pytest.fixture
def fractional_workspace(tmp_path):
    """An ingested workspace with a numeric feature that is not a count: score, with decimals."""
    source = ("corporation,lastmonth_activity,score,exited\n"
              "a,1,18.25,1\nb,2,18.5,0\nc,3,17.125,1\nd,4,18.25,0\n")
    for path in (tmp_path / "sourcedata" / "a.csv", tmp_path / "testdata" / "t.csv"):
        path.parent.mkdir(parents=True)
        path.write_text(source)
    schema = {"numeric_features": ["lastmonth_activity", "score"],
              "count_columns": ["lastmonth_activity"]}
    settings = load_settings(write_config(tmp_path, schema=schema))
    ingest(settings)
    return settings


def test_summary_statistics_keep_the_data_precision(fractional_workspace):
    answer = client_of(fractional_workspace).get("/summarystats")

    score = answer.json["statistics"]["score"]
    assert (score["min"], score["median"], score["max"]) == (17.125, 18.25, 18.5)
    text = "\n".join(diagnostics._statistics_lines(answer.json["statistics"]))
    assert "17.125" in text and "18.25" in text and "18.5" in text


# --- H. Metrics ----------------------------------------------------------------------------------


def metric_samples(text: str) -> dict[str, list]:
    """Samples by metric family name, as Prometheus' own parser reads the text."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def requests_counted(samples: dict[str, list], endpoint: str) -> float:
    return sum(sample.value for sample in samples["risk_api_requests"]
               if sample.name == "risk_api_requests_total"
               and sample.labels["endpoint"] == endpoint)


def test_metrics_show_requests_release_cycle_drift_and_quarantine(course_workspace):
    records.add(course_workspace.records_path, "cycles", {
        "started": "2026-11-20T10:00:00+00:00", "finished": "2026-11-20T10:00:04+00:00",
        "seconds": 4.0, "decision": "no-drift", "outcome": "ok", "message": "no drift",
        "details": {"drift": {"drifted": False, "reason": "within noise"}},
    })
    records.add(course_workspace.records_path, "cycles", {
        "started": "2026-11-20T10:10:00+00:00", "finished": "2026-11-20T10:10:00+00:00",
        "seconds": 0.1, "decision": "nothing-new", "outcome": "ok", "message": "nothing new",
    })
    client = client_of(course_workspace)
    for _ in range(3):
        client.get("/ready")

    answer = client.get("/metrics")

    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain")
    samples = metric_samples(answer.get_data(as_text=True))
    assert requests_counted(samples, "/ready") == 3
    assert samples["risk_api_request_duration_seconds"]
    release = deployment.current_release(course_workspace)
    assert samples["risk_release_info"][0].labels["version"] == release.version
    assert samples["risk_release_f1"][0].value == pytest.approx(release.f1)
    assert samples["risk_release_deployed_timestamp_seconds"][0].value > 0
    assert samples["risk_last_cycle_info"][0].labels["decision"] == "nothing-new"
    assert samples["risk_last_cycle_success"][0].value == 1
    assert samples["risk_last_cycle_duration_seconds"][0].value == pytest.approx(0.1)
    assert samples["risk_drift_detected"][0].value == 0
    quarantined = records.query(course_workspace.records_path,
                                "SELECT SUM(quarantined) AS n FROM ingestions")[0]["n"]
    assert samples["risk_rows_quarantined"][0].value == quarantined


def test_metrics_of_gunicorn_count_the_requests_of_every_worker(gunicorn_server):
    sent = 40
    for _ in range(sent):  # a new connection each time, so either worker may answer
        assert requests.get(f"{gunicorn_server}/ping", timeout=30).status_code == 200

    answer = requests.get(f"{gunicorn_server}/metrics", timeout=30)

    assert answer.status_code == 200
    assert requests_counted(metric_samples(answer.text), "/ping") >= sent


def test_gunicorn_counts_in_the_workspace_metrics_folder(course_workspace, gunicorn_server):
    folder = course_workspace.output_folder / "metrics"
    before = {path: path.read_bytes() for path in folder.glob("counter_*.db")}

    requests.get(f"{gunicorn_server}/ping", timeout=30)

    after = {path: path.read_bytes() for path in folder.glob("counter_*.db")}
    assert after and after != before  # the worker that answered wrote its count there


# --- C. python app.py ----------------------------------------------------------------------------


def test_python_app_py_serves_with_gunicorn_and_stops_cleanly_on_sigterm(deployed, tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "app.py", "--config", str(deployed.config_path), "--port", str(port),
             "--workers", "1"],
            cwd=PROJECT_DIR, env=server_environment(), stdout=log_file, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, server, log_path)
        assert requests.get(f"{base_url}/metrics", timeout=30).status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    output = log_path.read_text()
    assert f"Serving the API on {base_url}" in output
    assert "kill -TERM" in output
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base_url}/health", timeout=5)


def test_python_app_py_refuses_to_start_with_an_empty_token(deployed, monkeypatch, capsys):
    monkeypatch.setenv("RISK_API_TOKEN", "")

    exit_code = run_cli(app.main, ["--config", str(deployed.config_path), "--port", "1"])

    assert exit_code == 2
    assert "set but empty" in capsys.readouterr().err


def test_create_app_refuses_a_token_file_others_can_read(course_workspace, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    token_file.chmod(0o644)
    settings = course_workspace._replace(
        api=course_workspace.api._replace(token_file=str(token_file)))

    with pytest.raises(ConfigError, match="chmod 600"):
        create_app(settings)
