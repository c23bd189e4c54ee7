"""Diagnostics: is the deployed model, and the data it sees, healthy?

Each check is a function that the API and fullprocess.py call in-process, and each reads what the
pipeline produced and recorded rather than redoing it: summary statistics and missing data of the
master dataset, how long each stage took when it last ran (from the records), the state of the
dependencies, and data drift between the data the deployed model was trained on and the newest
ingested batch. The script runs them all, records the run in the records database (so that the
report can draw trends) and prints a readable summary, or JSON with --json. Predictions are the
model in use's (scoring.py); model_predictions stays here as the course's function list has it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from packaging.version import InvalidVersion, Version

import atomicio
import records
from deployment import current_release
from errors import (
    ConfigError,
    DataError,
    InsufficientDataError,
    ModelNotDeployedError,
    PipelineError,
    run_cli,
)
from dataset import read_csv, read_dataset, read_header, read_master, typed, validate_frame
from settings import (
    PROJECT_DIR,
    DiagnosticsSettings,
    Schema,
    Settings,
    add_config_argument,
    load_settings,
)
from scoring import PredictionResult, load_deployed, predict_frame, two_proportion_z

log = logging.getLogger(__name__)


class DependencyCheckPending(PipelineError):
    """The package index has not answered yet; the answer is cached for the next run."""


DEFAULT_REQUIREMENTS_PATH = PROJECT_DIR / "requirements.txt"
# Each pip process costs about a second of CPU; more at once than this only queues on the cores.
MAX_PIP_PROCESSES = 8
# Evidently treats a numeric column with this few distinct values as categorical.
MAX_CATEGORY_LIKE_VALUES = 5


# --- Predictions -------------------------------------------------------------------------------


def model_predictions(settings: Settings, dataset: pd.DataFrame | Path) -> PredictionResult:
    """The deployed model's predictions for a dataset (a frame or a CSV file), in its order."""
    schema = settings.schema
    if isinstance(dataset, pd.DataFrame):
        frame = validate_frame(dataset, schema, source="the dataset", require_target=False)
    else:
        frame = read_dataset(Path(dataset), schema, require_target=False)
    model, release = load_deployed(settings)
    return predict_frame(model, release.version, frame, schema)


# --- The master dataset ------------------------------------------------------------------------


def summary_statistics(settings: Settings) -> dict[str, dict[str, float | None]]:
    """Mean, median, standard deviation, min, max and count of each numeric column."""
    return _statistics_of(_read_master_or_raise(settings), settings.schema)


def missing_data(settings: Settings) -> dict[str, float]:
    """The percentage of missing cells in each column of the master dataset."""
    return _missing_of(_read_master_or_raise(settings))


def _read_master_or_raise(settings: Settings) -> pd.DataFrame:
    master = read_master(settings)
    if master.empty:
        raise InsufficientDataError(
            f"the master dataset {settings.finaldata_path} is missing or empty: "
            "run ingestion.py first"
        )
    return master


def _statistics_of(master: pd.DataFrame, schema: Schema) -> dict[str, dict[str, float | None]]:
    statistics = {}
    for column in schema.numeric_features:
        values = master[column].astype("float64").dropna()
        statistics[column] = {
            "mean": _number(values.mean()),
            "median": _number(values.median()),
            # The sample standard deviation (ddof=1), as pandas and most tools report it.
            "std": _number(values.std()),
            "min": _number(values.min()),
            "max": _number(values.max()),
            "count": int(len(values)),
        }
    return statistics


def _missing_of(master: pd.DataFrame) -> dict[str, float]:
    return {column: float(master[column].isna().mean() * 100) for column in master.columns}


def _distinct_clients(master: pd.DataFrame, schema: Schema) -> int:
    ids = list(schema.id_columns)
    if len(ids) == 1:  # the usual case: a hash table of one column, no frame of the duplicates
        return int(master[ids[0]].nunique(dropna=False))
    return int(len(master.drop_duplicates(subset=ids)))


def _master_overview(master: pd.DataFrame, schema: Schema) -> dict[str, Any]:
    """Size and leaver share of the master dataset, for the trends in the report."""
    return {
        "rows": len(master),
        "clients": _distinct_clients(master, schema),
        "leaver_share": _number(master[schema.target].astype("float64").mean()),
    }


# --- Timing ------------------------------------------------------------------------------------


