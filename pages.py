"""Pages for people: the call list, one client, and the model's health, served beside the JSON API.

Shaped like flaskr's blog.py and auth.py: `bp` holds the page routes and the login; templates/ holds
one base template and one template per page; static/ holds one stylesheet. A view reads what the
pipeline recorded (the risk list, the manifest and its releases, the records database, the latest
diagnostics) and renders it. It computes nothing the pipeline has not recorded and writes nothing.

Each page has a machine twin in the API (app.py): `/` is GET /risk, `/clients/<id>` is the same
list's row with GET /summarystats, `/model` is GET /ready, GET /scoring and GET /diagnostics.

Login: when the API runs with a token, the pages ask for it once (/login) and keep a signed,
HttpOnly, SameSite=Strict session cookie. app.py's bearer check leaves this blueprint's endpoints
to `require_login` below. The key that signs the cookie comes from $RISK_SECRET_KEY, or from a file
beside the records made at first start, readable by its owner only; never from code.

Speed: the risk list is indexed once per file (its inode, mtime and size, the key app.KeyedCache
uses): each row's byte range and the client ids, sorted. A page reads only the rows it shows and a
client is found by binary search, however long the list; nothing of a million rows is rendered.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from flask import (
    Blueprint,
    Response,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException, NotFound

import calllist
import deployment
import diagnostics
import ingestion
import records
from app import (
    KeyedCache,
    bearer_token_matches,
    file_key,
    positive_int_argument,
    public_message,
    relative_name,
    send_output,
    state,
    status_for,
)
from dataset import read_master
from errors import ConfigError, DataError, DataNotReady, PipelineError
from settings import Schema, Settings

log = logging.getLogger(__name__)

bp = Blueprint("pages", __name__)

EXTENSION = "pages"  # the app.extensions key of an app's PageState
SECRET_KEY_ENV_VAR = "RISK_SECRET_KEY"
SECRET_KEY_FILE = "session.key"  # in the output folder, beside the records
SESSION_HOURS = 12
# The call list shows the top group on its first page (up to this many rows a page).
MIN_PAGE_ROWS, MAX_PAGE_ROWS = 25, 200
LAST_CYCLES = 20
RECENT_LISTS = 20  # lists whose top group a client's page looks up
# How a cycle's decision reads to the model's owner (fullprocess.py names them).
DECISIONS = {
    "first-deployment": "First deployment: nothing was deployed yet, so the first trained model "
    "went out.",
    "drift-redeployed": "Redeployed on drift: the served model's scores on new data fell beyond "
    "their noise, and a retrained model was significantly better on held-out new rows.",
    "forced-redeploy": "Forced retrain (fullprocess.py --force): deployed regardless of scores.",
    "drift-kept-deployed": "Drift found, but no retrained model was better: the served model "
    "stayed.",
    "no-drift": "New data, no drift: the served model stayed.",
    "nothing-new": "No new data files.",
    "no-usable-rows": "New files added no new rows.",
}
# Columns of the risk list the pages know; any other column is shown as it is.
REASON_PREFIX = "reason"
CHANGE_COLUMN = "change"
RANK_BEFORE_COLUMN = "rank_before"
MOVED_BY_COLUMN = "moved_by"
SECURITY_HEADERS = {
    # Nothing is loaded from elsewhere and nothing runs inline: a hostile id in a data file can
    # do nothing even if a template ever failed to escape it.
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; "
    "script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@bp.record_once
def set_up(setup: BlueprintSetupState) -> None:
    """Give the app its page caches and, when it has a token, the key that signs sessions."""
    app = setup.app
    api = app.extensions["risk"]
    app.extensions[EXTENSION] = PageState()
    if api.token:
        app.secret_key = session_key(api.settings)
        app.config.update(
            SESSION_COOKIE_NAME="risk_session",
            SESSION_COOKIE_HTTPONLY=True,
            SESSION_COOKIE_SAMESITE="Strict",
            PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
        )


@dataclass(frozen=True)
class PageState:
    """What the pages keep between requests: each input parsed once per file or record."""

    risk_lists: KeyedCache = field(default_factory=KeyedCache)
    clients: KeyedCache = field(default_factory=KeyedCache)


def pages() -> PageState:
    return current_app.extensions[EXTENSION]


def settings() -> Settings:
    return state().settings


# --- Login -------------------------------------------------------------------------------------


def session_key(settings: Settings) -> bytes:
    """The key that signs session cookies: $RISK_SECRET_KEY, else a file made at first start."""
    from_environment = os.environ.get(SECRET_KEY_ENV_VAR)
    if from_environment:
        return from_environment.encode()
    path = settings.output_folder / SECRET_KEY_FILE
    if not path.exists():
        _make_key_file(path)
    status = path.stat()
    if status.st_mode & 0o077:
        raise ConfigError(
            f"{path} signs the pages' sessions and must be readable by its owner only: "
            f"chmod 600 {path}"
        )
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise ConfigError(f"{path} holds no usable key: delete it and start the server again")
    return key


def _make_key_file(path: Path) -> None:
    """Create the key file, owner-only, complete before it has its name.

    Every gunicorn worker builds the app, so several may race here. os.link never replaces an
    existing name: the first worker's key wins and every worker reads that one (an atomic replace
    would let two workers sign with different keys).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as key_file:
            key_file.write(secrets.token_hex(32).encode() + b"\n")
            key_file.flush()
            os.fsync(key_file.fileno())
        try:
            os.link(temporary, path)
            log.info("made the session key %s", path)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def token_mark(token: str) -> str:
    """What a session keeps to show it logged in with this token: a keyed hash, never the token.

    A new token (the server restarted with another) ends every session made with the old one.
    """
    key = current_app.secret_key
    key = key.encode() if isinstance(key, str) else key
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


