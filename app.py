"""The API: the deployed model's predictions and metrics, and the system's diagnostics, as JSON.

Shaped like Flask's tutorial app. Where things are:
- `create_app(settings)` builds an app: settings, its per-app state (`ApiState` in
  `app.extensions["risk"]`, reached from a view through `state()`), the error handlers, the token
  check and the blueprint. wsgi.py serves it with gunicorn.
- `bp`, the Blueprint, holds every route. A view parses its input, calls a scoring or diagnostics
  function and returns JSON.
- `ERROR_STATUS` is the one map from our errors (errors.py) to status codes. Helpers raise only
  our errors; werkzeug's own (unknown route, wrong method, body over the limit, no token) answer
  JSON too.
- Below the routes: the error handlers and the token check; prediction input (`prediction_frame`
  and its helpers, the file names course clients send, MLflow's scoring input); per-app state
  (`ApiState`: `DeployedModel`, the `KeyedCache`s and what they compute); metrics (Prometheus,
  counted across gunicorn's worker processes); query arguments; serving (`python app.py` starts
  gunicorn, never a debug server).

Each process keeps the deployed model in memory and checks production's manifest (one stat) on every
request that needs it, so a new release is served on the next request without a restart. A GET never
changes data, models, deployments or records. POST /diagnostics records a new diagnostics run; it
reads stage timings from the records and never re-runs a stage in a web worker.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hmac
import io
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import pandas as pd
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, send_file
from gunicorn.app.base import BaseApplication
from werkzeug.datastructures import MultiDict, WWWAuthenticate
from werkzeug.exceptions import HTTPException, Unauthorized

import calllist
import deployment
import diagnostics
import records
from dataset import read_csv, validate_cells, validate_frame
from errors import (
    ConfigError,
    DataError,
    DataFileNotFound,
    DataNotReady,
    DeploymentError,
    InputTooLarge,
    ModelNotDeployedError,
    ModelNotFoundError,
    PipelineError,
    UnsupportedInput,
    run_cli,
)
from scoring import (
    LinearScorer,
    ServedModel,
    evaluate,
    explain,
    linear_scorer,
    load_deployed,
    predict_frame,
    read_test_data,
)
from settings import ApiSettings, Schema, Settings, add_config_argument, api_token, load_settings

log = logging.getLogger(__name__)

# What each of our errors means for a client; an error without an entry takes its nearest parent's.
ERROR_STATUS: dict[type[PipelineError], int] = {
    DataError: 400,
    DataFileNotFound: 404,
    InputTooLarge: 413,
    UnsupportedInput: 415,
    ConfigError: 500,
    DataNotReady: 503,
    ModelNotDeployedError: 503,
    ModelNotFoundError: 503,
    DeploymentError: 503,
}
EXTENSION = "risk"  # the app.extensions key of an app's ApiState
# Answered without the token (static: the pages' stylesheet).
OPEN_ENDPOINTS = {"api.health", "api.ping", "static"}
PAGES = "pages"  # the pages' blueprint (pages.py) checks its own login session
CSV_TYPES = ("text/csv", "application/csv")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# The names course clients give the data file, as a JSON key, form field or query parameter.
FILE_KEYS = ("filepath", "data_file", "filename", "file", "data_loc", "path")
ACCEPTED_INPUT = (
    'send {"filepath": "testdata/testdata.csv"} or {"records": [{...}, ...]} as JSON, '
    "a CSV body with Content-Type text/csv, or a filepath form field or query parameter "
    f"(or {', '.join(FILE_KEYS[1:])} in place of filepath)"
)
# No file name of ours is this long; a longer one would only reach the OS to fail there.
MAX_FILE_NAME_CHARS = 1024
# MLflow's scoring server takes exactly one of these JSON keys (POST /invocations).
MLFLOW_INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
MLFLOW_ACCEPTED_INPUT = (
    f"send JSON with exactly one of {', '.join(MLFLOW_INPUT_KEYS)}, or a CSV body with "
    "Content-Type text/csv, as MLflow's scoring server takes"
)
# What MLflow's clients read in an error answer besides our "error": its error_code names.
MLFLOW_ERROR_CODES = {503: "TEMPORARILY_UNAVAILABLE", 500: "INTERNAL_ERROR"}
DEFAULT_RISK_TOP = 10
# Rows of the risk list each worker keeps parsed: a list may hold a million clients.
CACHED_RISK_ROWS = 1000
# An error message quotes what it found (a header, a value); a junk request must not echo megabytes.
MAX_ERROR_CHARS = 2000

bp = Blueprint("api", __name__)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API for a workspace (default: config.json, or the one $RISK_CONFIG names).

    Raises ConfigError for a token that is set but empty or a token file others can read, so a
    server never starts open by mistake.
    """
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.api.max_request_bytes
    app.json.sort_keys = False  # metrics read best in the order they are computed
    app.extensions[EXTENSION] = ApiState(
        settings=settings,
        token=api_token(settings),
        models=DeployedModel(settings),
    )
    app.register_error_handler(PipelineError, pipeline_error)
    app.register_error_handler(HTTPException, http_error)
    app.before_request(start_request_timer)
    app.before_request(require_token)
    app.after_request(count_request)
    app.register_blueprint(bp)
    import pages  # imported here, as flaskr's factory imports its blueprints: pages imports app
    app.register_blueprint(pages.bp)
    return app


def preload(app: Flask) -> None:
    """Load the served model into `app` now, in a gunicorn master that forks the workers after.

    Each worker then starts with the model in memory, shared with the master until written, and
    answers its first request at once; it still checks the manifest on every request, so a new
    release is picked up as before. Without a deployed model there is nothing to load yet.
    """
    try:
        app.extensions[EXTENSION].models.get()
    except PipelineError as error:
        log.info("no model loaded before the workers start: %s", error)