def recorded_stage_timings(settings: Settings) -> dict[str, float]:
    """Seconds each stage took the last time it really ran (cycle or by hand), from the records."""
    rows = records.query(
        settings.records_path,
        "SELECT stage, seconds FROM stage_runs WHERE id IN "
        "(SELECT MAX(id) FROM stage_runs GROUP BY stage) ORDER BY id",
    )
    if not rows:
        raise InsufficientDataError("no stage has recorded a run yet: run fullprocess.py")
    return {row["stage"]: row["seconds"] for row in rows}


def stage_timings(settings: Settings) -> dict[str, float]:
    """Seconds that ingestion and training take, measured now on a scratch copy of the source data.

    Only on request (diagnostics.py --time-stages): both stages run in-process on copies in a
    temporary folder, with their own records database, so the measurement never changes ingested
    data, models, production files or records, and their log lines are held back so that nobody
    reads "trained model ..." as a real training.
    """
    # Imported here: the API and the report import this module and never re-run a stage.
    from ingestion import ingest, list_source_files
    from training import train

    sources = list_source_files(settings)
    with tempfile.TemporaryDirectory(prefix="risk-timing-") as folder, _quiet_stages():
        scratch = Path(folder)
        (scratch / "sourcedata").mkdir()
        for path in sources:
            shutil.copyfile(path, scratch / "sourcedata" / path.name)
        # Neither stage reads the test data, so it stays where it is rather than being copied.
        scratch_settings = settings._replace(
            input_folder=scratch / "sourcedata",
            output_folder=scratch / "ingesteddata",
            model_folder=scratch / "models",
            deployment_folder=scratch / "production_deployment",
            log_path=scratch / "logs" / "timing.log",
        )
        log.info("timing ingestion and training of %d source file(s) on a copy", len(sources))
        started = time.perf_counter()
        ingest(scratch_settings)
        ingested = time.perf_counter()
        train(scratch_settings)
        trained = time.perf_counter()
    return {"ingestion": round(ingested - started, 3), "training": round(trained - ingested, 3)}


@contextlib.contextmanager
def _quiet_stages() -> Iterator[None]:
    stage_logs = [logging.getLogger(name) for name in ("ingestion", "training")]
    levels = [stage_log.level for stage_log in stage_logs]
    for stage_log in stage_logs:
        stage_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for stage_log, level in zip(stage_logs, levels, strict=True):
            stage_log.setLevel(level)


# --- Dependencies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """One line of requirements.txt."""

    name: str
    specifier: str  # "==2.4.6", ">=1.0", or "" for none

    @property
    def key(self) -> str:
        return normalized_name(self.name)

    @property
    def pinned(self) -> str | None:
        if self.specifier.startswith("==") and "," not in self.specifier:
            return self.specifier[2:].strip()
        return None


_REQUIREMENT_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def normalized_name(name: str) -> str:
    """A package name as the package index compares names (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path) -> list[Requirement]:
    """The packages requirements.txt names, in its order; options and comments are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"no requirements file at {path}") from None
    requirements = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = _REQUIREMENT_LINE.match(line)
        if match is None:
            log.warning("%s line %d is not a requirement I can read: %r", path, number, raw)
            continue
        requirements.append(Requirement(match.group(1), match.group(2).replace(" ", "")))
    return requirements


def dependency_status(
    settings: Settings, *, refresh: bool = False, requirements_path: Path | None = None
) -> list[dict[str, Any]]:
    """Each requirement with its pinned, installed and latest version, and what looks wrong.

    The latest versions come from the package index through pip itself, asked concurrently with a
    time limit and cached (settings.diagnostics.dependency_cache_hours); offline, "latest" is
    "unknown" with pip's reason. `trained_with` is the version the deployed model was trained with.
    """
    requirements = read_requirements(requirements_path or DEFAULT_REQUIREMENTS_PATH)
    trained_with = _training_versions(settings)
    answers = _latest_versions(settings, [r.key for r in requirements], refresh=refresh)
    return [_dependency_row(r, answers[r.key], trained_with.get(r.key)) for r in requirements]


def _training_versions(settings: Settings) -> dict[str, str]:
    try:
        versions = current_release(settings).metadata().get("library_versions", {})
    except ModelNotDeployedError:
        return {}
    return {normalized_name(name): str(version) for name, version in versions.items()}


