"""Estimated performance: how well the served model should do on clients whose outcomes are unknown.

Whether a client leaves is known months after its risk was estimated. When the model's
probabilities are calibrated, its expected confusion matrix on a roster follows from the
probabilities alone (NannyML's confidence-based performance estimation), so the cycle can see a
likely fall of F1 on the current clients a season before the outcomes show it:

- `estimate_roster` predicts a roster with the served release, estimates F1, precision, recall and
  the share of leavers with their intervals (scoring.estimate_performance), compares the roster's
  features with the release's training sample, and records it all with each client's prediction;
- `record_realised` fills in, once labeled rows bring the outcomes of a roster's clients, the F1
  those predictions really had, beside the estimate for the same clients: the estimate's own error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

import records
from calllist import last_rows
from dataset import read_dataset, read_master
from diagnostics import compare_datasets
from scoring import (
    PerformanceEstimate,
    client_ids,
    decision_threshold,
    estimate_performance,
    f1_from_counts,
    load_deployed,
    predict_frame,
)
from settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RosterEstimate:
    """The served model's estimated performance on one roster, as recorded."""

    record_id: int
    roster: str
    model_version: str
    threshold: float
    estimate: PerformanceEstimate
    drift: dict[str, Any]

    def describe(self) -> str:
        e = self.estimate
        return (
            f"estimated on roster {self.roster} ({e.rows} clients): F1 {e.f1:.3f} "
            f"({e.f1_low:.3f} to {e.f1_high:.3f}), precision {e.precision:.3f}, recall "
            f"{e.recall:.3f}, leavers {e.leaver_share:.1%} ({e.leaver_share_low:.1%} to "
            f"{e.leaver_share_high:.1%}); drifted features: "
            f"{', '.join(self.drift['drifted_features']) or 'none'}"
        )


def estimate_roster(
    settings: Settings, roster: pd.DataFrame, roster_name: str, master_rows: int | None = None
) -> RosterEstimate:
    """Estimate the served release's performance on a validated roster and record it.

    `master_rows` is the size of the master dataset now (counted when not given): labeled rows
    beyond it are outcomes that arrived later, which `record_realised` compares with the estimate.
    """
    model, release = load_deployed(settings)  # its model.json: no unpickling
    prediction = predict_frame(model, release.version, roster, settings.schema)
    probabilities = np.asarray(prediction.probabilities)
    predicted = np.asarray(prediction.predictions)
    threshold = decision_threshold(model)
    estimate = estimate_performance(probabilities, threshold, settings.scoring)
    reference = read_dataset(release.training_sample_path, settings.schema)
    drift = compare_datasets(reference, roster, settings.schema, settings.diagnostics)
    record_id = records.add(
        settings.records_path,
        "estimates",
        {
            "time": records.utc_now(),
            "roster": roster_name,
            "model_version": release.version,
            "master_rows": _master_rows(settings) if master_rows is None else master_rows,
            "threshold": threshold,
            **estimate.as_dict(),
            "covariate_drift": int(drift["dataset_drift"]),
            "drift": drift,
        },
    )
    records.add_many(
        settings.records_path,
        "estimate_predictions",
        ["estimate_id", "client", "probability", "predicted"],
        zip([record_id] * len(roster), client_ids(roster, settings.schema),
            probabilities.tolist(), predicted.tolist(), strict=True),
    )
    return RosterEstimate(record_id, roster_name, release.version, threshold, estimate, drift)


def _master_rows(settings: Settings) -> int:
    path = settings.finaldata_path
    if not path.is_file():
        return 0
    with path.open("rb") as file:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    return max(0, lines - 1)  # less the header


def record_warning(
    settings: Settings, estimate: RosterEstimate, numbers: dict[str, Any]
) -> None:
    """Add the cycle's early-warning decision and its reference figures to the estimate's record."""
    records.update(settings.records_path, "estimates", estimate.record_id, {
        "release_f1": numbers.get("release_f1"),
        "release_f1_low": numbers.get("release_f1_low"),
        "release_f1_high": numbers.get("release_f1_high"),
        "allowed_drop": numbers.get("allowed_drop"),
        "estimated_drop": int(bool(numbers.get("estimated_drop"))),
        "warning": int(bool(numbers.get("warning"))),
    })


@dataclass(frozen=True)
class RealisedResult:
    """The F1 a roster's predictions really had, for the clients whose outcomes are known."""

    record_id: int
    roster: str
    model_version: str
    rows: int
    f1: float
    estimated_f1: float
    estimated_f1_known: float

    def describe(self) -> str:
        return (
            f"realised F1 on roster {self.roster}: {self.f1:.3f} for {self.rows} clients whose "
            f"outcome arrived (estimated {self.estimated_f1_known:.3f} for them, "
            f"{self.estimated_f1:.3f} for the whole roster)"
        )


