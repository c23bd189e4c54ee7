"""Alerts: each event reaches a webhook on 127.0.0.1 exactly once; repeats are suppressed; a
receiver that is down, slow or failing is recorded and never fails the caller."""

from __future__ import annotations

import json
import logging
import shlex
import socket
import sqlite3
import sys
from datetime import UTC, datetime, timedelta

import pytest
from conftest import write_config

import alerts
import records
from errors import ConfigError, DataError, run_cli
from ingestion import FileOutcome
from settings import AlertSettings, load_settings

# Small limits keep the suite fast; the behaviour is the same at the defaults.
FAST = {"timeout_seconds": 0.2, "attempts": 3, "backoff_seconds": 0.01, "budget_seconds": 10.0}
NOON = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def no_channels_from_the_environment(monkeypatch):
    """A developer's own webhook must never receive the tests' alerts."""
    monkeypatch.delenv(alerts.WEBHOOK_ENV_VAR, raising=False)
    monkeypatch.delenv(alerts.COMMAND_ENV_VAR, raising=False)


@pytest.fixture
def settings(workspace, receiver):
    return workspace._replace(alerts=AlertSettings(webhook_url=receiver.url, **FAST))


def recorded(settings) -> list[dict]:
    return records.query(settings.records_path, "SELECT * FROM alerts ORDER BY id")


def one_alert_of_each_kind(settings) -> dict[str, alerts.Alert]:
    rejected = FileOutcome("batch3.csv", "c3", "rejected")
    rejected.reason = "missing required column exited"
    mostly_bad = {"file": "batch4.csv", "checksum": "c4", "status": "ingested", "rows_read": 100,
                  "quarantined": 40, "reason": None}
    rejected_alert, quarantine_alert = alerts.quarantine_alerts(settings, [rejected, mostly_bad])
    return {
        alerts.DRIFT: alerts.drift_found("0003", "batch5.csv", 0.698, 0.332, 0.05),
        alerts.DEPLOYED: alerts.release_deployed("0004", "0003", 0.81),
        alerts.RETRAIN_REFUSED: alerts.retrain_refused(
            "0003", 0.61, 0.70, "the held-out new rows", candidate="20240501T1200"
        ),
        alerts.CYCLE_FAILED: alerts.cycle_failed(DataError("finaldata.csv cannot be read")),
        alerts.FILE_REJECTED: rejected_alert,
        alerts.QUARANTINE_SHARE: quarantine_alert,
        alerts.API_CHECK_FAILED: alerts.api_check_failed(
            "http://127.0.0.1:8000", "POST /prediction answered 500", ["POST /prediction"]
        ),
        alerts.OUTPUTS_OUT_OF_STEP: alerts.outputs_out_of_step(
            "0004", {"report.pdf": "0003", "riskscores.csv": None}
        ),
        alerts.ESTIMATED_DROP: alerts.estimated_drop(
            "0004", "roster.csv", 0.70, 0.58, 0.06, ["number_of_employees"]
        ),
    }


# ---------------------------------------------------------------------------------------------
# Each event: one POST with the text and the fields.


def test_there_is_an_example_of_every_event(settings):
    assert set(one_alert_of_each_kind(settings)) == set(alerts.EVENTS)


@pytest.mark.parametrize("event", alerts.EVENTS)
def test_each_event_sends_exactly_one_post_with_text_and_fields(settings, receiver, event):
    alert = one_alert_of_each_kind(settings)[event]

    deliveries = alerts.notify(settings, [alert], now=NOON)

    assert [d.status for d in deliveries] == ["sent"]
    assert receiver.received == [{
        "text": alert.text, "event": event, "fields": json.loads(json.dumps(alert.fields)),
        "key": alert.key, "time": "2024-05-01T12:00:00+00:00",
    }]
    assert receiver.content_types[0].startswith("application/json")
    assert alert.text.startswith("Risk model: ") and "\n" not in alert.text
    [row] = recorded(settings)
    assert (row["event"], row["status"], row["attempts"], row["channel"]) == (
        event, "sent", 1, "webhook")
    assert json.loads(row["payload"])["text"] == alert.text


def test_drift_alert_reads_as_one_line_with_the_numbers():
    alert = alerts.drift_found("0003", ["batch5.csv"], 0.698, 0.332, 0.05)

    assert alert.text == (
        "Risk model: drift found on batch5.csv (release 0003) — F1 fell from 0.698 to 0.332 "
        "(allowed drop 0.050); retraining"
    )
    assert alert.key == "drift:0003"
    assert alert.fields["new_f1"] == 0.332


