"""API calls: call every endpoint of the running API and save what came back in apireturns.txt.

The API's address comes from --url, else $RISK_API_URL, else api.base_url in config.json (default
http://127.0.0.1:8000). The API token, from the token variable (api.token_env_var, default
$RISK_API_TOKEN) or else api.token_file, is sent as a bearer token. Every answer is saved,
failures included; the exit code is 2 when an endpoint failed or the API could not be reached, and
the message names the endpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

import atomicio
import records
from errors import ConfigError, PipelineError, run_cli
from settings import Settings, add_config_argument, api_token, load_settings

log = logging.getLogger(__name__)

API_URL_ENV_VAR = "RISK_API_URL"
# Text answers longer than this (an HTML error page from a proxy, say) are cut in apireturns.txt.
MAX_TEXT_SHOWN = 2000


class ApiUnreachable(PipelineError):
    """The API did not answer: it is not running, the address is wrong, or it is too slow."""


class ApiCallFailed(PipelineError):
    """An endpoint answered with an error status."""


@dataclass(frozen=True)
class Call:
    """One request apicalls.py makes."""

    method: str
    path: str
    json_body: Any = None
    data: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"

    def describe_body(self) -> str:
        if self.json_body is not None:
            return json.dumps(self.json_body)
        if self.data is not None:
            return f"({len(self.data)} bytes of {self.headers.get('Content-Type', 'data')})"
        return ""


@dataclass(frozen=True)
class EndpointReturn:
    """What one endpoint answered."""

    call: Call
    status: int
    reason: str
    content_type: str
    size: int
    seconds: float
    body: Any  # parsed JSON; text for a text answer; None for anything else (the PDF)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error_message(self) -> str:
        if isinstance(self.body, dict) and "error" in self.body:
            return str(self.body["error"])
        return self.reason

    def status_line(self) -> str:
        return (
            f"{self.status} {self.reason}, {self.content_type or 'no content type'}, "
            f"{self.size} bytes, {self.seconds:.3f} s"
        )

    def section(self) -> str:
        """This answer as a section of apireturns.txt: the request, the status, the content."""
        sent = self.call.describe_body()
        lines = [f"== {self.call.name}" + (f"  {sent}" if sent else ""), self.status_line()]
        if self.content_type.startswith("application/json") and self.body is not None:
            lines.append(readable_json(self.body))
        elif isinstance(self.body, str):
            shown = self.body[:MAX_TEXT_SHOWN]
            lines.append(shown + ("\n[... cut]" if len(self.body) > MAX_TEXT_SHOWN else ""))
        else:
            lines.append(f"({self.content_type or 'binary'} content not shown)")
        return "\n".join(lines)


@dataclass(frozen=True)
class ApiReturns:
    """Every endpoint's answer from one round of calls, and where they were saved."""

    base_url: str
    time: str
    returns: list[EndpointReturn]
    path: Path

    @property
    def failures(self) -> list[EndpointReturn]:
        return [answer for answer in self.returns if not answer.ok]

    def text(self) -> str:
        header = (
            f"API answers from {self.base_url} at {self.time}\n"
            f"{len(self.returns)} endpoints called, {len(self.returns) - len(self.failures)} "
            "answered successfully\n"
        )
        return header + "".join(f"\n{answer.section()}\n" for answer in self.returns)

    def summary(self) -> str:
        lines = [f"Called {len(self.returns)} endpoints of {self.base_url}:"]
        for answer in self.returns:
            text = f"  {answer.call.name:<18} {answer.status} {answer.reason}"
            if not answer.ok:
                text += f": {answer.error_message}"
            lines.append(text)
        lines.append(f"Saved the answers in {self.path}")
        return "\n".join(lines)


