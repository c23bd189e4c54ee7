"""Reporting: the risk list the client managers work from, and a PDF report for the ML engineer.

The risk list itself is made in calllist.py: every current client ranked by the served release,
with the reasons of its risk and what changed (riskscores.csv, beside the deployed model).
build_report() brings that list up to date and writes confusionmatrix.png and report.pdf: the
deployed release, its metrics and curves on the test data, the latest recorded diagnostics, the
files ingested, the top of the risk list with its reasons and changes, the clients who entered or
left the top group since the previous release, each list's track record (precision at the top and
lift), and trends over earlier runs. Everything comes from recorded runs and fixed inputs and the
PDF is dated by the release, so that running it twice with nothing new gives identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import atomicio
import calllist
import records
import reportpdf
from deployment import (
    Release,
    deploying_cycle,
    describe_release_score,
    last_deployment,
    list_releases,
    read_manifest,
    record_outputs,
    release_score,
)
from diagnostics import estimate_history, latest_diagnostics, run_diagnostics, section_texts
from errors import run_cli
from locks import pipeline_lock
from scoring import (
    Evaluation,
    ServedModel,
    client_ids,
    evaluate,
    load_deployed,
    read_test_data,
)
from settings import Settings, add_config_argument, load_settings

log = logging.getLogger(__name__)

TOP_GROUPS_FILE = "risktopgroups.json"
# Trend plots look back this many recorded runs: enough for months of daily cycles, and a bounded
# amount of JSON to parse however long the system has been running.
TREND_RUNS = 500
# Rows of the risk list printed in the report; the whole list is in riskscores.csv.
REPORT_TOP_ROWS = 40
TEXT_SIZE = 7.5
LINE_HEIGHT = 0.0125  # of the page height, for TEXT_SIZE monospace lines
CLASS_LABELS = ("stayed (0)", "left (1)")
HEADING_SIZE = 11
TITLE_SIZE = 15
# --- The risk list -----------------------------------------------------------------------------


def risk_scores(settings: Settings) -> pd.DataFrame:
    """Every current client, highest attrition risk first, with its reasons; not written."""
    model, release = load_deployed(settings)
    return calllist.rank_current_clients(settings, model, release.version)


@dataclass(frozen=True)
class TopGroupChange:
    """Which clients entered or left the top of the risk list since the previous release."""

    top_n: int
    previous_version: str | None
    entered: list[str] | None  # None: nothing to compare with (see `note`)
    left: list[str] | None
    note: str


def _update_top_groups(settings: Settings, version: str, top_ids: list[str]) -> TopGroupChange:
    """Compare the top group with the previous release's, then remember this release's."""
    path = settings.deployment_folder / TOP_GROUPS_FILE
    groups = _read_top_groups(path)
    top_n = len(top_ids)
    previous = _previous_release_version(settings, version)
    if previous is None:
        change = TopGroupChange(top_n, None, None, None, "first release: nothing to compare with")
    elif previous not in groups:
        change = TopGroupChange(
            top_n, previous, None, None,
            f"no top group was recorded while release {previous} was current",
        )
    else:
        before = groups[previous][:top_n]
        before_set, now_set = set(before), set(top_ids)
        entered = [client for client in top_ids if client not in before_set]
        left = [client for client in before if client not in now_set]
        change = TopGroupChange(
            top_n, previous, entered, left,
            f"{len(entered)} entered and {len(left)} left the top {top_n} since release {previous}",
        )
    groups[version] = top_ids
    kept = {release.version for release in list_releases(settings)} | {version}
    atomicio.write_json(path, {"groups": {v: ids for v, ids in groups.items() if v in kept}})
    return change


def _read_top_groups(path: Path) -> dict[str, list[str]]:
    try:
        groups = atomicio.read_json(path)["groups"]
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as error:
        log.warning("starting the top-group record afresh: %s is unreadable (%s)", path, error)
        return {}
    return groups if isinstance(groups, dict) else {}


def _previous_release_version(settings: Settings, current: str) -> str | None:
    history = (read_manifest(settings) or {}).get("history", [])
    earlier = [entry["version"] for entry in reversed(history) if entry["version"] != current]
    return earlier[0] if earlier else None


# --- The report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportResult:
    """What build_report wrote, for which release."""

    model_version: str
    report_path: Path
    confusion_matrix_path: Path
    risk_scores_path: Path
    top_groups_path: Path
    clients: int
    top_group: TopGroupChange
    diagnostics_time: str
    call_list: calllist.CallList

    def summary(self) -> str:
        return "\n".join([
            f"Report for release {self.model_version} (diagnostics of {self.diagnostics_time}):",
            f"  {self.report_path}",
            f"  {self.confusion_matrix_path}",
            self.call_list.summary(),
            f"  top {self.top_group.top_n}: {self.top_group.note}",
        ])


@dataclass(frozen=True)
class _TestResults:
    """The deployed model evaluated on the test data, with what the report says about it."""

    evaluation: Evaluation
    threshold: float | None
    files: list[str]

    @property
    def metrics(self):  # noqa: ANN201 - the Metrics of the evaluation
        return self.evaluation.metrics

    @property
    def truth(self) -> np.ndarray:
        return self.evaluation.truth

    @property
    def probabilities(self) -> np.ndarray:
        return self.evaluation.probabilities

    @property
    def predictions(self) -> np.ndarray:
        return self.evaluation.predictions


def build_report(
    settings: Settings, deciding_cycle: dict[str, Any] | None = None
) -> ReportResult:
    """Write riskscores.csv, confusionmatrix.png and report.pdf for the deployed release.

    `deciding_cycle` is the cycle that is deploying the release right now (its record is written
    when it ends); otherwise the records say why the release is served.
    """
    started = time.perf_counter()
    model, release = load_deployed(settings)
    metadata = release.metadata()
    test = _score_test_data(settings, model, release, metadata)

    diagnostics = latest_diagnostics(settings)
    if diagnostics is None or diagnostics.get("model_version") != release.version:
        log.info("no diagnostics recorded for release %s yet: running them now", release.version)
        diagnostics = run_diagnostics(settings)

    call_list = calllist.rebuild_call_list(settings)
    top_n = settings.diagnostics.risk_top_n
    risk = calllist.read_list(
        settings.risk_scores_path, settings.schema, rows=max(top_n, REPORT_TOP_ROWS)
    )
    top_ids = client_ids(risk.head(top_n), settings.schema)
    top_group = _update_top_groups(settings, release.version, top_ids)

    atomicio.write_with(
        settings.confusion_matrix_path,
        # zlib level 3, not 6: ~13 ms less of ~100 ms for the PNG, and 10% more bytes.
        lambda path: _confusion_matrix_figure(test, release.version).savefig(
            path, format="png", dpi=150, pil_kwargs={"compress_level": 3}
        ),
    )
    atomicio.write_with(
        settings.report_path,
        lambda path: _write_pdf(
            path, settings, release, metadata, test, diagnostics, risk, call_list, top_group,
            deciding_cycle,
        ),
    )
    record_outputs(settings, release.version)
    records.add_stage_run(
        settings.records_path, "reporting", time.perf_counter() - started, call_list.ranked
    )
    log.info("wrote the report of release %s to %s", release.version, settings.report_path)
    return ReportResult(
        model_version=release.version,
        report_path=settings.report_path,
        confusion_matrix_path=settings.confusion_matrix_path,
        risk_scores_path=settings.risk_scores_path,
        top_groups_path=settings.deployment_folder / TOP_GROUPS_FILE,
        clients=call_list.ranked,
        top_group=top_group,
        diagnostics_time=diagnostics["time"],
        call_list=call_list,
    )


def _score_test_data(
    settings: Settings, model: ServedModel, release: Release, metadata: dict[str, Any]
) -> _TestResults:
    """The deployed model on the test data, without recording a score (the report only reads)."""
    return _TestResults(
        evaluation=evaluate(model, read_test_data(settings), settings),
        threshold=metadata.get("threshold"),
        files=[str(path) for path in settings.test_data_files()],
    )


def _write_pdf(
    path: Path,
    settings: Settings,
    release: Release,
    metadata: dict[str, Any],
    test: _TestResults,
    diagnostics: dict[str, Any],
    risk: pd.DataFrame,
    call_list: calllist.CallList,
    top_group: TopGroupChange,
    deciding_cycle: dict[str, Any] | None = None,
) -> None:
    document = reportpdf.Document(
        f"Attrition risk report, release {release.version}",
        # Dated by the release, not by the clock, so that an unchanged report has unchanged bytes.
        datetime.fromisoformat(release.created_at),
    )
    _TextPages(document, "Attrition risk report").write(
        [("Why this release is served", decision_lines(settings, release, deciding_cycle)),
         *_overview_sections(settings, release, metadata, test, diagnostics)]
    )
    _curves_page(document, test, release.version)
    engineer_only = {"Dependencies"}
    diagnostic_sections = [
        (title, lines) for title, lines in section_texts(diagnostics).items()
        if title not in engineer_only
    ]
    _TextPages(document, f"Diagnostics of {diagnostics['time']}").write(diagnostic_sections)
    _TextPages(document, "Highest-risk clients").write(
        _risk_sections(settings, risk, call_list, top_group)
    )
    track_records = calllist.track_records(settings)
    _TextPages(document, "Track record of the risk lists").write(
        _track_record_sections(track_records)
    )
    if any(result["precision"] is not None for result in track_records):
        # Until outcomes arrive the page above says so, and an empty chart would tell nothing more.
        _track_record_page(document, track_records, settings.scoring.confidence)
    _trends_page(document, settings)
    _TextPages(document, "For the engineer").write(
        [(title, lines) for title, lines in section_texts(diagnostics).items()
         if title in engineer_only]
    )
    document.save(path)


# --- Text pages --------------------------------------------------------------------------------


def _at(x: float, y: float) -> tuple[float, float]:
    """A point given in fractions of the page's width and height, in points."""
    return x * reportpdf.PAGE_WIDTH, y * reportpdf.PAGE_HEIGHT