def state() -> ApiState:
    """The current app's ApiState, as flaskr's `get_db` gives a view its database."""
    return current_app.extensions[EXTENSION]


# --- Routes ------------------------------------------------------------------------------------


@bp.get("/health")
def health() -> Response:
    return jsonify(status="ok")


@bp.get("/ready")
def ready() -> Response:
    release = state().models.get().release
    score = deployment.release_score(state().settings, release.version) or {}
    return jsonify(
        status="ready", model_version=release.version, deployed_at=release.created_at,
        f1=release.f1,
        f1_measured_on=deployment.MEASURED_ON.get(score.get("purpose"), "unknown"),
        f1_interval=[score.get("f1_low"), score.get("f1_high")], f1_rows=score.get("rows"),
    )


@bp.route("/prediction", methods=["GET", "POST"])
def prediction() -> Response:
    """Predictions for the rows sent or named; GET takes a file name (it reads, never writes).

    With ?explain=1 or "explain": true, each row's reasons too: the three features that raise its
    risk most against the typical client, from the served model's own arithmetic.
    """
    api = state()
    loaded = api.models.get()
    frame = prediction_frame(api.settings)
    result = predict_frame(loaded.model, loaded.release.version, frame, api.settings.schema)
    answer = result.as_dict()
    if explain_requested():
        answer["reasons"] = explain(loaded.model, frame).as_records()
    answer["unseen_categories"] = unseen_categories(loaded.model, frame, api.settings.schema)
    if "resolved_path" in g:
        answer["resolved_path"] = g.resolved_path
    return jsonify(answer)


@bp.get("/scoring")
def scoring() -> Response:
    api = state()
    loaded = api.models.get()
    test_files = api.settings.test_data_files()
    key = (loaded.release.version, tuple((str(p), file_key(p)) for p in test_files))
    return jsonify(api.scores.get(key, lambda: score_deployed(api.settings, loaded, test_files)))


@bp.get("/summarystats")
def summarystats() -> Response:
    api = state()
    key = file_key(api.settings.finaldata_path)
    if key is None:
        raise DataNotReady(
            f"no master dataset at {relative_name(api.settings.finaldata_path, api.settings)} "
            "yet: run ingestion.py"
        )
    return jsonify(api.statistics.get(key, lambda: master_statistics(api.settings)))


@bp.get("/diagnostics")
def latest_diagnostics() -> Response:
    """The latest recorded diagnostics run; reading only, so a refresh is a POST."""
    if flag_argument("refresh"):
        raise DataError(
            "GET /diagnostics only reads the latest recorded run: "
            "POST /diagnostics to record a new one"
        )
    latest = diagnostics.latest_diagnostics(state().settings)
    if latest is None:
        raise DataNotReady(
            "no diagnostics recorded yet: run diagnostics.py (or POST /diagnostics)"
        )
    return jsonify(latest)


@bp.post("/diagnostics")
def record_diagnostics() -> Response:
    """Record a new diagnostics run and return it; it reads stage timings from the records."""
    return jsonify(diagnostics.run_diagnostics(state().settings))


@bp.get("/risk")
def risk() -> Response:
    """The top of the risk list, each client with its reasons and change, and how lists fared."""
    api = state()
    top = positive_int_argument("top", DEFAULT_RISK_TOP)
    key = file_key(api.settings.risk_scores_path)
    if key is None:
        raise DataNotReady("no risk list yet: run reporting.py (or fullprocess.py)")
    listed = api.risk_lists.get(key, lambda: read_risk_list(api.settings, CACHED_RISK_ROWS))
    if top > CACHED_RISK_ROWS and listed.rows > CACHED_RISK_ROWS:
        listed = read_risk_list(api.settings, top)
    # Asked at every request, not cached with the file: the records may lag behind it a moment.
    recorded = calllist.recorded_list(api.settings, calllist.stamp_of(key[2], key[1]))
    clients = risk_entries(listed.head.head(top), api.settings.schema)
    return jsonify(
        ranked_clients=recorded["ranked"] if recorded else listed.rows,
        left_not_ranked=recorded["left_not_ranked"] if recorded else None,
        top=len(clients), clients=clients,
        track_record=diagnostics.json_safe(calllist.latest_track_record(api.settings)),
    )


@bp.get("/report")
def report() -> Response:
    return send_output(state().settings.report_path, "application/pdf", "no report yet")


def send_output(path: Path, mimetype: str, missing: str, *, download: bool = True) -> Response:
    """A file a stage writes (report, risk list, image), or 503 saying `missing` and what makes it.

    Sent straight from disk; a file that is not there yet, or is replaced meanwhile, is not an
    error of the request but of the data: DataNotReady.
    """
    try:
        if download:
            return send_file(path, mimetype=mimetype, as_attachment=True, download_name=path.name)
        return send_file(path, mimetype=mimetype)
    except FileNotFoundError:
        raise DataNotReady(f"{missing}: run reporting.py (or fullprocess.py)") from None


@bp.post("/invocations")
def invocations() -> Response:
    """MLflow's scoring protocol, so clients written for an MLflow-served model call ours unchanged.

    The answer is {"predictions": [...]}, the class of each row (1 = leaves), which is what MLflow
    serves for a scikit-learn classifier logged with its default pyfunc_predict_fn="predict".
    """
    api = state()
    loaded = api.models.get()
    frame = invocation_frame(api.settings.schema)
    result = predict_frame(loaded.model, loaded.release.version, frame, api.settings.schema)
    return jsonify(predictions=result.predictions)


