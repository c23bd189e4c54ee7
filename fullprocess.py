"""The automated cycle cron runs every 10 minutes: new data? model drift? then retrain and redeploy.

    python fullprocess.py [--config PATH] [--dry-run] [--force]

Almost every run finds nothing new and must cost little more than starting Python, so this module
and what it imports at the top (ingestion, deployment, records, settings) never load pandas,
scikit-learn or matplotlib: the stages that need them are imported only once there is work to do.
For the same reason these modules define no dataclasses, and cron's plain command line is read
without argparse.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

import atomicio
import deployment
import ingestion
import locks
import records
from errors import CycleBusyError, PipelineError, run_cli
from settings import DriftSettings, Settings, add_config_argument, load_settings

if TYPE_CHECKING:
    import argparse

    import pandas as pd
    from sklearn.base import ClassifierMixin

    from deployment import Release
    from ingestion import IngestReport
    from scoring import ModelComparison
    from training import TrainingResult

log = logging.getLogger("fullprocess")

LOCK_NAME = locks.LOCK_NAME
# On drift, this share of the new rows is kept out of retraining to judge the retrained model.
HELD_OUT_SHARE = 0.3
MIN_HELD_OUT_ROWS = 20


class DriftDecision(NamedTuple):
    """Whether the deployed model has drifted on new data, and the numbers behind the verdict."""

    drifted: bool
    reason: str
    numbers: dict[str, Any]


class DeployDecision(NamedTuple):
    """Whether a retrained model replaces the deployed one."""

    deploy: bool
    reason: str
    numbers: dict[str, Any]


class CycleOutcome(NamedTuple):
    """What one cycle found, decided and did, built once the cycle knows.

    A NamedTuple rather than a dataclass, because defining dataclasses at import slows the no-op
    cycle, which is nearly every cycle.
    """

    decision: str
    message: str
    new_files: list[str]
    release: str | None = None
    details: dict[str, Any] | None = None
    steps: tuple[str, ...] = ()

    def summary(self) -> str:
        lines = [f"{self.decision}: {self.message}"]
        lines += [f"  - {step}" for step in self.steps]
        return "\n".join(lines)


class Trouble(str):
    """A step that went wrong without stopping the cycle ("report failed: ...; will retry"); the
    cycle's message repeats it, so that the log line and the record say what really happened."""

    __slots__ = ()


class Journal:
    """The steps a cycle took and the numbers behind its decisions, in the order they happened."""

    __slots__ = ("new_files", "steps", "details", "troubles")

    def __init__(self, new_files: list[str]) -> None:
        self.new_files = new_files
        self.steps: list[str] = []
        self.details: dict[str, Any] = {}
        self.troubles: list[str] = []

    def add(self, step: str, **details: Any) -> None:
        self.steps.append(step)
        self.details.update(details)
        if isinstance(step, Trouble):
            self.troubles.append(step)

    def outcome(self, decision: str, message: str, release: str | None = None) -> CycleOutcome:
        return CycleOutcome(
            decision, "; ".join([message, *self.troubles]), self.new_files, release,
            dict(self.details), tuple(self.steps),
        )


# ---------------------------------------------------------------------------------------------
# The decisions: small pure functions.


def standard_error_from_interval(low: float | None, high: float | None, z: float) -> float:
    """The standard error a symmetric normal interval of width high - low implies (0 if unknown)."""
    if low is None or high is None:
        return 0.0
    return max(high - low, 0.0) / (2 * z)


def drift_decision(
    deployed_f1: float,
    deployed_interval: tuple[float | None, float | None],
    new_f1: float,
    new_interval: tuple[float, float],
    rule: DriftSettings,
    z: float = 1.96,
) -> DriftDecision:
    """Has F1 fallen on new data by more than the rule allows? See DriftSettings for the rules."""
    drop = deployed_f1 - new_f1
    numbers: dict[str, Any] = {
        "deployed_f1": deployed_f1,
        "new_f1": new_f1,
        "new_f1_interval": list(new_interval),
        "drop": drop,
        "rule": rule.rule,
        "tolerance": rule.tolerance,
    }
    if rule.rule == "raw":
        allowed = rule.tolerance
    else:
        noise = math.hypot(
            standard_error_from_interval(*deployed_interval, z),
            standard_error_from_interval(*new_interval, z),
        )
        allowed = z * noise + rule.tolerance
        numbers["noise_band"] = z * noise
    numbers["allowed_drop"] = allowed
    if drop > allowed:
        return DriftDecision(
            True,
            f"F1 fell from {deployed_f1:.3f} to {new_f1:.3f} (drop {drop:.3f} > allowed "
            f"{allowed:.3f})",
            numbers,
        )
    return DriftDecision(
        False,
        f"F1 {new_f1:.3f} on new data vs deployed {deployed_f1:.3f} (drop {drop:.3f} within "
        f"allowed {allowed:.3f})",
        numbers,
    )