def _page_title(page: reportpdf.Page, title: str) -> None:
    x, top = _at(0.06, 0.965)
    page.text(x, top - TITLE_SIZE, title, size=TITLE_SIZE, font="Helvetica-Bold")


class _TextPages:
    """Flows titled sections of fixed-width lines onto as many A4 pages as they need."""

    TOP, BOTTOM, LEFT = 0.93, 0.05, 0.06

    def __init__(self, document: reportpdf.Document, title: str) -> None:
        self.document = document
        self.title = title
        self.page: reportpdf.Page | None = None
        self.pages = 0
        self.y = 0.0  # the top of the next line, as a fraction of the page height

    def write(self, sections: list[tuple[str, list[str]]]) -> None:
        for heading, lines in sections:
            # A heading never ends a page alone.
            self._make_room(3 * LINE_HEIGHT)
            self._put(heading, size=HEADING_SIZE, font="Helvetica-Bold")
            self.y -= 2 * LINE_HEIGHT
            for line in lines:
                self._make_room(LINE_HEIGHT)
                self._put(line, size=TEXT_SIZE, font="Courier")
                self.y -= LINE_HEIGHT
            self.y -= LINE_HEIGHT

    def _make_room(self, height: float) -> None:
        if self.page is None or self.y - height < self.BOTTOM:
            self.page = self.document.new_page()
            self.pages += 1
            _page_title(self.page, self.title if self.pages == 1 else f"{self.title} (continued)")
            self.y = self.TOP

    def _put(self, text: str, *, size: float, font: str) -> None:
        assert self.page is not None
        x, top = _at(self.LEFT, self.y)
        self.page.text(x, top - size, text, size=size, font=font)