@bp.get("/ping")
def ping() -> Response:
    """MLflow's health check: 200 and a newline, as its scoring server answers."""
    return Response("\n", mimetype="application/json")


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus' text format: requests of every worker, the served release, the last cycle."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(scrape_registry(state())), content_type=CONTENT_TYPE_LATEST)


# --- Errors and the token ----------------------------------------------------------------------


def status_for(error: PipelineError) -> int:
    """The HTTP status of one of our errors: its own class's, or the nearest parent's."""
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


def pipeline_error(error: PipelineError) -> tuple[Response, int]:
    status = status_for(error)
    message = str(error)
    log.log(logging.INFO if status < 500 else logging.ERROR, "%s: %s", request.path, message)
    message = public_message(message, state().settings)
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + " [...]"
    return jsonify(error_body(message, status)), status


def http_error(error: HTTPException) -> Response:
    """Werkzeug's own errors (unknown route, wrong method, body over the limit) as JSON too."""
    response = jsonify(error_body(error.description or error.name, error.code or 500))
    response.status_code = error.code or 500
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def error_body(message: str, status: int) -> dict[str, str]:
    """{"error": message}; for POST /invocations also MLflow's error_code and message."""
    body = {"error": message}
    if request.endpoint == "api.invocations":
        code = MLFLOW_ERROR_CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR")
        body.update(error_code=code, message=message)
    return body


# An absolute path of two or more parts, not part of a URL or of a relative name.
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"/,;()]+/)+[^\s'\",;()]*")


def public_message(message: str, settings: Settings) -> str:
    """A message without the server's absolute paths: project paths relative, others by name.

    Messages from the pipeline's modules name files as a person at the server wants them; a
    client learns nothing from the server's folders and should not be told them.
    """
    def shorter(match: re.Match) -> str:
        text = match.group(0)
        trailing = text[len(text.rstrip(".:")):]
        return relative_name(Path(text.rstrip(".:")), settings) + trailing

    return ABSOLUTE_PATH.sub(shorter, message)


def require_token() -> None:
    """When the server started with a token, every request but /health and /ping must bring it.

    The pages (pages.py) take the token once at their login and check their own session cookie.
    """
    api = state()
    if (
        api.token and request.endpoint not in OPEN_ENDPOINTS and request.blueprint != PAGES
        and not bearer_token_matches(api.token)
    ):
        source = f"${api.settings.api.token_env_var}"
        if api.settings.api.token_file:
            source += " or api.token_file"
        raise Unauthorized(
            f"send the API token (from {source}) as 'Authorization: Bearer TOKEN'",
            www_authenticate=WWWAuthenticate("bearer"),
        )


def bearer_token_matches(token: str) -> bool:
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    # compare_digest takes as long for a near miss as for a wild guess.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        supplied.strip().encode(), token.encode()
    )


# --- Prediction input --------------------------------------------------------------------------


def prediction_frame(settings: Settings) -> pd.DataFrame:
    """The rows to predict, validated, from whichever accepted form the request uses.

    A data file named by a query parameter, a JSON key or a form field (any one of FILE_KEYS);
    JSON records; or a CSV body. The relative name of a named file is kept in g.resolved_path.
    """
    query_path = file_argument(request.args, "query parameters")
    body = request_body()
    if query_path is not None and body.strip():
        raise DataError("send the input in the body or as a query parameter, not both")
    if query_path is not None:
        return frame_from_file(query_path, settings)
    if not body.strip():
        raise DataError(f"the request has no input: {ACCEPTED_INPUT}")
    if request.is_json:
        return frame_from_json(body, settings)
    if request.mimetype in CSV_TYPES:
        return frame_from_csv(io.BytesIO(body), settings.schema, source="request body")
    if request.mimetype in FORM_TYPES:
        form_path = file_argument(request.form, "form fields")
        if form_path is None:
            raise DataError(
                f"the form has no filepath field (or {', '.join(FILE_KEYS[1:])}; sending JSON? "
                "add the header 'Content-Type: application/json')"
            )
        return frame_from_file(form_path, settings)
    raise UnsupportedInput(
        f"cannot read a body of type {request.mimetype or 'unknown'}: {ACCEPTED_INPUT}"
    )


def file_argument(values: MultiDict, where: str) -> str | None:
    """The one file name among query parameters or form fields; None if none names a file."""
    present = [key for key in FILE_KEYS if key in values]
    if not present:
        return None
    if len(present) > 1:
        raise DataError(
            f"the {where} name a file twice ({', '.join(present)}): send one of them"
        )
    names = values.getlist(present[0])
    if len(names) > 1:
        raise DataError(f"{present[0]} is given {len(names)} times in the {where}: send it once")
    return names[0]


def request_body() -> bytes:
    """The request body, or 413 if it is over the size limit.

    Werkzeug refuses a body whose Content-Length is over the limit, but cuts a chunked body (no
    Content-Length) at the limit without a word; predicting on the first part would be wrong, so
    a chunked body that reaches the limit is refused too.
    """
    body = request.get_data()
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(body) >= limit:
        raise InputTooLarge(f"the request body is larger than the limit of {limit} bytes")
    return body


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        # The standard parser recurses once per level; thousands of '[' exhaust the stack.
        raise DataError("the JSON body is nested too deeply to be rows of data") from None
    except ValueError as error:
        raise DataError(f"the request body is not valid JSON: {error}") from None


