"""Alerts: tell a person when the pipeline needs one, without ever holding up the cycle.

An alert goes to an incoming webhook as a JSON POST (a `text` line that Slack, Teams and Mattermost
show as is, plus structured fields) and/or to a command, which gets the same JSON on its stdin (a
mail script, say). Each delivery is time-limited, retried with backoff while the cycle's alert
budget lasts, and recorded in the records database, table `alerts`: sent or failed, how many
attempts, why. An alert whose key was sent within `alerts.repeat_after_hours` is suppressed, so a
condition that stays true is not announced every ten minutes; one that failed is tried again the
next time it is raised.

    found = alerts.quarantine_alerts(settings, report.files)
    found.append(alerts.release_deployed(release.version, previous.version, f1))
    alerts.notify(settings, found)          # never raises

    python alerts.py [--config PATH]        # send a test alert through the configured channels

Importing this module is cheap, since the cron cycle imports it: urllib.request, subprocess and
shlex are loaded only when there is something to deliver.
"""

# No `from __future__ import annotations`, for the reason settings.py gives: NamedTuple fields.

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import records
from errors import ConfigError, run_cli
from settings import AlertSettings, Settings, add_config_argument, is_http_url, load_settings

log = logging.getLogger(__name__)

# The environment overrides config.json for the channels, so that a webhook's address, which is
# its password, need not be written into a file.
WEBHOOK_ENV_VAR = "RISK_ALERT_WEBHOOK"
COMMAND_ENV_VAR = "RISK_ALERT_COMMAND"

# Event kinds: the `event` of an alert, and the first word of its key.
DRIFT = "drift"
DEPLOYED = "deployed"
RETRAIN_REFUSED = "retrain-refused"
CYCLE_FAILED = "cycle-failed"
FILE_REJECTED = "file-rejected"
QUARANTINE_SHARE = "quarantine-share"
API_CHECK_FAILED = "api-check-failed"
OUTPUTS_OUT_OF_STEP = "outputs-out-of-step"
ESTIMATED_DROP = "estimated-drop"
EVENTS = (
    DRIFT, DEPLOYED, RETRAIN_REFUSED, CYCLE_FAILED, FILE_REJECTED, QUARANTINE_SHARE,
    API_CHECK_FAILED, OUTPUTS_OUT_OF_STEP, ESTIMATED_DROP,
)

# Delivery statuses. Only `sent` and `failed` are recorded: a suppressed repeat is not news.
SENT = "sent"
FAILED = "failed"
SUPPRESSED = "suppressed"

TEXT_PREFIX = "Risk model: "
MAX_TEXT = 500  # a chat shows this much on one line; the fields carry the rest
MAX_ERROR = 300
MAX_ANSWER_BYTES = 2000
USER_AGENT = "risk-model-alerts"


class Alert(NamedTuple):
    """Something a person should know, as one line of text and as fields.

    `key` names the condition: alerts with the same key are the same alert, which is not sent again
    until `alerts.repeat_after_hours` have passed.
    """

    event: str
    text: str
    fields: dict[str, Any]
    key: str

    def payload(self, sent_at: str) -> dict[str, Any]:
        """What a channel receives."""
        return {"text": self.text, "event": self.event, "fields": self.fields, "key": self.key,
                "time": sent_at}


class Delivery(NamedTuple):
    """What became of one alert on one channel."""

    alert: Alert
    channel: str  # webhook | command
    status: str  # sent | failed | suppressed
    attempts: int = 0
    error: str | None = None
    exit_code: int | None = None

    def line(self) -> str:
        text = f"{self.channel}: {self.status} ({self.alert.event}"
        text += f", {self.attempts} attempt(s))" if self.attempts else ")"
        return text + (f": {self.error}" if self.error else "")


class Channel(NamedTuple):
    """A place alerts go, and where it was configured (for messages; never the address itself)."""

    name: str  # webhook | command
    target: str  # the webhook's address, or the command line
    source: str  # $RISK_ALERT_WEBHOOK, alerts.webhook_url, ...


