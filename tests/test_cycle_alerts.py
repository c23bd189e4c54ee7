"""The cycle tells its owner: each event sends one alert, repeats stay quiet, a broken receiver
never fails a cycle, and the API check says when the server serves another release (issues 13, 15)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import alerts
import fullprocess
import generate_data
import records
from conftest import serving, write_config
from settings import load_settings

FAST = {"timeout_seconds": 0.5, "attempts": 2, "backoff_seconds": 0.01, "budget_seconds": 5.0}


@pytest.fixture(autouse=True)
def quiet_environment(monkeypatch):
    monkeypatch.delenv(alerts.WEBHOOK_ENV_VAR, raising=False)
    monkeypatch.delenv(alerts.COMMAND_ENV_VAR, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")


def configure(deployed, webhook_url, api_url="http://127.0.0.1:9"):
    config = json.loads(deployed.config_path.read_text())
    config.update(api={"base_url": api_url}, alerts={"webhook_url": webhook_url, **FAST})
    write_config(deployed.base_dir, **config)
    return load_settings(deployed.config_path)


def cycle(settings, *flags):
    assert fullprocess.main(["--config", str(settings.config_path), *flags]) == 0
    return records.query(settings.records_path, "SELECT * FROM cycles ORDER BY id DESC LIMIT 1")[0]


def events(receiver):
    return [alert["event"] for alert in receiver.received]


def test_a_drift_and_its_release_send_one_alert_each(deployed, receiver):
    settings = configure(deployed, receiver.url)
    generate_data.write_csv(
        generate_data.make_clients(2000, seed=81, relation=generate_data.OUTGROWN, id_offset=810_000),
        settings.input_folder / "changed.csv",
    )

    assert cycle(settings)["decision"] == "drift-redeployed"

    assert events(receiver) == [alerts.DRIFT, alerts.DEPLOYED]
    drift = receiver.received[0]
    assert "changed.csv" in drift["text"] and drift["fields"]["new_f1"] < drift["fields"]["deployed_f1"]


def test_a_rejected_file_is_told_once_however_many_cycles_see_it(deployed, receiver):
    settings = configure(deployed, receiver.url)
    (settings.input_folder / "broken.csv").write_text("not,a,dataset\n1,2,3\n")

    cycle(settings)
    cycle(settings)

    assert events(receiver) == [alerts.FILE_REJECTED]
    assert "broken.csv" in receiver.received[0]["text"]


def test_a_receiver_that_is_down_never_fails_the_cycle(deployed):
    settings = configure(deployed, "http://127.0.0.1:9/hook")
    (settings.input_folder / "broken.csv").write_text("not,a,dataset\n1,2,3\n")

    assert cycle(settings)["outcome"] == "ok"

    sent = records.query(settings.records_path, "SELECT status, error FROM alerts")
    assert [row["status"] for row in sent] == ["failed"]


def test_a_failed_cycle_is_told(deployed, receiver, monkeypatch):
    settings = configure(deployed, receiver.url)
    generate_data.write_csv(generate_data.make_clients(300, seed=82, id_offset=820_000),
                            settings.input_folder / "fresh.csv")

    def broken_drift_check(settings):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(fullprocess, "check_drift", broken_drift_check)

    with pytest.raises(RuntimeError):
        fullprocess.main(["--config", str(settings.config_path)])

    assert events(receiver) == [alerts.CYCLE_FAILED]
    assert "the disk went away" in receiver.received[0]["text"]


@pytest.fixture
def other_workspaces_api():
    """An API on 127.0.0.1 that answers every endpoint for a release of another workspace."""
    answer = json.dumps({"status": "ready", "model_version": "20200101T000000.000Z-other"}).encode()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url


def test_a_server_of_another_workspace_is_reported_not_taken_for_success(
    deployed, receiver, other_workspaces_api, capsys
):
    settings = configure(deployed, receiver.url, api_url=other_workspaces_api)

    record = cycle(settings, "--force")

    assert record["outcome"] == "ok, with warnings"
    warning = json.loads(record["details"])["warnings"][0]
    assert f"the server at {other_workspaces_api} serves release 20200101T000000.000Z-other" in warning
    assert "restart it or check api.base_url" in warning
    assert "1 warning(s)" in capsys.readouterr().out
    assert alerts.API_CHECK_FAILED in events(receiver)