def base_rate_change(
    reference_share: float | None, reference_rows: int | None, new_share: float, new_rows: int,
    z: float = 1.96,
) -> dict[str, Any]:
    """Did the share of leavers change beyond chance? F1 moves with it even when the model does not."""
    from scoring import two_proportion_z

    if reference_share is None or not reference_rows:
        return {"new_leaver_share": new_share, "changed": None}
    z_score, _ = two_proportion_z(
        new_share * new_rows, new_rows, reference_share * reference_rows, reference_rows
    )
    return {
        "reference_leaver_share": reference_share,
        "new_leaver_share": new_share,
        "change": new_share - reference_share,
        "z": z_score,
        "changed": abs(z_score) > z,
    }


def deploy_decision(
    comparison: ModelComparison, evaluation: str, forced: bool = False
) -> DeployDecision:
    """Deploy the retrained model unless it is clearly worse than the deployed one on the same rows."""
    numbers = {**comparison.as_dict(), "evaluated_on": evaluation}
    if forced:
        return DeployDecision(True, "forced retrain: deploying regardless of scores", numbers)
    if comparison.candidate_significantly_worse:
        return DeployDecision(
            False,
            f"retrained model is worse on {evaluation}: F1 {comparison.candidate_f1:.3f} vs "
            f"deployed {comparison.deployed_f1:.3f} (difference interval "
            f"{comparison.difference_low:+.3f} to {comparison.difference_high:+.3f}); keeping "
            "the deployed model",
            numbers,
        )
    return DeployDecision(
        True,
        f"retrained model F1 {comparison.candidate_f1:.3f} vs deployed "
        f"{comparison.deployed_f1:.3f} on {evaluation}: not worse, deploying",
        numbers,
    )


# ---------------------------------------------------------------------------------------------
# The cycle.


def run_cycle(settings: Settings, *, force: bool = False) -> CycleOutcome:
    """One cycle: new data? drift? deploy? Each question is answered by a function below."""
    new_files = [source.path.name for source in ingestion.find_new_files(settings)]
    if not deployment.is_deployed(settings):
        return first_deployment(settings, new_files)
    if not new_files and not force:
        nothing_new = CycleOutcome("nothing-new", "no new data files", new_files)
        return refresh_outputs(settings, nothing_new)

    journal = Journal(new_files)
    accepted_rows = 0
    if new_files:
        report = ingest_new_files(settings, journal)
        accepted_rows = report.accepted_rows
        if not accepted_rows and not force:
            return journal.outcome("no-usable-rows", "new files added no new rows")
    if accepted_rows:
        drift = check_drift(settings)
        journal.add(f"drift check: {drift.reason}", drift=drift._asdict())
        if not drift.drifted and not force:
            return journal.outcome("no-drift", drift.reason)

    deployed_model, served = deployment.load_deployed_model(settings)
    candidate = retrain(settings, hold_out_new_rows=bool(accepted_rows))
    journal.add(candidate.describe())
    decision = deploy_decision(
        compare_with_deployed(settings, candidate, deployed_model), candidate.judged_on,
        forced=force,
    )
    journal.add(decision.reason, deploy=decision._asdict())
    if not decision.deploy:
        return journal.outcome("drift-kept-deployed", decision.reason, served.version)

    release = release_candidate(settings, candidate)
    journal.add(f"deployed release {release.version}")
    for step in after_deployment(settings):
        journal.add(step)
    return journal.outcome(
        "forced-redeploy" if force else "drift-redeployed",
        f"deployed release {release.version} (was {served.version})", release.version,
    )


def first_deployment(settings: Settings, new_files: list[str]) -> CycleOutcome:
    """Nothing deployed yet: ingest, train, score and deploy the first release."""
    journal = Journal(new_files)
    ingest_new_files(settings, journal)
    candidate = retrain(settings, hold_out_new_rows=False)
    journal.add(candidate.describe())
    release = deployment.deploy(settings)
    journal.add(f"deployed release {release.version}")
    for step in after_deployment(settings):
        journal.add(step)
    return journal.outcome(
        "first-deployment",
        f"deployed the first release {release.version} (F1 {candidate.test_f1:.3f})",
        release.version,
    )