def _latest_versions(
    settings: Settings, keys: list[str], *, refresh: bool
) -> dict[str, dict[str, Any]]:
    """Answers of the package index per package: from the cache while fresh, else from pip."""
    cache_path = settings.dependency_cache_path
    cached = {} if refresh else _read_dependency_cache(cache_path)
    now = datetime.now(UTC)
    answers = {
        key: cached[key] for key in keys
        if key in cached and _still_fresh(cached[key], now, settings.diagnostics)
    }
    to_ask = [key for key in keys if key not in answers]
    if to_ask:
        timeout = settings.diagnostics.pip_timeout_seconds
        with ThreadPoolExecutor(max_workers=min(len(to_ask), MAX_PIP_PROCESSES)) as pool:
            answered = pool.map(lambda key: ask_index(key, timeout), to_ask)
            fresh = dict(zip(to_ask, answered, strict=True))
        answers.update(fresh)
        known = _read_dependency_cache(cache_path)
        atomicio.write_json(cache_path, {"packages": {**known, **fresh}})
    return answers


def _read_dependency_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        packages = atomicio.read_json(path).get("packages", {})
    except FileNotFoundError:
        return {}
    except (ValueError, AttributeError) as error:
        log.warning("ignoring unreadable dependency cache %s: %s", path, error)
        return {}
    return packages if isinstance(packages, dict) else {}


def _still_fresh(answer: dict[str, Any], now: datetime, options: DiagnosticsSettings) -> bool:
    try:
        checked_at = datetime.fromisoformat(answer["checked_at"])
    except (KeyError, TypeError, ValueError):
        return False
    if answer.get("latest"):
        hours = options.dependency_cache_hours
    else:
        hours = options.dependency_retry_hours
    return timedelta(0) <= now - checked_at < timedelta(hours=hours)


def ask_index(name: str, timeout: float) -> dict[str, Any]:
    """The newest version of `name` on the package index pip is configured with, or why not."""
    command = [
        sys.executable, "-m", "pip", "index", "versions", name,
        "--retries", "0",
        # Socket timeout: half the time limit leaves pip room to report the failure itself.
        "--timeout", f"{max(timeout / 2, 1):g}",
        "--disable-pip-version-check", "--no-input",
    ]
    latest, error = None, None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        error = f"the package index did not answer within {timeout:g} s"
    except OSError as failure:
        error = f"cannot run pip: {failure}"
    else:
        match = re.match(r"\S+ \(([^)]+)\)", done.stdout.strip())
        if done.returncode == 0 and match:
            latest = match.group(1)
        else:
            error = _pip_failure(name, done)
    if error:
        log.info("latest version of %s unknown: %s", name, error)
    return {"latest": latest, "error": error, "checked_at": records.utc_now()}


