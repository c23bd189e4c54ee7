"""Scoring: measure a model on the test data (F1 and more) and record it.

F1 alone goes to latestscore.txt, the original format that deployment and the drift check read; the
full metrics, with a bootstrap interval of F1 so that a reader can tell a real change from noise, go
to the records database.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.metrics import roc_auc_score

import atomicio
import records
from errors import DataError, run_cli
from dataset import read_dataset
from settings import ScoringSettings, Settings, add_config_argument, load_settings
from training import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metrics:
    """How well predictions match the truth on one dataset."""

    rows: int
    f1: float
    f1_low: float
    f1_high: float
    precision: float
    recall: float
    roc_auc: float | None
    leaver_share: float
    predicted_leaver_share: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreReport:
    """A model's metrics on a dataset, and which model and data they belong to."""

    metrics: Metrics
    model_version: str | None
    model_path: Path
    data_path: str
    threshold: float | None
    score_path: Path | None

    def summary(self) -> str:
        m = self.metrics
        auc = "n/a (one class only)" if m.roc_auc is None else f"{m.roc_auc:.3f}"
        lines = [
            f"Model {self.model_version or self.model_path} on {m.rows} rows of {self.data_path}:",
            f"  F1        {m.f1:.4f}  (95% bootstrap interval {m.f1_low:.4f} to {m.f1_high:.4f})",
            f"  precision {m.precision:.4f}   recall {m.recall:.4f}   ROC AUC {auc}",
            f"  leavers   {m.leaver_share:.1%} of rows, {m.predicted_leaver_share:.1%} predicted",
        ]
        if self.score_path:
            lines.append(f"Wrote F1 to {self.score_path}")
        return "\n".join(lines)


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN), taken as 0 where there is nothing to score."""
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros(np.shape(tp), float), where=denominator > 0)


def compute_metrics(
    truth: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray, options: ScoringSettings
) -> Metrics:
    """F1 with its bootstrap interval, precision, recall, ROC AUC and base rates."""
    truth = np.asarray(truth, dtype=int)
    predictions = np.asarray(predictions, dtype=int)
    rows = len(truth)
    if rows == 0:
        raise DataError("cannot score on an empty dataset")
    tp = int(np.sum((truth == 1) & (predictions == 1)))
    fp = int(np.sum((truth == 0) & (predictions == 1)))
    fn = int(np.sum((truth == 1) & (predictions == 0)))
    tn = rows - tp - fp - fn
    low, high = _bootstrap_f1_interval(np.array([tp, fp, fn, tn]), options)
    return Metrics(
        rows=rows,
        f1=float(f1_from_counts(np.array(tp), np.array(fp), np.array(fn))),
        f1_low=low,
        f1_high=high,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        roc_auc=float(roc_auc_score(truth, probabilities)) if 0 < truth.sum() < rows else None,
        leaver_share=float(truth.mean()),
        predicted_leaver_share=float(predictions.mean()),
    )


def _bootstrap_f1_interval(cell_counts: np.ndarray, options: ScoringSettings) -> tuple[float, float]:
    # Resampling rows with replacement only changes how many rows fall in each cell of the confusion
    # matrix, so a multinomial draw of the four cells is the exact bootstrap, at any data size.
    rows = int(cell_counts.sum())
    rng = np.random.default_rng(options.random_state)
    draws = rng.multinomial(rows, cell_counts / rows, size=options.bootstrap_samples)
    f1 = f1_from_counts(draws[:, 0], draws[:, 1], draws[:, 2])
    tail = (1 - options.confidence) / 2 * 100
    low, high = np.percentile(f1, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class ModelComparison:
    """Two models' F1 on the same rows, and a paired bootstrap interval of their difference."""

    rows: int
    candidate_f1: float
    deployed_f1: float
    difference_low: float
    difference_high: float

    @property
    def difference(self) -> float:
        return self.candidate_f1 - self.deployed_f1

    @property
    def candidate_significantly_worse(self) -> bool:
        return self.difference_high < 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "difference": self.difference}