# ---------------------------------------------------------------------------------------------
# The alerts: one constructor per event, each a line a person can act on.


def drift_found(
    release: str, batch: str | Iterable[str], deployed_f1: float, new_f1: float,
    allowed_drop: float, action: str = "retraining",
) -> Alert:
    """The deployed model scores worse on new data than its drift rule allows."""
    files = [batch] if isinstance(batch, str) else list(batch)
    return _alert(
        DRIFT, f"{DRIFT}:{release}",
        f"drift found on {', '.join(files) or 'the new data'} (release {release}) — F1 fell from "
        f"{deployed_f1:.3f} to {new_f1:.3f} (allowed drop {allowed_drop:.3f}); {action}",
        release=release, batch=files, deployed_f1=float(deployed_f1), new_f1=float(new_f1),
        drop=float(deployed_f1) - float(new_f1), allowed_drop=float(allowed_drop), action=action,
    )


def estimated_drop(
    release: str, roster: str, release_f1: float, estimated_f1: float, allowed_drop: float,
    drifted_features: Iterable[str] = (),
) -> Alert:
    """Early warning: on a roster, before any outcome is known, the model looks likely to do worse.

    Either the F1 estimated from its probabilities fell beyond noise, or the roster's features
    moved away from the training data (so the estimate itself rests on extrapolation).
    """
    drifted = list(drifted_features)
    reasons = []
    if release_f1 - estimated_f1 > allowed_drop:
        reasons.append(
            f"estimated F1 {estimated_f1:.3f} against the release's {release_f1:.3f} "
            f"(allowed drop {allowed_drop:.3f})"
        )
    if drifted:
        reasons.append(f"features drifted: {', '.join(drifted)}")
    return _alert(
        ESTIMATED_DROP, f"{ESTIMATED_DROP}:{release}:{roster}",
        f"early warning on roster {roster} (release {release}) — {'; '.join(reasons)}; "
        "no retraining until outcomes arrive",
        release=release, roster=roster, release_f1=float(release_f1),
        estimated_f1=float(estimated_f1), allowed_drop=float(allowed_drop),
        drifted_features=drifted,
    )


def release_deployed(
    release: str, previous: str | None = None, f1: float | None = None, reason: str = ""
) -> Alert:
    """A new release now serves predictions."""
    text = f"deployed release {release}"
    text += f" replacing {previous}" if previous else " (the first release)"
    text += f", F1 {f1:.3f}" if f1 is not None else ""
    text += f" — {reason}" if reason else ""
    return _alert(
        DEPLOYED, f"{DEPLOYED}:{release}", text, release=release, previous_release=previous,
        f1=None if f1 is None else float(f1), reason=reason or None,
    )


def retrain_refused(
    release: str, candidate_f1: float, deployed_f1: float, evaluated_on: str,
    candidate: str | None = None,
) -> Alert:
    """A retrained model was worse than the deployed one, so the deployed one keeps serving."""
    return _alert(
        RETRAIN_REFUSED, f"{RETRAIN_REFUSED}:{release}",
        f"retrained model refused — F1 {candidate_f1:.3f} vs deployed {deployed_f1:.3f} on "
        f"{evaluated_on}; release {release} keeps serving",
        release=release, candidate=candidate, candidate_f1=float(candidate_f1),
        deployed_f1=float(deployed_f1), evaluated_on=evaluated_on,
    )


def cycle_failed(error: BaseException | str) -> Alert:
    """A cycle stopped with an error; the deployed release keeps serving."""
    if isinstance(error, BaseException):
        error_type, message = type(error).__name__, str(error) or repr(error)
    else:
        error_type, message = None, str(error)
    message = _one_line(message, MAX_ERROR)
    # The message is the condition: the same failure every cycle is one alert a day, a new one is
    # news at once.
    return _alert(
        CYCLE_FAILED, f"{CYCLE_FAILED}:{message[:200]}",
        f"the cycle failed — {message}; see the cycle log for what was done before it failed",
        error=message, error_type=error_type,
    )