def _pip_failure(name: str, done: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    if any("No matching distribution" in line for line in errors):
        # pip says the same whether the index is unreachable or lacks the package; say both.
        return (
            f"pip found no release of {name} on its package index "
            "(offline, or not published there)"
        )
    return (errors[-1] if errors else f"pip exited with code {done.returncode}")[:300]


def _dependency_row(
    requirement: Requirement, answer: dict[str, Any], trained_with: str | None
) -> dict[str, Any]:
    installed = _installed_version(requirement.name)
    latest = answer.get("latest")
    in_use = requirement.pinned or installed
    flags = []
    if installed is None:
        flags.append("not installed")
    elif requirement.pinned and installed != requirement.pinned:
        flags.append("installed differs from pin")
    if latest and in_use and _is_newer(latest, in_use):
        flags.append("outdated")
    if trained_with and installed and trained_with != installed:
        flags.append("differs from training")
    return {
        "package": requirement.name,
        "pinned": requirement.pinned or requirement.specifier or None,
        "installed": installed,
        "latest": latest or "unknown",
        "latest_error": None if latest else answer.get("error"),
        "checked_at": answer.get("checked_at"),
        "trained_with": trained_with,
        "flags": flags,
    }


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_newer(candidate: str, current: str) -> bool:
    try:
        return Version(candidate) > Version(current)
    except InvalidVersion:
        return candidate != current


# --- Data drift --------------------------------------------------------------------------------
#
# The tests and thresholds are Evidently's defaults (https://docs.evidentlyai.com/reference/
# data-drift-algorithm): with at most 1000 reference rows, a numeric column (more than 5 distinct
# values) gets the two-sample Kolmogorov-Smirnov test, a categorical or few-valued column the
# chi-squared test (a z-test of proportions when it has two values), drift when p < 0.05; with more
# rows, the Wasserstein distance normed by the reference's standard deviation for numeric columns
# and the Jensen-Shannon distance for the others, drift when the distance exceeds 0.1; the dataset
# drifts when at least half of its features do. Two choices of ours: count columns are compared on
# the log1p scale the model sees them on (a fall of activity by a third is invisible to a distance
# normed by the huge standard deviation of raw, heavy-tailed counts), and the chi-squared test is
# the two-sample test of a contingency table, so that a category new in the batch is no error.


Verdict = dict[str, Any]  # test, statistic, p_value, threshold, drifted


def data_drift(
    settings: Settings, newest_batch: Callable[[], pd.DataFrame] | None = None
) -> dict[str, Any]:
    """Per-feature drift between the deployed model's training sample and the newest batch.

    `newest_batch` gives the batch (read_newest_batch's answer) when it is being read already.
    """
    release = current_release(settings)
    batch_path = settings.latest_batch_path
    reference = read_dataset(release.training_sample_path, settings.schema)
    current = newest_batch() if newest_batch is not None else read_newest_batch(settings)
    result = compare_datasets(reference, current, settings.schema, settings.diagnostics)
    return {
        "model_version": release.version,
        "reference": {"path": str(release.training_sample_path), "rows": len(reference)},
        "current": {"path": str(batch_path), "rows": len(current)},
        **result,
    }


def read_newest_batch(settings: Settings) -> pd.DataFrame:
    """The features and target of the newest batch ingestion added (latestbatch.csv)."""
    batch_path = settings.latest_batch_path
    if not batch_path.is_file():
        raise DataError(f"no newest batch at {batch_path}: ingest new data first")
    return _read_ingested(batch_path, settings.schema)


def _read_ingested(path: Path, schema: Schema) -> pd.DataFrame:
    """The features and target of a batch ingestion wrote, typed: the drift tests need no more.

    Every row was validated when it was ingested, so it is only typed again here (validating a
    million rows again took longer than every drift test together), and the client ids, which
    cost most to read as text, are not read at all.
    """
    columns = schema.features + (schema.target,)
    name = f"newest batch {path}"
    with open(path, "rb") as stream:
        header = read_header(stream, name=name)
    missing = [column for column in columns if column not in header]
    if missing:
        raise DataError(f"{name} lacks column(s) {', '.join(missing)}: ingest new data again")
    frame = read_csv(path, schema, name=name, columns=list(columns))
    return typed(frame, schema, columns)


def compare_datasets(
    reference: pd.DataFrame, current: pd.DataFrame, schema: Schema, options: DiagnosticsSettings
) -> dict[str, Any]:
    """Drift of each feature, the share of drifted features, the verdict and the leaver shares.

    `current` may be a roster, without the target: its leaver shares are then None.
    """
    features = [
        _feature_drift(column, reference[column], current[column], schema, options)
        for column in schema.features
    ]
    tested = [f for f in features if f["drifted"] is not None]
    drifted = [f["feature"] for f in tested if f["drifted"]]
    share = len(drifted) / len(tested) if tested else None
    return {
        "features": features,
        "drifted_features": drifted,
        "drift_share": share,
        "drift_share_threshold": options.drift_share,
        "dataset_drift": share is not None and share >= options.drift_share,
        # A roster has no target: its share of leavers is what nobody knows yet.
        "leavers": _leaver_change(reference[schema.target], current[schema.target], options)
        if schema.target in current.columns else None,
    }


def _feature_drift(
    column: str, reference: pd.Series, current: pd.Series, schema: Schema,
    options: DiagnosticsSettings,
) -> dict[str, Any]:
    reference, current = reference.dropna(), current.dropna()
    result: dict[str, Any] = {
        "feature": column,
        "type": "numeric" if column in schema.numeric_features else "categorical",
        "reference_rows": len(reference),
        "current_rows": len(current),
    }
    if reference.empty or current.empty:
        return {**result, "test": None, "statistic": None, "p_value": None, "threshold": None,
                "drifted": None, "note": "no values to compare"}
    small = len(reference) <= options.drift_small_sample_rows
    if result["type"] == "numeric":
        ref = reference.to_numpy(dtype="float64")
        cur = current.to_numpy(dtype="float64")
        distinct = len(np.unique(np.concatenate([ref, cur])))
    else:
        distinct = pd.concat([reference.astype("str"), current.astype("str")]).nunique()
    if result["type"] == "numeric" and distinct > MAX_CATEGORY_LIKE_VALUES:
        if column in schema.count_columns:
            ref, cur = np.log1p(ref), np.log1p(cur)
        test = _ks_test(ref, cur, options) if small else _wasserstein(ref, cur, options)
    elif small:
        test = _z_test(reference, current, options) if distinct <= 2 else _chi_squared(
            reference, current, options)
    else:
        test = _jensen_shannon(reference, current, options)
    return {**result, **test}


def _ks_test(ref: np.ndarray, cur: np.ndarray, options: DiagnosticsSettings) -> Verdict:
    from scipy import stats  # scipy.stats takes 0.4 s to import; only a drift check needs it

    outcome = stats.ks_2samp(ref, cur)
    return _p_value_verdict("Kolmogorov-Smirnov", outcome.statistic, outcome.pvalue, options)


def _wasserstein(ref: np.ndarray, cur: np.ndarray, options: DiagnosticsSettings) -> Verdict:
    scale = np.std(ref) or np.std(np.concatenate([ref, cur]))
    distance = wasserstein_distance(ref, cur) / scale if scale else 0.0
    return _distance_verdict("Wasserstein distance (normed)", distance, options)


def wasserstein_distance(u: np.ndarray, v: np.ndarray) -> float:
    """The first Wasserstein distance of two samples: the area between their distribution functions.

    What scipy.stats.wasserstein_distance computes; both CDFs are steps that change only at the
    samples' distinct values, so evaluating them there is exact and ten times faster on a million
    values of few distinct ones (scipy evaluates at every value, and costs 0.4 s to import).
    """
    values = np.unique(np.concatenate([u, v]))
    u_cdf = np.searchsorted(np.sort(u), values[:-1], side="right") / len(u)
    v_cdf = np.searchsorted(np.sort(v), values[:-1], side="right") / len(v)
    return float(np.sum(np.abs(u_cdf - v_cdf) * np.diff(values)))


def _category_counts(reference: pd.Series, current: pd.Series) -> np.ndarray:
    """A 2 x categories table of counts: reference in the first row, current in the second."""
    table = pd.DataFrame({
        "reference": reference.astype("str").value_counts(),
        "current": current.astype("str").value_counts(),
    }).fillna(0).sort_index()
    return table.to_numpy(dtype="float64").T


def _chi_squared(reference: pd.Series, current: pd.Series, options: DiagnosticsSettings) -> Verdict:
    from scipy import stats

    outcome = stats.chi2_contingency(_category_counts(reference, current), correction=False)
    return _p_value_verdict("chi-squared", outcome.statistic, outcome.pvalue, options)


def _z_test(reference: pd.Series, current: pd.Series, options: DiagnosticsSettings) -> Verdict:
    counts = _category_counts(reference, current)
    statistic, p_value = two_proportion_z(
        counts[0, 0], counts[0].sum(), counts[1, 0], counts[1].sum()
    )
    return _p_value_verdict("z-test of proportions", statistic, p_value, options)


def _jensen_shannon(
    reference: pd.Series, current: pd.Series, options: DiagnosticsSettings
) -> Verdict:
    from scipy.spatial.distance import jensenshannon

    counts = _category_counts(reference, current)
    distance = float(jensenshannon(counts[0] / counts[0].sum(), counts[1] / counts[1].sum()))
    return _distance_verdict("Jensen-Shannon distance", distance, options)


def _p_value_verdict(
    test: str, statistic: float, p_value: float, options: DiagnosticsSettings
) -> Verdict:
    return {
        "test": test,
        "statistic": float(statistic),
        "p_value": float(p_value),
        "threshold": options.drift_p_value,
        "drifted": bool(p_value < options.drift_p_value),
    }


def _distance_verdict(test: str, distance: float, options: DiagnosticsSettings) -> Verdict:
    return {
        "test": test,
        "statistic": float(distance),
        "p_value": None,
        "threshold": options.drift_distance_threshold,
        "drifted": bool(distance > options.drift_distance_threshold),
    }


def _leaver_change(
    reference: pd.Series, current: pd.Series, options: DiagnosticsSettings
) -> dict[str, Any]:
    reference = reference.dropna().astype("float64")
    current = current.dropna().astype("float64")
    ref_share, cur_share = float(reference.mean()), float(current.mean())
    _, p_value = two_proportion_z(reference.sum(), len(reference), current.sum(), len(current))
    return {
        "reference_share": ref_share,
        "current_share": cur_share,
        "change": cur_share - ref_share,
        "p_value": p_value,
        "significant": bool(p_value < options.drift_p_value),
    }


# --- All of them -------------------------------------------------------------------------------


def run_diagnostics(
    settings: Settings,
    *,
    time_stages: bool = False,
    dependencies: bool = True,
    refresh_dependencies: bool = False,
) -> dict[str, Any]:
    """Compute every diagnostic from what is recorded, record the run, and return it as JSON data.

    Diagnostics read; they do not redo: stage timings are those the stages recorded when they ran
    (`time_stages` times ingestion and training again on a scratch copy, for the command line only).
    The dependency check asks the package index in the background while the other sections are
    computed, and waits for it at most `diagnostics.dependency_wait_seconds`; an answer that comes
    later is cached for the next run.

    A section that cannot be computed (nothing ingested, nothing deployed, no new batch) is None,
    with its reason under "unavailable", so one missing piece never hides the others.
    """
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "time": records.utc_now(),
        "model_version": _deployed_version(settings),
    }
    unavailable: dict[str, str] = {}
    pending_dependencies = (
        _Background(lambda: dependency_status(settings, refresh=refresh_dependencies))
        if dependencies else None
    )
    master = functools.cache(lambda: _read_master_or_raise(settings))
    # Read beside the master dataset: pandas parses CSV without holding the interpreter, so on
    # two cores the second file costs little (a million rows each: 0.35 s saved).
    batch_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="newest-batch")
    newest_batch = batch_reader.submit(read_newest_batch, settings)
    sections: dict[str, Callable[[], Any] | str] = {
        "master_dataset": lambda: _master_overview(master(), settings.schema),
        "summary_statistics": lambda: _statistics_of(master(), settings.schema),
        "missing_data": lambda: _missing_of(master()),
        "stage_timings": (
            (lambda: stage_timings(settings)) if time_stages
            else (lambda: recorded_stage_timings(settings))
        ),
        "dependencies": (
            (lambda: pending_dependencies.result(settings.diagnostics.dependency_wait_seconds))
            if pending_dependencies else "skipped on request"
        ),
        "data_drift": lambda: data_drift(settings, newest_batch.result),
        "calibration": lambda: release_calibration(settings),
        "roster_estimate": lambda: latest_roster_estimate(settings),
    }
    with batch_reader:
        for name, compute in sections.items():
            if isinstance(compute, str):
                payload[name], unavailable[name] = None, compute
                continue
            try:
                payload[name] = json_safe(compute())
            except PipelineError as error:
                payload[name], unavailable[name] = None, str(error)
                log.warning("diagnostics: %s not available: %s", name.replace("_", " "), error)
    payload["stage_timings_source"] = (
        "measured now on a scratch copy" if time_stages else "recorded when each stage last ran"
    )
    payload["unavailable"] = unavailable
    payload["seconds"] = round(time.perf_counter() - started, 3)
    records.add(
        settings.records_path,
        "diagnostics",
        {"time": payload["time"], "model_version": payload["model_version"], "payload": payload},
    )
    return payload