def record_realised(settings: Settings, master: pd.DataFrame | None = None) -> list[RealisedResult]:
    """Compare each recorded estimate with the outcomes that arrived after it; record what changed.

    A client's outcome is its newest labeled row added to the master dataset after the estimate.
    An estimate is brought up to date whenever more of its clients' outcomes are known.

    A client on many rosters brings its outcome to every estimate of them, so each time every
    estimate is counted again: by the records database, which matches each client with a newest
    row to its predictions and counts them estimate by estimate (_known_counts). Reading every
    prediction into Python instead took ~40 ms per estimate of 10,000 clients.
    """
    pending = records.query(
        settings.records_path,
        "SELECT id, roster, model_version, master_rows, f1, threshold, realised_rows "
        "FROM estimates ORDER BY id",
    )
    if master is None and pending:
        master = read_master(settings)
    waiting = [row for row in pending if row["master_rows"] < len(master)]
    if not waiting:
        return []
    counts = _known_counts(
        settings, _newest_outcomes(master, min(row["master_rows"] for row in waiting), settings)
    )
    results = []
    for row in waiting:
        known = counts.get(row["id"])
        if known is None or known.rows == (row["realised_rows"] or 0):
            continue
        result = known.realised()
        records.update(settings.records_path, "estimates", row["id"], {
            "realised_time": records.utc_now(),
            "realised_rows": known.rows,
            **{f"realised_{name}": value for name, value in result.items()},
            "estimated_f1_known": known.estimated_f1(),
        })
        results.append(RealisedResult(
            row["id"], row["roster"], row["model_version"], known.rows, result["f1"],
            row["f1"], known.estimated_f1(),
        ))
    return results


class _Outcomes(NamedTuple):
    """Each client's newest labeled row from some row of the master dataset on."""

    clients: list[str]
    position: np.ndarray  # the row's position in the master dataset
    outcome: np.ndarray  # the row's target


def _newest_outcomes(master: pd.DataFrame, first: int, settings: Settings) -> _Outcomes:
    later = master.iloc[first:]
    codes, clients = pd.factorize(np.asarray(client_ids(later, settings.schema), dtype=object))
    last = last_rows(codes, len(clients))  # every client has a row: no -1
    target = later[settings.schema.target].to_numpy(dtype=int)
    return _Outcomes(clients.tolist(), first + last, target[last])


class _KnownCounts(NamedTuple):
    """An estimate's predictions of the clients whose outcome is known, counted."""

    rows: int
    true_positives: int
    false_positives: int
    false_negatives: int
    leavers: int
    # Sums of the predicted probabilities: the confusion matrix the estimate expected for them.
    expected_true_positives: float
    expected_false_positives: float
    expected_false_negatives: float

    def realised(self) -> dict[str, float]:
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        return {
            "f1": float(f1_from_counts(np.array(tp), np.array(fp), np.array(fn))),
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "leaver_share": self.leavers / self.rows,
        }

    def estimated_f1(self) -> float:
        return float(f1_from_counts(
            np.array(self.expected_true_positives), np.array(self.expected_false_positives),
            np.array(self.expected_false_negatives),
        ))


def _known_counts(settings: Settings, newest: _Outcomes) -> dict[int, _KnownCounts]:
    """For each estimate with a client whose newest row came after it, its known predictions."""
    with records.connect(settings.records_path) as connection:
        connection.execute("DROP TABLE IF EXISTS temp.newest_outcomes")  # the connection is kept
        connection.execute(
            "CREATE TEMP TABLE newest_outcomes "
            "(client TEXT PRIMARY KEY, position INTEGER NOT NULL, outcome INTEGER NOT NULL)"
        )
        try:
            connection.executemany(
                "INSERT INTO temp.newest_outcomes VALUES (?, ?, ?)",
                zip(newest.clients, newest.position.tolist(), newest.outcome.tolist(), strict=True),
            )
            counted = connection.execute(
                "SELECT p.estimate_id, COUNT(*), "
                "SUM(p.predicted = 1 AND n.outcome = 1), SUM(p.predicted = 1 AND n.outcome = 0), "
                "SUM(p.predicted = 0 AND n.outcome = 1), SUM(n.outcome = 1), "
                "TOTAL(CASE WHEN p.predicted = 1 THEN p.probability END), "
                "TOTAL(CASE WHEN p.predicted = 1 THEN 1 - p.probability END), "
                "TOTAL(CASE WHEN p.predicted = 0 THEN p.probability END) "
                "FROM temp.newest_outcomes n "
                "CROSS JOIN estimate_predictions p ON p.client = n.client "
                "JOIN estimates e ON e.id = p.estimate_id "
                "WHERE n.position >= e.master_rows GROUP BY p.estimate_id"
            ).fetchall()
        finally:
            connection.execute("DROP TABLE temp.newest_outcomes")
    return {row[0]: _KnownCounts(*row[1:]) for row in counted}