def _overview_sections(
    settings: Settings,
    release: Release,
    metadata: dict[str, Any],
    test: _TestResults,
    diagnostics: dict[str, Any],
) -> list[tuple[str, list[str]]]:
    training = metadata.get("training_data", {})
    rows, leavers = training.get("rows"), training.get("leavers")
    libraries = ", ".join(f"{k} {v}" for k, v in metadata.get("library_versions", {}).items())
    threshold = metadata.get("threshold")
    threshold_text = "-" if threshold is None else (
        f"{threshold:.4f} ({metadata.get('threshold_source', '')})"
    )
    release_lines = [
        f"  version          {release.version}",
        f"  released         {release.created_at} (trained {metadata.get('trained_at', '-')})",
        f"  training data    {_count(rows)} rows, {_count(leavers)} leavers"
        + (f" ({leavers / rows:.1%})" if rows and leavers is not None else ""),
        f"  data file        {training.get('path', '-')}",
        f"  data sha256      {training.get('sha256', '-')}",
        f"  threshold        {threshold_text}",
        f"  F1 at release    {release_score_text(settings, release)}",
        f"  libraries        {libraries or '-'}",
        f"  diagnostics of   {diagnostics['time']}",
    ]
    m = test.metrics
    confidence = f"{settings.scoring.confidence:.0%}"
    auc = "n/a (one class only)" if m.roc_auc is None else f"{m.roc_auc:.4f}"
    metric_lines = [
        *(f"  test data        {name}" for name in test.files),
        f"  rows             {m.rows:,}",
        f"  F1               {m.f1:.3f} on the test data ({confidence} bootstrap interval "
        f"{m.f1_low:.3f} to {m.f1_high:.3f})",
        f"  precision        {m.precision:.4f}",
        f"  recall           {m.recall:.4f}",
        f"  ROC AUC          {auc}",
        f"  leavers          {m.leaver_share:.1%} of rows, "
        f"{m.predicted_leaver_share:.1%} predicted",
    ]
    texts = section_texts(diagnostics)
    return [
        ("Deployed release", release_lines),
        ("Model metrics on the test data", metric_lines),
        ("Calibration on the test data", texts["Calibration on the test data"]),
        ("Estimated and realised F1 on rosters", _estimate_trend_lines(settings)),
        ("Files ingested", _ingested_lines(settings, release)),
    ]