def frame_from_json(body: bytes, settings: Settings) -> pd.DataFrame:
    payload = parse_json(body)
    if isinstance(payload, dict) and "explain" in payload:
        if not isinstance(payload["explain"], bool):
            shown = shown_json(payload["explain"])
            raise DataError(f'"explain" must be true or false, not {shown}')
        g.explain = payload["explain"]
    keys = ("records", *FILE_KEYS)
    inputs = [key for key in keys if isinstance(payload, dict) and key in payload]
    if len(inputs) != 1:
        found = f" (it has {', '.join(inputs)}; send one)" if inputs else ""
        raise DataError(f"unexpected JSON body{found}: {ACCEPTED_INPUT}")
    if inputs[0] == "records":
        return frame_from_records(payload["records"], settings.schema)
    return frame_from_file(payload[inputs[0]], settings)


def frame_from_records(records: Any, schema: Schema, *, number_rows: bool = False) -> pd.DataFrame:
    """Validate JSON records; a key left out or a true/false value is an error, never a guess.

    A blank or whitespace-only text is a missing cell, as an empty field is in a CSV file. With
    `number_rows` (MLflow's input, which has no client ids), a record without an id is numbered.
    """
    if not isinstance(records, list) or not records:
        raise DataError('"records" must be a non-empty list of objects, one per client')
    needed = list(schema.id_columns + schema.features)
    needed_set = set(needed)
    numeric = set(schema.numeric_features)
    rows = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"record {number} is not an object of column: value")
        if number_rows and not set(schema.id_columns).issubset(record):
            record = {**{column: str(number) for column in schema.id_columns}, **record}
        if not needed_set.issubset(record):
            absent = [column for column in needed if column not in record]
            raise DataError(
                f"record {number} lacks {', '.join(absent)} (send null for an unknown value)"
            )
        row = record
        for column in needed:
            value = record[column]
            cell = record_cell(value, column in numeric, number, column)
            if cell is not value:
                row = dict(record) if row is record else row
                row[column] = cell
        rows.append(row)
    cells = {column: _column_of(rows, column) for column in needed}
    return validate_cells(cells, len(rows), schema, source="request body", master_types=False)


def _column_of(rows: list[dict[str, Any]], column: str) -> np.ndarray:
    """One column of the records as objects, each cell as it was sent (no type guessed)."""
    cells = np.empty(len(rows), dtype=object)
    cells[:] = [row[column] for row in rows]
    return cells


def record_cell(value: Any, numeric: bool, number: int, column: str) -> Any:
    """One JSON value as a cell: blank text is missing; a whole number must fit in a float."""
    # bool is an int to Python (and to pandas), so true would silently count as 1.
    if value is not None and type(value) not in (str, int, float):
        raise DataError(f"record {number}: {column} is {shown_json(value)}, not a number or text")
    if type(value) is str and not value.strip():
        return None
    if numeric and type(value) is int:
        try:
            float(value)  # kept as it is, so that messages quote it as the client wrote it
        except OverflowError:
            raise DataError(
                f"record {number}: {column} is a whole number too large for any count"
            ) from None
    return value