def file_rejected(file: str, checksum: str, reason: str | None) -> Alert:
    """A data file could not be used at all."""
    return _alert(
        FILE_REJECTED, f"{FILE_REJECTED}:{checksum}",
        f"data file {file} rejected — {reason or 'no reason given'}; none of its rows were used "
        "(a corrected file is read again)",
        file=file, checksum=checksum, reason=reason,
    )


def quarantine_share_exceeded(
    file: str, checksum: str, quarantined: int, rows_read: int, allowed_share: float,
    quarantine_path: Any = None,
) -> Alert:
    """More of a file's rows than allowed were invalid and set aside."""
    share = quarantined / rows_read if rows_read else 1.0
    where = f" — reasons in {quarantine_path}" if quarantine_path else ""
    return _alert(
        QUARANTINE_SHARE, f"{QUARANTINE_SHARE}:{checksum}",
        f"{quarantined} of {rows_read} rows of {file} quarantined ({_percent(share)}, more than "
        f"the allowed {_percent(allowed_share)}){where}",
        file=file, checksum=checksum, quarantined=int(quarantined), rows_read=int(rows_read),
        share=share, allowed_share=float(allowed_share),
        quarantine_path=None if quarantine_path is None else str(quarantine_path),
    )


def api_check_failed(base_url: str, problem: str, failing: Iterable[str] = ()) -> Alert:
    """The API did not answer, or some endpoints answered with errors."""
    endpoints = sorted(failing)
    key = f"{API_CHECK_FAILED}:{base_url}" + (f":{','.join(endpoints)}" if endpoints else "")
    return _alert(
        API_CHECK_FAILED, key, f"the API check failed at {base_url} — {problem}",
        base_url=base_url, problem=problem, failing=endpoints,
    )


def outputs_out_of_step(release: str, outputs: Mapping[str, str | None]) -> Alert:
    """Files derived from a release (report, risk list, ...) describe another release, or none.

    `outputs` maps each such file's name to the release it describes, None when it is missing.
    """
    described = [
        f"{name} is missing" if version is None else f"{name} is for release {version}"
        for name, version in sorted(outputs.items())
    ]
    return _alert(
        OUTPUTS_OUT_OF_STEP, f"{OUTPUTS_OUT_OF_STEP}:{release}:{','.join(sorted(outputs))}",
        f"derived outputs out of step with the served release {release} — {', '.join(described)}",
        release=release, outputs=dict(outputs),
    )


def quarantine_alerts(settings: Settings, file_outcomes: Iterable[Any]) -> list[Alert]:
    """The alerts one ingestion calls for: each rejected file, and each file with more than
    `alerts.quarantine_share` of its rows quarantined.

    Takes ingestion's per-file outcomes, as objects or as dicts (file, checksum, status, reason,
    rows_read, quarantined), such as a cycle's recorded details.
    """
    allowed = settings.alerts.quarantine_share
    found = []
    for outcome in file_outcomes:
        def value(name: str, outcome: Any = outcome) -> Any:
            if isinstance(outcome, Mapping):
                return outcome.get(name)
            return getattr(outcome, name, None)

        file, checksum = str(value("file")), str(value("checksum"))
        if value("status") == "rejected":
            found.append(file_rejected(file, checksum, value("reason")))
            continue
        rows_read, quarantined = int(value("rows_read") or 0), int(value("quarantined") or 0)
        if rows_read and quarantined / rows_read > allowed:
            found.append(quarantine_share_exceeded(
                file, checksum, quarantined, rows_read, allowed, settings.quarantine_path
            ))
    return found


def _alert(event: str, key: str, text: str, **fields: Any) -> Alert:
    return Alert(event, _one_line(TEXT_PREFIX + text, MAX_TEXT), fields, key)


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _percent(share: float) -> str:
    return f"{share * 100:.1f}".removesuffix(".0") + "%"


# ---------------------------------------------------------------------------------------------
# Delivery.