@bp.before_request
def require_login() -> Response | None:
    """With a token configured, a page needs the session cookie (or the bearer token itself)."""
    token = state().token
    if token is None or request.endpoint in ("pages.login", "pages.logout"):
        return None
    mark = session.get("login")
    if (mark is not None and hmac.compare_digest(mark, token_mark(token))) or (
        bearer_token_matches(token)
    ):
        return None
    return redirect(url_for("pages.login", next=request.full_path.rstrip("?")))


@bp.route("/login", methods=("GET", "POST"))
def login() -> Response | str | tuple[str, int]:
    token = state().token
    target = safe_next(request.values.get("next"))
    if token is None:
        return redirect(target)
    if request.method == "GET":
        return render_template("login.html", next=target)
    supplied = request.form.get("token", "")
    if not hmac.compare_digest(supplied.strip().encode(), token.encode()):
        log.info("pages: a login with a wrong token")
        return render_template(
            "login.html", next=target, error="That is not the token. Try again."
        ), 403
    session.clear()
    session.permanent = True
    session["login"] = token_mark(token)
    return redirect(target)


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("pages.login"))


def safe_next(target: str | None) -> str:
    """Where to go after login: a path on this site only, never another host."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("pages.call_list")


@bp.context_processor
def login_state() -> dict[str, bool]:
    return {"logged_in": state().token is not None and "login" in session}


@bp.after_request
def security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# --- Errors ------------------------------------------------------------------------------------


@bp.errorhandler(PipelineError)
def pipeline_error(error: PipelineError) -> tuple[str, int]:
    """Our errors as a page, with the status app.ERROR_STATUS gives them."""
    status = status_for(error)
    log.log(logging.INFO if status < 500 else logging.ERROR, "%s: %s", request.path, error)
    message = public_message(str(error), settings())
    return render_template("error.html", status=status, message=message), status


@bp.errorhandler(HTTPException)
def http_error(error: HTTPException) -> tuple[str, int]:
    status = error.code or 500
    return render_template("error.html", status=status, message=error.description), status


class NotReady(NamedTuple):
    """Why a page has nothing to show yet, and the command that makes it."""

    title: str
    message: str
    command: str


def not_ready(what: NotReady) -> tuple[str, int]:
    return render_template("notready.html", not_ready=what), 503


NOTHING_DEPLOYED = NotReady(
    "Nothing is deployed yet",
    "No model has been trained and deployed, so there is no risk list to show.",
    "python fullprocess.py",
)
NO_RISK_LIST = NotReady(
    "No risk list yet",
    "A model is deployed, but the risk list has not been written.",
    "python reporting.py",
)


# --- The risk list, indexed once per file ------------------------------------------------------


class RiskList:
    """riskscores.csv as the pages read it: the header, each row's bytes, the ids sorted.

    Holds the file open, so that the rows it reads are those of the file it indexed even after a
    new list replaces it; the pages ask for the new list by its new key on the next request.
    """

    def __init__(self, path: Path, schema: Schema) -> None:
        descriptor = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, descriptor)
        self._descriptor = descriptor
        status = os.fstat(descriptor)
        self.key = (status.st_ino, status.st_mtime_ns, status.st_size)
        self.made_at = datetime.fromtimestamp(status.st_mtime, UTC).isoformat(timespec="seconds")
        with open(descriptor, "rb", closefd=False) as stream:
            data = stream.read()
        self._bounds = record_bounds(data)
        self.header = next(csv.reader([data[: self._bounds[1]].decode("utf-8")]))
        self.id_columns = [c for c in schema.id_columns if c in self.header]
        self.predicted_column = f"predicted_{schema.target}"
        ids = ids_of(data, self.id_columns)
        if len(ids) != len(self):
            raise DataNotReady(
                f"the risk list {path} has {len(ids)} rows by its ids and {len(self)} by its "
                "lines: run reporting.py again"
            )
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        first = self.rows(0, 1)
        self.model_version = first[0].get("model_version", "") if first else ""
        self.reason_columns = [c for c in self.header if c.startswith(REASON_PREFIX)]
        self.has_changes = CHANGE_COLUMN in self.header
        known = {"rank", "probability", self.predicted_column, "model_version", CHANGE_COLUMN,
                 RANK_BEFORE_COLUMN, MOVED_BY_COLUMN, *self.id_columns, *self.reason_columns}
        # Columns a later risk list adds are shown as they are.
        self.extra_columns = [c for c in self.header if c not in known]

    def __len__(self) -> int:
        return len(self._bounds) - 2  # the bounds of the header and of each row, and the end

    def rows(self, start: int, stop: int) -> list[dict[str, str]]:
        """Rows start..stop-1 (0 is rank 1) as column: text, read from the file."""
        stop = min(stop, len(self))
        if start >= stop:
            return []
        offset = int(self._bounds[start + 1])
        size = int(self._bounds[stop + 1]) - offset
        text = os.pread(self._descriptor, size, offset).decode("utf-8")
        cells = csv.reader(io.StringIO(text))
        return [dict(zip(self.header, row, strict=False)) for row in cells]

    def positions_of(self, prefix: str, *, exact: bool) -> np.ndarray:
        """Rows whose client id is `prefix` (exact) or starts with it, highest risk first."""
        wanted = prefix.encode("utf-8")
        width = self._sorted_ids.dtype.itemsize
        if not wanted or len(wanted) > width:
            return np.empty(0, dtype=np.int64)
        low = int(np.searchsorted(self._sorted_ids, np.array(wanted, dtype=self._sorted_ids.dtype)))
        if exact or len(wanted) == width:
            found = low < len(self._sorted_ids) and self._sorted_ids[low] == wanted
            return self._order[low:low + 1] if found else np.empty(0, dtype=np.int64)
        after = np.array(wanted + b"\xff", dtype=self._sorted_ids.dtype)
        high = int(np.searchsorted(self._sorted_ids, after))
        return np.sort(self._order[low:high])

    def client_id(self, row: dict[str, str]) -> str:
        return " / ".join(row.get(column, "") for column in self.id_columns)


def record_bounds(data: bytes) -> np.ndarray:
    """Where each CSV record starts, and the end of the last: records end at a line break that is
    not inside quotes (an even number of quote characters before it, as "" escapes a quote)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    breaks = np.flatnonzero(buffer == ord("\n"))
    quotes = np.flatnonzero(buffer == ord('"'))
    if len(quotes):
        breaks = breaks[np.searchsorted(quotes, breaks) % 2 == 0]
    ends = breaks + 1
    if len(data) and (not len(ends) or ends[-1] != len(data)):
        ends = np.append(ends, len(data))  # a last line without a line break
    return np.concatenate([[0], ends]).astype(np.int64)