def ingest_new_files(settings: Settings, journal: Journal) -> IngestReport:
    """Ingest the new files and note what became of each."""
    report = ingestion.ingest(settings)
    rejected = f", rejected {len(report.rejected)}" if report.rejected else ""
    journal.add(
        f"ingested {len(report.ingested)} file(s){rejected}: {report.accepted_rows} new rows "
        f"(master dataset {report.total_rows} rows)",
        ingestion=[f.as_dict() for f in report.files],
    )
    return report


def check_drift(settings: Settings) -> DriftDecision:
    """Score the deployed model on the newly ingested rows and compare with its deployed F1."""
    from scoring import normal_quantile, read_score_file, score

    release = deployment.current_release(settings)
    deployed_f1 = read_score_file(release.score_path)
    deployed_test_score = _recorded_release_score(settings, release.version)
    new = score(
        settings, model_path=release.model_path, data_path=settings.latest_batch_path,
        purpose="drift-check",
    ).metrics
    z = normal_quantile(settings.scoring.confidence)
    decision = drift_decision(
        deployed_f1,
        (deployed_test_score.get("f1_low"), deployed_test_score.get("f1_high")),
        new.f1,
        (new.f1_low, new.f1_high),
        settings.drift,
        z,
    )
    decision.numbers["new_rows"] = new.rows
    leavers = base_rate_change(
        deployed_test_score.get("leaver_share"), deployed_test_score.get("rows"),
        new.leaver_share, new.rows, z,
    )
    decision.numbers["leavers"] = leavers
    if leavers.get("changed"):
        decision = decision._replace(
            reason=f"{decision.reason}; the share of leavers moved from "
            f"{deployed_test_score['leaver_share']:.1%} to {new.leaver_share:.1%}, which moves F1 "
            "even for an unchanged model"
        )
    return decision


def _recorded_release_score(settings: Settings, version: str) -> dict[str, Any]:
    rows = records.query(
        settings.records_path,
        "SELECT * FROM scores WHERE model_version = ? AND purpose IN ('test', 'drift-holdout') "
        "ORDER BY id DESC LIMIT 1",
        (version,),
    )
    return rows[0] if rows else {}


class Candidate(NamedTuple):
    """A freshly trained model, still in memory, and the rows kept back to judge it."""

    training: TrainingResult
    test_f1: float
    held_out: pd.DataFrame | None

    @property
    def model(self) -> ClassifierMixin:
        return self.training.model

    @property
    def judged_on(self) -> str:
        return "the test data" if self.held_out is None else "the held-out new rows"

    def describe(self) -> str:
        rows = self.training.metadata["training_data"]["rows"]
        kept_back = (
            "" if self.held_out is None
            else f", {len(self.held_out)} new rows held out to judge it"
        )
        return (
            f"trained model {self.training.version} on {rows} rows{kept_back}; "
            f"F1 {self.test_f1:.3f} on the test data"
        )


def retrain(settings: Settings, *, hold_out_new_rows: bool) -> Candidate:
    """Train on the master dataset, less part of the newest batch when asked; score on test data."""
    from scoring import score
    from training import train

    held_out = split_new_rows(settings)[1] if hold_out_new_rows else None
    trained = train(settings, held_out=held_out)
    metrics = score(settings, model=trained.model).metrics
    return Candidate(trained, metrics.f1, held_out)