def readable_json(value: Any, level: int = 0) -> str:
    """Indented JSON with each list of plain values on one line, so 400 predictions take 3 lines."""
    inner, outer = "  " * (level + 1), "  " * level
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(str(k))}: {readable_json(v, level + 1)}" for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [f"{inner}{readable_json(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{outer}]"
    return json.dumps(value)


def resolve_base_url(settings: Settings, url: str | None) -> str:
    """The API's address: `url` if given, else $RISK_API_URL, else config.json's api.base_url."""
    if url:
        chosen, source = url, "--url"
    elif os.environ.get(API_URL_ENV_VAR):
        chosen, source = os.environ[API_URL_ENV_VAR], f"${API_URL_ENV_VAR}"
    else:
        chosen, source = settings.api.base_url, f"api.base_url in {settings.config_path}"
    parts = urlsplit(chosen.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"API address {chosen!r} (from {source}) must look like http://HOST:PORT")
    return chosen.strip().rstrip("/")


def token_from_environment(settings: Settings) -> str | None:
    """The API token the server uses: its variable, else api.token_file; None for neither."""
    return api_token(settings)


def endpoint_calls(settings: Settings) -> list[Call]:
    """One call per endpoint; the prediction is asked for the test data."""
    return [
        Call("GET", "/health"),
        Call("GET", "/ready"),
        prediction_call(settings),
        Call("GET", "/scoring"),
        Call("GET", "/summarystats"),
        Call("GET", "/diagnostics"),
        Call("GET", "/risk"),
        Call("GET", "/report"),
        Call("GET", "/ping"),
        invocations_call(settings),
        Call("GET", "/metrics"),
    ]


def prediction_call(settings: Settings) -> Call:
    """POST /prediction naming the test data file, or sending it as CSV if no name can reach it."""
    test_file = settings.test_data_files()[0]
    try:
        relative = test_file.relative_to(settings.base_dir).as_posix()
    except ValueError:
        # Outside the project folder the API refuses a filepath, so send the rows themselves.
        return Call("POST", "/prediction", data=test_file.read_bytes(),
                    headers={"Content-Type": "text/csv"})
    return Call("POST", "/prediction", json_body={"filepath": relative})


def invocations_call(settings: Settings) -> Call:
    """POST /invocations, MLflow's scoring protocol, with the test data as CSV."""
    return Call("POST", "/invocations", data=settings.test_data_files()[0].read_bytes(),
                headers={"Content-Type": "text/csv"})


def call_endpoints(
    settings: Settings, base_url: str, token: str | None = None, timeout: float | None = None
) -> ApiReturns:
    """Call every endpoint and save the answers, failures included, in apireturns.txt.

    Raises ApiUnreachable if the API does not answer; apireturns.txt is then left as it was.
    """
    timeout = timeout or settings.api.timeout_seconds
    called_at = records.utc_now()
    with requests.Session() as session:
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        returns = [
            call_endpoint(session, base_url, call, timeout) for call in endpoint_calls(settings)
        ]
    api_returns = ApiReturns(base_url, called_at, returns, settings.api_returns_path)
    atomicio.write_text(settings.api_returns_path, api_returns.text())
    for answer in api_returns.failures:
        log.warning("%s answered %s: %s", answer.call.name, answer.status, answer.error_message)
    return api_returns


def call_endpoint(
    session: requests.Session, base_url: str, call: Call, timeout: float
) -> EndpointReturn:
    url = base_url + call.path
    started = time.perf_counter()
    try:
        response = session.request(
            call.method, url, json=call.json_body, data=call.data, headers=call.headers,
            timeout=timeout,
        )
    except requests.Timeout:
        raise ApiUnreachable(
            f"{call.name}: {url} did not answer within {timeout:g} s; is the API overloaded?"
        ) from None
    except requests.ConnectionError as error:
        raise ApiUnreachable(
            f"{call.name}: cannot reach {url}: is the API running? ({connection_problem(error)})"
        ) from None
    except requests.RequestException as error:
        raise ApiUnreachable(f"{call.name}: calling {url} failed: {error}") from None
    return EndpointReturn(
        call=call,
        status=response.status_code,
        reason=response.reason or "",
        content_type=response.headers.get("Content-Type", ""),
        size=len(response.content),
        seconds=time.perf_counter() - started,
        body=_content(response),
    )


def _content(response: requests.Response) -> Any:
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("application/json"):
        try:
            return response.json()
        except ValueError:
            return response.text
    if content_type.startswith("text/"):
        return response.text
    return None


def connection_problem(error: requests.ConnectionError) -> str:
    """The system's reason (e.g. '[Errno 111] Connection refused'), not urllib3's whole story."""
    match = re.search(r"\[Errno -?\d+\][^'\")]*", str(error))
    return match.group(0).strip() if match else str(error)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    parser.add_argument(
        "--url", metavar="URL",
        help=f"the API's address (default: ${API_URL_ENV_VAR}, else api.base_url in the config)",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        help="how long to wait for each answer (default: api.timeout_seconds in the config)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    base_url = resolve_base_url(settings, args.url)
    api_returns = call_endpoints(
        settings, base_url, token=token_from_environment(settings), timeout=args.timeout
    )
    print(api_returns.summary())
    if api_returns.failures:
        failed = "; ".join(
            f"{answer.call.name} answered {answer.status}: {answer.error_message}"
            for answer in api_returns.failures
        )
        raise ApiCallFailed(f"{failed} (all answers in {api_returns.path})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
