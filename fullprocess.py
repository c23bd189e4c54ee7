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
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

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

    from alerts import Alert
    from deployment import Release
    from ingestion import IngestReport
    from scoring import ModelComparison, ServedModel
    from training import TrainingPlan, TrainingResult

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
    # What went wrong without failing the cycle (an API serving another release, say).
    warnings: tuple[str, ...] = ()
    alerts: tuple[Alert, ...] = ()

    @property
    def status(self) -> str:
        return "ok, with warnings" if self.warnings else "ok"

    def summary(self) -> str:
        warned = f" ({len(self.warnings)} warning(s))" if self.warnings else ""
        lines = [f"{self.decision}: {self.message}{warned}"]
        lines += [f"  - {step}" for step in self.steps]
        lines += [f"  ! {warning}" for warning in self.warnings]
        return "\n".join(lines)


class Trouble(str):
    """A step that went wrong without stopping the cycle ("report failed: ...; will retry"): a
    warning, which the cycle's message repeats, so that the record says what really happened."""

    __slots__ = ()


class Journal:
    """The steps a cycle took and the numbers behind its decisions, in the order they happened."""

    __slots__ = ("new_files", "steps", "details", "warnings", "alerts", "troubles")

    def __init__(self, new_files: list[str]) -> None:
        self.new_files = new_files
        self.steps: list[str] = []
        self.details: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.alerts: list[Alert] = []
        self.troubles: list[str] = []

    def add(self, step: str, **details: Any) -> None:
        self.details.update(details)
        if isinstance(step, Trouble):
            self.troubles.append(step)
            self.warn(step)
        else:
            self.steps.append(step)

    def warn(self, warning: str) -> None:
        self.warnings.append(warning)
        log.warning("%s", warning)

    def alert(self, *alerts: Alert) -> None:
        self.alerts.extend(alerts)

    def outcome(self, decision: str, message: str, release: str | None = None) -> CycleOutcome:
        return CycleOutcome(
            decision, "; ".join([message, *self.troubles]), self.new_files, release,
            dict(self.details), tuple(self.steps), tuple(self.warnings), tuple(self.alerts),
        )


# ---------------------------------------------------------------------------------------------
# The decisions: small pure functions.


def standard_error_from_interval(low: float | None, high: float | None, z: float) -> float:
    """The standard error a symmetric normal interval of width high - low implies (0 if unknown)."""
    if low is None or high is None:
        return 0.0
    return max(high - low, 0.0) / (2 * z)


class Measure(NamedTuple):
    """One measure of the model on two datasets: where it was deployed, and on the new batch."""

    name: str  # "F1", "ROC AUC", "top-group precision"
    deployed: float | None
    deployed_interval: tuple[float | None, float | None]
    new: float | None
    new_interval: tuple[float | None, float | None]


def drift_decision(
    deployed_f1: float,
    deployed_interval: tuple[float | None, float | None],
    new_f1: float,
    new_interval: tuple[float, float],
    rule: DriftSettings,
    z: float = 1.96,
    *,
    ranking: tuple[Measure, ...] = (),
    everyone_leaves_f1: float | None = None,
) -> DriftDecision:
    """Has the model fallen on new data by more than the rule allows? See DriftSettings.

    F1 is the system's measure; `ranking` measures (ROC AUC, precision in the top group) catch a
    model whose ranking collapses while F1 barely moves; and a model below the F1 of predicting
    "leaves" for everyone is worse than no model, which is always drift.
    """
    f1 = Measure("F1", deployed_f1, deployed_interval, new_f1, new_interval)
    checks = [_measure_check(measure, rule, z) for measure in (f1, *ranking)]
    numbers: dict[str, Any] = {
        "deployed_f1": deployed_f1,
        "new_f1": new_f1,
        "new_f1_interval": list(new_interval),
        **{key: checks[0][key] for key in ("drop", "allowed_drop", "noise_band") if key in checks[0]},
        "rule": rule.rule,
        "tolerance": rule.tolerance,
        "measures": checks,
    }
    fallen = [check for check in checks if check["fell"]]
    if everyone_leaves_f1 is not None:
        numbers["everyone_leaves_f1"] = everyone_leaves_f1
        if new_f1 < everyone_leaves_f1:
            return DriftDecision(
                True,
                f"F1 {new_f1:.3f} on new data is below the {everyone_leaves_f1:.3f} of predicting "
                "'leaves' for everyone",
                numbers,
            )
    if fallen:
        return DriftDecision(True, "; ".join(check["text"] for check in fallen), numbers)
    return DriftDecision(
        False,
        f"F1 {new_f1:.3f} on the new batch vs {deployed_f1:.3f} at release (drop "
        f"{checks[0]['drop']:.3f} within allowed {checks[0]['allowed_drop']:.3f})",
        numbers,
    )