def release_calibration(settings: Settings) -> dict[str, Any] | None:
    """The served release's calibration on the test data (reliability curve, Brier score, ECE)."""
    version = _deployed_version(settings)
    rows = records.query(
        settings.records_path,
        "SELECT time, model_version, data_path, rows, brier, ece, curve FROM calibrations "
        "WHERE model_version = ? AND purpose = 'test' ORDER BY id DESC LIMIT 1",
        (version,),
    )
    if not rows:
        return None
    return {**rows[0], "curve": json.loads(rows[0]["curve"])}


def latest_roster_estimate(settings: Settings) -> dict[str, Any] | None:
    """The newest estimate of performance on a roster, with its warning and drift verdict."""
    rows = records.query(settings.records_path, "SELECT * FROM estimates ORDER BY id DESC LIMIT 1")
    if not rows:
        return None
    row = rows[0]
    drift = json.loads(row.pop("drift") or "null") or {}
    row["drifted_features"] = drift.get("drifted_features", [])
    row["drift_share"] = drift.get("drift_share")
    return row


def estimate_history(settings: Settings) -> list[dict[str, Any]]:
    """Every roster estimate beside its realised F1 (None until outcomes arrive), oldest first."""
    return records.query(
        settings.records_path,
        "SELECT id, time, roster, model_version, rows, f1, f1_low, f1_high, warning, "
        "realised_rows, realised_f1, estimated_f1_known FROM estimates ORDER BY id",
    )