def split_new_rows(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Split the newest batch into rows to train on and rows to judge the retrained model on.

    After drift the test data describes the business as it was; the fairest judge of a retrained
    model against the deployed one is recent data that neither has seen. Nothing is held out when
    the batch is too small to spare rows.
    """
    from sklearn.model_selection import train_test_split

    from dataset import read_dataset

    batch = read_dataset(settings.latest_batch_path, settings.schema)
    target = batch[settings.schema.target].astype(int)
    held_out_rows = int(len(batch) * HELD_OUT_SHARE)
    if held_out_rows < MIN_HELD_OUT_ROWS or target.value_counts().min() < 2:
        return batch, None
    train_rows, held_out = train_test_split(
        batch, test_size=held_out_rows, stratify=target, random_state=settings.model.random_state
    )
    return train_rows, held_out


def compare_with_deployed(
    settings: Settings, candidate: Candidate, deployed_model: ClassifierMixin
) -> ModelComparison:
    """Both models' F1 on the same rows: the held-out new rows, or else the test data."""
    from scoring import compare_predictions, predict_frame, read_test_data

    rows = candidate.held_out if candidate.held_out is not None else read_test_data(settings)
    schema = settings.schema
    return compare_predictions(
        rows[schema.target].to_numpy(dtype=int),
        predict_frame(candidate.model, "", rows, schema).predictions,
        predict_frame(deployed_model, "", rows, schema).predictions,
        settings.scoring,
    )


def release_candidate(settings: Settings, candidate: Candidate) -> Release:
    """Deploy the candidate; after drift its release score is its F1 on the held-out new rows.

    The release's score must describe the business as it is now, or the next batch from the same
    (changed) process would look like drift again.
    """
    from scoring import evaluate, record_score, write_score_file

    if candidate.held_out is not None:
        metrics = evaluate(candidate.model, candidate.held_out, settings).metrics
        record_score(
            settings, metrics, "drift-holdout", candidate.training.metadata,
            candidate.training.model_path,
            f"{len(candidate.held_out)} held-out rows of the newest batch",
        )
        write_score_file(settings.score_path, metrics.f1)
    return deployment.deploy(settings)


def after_deployment(settings: Settings) -> list[str]:
    """Diagnose, report, and refresh the API's saved answers (if the API is up); say what was done."""
    import apicalls

    steps = build_outputs(settings)
    base_url = apicalls.resolve_base_url(settings, None)
    try:
        apicalls.call_endpoints(settings, base_url, token=apicalls.token_from_environment(settings))
        steps.append(f"called the API at {base_url}; answers in {settings.api_returns_path}")
    except apicalls.ApiUnreachable as error:
        steps.append(f"API not called: {error}")
    return steps


def build_outputs(settings: Settings) -> list[str]:
    """Record diagnostics and write the report and risk list of the served release.

    The release serves already, so a failure is a Trouble step, not an error: the next cycle sees
    the outputs out of step with the release and builds them again (refresh_outputs).
    """
    import diagnostics
    import reporting

    steps: list[str] = []
    try:
        diagnostics.run_diagnostics(settings)
        steps.append("recorded diagnostics")
        report = reporting.build_report(settings)
        steps.append(f"wrote the report and risk list ({report.report_path.name})")
    except Exception as error:  # the release is served whatever happens here; retried next cycle
        failed = "report" if steps else "diagnostics"
        log.error("%s of the served release failed", failed, exc_info=True)
        steps.append(Trouble(f"{failed} failed: {str(error) or repr(error)}; will retry"))
    return steps


def refresh_outputs(settings: Settings, outcome: CycleOutcome) -> CycleOutcome:
    """Build the diagnostics, report and risk list again if they describe another release than
    the served one (after a deployment or rollback whose report failed or was killed).

    Costs a few stats and two small JSON reads when they are in step, which they nearly always are.
    """
    out_of_step = deployment.outputs_out_of_step(settings)
    if not out_of_step:
        return outcome
    served = deployment.served_version(settings)
    journal = Journal(outcome.new_files)
    for step in outcome.steps:
        journal.add(step)
    described = ", ".join(f"{name} {version or 'missing'}" for name, version in out_of_step.items())
    journal.add(
        f"outputs out of step with the served release {served} ({described})",
        outputs_out_of_step=out_of_step,
    )
    for step in build_outputs(settings):
        journal.add(step)
    repaired = "brought" if not journal.troubles else "could not bring"
    return journal.outcome(
        outcome.decision,
        f"{outcome.message}; {repaired} the report, risk list and diagnostics in line with the "
        f"served release {served}",
        served,
    )


# ---------------------------------------------------------------------------------------------
# Lock, records, command line.


@contextlib.contextmanager
def cycle_lock(settings: Settings) -> Iterator[None]:
    """Hold the pipeline lock for a cycle, or raise CycleBusyError at once if anyone holds it.

    The stages the cycle calls take the same lock and join the cycle's hold; a stage run by hand
    meanwhile waits or says the cycle is running (locks.py).
    """
    with locks.pipeline_lock(settings, "a cycle", wait_seconds=0, nested=False):
        yield


def describe_plan(settings: Settings, force: bool) -> str:
    """What a cycle would do now, without doing any of it (--dry-run)."""
    new_files = ingestion.find_new_files(settings)
    names = ", ".join(f.path.name for f in new_files) or "none"
    if not deployment.is_deployed(settings):
        return f"would run a first deployment: ingest ({names}), train, score, deploy, report"
    if force:
        return f"would ingest new files ({names}), then retrain and redeploy regardless (--force)"
    if not new_files:
        return "nothing to do: no new data files"
    return (
        f"would ingest {len(new_files)} new file(s) ({names}), score the deployed model on the new "
        f"rows (drift rule {settings.drift.rule!r}, tolerance {settings.drift.tolerance}) and, on "
        "drift, retrain, compare, deploy unless worse, diagnose and report"
    )


@contextlib.contextmanager
def cycle_log(settings: Settings, max_bytes: int = 1_000_000, backups: int = 5) -> Iterator[None]:
    """Log to a file beside stderr, rotated when it passes `max_bytes` (`backups` old files kept).

    logging.handlers.RotatingFileHandler would do this, but importing it (socket, pickle, queue)
    costs more than the rest of a no-op cycle; rotating once at start-up is all a cycle needs.
    """
    path = settings.log_path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > max_bytes:
        for number in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{number}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{number + 1}"))
        os.replace(path, path.with_name(f"{path.name}.1"))
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    previous_level = root.level
    root.setLevel(min(previous_level, logging.INFO) or logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


def record_cycle(
    settings: Settings, started: float, started_at: str, outcome: CycleOutcome | None,
    status: str, message: str, release: str | None = None,
) -> None:
    seconds = time.monotonic() - started
    records.add(
        settings.records_path,
        "cycles",
        {
            "started": started_at,
            "finished": records.utc_now(),
            "seconds": round(seconds, 3),
            "new_files": outcome.new_files if outcome else None,
            "decision": outcome.decision if outcome else None,
            "details": {**(outcome.details or {}), "steps": list(outcome.steps)}
            if outcome else {},
            "release": outcome.release if outcome else release,
            "outcome": status,
            "message": message,
        },
    )
    log.info("cycle %s in %.2f s: %s", status, seconds, message)


def argument_parser() -> argparse.ArgumentParser:
    import argparse  # here, not at the top: see parse_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    parser.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    parser.add_argument(
        "--force", action="store_true", help="retrain and redeploy whether or not there is drift"
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace | SimpleNamespace:
    """The options; cron's own `--config PATH` is read as argparse would, without argparse.

    Importing argparse and building the parser (which loads gettext, locale and shutil) costs more
    than all of a no-op cycle's own work. Any other command line goes to argparse.
    """
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) == 2 and arguments[0] == "--config" and not arguments[1].startswith("-"):
        return SimpleNamespace(config=arguments[1], dry_run=False, force=False)
    return argument_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    if args.dry_run:
        print(describe_plan(settings, args.force))
        return 0
    with cycle_log(settings):
        return run_locked_cycle(settings, force=args.force)


def run_locked_cycle(settings: Settings, force: bool) -> int:
    """Run one cycle under the lock and record it, whatever happens."""
    started, started_at = time.monotonic(), records.utc_now()
    try:
        with cycle_lock(settings):
            outcome = None
            served_before = _served_version(settings)
            try:
                outcome = run_cycle(settings, force=force)
            except BaseException as error:
                message = str(error) if isinstance(error, PipelineError) else repr(error)
                served = _served_version(settings)
                if served != served_before:
                    message = (
                        f"deployed {served}, then failed: {message}; the next cycle builds its "
                        "report, risk list and diagnostics"
                    )
                record_cycle(settings, started, started_at, outcome, "failed", message, served)
                serving = f"release {served} is serving" if served else "nothing is deployed"
                log.error("cycle failed; %s: %s", serving, message)
                raise
            record_cycle(settings, started, started_at, outcome, "ok", outcome.message)
    except CycleBusyError as busy:
        print(f"skipped: {busy}")
        log.info("skipped: %s", busy)
        return 0
    print(outcome.summary())
    return 0


def _served_version(settings: Settings) -> str | None:
    """The served release, for the failure message: a manifest that cannot be read is None here."""
    try:
        return deployment.served_version(settings)
    except PipelineError:
        return None


if __name__ == "__main__":
    sys.exit(run_cli(main))
