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
  and its helpers); per-app state (`ApiState`: `DeployedModel`, the `KeyedCache`s and what they
  compute); query arguments.

Each process keeps the deployed model in memory and checks production's manifest (one stat) on every
request that needs it, so a new release is served on the next request without a restart. A GET never
changes data, models, deployments or records. POST /diagnostics records a new diagnostics run; it
reads stage timings from the records and never re-runs a stage in a web worker.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from flask import Blueprint, Flask, Response, current_app, jsonify, request, send_file
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import HTTPException, Unauthorized

import deployment
import diagnostics
from dataset import read_csv, validate_frame
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
)
from scoring import ServedModel, evaluate, load_deployed, predict_frame, read_test_data
from settings import Schema, Settings, load_settings

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
OPEN_ENDPOINTS = {"api.health"}  # answered without the token
CSV_TYPES = ("text/csv", "application/csv")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
ACCEPTED_INPUT = (
    'send {"filepath": "testdata/testdata.csv"} or {"records": [{...}, ...]} as JSON, '
    "a CSV body with Content-Type text/csv, or a filepath form field or query parameter"
)
DEFAULT_RISK_TOP = 10
# An error message quotes what it found (a header, a value); a junk request must not echo megabytes.
MAX_ERROR_CHARS = 2000

bp = Blueprint("api", __name__)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API for a workspace (default: config.json, or the one $RISK_CONFIG names)."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.api.max_request_bytes
    app.json.sort_keys = False  # metrics read best in the order they are computed
    app.extensions[EXTENSION] = ApiState(
        settings=settings,
        token=os.environ.get(settings.api.token_env_var) or None,
        models=DeployedModel(settings),
    )
    app.register_error_handler(PipelineError, pipeline_error)
    app.register_error_handler(HTTPException, http_error)
    app.before_request(require_token)
    app.register_blueprint(bp)
    return app


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
    return jsonify(
        status="ready", model_version=release.version, deployed_at=release.created_at,
        f1=release.f1,
    )


@bp.post("/prediction")
def prediction() -> Response:
    api = state()
    loaded = api.models.get()
    frame = prediction_frame(api.settings)
    result = predict_frame(loaded.model, loaded.release.version, frame, api.settings.schema)
    return jsonify(result.as_dict())


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
    api = state()
    top = positive_int_argument("top", DEFAULT_RISK_TOP)
    key = file_key(api.settings.risk_scores_path)
    if key is None:
        raise DataNotReady("no risk list yet: run reporting.py (or fullprocess.py)")
    clients = api.risk_lists.get(key, lambda: read_risk_list(api.settings))
    return jsonify(ranked_clients=len(clients), top=min(top, len(clients)), clients=clients[:top])


@bp.get("/report")
def report() -> Response:
    report_path = state().settings.report_path
    try:
        return send_file(
            report_path, mimetype="application/pdf", as_attachment=True,
            download_name=report_path.name,
        )
    except FileNotFoundError:
        raise DataNotReady("no report yet: run reporting.py (or fullprocess.py)") from None


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
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + " [...]"
    log.log(logging.INFO if status < 500 else logging.ERROR, "%s: %s", request.path, message)
    return jsonify(error=message), status


def http_error(error: HTTPException) -> Response:
    """Werkzeug's own errors (unknown route, wrong method, body over the limit) as JSON too."""
    response = jsonify(error=error.description or error.name)
    response.status_code = error.code or 500
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def require_token() -> None:
    """When the server started with a token, every request but /health must bring it."""
    api = state()
    if api.token and request.endpoint not in OPEN_ENDPOINTS and not bearer_token_matches(api.token):
        raise Unauthorized(
            f"send the API token from ${api.settings.api.token_env_var} as "
            "'Authorization: Bearer TOKEN'",
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
    """The rows to predict, validated, from whichever accepted form the request uses."""
    query_path = request.args.get("filepath")
    body = request_body()
    if query_path is not None and body.strip():
        raise DataError("send the input in the body or as ?filepath=, not both")
    if query_path is not None:
        return frame_from_file(query_path, settings)
    if not body.strip():
        raise DataError(f"the request has no input: {ACCEPTED_INPUT}")
    if request.is_json:
        return frame_from_json(body, settings)
    if request.mimetype in CSV_TYPES:
        return frame_from_csv(io.BytesIO(body), settings.schema, source="request body")
    if request.mimetype in FORM_TYPES:
        if "filepath" not in request.form:
            raise DataError(
                "the form has no filepath field (sending JSON? add the header "
                "'Content-Type: application/json')"
            )
        return frame_from_file(request.form["filepath"], settings)
    raise UnsupportedInput(
        f"cannot read a body of type {request.mimetype or 'unknown'}: {ACCEPTED_INPUT}"
    )


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


def frame_from_json(body: bytes, settings: Settings) -> pd.DataFrame:
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise DataError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict) or len({"filepath", "records"} & set(payload)) != 1:
        raise DataError(f"unexpected JSON body: {ACCEPTED_INPUT}")
    if "records" in payload:
        return frame_from_records(payload["records"], settings.schema)
    return frame_from_file(payload["filepath"], settings)


