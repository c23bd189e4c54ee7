"""apicalls.py against the real app, served in a thread on 127.0.0.1, and against no server."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator

import pytest
from werkzeug.serving import make_server

import apicalls
import atomicio
import diagnostics
from app import create_app
from apicalls import ApiCallFailed, ApiUnreachable, main, resolve_base_url
from conftest import TEST_ROWS, serving
from errors import ConfigError, run_cli

TOKEN = "test-token-81d0"
PDF_STAND_IN = b"%PDF-1.7 stand-in for the report"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv("RISK_API_TOKEN", raising=False)
    monkeypatch.delenv(apicalls.API_URL_ENV_VAR, raising=False)


@pytest.fixture
def reported(deployed):
    """A deployed workspace with recorded diagnostics, a risk list and a report to serve."""
    diagnostics.run_diagnostics(deployed, dependencies=False)
    atomicio.write_text(
        deployed.risk_scores_path, "rank,corporation,probability\n1,abcdef,0.91\n2,ghijkl,0.52\n"
    )
    atomicio.write_bytes(deployed.report_path, PDF_STAND_IN)
    return deployed


@contextlib.contextmanager
def serve(settings) -> Iterator[str]:
    """Serve the app on a free 127.0.0.1 port in a thread, giving its base URL; stop it after."""
    with serving(make_server("127.0.0.1", 0, create_app(settings), threaded=True)) as url:
        yield url


@pytest.fixture
def api_url(reported):
    with serve(reported) as url:
        yield url


@pytest.fixture
def unreachable_url():
    """An address where nothing listens: the port is held, so no other test can take it."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


def run(settings, url, *flags):
    return main(["--config", str(settings.config_path), "--url", url, *flags])


def sections(settings) -> dict[str, str]:
    """apireturns.txt split into its sections, keyed by 'METHOD /path'."""
    parts = settings.api_returns_path.read_text().split("\n== ")[1:]
    return {" ".join(part.split()[:2]): part for part in parts}


def test_every_endpoint_answer_is_saved(reported, api_url):
    assert run(reported, api_url) == 0

    saved = sections(reported)
    assert list(saved) == [call.name for call in apicalls.endpoint_calls(reported)]
    assert all("\n200 OK" in section for section in saved.values())


def test_saved_prediction_names_the_test_file_and_holds_every_row(reported, api_url):
    run(reported, api_url)

    section = sections(reported)["POST /prediction"]
    header, status, body = section.split("\n", 2)
    assert header.endswith('{"filepath": "testdata/testdata.csv"}')
    assert len(json.loads(body)["predictions"]) == TEST_ROWS


def test_report_is_noted_by_size_and_type_not_dumped(reported, api_url):
    run(reported, api_url)

    section = sections(reported)["GET /report"]
    assert f"application/pdf, {len(PDF_STAND_IN)} bytes" in section
    assert "%PDF" not in section


def test_failed_endpoint_is_named_and_the_exit_code_is_2(reported, api_url, capsys):
    reported.report_path.unlink()

    assert run_cli(main, ["--config", str(reported.config_path), "--url", api_url]) == 2

    error = capsys.readouterr().err
    assert "GET /report answered 503" in error
    assert "reporting.py" in error
    assert "\n503 " in sections(reported)["GET /report"]


def test_unreachable_api_is_named_and_nothing_is_saved(reported, unreachable_url):
    with pytest.raises(ApiUnreachable, match=f"cannot reach {unreachable_url}/health: is the API"):
        run(reported, unreachable_url)

    assert not reported.api_returns_path.exists()


def test_token_from_the_environment_is_sent(reported, monkeypatch):
    monkeypatch.setenv("RISK_API_TOKEN", TOKEN)
    with serve(reported) as url:
        assert run(reported, url) == 0


def test_token_from_the_token_file_is_sent(reported):
    (reported.base_dir / "api-token").write_text(TOKEN)
    (reported.base_dir / "api-token").chmod(0o600)
    settings = reported._replace(api=reported.api._replace(token_file="api-token"))

    token = apicalls.token_from_environment(settings)
    with serve(settings) as url:
        answers = apicalls.call_endpoints(settings, url, token=token)

    assert token == TOKEN
    assert [answer.call.name for answer in answers.failures] == []
    assert len(answers.returns) == len(apicalls.endpoint_calls(settings))


def test_missing_token_fails_on_each_protected_endpoint(reported, monkeypatch):
    monkeypatch.setenv("RISK_API_TOKEN", TOKEN)
    with serve(reported) as url:
        monkeypatch.delenv("RISK_API_TOKEN")
        with pytest.raises(ApiCallFailed, match="GET /ready answered 401") as failure:
            run(reported, url)

    assert "GET /health answered" not in str(failure.value)


@pytest.mark.parametrize(
    ("flag", "env", "config", "expected"),
    [
        ("http://flag:1/", "http://env:2", "http://config:3", "http://flag:1"),
        (None, "http://env:2", "http://config:3", "http://env:2"),
        (None, None, "http://config:3/", "http://config:3"),
    ],
)
def test_base_url_comes_from_flag_then_environment_then_config(
    deployed, monkeypatch, flag, env, config, expected
):
    if env:
        monkeypatch.setenv(apicalls.API_URL_ENV_VAR, env)
    settings = deployed._replace(api=deployed.api._replace(base_url=config))

    assert resolve_base_url(settings, flag) == expected


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://127.0.0.1", "http://"])
def test_base_url_without_scheme_and_host_is_a_config_error(deployed, url):
    with pytest.raises(ConfigError, match="must look like http://HOST:PORT"):
        resolve_base_url(deployed, url)


def test_test_data_outside_the_project_is_sent_as_csv(deployed, tmp_path):
    outside = tmp_path / "elsewhere" / "tests.csv"
    outside.parent.mkdir()
    outside.write_bytes(deployed.test_data_files()[0].read_bytes())
    settings = deployed._replace(test_data_path=outside)

    call = apicalls.prediction_call(settings)

    assert (call.json_body, call.headers) == (None, {"Content-Type": "text/csv"})
    assert call.data == outside.read_bytes()