class EarlyWarning(NamedTuple):
    """Does a roster, whose outcomes nobody knows yet, suggest the model will do worse?"""

    warned: bool
    reason: str
    numbers: dict[str, Any]


def early_warning(
    release_score: dict[str, Any],
    estimate: dict[str, Any],
    drifted_features: list[str],
    covariate_drift: bool,
    rule: DriftSettings,
    z: float = 1.96,
) -> EarlyWarning:
    """Warn when the F1 estimated on a roster fell beyond noise, or its features drifted.

    `release_score` is the release's recorded reference (F1 with its interval), `estimate` the
    estimated F1 with its interval. The estimate assumes the relation the model learnt still holds;
    a move of the features alone (a new kind of client) may leave the estimated F1 where it was
    while the model is extrapolating, so covariate drift warns too. Never a reason to retrain:
    that needs labels.
    """
    release_f1 = release_score.get("f1")
    numbers: dict[str, Any] = {
        "release_f1": release_f1,
        "release_f1_low": release_score.get("f1_low"),
        "release_f1_high": release_score.get("f1_high"),
        "estimated_f1": estimate["f1"],
        "covariate_drift": bool(covariate_drift),
        "drifted_features": list(drifted_features),
    }
    reasons = []
    if release_f1 is not None:
        noise = z * math.hypot(
            standard_error_from_interval(release_score.get("f1_low"), release_score.get("f1_high"),
                                         z),
            standard_error_from_interval(estimate["f1_low"], estimate["f1_high"], z),
        )
        numbers["allowed_drop"] = noise + rule.tolerance
        numbers["drop"] = release_f1 - estimate["f1"]
        numbers["estimated_drop"] = numbers["drop"] > numbers["allowed_drop"]
        if numbers["estimated_drop"]:
            reasons.append(
                f"estimated drop beyond noise: F1 {estimate['f1']:.3f} estimated on the roster vs "
                f"{release_f1:.3f} at release (allowed drop {numbers['allowed_drop']:.3f})"
            )
    if covariate_drift:
        reasons.append(f"the roster's features drifted ({', '.join(drifted_features)})")
    numbers["warning"] = bool(reasons)
    if reasons:
        return EarlyWarning(True, "; ".join(reasons), numbers)
    return EarlyWarning(
        False,
        f"estimated F1 {estimate['f1']:.3f} on the roster, within noise of the release's "
        + ("(not recorded)" if release_f1 is None else f"{release_f1:.3f}")
        + "; no feature drift",
        numbers,
    )


