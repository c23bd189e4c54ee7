"""Training: fit the attrition model on the master dataset and save it with readable metadata.

The model is a scikit-learn Pipeline (per-type preprocessing in a ColumnTransformer, then logistic
regression) wrapped in a FixedThresholdClassifier: the system is judged by F1, so the decision
threshold is tuned for F1 by cross-validation and travels inside the pickle, where every prediction
(model.predict) uses it.

Beside the pickle, training writes model.json: the same fitted arithmetic as plain data (medians,
log and scaling parameters, categories, weights, threshold), checked against predict_proba on the
training rows. Serving, scoring, the drift check and the risk list use it through numpy alone, so
they neither import scikit-learn nor unpickle anything; the pickle stays for the course contract
and for any model that is not linear.
"""

from __future__ import annotations

import argparse
import functools
import logging
import pickle
import platform
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import sklearn
from scipy.special import expit
from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
# Platt's sigmoid as CalibratedClassifierCV fits it: choosing between methods needs it alone.
from sklearn.calibration import _SigmoidCalibration
from sklearn.compose import ColumnTransformer
from sklearn.frozen import FrozenEstimator
from sklearn.impute import SimpleImputer
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_curve
from sklearn.model_selection import FixedThresholdClassifier, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from threadpoolctl import ThreadpoolController

import atomicio
import records
from errors import InsufficientDataError, run_cli
from dataset import read_master, row_hashes
from locks import pipeline_lock
from scoring import (
    LinearScorer, calibration, category_texts, f1_of, imputed, model_input, roc_auc,
    standardized,
)
from settings import ModelSettings, Schema, Settings, add_config_argument, load_settings

log = logging.getLogger(__name__)

# Enough rows to test each feature for drift with good power, few enough to keep releases small.
TRAINING_SAMPLE_ROWS = 5000
# model.json must give predict_proba's probabilities to within this, or training stops: a larger
# difference is a bug in the export, and serving it would change every answer.
PLAIN_MODEL_TOLERANCE = 1e-12
PLAIN_MODEL_FORMAT = 1
# What a missing category is called: the model learns a weight for it like any other.
MISSING_CATEGORY = "missing"


@dataclass
class TrainingResult:
    """A trained model, where it was saved, and what is known about it."""

    model: ClassifierMixin
    model_path: Path
    metadata_path: Path
    metadata: dict[str, Any]

    @property
    def version(self) -> str:
        return self.metadata["version"]

    def summary(self) -> str:
        meta = self.metadata
        metrics = meta["training_metrics"]
        lines = [
            f"Trained model {meta['version']} on {meta['training_data']['rows']} rows "
            f"({meta['training_data']['leavers']} leavers) in {meta['training_seconds']:.2f} s",
            f"  decision threshold {meta['threshold']:.3f} ({meta['threshold_source']})",
        ]
        if metrics.get("cv_f1") is not None:
            lines.append(f"  cross-validated F1 at that threshold: {metrics['cv_f1']:.3f}")
        lines.append(f"  F1 on the training data: {metrics['train_f1']:.3f}")
        lines.append(f"Saved {self.model_path} and {self.metadata_path.name}")
        return "\n".join(lines)


def build_pipeline(schema: Schema, options: ModelSettings) -> Pipeline:
    """Preprocessing by column type, then logistic regression; id columns are never features.

    Medians are np.median of each column's present values: strategy="median" computes the same
    number through numpy's masked arrays, at 0.9 s per fit on 800,000 rows against 0.1 s.
    """
    counts, other_numbers = numeric_groups(schema)
    transformers = []
    if counts:
        transformers.append((
            "counts",
            make_pipeline(
                SimpleImputer(strategy=np.median),
                # Activity and company size span orders of magnitude; log1p makes them usable by
                # a linear model and keeps zero at zero.
                FunctionTransformer(np.log1p, feature_names_out="one-to-one"),
                StandardScaler(),
            ),
            counts,
        ))
    if other_numbers:
        transformers.append((
            "numbers",
            make_pipeline(SimpleImputer(strategy=np.median), StandardScaler()),
            other_numbers,
        ))
    if schema.categorical_features:
        transformers.append((
            "categories",
            make_pipeline(
                SimpleImputer(strategy="constant", fill_value=MISSING_CATEGORY),
                OneHotEncoder(handle_unknown="ignore"),
            ),
            list(schema.categorical_features),
        ))
    return Pipeline([
        ("preprocess", ColumnTransformer(transformers, remainder="drop")),
        ("classifier", new_classifier(options)),
    ])