class _Background:
    """A computation running in a thread of its own, whose result is waited for a bounded time."""

    def __init__(self, compute: Callable[[], Any]) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(compute,), name="dependencies")
        self._thread.start()

    def _run(self, compute: Callable[[], Any]) -> None:
        try:
            self._result = compute()
        except BaseException as error:  # handed to the caller of result()
            self._error = error

    def result(self, wait_seconds: float) -> Any:
        self._thread.join(wait_seconds)
        if self._thread.is_alive():
            raise DependencyCheckPending(
                f"the package index is still being asked after {wait_seconds:g} s; the answer "
                "is cached for the next diagnostics run"
            )
        if self._error is not None:
            raise self._error
        return self._result


def latest_diagnostics(settings: Settings) -> dict[str, Any] | None:
    """The most recently recorded diagnostics run, or None before the first."""
    rows = records.query(
        settings.records_path, "SELECT payload FROM diagnostics ORDER BY id DESC LIMIT 1"
    )
    return json.loads(rows[0]["payload"]) if rows else None


def _deployed_version(settings: Settings) -> str | None:
    try:
        return current_release(settings).version
    except PipelineError:
        return None


def json_safe(value: Any) -> Any:
    """`value` with numpy numbers made plain and NaN or infinity made None, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _number(value)
    return value


def _number(value: Any) -> float | None:
    """A plain float, or None for a missing, NaN or infinite value."""
    if value is None or value is pd.NA:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


# --- Reading it --------------------------------------------------------------------------------


def describe(payload: dict[str, Any]) -> str:
    """The diagnostics as text a person reads in a terminal (the report uses the same tables)."""
    model = payload.get("model_version") or "none"
    lines = [
        f"Diagnostics of {payload['time']}, deployed model {model} "
        f"({payload.get('seconds', 0):.1f} s)"
    ]
    for title, section_lines in section_texts(payload).items():
        lines += ["", title, *section_lines]
    return "\n".join(lines)


def section_texts(payload: dict[str, Any]) -> dict[str, list[str]]:
    """Title -> lines of fixed-width text for each section of a diagnostics payload."""
    unavailable = payload.get("unavailable", {})

    def text(name: str, render: Callable[[Any], list[str]]) -> list[str]:
        if payload.get(name) is None:
            return [f"  not available: {unavailable.get(name, 'not computed')}"]
        return render(payload[name])

    return {
        "Master dataset": text("master_dataset", _master_lines),
        "Summary statistics": text("summary_statistics", _statistics_lines),
        "Missing data": text("missing_data", _missing_lines),
        "Stage timings": text("stage_timings", _timing_lines),
        "Data drift": text("data_drift", _drift_lines),
        "Calibration on the test data": text("calibration", _calibration_lines),
        "Estimated performance on the newest roster": text("roster_estimate", _estimate_lines),
        "Dependencies": text("dependencies", _dependency_lines),
    }


def _calibration_lines(measured: dict[str, Any]) -> list[str]:
    lines = [f"  {measured['rows']} rows: Brier score {measured['brier']:.4f}, expected "
             f"calibration error {measured['ece']:.4f}",
             "  predicted    rows  mean predicted  observed"]
    for step in measured["curve"]:
        lines.append(
            f"  {step['low']:.1f}-{step['high']:.1f} {step['rows']:>8}  "
            f"{_fmt(step['mean_predicted'], 3):>14}  {_fmt(step['observed_share'], 3):>8}"
        )
    return lines


def _estimate_lines(estimate: dict[str, Any]) -> list[str]:
    lines = [
        f"  roster {estimate['roster']} ({estimate['rows']} clients), release "
        f"{estimate['model_version']}, {estimate['time']}",
        f"  F1 {estimate['f1']:.3f} ({estimate['f1_low']:.3f} to {estimate['f1_high']:.3f}), "
        f"precision {estimate['precision']:.3f}, recall {estimate['recall']:.3f}",
        f"  share of leavers {estimate['leaver_share']:.1%} ({estimate['leaver_share_low']:.1%} "
        f"to {estimate['leaver_share_high']:.1%})",
        f"  drifted features: {', '.join(estimate['drifted_features']) or 'none'}; early warning: "
        f"{'yes' if estimate.get('warning') else 'no'}",
    ]
    if estimate.get("realised_f1") is not None:
        lines.append(
            f"  realised F1 {estimate['realised_f1']:.3f} for {estimate['realised_rows']} clients "
            f"whose outcome arrived (estimated {estimate['estimated_f1_known']:.3f} for them)"
        )
    return lines


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _fmt_value(value: Any) -> str:
    """A value of the data (min, median, max) with the data's own digits: 18.25, not 18."""
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return f"{value:,.0f}"
    return f"{round(value, 6):,}" if isinstance(value, float) else str(value)