def compare_predictions(
    truth: np.ndarray,
    candidate: np.ndarray,
    deployed: np.ndarray,
    options: ScoringSettings,
) -> ModelComparison:
    """Compare two models' predictions on the same rows, with a paired bootstrap of F1's change.

    Each row falls in one of eight cells (truth x candidate x deployed); resampling rows only moves
    counts between those cells, so a multinomial draw over them is the exact paired bootstrap.
    """
    truth, candidate, deployed = (np.asarray(a, dtype=int) for a in (truth, candidate, deployed))
    cells = truth * 4 + candidate * 2 + deployed
    counts = np.bincount(cells, minlength=8)
    rng = np.random.default_rng(options.random_state)
    draws = np.vstack([counts, rng.multinomial(len(truth), counts / len(truth),
                                               size=options.bootstrap_samples)])

    def f1_of(model_bit: int) -> np.ndarray:
        cell_index = np.arange(8)
        predicted = (cell_index >> model_bit) & 1
        actual = cell_index >> 2
        tp = draws[:, (actual == 1) & (predicted == 1)].sum(axis=1)
        fp = draws[:, (actual == 0) & (predicted == 1)].sum(axis=1)
        fn = draws[:, (actual == 1) & (predicted == 0)].sum(axis=1)
        return f1_from_counts(tp, fp, fn)

    candidate_f1, deployed_f1 = f1_of(1), f1_of(0)
    differences = candidate_f1[1:] - deployed_f1[1:]
    tail = (1 - options.confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return ModelComparison(
        rows=len(truth),
        candidate_f1=float(candidate_f1[0]),
        deployed_f1=float(deployed_f1[0]),
        difference_low=float(low),
        difference_high=float(high),
    )


def score_frame(
    model: ClassifierMixin, frame: pd.DataFrame, settings: Settings
) -> Metrics:
    """Metrics of `model` on a labelled, validated frame."""
    schema = settings.schema
    probabilities = model.predict_proba(frame[list(schema.features)])[:, 1]
    predictions = model.predict(frame[list(schema.features)])
    return compute_metrics(
        frame[schema.target].to_numpy(dtype=int), probabilities, predictions, settings.scoring
    )


def read_test_data(settings: Settings) -> pd.DataFrame:
    """Every test data file, validated, as one table."""
    frames = [read_dataset(path, settings.schema) for path in settings.test_data_files()]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def model_metadata(model_path: Path) -> dict[str, Any]:
    """The metadata JSON saved beside a model, or {} for a model without one."""
    metadata_path = Path(model_path).with_suffix(".json")
    return atomicio.read_json(metadata_path) if metadata_path.is_file() else {}


def score(
    settings: Settings,
    model_path: Path | None = None,
    data_path: Path | None = None,
    purpose: str = "test",
) -> ScoreReport:
    """Score a model (default: the one just trained) on the test data (or `data_path`).

    latestscore.txt is written only for the trained model on the test data, so that scoring some
    other model or dataset by hand never changes what deployment will ship.
    """
    writes_score = model_path is None and data_path is None
    model_path = Path(model_path) if model_path else settings.model_path
    metadata = model_metadata(model_path)
    model = load_model(model_path, metadata.get("model_sha256"))
    if data_path is None:
        frame = read_test_data(settings)
        data_label = ", ".join(str(p) for p in settings.test_data_files())
    else:
        frame = read_dataset(Path(data_path), settings.schema)
        data_label = str(data_path)
    metrics = score_frame(model, frame, settings)
    score_path = None
    if writes_score:
        score_path = settings.score_path
        atomicio.write_text(score_path, f"{metrics.f1}\n")
    record_score(settings, metrics, purpose, metadata, model_path, data_label)
    return ScoreReport(
        metrics=metrics,
        model_version=metadata.get("version"),
        model_path=model_path,
        data_path=data_label,
        threshold=metadata.get("threshold"),
        score_path=score_path,
    )


def record_score(
    settings: Settings,
    metrics: Metrics,
    purpose: str,
    metadata: dict[str, Any],
    model_path: Path,
    data_label: str,
) -> None:
    """Add one row to the scores table of the records database."""
    values = {k: v for k, v in metrics.as_dict().items() if k != "predicted_leaver_share"}
    records.add(
        settings.records_path,
        "scores",
        {
            "time": records.utc_now(),
            "purpose": purpose,
            "model_version": metadata.get("version"),
            "model_path": str(model_path),
            "data_path": data_label,
            "threshold": metadata.get("threshold"),
            **values,
        },
    )


def read_score_file(path: Path) -> float:
    """The F1 stored in a latestscore.txt."""
    try:
        return float(Path(path).read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        raise DataError(f"no score at {path}: run scoring.py first") from None
    except ValueError:
        raise DataError(f"{path} does not hold a number; score the model again") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    parser.add_argument(
        "--model", type=Path, metavar="PATH",
        help="model to score (default: the trained model in the model folder)",
    )
    parser.add_argument(
        "--data", type=Path, metavar="PATH", help="labelled CSV to score on (default: test data)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    report = score(settings, model_path=args.model, data_path=args.data)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