def numeric_groups(schema: Schema) -> tuple[list[str], list[str]]:
    """The numeric features that are counts (log1p'd) and the others, in the model's order."""
    counts = [c for c in schema.numeric_features if c in schema.count_columns]
    return counts, [c for c in schema.numeric_features if c not in schema.count_columns]


def new_classifier(options: ModelSettings) -> LogisticRegression:
    return LogisticRegression(
        C=options.C, max_iter=options.max_iter, random_state=options.random_state
    )


def fit_linear(
    features: pd.DataFrame,
    target: np.ndarray,
    schema: Schema,
    options: ModelSettings,
    sample_weight: np.ndarray | None = None,
) -> LinearScorer:
    """build_pipeline()'s model fitted without the pipeline, as model.json would hold it.

    The same arithmetic as the pipeline's steps (medians of the present values, log1p of counts,
    the scaler's mean and standard deviation, a column per category seen) gives the logistic
    regression the same matrix: the log-odds agree to ~1e-15 (a test holds them within 1e-9).
    Cross-validation and judging training plans fit eight models a drift cycle; through the
    pipeline, scikit-learn's checks of each step's input took three times the fit itself. The
    decision threshold is left at 0.5.
    """
    counts, other_numbers = numeric_groups(schema)
    numeric = [_learned_numeric(features, column, column in counts)
               for column in counts + other_numbers]
    categorical = [_learned_categories(features, column) for column in schema.categorical_features]
    columns = [standardized(features, term) for term in numeric if term is not None]
    for term in categorical:
        if term["weights"]:
            codes = pd.Categorical(category_texts(features, term), categories=term["weights"]).codes
            columns += [codes == code for code in range(len(term["weights"]))]
    if not columns:
        raise InsufficientDataError("cannot train: no feature has a value in the training rows")
    classifier = new_classifier(options).fit(
        np.column_stack(columns).astype("float64", copy=False), target,
        sample_weight=sample_weight,
    )
    weights = iter(classifier.coef_[0])
    for index, (column, term) in enumerate(zip(counts + other_numbers, numeric, strict=True)):
        # The pipeline's imputer drops a column with no value at all: it adds nothing.
        numeric[index] = (
            {"column": column, "log1p": None, "fill": 0.0, "mean": 0.0, "scale": 1.0, "weight": 0.0}
            if term is None else term | {"weight": float(next(weights))}
        )
    for term in categorical:
        term["weights"] = {category: float(next(weights)) for category in term["weights"]}
    return LinearScorer({
        "kind": "logistic-regression", "threshold": 0.5,
        "intercept": float(classifier.intercept_[0]), "numeric": numeric,
        "categorical": categorical,
    })


def _learned_numeric(features: pd.DataFrame, column: str, is_count: bool) -> dict[str, Any] | None:
    """A numeric column's fill, mean and scale as the pipeline's imputer and scaler learn them."""
    values = features[column].to_numpy(dtype="float64", na_value=np.nan)
    present = values[~np.isnan(values)]
    if not len(present):
        return None
    term = {"column": column, "log1p": "after-imputing" if is_count else None,
            "fill": float(np.median(present))}
    before_scaling = imputed(features, term)
    mean, variance = float(before_scaling.mean()), float(before_scaling.var())
    # StandardScaler's test of a constant column (the error bound of a two-pass variance): its
    # scale is then 1, not a rounding error that would blow the column up.
    rows, eps = len(before_scaling), np.finfo("float64").eps
    constant = variance <= rows * eps * variance + (rows * mean * eps) ** 2
    return term | {"mean": mean, "scale": 1.0 if constant else float(np.sqrt(variance))}


