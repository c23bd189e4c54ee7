"""Shared fixtures: complete workspaces in tmp_path, built from the project's own data generator.

No test touches the shipped folders. Building and deploying a model takes a few seconds, so one
deployed workspace is built per session and each test gets its own copy of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from html import unescape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

import generate_data
from settings import Settings, load_settings

PROJECT_DIR = Path(__file__).resolve().parent.parent

SOURCE_ROWS = 600
TEST_ROWS = 400


def write_config(root: Path, **overrides) -> Path:
    """A config.json in `root` in the original format, plus any optional sections given.

    Tests write a source file and ingest it at once, so no file is left to settle.
    """
    config = {
        "input_folder_path": "sourcedata",
        "output_folder_path": "ingesteddata",
        "test_data_path": "testdata",
        "output_model_path": "models",
        "prod_deployment_path": "production_deployment",
        "ingestion": {"settle_seconds": 0},
        **overrides,
    }
    path = root / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def build_workspace(root: Path) -> Path:
    """Source data (two files), test data and a config; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    generate_data.write_csv(
        generate_data.make_clients(SOURCE_ROWS, seed=11, id_offset=0),
        root / "sourcedata" / "batch1.csv",
    )
    generate_data.write_csv(
        generate_data.make_clients(SOURCE_ROWS, seed=12, id_offset=100_000),
        root / "sourcedata" / "batch2.csv",
    )
    generate_data.write_csv(
        generate_data.make_clients(TEST_ROWS, seed=13, id_offset=200_000),
        root / "testdata" / "testdata.csv",
    )
    return write_config(root)


def deploy_workspace(settings: Settings) -> None:
    """Run the pipeline core in-process: ingest, train, score, deploy."""
    from deployment import deploy
    from ingestion import ingest
    from scoring import score
    from training import train

    ingest(settings)
    train(settings)
    score(settings)
    deploy(settings)


def as_older_release(settings: Settings) -> None:
    """Make the current release look like one deployed before releases held model.json."""
    import atomicio
    from deployment import RELEASE_MANIFEST_NAME, current_release

    release = current_release(settings)
    (release.folder / "model.json").unlink()
    manifest = atomicio.read_json(release.folder / RELEASE_MANIFEST_NAME)
    del manifest["files"]["model.json"]
    atomicio.write_json(release.folder / RELEASE_MANIFEST_NAME, manifest)


@pytest.fixture(autouse=True)
def records_closed_after_each_test() -> Iterator[None]:
    """A test leaves no records connection open for the next: each begins as a new process would."""
    import records

    yield
    records.close_connections()