def _estimate_trend_lines(settings: Settings) -> list[str]:
    """Each roster's estimated F1 beside the F1 its predictions realised once outcomes arrived."""
    history = estimate_history(settings)
    if not history:
        return ["  no roster estimated yet"]
    lines = ["  roster                   time                  clients  estimated F1 (interval)"
             "    realised F1 (clients)  warning"]
    for row in history[-15:]:
        realised = "-" if row["realised_f1"] is None else (
            f"{row['realised_f1']:.3f} ({row['realised_rows']:,}; est. "
            f"{row['estimated_f1_known']:.3f})"
        )
        lines.append(
            f"  {row['roster'][:24]:<24} {row['time']:<21} {row['rows']:>8,}  {row['f1']:.3f} "
            f"({row['f1_low']:.3f}-{row['f1_high']:.3f})  {realised:<22} "
            f"{'yes' if row['warning'] else 'no'}"
        )
    return lines




def release_score_text(settings: Settings, release: Release) -> str:
    """The release's own F1 with what it was measured on and its interval."""
    return describe_release_score(release_score(settings, release.version), release.f1)


def decision_lines(
    settings: Settings, release: Release, deciding_cycle: dict[str, Any] | None = None
) -> list[str]:
    """Why `release` is served, in words and numbers: the cycle that deployed it, or a rollback."""
    if deciding_cycle is not None:
        return _cycle_decision_lines(settings, release, deciding_cycle)
    deployed = last_deployment(settings, release.version)
    if deployed and deployed["action"] == "rollback":
        return [f"  rolled back to this release at {deployed['time']} (deployment.py --rollback)"]
    cycle = deploying_cycle(settings, release.version)
    if cycle is None:
        return [f"  deployed by hand (deployment.py) at {release.created_at}; "
                f"F1 {release_score_text(settings, release)}"]
    return _cycle_decision_lines(settings, release, cycle)


def _cycle_decision_lines(
    settings: Settings, release: Release, cycle: dict[str, Any]
) -> list[str]:
    details = json.loads(cycle["details"] or "{}")
    lines = [f"  the cycle of {cycle['started']} decided: {cycle['decision']}"]
    drift_check = details.get("drift") or {}
    drift = drift_check.get("numbers")
    if drift:
        lines.append(
            f"  drift: deployed F1 {drift['deployed_f1']:.3f} (its release figure), new F1 "
            f"{drift['new_f1']:.3f} on the new batch ({drift.get('new_rows', '?')} rows), "
            f"allowed drop {drift['allowed_drop']:.3f}"
        )
        for check in drift.get("measures", [])[1:]:
            if "drop" in check:
                lines.append(
                    f"         {check['measure']}: {check['deployed']:.3f} -> {check['new']:.3f} "
                    f"(allowed drop {check['allowed_drop']:.3f})"
                )
        if drift_check.get("reason"):
            lines.append(f"         {drift_check['reason']}")
    for candidate in details.get("candidates", []):
        auc = "-" if candidate["roc_auc"] is None else f"{candidate['roc_auc']:.3f}"
        chosen = "  <- chosen" if candidate["candidate"] == details.get("chosen") else ""
        lines.append(
            f"  candidate {candidate['candidate']:<24} F1 {candidate['f1']:.3f}  ROC AUC {auc} "
            f"on held-out new rows{chosen}"
        )
    deploy = (details.get("deploy") or {}).get("numbers")
    if deploy:
        lines.append(
            f"  deploy: F1 {deploy['candidate_f1']:.3f} vs deployed {deploy['deployed_f1']:.3f} "
            f"on {deploy['evaluated_on']} ({deploy['rows']} rows; difference interval "
            f"{deploy['difference_low']:+.3f} to {deploy['difference_high']:+.3f})"
        )
    lines.append(f"  release F1 {release_score_text(settings, release)}")
    return lines


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _ingested_lines(settings: Settings, release: Release) -> list[str]:
    in_release = _file_lines(release.ingested_files_path)
    since = [name for name in _file_lines(settings.ingested_files_path) if name not in in_release]
    lines = [f"  {name}" for name in in_release] or ["  none recorded in the release"]
    if since:
        lines += ["  ingested after this release was trained:", *(f"    {n}" for n in since)]
    return lines