def shown_json(value: Any) -> str:
    """A JSON value as a message quotes it: short, and never failing on deep nesting."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        return "a nested value"
    return text if len(text) <= 80 else text[:77] + "..."


def frame_from_csv(
    csv: IO[bytes] | Path, schema: Schema, *, source: str, number_rows: bool = False
) -> pd.DataFrame:
    """Read and validate CSV; `source` names it in messages as the client knows it."""
    frame = read_csv(csv, schema, name=source)
    if not isinstance(frame.index, pd.RangeIndex):
        # Lines with one field more than the header (a comma at the end of each line) would make
        # pandas take the first column as the index, and every value would shift one column.
        raise DataError(
            f"{source} has more fields in its rows than in its header (a comma at the end of "
            "each line?): remove the extra field"
        )
    if number_rows:
        for column in schema.id_columns:
            if column not in frame.columns:
                frame[column] = [str(n) for n in range(1, len(frame) + 1)]
    return validate_frame(frame, schema, source=source, require_target=False)


def frame_from_file(filepath: Any, settings: Settings) -> pd.DataFrame:
    path = data_file(filepath, settings)
    name = relative_name(path, settings)
    with open_data_file(path, name) as stream:
        frame = frame_from_csv(stream, settings.schema, source=name)
    g.resolved_path = name
    return frame


def data_folders(settings: Settings) -> list[Path]:
    """The folders a file name may point into, in the order a bare name is looked up: test data,
    source data, ingested data."""
    test_folder = settings.test_data_path
    if test_folder.suffix.lower() == ".csv" or test_folder.is_file():
        test_folder = test_folder.parent
    return [test_folder, settings.input_folder, settings.output_folder]


def data_file(filepath: Any, settings: Settings) -> Path:
    """The data file a client names, inside a data folder.

    A name with a folder is relative to the project folder (testdata/testdata.csv), or absolute
    and inside a data folder; a bare file name (testdata.csv) is looked up in the test data folder,
    then the source and ingested data folders. Refuses '..', symbolic links anywhere below the
    data folder, and anything but a regular file (a FIFO, a device), so a request can never read
    a file outside the data folders, whatever links or names it tries.
    """
    folders = data_folders(settings)
    listed = ", ".join(relative_name(f, settings) for f in folders)
    if not isinstance(filepath, str) or not filepath.strip() or "\x00" in filepath:
        raise DataError(
            f"filepath must be a file name relative to the project folder, "
            f"e.g. testdata/testdata.csv (data folders: {listed})"
        )
    if len(filepath) > MAX_FILE_NAME_CHARS:
        raise DataError(
            f"the file name is {len(filepath)} characters long; data files have names of at most "
            f"{MAX_FILE_NAME_CHARS} (data folders: {listed})"
        )
    named = Path(filepath.strip())
    if ".." in named.parts:
        raise DataError(f"filepath {filepath!r} must not contain '..' (data folders: {listed})")
    if named.suffix.lower() != ".csv":
        raise DataError(f"filepath {filepath!r} is not a .csv file")
    try:
        return checked_data_file(named, filepath, folders, settings)
    except OSError as error:
        reason = "its name is too long" if error.errno == errno.ENAMETOOLONG else error.strerror
        raise DataError(f"filepath {filepath!r} cannot be read: {reason}") from None
    except ValueError:  # a name the file system cannot encode (a lone surrogate from JSON)
        raise DataError(f"filepath {filepath!r} is not a file name this server can use") from None


def checked_data_file(
    named: Path, filepath: str, folders: list[Path], settings: Settings
) -> Path:
    listed = ", ".join(relative_name(f, settings) for f in folders)
    if len(named.parts) == 1:
        found = [f / named for f in folders if os.path.lexists(f / named)]
        if not found:
            raise DataFileNotFound(f"no file {filepath!r} in the data folders ({listed})")
        path = found[0]
    else:
        path = named if named.is_absolute() else settings.base_dir / named
    folder = next((f for f in folders if path.is_relative_to(f)), None)
    if folder is None or path == folder:
        raise DataError(f"filepath {filepath!r} is outside the data folders ({listed})")
    step = folder
    for part in path.relative_to(folder).parts:
        step = step / part
        if step.is_symlink():
            raise DataError(
                f"filepath {filepath!r} goes through a symbolic link "
                f"({relative_name(step, settings)}); name the file itself"
            )
        if not step.exists():
            raise DataFileNotFound(f"no file {filepath!r} in the data folders ({listed})")
    if not stat.S_ISREG(path.lstat().st_mode):
        raise DataError(f"filepath {filepath!r} is not a regular file")
    return path


@contextlib.contextmanager
def open_data_file(path: Path, name: str) -> Iterator[IO[bytes]]:
    """Open a checked data file for reading, refusing it if it became a link or a FIFO since.

    O_NOFOLLOW refuses a link put in the file's place; O_NONBLOCK keeps a FIFO from blocking the
    worker; fstat checks what was opened, not what the name pointed to a moment before.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise DataError(f"{name} cannot be read: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise DataError(f"{name} is not a regular file")
        yield stream


def relative_name(path: Path, settings: Settings) -> str:
    """A path as a client names it: relative to the project folder, or to a data folder's name.

    Never the server's absolute path: a client has no business knowing the server's folders.
    """
    try:
        return path.relative_to(settings.base_dir).as_posix()
    except ValueError:
        pass
    folders = [
        *data_folders(settings), settings.model_folder, settings.deployment_folder,
        settings.log_path.parent,
    ]
    for folder in folders:
        if path.is_relative_to(folder):
            return (Path(folder.name) / path.relative_to(folder)).as_posix()
    return path.name


# --- MLflow's scoring input (POST /invocations) --------------------------------------------------


def invocation_frame(schema: Schema) -> pd.DataFrame:
    """The rows of an MLflow scoring request, validated as /prediction validates its rows."""
    body = request_body()
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise UnsupportedInput(f"the body must be UTF-8, not {charset}")
    if request.mimetype in CSV_TYPES:
        if not body.strip():
            raise DataError(f"the request has no input: {MLFLOW_ACCEPTED_INPUT}")
        return frame_from_csv(io.BytesIO(body), schema, source="request body", number_rows=True)
    if request.mimetype != "application/json":
        raise UnsupportedInput(
            f"cannot read a body of type {request.mimetype or 'unknown'}: {MLFLOW_ACCEPTED_INPUT}"
        )
    if not body.strip():
        raise DataError(f"the request has no input: {MLFLOW_ACCEPTED_INPUT}")
    records = mlflow_records(parse_json(body), schema)
    return frame_from_records(records, schema, number_rows=True)


def mlflow_records(payload: Any, schema: Schema) -> Any:
    """The records an MLflow scoring body holds, in any of its four JSON forms.

    dataframe_split: {"columns": [...], "data": [[...], ...]}; dataframe_records: [{...}, ...];
    instances and inputs: records, {column: [values]}, or rows of values in the schema's feature
    order (with the id columns first, or without them). Other keys ("params") are ignored, as
    MLflow ignores them for a model that takes no parameters.
    """
    keys = [key for key in MLFLOW_INPUT_KEYS if isinstance(payload, dict) and key in payload]
    if len(keys) != 1:
        found = f"; it has {', '.join(keys)}" if keys else ""
        raise DataError(f"unexpected JSON body{found}: {MLFLOW_ACCEPTED_INPUT}")
    data = payload[keys[0]]
    if keys[0] == "dataframe_split":
        return split_records(data)
    if keys[0] == "dataframe_records":
        return data
    if isinstance(data, dict):
        return columnar_records(data)
    if isinstance(data, list) and data and all(isinstance(row, list) for row in data):
        return positional_records(data, schema)
    return data


def split_records(split: Any) -> list[dict[str, Any]]:
    """pandas' split orient ({"columns", "data", optional "index"}) as records."""
    if not isinstance(split, dict) or not isinstance(split.get("columns"), list) or not (
        isinstance(split.get("data"), list)
    ):
        raise DataError('dataframe_split must be {"columns": [...], "data": [[...], ...]}')
    columns = split["columns"]
    if not all(isinstance(column, str) for column in columns):
        raise DataError("dataframe_split columns must be column names")
    records = []
    for number, row in enumerate(split["data"], start=1):
        if not isinstance(row, list) or len(row) != len(columns):
            raise DataError(
                f"dataframe_split row {number} must be a list of {len(columns)} values, one per "
                "column"
            )
        records.append(dict(zip(columns, row, strict=True)))
    return records


def columnar_records(columns: dict[str, Any]) -> list[dict[str, Any]]:
    """{column: [values]} (or {column: value} for one row) as records."""
    lists = [isinstance(values, list) for values in columns.values()]
    if not any(lists):
        return [columns]
    lengths = {len(values) for values in columns.values() if isinstance(values, list)}
    if not all(lists) or len(lengths) != 1:
        raise DataError("every column of inputs or instances must be a list of the same length")
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values())]