def test_a_multi_line_error_becomes_one_line_of_text():
    alert = alerts.cycle_failed(RuntimeError("first line\nsecond line"))

    assert alert.text == (
        "Risk model: the cycle failed — first line second line; see the cycle log for what was "
        "done before it failed"
    )
    assert alert.fields["error_type"] == "RuntimeError"


# ---------------------------------------------------------------------------------------------
# Which files call for an alert.


def test_a_rejected_file_and_a_file_past_the_quarantine_share_raise_alerts(settings):
    rejected = FileOutcome("bad.csv", "c1", "rejected")
    rejected.reason = "the file is empty"
    too_many = FileOutcome("noisy.csv", "c2", "ingested")
    too_many.rows_read, too_many.quarantined = 50, 6  # 12% > 10%
    at_the_limit = FileOutcome("fine.csv", "c3", "ingested")
    at_the_limit.rows_read, at_the_limit.quarantined = 50, 5  # 10% is not more than 10%

    found = alerts.quarantine_alerts(settings, [rejected, too_many, at_the_limit])

    assert [(a.event, a.key) for a in found] == [
        ("file-rejected", "file-rejected:c1"), ("quarantine-share", "quarantine-share:c2")
    ]
    assert found[0].text == (
        "Risk model: data file bad.csv rejected — the file is empty; none of its rows were used "
        "(a corrected file is read again)"
    )
    assert "6 of 50 rows of noisy.csv quarantined (12%, more than the allowed 10%)" in found[1].text
    assert str(settings.quarantine_path) in found[1].text


def test_files_without_quarantined_rows_raise_no_alert(settings):
    clean = {"file": "a.csv", "checksum": "c", "status": "ingested", "rows_read": 10,
             "quarantined": 0}

    assert alerts.quarantine_alerts(settings, [clean]) == []


# ---------------------------------------------------------------------------------------------
# Repeats.


def test_the_same_alert_twice_is_sent_once(settings, receiver):
    alert = alerts.api_check_failed("http://127.0.0.1:8000", "not reachable")

    first = alerts.notify(settings, [alert], now=NOON)
    second = alerts.notify(settings, [alert], now=NOON + timedelta(minutes=10))

    assert [d.status for d in first + second] == ["sent", "suppressed"]
    assert len(receiver.received) == 1
    assert [row["status"] for row in recorded(settings)] == ["sent"]


def test_a_condition_still_true_after_repeat_after_hours_is_sent_again(settings, receiver):
    alert = alerts.api_check_failed("http://127.0.0.1:8000", "not reachable")
    day = timedelta(hours=settings.alerts.repeat_after_hours)

    alerts.notify(settings, [alert], now=NOON)
    alerts.notify(settings, [alert], now=NOON + day - timedelta(minutes=10))
    alerts.notify(settings, [alert], now=NOON + day)

    assert len(receiver.received) == 2
    assert [row["time"] for row in recorded(settings)] == [
        "2024-05-01T12:00:00+00:00", "2024-05-02T12:00:00+00:00"
    ]


def test_a_different_condition_is_not_suppressed(settings, receiver):
    alerts.notify(settings, [alerts.file_rejected("a.csv", "c1", "empty")], now=NOON)
    alerts.notify(settings, [alerts.file_rejected("b.csv", "c2", "empty")], now=NOON)

    assert [body["fields"]["file"] for body in receiver.received] == ["a.csv", "b.csv"]


def test_a_failed_delivery_is_tried_again_next_time(settings, receiver):
    alert = alerts.release_deployed("0004", "0003", 0.8)
    receiver.status = 503

    alerts.notify(settings, [alert], now=NOON)
    receiver.status = 200
    again = alerts.notify(settings, [alert], now=NOON + timedelta(minutes=10))

    assert [d.status for d in again] == ["sent"]
    assert [row["status"] for row in recorded(settings)] == ["failed", "sent"]


# ---------------------------------------------------------------------------------------------
# A receiver that fails, is down or is slow.


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_failing_receiver_is_retried_then_recorded_failed(settings, receiver, status):
    receiver.status = status

    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")])

    assert len(receiver.received) == settings.alerts.attempts
    assert (delivery.status, delivery.attempts) == ("failed", 3)
    [row] = recorded(settings)
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert f"answered {status}" in row["error"]