def channels(settings: Settings) -> list[Channel]:
    """Where alerts go: the webhook and the command, each from the environment or else config."""
    found = []
    for name, variable, key, configured in (
        ("webhook", WEBHOOK_ENV_VAR, "alerts.webhook_url", settings.alerts.webhook_url),
        ("command", COMMAND_ENV_VAR, "alerts.command", settings.alerts.command),
    ):
        from_environment = os.environ.get(variable, "").strip()
        if from_environment:
            found.append(Channel(name, from_environment, f"${variable}"))
        elif configured.strip():
            found.append(Channel(name, configured.strip(), f"{key} in {settings.config_path}"))
    return found


def notify(
    settings: Settings, alerts: Iterable[Alert], *, budget_seconds: float | None = None,
    now: datetime | None = None,
) -> list[Delivery]:
    """Deliver each alert, in order, to every configured channel. Never raises.

    All deliveries together take at most `budget_seconds` (default: alerts.budget_seconds); an
    alert the budget leaves no time for is recorded as failed with 0 attempts. An alert whose key
    was sent on a channel within alerts.repeat_after_hours is suppressed there: returned with
    status 'suppressed', not recorded. With no channel configured nothing is sent or recorded.
    `now` (UTC) stands in for the clock, for the repeat rule and the recorded times.
    """
    deliveries: list[Delivery] = []
    try:
        alerts = list(alerts)
        if not alerts:
            return deliveries
        targets = channels(settings)
        if not targets:
            log.debug("%d alert(s) not sent: no alert channel is configured", len(alerts))
            return deliveries
        budget = settings.alerts.budget_seconds if budget_seconds is None else budget_seconds
        deadline = time.monotonic() + max(budget, 0.0)
        # In UTC, as every record is, so that recorded times compare as text.
        moment = now or datetime.now(UTC)
        moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
        for alert in alerts:
            for channel in targets:
                deliveries.append(_deliver(settings, alert, channel, deadline, budget, moment))
    except Exception as error:  # an alert must never be why a cycle fails
        log.warning("alert delivery stopped by an unexpected error: %r", error)
    return deliveries


def _deliver(
    settings: Settings, alert: Alert, channel: Channel, deadline: float, budget: float,
    moment: datetime,
) -> Delivery:
    """Send one alert on one channel unless it was sent lately; record the outcome."""
    time_text = moment.isoformat(timespec="seconds")
    payload = None
    try:
        if _sent_lately(settings, alert, channel.name, moment):
            log.info("alert not repeated (sent within %g h): %s",
                     settings.alerts.repeat_after_hours, alert.text)
            return Delivery(alert, channel.name, SUPPRESSED)
        payload = json.dumps(alert.payload(time_text), default=str, ensure_ascii=False)
        if channel.name == "webhook":
            delivery = _send_webhook(alert, channel, payload, settings.alerts, deadline, budget)
        else:
            delivery = _run_command(alert, channel, payload, settings.alerts, deadline, budget)
    except Exception as error:
        delivery = Delivery(alert, channel.name, FAILED, error=f"unexpected error: {error!r}")
    if delivery.status == SENT:
        log.info("alert sent by %s: %s", channel.name, alert.text)
    else:
        log.warning(
            "alert not delivered by %s after %d attempt(s): %s; alert: %s",
            channel.name, delivery.attempts, delivery.error, alert.text,
        )
    _record(settings, delivery, payload, time_text)
    return delivery


def _sent_lately(settings: Settings, alert: Alert, channel: str, moment: datetime) -> bool:
    hours = settings.alerts.repeat_after_hours
    if hours <= 0:
        return False
    try:
        rows = records.query(
            settings.records_path,
            "SELECT MAX(time) AS time FROM alerts WHERE key = ? AND channel = ? AND status = ?",
            (alert.key, channel, SENT),
        )
    except Exception as error:  # a repeat is better than a lost alert
        log.warning("cannot tell whether this alert was sent already (%r); sending it", error)
        return False
    if not rows or rows[0]["time"] is None:
        return False
    return moment - datetime.fromisoformat(rows[0]["time"]) < timedelta(hours=hours)