def positional_records(rows: list[list[Any]], schema: Schema) -> list[dict[str, Any]]:
    """Rows of values in the schema's order: the features, or the id columns and the features."""
    orders = [list(schema.features), list(schema.id_columns + schema.features)]
    for number, row in enumerate(rows, start=1):
        if len(row) not in {len(order) for order in orders}:
            raise DataError(
                f"row {number} has {len(row)} values; send {len(orders[0])} "
                f"({', '.join(orders[0])}) or {len(orders[1])} with {', '.join(schema.id_columns)} "
                "first, or name the columns (dataframe_split)"
            )
    return [dict(zip(next(o for o in orders if len(o) == len(row)), row, strict=True))
            for row in rows]


def unseen_categories(model: Any, frame: pd.DataFrame, schema: Schema) -> dict[str, int]:
    """How many cells of each categorical column hold a category the model never saw in training.

    The model gives such a cell no weight (the one-hot encoder ignores it), so the answer still
    stands; the count tells a client its data has categories the model cannot judge.
    """
    counts = {}
    for column, categories in known_categories(model).items():
        if column in schema.categorical_features and column in frame.columns:
            cells = frame[column]
            unseen = int((cells.notna() & ~cells.isin(list(categories))).sum())
            if unseen:
                counts[column] = unseen
    return counts


def known_categories(model: Any) -> dict[str, set[str]]:
    """Each categorical column's categories seen in training, from the model's scorer params."""
    scorer = model if isinstance(model, LinearScorer) else linear_scorer(model)
    if scorer is None:
        return {}
    return {term["column"]: set(term["weights"]) for term in scorer.categorical}


# --- Per-app state and cached answers ----------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """The current release and its model, as plain data scored by numpy (model.json)."""

    model: ServedModel
    release: deployment.Release


class KeyedCache:
    """One computed value per process, computed again only when its key changes.

    Keys are cheap facts (a file's inode, mtime and size; a release version), so checking costs a
    stat and the expensive work (unpickling, scoring, reading a CSV) runs once per change. The lock
    keeps concurrent threads from computing the same value twice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: tuple[Hashable, Any] = (object(), None)

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        cached_key, value = self._state
        if cached_key == key:
            return value
        with self._lock:
            cached_key, value = self._state
            if cached_key != key:
                value = compute()
                self._state = (key, value)
            return value


def file_key(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced (an atomic rename gives a new inode); None if absent."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


class DeployedModel:
    """The current release's model, loaded once per release, reloaded when the manifest changes.

    The model is the release's model.json, plain data that numpy scores: a worker never unpickles
    a file (a pickle runs code when loaded) nor imports scikit-learn. A release without one is
    refused (503) like a broken one. Deployment writes a release folder completely before it
    renames the manifest over the old one, so a changed manifest always names a whole release;
    loading checks every file's checksum.
    A release that fails that check is refused (503) until the manifest changes again (redeploy or
    roll back): the previous model is not served in its place, as clients would take it for the
    current one.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cache = KeyedCache()

    def get(self) -> LoadedModel:
        key = file_key(deployment.manifest_path(self._settings))
        if key is None:
            # Not cached: the first deployment must be picked up as soon as it appears.
            return self._load()
        loaded = self._cache.get(key, self._load_or_failure)
        if isinstance(loaded, PipelineError):
            # A new instance each time, so one cached failure never accumulates tracebacks.
            raise type(loaded)(*loaded.args)
        return loaded

    def _load(self) -> LoadedModel:
        model, release = load_deployed(self._settings, allow_pickle=False)
        log.info("serving release %s", release.version)
        return LoadedModel(model, release)

    def _load_or_failure(self) -> LoadedModel | PipelineError:
        try:
            return self._load()
        except (DeploymentError, ModelNotFoundError, ModelNotDeployedError) as error:
            log.error("cannot serve the deployed release: %s", error)
            return error


@dataclass(frozen=True)
class ApiState:
    """What one app keeps between requests: its settings, token, served model and cached answers."""

    settings: Settings
    token: str | None
    models: DeployedModel
    scores: KeyedCache = field(default_factory=KeyedCache)
    statistics: KeyedCache = field(default_factory=KeyedCache)
    risk_lists: KeyedCache = field(default_factory=KeyedCache)
    requests: RequestMetrics = field(default_factory=lambda: new_request_metrics())


def score_deployed(settings: Settings, loaded: LoadedModel, test_files: list[Path]) -> dict:
    """The deployed model's metrics on the test data, computed without writing any record."""
    try:
        frame = read_test_data(settings)
    except DataError as error:
        raise DataNotReady(f"the test data cannot be scored: {error}") from None
    metrics = evaluate(loaded.model, frame, settings).metrics
    return {
        "model_version": loaded.release.version,
        "test_data": [relative_name(p, settings) for p in test_files],
        "measured_on": "the test data",
        **metrics.as_dict(),
        "f1_at_deployment": loaded.release.f1,
        "f1_at_deployment_measured_on": deployment.MEASURED_ON.get(
            (deployment.release_score(settings, loaded.release.version) or {}).get("purpose"),
            "unknown",
        ),
    }


