"""One place that turns config.json into an immutable Settings object.

The original keys (input_folder_path, output_folder_path, test_data_path, output_model_path,
prod_deployment_path) are required, so an original-format config works unchanged. Every other key
is optional, with the defaults and meaning given in the classes below and in the README. Relative paths are resolved against
the folder that holds config.json, so the scripts work from any working directory (cron).
"""

# Unlike the other modules, no `from __future__ import annotations`: with it, NamedTuple would
# compile each field's annotation string at import, a cost the 10-minute cron check pays every run.

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit  # loaded by pathlib anyway, so free

from errors import ConfigError

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_PATH = PROJECT_DIR / "config.json"
CONFIG_ENV_VAR = "RISK_CONFIG"

REQUIRED_PATH_KEYS = (
    "input_folder_path",
    "output_folder_path",
    "test_data_path",
    "output_model_path",
    "prod_deployment_path",
)


# The settings are NamedTuples rather than frozen dataclasses: just as immutable, but far cheaper to
# define at import, which the 10-minute cron check pays on every run. Make variants with _replace().


class Schema(NamedTuple):
    """Which columns the data has and what each is for."""

    target: str = "exited"
    id_columns: tuple[str, ...] = ("corporation",)
    numeric_features: tuple[str, ...] = (
        "lastmonth_activity",
        "lastyear_activity",
        "number_of_employees",
    )
    categorical_features: tuple[str, ...] = ()
    # Columns that must hold non-negative whole numbers; they are also log-transformed for training
    # because counts of activity and staff are heavily skewed.
    count_columns: tuple[str, ...] = (
        "lastmonth_activity",
        "lastyear_activity",
        "number_of_employees",
    )

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric_features + self.categorical_features

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a data file must have, in the order the master dataset keeps them."""
        return self.id_columns + self.features + (self.target,)


class ModelSettings(NamedTuple):
    """How the attrition model is trained."""

    C: float = 1.0
    max_iter: int = 1000
    random_state: int = 0
    cv_folds: int = 5
    # The decision threshold is tuned for F1 only when every cross-validation fold can hold at least
    # this many rows of each class; with fewer rows a tuned threshold is noise, so 0.5 is used.
    min_class_rows_per_fold: int = 5
    default_threshold: float = 0.5
    # Threshold tuning needs cross-validated probabilities, not every row: beyond this many rows a
    # random sample is cross-validated (its threshold is as precise), the final fit uses all rows.
    max_tuning_rows: int = 200_000
    # Largest expected calibration error (ECE, 10 bins) of the cross-validated probabilities that
    # is left alone; beyond it the model is calibrated (isotonic or sigmoid, by cross-validation).
    # Our regularised logistic regression is a little underconfident (ECE 0.02-0.03), enough to
    # bias the F1 estimated on rosters low by 0.02-0.05: so the default calibrates it.
    calibration_bound: float = 0.01


class ScoringSettings(NamedTuple):
    """How a model is scored on the test data."""

    bootstrap_samples: int = 1000
    confidence: float = 0.95
    random_state: int = 0
    # The top group a model is judged on as a call list: this share of the rows, highest risk first.
    top_share: float = 0.1
    # Bins of the reliability curve and of the expected calibration error.
    calibration_bins: int = 10
    # Outcomes simulated from the probabilities to give estimated performance its interval.
    estimate_draws: int = 400


class DeploymentSettings(NamedTuple):
    """How many earlier releases production keeps for rollback."""

    keep_releases: int = 10


class IngestionSettings(NamedTuple):
    """How ingestion reads source files (ingestion.py, README).

    chunk_rows: a file is read, checked and written this many rows at a time, so that a file of any
    size is ingested in bounded memory.
    settle_seconds: a file modified less than this long ago may still be being written (an upload,
    a copy); it is left for the next run. A file that changes while it is read is left too.
    """

    chunk_rows: int = 200_000
    settle_seconds: float = 5.0


class LockSettings(NamedTuple):
    """The pipeline lock (locks.py): how long a stage run by hand waits for a running cycle or stage
    before it gives up with exit code 75. A cron cycle never waits: it exits and runs next time."""

    wait_seconds: float = 10.0


class DriftSettings(NamedTuple):
    """When a fall of F1 on newly arrived data counts as model drift (fullprocess.py, README).

    rule "interval" (default): drift when the deployed F1 exceeds the new batch's F1 by more than
    the sampling noise of both, i.e. by more than z * sqrt(se_deployed^2 + se_new^2) + tolerance,
    where each se comes from its bootstrap interval (scoring.confidence sets z). A fresh batch of the
    same process stays inside that band about 97.5% of the time (one-sided); a changed relation
    between features and leaving does not.
    rule "raw": drift when the new F1 is lower than the deployed F1 by more than `tolerance` (the
    original behaviour with tolerance 0: any drop at all, noise included).
    """

    rule: str = "interval"
    tolerance: float = 0.0


class DiagnosticsSettings(NamedTuple):
    """Dependency checks, drift tests and the risk list (see diagnostics.py and reporting.py)."""

    # How long an answer from the package index is reused, so that the 10-minute cycle does not ask
    # pip every time; a failed lookup (offline) is retried sooner.
    dependency_cache_hours: float = 24.0
    dependency_retry_hours: float = 1.0
    # Time limit of one `pip index versions` call; pip's own socket timeout is half of it.
    pip_timeout_seconds: float = 30.0
    # How long a diagnostics run waits for the package index (asked while the other sections are
    # computed); a later answer is cached and shown by the next run.
    dependency_wait_seconds: float = 5.0
    # Evidently's defaults: up to `drift_small_sample_rows` reference rows, a feature drifts when a
    # test's p-value is below `drift_p_value` (KS, chi-squared, z); above, when a distance exceeds
    # `drift_distance_threshold` (normed Wasserstein, Jensen-Shannon). The dataset drifts when at
    # least `drift_share` of the features do.
    drift_p_value: float = 0.05
    drift_distance_threshold: float = 0.1
    drift_small_sample_rows: int = 1000
    drift_share: float = 0.5
    # Size of the top group of the risk list: shown in the report, and followed across releases.
    risk_top_n: int = 100
    # How many of the newest risk lists have their track record brought up to date when outcomes
    # arrive (calllist.py); older lists keep the track record they had.
    risk_tracked_lists: int = 20


class ApiSettings(NamedTuple):
    """How apicalls.py reaches the API and what the API accepts.

    base_url: where apicalls.py finds the API (--url and $RISK_API_URL take precedence).
    max_request_bytes: larger request bodies are refused with 413 (16 MiB holds about 150,000
    JSON records).
    token_env_var: the environment variable holding the API token; when it is set, every endpoint
    but /health and /ping requires it as a bearer token, and apicalls.py sends it.
    timeout_seconds: how long apicalls.py waits for each answer before it gives up.
    token_file: a file holding the API token (relative to config.json's folder), readable by its
    owner only; used when the environment variable is not set. "" names none.
    host, port, workers: where `python app.py` serves the API and with how many processes
    (--host, --port and --workers take precedence).
    worker_timeout_seconds: how long one request may take before gunicorn restarts its worker;
    POST /diagnostics needs the most.
    """

    base_url: str = "http://127.0.0.1:8000"
    max_request_bytes: int = 16 * 1024 * 1024
    token_env_var: str = "RISK_API_TOKEN"
    timeout_seconds: float = 60.0
    token_file: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    worker_timeout_seconds: float = 120.0


class AlertSettings(NamedTuple):
    """Who is told when the pipeline needs a person, and how hard delivery tries (alerts.py).

    webhook_url: an incoming webhook (Slack, Teams, Mattermost, or anything that takes a JSON POST)
    that receives each alert; "" sends none. $RISK_ALERT_WEBHOOK takes precedence.
    command: a program and its arguments, split as a shell would but run without one, that gets
    each alert as JSON on its stdin (a mail script, say); "" runs none. $RISK_ALERT_COMMAND takes
    precedence. With both set, each alert goes to both.
    quarantine_share: alert when more than this share of a file's rows is quarantined.
    timeout_seconds: time limit of one delivery attempt.
    attempts: how many times one alert is tried before it is recorded as failed (and tried again
    in the next cycle).
    backoff_seconds: wait before the first retry; each later wait is twice the one before.
    budget_seconds: the time all of one cycle's deliveries may take together, so that a webhook
    that is down or slow never holds up the cycle; no retry starts or waits past it.
    repeat_after_hours: an alert whose condition is still true is sent again after this long;
    sooner, the same alert is suppressed rather than repeated every cycle.
    """

    webhook_url: str = ""
    command: str = ""
    quarantine_share: float = 0.1
    timeout_seconds: float = 5.0
    attempts: int = 3
    backoff_seconds: float = 0.5
    budget_seconds: float = 15.0
    repeat_after_hours: float = 24.0


class RetrainSettings(NamedTuple):
    """How the cycle chooses the data a retrained model learns from (fullprocess.py, README).

    On drift, every way to train is fitted without the held-out newest rows and judged on them:
    all history, only the batches since the change, and history weighted by recency, whose weights
    halve every `half_life_batches` batches back. The best F1 wins; candidates within `f1_tie` of
    the best F1 are told apart by ROC AUC, and those within `auc_tie` of the best AUC go to the
    earlier candidate (the deployed model, then all history).
    """

    half_life_batches: float = 2.0
    f1_tie: float = 0.01
    auc_tie: float = 0.01


SECTIONS: dict[str, type] = {
    "ingestion": IngestionSettings,
    "lock": LockSettings,
    "model": ModelSettings,
    "scoring": ScoringSettings,
    "deployment": DeploymentSettings,
    "drift": DriftSettings,
    "retrain": RetrainSettings,
    "diagnostics": DiagnosticsSettings,
    "api": ApiSettings,
    "alerts": AlertSettings,
}


class Settings(NamedTuple):
    """Resolved paths, schema and options shared by every stage."""

    config_path: Path
    input_folder: Path
    output_folder: Path
    test_data_path: Path
    model_folder: Path
    deployment_folder: Path
    log_path: Path
    schema: Schema = Schema()
    ingestion: IngestionSettings = IngestionSettings()
    lock: LockSettings = LockSettings()
    model: ModelSettings = ModelSettings()
    scoring: ScoringSettings = ScoringSettings()
    deployment: DeploymentSettings = DeploymentSettings()
    drift: DriftSettings = DriftSettings()
    retrain: RetrainSettings = RetrainSettings()
    diagnostics: DiagnosticsSettings = DiagnosticsSettings()
    api: ApiSettings = ApiSettings()
    alerts: AlertSettings = AlertSettings()

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent

    @property
    def finaldata_path(self) -> Path:
        return self.output_folder / "finaldata.csv"

    @property
    def master_copy_path(self) -> Path:
        """The master dataset in numpy's .npz, beside the CSV: quicker to read (dataset.py)."""
        return self.output_folder / "finaldata.npz"

    @property
    def ingested_files_path(self) -> Path:
        return self.output_folder / "ingestedfiles.txt"

    @property
    def quarantine_path(self) -> Path:
        return self.output_folder / "quarantine.csv"

    @property
    def latest_batch_path(self) -> Path:
        """The rows the most recent ingestion added, for drift checks against the deployed model."""
        return self.output_folder / "latestbatch.csv"

    @property
    def rosters_path(self) -> Path:
        """The roster snapshots: current clients as each roster listed them, outcome unknown.

        Beside the master dataset and never part of it: rows without a target are not training data.
        """
        return self.output_folder / "rosters.csv"

    @property
    def records_path(self) -> Path:
        return self.output_folder / "records.sqlite"

    @property
    def model_path(self) -> Path:
        return self.model_folder / "trainedmodel.pkl"

    @property
    def model_metadata_path(self) -> Path:
        return self.model_folder / "trainedmodel.json"

    @property
    def model_json_path(self) -> Path:
        """The trained model as plain data (numpy alone scores it): what serving and scoring use."""
        return self.model_folder / "model.json"

    @property
    def score_path(self) -> Path:
        return self.model_folder / "latestscore.txt"

    @property
    def training_sample_path(self) -> Path:
        """A sample of the rows the model was trained on: the reference for data drift."""
        return self.model_folder / "trainingsample.csv"

    @property
    def confusion_matrix_path(self) -> Path:
        return self.model_folder / "confusionmatrix.png"

    @property
    def report_path(self) -> Path:
        return self.model_folder / "report.pdf"

    @property
    def api_returns_path(self) -> Path:
        return self.model_folder / "apireturns.txt"

    @property
    def risk_scores_path(self) -> Path:
        """Every client ranked by attrition risk, beside the deployed model."""
        return self.deployment_folder / "riskscores.csv"

    @property
    def dependency_cache_path(self) -> Path:
        return self.output_folder / "dependencies.json"

    def test_data_files(self) -> list[Path]:
        """The test data: the file named by test_data_path, or every .csv in that folder."""
        if self.test_data_path.is_file():
            return [self.test_data_path]
        if not self.test_data_path.is_dir():
            raise ConfigError(
                f"test_data_path {self.test_data_path} does not exist "
                f"(config {self.config_path})"
            )
        files = sorted(p for p in self.test_data_path.glob("*.csv") if not p.name.startswith("."))
        if not files:
            raise ConfigError(
                f"test_data_path {self.test_data_path} holds no .csv file "
                f"(config {self.config_path})"
            )
        return files


def load_settings(config_path: str | os.PathLike[str] | None = None) -> Settings:
    """Read config.json (default: beside the scripts, or $RISK_CONFIG) into Settings."""
    path = Path(config_path or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config PATH")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"config file {path} is not valid JSON: {error.msg} at line {error.lineno}, "
            f"column {error.colno}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    return settings_from_mapping(raw, path)


def settings_from_mapping(raw: Any, config_path: Path) -> Settings:
    """Build Settings from a parsed config, as if it had been read from `config_path`."""
    config_path = Path(config_path).resolve()
    where = f"in config {config_path}"
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object {where}")
    missing = [key for key in REQUIRED_PATH_KEYS if key not in raw]
    if missing:
        raise ConfigError(f"missing key {', '.join(repr(k) for k in missing)} {where}")
    _check_top_level_keys(raw, where)

    paths = {key: _resolve_path(raw[key], key, config_path) for key in REQUIRED_PATH_KEYS}
    for key in ("input_folder_path", "test_data_path"):
        if not paths[key].exists():
            raise ConfigError(f"{key} {paths[key]} does not exist ({key!r} {where})")
    log_path = _resolve_path(raw.get("log_path", "logs/fullprocess.log"), "log_path", config_path)

    sections = {name: _section(raw.get(name, {}), cls, name, where) for name, cls in SECTIONS.items()}
    _check_drift(sections["drift"], where)
    _check_calibration(sections["model"], sections["scoring"], where)
    _check_ingestion(sections["ingestion"], sections["lock"], where)
    _check_alerts(sections["alerts"], where)
    _check_api(sections["api"], where)
    return Settings(
        config_path=config_path,
        input_folder=paths["input_folder_path"],
        output_folder=paths["output_folder_path"],
        test_data_path=paths["test_data_path"],
        model_folder=paths["output_model_path"],
        deployment_folder=paths["prod_deployment_path"],
        log_path=log_path,
        schema=_schema(raw.get("schema", {}), where),
        **sections,
    )


def _check_top_level_keys(raw: dict, where: str) -> None:
    """A misspelt section or key is an error naming the nearest valid one; other extras are logged.

    An unknown key holding a JSON object is a section the user meant to configure ("modle"), and
    silently ignoring it would run with defaults the user thinks are changed.
    """
    known = set(REQUIRED_PATH_KEYS) | set(SECTIONS) | {"schema", "log_path"}
    for key in sorted(set(raw) - known):
        hint = _did_you_mean([key], known)
        if hint or isinstance(raw[key], dict):
            what = "section" if isinstance(raw[key], dict) else "key"
            sections = ", ".join(sorted(set(SECTIONS) | {"schema"}))
            raise ConfigError(
                f"unknown config {what} {key!r}{hint or f' (sections: {sections})'} {where}"
            )
        log.warning("ignoring unknown config key %r %s", key, where)


def _did_you_mean(unknown: list[str], valid: Any) -> str:
    """'; did you mean X?' for the first unknown name with a close valid one, else ''."""
    import difflib  # here, not at the top: only a config with a mistake pays for it

    for name in unknown:
        close = difflib.get_close_matches(name, sorted(valid), n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


def _resolve_path(value: Any, key: str, config_path: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key!r} must be a non-empty path string in config {config_path}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (config_path.parent / path).resolve()


def _section(raw: Any, cls: type, name: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name!r} must be a JSON object {where}")
    defaults = cls._field_defaults
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown key {', '.join(unknown)} in {name!r}{_did_you_mean(unknown, defaults)} "
            f"{where}"
        )
    values = {}
    for key, value in raw.items():
        expected = type(defaults[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise ConfigError(
                f"{name}.{key} must be {expected.__name__}, got {value!r} {where}"
            )
        values[key] = value
    return cls(**values)


def _check_drift(drift: DriftSettings, where: str) -> None:
    if drift.rule not in ("interval", "raw"):
        raise ConfigError(f"drift.rule must be 'interval' or 'raw', not {drift.rule!r} {where}")
    if drift.tolerance < 0:
        raise ConfigError(f"drift.tolerance must not be negative, got {drift.tolerance} {where}")


def _check_calibration(model: ModelSettings, scoring: ScoringSettings, where: str) -> None:
    if not 0 <= model.calibration_bound <= 1:
        raise ConfigError(
            f"model.calibration_bound is an error of probabilities, between 0 and 1; got "
            f"{model.calibration_bound} {where}"
        )
    for name in ("calibration_bins", "estimate_draws"):
        if not getattr(scoring, name) >= 1:
            raise ConfigError(
                f"scoring.{name} must be at least 1, got {getattr(scoring, name)} {where}"
            )


def _check_ingestion(ingestion: IngestionSettings, lock: LockSettings, where: str) -> None:
    if ingestion.chunk_rows < 1:
        raise ConfigError(
            f"ingestion.chunk_rows must be at least 1, got {ingestion.chunk_rows} {where}"
        )
    # Written as `not (...)` so that NaN, which JSON allows, fails the checks.
    if not ingestion.settle_seconds >= 0:
        raise ConfigError(
            f"ingestion.settle_seconds must not be negative, got {ingestion.settle_seconds} {where}"
        )
    if not lock.wait_seconds >= 0:
        raise ConfigError(
            f"lock.wait_seconds must not be negative, got {lock.wait_seconds} {where}"
        )


def _check_alerts(alerts: AlertSettings, where: str) -> None:
    if alerts.webhook_url and not is_http_url(alerts.webhook_url):
        raise ConfigError(
            # Not echoed: a webhook's address is its password.
            f"alerts.webhook_url must start with http:// or https:// (the incoming webhook's "
            f"whole address) {where}"
        )
    if alerts.command:
        import shlex  # here, not at the top: only a config naming a command pays for it

        try:
            program = shlex.split(alerts.command)
        except ValueError as error:
            raise ConfigError(
                f"alerts.command cannot be split into words ({error}) {where}"
            ) from None
        if not program:
            raise ConfigError(f"alerts.command names no program {where}")
    # Written as `not (...)` so that NaN, which JSON allows, fails every check.
    if not 0 <= alerts.quarantine_share <= 1:
        raise ConfigError(
            f"alerts.quarantine_share is a share of a file's rows, between 0 and 1; got "
            f"{alerts.quarantine_share} {where}"
        )
    for name in ("timeout_seconds", "budget_seconds", "attempts"):
        if not getattr(alerts, name) > 0:
            raise ConfigError(
                f"alerts.{name} must be positive, got {getattr(alerts, name)} {where}"
            )
    for name in ("backoff_seconds", "repeat_after_hours"):
        if not getattr(alerts, name) >= 0:
            raise ConfigError(
                f"alerts.{name} must not be negative, got {getattr(alerts, name)} {where}"
            )


def _check_api(api: ApiSettings, where: str) -> None:
    if not api.host.strip():
        raise ConfigError(f"api.host must name an interface, e.g. 127.0.0.1 {where}")
    if not 1 <= api.port <= 65535:
        raise ConfigError(f"api.port must be between 1 and 65535, got {api.port} {where}")
    for name in ("workers", "max_request_bytes", "worker_timeout_seconds", "timeout_seconds"):
        if not getattr(api, name) > 0:
            raise ConfigError(f"api.{name} must be positive, got {getattr(api, name)} {where}")


def api_token(settings: "Settings") -> str | None:
    """The API token: $RISK_API_TOKEN (api.token_env_var), else api.token_file; None for neither.

    A token that is set but empty is an error, not "no token": an empty variable or file is a
    mistake (a secret not filled in), and serving without a token would open the API.
    """
    variable = settings.api.token_env_var
    if variable in os.environ:
        token = os.environ[variable].strip()
        if not token:
            raise ConfigError(
                f"${variable} is set but empty: put the API token in it, or unset it to serve "
                "without a token"
            )
        return token
    if not settings.api.token_file:
        return None
    return _read_token_file(settings.base_dir / Path(settings.api.token_file).expanduser(),
                            settings.config_path)


def _read_token_file(path: Path, config_path: Path) -> str:
    import stat  # here, not at the top: only a config with a token file pays for it

    where = f"(api.token_file in config {config_path})"
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"the token file {path} is not a regular file {where}")
        if mode & 0o077:
            raise ConfigError(
                f"the token file {path} can be read or changed by other users "
                f"(mode {stat.S_IMODE(mode):o}): run 'chmod 600 {path}' {where}"
            )
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"the token file {path} cannot be read: {error} {where}") from None
    if not token:
        raise ConfigError(f"the token file {path} is empty: put the API token in it {where}")
    return token


def is_http_url(text: str) -> bool:
    """Whether `text` is an http:// or https:// address with a host."""
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _schema(raw: Any, where: str) -> Schema:
    if not isinstance(raw, dict):
        raise ConfigError(f"'schema' must be a JSON object {where}")
    default = Schema()
    allowed = set(Schema._fields)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key {', '.join(unknown)} in 'schema'{_did_you_mean(unknown, allowed)} {where}"
        )
    target = raw.get("target", default.target)
    if not isinstance(target, str) or not target:
        raise ConfigError(f"schema.target must be a column name {where}")
    lists = {}
    for key in ("id_columns", "numeric_features", "categorical_features", "count_columns"):
        value = raw.get(key, list(getattr(default, key)))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"schema.{key} must be a list of column names {where}")
        lists[key] = tuple(value)
    if "count_columns" not in raw and "numeric_features" in raw:
        lists["count_columns"] = tuple(
            c for c in default.count_columns if c in lists["numeric_features"]
        )
    schema = Schema(target=target, **lists)
    if not schema.features:
        raise ConfigError(f"schema names no feature columns {where}")
    names = list(schema.columns)
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(
            f"schema uses column {', '.join(duplicated)} twice (a column is an id, a feature "
            f"or the target) {where}"
        )
    stray = sorted(set(schema.count_columns) - set(schema.numeric_features))
    if stray:
        raise ConfigError(f"schema.count_columns {', '.join(stray)} are not numeric_features {where}")
    return schema


def add_config_argument(parser: "argparse.ArgumentParser") -> None:
    """The --config option every script takes."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"config.json to use (default: ${CONFIG_ENV_VAR} or {DEFAULT_CONFIG_PATH.name} "
        "beside the scripts)",
    )