def _record(settings: Settings, delivery: Delivery, payload: str | None, time_text: str) -> None:
    alert = delivery.alert
    try:
        records.add(settings.records_path, "alerts", {
            "time": time_text, "event": alert.event, "key": alert.key, "text": alert.text,
            "payload": payload, "channel": delivery.channel, "status": delivery.status,
            "attempts": delivery.attempts, "error": delivery.error,
            "exit_code": delivery.exit_code,
        })
    except Exception as error:
        log.warning("cannot record the %s alert delivery (%s): %r", alert.event, delivery.status,
                    error)


class _Attempt(NamedTuple):
    """The result of one try: delivered, worth another try, and why not."""

    ok: bool
    retry: bool = False
    error: str | None = None
    exit_code: int | None = None
    wait: float = 0.0  # what the receiver asked us to wait (Retry-After)


def _with_retries(
    attempt: Callable[[float], _Attempt], options: AlertSettings, deadline: float, budget: float
) -> tuple[int, _Attempt]:
    """Try up to options.attempts times with doubling waits; never start or wait past deadline."""
    tries, wait = 0, options.backoff_seconds
    result = _Attempt(False, error=f"not tried: this cycle's {budget:g} s for alerts were used up")
    while tries < options.attempts:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if tries:
                result = result._replace(
                    error=f"{result.error}; no retry: this cycle's {budget:g} s for alerts ran out"
                )
            break
        tries += 1
        result = attempt(min(options.timeout_seconds, remaining))
        if result.ok or not result.retry or tries == options.attempts:
            break
        pause = max(wait, result.wait)
        if time.monotonic() + pause >= deadline:
            result = result._replace(
                error=f"{result.error}; no retry: this cycle's {budget:g} s for alerts ran out"
            )
            break
        time.sleep(pause)
        wait *= 2
    return tries, result


def _send_webhook(
    alert: Alert, channel: Channel, payload: str, options: AlertSettings, deadline: float,
    budget: float,
) -> Delivery:
    if not is_http_url(channel.target):
        return Delivery(alert, channel.name, FAILED,
                        error=f"{channel.source} must start with http:// or https://")
    body = payload.encode("utf-8")
    tries, result = _with_retries(
        lambda timeout: _post_once(channel.target, body, timeout), options, deadline, budget
    )
    return Delivery(alert, channel.name, SENT if result.ok else FAILED, tries,
                    None if result.ok else result.error)


def _post_once(url: str, body: bytes, timeout: float) -> _Attempt:
    """POST the alert once; classify what went wrong as worth a retry or not."""
    from http.client import HTTPException, InvalidURL
    from urllib.error import HTTPError

    try:
        _within(timeout, lambda: _post(url, body, timeout))
    except HTTPError as error:
        answer = _answer_of(error)
        if 300 <= error.code < 400:
            return _Attempt(False, False, f"the webhook answered {error.code} {error.reason}, a "
                            "redirect: configure the address it redirects to")
        retry = error.code == 429 or error.code >= 500
        return _Attempt(False, retry, f"the webhook answered {error.code} {error.reason}{answer}",
                        wait=_retry_after(error) if retry else 0.0)
    except TimeoutError:
        return _Attempt(False, True, f"the webhook gave no answer within {timeout:.3g} s")
    except InvalidURL as error:
        return _Attempt(False, False, f"the webhook address is not valid: {error}")
    except (OSError, HTTPException) as error:  # refused, reset, no such host, TLS: may pass
        reason = getattr(error, "reason", None) or error
        return _Attempt(False, True, f"cannot reach the webhook: {reason}")
    return _Attempt(True)


def _post(url: str, body: bytes, timeout: float) -> None:
    import urllib.request

    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT},
    )
    with _opener().open(request, timeout=timeout) as response:
        response.read(MAX_ANSWER_BYTES)


_OPENER: Any = None