def _measure_check(measure: Measure, rule: DriftSettings, z: float) -> dict[str, Any]:
    """Did one measure fall by more than sampling noise (rule 'interval') or the tolerance?"""
    if measure.deployed is None or measure.new is None:
        return {"measure": measure.name, "fell": False, "note": "not measured on both"}
    drop = measure.deployed - measure.new
    check: dict[str, Any] = {"measure": measure.name, "deployed": measure.deployed,
                             "new": measure.new, "drop": drop}
    if rule.rule == "raw":
        allowed = rule.tolerance
    else:
        noise = math.hypot(
            standard_error_from_interval(*measure.deployed_interval, z),
            standard_error_from_interval(*measure.new_interval, z),
        )
        allowed = z * noise + rule.tolerance
        check["noise_band"] = z * noise
    check["allowed_drop"] = allowed
    check["fell"] = drop > allowed
    check["text"] = (
        f"{measure.name} fell from {measure.deployed:.3f} to {measure.new:.3f} on the new batch "
        f"(drop {drop:.3f} > allowed {allowed:.3f}; the first is the release's own figure)"
    )
    return check


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
    comparison: ModelComparison, evaluation: str, forced: bool = False,
    require_better: bool = False,
) -> DeployDecision:
    """Should the retrained model replace the deployed one, judged on the same rows?

    On the held-out newest rows (`require_better`) the retrained model must be significantly
    better, or the deployed model stays: a change of model has to be earned. On the test data,
    which describes the business as it was, it only must not be significantly worse.
    """
    numbers = {**comparison.as_dict(), "evaluated_on": evaluation}
    interval = (
        f"difference interval {comparison.difference_low:+.3f} to "
        f"{comparison.difference_high:+.3f}"
    )
    scores = (
        f"F1 {comparison.candidate_f1:.3f} vs deployed {comparison.deployed_f1:.3f} on {evaluation}"
    )
    if forced:
        return DeployDecision(True, "forced retrain: deploying regardless of scores", numbers)
    if comparison.candidate_significantly_worse:
        return DeployDecision(
            False, f"retrained model is worse: {scores} ({interval}); keeping the deployed model",
            numbers,
        )
    if require_better and comparison.difference_low <= 0:
        return DeployDecision(
            False,
            f"retrained model is not significantly better: {scores} ({interval}); keeping the "
            "deployed model",
            numbers,
        )
    verdict = "significantly better" if require_better else "not worse"
    return DeployDecision(True, f"retrained model {scores}: {verdict}, deploying", numbers)


class PlanScore(NamedTuple):
    """A way to train (or the deployed model as it is) judged on the held-out newest rows."""

    name: str
    plan: TrainingPlan | None  # None: the deployed model as it is
    training_rows: int | None
    f1: float
    roc_auc: float | None
    top_precision: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.name,
            "training_rows": self.training_rows,
            "f1": self.f1,
            "roc_auc": self.roc_auc,
            "top_precision": self.top_precision,
        }


def choose_plan(scores: list[PlanScore], f1_tie: float, auc_tie: float) -> PlanScore:
    """The best F1 on the held-out rows; among those within `f1_tie` of it, the best ROC AUC.

    Candidates within `auc_tie` of that AUC are a tie too, and a tie goes to the earlier candidate:
    the deployed model first, then all history. No change of model, and no discarding of data,
    without a reason the held-out rows can tell from noise.
    """
    def auc(score: PlanScore) -> float:
        return -1.0 if score.roc_auc is None else score.roc_auc

    best_f1 = max(score.f1 for score in scores)
    tied = [score for score in scores if score.f1 >= best_f1 - f1_tie]
    best_auc = max(auc(score) for score in tied)
    return next(score for score in tied if auc(score) >= best_auc - auc_tie)


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
    import alerts  # past the no-op return, which nearly every cycle takes: it imports nothing more

    journal = Journal(new_files)
    report = ingest_new_files(settings, journal) if new_files else None
    if report is not None:
        estimate_new_rosters(settings, report, journal)
        if report.accepted_rows:
            record_realised_performance(settings, journal)
    if report is not None and not report.accepted_rows and not force:
        refresh_risk_list(settings, journal)
        return journal.outcome("no-usable-rows", "new files added no labeled rows")
    if report is not None and report.accepted_rows:
        drift = check_drift(settings)
        journal.add(f"drift check: {drift.reason}", drift=drift._asdict())
        if not drift.drifted and not force:
            refresh_risk_list(settings, journal)
            return journal.outcome("no-drift", drift.reason)
        if drift.drifted:
            journal.alert(alerts.drift_found(
                deployment.current_release(settings).version, new_files,
                drift.numbers["deployed_f1"], drift.numbers["new_f1"],
                drift.numbers["allowed_drop"], action="retraining",
            ))

    from scoring import load_deployed

    # Its model.json, scored by numpy: judging the served model needs no pickle loaded.
    deployed_model, served = load_deployed(settings)
    held_out = split_new_rows(settings)[1] if report is not None and report.accepted_rows else None
    plan = None  # all history
    if held_out is not None:
        scores = judge_plans(settings, held_out, deployed_model, report.run_id)
        best = choose_plan(scores, settings.retrain.f1_tie, settings.retrain.auc_tie)
        journal.add(describe_plans(scores, best), candidates=[s.as_dict() for s in scores],
                    chosen=best.name)
        if best.plan is None and not force:
            journal.alert(alerts.retrain_refused(
                served.version, max(s.f1 for s in scores[1:]) if len(scores) > 1 else scores[0].f1,
                scores[0].f1, "the held-out new rows", candidate="every training plan",
            ))
            reason = journal.steps[-1]
            refresh_risk_list(settings, journal)
            return journal.outcome("drift-kept-deployed", reason, served.version)
        plan = best.plan
    candidate = retrain(settings, held_out, plan)
    journal.add(candidate.describe())
    decision = deploy_decision(
        compare_with_deployed(settings, candidate, deployed_model), candidate.judged_on,
        forced=force, require_better=held_out is not None,
    )
    journal.add(decision.reason, deploy=decision._asdict())
    if not decision.deploy:
        journal.alert(alerts.retrain_refused(
            served.version, decision.numbers["candidate_f1"], decision.numbers["deployed_f1"],
            candidate.judged_on, candidate=candidate.training.version,
        ))
        refresh_risk_list(settings, journal)
        return journal.outcome("drift-kept-deployed", decision.reason, served.version)

    release = release_candidate(settings, candidate)
    journal.add(f"deployed release {release.version}")
    journal.alert(alerts.release_deployed(release.version, served.version, release.f1,
                                          decision.reason))
    decided = "forced-redeploy" if force else "drift-redeployed"
    check_after_deployment(settings, release.version, journal, decided)
    return journal.outcome(
        decided,
        f"deployed release {release.version} (was {served.version})", release.version,
    )