def _file_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _risk_sections(
    settings: Settings, risk: pd.DataFrame, call_list: calllist.CallList,
    top_group: TopGroupChange,
) -> list[tuple[str, list[str]]]:
    ids = list(settings.schema.id_columns)
    shown = risk.head(min(REPORT_TOP_ROWS, settings.diagnostics.risk_top_n))
    clients = client_ids(shown, settings.schema)
    id_header = " / ".join(ids)
    id_width = max([12, len(id_header), *map(len, clients)])
    lines = [
        f"  {call_list.ranked:,} current clients ranked ({call_list.from_rosters:,} from rosters"
        + (f", newest {call_list.roster}" if call_list.roster else "")
        + f"), {call_list.left_not_ranked:,} already left, not ranked",
        "",
        f"  {'rank':>6}  {id_header:<{id_width}}  {'probability':>11}  change since the "
        "previous list",
    ]
    for client, row in zip(clients, shown.itertuples(index=False), strict=True):
        lines.append(
            f"  {row.rank:>6}  {client:<{id_width}}  {row.probability:>11.4f}  "
            f"{_change_text(row.change, row.rank_before, row.rank, row.moved_by)}"
        )
        lines += [
            f"  {'':>6}  {'':<{id_width}}    {reason}"
            for reason in (row.reason_1, row.reason_2, row.reason_3) if reason
        ]
    lines.append(f"  ... {call_list.ranked:,} clients in all: {settings.risk_scores_path}")
    change_lines = [f"  {top_group.note}"]
    if top_group.entered is not None and top_group.left is not None:
        change_lines += _wrapped("entered", top_group.entered) + _wrapped("left", top_group.left)
    return [
        (f"Top of the risk list (model {call_list.model_version})", lines),
        (f"Changes in the top {top_group.top_n} since the previous release", change_lines),
    ]


def _change_text(change: str, rank_before: Any, rank: int, moved_by: str) -> str:
    """A list entry's change in words: 'risen 340 -> 12, moved by lastmonth_activity'."""
    text = change if pd.isna(rank_before) else f"{change} {rank_before} -> {rank}"
    return f"{text}, moved by {moved_by}" if moved_by else text