def master_statistics(settings: Settings) -> dict:
    try:
        statistics = diagnostics.summary_statistics(settings)
    except DataError as error:
        raise DataNotReady(str(error)) from None
    return {"dataset": relative_name(settings.finaldata_path, settings), "statistics": statistics}


class RiskList(NamedTuple):
    """The first rows of the risk list file, and how many rows it holds."""

    head: pd.DataFrame
    rows: int


def read_risk_list(settings: Settings, rows: int) -> RiskList:
    """The risk list's first `rows` rows, highest risk first, and its number of rows."""
    path = settings.risk_scores_path
    try:
        head = calllist.read_list(path, settings.schema, rows=rows)
        with open(path, "rb") as stream:
            lines = sum(block.count(b"\n") for block in iter(lambda: stream.read(1 << 20), b""))
        return RiskList(head, max(lines - 1, len(head)))
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise DataNotReady(
            f"the risk list {relative_name(path, settings)} cannot be read "
            f"({error}): run reporting.py again"
        ) from None


def risk_entries(head: pd.DataFrame, schema: Schema) -> list[dict[str, Any]]:
    """List rows as JSON: today's fields, then the reasons as a list and the change."""
    entries = []
    for row in diagnostics.json_safe(head.to_dict(orient="records")):
        entry = {key: value for key, value in row.items() if key not in calllist.REASON_COLUMNS}
        if "reason_1" in row:
            entry["reasons"] = [row[c] for c in calllist.REASON_COLUMNS if row.get(c)]
            entry["moved_by"] = entry["moved_by"] or None
        entries.append(entry)
    return entries


# --- Metrics -----------------------------------------------------------------------------------
# prometheus_client's multiprocess mode: each gunicorn worker writes its counts to its own file in
# the folder $PROMETHEUS_MULTIPROC_DIR names, and a scrape, whichever worker answers it, adds up
# every file. The library chooses its mode when it is first imported, so the folder is set before
# that (use_metrics_folder, from wsgi.py or `python app.py`) and prometheus_client is imported only
# inside these functions. Without the variable (tests, a single process) each app counts alone.

METRICS_FOLDER_ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
# The process id of the gunicorn master, set by gunicorn.conf.py for the workers it forks.
SERVER_ID_ENV_VAR = "RISK_API_SERVER_ID"
# Request latencies in seconds: a one-record prediction takes milliseconds, POST /diagnostics many
# seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RequestMetrics(NamedTuple):
    """The request counter and latency histogram, by route, method and status."""

    count: Any
    latency: Any


def new_request_metrics() -> RequestMetrics:
    from prometheus_client import Counter, Histogram

    labels = ("endpoint", "method", "status")
    return RequestMetrics(
        # registry=None: an app's metrics are its own; /metrics gathers them (scrape_registry).
        Counter("risk_api_requests", "Requests answered, by route, method and status", labels,
                registry=None),
        Histogram("risk_api_request_duration_seconds", "Seconds to answer a request, by route, "
                  "method and status", labels, registry=None, buckets=LATENCY_BUCKETS),
    )


def metrics_folder(settings: Settings) -> Path:
    return settings.output_folder / "metrics"


def use_metrics_folder(settings: Settings, server_id: str) -> None:
    """Count in the workspace's metrics folder (ingesteddata/metrics/), emptied once per server.

    Every process of one server calls this with the same `server_id` (gunicorn's master pid), and
    the first to find another id in the folder empties it: a new server starts its counts at zero,
    the workers of one server never wipe each other's. A $PROMETHEUS_MULTIPROC_DIR set by the
    operator is left as it is. Must run before anything imports prometheus_client.
    """
    if os.environ.get(METRICS_FOLDER_ENV_VAR):
        return
    folder = metrics_folder(settings)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        marker = folder / ".server"
        if not marker.exists() or marker.read_text() != server_id:
            for stale in folder.glob("*.db"):
                stale.unlink()
            marker.write_text(server_id)
    os.environ[METRICS_FOLDER_ENV_VAR] = str(folder)


def counting_in_files() -> bool:
    """Whether prometheus_client runs in multiprocess mode (it chose when first imported)."""
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


def start_request_timer() -> None:
    g.request_started = time.perf_counter()


def count_request(response: Response) -> Response:
    """Count every answer, errors included, under its route (not its path: paths are unbounded)."""
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    labels = (endpoint, request.method, str(response.status_code))
    metrics = state().requests
    metrics.count.labels(*labels).inc()
    started = g.get("request_started")
    if started is not None:
        metrics.latency.labels(*labels).observe(time.perf_counter() - started)
    return response