def first_deployment(settings: Settings, new_files: list[str]) -> CycleOutcome:
    """Nothing deployed yet: ingest, train, score and deploy the first release."""
    import alerts

    journal = Journal(new_files)
    ingest_new_files(settings, journal)
    candidate = retrain(settings, None, None)
    journal.add(candidate.describe())
    release = deployment.deploy(settings)
    journal.add(f"deployed release {release.version}")
    journal.alert(alerts.release_deployed(release.version, None, release.f1))
    check_after_deployment(settings, release.version, journal, "first-deployment")
    return journal.outcome(
        "first-deployment",
        f"deployed the first release {release.version} (F1 {candidate.test_f1:.3f})",
        release.version,
    )


def ingest_new_files(settings: Settings, journal: Journal) -> IngestReport:
    """Ingest the new files and note what became of each."""
    import alerts

    report = ingestion.ingest(settings)
    rejected = f", rejected {len(report.rejected)}" if report.rejected else ""
    roster = f", a roster of {report.roster_clients} current clients" if any(
        f.kind == "roster" for f in report.ingested) else ""
    journal.add(
        f"ingested {len(report.ingested)} file(s){rejected}: {report.accepted_rows} new rows "
        f"(master dataset {report.total_rows} rows){roster}",
        ingestion=[f.as_dict() for f in report.files], ingestion_run=report.run_id,
    )
    journal.alert(*alerts.quarantine_alerts(settings, report.files))
    return report


def estimate_new_rosters(settings: Settings, report: IngestReport, journal: Journal) -> None:
    """Estimate the served model's performance on each roster just ingested; warn, never retrain."""
    import alerts
    import estimation
    from calllist import read_snapshots
    from scoring import normal_quantile

    arrived = records.query(
        settings.records_path,
        "SELECT file, snapshot, master_position FROM rosters WHERE run_id = ? ORDER BY snapshot",
        (report.run_id,),
    )
    if not arrived:
        return
    snapshots = read_snapshots(settings)
    release = deployment.current_release(settings)
    reference = deployment.release_score(settings, release.version) or {}
    z = normal_quantile(settings.scoring.confidence)
    for roster in arrived:
        clients = snapshots.loc[snapshots["snapshot"] == roster["snapshot"]].reset_index(drop=True)
        estimate = estimation.estimate_roster(
            settings, clients, roster["file"], master_rows=roster["master_position"]
        )
        warning = early_warning(
            reference, estimate.estimate.as_dict(), estimate.drift["drifted_features"],
            estimate.drift["dataset_drift"], settings.drift, z,
        )
        estimation.record_warning(settings, estimate, warning.numbers)
        journal.add(estimate.describe(), roster_estimate={
            "estimate_id": estimate.record_id, **warning.numbers,
        })
        if warning.warned:
            journal.add(f"early warning: {warning.reason}; no retraining until outcomes arrive")
            journal.alert(alerts.estimated_drop(
                release.version, roster["file"], warning.numbers.get("release_f1") or 0.0,
                estimate.estimate.f1, warning.numbers.get("allowed_drop", 0.0),
                estimate.drift["drifted_features"],
            ))
        else:
            journal.add(f"no early warning: {warning.reason}")