def _master_lines(overview: dict[str, Any]) -> list[str]:
    share = overview["leaver_share"]
    return [
        f"  {overview['rows']:,} rows, {overview['clients']:,} clients, "
        f"{'-' if share is None else f'{share:.1%}'} of rows are clients who left"
    ]


def _statistics_lines(statistics: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"  {'column':<22}{'mean':>12}{'median':>12}{'std':>12}{'min':>10}{'max':>12}"
        f"{'count':>8}"
    ]
    for column, s in statistics.items():
        lines.append(
            f"  {column:<22}{_fmt(s['mean']):>12}{_fmt_value(s['median']):>12}"
            f"{_fmt(s['std']):>12}{_fmt_value(s['min']):>10}{_fmt_value(s['max']):>12}"
            f"{s['count']:>8}"
        )
    return lines


def _missing_lines(missing: dict[str, float]) -> list[str]:
    return [f"  {column:<22}{percent:>8.2f} %" for column, percent in missing.items()]


def _timing_lines(timings: dict[str, float]) -> list[str]:
    return [f"  {stage:<22}{seconds:>8.2f} s" for stage, seconds in timings.items()]


def _drift_lines(drift: dict[str, Any]) -> list[str]:
    share = drift["drift_share"]
    verdict = "DATASET DRIFT" if drift["dataset_drift"] else "no dataset drift"
    lines = [
        f"  training sample of {drift['model_version']} ({drift['reference']['rows']:,} rows) "
        f"vs newest batch ({drift['current']['rows']:,} rows):",
        f"  {verdict}: {len(drift['drifted_features'])} of {len(drift['features'])} features "
        f"drifted ({'-' if share is None else f'{share:.0%}'}; "
        f"threshold {drift['drift_share_threshold']:.0%})",
        f"  {'feature':<22}{'test':<32}{'value':>10}{'threshold':>11}  drifted",
    ]
    for f in drift["features"]:
        if f["p_value"] is not None:
            value = f"p={f['p_value']:.4f}"
        elif f["statistic"] is not None:
            value = f"d={f['statistic']:.4f}"
        else:
            value = "-"
        verdict = {True: "YES", False: "no", None: "-"}[f["drifted"]]
        lines.append(
            f"  {f['feature']:<22}{(f['test'] or '-'):<32}{value:>10}"
            f"{_fmt(f['threshold']):>11}  {verdict}"
        )
    leavers = drift["leavers"]
    lines.append(
        f"  leavers: {leavers['reference_share']:.1%} in training, {leavers['current_share']:.1%} "
        f"in the batch ({leavers['change'] * 100:+.1f} points, p={leavers['p_value']:.4f})"
    )
    return lines