def _track_record_sections(track_records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    if not track_records:
        lines = ["  no outcomes of clients ranked on an earlier list have arrived yet"]
    else:
        lines = [
            "  Of each list's top group, the share of clients who left once their outcome arrived",
            "  (precision at the top), against the share of leavers among all the clients it",
            "  ranked; lift is their ratio (1: no better than calling at random).",
            "",
            *(f"  {result['list_time'][:16]}  {calllist.track_record_text(result)}"
              for result in track_records),
        ]
    return [("Precision at the top and lift of each list", lines)]


def _wrapped(label: str, names: list[str], width: int = 96) -> list[str]:
    if not names:
        return [f"  {label}: none"]
    lines, current = [], f"  {label}:"
    for name in names:
        if len(current) + len(name) + 1 > width:
            lines.append(current)
            current = "    "
        current += f" {name}"
    return [*lines, current]


# --- Figures -----------------------------------------------------------------------------------


def _confusion_matrix(test: _TestResults) -> np.ndarray:
    """Counts of [actual][predicted], class 0 (stayed) first."""
    cells = np.bincount(2 * test.truth.astype(int) + test.predictions.astype(int), minlength=4)
    return cells.reshape(2, 2)


def _confusion_matrix_title(test: _TestResults, version: str) -> str:
    threshold = "" if test.threshold is None else f", threshold {test.threshold:.3f}"
    return (
        f"Confusion matrix on the test data ({len(test.truth):,} rows{threshold})\n"
        f"model {version}"
    )


def _confusion_matrix_figure(test: _TestResults, version: str) -> Figure:
    """The matrix as shaded cells with their counts, drawn on the figure itself.

    Without an Axes (its spines, tick machinery and an image to resample) drawing the PNG takes
    about 60% of the time it did, at every deployment; positions are fixed, in inches.
    """
    width, height, side = 5.5, 4.8, 3.45  # the figure's size and the matrix's, in inches
    figure = Figure(figsize=(width, height))
    matrix = _confusion_matrix(test)
    left, bottom = 1.65 / width, 0.75 / height  # of the matrix, as fractions of the figure
    cell_width, cell_height = side / 2 / width, side / 2 / height
    shade = colormaps["Blues"]
    for (actual, predicted), count in np.ndenumerate(matrix):
        x, y = left + predicted * cell_width, bottom + (1 - actual) * cell_height
        figure.add_artist(Rectangle(
            (x, y), cell_width, cell_height, transform=figure.transFigure,
            facecolor=shade(count / max(matrix.max(), 1)), edgecolor="none",
        ))
        figure.text(
            x + cell_width / 2, y + cell_height / 2,
            f"{count:,}\n{_share_of_actual(matrix, actual, predicted)}",
            ha="center", va="center", fontsize=11,
            color="white" if count > matrix.max() / 2 else "black",
        )
    figure.add_artist(Rectangle(
        (left, bottom), 2 * cell_width, 2 * cell_height, transform=figure.transFigure,
        fill=False, edgecolor="black", linewidth=0.8,
    ))
    gap_x, gap_y = 0.08 / width, 0.08 / height
    for position, label in enumerate(CLASS_LABELS):
        figure.text(left + (position + 0.5) * cell_width, bottom - gap_y, label,
                    ha="center", va="top")
        figure.text(left - gap_x, bottom + (1.5 - position) * cell_height, label,
                    ha="right", va="center")
    figure.text(left + cell_width, bottom - 5 * gap_y, "predicted", ha="center", va="top")
    figure.text(0.75 / width, bottom + cell_height, "actual", rotation=90, ha="center",
                va="center")
    figure.text(left + cell_width, bottom + 2 * cell_height + gap_y,
                _confusion_matrix_title(test, version), ha="center", va="bottom", fontsize=9)
    return figure


def _share_of_actual(matrix: np.ndarray, actual: int, predicted: int) -> str:
    row_total = matrix[actual].sum()
    return f"{matrix[actual, predicted] / row_total:.0%} of actual" if row_total else ""


def _confusion_matrix_lines(test: _TestResults) -> list[str]:
    """The confusion matrix as a table of text (the PNG beside the report draws it)."""
    matrix = _confusion_matrix(test)
    width = max(len(label) for label in CLASS_LABELS) + 2
    lines = [f"{'actual / predicted':<20}" + "".join(f"{c:>{width + 16}}" for c in CLASS_LABELS)]
    for actual, label in enumerate(CLASS_LABELS):
        cells = "".join(
            f"{f'{matrix[actual, p]:,} ({_share_of_actual(matrix, actual, p)})':>{width + 16}}"
            for p in (0, 1)
        )
        lines.append(f"{label:<20}{cells}")
    return lines


def _curves_page(document: reportpdf.Document, test: _TestResults, version: str) -> None:
    """The confusion matrix as a table (confusionmatrix.png draws it), and the ROC and
    precision-recall curves."""
    page = document.new_page()
    _page_title(page, "Confusion matrix, ROC and precision-recall curves")
    y = 0.92
    for line in _confusion_matrix_title(test, version).splitlines():
        page.text(*_at(0.09, y - 0.012), line, size=10, font="Helvetica")
        y -= 2 * LINE_HEIGHT
    for line in _confusion_matrix_lines(test):
        y -= LINE_HEIGHT
        page.text(*_at(0.09, y - 0.009), line, size=TEXT_SIZE)
    quarters = (0.0, 0.25, 0.5, 0.75, 1.0)

    def share(label: str = "", high: float = 1.0) -> reportpdf.Axis:
        return reportpdf.linear_axis((), low=0.0, high=high, ticks=quarters, label=label)

    if test.metrics.roc_auc is None:
        one_class = "the test data holds one class only"
        roc = reportpdf.Chart("ROC curve", share(), share(), message=one_class)
        pr = reportpdf.Chart("Precision-recall curve", share(), share(), message=one_class)
    else:
        false_positive_rate, true_positive_rate, precision, recall = _curve_points(
            test.truth, test.probabilities
        )
        leavers = test.metrics.leaver_share
        roc = reportpdf.Chart(
            "ROC curve", share("false positive rate"), share("true positive rate"), series=[
                reportpdf.Series(f"AUC {test.metrics.roc_auc:.3f}",
                                 list(zip(false_positive_rate, true_positive_rate, strict=True))),
                reportpdf.Series("chance", [(0.0, 0.0), (1.0, 1.0)], colour=reportpdf.GREY,
                                 dashed=True),
            ], legend="lower right",
        )
        pr = reportpdf.Chart(
            "Precision-recall curve", share("recall"), share("precision", high=1.02), series=[
                reportpdf.Series("model", list(zip(recall, precision, strict=True))),
                reportpdf.Series("chance", [(0.0, leavers), (1.0, leavers)],
                                 colour=reportpdf.GREY, dashed=True),
                reportpdf.Series(f"threshold (F1 {test.metrics.f1:.3f})",
                                 [(test.metrics.recall, test.metrics.precision)], line=False,
                                 marker_radius=3.0),
            ], legend="upper right",
        )
    for chart, left in ((roc, 0.09), (pr, 0.59)):
        reportpdf.draw_chart(page, chart, *_at(left, 0.4), *_at(0.37, 0.3))


# A curve drawn at more points than this looks the same on a page and takes longer to draw.
CURVE_POINTS = 1000


def _curve_points(
    truth: np.ndarray, probabilities: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates, precision and recall, with each distinct probability taken
    as the threshold (highest first), as scikit-learn's roc_curve and precision_recall_curve
    give them; at most CURVE_POINTS of them, evenly spread."""
    order = np.argsort(-np.asarray(probabilities, dtype="float64"), kind="stable")
    ranked_truth = np.asarray(truth, dtype=int)[order]
    ranked = np.asarray(probabilities, dtype="float64")[order]
    # The last row of each run of equal probabilities: one threshold per distinct value.
    ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    if len(ends) > CURVE_POINTS:
        ends = ends[np.unique(np.linspace(0, len(ends) - 1, CURVE_POINTS).round().astype(int))]
    true_positives = np.cumsum(ranked_truth)[ends]
    false_positives = ends + 1 - true_positives
    positives, negatives = ranked_truth.sum(), len(ranked_truth) - ranked_truth.sum()
    false_positive_rate = np.r_[0.0, false_positives / negatives]
    true_positive_rate = np.r_[0.0, true_positives / positives]
    precision = np.r_[1.0, true_positives / (true_positives + false_positives)]
    recall = np.r_[0.0, true_positives / positives]
    return false_positive_rate, true_positive_rate, precision, recall


def _track_record_page(
    document: reportpdf.Document, track_records: list[dict[str, Any]], confidence: float
) -> None:
    """Each list's precision at the top and lift, with their intervals, by when it was made
    (lists with outcomes only: at least one must have them)."""
    page = document.new_page()
    _page_title(page, "Track record of the risk lists")
    measured = [r for r in track_records if r["precision"] is not None]
    times = [datetime.fromisoformat(r["list_time"]) for r in measured]
    start, end = min(times), max(times)
    if end - start < timedelta(hours=1):
        middle = start + (end - start) / 2
        start, end = middle - timedelta(hours=1), middle + timedelta(hours=1)
    else:
        start, end = start - (end - start) * 0.05, end + (end - start) * 0.05
    moments = [time.timestamp() for time in times]
    interval = f"{confidence:.0%} interval"

    def chart(value: str, title: str, reference: list[float], label: str) -> reportpdf.Chart:
        values = [r[value] if r[value] is not None else np.nan for r in measured]
        low = [r[f"{value}_low"] if r[value] is not None else np.nan for r in measured]
        high = [r[f"{value}_high"] if r[value] is not None else np.nan for r in measured]
        return reportpdf.Chart(
            title, reportpdf.time_axis(start, end), reportpdf.linear_axis(
                [*values, *low, *high, *reference]),
            series=[
                reportpdf.Series(f"{title} ({interval})", list(zip(moments, values, strict=True)),
                                 marker_radius=3.0, errors=list(zip(low, high, strict=True))),
                reportpdf.Series(label, list(zip(moments, reference, strict=True)),
                                 colour=reportpdf.GREY, dashed=True, marker_radius=1.5),
            ],
            grid=True,
        )

    charts = [
        chart("precision", "Precision at the top: share of the top group who left",
              [r["leaver_share"] for r in measured], "share of leavers among all ranked"),
        chart("lift", "Lift: precision at the top over the share of leavers",
              [1.0] * len(measured), "no better than random (1)"),
    ]
    _draw_stacked(page, charts, top=0.92, bottom=0.07, gap=0.3)


def _trends_page(document: reportpdf.Document, settings: Settings) -> None:
    """Two panels over earlier runs: measures and shares (all between 0 and 1), and stage timings."""
    trends = _trend_series(settings)
    page = document.new_page()
    _page_title(page, "Trends over earlier runs")
    plots = [
        ("F1 and ROC AUC of recorded scores, by purpose; share of leavers and of missing data "
         "(mean over columns)", "F1, ROC AUC, share", {
            **{f"F1 {purpose}": points for purpose, points in trends["f1"].items()},
            **{f"ROC AUC {purpose}": points for purpose, points in trends["roc_auc"].items()},
            **{f"share of leavers, {label}": points for label, points in trends["leavers"].items()},
            **{f"share of {label}": [(time, percent / 100) for time, percent in points]
               for label, points in trends["missing"].items()},
        }),
        ("Stage timings", "seconds", trends["timings"]),
    ]
    _draw_stacked(page, [_trend_chart(*plot) for plot in plots], top=0.92, bottom=0.05, gap=0.2)


def _draw_stacked(
    page: reportpdf.Page, charts: list[reportpdf.Chart], *, top: float, bottom: float, gap: float
) -> None:
    """Charts one above the other between `top` and `bottom` (fractions of the page height), the
    gap between two a fraction of a chart's height, across the page."""
    height = (top - bottom) / (len(charts) + gap * (len(charts) - 1))
    for number, chart in enumerate(charts):
        chart_bottom = top - height - number * height * (1 + gap)
        reportpdf.draw_chart(page, chart, *_at(0.1, chart_bottom), *_at(0.86, height))


Series = dict[str, list[tuple[datetime, float]]]


def _trend_series(settings: Settings) -> dict[str, Series]:
    """Time series of the recorded scores and diagnostics runs, oldest first."""
    database = settings.records_path
    scores = records.query(
        database,
        "SELECT time, purpose, f1, roc_auc FROM scores ORDER BY id DESC LIMIT ?",
        (TREND_RUNS,),
    )[::-1]
    runs = records.query(
        database, "SELECT time, payload FROM diagnostics ORDER BY id DESC LIMIT ?", (TREND_RUNS,)
    )[::-1]
    trends: dict[str, Series] = {
        "f1": {}, "roc_auc": {}, "leavers": {}, "missing": {}, "timings": {}
    }

    def add(name: str, label: str, time: str, value: Any) -> None:
        if value is not None:
            trends[name].setdefault(label, []).append((datetime.fromisoformat(time), float(value)))

    for score in scores:
        add("f1", score["purpose"], score["time"], score["f1"])
        add("roc_auc", score["purpose"], score["time"], score["roc_auc"])
    # Stage timings are those the stages recorded when they really ran (cycle or by hand), never a
    # diagnostics run's own re-timing. Reporting's own time is left out, so that reporting again
    # with nothing new writes the same report.
    for stage_run in records.query(
        database, "SELECT time, stage, seconds FROM stage_runs WHERE stage != 'reporting' "
        "ORDER BY id DESC LIMIT ?",
        (TREND_RUNS,),
    )[::-1]:
        add("timings", stage_run["stage"], stage_run["time"], stage_run["seconds"])
    for run in runs:
        payload = json.loads(run["payload"])
        time = run["time"]
        add("leavers", "master dataset", time, (payload.get("master_dataset") or {}).get(
            "leaver_share"))
        add("leavers", "newest batch", time, ((payload.get("data_drift") or {}).get(
            "leavers") or {}).get("current_share"))
        missing = payload.get("missing_data") or {}
        add("missing", "missing cells", time,
            sum(missing.values()) / len(missing) if missing else None)
    return trends


def _trend_chart(title: str, unit: str, series: Series) -> reportpdf.Chart:
    if not series:
        nothing = reportpdf.Axis(0.0, 1.0, ())
        return reportpdf.Chart(title, nothing, nothing, message="no runs recorded yet")
    times = [time for points in series.values() for time, _ in points]
    # The axis spans the data, with a margin; a single run gets a minute either side.
    margin = max((max(times) - min(times)) * 0.05, timedelta(minutes=1))
    lines = []
    for label, points in series.items():
        runs = f"{len(points)} run" + ("" if len(points) == 1 else "s")
        lines.append(reportpdf.Series(
            f"{label} ({runs})", [(time.timestamp(), value) for time, value in points],
            marker_radius=1.5,
        ))
    return reportpdf.Chart(
        title, reportpdf.time_axis(min(times) - margin, max(times) + margin),
        reportpdf.linear_axis([value for points in series.values() for _, value in points],
                              label=unit, most_ticks=5),
        series=lines, legend_columns=3, grid=True,
    )


# --- Command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    with pipeline_lock(settings, "reporting"):
        result = build_report(settings)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