def scrape_registry(api: ApiState) -> Any:
    """What one scrape shows: every worker's request counts and what the records say."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if counting_in_files():
        MultiProcessCollector(registry)
    else:
        registry.register(api.requests.count)
        registry.register(api.requests.latency)
    registry.register(RecordsCollector(api.settings))
    return registry


class RecordsCollector:
    """Read at each scrape: the served release, the last cycle, drift, quarantined rows.

    These live in production's manifest and the records database, which any process may change;
    reading them when asked gives every worker the same answer.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def gauge(name: str, documentation: str, value: float | None, **labels: str) -> Any:
            family = GaugeMetricFamily(name, documentation, labels=list(labels))
            if value is not None:
                family.add_metric(list(labels.values()), value)
            return family

        manifest = self._manifest()
        if manifest:
            yield gauge("risk_release_info", "The release served (1), by version", 1,
                        version=str(manifest.get("current")))
            yield gauge("risk_release_f1", "F1 of the served release when it was deployed",
                        manifest.get("f1"))
            yield gauge("risk_release_deployed_timestamp_seconds",
                        "When the served release was deployed (Unix time)",
                        unix_time(manifest.get("deployed_at")))
        cycle = self._last_cycle()
        if cycle:
            yield gauge("risk_last_cycle_timestamp_seconds",
                        "When the last pipeline cycle finished (Unix time)",
                        unix_time(cycle["finished"] or cycle["started"]))
            yield gauge("risk_last_cycle_duration_seconds", "How long the last cycle took",
                        cycle["seconds"])
            yield gauge("risk_last_cycle_success", "1 if the last cycle succeeded, else 0",
                        1 if cycle["outcome"] == "ok" else 0)
            yield gauge("risk_last_cycle_info", "The last cycle's outcome and decision (1)", 1,
                        outcome=str(cycle["outcome"]), decision=str(cycle["decision"] or ""))
        drifted = self._latest_drift_verdict()
        if drifted is not None:
            yield gauge("risk_drift_detected",
                        "1 if the latest cycle that checked for drift found it, else 0",
                        1 if drifted else 0)
        quarantined = CounterMetricFamily(
            "risk_rows_quarantined", "Rows ingestion set aside in quarantine, all files"
        )
        quarantined.add_metric([], self._quarantined_rows())
        yield quarantined

    def _manifest(self) -> dict[str, Any] | None:
        try:
            return deployment.read_manifest(self.settings)
        except DeploymentError as error:
            log.warning("metrics: %s", error)
            return None

    def _last_cycle(self) -> dict[str, Any] | None:
        rows = records.query(
            self.settings.records_path,
            "SELECT started, finished, seconds, outcome, decision FROM cycles "
            "ORDER BY id DESC LIMIT 1",
        )
        return rows[0] if rows else None

    def _latest_drift_verdict(self) -> bool | None:
        rows = records.query(
            self.settings.records_path,
            "SELECT details FROM cycles WHERE details LIKE '%\"drift\"%' "
            "ORDER BY id DESC LIMIT 20",
        )
        for row in rows:
            drift = json.loads(row["details"] or "{}").get("drift")
            if isinstance(drift, dict) and "drifted" in drift:
                return bool(drift["drifted"])
        return None

    def _quarantined_rows(self) -> int:
        rows = records.query(
            self.settings.records_path,
            "SELECT COALESCE(SUM(quarantined), 0) AS rows FROM ingestions",
        )
        return int(rows[0]["rows"]) if rows else 0


def unix_time(timestamp: str | None) -> float | None:
    """An ISO-8601 time as seconds since 1970, as Prometheus keeps times; None if absent."""
    if not timestamp:
        return None
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return None


# --- Query arguments ---------------------------------------------------------------------------


def explain_requested() -> bool:
    """?explain=1, or "explain": true in a JSON body (which frame_from_json keeps in g)."""
    return flag_argument("explain") or g.get("explain", False)


def flag_argument(name: str) -> bool:
    value = request.args.get(name, "0").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise DataError(f"{name} must be 1 or 0, not {value!r}")


def positive_int_argument(name: str, default: int) -> int:
    value = request.args.get(name)
    if value is None:
        return default
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise DataError(f"{name} must be a whole number of at least 1, not {value!r}")
    return int(text)


# --- Serving -----------------------------------------------------------------------------------


class ApiServer(BaseApplication):
    """gunicorn started from Python: `python app.py` serves as `gunicorn wsgi:app` does.

    The options come from config.json's api section and the command line. The master empties the
    metrics folder before it forks the workers, which inherit the folder's variable; a worker that
    ends has its live gauges removed (mark_process_dead), as prometheus_client asks of gunicorn.
    """

    def __init__(self, settings: Settings, api: ApiSettings) -> None:
        self.settings = settings
        self.api = api
        super().__init__()

    def load_config(self) -> None:
        options = {
            "bind": f"{self.api.host}:{self.api.port}",
            "workers": self.api.workers,
            "timeout": max(1, round(self.api.worker_timeout_seconds)),
            "child_exit": worker_exited,
            "preload_app": True,  # as gunicorn.conf.py sets it for `gunicorn wsgi:app`
            "when_ready": lambda server: print_listening(self.api),
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def load(self) -> Flask:
        app = create_app(self.settings)
        preload(app)
        return app


def worker_exited(server: Any, worker: Any) -> None:
    """gunicorn's child_exit hook: a worker that ended leaves no live gauges behind."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def print_listening(api: ApiSettings) -> None:
    host = f"[{api.host}]" if ":" in api.host else api.host
    print(
        f"Serving the API on http://{host}:{api.port} with {api.workers} worker(s). "
        f"Stop it with Ctrl+C, or: kill -TERM {os.getpid()}",
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Serve the API with gunicorn (production server; there is no debug server)."
    )
    add_config_argument(parser)
    parser.add_argument("--host", help="interface to listen on (default: api.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: api.port, 8000)")
    parser.add_argument(
        "--workers", type=int, help="worker processes (default: api.workers, 2)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    api = settings.api._replace(**{
        name: value for name, value in
        (("host", args.host), ("port", args.port), ("workers", args.workers))
        if value is not None
    })
    if not 1 <= api.port <= 65535 or api.workers < 1:
        raise ConfigError("--port must be between 1 and 65535 and --workers at least 1")
    api_token(settings)  # a bad token stops the server here, with one line, not in every worker
    use_metrics_folder(settings, server_id=str(os.getpid()))
    ApiServer(settings, api).run()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