@pytest.fixture(autouse=True)
def package_index_not_asked(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Diagnostics never start pip processes in tests: each costs a second of CPU, and tests must
    not reach a package index. Tests of the dependency check install their own answers; a test
    marked `runs_pip` runs the real thing (against an index nobody listens on)."""
    import diagnostics

    if request.node.get_closest_marker("runs_pip"):
        return

    def not_asked(name: str, timeout: float) -> dict:
        return {"latest": None, "error": "the package index is not asked in tests",
                "checked_at": "2026-01-01T00:00:00+00:00"}

    monkeypatch.setattr(diagnostics, "ask_index", not_asked)


@pytest.fixture
def make_client():
    """A test client of the app built for the given settings, as flaskr's `app.test_client()`."""
    from app import create_app

    def make(settings: Settings):
        app = create_app(settings)
        app.testing = True
        return app.test_client()
    return make


@pytest.fixture
def workspace(tmp_path: Path) -> Settings:
    """A fresh workspace with source and test data, nothing ingested yet."""
    return load_settings(build_workspace(tmp_path / "workspace"))


@pytest.fixture(scope="session")
def _deployed_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "workspace"
    deploy_workspace(load_settings(build_workspace(root)))
    return root


@pytest.fixture
def deployed(_deployed_template: Path, tmp_path: Path) -> Settings:
    """A workspace whose data is ingested and whose model is trained, scored and deployed."""
    root = tmp_path / "workspace"
    shutil.copytree(_deployed_template, root)
    return load_settings(root / "config.json")


@pytest.fixture(scope="session")
def _reported_template(_deployed_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import diagnostics
    import records
    from reporting import build_report

    def offline_index(name: str, timeout: float) -> dict:
        return {"latest": None, "error": "offline in tests", "checked_at": records.utc_now()}

    root = tmp_path_factory.mktemp("reported") / "workspace"
    shutil.copytree(_deployed_template, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diagnostics, "ask_index", offline_index)
        build_report(load_settings(root / "config.json"))
    return root


@pytest.fixture
def reported(_reported_template: Path, tmp_path: Path) -> Settings:
    """A deployed workspace whose diagnostics, report and risk list describe the deployed release,
    as the first cycle leaves it."""
    root = tmp_path / "workspace"
    shutil.copytree(_reported_template, root)
    return load_settings(root / "config.json")


def workspace_state(settings: Settings) -> tuple[dict[Path, bytes], dict[str, int]]:
    """Every file of a workspace with its bytes (the records database aside), and the number of
    records in each table: what a request that only reads must leave as it found it."""
    import records

    files = {
        path: path.read_bytes() for path in settings.base_dir.rglob("*")
        if path.is_file() and not path.name.startswith(settings.records_path.name)
    }
    counts = {
        table: len(records.query(settings.records_path, f"SELECT id FROM {table}"))
        for table in records.SCHEMA
    }
    return files, counts


def text_of(response) -> str:
    """The page's visible text, with tags dropped and spaces collapsed, for reading assertions."""
    text = re.sub(r"<[^>]+>", " ", response.get_data(as_text=True))
    return re.sub(r"\s+", " ", unescape(text))


def assert_refused(response, status: int, *messages: str) -> None:
    """The request was refused with `status`, and what it says names each of `messages`: the
    `error` of the API's JSON, or the visible text of a page."""
    assert response.status_code == status
    said = response.json["error"] if response.is_json else text_of(response)
    for message in messages:
        assert message in said


class Receiver:
    """A webhook on 127.0.0.1: keeps what it is sent, answers with `status`, or stalls if `slow`."""

    def __init__(self) -> None:
        self.url = ""
        self.status = 200
        self.answer = b"ok"
        self.slow = False
        self.received: list[dict] = []
        self.content_types: list[str] = []
        self.released = threading.Event()


@pytest.fixture
def receiver():
    """A webhook receiver on 127.0.0.1, stopped at the end of the test."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append(json.loads(body))
            state.content_types.append(self.headers["Content-Type"])
            if state.slow:
                state.released.wait(10)  # until teardown; the sender has given up long before
                return
            self.send_response(state.status)
            self.send_header("Content-Length", str(len(state.answer)))
            self.end_headers()
            self.wfile.write(state.answer)

        def log_message(self, *args) -> None:
            pass

    try:
        with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
            state.url = f"{url}/hooks/risk"
            yield state
    finally:
        state.released.set()


@contextlib.contextmanager
def serving(server: Any) -> Iterator[str]:
    """Run an HTTP server bound to 127.0.0.1 in a thread; give its base URL; stop it after."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


# What a server a test starts never inherits from whoever runs the tests: their API token, and a
# metrics folder that belongs to another server.
NOT_INHERITED = ("RISK_API_TOKEN", "PROMETHEUS_MULTIPROC_DIR")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_environment(
    set_env: Mapping[str, str] | None = None, drop_env: Iterable[str] = ()
) -> dict[str, str]:
    """This process's environment for a server, without NOT_INHERITED and `drop_env`, with `set_env`
    added."""
    dropped = {*NOT_INHERITED, *drop_env}
    env = {name: value for name, value in os.environ.items() if name not in dropped}
    env.update(set_env or {})
    return env


def wait_until_healthy(base_url: str, server: subprocess.Popen, log_path: Path) -> None:
    """Poll /health until the server answers; fail at once if it exits, or after ~60 s."""
    for _ in range(600):
        try:
            if requests.get(f"{base_url}/health", timeout=5).ok:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or its workers are still importing
        try:
            server.wait(timeout=0.1)  # the pause between polls, and it notices a crashed server
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"gunicorn exited with {server.returncode}:\n{log_path.read_text()}")
    pytest.fail(f"gunicorn did not answer /health:\n{log_path.read_text()}")


@contextlib.contextmanager
def running_gunicorn(
    settings: Settings,
    log_path: Path,
    workers: int = 2,
    *,
    set_env: Mapping[str, str] | None = None,
    drop_env: Iterable[str] = (),
) -> Iterator[str]:
    """`gunicorn wsgi:app` for a workspace on a free 127.0.0.1 port; its base URL; stopped after.

    It runs in the project folder, as in production, so that it reads the project's own gunicorn
    settings; its environment is `server_environment(set_env, drop_env)`, with $RISK_CONFIG naming
    the workspace's config.
    """
    port = free_port()
    env = server_environment(
        {"RISK_CONFIG": str(settings.config_path), **(set_env or {})}, drop_env
    )
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers",
             str(workers), "wsgi:app"],
            cwd=PROJECT_DIR, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, server, log_path)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