def _dependency_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"  {'package':<16}{'pinned':<12}{'installed':<12}{'latest':<12}{'trained':<10}flags"]
    for row in rows:
        lines.append(
            f"  {row['package']:<16}{_fmt(row['pinned']):<12}{_fmt(row['installed']):<12}"
            f"{row['latest']:<12}{_fmt(row['trained_with']):<10}{', '.join(row['flags']) or 'ok'}"
        )
    reasons = sorted({row["latest_error"] for row in rows if row["latest_error"]})
    lines += [f"  latest unknown: {reason}" for reason in reasons]
    return lines


# --- Command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the diagnostics as JSON")
    parser.add_argument(
        "--time-stages", action="store_true",
        help="time ingestion and training again on a scratch copy of the source data (slow) "
        "instead of reporting the times they recorded when they last ran",
    )
    parser.add_argument(
        "--no-dependencies", action="store_true", help="skip the dependency check"
    )
    parser.add_argument(
        "--refresh-dependencies", action="store_true",
        help="ask the package index now instead of using cached answers",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    payload = run_diagnostics(
        settings,
        time_stages=args.time_stages,
        dependencies=not args.no_dependencies,
        refresh_dependencies=args.refresh_dependencies,
    )
    print(json.dumps(payload, indent=2) if args.json else describe(payload))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