def frame_from_records(records: Any, schema: Schema) -> pd.DataFrame:
    """Validate JSON records; a key left out or a true/false value is an error, never a guess."""
    if not isinstance(records, list) or not records:
        raise DataError('"records" must be a non-empty list of objects, one per client')
    needed = list(schema.id_columns + schema.features)
    needed_set = set(needed)
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"record {number} is not an object of column: value")
        if not needed_set.issubset(record):
            absent = [column for column in needed if column not in record]
            raise DataError(
                f"record {number} lacks {', '.join(absent)} (send null for an unknown value)"
            )
        for column in needed:
            value = record[column]
            # bool is an int to Python (and to pandas), so true would silently count as 1.
            if value is not None and type(value) not in (str, int, float):
                raise DataError(
                    f"record {number}: {column} is {json.dumps(value)}, not a number or text"
                )
    frame = pd.DataFrame.from_records(records, columns=needed)
    return validate_frame(frame, schema, source="request body", require_target=False)


def frame_from_csv(csv: io.BytesIO | Path, schema: Schema, *, source: str) -> pd.DataFrame:
    """Read and validate CSV; `source` names it in messages as the client knows it."""
    frame = read_csv(csv, schema, name=source)
    return validate_frame(frame, schema, source=source, require_target=False)


def frame_from_file(filepath: Any, settings: Settings) -> pd.DataFrame:
    path = data_file(filepath, settings)
    return frame_from_csv(path, settings.schema, source=relative_name(path, settings))


def data_folders(settings: Settings) -> list[Path]:
    """The folders a filepath may name a file in: source data, test data, ingested data."""
    test_folder = settings.test_data_path
    if test_folder.suffix.lower() == ".csv" or test_folder.is_file():
        test_folder = test_folder.parent
    return [settings.input_folder, test_folder, settings.output_folder]


def data_file(filepath: Any, settings: Settings) -> Path:
    """The data file a client names, relative to the project folder, inside a data folder.

    Refuses absolute paths, '..', and symbolic links anywhere below the data folder, so a request
    can never read a file outside the data folders, whatever links or names it tries.
    """
    folders = ", ".join(relative_name(f, settings) for f in data_folders(settings))
    if not isinstance(filepath, str) or not filepath.strip() or "\x00" in filepath:
        raise DataError(
            f"filepath must be a file name relative to the project folder, "
            f"e.g. testdata/testdata.csv (data folders: {folders})"
        )
    relative = Path(filepath.strip())
    if relative.is_absolute():
        raise DataError(
            f"filepath {filepath!r} must be relative to the project folder, "
            f"e.g. testdata/testdata.csv (data folders: {folders})"
        )
    if ".." in relative.parts:
        raise DataError(f"filepath {filepath!r} must not contain '..' (data folders: {folders})")
    if relative.suffix.lower() != ".csv":
        raise DataError(f"filepath {filepath!r} is not a .csv file")
    path = settings.base_dir / relative
    folder = next((f for f in data_folders(settings) if path.is_relative_to(f)), None)
    if folder is None or path == folder:
        raise DataError(f"filepath {filepath!r} is outside the data folders ({folders})")
    step = folder
    for part in path.relative_to(folder).parts:
        step = step / part
        if step.is_symlink():
            raise DataError(
                f"filepath {filepath!r} goes through a symbolic link "
                f"({relative_name(step, settings)}); name the file itself"
            )
        if not step.exists():
            raise DataFileNotFound(f"no file {filepath!r} in the data folders ({folders})")
    if not path.is_file():
        raise DataError(f"filepath {filepath!r} is not a file")
    return path


def relative_name(path: Path, settings: Settings) -> str:
    """A path as a client names it: relative to the project folder where it can be."""
    try:
        return path.relative_to(settings.base_dir).as_posix()
    except ValueError:
        return str(path)


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
    refused (503) like a broken one. Deployment writes a release folder completely before it renames the manifest over the old
    one, so a changed manifest always names a whole release; loading checks every file's checksum.
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
        **metrics.as_dict(),
        "f1_at_deployment": loaded.release.f1,
    }


def master_statistics(settings: Settings) -> dict:
    try:
        statistics = diagnostics.summary_statistics(settings)
    except DataError as error:
        raise DataNotReady(str(error)) from None
    return {"dataset": relative_name(settings.finaldata_path, settings), "statistics": statistics}


def read_risk_list(settings: Settings) -> list[dict[str, Any]]:
    """The risk list's rows, highest risk first, as JSON-ready dicts."""
    text_columns = {c: "str" for c in settings.schema.id_columns}
    try:
        frame = pd.read_csv(settings.risk_scores_path, dtype=text_columns)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise DataNotReady(
            f"the risk list {relative_name(settings.risk_scores_path, settings)} cannot be read "
            f"({error}): run reporting.py again"
        ) from None
    return diagnostics.json_safe(frame.to_dict(orient="records"))


# --- Query arguments ---------------------------------------------------------------------------


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