def ids_of(data: bytes, id_columns: list[str]) -> np.ndarray:
    """Each row's client id as UTF-8 bytes (id columns joined by " / ", as scoring names them)."""
    if not id_columns:
        raise DataNotReady("the risk list has no client id column: run reporting.py again")
    frame = pd.read_csv(
        io.BytesIO(data), usecols=id_columns, dtype="str", keep_default_na=False
    )[id_columns]
    texts = frame.iloc[:, 0] if len(id_columns) == 1 else frame.agg(" / ".join, axis=1)
    return np.array([text.encode("utf-8") for text in texts], dtype=bytes)


def risk_list() -> RiskList | None:
    """The current risk list, indexed; None when there is none yet."""
    path = settings().risk_scores_path
    key = file_key(path)
    if key is None:
        return None
    return pages().risk_lists.get(key, lambda: RiskList(path, settings().schema))


# --- What the list says about each client, and what the records say about the list ------------


class Change(NamedTuple):
    """What changed for one client since the previous list, in words, and its kind for styling."""

    kind: str  # new | risen | fallen | unchanged | "" (nothing to say)
    text: str


CHANGE_KINDS = ("new", "risen", "fallen", "unchanged")


def change_of(row: dict[str, str]) -> Change:
    """The list's own words for what changed (calllist.py writes them), with the rank before."""
    text = row.get(CHANGE_COLUMN, "")
    kind = next((kind for kind in CHANGE_KINDS if kind in text.lower()), "")
    before = row.get(RANK_BEFORE_COLUMN, "")
    if before and kind != "unchanged":
        text = f"{text} (was {before})"
    return Change(kind, text)