def test_a_refusing_receiver_is_not_retried_and_its_answer_is_kept(settings, receiver):
    receiver.status, receiver.answer = 404, b"no_service"

    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")])

    assert len(receiver.received) == 1
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert "404" in delivery.error and "no_service" in delivery.error


@pytest.fixture
def closed_port_url():
    """An address where nothing listens: the port is held, so no other test can take it."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}/hooks/risk"


def test_a_receiver_that_is_down_is_recorded_failed_and_logged(
    workspace, closed_port_url, caplog
):
    settings = workspace._replace(alerts=AlertSettings(webhook_url=closed_port_url, **FAST))

    with caplog.at_level(logging.WARNING, logger="alerts"):
        [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")])

    assert (delivery.status, delivery.attempts) == ("failed", 3)
    assert "cannot reach the webhook" in delivery.error
    assert recorded(settings)[0]["status"] == "failed"
    assert "not delivered" in caplog.text


def test_a_slow_receiver_is_abandoned_after_the_attempts(settings, receiver):
    receiver.slow = True

    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")])

    assert (delivery.status, delivery.attempts) == ("failed", 3)
    assert "no answer within" in delivery.error
    assert recorded(settings)[0]["attempts"] == 3


def test_retries_stop_when_the_cycles_alert_budget_runs_out(settings, receiver):
    receiver.slow = True

    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")], budget_seconds=0.3)

    assert delivery.status == "failed"
    assert 1 <= delivery.attempts < settings.alerts.attempts
    assert "ran out" in delivery.error


def test_an_alert_left_without_budget_is_recorded_as_not_tried(settings, receiver):
    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")], budget_seconds=0)

    assert receiver.received == []
    assert (delivery.status, delivery.attempts) == ("failed", 0)
    assert recorded(settings)[0]["error"].startswith("not tried")


def test_an_unwritable_records_database_does_not_stop_the_alert(settings, receiver, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    settings = settings._replace(output_folder=blocked)

    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")])

    assert delivery.status == "sent"
    assert len(receiver.received) == 1


# ---------------------------------------------------------------------------------------------
# Channels: environment, command, none.


def test_the_environment_overrides_the_configured_webhook(workspace, receiver, monkeypatch):
    monkeypatch.setenv(alerts.WEBHOOK_ENV_VAR, receiver.url)
    settings = workspace._replace(alerts=AlertSettings(**FAST))

    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")])

    assert delivery.status == "sent"
    assert len(receiver.received) == 1


def test_a_webhook_from_the_environment_that_is_not_http_is_recorded_not_opened(
    workspace, monkeypatch, tmp_path
):
    monkeypatch.setenv(alerts.WEBHOOK_ENV_VAR, f"file://{tmp_path}/secret")
    settings = workspace._replace(alerts=AlertSettings(**FAST))

    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")])

    assert (delivery.status, delivery.attempts) == ("failed", 0)
    assert f"${alerts.WEBHOOK_ENV_VAR} must start with http" in delivery.error


def test_with_no_channel_nothing_is_sent_or_recorded(workspace):
    assert alerts.notify(workspace, [alerts.release_deployed("0004")]) == []
    assert not workspace.records_path.exists()


def mail_program(*body: str) -> str:
    return shlex.join([sys.executable, "-c", "; ".join(("import os, sys", *body))])


def test_the_command_gets_the_alert_on_stdin_and_its_exit_code_is_recorded(workspace, tmp_path):
    mailbox = tmp_path / "mailbox.json"
    command = mail_program(
        "import json, pathlib",
        f"pathlib.Path({str(mailbox)!r}).write_text(json.dumps("
        "{'stdin': sys.stdin.read(), 'subject': os.environ['RISK_ALERT_TEXT']}))",
    )
    settings = workspace._replace(alerts=AlertSettings(command=command, **FAST))
    alert = alerts.release_deployed("0004", "0003", 0.8)

    [delivery] = alerts.notify(settings, [alert])

    mail = json.loads(mailbox.read_text())
    assert json.loads(mail["stdin"])["text"] == mail["subject"] == alert.text
    assert (delivery.channel, delivery.status, delivery.exit_code) == ("command", "sent", 0)
    assert (recorded(settings)[0]["channel"], recorded(settings)[0]["exit_code"]) == ("command", 0)


def test_a_failing_command_records_its_exit_code_and_first_stderr_line(workspace):
    command = mail_program("sys.stderr.write('mail: no route to host\\nmore\\n')", "sys.exit(3)")
    settings = workspace._replace(alerts=AlertSettings(command=command, **FAST))

    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")])

    [row] = recorded(settings)
    assert (row["status"], row["attempts"], row["exit_code"]) == ("failed", 3, 3)
    assert row["error"].endswith("exited with 3: mail: no route to host")
    assert delivery.exit_code == 3


def test_a_command_that_does_not_exist_is_not_retried(workspace, tmp_path):
    settings = workspace._replace(
        alerts=AlertSettings(command=str(tmp_path / "no-such-mailer"), **FAST)
    )

    [delivery] = alerts.notify(settings, [alerts.release_deployed("0004")])

    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert "cannot run" in delivery.error


def test_with_both_channels_each_alert_goes_to_both(workspace, receiver, tmp_path):
    mailbox = tmp_path / "mailbox.json"
    command = mail_program(f"open({str(mailbox)!r}, 'w').write(sys.stdin.read())")
    settings = workspace._replace(
        alerts=AlertSettings(webhook_url=receiver.url, command=command, **FAST)
    )

    deliveries = alerts.notify(settings, [alerts.release_deployed("0004")])

    assert [(d.channel, d.status) for d in deliveries] == [("webhook", "sent"), ("command", "sent")]
    assert json.loads(mailbox.read_text())["key"] == receiver.received[0]["key"]


# ---------------------------------------------------------------------------------------------
# The records database and the command line.


def test_a_database_of_the_previous_version_gains_the_alerts_table(settings, receiver):
    settings.records_path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(settings.records_path)
    for table, statement in records.SCHEMA.items():
        if table != "alerts":
            connection.execute(statement)
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()

    alerts.notify(settings, [alerts.release_deployed("0004")])

    assert [row["status"] for row in recorded(settings)] == ["sent"]


def test_the_command_line_sends_a_test_alert(workspace, receiver, capsys):
    config_path = write_config(workspace.base_dir, alerts={"webhook_url": receiver.url})

    assert alerts.main(["--config", str(config_path)]) == 0

    assert receiver.received[0]["event"] == "test"
    assert capsys.readouterr().out.startswith("webhook: sent")


def test_the_command_line_without_a_channel_says_how_to_configure_one(workspace, capsys):
    exit_code = run_cli(alerts.main, ["--config", str(workspace.config_path)])

    assert exit_code == 2
    assert "alerts.webhook_url" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Configuration.


def test_alert_settings_are_read_from_config_with_defaults(workspace):
    config_path = write_config(
        workspace.base_dir,
        alerts={"webhook_url": "https://hooks.example.org/T0/B0/x", "quarantine_share": 0.25},
    )

    settings = load_settings(config_path)

    assert settings.alerts.webhook_url == "https://hooks.example.org/T0/B0/x"
    assert settings.alerts.quarantine_share == 0.25
    assert settings.alerts.attempts == AlertSettings().attempts


@pytest.mark.parametrize(
    ("section", "expected_words"),
    [
        ({"webhook_url": "hooks.example.org/T0/B0/secret"}, "alerts.webhook_url"),
        ({"webhook_url": "ftp://hooks.example.org/x"}, "alerts.webhook_url"),
        ({"webhook_url": "https://hooks.example.org:port/x"}, "alerts.webhook_url"),
        ({"command": "mail -s 'unclosed"}, "alerts.command"),
        ({"quarantine_share": 1.5}, "alerts.quarantine_share"),
        ({"quarantine_share": -0.1}, "alerts.quarantine_share"),
        ({"timeout_seconds": 0}, "alerts.timeout_seconds"),
        ({"budget_seconds": -1}, "alerts.budget_seconds"),
        ({"attempts": 0}, "alerts.attempts"),
        ({"attempts": 2.5}, "alerts.attempts"),
        ({"backoff_seconds": -0.5}, "alerts.backoff_seconds"),
        ({"repeat_after_hours": -1}, "alerts.repeat_after_hours"),
        ({"webhook": "https://hooks.example.org/x"}, "webhook"),
    ],
)
def test_bad_alert_settings_are_a_clear_config_error(workspace, section, expected_words):
    config_path = write_config(workspace.base_dir, alerts=section)

    with pytest.raises(ConfigError, match=expected_words) as raised:
        load_settings(config_path)
    assert "secret" not in str(raised.value)  # a webhook's address is its password