def record_realised_performance(settings: Settings, journal: Journal) -> None:
    """Labeled rows may bring the outcomes of estimated rosters: record the F1 they realised."""
    import estimation

    for result in estimation.record_realised(settings):
        journal.add(result.describe())


def refresh_risk_list(settings: Settings, journal: Journal) -> None:
    """New data of any kind can change who is current: bring the served list up to date."""
    import calllist

    call_list = calllist.rebuild_call_list(settings)
    journal.add(
        f"risk list: {call_list.ranked} current clients ranked, {call_list.left_not_ranked} "
        "already left" + ("" if call_list.rebuilt else " (already up to date)"),
        risk_list=call_list.list_id,
    )
    for result in call_list.results:
        journal.add(f"track record of {calllist.track_record_text(result)}")


def check_drift(settings: Settings) -> DriftDecision:
    """Score the deployed model on the newly ingested rows and compare with its deployed F1."""
    from scoring import normal_quantile, read_score_file, score

    release = deployment.current_release(settings)
    deployed_f1 = read_score_file(release.score_path)
    deployed_test_score = deployment.release_score(settings, release.version) or {}
    new = score(
        settings, model_path=release.model_path, data_path=settings.latest_batch_path,
        purpose="drift-check",
    ).metrics
    z = normal_quantile(settings.scoring.confidence)
    reference = deployed_test_score
    decision = drift_decision(
        deployed_f1,
        (reference.get("f1_low"), reference.get("f1_high")),
        new.f1,
        (new.f1_low, new.f1_high),
        settings.drift,
        z,
        ranking=(
            Measure("ROC AUC", reference.get("roc_auc"),
                    (reference.get("roc_auc_low"), reference.get("roc_auc_high")),
                    new.roc_auc, (new.roc_auc_low, new.roc_auc_high)),
            Measure("top-group precision", reference.get("top_precision"),
                    (reference.get("top_precision_low"), reference.get("top_precision_high")),
                    new.top_precision, (new.top_precision_low, new.top_precision_high)),
        ),
        everyone_leaves_f1=new.everyone_leaves_f1,
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


def retrain(
    settings: Settings, held_out: pd.DataFrame | None, plan: TrainingPlan | None
) -> Candidate:
    """Train by `plan` (None: all history) on the master dataset less the held-out rows; score it
    on the test data."""
    from scoring import score
    from training import ALL_HISTORY, train

    trained = train(settings, held_out=held_out, plan=plan or ALL_HISTORY)
    metrics = score(settings, model=trained.model).metrics
    return Candidate(trained, metrics.f1, held_out)


def judge_plans(
    settings: Settings, held_out: pd.DataFrame, deployed_model: ServedModel, run_id: str
) -> list[PlanScore]:
    """The deployed model and each way to retrain, judged on the held-out newest rows.

    Each plan is fitted once without the held-out rows (time order holds: they are the newest);
    the winner is then trained for real. The plans: all history; only the batches since the
    change (the batch that showed the drift, and earlier ones whose drift kept the deployed
    model); history weighted by recency.
    """
    import numpy as np

    from dataset import read_master
    from errors import InsufficientDataError
    from scoring import compute_metrics, predict_frame
    from training import ALL_HISTORY, TrainingPlan, fit_quickly, plan_rows, rows_to_train_on

    schema = settings.schema
    truth = held_out[schema.target].to_numpy(dtype=int)

    def judged(
        name: str, plan: TrainingPlan | None, rows: int | None, probabilities: np.ndarray,
        predictions: np.ndarray,
    ) -> PlanScore:
        metrics = compute_metrics(truth, probabilities, predictions, settings.scoring)
        return PlanScore(name, plan, rows, metrics.f1, metrics.roc_auc, metrics.top_precision)

    deployed = predict_frame(deployed_model, "", held_out, schema)
    scores = [judged("deployed model as it is", None, None,
                     np.asarray(deployed.probabilities), np.asarray(deployed.predictions))]
    rows = rows_to_train_on(settings, read_master(settings), held_out, batches=True)
    plans = [ALL_HISTORY]
    if rows.batches is not None:
        since_change = frozenset(batches_since_change(settings, run_id))
        plans += [
            TrainingPlan("since the change", batches=since_change),
            TrainingPlan("recency-weighted", half_life_batches=settings.retrain.half_life_batches),
        ]
    for plan in plans:
        frame, weights = plan_rows(rows.frame, plan, rows.batches)
        try:
            fitted = fit_quickly(frame, schema, settings.model, weights)
        except InsufficientDataError as error:
            log.info("candidate %s skipped: %s", plan.name, error)
            continue
        probabilities = fitted.probabilities(held_out)
        scores.append(
            judged(plan.name, plan, len(frame), probabilities, probabilities >= fitted.threshold)
        )
    return scores


def batches_since_change(settings: Settings, run_id: str) -> list[str]:
    """The batch that showed the drift and the earlier drifted batches the deployed model outlived.

    Walking back through the cycles, every cycle that found drift but kept the deployed model saw
    a batch of the changed business too; the first cycle that found no drift, or deployed, ends it.
    """
    import json

    batches = [run_id]
    cycles = records.query(
        settings.records_path, "SELECT decision, details FROM cycles ORDER BY id DESC LIMIT 200"
    )
    for cycle in cycles:
        if cycle["decision"] != "drift-kept-deployed":
            break
        earlier = json.loads(cycle["details"] or "{}").get("ingestion_run")
        if earlier:
            batches.append(earlier)
    return batches


def describe_plans(scores: list[PlanScore], best: PlanScore) -> str:
    """One line: every candidate's numbers on the held-out rows, and which won."""
    def numbers(score: PlanScore) -> str:
        auc = "-" if score.roc_auc is None else f"{score.roc_auc:.3f}"
        return f"{score.name} F1 {score.f1:.3f} AUC {auc}"

    return (
        f"candidates on the held-out new rows: {'; '.join(numbers(s) for s in scores)}; "
        f"best: {best.name}"
    )


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
    settings: Settings, candidate: Candidate, deployed_model: ServedModel
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


def check_after_deployment(
    settings: Settings, release: str, journal: Journal, decision: str
) -> None:
    """Diagnose and report the new release, then check that the API serves it."""
    import alerts

    import json

    # The report opens with this cycle's decision, which is recorded only when the cycle ends.
    deciding_cycle = {"started": records.utc_now(), "decision": decision,
                      "details": json.dumps(journal.details, default=str)}
    for step in after_deployment(settings, deciding_cycle):
        journal.add(step)
    api = check_api(settings, release)
    journal.add(api.step)
    if api.warning is not None:
        journal.warn(api.warning)
        journal.alert(alerts.api_check_failed(api.base_url, api.warning, api.failing))


def after_deployment(settings: Settings, deciding_cycle: dict[str, Any] | None) -> list[str]:
    """Diagnose and report the served release; say what was done.

    The release serves already, so a failure is a Trouble step, not an error: the next cycle sees
    the outputs out of step with the release and builds them again (refresh_outputs).
    """
    import diagnostics
    import reporting

    steps: list[str] = []
    try:
        diagnostics.run_diagnostics(settings)
        steps.append("recorded diagnostics")
        report = reporting.build_report(settings, deciding_cycle=deciding_cycle)
        steps.append(f"wrote the report and risk list ({report.report_path.name})")
    except Exception as error:  # the release is served whatever happens here; retried next cycle
        failed = "report" if steps else "diagnostics"
        log.error("%s of the served release failed", failed, exc_info=True)
        steps.append(Trouble(f"{failed} failed: {str(error) or repr(error)}; will retry"))
    return steps


class ApiCheck(NamedTuple):
    """What the API of this workspace answered after a deployment."""

    base_url: str
    step: str
    warning: str | None = None  # None: all is well, or no API runs (running one is optional)
    failing: tuple[str, ...] = ()


def check_api(settings: Settings, release: str) -> ApiCheck:
    """Does the API of this workspace serve `release` and answer every endpoint?

    The answers are saved in apireturns.txt. A problem here never fails the cycle: the release is
    deployed either way, and the cycle ends "ok, with warnings".
    """
    import apicalls

    base_url = apicalls.resolve_base_url(settings, None)
    try:
        answers = apicalls.call_endpoints(
            settings, base_url, token=apicalls.token_from_environment(settings)
        )
    except apicalls.ApiUnreachable as error:
        return ApiCheck(base_url, f"API not called: {error}")
    except PipelineError as error:  # e.g. a token file that others can read
        return ApiCheck(base_url, "API not checked", f"the API check could not start: {error}")
    step = f"called the API at {base_url}; answers in {settings.api_returns_path}"
    if answers.failures:
        reasons = "; ".join(
            f"{answer.call.name} answered {answer.status}: {answer.error_message}"
            for answer in answers.failures
        )
        return ApiCheck(base_url, step, f"the API at {base_url} failed: {reasons}",
                        tuple(answer.call.name for answer in answers.failures))
    ready = next((a.body for a in answers.returns if a.call.path == "/ready"), None)
    served = ready.get("model_version") if isinstance(ready, dict) else None
    if served != release:
        return ApiCheck(base_url, step, (
            f"the server at {base_url} serves release {served}, not {release}: restart it or "
            "check api.base_url"
        ), ("GET /ready",))
    return ApiCheck(base_url, f"{step}; it serves release {release}")


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
    for step in after_deployment(settings, None):  # the records say why the release is served
        journal.add(step)
    if journal.troubles:
        import alerts

        journal.alert(alerts.outputs_out_of_step(served, out_of_step))
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
            "details": {**(outcome.details or {}), "steps": list(outcome.steps),
                        "warnings": list(outcome.warnings)}
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
    parser.add_argument(
        "--quiet", action="store_true",
        help="print nothing on success (for cron); warnings and errors still go to stderr",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace | SimpleNamespace:
    """The options; cron's own `--config PATH [--quiet]` is read as argparse would, without it.

    Importing argparse and building the parser (which loads gettext, locale and shutil) costs more
    than all of a no-op cycle's own work. Any other command line goes to argparse.
    """
    arguments = sys.argv[1:] if argv is None else argv
    quiet = arguments[2:] == ["--quiet"]
    if (len(arguments) == 2 or quiet) and arguments[0] == "--config" and not arguments[
        1
    ].startswith("-"):
        return SimpleNamespace(config=arguments[1], dry_run=False, force=False, quiet=quiet)
    return argument_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quiet:
        # Cron mails or appends whatever a job prints: on success, print nothing at all. The
        # cycle's own log (log_path, rotated) has every line; warnings and errors still show.
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    settings = load_settings(args.config)
    if args.dry_run:
        print(describe_plan(settings, args.force))
        return 0
    with cycle_log(settings):
        return run_locked_cycle(settings, force=args.force, quiet=args.quiet)


def run_locked_cycle(settings: Settings, force: bool, quiet: bool = False) -> int:
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
                if not isinstance(error, KeyboardInterrupt):
                    import alerts

                    alerts.notify(settings, [alerts.cycle_failed(
                        message if served != served_before else error
                    )])
                raise
            record_cycle(settings, started, started_at, outcome, outcome.status, outcome.message)
            if outcome.alerts:
                import alerts

                alerts.notify(settings, list(outcome.alerts))
    except CycleBusyError as busy:
        if not quiet:
            print(f"skipped: {busy}")
        log.info("skipped: %s", busy)
        return 0
    if not quiet:
        print(outcome.summary())
    elif outcome.warnings:
        print(outcome.summary(), file=sys.stderr)
    return 0


def _served_version(settings: Settings) -> str | None:
    """The served release, for the failure message: a manifest that cannot be read is None here."""
    try:
        return deployment.served_version(settings)
    except PipelineError:
        return None


if __name__ == "__main__":
    sys.exit(run_cli(main))