def _learned_categories(features: pd.DataFrame, column: str) -> dict[str, Any]:
    """A categorical column's fill and categories (sorted, as OneHotEncoder keeps them)."""
    term = {"column": column, "fill": MISSING_CATEGORY, "weights": {}}
    if features[column].notna().any():  # the imputer drops a column with no value at all
        term["weights"] = dict.fromkeys(sorted(set(category_texts(features, term))), 0.0)
    return term


class TrainingPlan(NamedTuple):
    """Which rows of the master dataset a model learns from, and how much each one counts.

    After the business changes, the old rows may describe a process that no longer holds; the
    cycle tries several plans and keeps the one that predicts the newest clients best.
    """

    name: str
    # Ingestion runs (batches) to learn from; None: every row of the master dataset.
    batches: frozenset[str] | None = None
    # Sample weights that halve every this many batches back from the newest; None: equal weights.
    half_life_batches: float | None = None

    def describe(self) -> str:
        if self.batches is not None:
            return f"{self.name} ({len(self.batches)} batch(es))"
        if self.half_life_batches is not None:
            return f"{self.name} (weights halve every {self.half_life_batches:g} batches)"
        return self.name


ALL_HISTORY = TrainingPlan("all history")


def plan_rows(
    frame: pd.DataFrame, plan: TrainingPlan, batch_of_row: np.ndarray | None
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The rows `plan` learns from and their sample weights (None: all weigh the same)."""
    if plan.batches is None and plan.half_life_batches is None:
        return frame, None
    if batch_of_row is None:
        raise InsufficientDataError(
            f"cannot train on '{plan.name}': which batch each row came from is not recorded"
        )
    if plan.batches is not None:
        chosen = np.isin(batch_of_row, list(plan.batches))
        return frame.loc[chosen].reset_index(drop=True), None
    order = {batch: number for number, batch in enumerate(dict.fromkeys(batch_of_row))}
    age = len(order) - 1 - np.array([order[batch] for batch in batch_of_row], dtype=float)
    return frame, 0.5 ** (age / plan.half_life_batches)


def fit_model(
    frame: pd.DataFrame,
    schema: Schema,
    options: ModelSettings,
    sample_weight: np.ndarray | None = None,
) -> tuple[ClassifierMixin, dict[str, Any]]:
    """Fit the model and choose its threshold; return it with how the threshold was chosen."""
    target = frame[schema.target].astype(int).to_numpy()
    features = model_input(frame, schema)
    class_counts = np.bincount(target, minlength=2)
    if len(frame) == 0 or class_counts.min() == 0:
        only = "no rows" if len(frame) == 0 else (
            f"only {'leavers' if class_counts[0] == 0 else 'clients who stayed'} "
            f"({len(frame)} rows, {schema.target}={int(target[0])} for all)"
        )
        raise InsufficientDataError(
            f"cannot train: the training data has {only}; a model needs both clients who left "
            "and clients who stayed. Ingest more data first."
        )
    pipeline = build_pipeline(schema, options)
    estimator: ClassifierMixin = pipeline
    calibrator = None  # fitted by tuning, to put in the calibrated model once it is fitted
    needed = options.cv_folds * options.min_class_rows_per_fold
    if class_counts.min() >= needed:
        with one_blas_thread():
            tuning = tune_threshold(features, target, schema, options, sample_weight)
        threshold = tuning.threshold
        info = {
            "threshold": threshold,
            "threshold_source": f"tuned for F1 by {options.cv_folds}-fold cross-validation"
            + (f" on {tuning.calibration['method']}-calibrated probabilities"
               if tuning.calibration["method"] else ""),
            "cv_f1": tuning.f1,
            "calibration": tuning.calibration,
        }
        if tuning.calibrator is not None:
            # The model is CalibratedClassifierCV(ensemble=False): one pipeline fitted on all
            # rows and a calibrator of its log-odds. The pipeline is fitted here and frozen, and
            # the calibrator is tuning's, fitted on the out-of-fold log-odds it computed: the
            # folds are not fitted a second time.
            with one_blas_thread():
                pipeline.fit(features, target, **_weight_params(sample_weight))
            # cv=2: the frozen pipeline predicts the same whatever the folds, and the calibrator
            # fitted on its predictions is replaced below; each fold costs a prediction.
            estimator = CalibratedClassifierCV(
                FrozenEstimator(pipeline), method=tuning.calibration["method"], cv=2
            )
            calibrator = tuning.calibrator
    else:
        threshold = options.default_threshold
        info = {
            "threshold": threshold,
            "threshold_source": (
                f"default: the smaller class has {class_counts.min()} rows, tuning needs "
                f"at least {needed} ({options.cv_folds} folds x {options.min_class_rows_per_fold})"
            ),
            "cv_f1": None,
            "calibration": None,
        }
    model = FixedThresholdClassifier(
        estimator, threshold=threshold, response_method="predict_proba"
    )
    if calibrator is None:
        with one_blas_thread():
            model.fit(features, target, **_weight_params(sample_weight))
        return model, info
    # Fitting the frozen model only fits a calibrator, on a few rows of each class (a million
    # took a second), which is then replaced by tuning's: the one CalibratedClassifierCV(cv=folds)
    # would fit.
    few = np.sort(np.concatenate([
        np.flatnonzero(target == label)[:CALIBRATOR_PLACEHOLDER_ROWS] for label in (0, 1)
    ]))
    model.fit(features.iloc[few], target[few])
    (inner,) = model.estimator_.calibrated_classifiers_
    inner.calibrators = [calibrator]
    return model, info


def fit_quickly(
    frame: pd.DataFrame, schema: Schema, options: ModelSettings,
    sample_weight: np.ndarray | None = None,
) -> LinearScorer:
    """One fit and an in-sample F1 threshold: enough to judge a training plan on held-out rows.

    A linear model of a few features hardly overfits, so its in-sample threshold is close to the
    cross-validated one at a sixth of the cost; the plan that wins is then trained for real.
    """
    target = frame[schema.target].astype(int).to_numpy()
    if len(frame) == 0 or np.bincount(target, minlength=2).min() == 0:
        raise InsufficientDataError("a training plan needs clients who left and who stayed")
    with one_blas_thread():
        fitted = fit_linear(frame, target, schema, options, sample_weight)
    precision, recall, thresholds = precision_recall_curve(
        target, fitted.probabilities(frame), sample_weight=sample_weight
    )
    f1 = f1_from_precision_recall(precision[:-1], recall[:-1])
    return fitted.with_threshold(float(thresholds[int(np.argmax(f1))]))


def one_blas_thread() -> AbstractContextManager[Any]:
    """Fit with one BLAS thread: the products of a few feature columns are too small to share out.

    On two cores, OpenBLAS's threads made a logistic regression on 800,000 rows take 2.0-2.4 s
    instead of 1.1-1.3 s, and on 10,000 rows up to twice as long, whenever the other core was busy.
    """
    return _thread_pools().limit(limits=1, user_api="blas")


@functools.cache
def _thread_pools() -> ThreadpoolController:
    """The BLAS libraries loaded, found once: a search of every loaded library took 4-15 ms here,
    and a drift cycle limits BLAS threads five times; limiting through this takes 0.05 ms.

    numpy's and scipy's OpenBLAS are loaded by the time this module is (scikit-learn imports scipy).
    """
    return ThreadpoolController()


def _weight_params(sample_weight: np.ndarray | None) -> dict[str, Any]:
    return {} if sample_weight is None else {"classifier__sample_weight": sample_weight}


class ThresholdTuning(NamedTuple):
    """The F1-tuned threshold, its cross-validated F1, and how calibrated the model was found."""

    threshold: float
    f1: float
    # ECE and Brier score of the out-of-fold probabilities; the method chosen (None: left alone)
    # with each method's cross-validated Brier score, and the ECE after it.
    calibration: dict[str, Any]
    # The chosen method's calibrator, fitted on the out-of-fold log-odds of the rows tuned on
    # (all, or a sample of max_tuning_rows); None when the model is left uncalibrated.
    calibrator: IsotonicRegression | _SigmoidCalibration | None = None


# Rows of each class a calibrated model is fitted on before its calibrator is replaced by
# tuning's (fit_model).
CALIBRATOR_PLACEHOLDER_ROWS = 500


def _folds(options: ModelSettings) -> StratifiedKFold:
    return StratifiedKFold(options.cv_folds, shuffle=True, random_state=options.random_state)


def tune_threshold(
    features: pd.DataFrame, target: np.ndarray, schema: Schema, options: ModelSettings,
    sample_weight: np.ndarray | None = None,
) -> ThresholdTuning:
    """The probability threshold that maximises F1 on out-of-fold predictions, and that F1.

    scikit-learn's TunedThresholdClassifierCV does the same but calls f1_score once per candidate
    threshold and fold (seconds of overhead at any data size); one precision-recall curve over the
    pooled out-of-fold probabilities scores every candidate at once. Each fold's model is
    build_pipeline()'s, fitted by fit_linear. When those probabilities are miscalibrated beyond
    `options.calibration_bound`, the threshold is tuned on calibrated ones.
    """
    sampled = len(target) > options.max_tuning_rows
    if sampled:
        rng = np.random.default_rng(options.random_state)
        rows = np.sort(rng.choice(len(target), size=options.max_tuning_rows, replace=False))
        features, target = features.iloc[rows], target[rows]
        sample_weight = None if sample_weight is None else sample_weight[rows]
    folds = _folds(options)
    # The log-odds, which a calibrator takes; expit of them is exactly predict_proba's answer.
    logits = np.empty(len(target))
    for train_rows, test_rows in folds.split(features, target):
        fold_model = fit_linear(
            features.iloc[train_rows], target[train_rows], schema, options,
            None if sample_weight is None else sample_weight[train_rows],
        )
        logits[test_rows] = fold_model.logits(features.iloc[test_rows])
    probabilities = expit(logits)
    measured = calibration(target, probabilities)
    report: dict[str, Any] = {
        "cv_ece": measured.ece, "cv_brier": measured.brier, "bound": options.calibration_bound,
        "method": None,
    }
    calibrator = None
    if measured.ece > options.calibration_bound:
        method, probabilities, briers = choose_calibration(logits, target, folds)
        report |= {
            "method": method,
            "cv_brier_by_method": briers,
            "calibrated_cv_ece": calibration(target, probabilities).ece,
        }
        calibrator = new_calibrator(method).fit(logits, target)
        report["fitted_on"] = f"out-of-fold log-odds of {len(target)} rows"
    precision, recall, thresholds = precision_recall_curve(
        target, probabilities, sample_weight=sample_weight
    )
    # The last precision/recall pair has no threshold (it is the "predict nobody" end).
    f1 = f1_from_precision_recall(precision[:-1], recall[:-1])
    best = int(np.argmax(f1))
    return ThresholdTuning(float(thresholds[best]), float(f1[best]), report, calibrator)


CALIBRATION_METHODS = ("isotonic", "sigmoid")


def choose_calibration(
    logits: np.ndarray, target: np.ndarray, folds: StratifiedKFold
) -> tuple[str, np.ndarray, dict[str, float]]:
    """The calibration method with the lower cross-validated Brier score, and its probabilities.

    Each method's calibrator is fitted on the out-of-fold log-odds of all folds but one and
    predicts the one left out, so both are judged, and the threshold later tuned, on probabilities
    the calibrator has not seen.
    """
    calibrated = {method: np.empty(len(target)) for method in CALIBRATION_METHODS}
    column = logits.reshape(-1, 1)
    for train_rows, test_rows in folds.split(column, target):
        for method in CALIBRATION_METHODS:
            fitted = new_calibrator(method).fit(logits[train_rows], target[train_rows])
            calibrated[method][test_rows] = fitted.predict(logits[test_rows])
    briers = {
        method: float(np.mean((probabilities - target) ** 2))
        for method, probabilities in calibrated.items()
    }
    best = min(CALIBRATION_METHODS, key=briers.__getitem__)  # a tie goes to the first
    return best, calibrated[best], briers


def new_calibrator(method: str) -> IsotonicRegression | _SigmoidCalibration:
    """An unfitted calibrator of log-odds, as CalibratedClassifierCV makes one for `method`."""
    if method == "isotonic":
        return IsotonicRegression(out_of_bounds="clip")
    return _SigmoidCalibration()


def f1_from_precision_recall(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    total = precision + recall
    return np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)


def train(
    settings: Settings,
    held_out: pd.DataFrame | None = None,
    plan: TrainingPlan = ALL_HISTORY,
) -> TrainingResult:
    """Train on the master dataset and save trainedmodel.pkl with its metadata beside it.

    `held_out` rows (e.g. part of a new batch kept to judge the retrained model on data it has
    not seen) are left out of training; `plan` says which of the other rows count, and how much.
    """
    data_path = settings.finaldata_path
    if not data_path.exists():
        raise InsufficientDataError(
            f"no master dataset at {data_path}: run ingestion.py first"
        )
    started = time.perf_counter()
    data_checksum = atomicio.sha256_of(data_path)
    frame = read_master(settings)
    schema = settings.schema
    frame, weights, held_out_rows = training_frame(settings, frame, held_out, plan)
    model, threshold_info = fit_model(frame, schema, settings.model, weights)
    seconds = time.perf_counter() - started

    target = frame[schema.target].astype(int).to_numpy()
    # In-sample metrics only describe the fit; on a sample as large as threshold tuning uses they
    # are as precise, and scoring a million rows twice more would double a large training's tail.
    measured = frame.sample(n=min(len(frame), settings.model.max_tuning_rows),
                            random_state=settings.model.random_state)
    measured_target = measured[schema.target].astype(int).to_numpy()
    probabilities = model.predict_proba(model_input(measured, schema))[:, 1]
    trained_at = datetime.now(UTC)
    # Milliseconds keep versions distinct when the same data is trained twice in a second.
    version = f"{trained_at:%Y%m%dT%H%M%S}.{trained_at.microsecond // 1000:03d}Z-{data_checksum[:8]}"
    metadata = {
        "version": version,
        "trained_at": trained_at.isoformat(timespec="seconds"),
        "training_data": {
            "path": str(data_path),
            "sha256": data_checksum,
            "rows": len(frame),
            "leavers": int(target.sum()),
            "held_out_rows": held_out_rows,
            "plan": plan.describe(),
        },
        "schema": {
            "target": schema.target,
            "id_columns": list(schema.id_columns),
            "numeric_features": list(schema.numeric_features),
            "categorical_features": list(schema.categorical_features),
            "count_columns": list(schema.count_columns),
        },
        "features": list(schema.features),
        "threshold": threshold_info["threshold"],
        "threshold_source": threshold_info["threshold_source"],
        "calibration": threshold_info["calibration"],
        "model_settings": settings.model._asdict(),
        "training_metrics": {
            "cv_f1": threshold_info["cv_f1"],
            "train_f1": f1_of(measured_target, probabilities >= threshold_info["threshold"]),
            "train_roc_auc": roc_auc(measured_target, probabilities),
            "train_metric_rows": len(measured),
        },
        "training_seconds": round(seconds, 3),
        "library_versions": library_versions(),
    }
    # Gone before the pickle changes, so that model.json never stands beside another model.
    settings.model_json_path.unlink(missing_ok=True)
    atomicio.write_bytes(settings.model_path, pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))
    metadata["model_sha256"] = atomicio.sha256_of(settings.model_path)
    plain = plain_model(model, metadata, measured, probabilities)
    if plain is not None:
        atomicio.write_json(settings.model_json_path, plain)
        metadata["model_json_sha256"] = atomicio.sha256_of(settings.model_json_path)
    sample = frame.sample(
        n=min(len(frame), TRAINING_SAMPLE_ROWS), random_state=settings.model.random_state
    ).sort_index()
    atomicio.write_with(settings.training_sample_path, lambda p: sample.to_csv(p, index=False))
    atomicio.write_json(settings.model_metadata_path, metadata)
    records.add(
        settings.records_path,
        "trainings",
        {
            "time": metadata["trained_at"],
            "model_version": version,
            "data_checksum": data_checksum,
            "rows": len(frame),
            "threshold": metadata["threshold"],
            "seconds": seconds,
            "details": metadata,
        },
    )
    records.add_stage_run(settings.records_path, "training", seconds, len(frame))
    log.info("trained model %s on %d rows", version, len(frame))
    return TrainingResult(model, settings.model_path, settings.model_metadata_path, metadata)


def training_frame(
    settings: Settings,
    master: pd.DataFrame,
    held_out: pd.DataFrame | None,
    plan: TrainingPlan,
) -> tuple[pd.DataFrame, np.ndarray | None, int]:
    """The master rows a plan trains on, less the held-out rows; their weights; rows held out."""
    rows = rows_to_train_on(settings, master, held_out, batches=plan != ALL_HISTORY)
    frame, weights = plan_rows(rows.frame, plan, rows.batches)
    return frame, weights, rows.held_out


class TrainingRows(NamedTuple):
    """The master rows any plan may train on, each row's batch, and how many rows were held out."""

    frame: pd.DataFrame
    batches: np.ndarray | None  # None: not asked for, or not recorded (see master_batches)
    held_out: int


def rows_to_train_on(
    settings: Settings, master: pd.DataFrame, held_out: pd.DataFrame | None, *, batches: bool
) -> TrainingRows:
    """The master dataset less the held-out rows, with each row's batch if `batches`."""
    from ingestion import master_batches

    schema = settings.schema
    batch_of_row = master_batches(settings, len(master)) if batches else None
    if held_out is None or not len(held_out):
        return TrainingRows(master, batch_of_row, 0)
    kept = ~row_hashes(master, schema).isin(row_hashes(held_out, schema)).to_numpy()
    return TrainingRows(
        master.loc[kept].reset_index(drop=True),
        None if batch_of_row is None else batch_of_row[kept],
        int((~kept).sum()),
    )


def library_versions() -> dict[str, str]:
    """The versions a pickled model depends on; loading it elsewhere should match them."""
    return {
        "python": platform.python_version(),
        "scikit-learn": sklearn.__version__,
        "pandas": pd.__version__,
        "numpy": np.__version__,
    }


def plain_model(
    model: ClassifierMixin, metadata: dict[str, Any], rows: pd.DataFrame, probabilities: np.ndarray
) -> dict[str, Any] | None:
    """The fitted model as model.json holds it, checked to give `probabilities` on `rows`.

    None for a model that is not the linear pipeline build_pipeline() makes: its users load the
    pickle instead. `probabilities` are model.predict_proba's on `rows`, some of the training rows.
    """
    try:
        params = linear_model_params(model)
    except ValueError as error:
        log.info("no model.json for model %s (%s): only its pickle can score", metadata["version"],
                 error)
        return None
    difference = float(np.max(
        np.abs(LinearScorer(params).probabilities(rows) - probabilities), initial=0.0
    ))
    if difference > PLAIN_MODEL_TOLERANCE:
        raise RuntimeError(
            f"model.json would differ from predict_proba by up to {difference:.3g} on the training "
            f"rows (allowed {PLAIN_MODEL_TOLERANCE:g}): the export does not match the pipeline"
        )
    return {
        "format": PLAIN_MODEL_FORMAT,
        "version": metadata["version"],
        "features": metadata["features"],
        "numeric_features": metadata["schema"]["numeric_features"],
        "categorical_features": metadata["schema"]["categorical_features"],
        **params,
        "model_sha256": metadata["model_sha256"],
        "library_versions": metadata["library_versions"],
        "checked_on_training_rows": len(rows),
        "largest_difference_from_predict_proba": difference,
    }


def linear_model_params(model: ClassifierMixin) -> dict[str, Any]:
    """The fitted model's arithmetic as plain data, for scoring with numpy alone (scoring.py).

    Reads the pipeline build_pipeline() makes inside its FixedThresholdClassifier: imputer
    statistics, log1p, scaler, one-hot categories, the logistic regression's weights and the
    decision threshold. A model of any other shape raises ValueError; its users fall back to
    model.predict_proba.
    """
    pipeline = getattr(model, "estimator_", None)
    calibration_params = None
    if isinstance(pipeline, CalibratedClassifierCV):
        pipeline, calibration_params = _calibration_params(pipeline)
    if not isinstance(model, FixedThresholdClassifier) or not isinstance(pipeline, Pipeline):
        raise ValueError("not a FixedThresholdClassifier around a fitted Pipeline")
    preprocess, classifier = pipeline.named_steps.get("preprocess"), pipeline[-1]
    if not isinstance(preprocess, ColumnTransformer) or not isinstance(
        classifier, LogisticRegression
    ) or classifier.coef_.shape[0] != 1 or list(classifier.classes_) != [0, 1]:
        raise ValueError("not a ColumnTransformer and a binary LogisticRegression")
    weights = iter(classifier.coef_[0])
    numeric: list[dict[str, Any]] = []
    categorical: list[dict[str, Any]] = []
    for _, steps, columns in preprocess.transformers_:
        if steps == "drop":
            continue
        if not isinstance(steps, Pipeline):
            raise ValueError(f"unexpected transformer {steps!r}")
        if isinstance(steps[-1], OneHotEncoder):
            categorical += _categorical_params(steps, columns, weights)
        else:
            numeric += _numeric_params(steps, columns, weights)
    if next(weights, None) is not None:
        raise ValueError("the model has more weights than the pipeline has outputs")
    return {
        "kind": "logistic-regression",
        "threshold": float(model.threshold),
        "intercept": float(classifier.intercept_[0]),
        "numeric": numeric,
        "categorical": categorical,
        **({"calibration": calibration_params} if calibration_params else {}),
    }


def _calibration_params(calibrated: CalibratedClassifierCV) -> tuple[Any, dict[str, Any]]:
    """The pipeline inside a CalibratedClassifierCV(ensemble=False), and its calibrator as data."""
    if len(calibrated.calibrated_classifiers_) != 1:
        raise ValueError("a calibrated ensemble, not one pipeline with one calibrator")
    (inner,) = calibrated.calibrated_classifiers_
    (calibrator,) = inner.calibrators
    pipeline = inner.estimator
    if isinstance(pipeline, FrozenEstimator):  # fitted before it was calibrated (big data)
        pipeline = pipeline.estimator
    if inner.method == "sigmoid":
        return pipeline, {
            "method": "sigmoid", "a": float(calibrator.a_), "b": float(calibrator.b_)
        }
    if inner.method == "isotonic" and calibrator.out_of_bounds == "clip":
        return pipeline, {
            "method": "isotonic",
            "x": [float(x) for x in calibrator.X_thresholds_],
            "y": [float(y) for y in calibrator.y_thresholds_],
        }
    raise ValueError(f"unexpected calibration {inner.method!r}")


def _numeric_params(steps: Pipeline, columns: list[str], weights: Any) -> list[dict[str, Any]]:
    *transforms, scaler = steps
    imputers = [step for step in transforms if isinstance(step, SimpleImputer)]
    logs = [step for step in transforms if isinstance(step, FunctionTransformer)]
    if not isinstance(scaler, StandardScaler) or len(imputers) != 1 or (
        len(imputers) + len(logs) != len(transforms)
        or any(step.func is not np.log1p for step in logs) or len(logs) > 1
    ):
        raise ValueError(f"unexpected numeric steps {steps!r}")
    if not logs:
        log1p = None
    elif transforms.index(logs[0]) < transforms.index(imputers[0]):
        log1p = "before-imputing"
    else:
        log1p = "after-imputing"
    means = scaler.mean_ if scaler.mean_ is not None else np.zeros(len(columns))
    scales = scaler.scale_ if scaler.scale_ is not None else np.ones(len(columns))
    return [
        {"column": column, "log1p": log1p, "fill": float(fill), "mean": float(mean),
         "scale": float(scale), "weight": float(next(weights))}
        for column, fill, mean, scale in zip(columns, imputers[0].statistics_, means, scales,
                                             strict=True)
    ]


def _categorical_params(
    steps: Pipeline, columns: list[str], weights: Any
) -> list[dict[str, Any]]:
    imputer, encoder = steps
    if not isinstance(imputer, SimpleImputer) or encoder.drop is not None:
        raise ValueError(f"unexpected categorical steps {steps!r}")
    return [
        {"column": column, "fill": str(fill),
         "weights": {str(c): float(next(weights)) for c in categories}}
        for column, fill, categories in zip(columns, imputer.statistics_, encoder.categories_,
                                            strict=True)
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    with pipeline_lock(settings, "training"):  # the model folder is shared with a running cycle
        result = train(settings)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