def recorded_list(risk: RiskList) -> dict[str, Any] | None:
    """The records' entry of the list on disk (calllist.py records each list it writes)."""
    size, mtime_ns = risk.key[2], risk.key[1]  # of the file indexed
    return calllist.recorded_list(settings(), calllist.stamp_of(size, mtime_ns))


class ListRow(NamedTuple):
    """One client as the call list shows it."""

    rank: int
    client: str
    url: str
    probability: float | None
    predicted: str
    reasons: list[str]
    change: Change
    extras: list[str]
    in_top_group: bool


def list_row(risk: RiskList, row: dict[str, str], top_n: int,
             client_url: Callable[[str], str] | None = None) -> ListRow:
    rank = int(row["rank"])
    client = risk.client_id(row)
    return ListRow(
        rank=rank,
        client=client,
        url=(client_url or client_page_url())(client),
        probability=to_float(row.get("probability")),
        predicted=predicted_words(row.get(risk.predicted_column)),
        reasons=[row[c] for c in risk.reason_columns if row.get(c)],
        change=change_of(row),
        extras=[row.get(c, "") for c in risk.extra_columns],
        in_top_group=rank <= top_n,
    )


def client_page_url() -> Callable[[str], str]:
    """What url_for("pages.client", client_id=...) gives, built without it for each of a page's
    rows: url_for would take a fifth of the call list's time."""
    prefix = url_for("pages.client", client_id="-")[:-1]
    converter = current_app.url_map.converters["path"](current_app.url_map)
    return lambda client: prefix + converter.to_url(client)


def to_float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def predicted_words(text: str | None) -> str:
    return {"1": "leaves", "0": "stays"}.get((text or "").strip(), text or "")


# --- The call list: / ---------------------------------------------------------------------------