def _opener() -> Any:
    """urllib's opener, except that a redirect is an error: urllib would follow it without the
    POST body."""
    global _OPENER
    if _OPENER is None:
        import urllib.request

        class RefuseRedirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        _OPENER = urllib.request.build_opener(RefuseRedirects)
    return _OPENER


def _answer_of(error: Any) -> str:
    """The start of an error answer's body: chat services say there what was wrong."""
    try:
        text = error.read(MAX_ANSWER_BYTES).decode("utf-8", "replace")
    except Exception:  # the answer is only a hint; the status already says it failed
        return ""
    text = _one_line(text, 200)
    return f": {text}" if text else ""


def _retry_after(error: Any) -> float:
    try:
        return max(float(error.headers.get("Retry-After", 0)), 0.0)
    except (TypeError, ValueError):  # an HTTP date; the backoff will do
        return 0.0


def _within(seconds: float, function: Callable[[], Any]) -> Any:
    """function(), or TimeoutError once `seconds` have passed.

    The socket timeout bounds each read, but not a name lookup or a receiver that trickles its
    answer a byte at a time; the cycle must not wait on those, so the call runs in a thread that
    is abandoned when late.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="alert-delivery", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.3g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _run_command(
    alert: Alert, channel: Channel, payload: str, options: AlertSettings, deadline: float,
    budget: float,
) -> Delivery:
    import shlex

    try:
        argv = shlex.split(channel.target)
    except ValueError as error:
        return Delivery(alert, channel.name, FAILED,
                        error=f"{channel.source} cannot be split into words: {error}")
    if not argv:
        return Delivery(alert, channel.name, FAILED, error=f"{channel.source} names no program")
    tries, result = _with_retries(
        lambda timeout: _run_once(argv, payload, alert, timeout), options, deadline, budget
    )
    return Delivery(alert, channel.name, SENT if result.ok else FAILED, tries,
                    None if result.ok else result.error, result.exit_code)


def _run_once(argv: list[str], payload: str, alert: Alert, timeout: float) -> _Attempt:
    """Run the command once with the alert on stdin (and its event and text in the environment,
    for a mail subject line)."""
    import subprocess

    environment = {**os.environ, "RISK_ALERT_EVENT": alert.event, "RISK_ALERT_TEXT": alert.text}
    try:
        done = subprocess.run(
            argv, input=(payload + "\n").encode("utf-8"), capture_output=True, timeout=timeout,
            env=environment, check=False,
        )
    except subprocess.TimeoutExpired:
        return _Attempt(False, True, f"{argv[0]} did not finish within {timeout:.3g} s")
    except OSError as error:  # not found, not executable: another try will not help
        return _Attempt(False, False, f"cannot run {argv[0]}: {error.strerror or error}")
    if done.returncode == 0:
        return _Attempt(True, exit_code=0)
    stderr = done.stderr.decode("utf-8", "replace").strip().splitlines()
    said = f": {_one_line(stderr[0], MAX_ERROR)}" if stderr else ""
    return _Attempt(False, True, f"{argv[0]} exited with {done.returncode}{said}",
                    done.returncode)


# ---------------------------------------------------------------------------------------------
# Command line: check the channels.


def check_alert() -> Alert:
    """An alert that says only that alerts arrive; its key is new each time, so never suppressed."""
    sent_at = records.utc_now()
    return _alert("test", f"test:{sent_at}", "test alert: alerts from this pipeline reach you",
                  sent_at=sent_at)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Send a test alert through the configured channels, to check them."
    )
    add_config_argument(parser)
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    if not channels(settings):
        raise ConfigError(
            f"no alert channel is configured: set alerts.webhook_url or alerts.command in "
            f"{settings.config_path}, or ${WEBHOOK_ENV_VAR} or ${COMMAND_ENV_VAR}"
        )
    deliveries = notify(settings, [check_alert()])
    for delivery in deliveries:
        print(delivery.line())
    return 0 if deliveries and all(d.status == SENT for d in deliveries) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