@bp.get("/")
def call_list() -> str | Response | tuple[str, int]:
    if not deployment.is_deployed(settings()):
        return not_ready(NOTHING_DEPLOYED)
    risk = risk_list()
    if risk is None:
        return not_ready(NO_RISK_LIST)
    query = request.args.get("q", "").strip()
    top_n = settings().diagnostics.risk_top_n
    page_rows = min(max(top_n, MIN_PAGE_ROWS), MAX_PAGE_ROWS)
    if query:
        exact = risk.positions_of(query, exact=True)
        if len(exact):
            return redirect(url_for("pages.client", client_id=query))
        positions = risk.positions_of(query, exact=False)
        total = len(positions)
    else:
        positions = None
        total = len(risk)
    pages_count = max(1, -(-total // page_rows))
    page = min(positive_int_argument("page", 1), pages_count)
    start = (page - 1) * page_rows
    if positions is None:
        raw = risk.rows(start, start + page_rows)
    else:
        raw = [risk.rows(int(p), int(p) + 1)[0] for p in positions[start:start + page_rows]]
    served = deployment.current_release(settings())
    client_url = client_page_url()
    return render_template(
        "calllist.html",
        risk=risk,
        listed=recorded_list(risk),
        track_record=calllist.latest_track_record(settings()),
        rows=[list_row(risk, row, top_n, client_url) for row in raw],
        query=query,
        total=total,
        page=page,
        pages_count=pages_count,
        first_shown=start + 1,
        top_n=top_n,
        served=served,
    )


@bp.get("/riskscores.csv")
def risk_scores_csv() -> Response:
    """The risk list as a download: the same file as production's riskscores.csv."""
    return send_output(settings().risk_scores_path, "text/csv", "no risk list yet")


# --- One client: /clients/<id> ------------------------------------------------------------------


class ClientRows:
    """Every row of every client: the master dataset's labeled rows and the rosters' snapshots.

    Indexed by client id (sorted, for binary search) once per pair of files; each row keeps where
    it came from: its ingestion run and master position, or its roster snapshot.
    """

    def __init__(self, settings: Settings) -> None:
        schema = settings.schema
        master = read_master(settings)
        snapshots = calllist.read_snapshots(settings)
        keys = np.concatenate([calllist.client_keys(master, schema),
                               calllist.client_keys(snapshots, schema)])
        ids = np.array([key.encode("utf-8") for key in keys], dtype=bytes) if len(keys) else (
            np.array([], dtype="S1"))
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self.master_rows = len(master)
        self.features = list(schema.features)
        self._values = {
            c: np.concatenate([column_values(master[c], c, schema),
                               column_values(snapshots[c], c, schema)])
            for c in self.features
        }
        self._outcomes = master[schema.target].to_numpy(dtype="float64", na_value=np.nan)
        # A snapshot that arrived when the master dataset had P rows is newer than rows 0..P-1.
        positions = snapshots[ingestion.MASTER_POSITION_COLUMN].to_numpy(dtype="int64")
        self._arrival = np.concatenate([2 * np.arange(len(master)) + 1, 2 * positions])
        self._snapshot_numbers = snapshots[ingestion.SNAPSHOT_COLUMN].to_numpy(dtype="int64")
        self._batches = ingestion.master_batches(settings, len(master)) if len(master) else None
        self._batch_times = {
            row["run_id"]: row["time"] for row in records.query(
                settings.records_path,
                "SELECT run_id, MIN(time) AS time FROM ingestions GROUP BY run_id",
            )
        }
        self._rosters = {
            row["snapshot"]: row for row in records.query(
                settings.records_path, "SELECT snapshot, file, time FROM rosters"
            )
        }

    def rows_of(self, client: str) -> list[dict[str, Any]]:
        """The client's rows in the order they arrived, each with its source and outcome."""
        wanted = client.encode("utf-8")
        if not len(self._sorted_ids) or len(wanted) > self._sorted_ids.dtype.itemsize:
            return []
        key = np.array(wanted, dtype=self._sorted_ids.dtype)
        low = int(np.searchsorted(self._sorted_ids, key, side="left"))
        high = int(np.searchsorted(self._sorted_ids, key, side="right"))
        found = self._order[low:high]
        return [self._row(int(i)) for i in found[np.lexsort((found, self._arrival[found]))]]

    def _row(self, index: int) -> dict[str, Any]:
        values = {c: plain(self._values[c][index]) for c in self.features}
        if index >= self.master_rows:
            roster = self._rosters.get(int(self._snapshot_numbers[index - self.master_rows]), {})
            return {"values": values, "position": None, "outcome": None,
                    "snapshot_row": index - self.master_rows,
                    "source": f"roster {roster.get('file', '')}".strip(),
                    "arrived_at": roster.get("time")}
        batch = None if self._batches is None else str(self._batches[index])
        outcome = self._outcomes[index]
        return {"values": values, "position": index, "snapshot_row": None,
                "outcome": None if np.isnan(outcome) else int(outcome),
                "source": "labeled batch", "arrived_at": self._batch_times.get(batch)}


def column_values(column: pd.Series, name: str, schema: Schema) -> np.ndarray:
    """A column as a compact array: numbers as floats (NaN where missing), categories as text."""
    if name in schema.numeric_features:
        return column.to_numpy(dtype="float64", na_value=np.nan)
    return column.to_numpy(dtype=object)


def plain(value: Any) -> Any:
    """A numpy cell as a plain number (None when missing), for the template."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def client_rows() -> ClientRows | None:
    """Every client's rows, indexed once per version of the master dataset and the rosters."""
    current = settings()
    key = (file_key(current.finaldata_path), file_key(current.rosters_path))
    if key == (None, None):
        return None
    try:
        return pages().clients.get(key, lambda: ClientRows(current))
    except DataError as error:  # the server's own files: not the visitor's mistake
        raise DataNotReady(f"{error}: run ingestion.py") from None


def typical_client() -> tuple[dict[str, dict[str, Any]], str | None]:
    """The recorded summary statistics of the master dataset (the latest diagnostics run)."""
    latest = diagnostics.latest_diagnostics(settings())
    if latest is None:
        return {}, None
    return latest.get("summary_statistics") or {}, latest.get("time")


@bp.get("/clients/<path:client_id>")
def client(client_id: str) -> str | tuple[str, int]:
    if not deployment.is_deployed(settings()):
        return not_ready(NOTHING_DEPLOYED)
    risk = risk_list()
    if risk is None:
        return not_ready(NO_RISK_LIST)
    top_n = settings().diagnostics.risk_top_n
    found = risk.positions_of(client_id, exact=True)
    raw = risk.rows(int(found[0]), int(found[0]) + 1)[0] if len(found) else None
    rows = client_rows()
    history = rows.rows_of(client_id) if rows is not None else []
    if raw is None and not history:
        raise NotFound(f"No client {client_id!r} on the risk list or in the data.")
    lists = ranks_in_lists(client_id)
    statistics, statistics_time = typical_client()
    return render_template(
        "client.html",
        client_id=client_id,
        risk=risk,
        entry=list_row(risk, raw, top_n) if raw is not None else None,
        moved_by=raw.get(MOVED_BY_COLUMN) if raw is not None else None,
        extra_columns=[(c, raw[c]) for c in risk.extra_columns] if raw is not None else [],
        listed=recorded_list(risk),
        latest=history[-1] if history else None,
        history=history,
        outcome=outcome_after_lists(history, lists),
        features=list(settings().schema.features),
        statistics=statistics,
        statistics_time=statistics_time,
        lists=lists,
        top_n=top_n,
        served=deployment.current_release(settings()),
    )


def ranks_in_lists(client: str) -> list[dict[str, Any]]:
    """The client's rank in the top group of each recent list (None: not in it), oldest first.

    The records keep each list's top group; below it, ranks are not kept.
    """
    lists = records.query(
        settings().records_path,
        "SELECT id, time, model_version, roster, master_rows, roster_rows, top_n, top_clients "
        "FROM call_lists "
        "ORDER BY id DESC LIMIT ?",
        (RECENT_LISTS,),
    )
    for listed in lists:
        top = json.loads(listed.pop("top_clients"))
        listed["rank"] = top.index(client) + 1 if client in top else None
    return lists[::-1]


def outcome_after_lists(
    history: list[dict[str, Any]], lists: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """What a batch said of the client after the newest list that ranked it, with that list.

    As calllist counts a list's track record: a list ranked the client when its newest row then
    did not say it had left, and the client's outcome is its first labeled row after the list.
    """
    for listed in reversed(lists):
        known = [row for row in history if was_known_to(row, listed)]
        after = [row for row in history
                 if row["position"] is not None and row["position"] >= listed["master_rows"]]
        if known and known[-1]["outcome"] != 1 and after:
            return {"row": after[0], "list": listed}
    return None


def was_known_to(row: dict[str, Any], listed: dict[str, Any]) -> bool:
    """Whether a row of the data was there when the list was made."""
    if row["position"] is not None:
        return row["position"] < listed["master_rows"]
    return row["snapshot_row"] < listed["roster_rows"]


# --- The model: /model --------------------------------------------------------------------------


@bp.get("/model")
def model() -> str | tuple[str, int]:
    current = settings()
    if not deployment.is_deployed(current):
        return not_ready(NOTHING_DEPLOYED)
    release = deployment.current_release(current)
    metadata = release.metadata()
    latest = diagnostics.latest_diagnostics(current)
    track = calllist.track_records(current)
    releases = deployment.list_releases(current)
    return render_template(
        "model.html",
        release=release,
        metadata=metadata,
        why=why_deployed(release.version),
        deployed_with=deployment.release_score(current, release.version),
        measured_on=deployment.MEASURED_ON,
        scores=release_scores(release.version),
        confusion_matrix=current.confusion_matrix_path.is_file(),
        report_for=deployment.described_outputs(current).get(current.report_path.name),
        report=current.report_path.is_file(),
        track=track,
        charts=[release_chart(releases), scores_chart(), track_chart(track)],
        diagnostics=latest,
        cycles=last_cycles(),
        releases=list(reversed(releases)),
        confidence=current.scoring.confidence,
        decisions=DECISIONS,
    )


def why_deployed(version: str) -> dict[str, Any]:
    """How the served release came to be served: the cycle that deployed it, or a person."""
    cycle = deployment.deploying_cycle(settings(), version)
    details = json.loads(cycle["details"] or "{}") if cycle else {}
    return {
        "deployment": deployment.last_deployment(settings(), version),
        "cycle": cycle,
        "drift": (details.get("drift") or {}).get("numbers"),
        "drift_reason": (details.get("drift") or {}).get("reason"),
        "candidates": details.get("candidates") or [],
        "chosen": details.get("chosen"),
        "deploy": (details.get("deploy") or {}).get("numbers"),
        "deploy_reason": (details.get("deploy") or {}).get("reason"),
    }


def release_scores(version: str) -> list[dict[str, Any]]:
    """The release's recorded scores: on the test data, and on held-out new rows after drift."""
    rows = records.query(
        settings().records_path,
        "SELECT * FROM scores WHERE model_version = ? AND purpose IN ('test', 'drift-holdout') "
        "ORDER BY id",
        (version,),
    )
    latest = {row["purpose"]: row for row in rows}
    for row in latest.values():
        path = Path(row["data_path"])
        row["data"] = relative_name(path, settings()) if path.is_absolute() else row["data_path"]
        row["measured_on"] = deployment.MEASURED_ON.get(row["purpose"], row["purpose"])
    return list(latest.values())


def last_cycles() -> list[dict[str, Any]]:
    cycles = records.query(
        settings().records_path,
        "SELECT id, started, seconds, new_files, decision, release, outcome, message "
        "FROM cycles ORDER BY id DESC LIMIT ?",
        (LAST_CYCLES,),
    )
    for cycle in cycles:
        cycle["deployed"] = cycle["decision"] in deployment.DEPLOYING_DECISIONS
    return cycles


# --- Charts: hand-drawn SVG from the recorded numbers --------------------------------------------


class Line(NamedTuple):
    label: str
    points: list[tuple[float, float]]  # in the chart's coordinates
    values: list[tuple[str, float]]  # (x label, value) as recorded, for the table beside it
    color: str
    dash: str


class Chart(NamedTuple):
    """A line chart of scores from 0 to 1: SVG coordinates, ticks, and the numbers for a table."""

    title: str
    description: str
    lines: list[Line]
    x_ticks: list[tuple[float, str, str]]  # x, label, text-anchor
    measure: str  # what the values are, for the table of numbers
    y_ticks: list[tuple[float, str]]
    # A narrow drawing: on a phone it shrinks less, so its labels stay readable.
    width: int = 400
    height: int = 200
    left: int = 40
    right: int = 8
    top: int = 10
    bottom: int = 30


# Distinguishable by colour and by dash, so a line is told apart without colour vision.
PALETTE = [("#1a56a8", ""), ("#b3261e", "6 4"), ("#1e7a34", "2 3"), ("#6b3fa0", "8 3 2 3")]


def line_chart(title: str, description: str,
               series: dict[str, list[tuple[float, str, float]]],
               x_ticks: list[tuple[float, str]], measure: str = "F1") -> Chart:
    """Series of (x, x label, value) with x in [0, 1] and values (scores) in [0, 1]."""
    frame = Chart(title, description, [], [], measure, [])
    plot_width = frame.width - frame.left - frame.right
    plot_height = frame.height - frame.top - frame.bottom

    def x_of(x: float) -> float:
        return round(frame.left + x * plot_width, 1)

    def y_of(value: float) -> float:
        return round(frame.top + (1 - min(max(value, 0.0), 1.0)) * plot_height, 1)

    lines = [
        Line(label, [(x_of(x), y_of(v)) for x, _, v in points],
             [(x_label, v) for _, x_label, v in points], *PALETTE[number % len(PALETTE)])
        for number, (label, points) in enumerate(series.items())
    ]
    return frame._replace(
        lines=lines,
        x_ticks=[(x_of(x), text, anchor_at(x)) for x, text in x_ticks],
        y_ticks=[(y_of(v), f"{v:.2f}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)],
    )


def anchor_at(x: float) -> str:
    """Labels at the ends are aligned inwards, so they are never cut off."""
    return "start" if x < 0.1 else "end" if x > 0.9 else "middle"


def spread(count: int) -> list[float]:
    return [0.5] if count == 1 else [i / (count - 1) for i in range(count)]


def release_chart(releases: list[deployment.Release]) -> Chart:
    """F1 each kept release was deployed with, oldest first."""
    xs = spread(len(releases))
    points = [(x, short_time(r.created_at), r.f1) for x, r in zip(xs, releases, strict=True)
              if r.f1 is not None]
    step = max(1, len(points) // 6)
    return line_chart(
        "F1 at deployment, by release",
        "The F1 each kept release had when it was deployed (on the test data for a first "
        "deployment, on held-out new rows after drift).",
        {"F1 at deployment": points} if points else {},
        [(x, label) for x, label, _ in points[::step]],
    )


def scores_chart() -> Chart:
    """F1 of every recorded score over time, by what it measured (a cycle's check, a training)."""
    rows = records.query(
        settings().records_path,
        "SELECT time, purpose, f1 FROM scores ORDER BY id DESC LIMIT 500",
    )[::-1]
    if not rows:
        return line_chart("F1 of recorded scores over time", "No scores recorded yet.", {}, [])
    times = [datetime.fromisoformat(row["time"]).timestamp() for row in rows]
    first, last = min(times), max(times)

    def x_of(moment: float) -> float:
        return 0.5 if last == first else (moment - first) / (last - first)

    series: dict[str, list[tuple[float, str, float]]] = {}
    for row, moment in zip(rows, times, strict=True):
        series.setdefault(row["purpose"], []).append(
            (x_of(moment), short_time(row["time"]), row["f1"])
        )
    ticks = [(x_of(first), short_time(rows[0]["time"]))]
    if last != first:
        ticks.append((x_of(last), short_time(rows[-1]["time"])))
    return line_chart(
        "F1 of recorded scores over time, by purpose",
        "test: the test data at training; drift-check: the served model on each new batch; "
        "drift-holdout: a retrained model on held-out new rows.",
        series,
        ticks,
    )


def track_chart(track: list[dict[str, Any]]) -> Chart:
    """Each list's track record: the share of leavers in its top group and among all it ranked."""
    xs = spread(len(track))
    precision = [(x, short_time(r["list_time"]), r["precision"])
                 for x, r in zip(xs, track, strict=True) if r["precision"] is not None]
    share = [(x, short_time(r["list_time"]), r["leaver_share"])
             for x, r in zip(xs, track, strict=True)]
    step = max(1, len(share) // 6)
    return line_chart(
        "Track record of the lists",
        "For each list whose clients' outcomes have arrived: the share who left among its top "
        "group (precision at the top) and among all the clients it ranked."
        if track else "No list's outcomes have arrived yet.",
        {name: points for name, points in [("top group", precision), ("all ranked", share)]
         if points},
        [(x, label) for x, label, _ in share[::step]],
        measure="share who left",
    )


def short_time(text: str | None) -> str:
    if not text:
        return "-"
    return datetime.fromisoformat(text).astimezone(UTC).strftime("%m-%d %H:%M")


# --- Downloads of the report's files ------------------------------------------------------------


@bp.get("/model/report.pdf")
def report_pdf() -> Response:
    """The PDF report (the twin of GET /report), for a browser holding the session cookie."""
    return send_output(settings().report_path, "application/pdf", "no report yet")


@bp.get("/model/confusionmatrix.png")
def confusion_matrix_png() -> Response:
    """The confusion matrix the latest report drew on the test data."""
    return send_output(
        settings().confusion_matrix_path, "image/png", "no confusion matrix yet", download=False
    )


# --- Template filters ---------------------------------------------------------------------------


@bp.app_template_filter("percent")
def percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


@bp.app_template_filter("decimal")
def decimal(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


@bp.app_template_filter("utc")
def utc(text: str | None) -> str:
    """A recorded ISO-8601 time as a person reads it: 2026-11-26 02:51 UTC."""
    if not text:
        return "-"
    try:
        return datetime.fromisoformat(text).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return text


@bp.app_template_filter("number")
def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


