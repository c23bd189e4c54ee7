"""Scoring: the model in use. Load a model, predict a frame, measure it on labelled data, record it.

Everything that turns a fitted model and rows into answers lives here, so the API, the report, the
cycle and this command agree by construction:

- `load_deployed` and `load_served_model` give the deployed release's model as a `ServedModel`:
  its model.json (the fitted arithmetic as plain data, written by training) scored by
  `LinearScorer` in numpy, so that nothing here imports scikit-learn or unpickles a file; only a
  release without model.json (trained before it existed, or not linear) falls back to the pickle,
  and the API never does;
- `load_model` unpickles a model this project saved, after checking its checksum;
- `predict_frame` gives each row's class and probability of leaving, for a ServedModel or a
  scikit-learn model (through its LinearScorer when the model is ours);
- `explain` gives the reasons of each row's risk: every feature's exact term of the log-odds
  against the typical client, and the three that raise it most, in words;
- `evaluate` measures a model on a labelled frame (F1 with a bootstrap interval, precision, recall,
  ROC AUC, base rates);
- `score` is the stage: the trained model on the test data, F1 to latestscore.txt (the original
  format; `write_score_file` and `read_score_file` are its only writer and reader) and the full
  metrics to the records database.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import pickle
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import atomicio
import records
from dataset import read_dataset
from deployment import MODEL_FILE, MODEL_JSON_FILE, Release, current_release, verify_release
from errors import DataError, DeploymentError, ModelNotFoundError, run_cli
from locks import pipeline_lock
from settings import Schema, ScoringSettings, Settings, add_config_argument, load_settings

log = logging.getLogger(__name__)


# --- The model in use --------------------------------------------------------------------------


def load_model(model_path: Path, expected_sha256: str | None = None) -> Any:
    """Unpickle a model this project saved; with a checksum, refuse a file that differs from it."""
    data = _checked_bytes(Path(model_path), expected_sha256)
    # Only ever our own, checksummed files reach this point: a pickle runs code when loaded.
    return pickle.loads(data)  # noqa: S301


def read_plain_model(path: Path, expected_sha256: str | None = None) -> LinearScorer:
    """The LinearScorer of a model.json training wrote; with a checksum, only of that very file."""
    params = json.loads(_checked_bytes(Path(path), expected_sha256))
    if not isinstance(params, dict) or params.get("format") != 1:
        raise DeploymentError(
            f"{path} is not a model.json this version reads (format {params.get('format')!r}): "
            "train and deploy again"
        )
    try:
        return LinearScorer(params)
    except (KeyError, TypeError, ValueError) as error:
        raise DeploymentError(f"{path} does not describe a model: {error!r}") from None


def _checked_bytes(path: Path, expected_sha256: str | None) -> bytes:
    if not path.is_file():
        raise ModelNotFoundError(f"no model at {path}: run training.py first")
    data = path.read_bytes()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise DeploymentError(
                f"model {path} does not match its recorded checksum "
                f"(expected {expected_sha256[:12]}…, found {actual[:12]}…): refusing to load it; "
                "redeploy or roll back"
            )
    return data


@dataclass(frozen=True, eq=False)
class ServedModel:
    """A model as the system uses it: its plain-data arithmetic when it has one, else its pickle.

    `scorer` is set for our linear models (model.json), `model` (the unpickled object) only for a
    model without one; predict_frame and evaluate take either, as they take a scikit-learn model.
    """

    version: str | None
    scorer: LinearScorer | None = None
    model: Any = None

    @property
    def threshold(self) -> float | None:
        """The probability from which a client is predicted to leave."""
        if self.scorer is not None:
            return self.scorer.threshold
        return _decision_threshold(self.model)


def load_served_model(release: Release, *, allow_pickle: bool = True) -> ServedModel:
    """A release's model: its model.json, or (`allow_pickle`, for older releases) its pickle.

    Checksums are those the release recorded; the caller has checked the release as a whole
    (deployment.verify_release) or trusts its folder.
    """
    if MODEL_JSON_FILE in release.files:
        scorer = read_plain_model(release.folder / MODEL_JSON_FILE, release.files[MODEL_JSON_FILE])
        if scorer.params.get("model_sha256") != release.files.get(MODEL_FILE):
            raise DeploymentError(
                f"the {MODEL_JSON_FILE} of release {release.version} was made from another "
                f"model than its {MODEL_FILE}: redeploy or roll back"
            )
        return ServedModel(release.version, scorer=scorer)
    if not allow_pickle:
        raise DeploymentError(
            f"release {release.version} has no {MODEL_JSON_FILE} (it was trained before models "
            "were saved as plain data, or its model is not linear) and a pickle is never loaded "
            "here: train and deploy again (fullprocess.py --force)"
        )
    return ServedModel(
        release.version, model=load_model(release.model_path, release.files[MODEL_FILE])
    )


def load_deployed(settings: Settings, *, allow_pickle: bool = True) -> tuple[ServedModel, Release]:
    """The current release's model and the release, after checking every file's checksum."""
    release = current_release(settings)
    verify_release(release)
    return load_served_model(release, allow_pickle=allow_pickle), release


def load_trained_model(model_path: Path, metadata: dict[str, Any]) -> ServedModel:
    """The model saved at `model_path` (a model folder's or a release's) with its `metadata`.

    Its model.json when training wrote one beside it and both match the metadata; else the pickle.
    """
    model_path = Path(model_path)
    plain_path = model_path.with_name(MODEL_JSON_FILE)
    checksum = metadata.get("model_json_sha256")
    version = metadata.get("version")
    if checksum and plain_path.is_file():
        scorer = read_plain_model(plain_path, checksum)
        if scorer.params.get("model_sha256") == metadata.get("model_sha256"):
            return ServedModel(version, scorer=scorer)
    return ServedModel(version, model=load_model(model_path, metadata.get("model_sha256")))


# A client manager prepares a call from a few reasons, not from every feature.
REASONS_PER_CLIENT = 3
# Below this many rows, reasons are worded row by row rather than through pandas.
FEW_ROWS = 64


class LinearScorer:
    """A linear model's arithmetic in plain numpy, for predictions that must answer in microseconds.

    model.predict_proba spends ~4 ms per call in scikit-learn's input checks, whatever the number of
    rows; the API answers single-record requests, where that is nearly all the time. The parameters
    are plain data (training.linear_model_params): per numeric column the median fill, log1p, the
    scaler's mean and scale and the weight; per categorical column the weight of each category.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        if params.get("kind") != "logistic-regression":
            raise ValueError(f"not a logistic regression: {params.get('kind')!r}")
        self.params = params
        self.threshold = float(params["threshold"])
        self.intercept = float(params["intercept"])
        self.numeric = params["numeric"]
        self.categorical = params["categorical"]
        self.calibration = params.get("calibration")
        if self.calibration is not None and self.calibration.get("method") not in (
            "sigmoid", "isotonic"
        ):
            raise ValueError(f"unknown calibration {self.calibration.get('method')!r}")

    @property
    def features(self) -> tuple[str, ...]:
        """The feature columns, in the order of the columns of contributions()."""
        return tuple(term["column"] for term in self.numeric + self.categorical)

    def logits(self, frame: pd.DataFrame) -> np.ndarray:
        """The log-odds of leaving for each row: the intercept plus every feature's term."""
        return self.intercept + self.contributions(frame).sum(axis=1)

    def contributions(self, frame: pd.DataFrame) -> np.ndarray:
        """Each feature's term of the log-odds, row by row (rows x features).

        A numeric term is the weight times the transformed value's distance from the training
        mean, in standard deviations: the typical client's value adds nothing. A categorical term
        is its category's weight; the penalty of the fit makes a feature's category weights sum to
        about zero, and a category unseen in training adds nothing.
        """
        terms = np.empty((len(frame), len(self.numeric) + len(self.categorical)))
        for index, term in enumerate(self.numeric):
            terms[:, index] = self.numeric_terms(frame, term)
        for index, term in enumerate(self.categorical, start=len(self.numeric)):
            terms[:, index] = self.categorical_terms(frame, term)
        return terms

    @staticmethod
    def numeric_terms(frame: pd.DataFrame, term: dict[str, Any]) -> np.ndarray:
        """One numeric column's contribution to the log-odds, row by row."""
        return standardized(frame, term) * term["weight"]

    @staticmethod
    def categorical_terms(frame: pd.DataFrame, term: dict[str, Any]) -> np.ndarray:
        """One categorical column's contribution; a category unseen in training adds nothing."""
        weights = term["weights"]
        return np.array(
            [weights.get(text, 0.0) for text in category_texts(frame, term)], dtype="float64"
        )

    def with_threshold(self, threshold: float) -> LinearScorer:
        """The same model deciding at another probability."""
        return LinearScorer({**self.params, "threshold": threshold})

    def probabilities(self, frame: pd.DataFrame) -> np.ndarray:
        """The probability of leaving for each row, as model.predict_proba(frame)[:, 1] gives it."""
        return calibrated_probabilities(self.logits(frame), self.calibration)

    def explain(self, frame: pd.DataFrame, reasons: int = REASONS_PER_CLIENT) -> Explanation:
        """Every feature's term of each row's log-odds, and the `reasons` that raise it most."""
        contributions = self.contributions(frame)
        raising = np.argsort(-contributions, axis=1, kind="stable")[:, :reasons]
        raises = np.take_along_axis(contributions, raising, axis=1) > 0
        values, typical, words = [], [], []
        for term in self.numeric:
            raw = frame[term["column"]].to_numpy(dtype="float64", na_value=np.nan)
            fill = term["fill"]
            if term["log1p"] == "before-imputing":  # the fill is then a log too
                fill = float(np.expm1(fill))
            values.append(raw)
            typical.append(typical_value(term))
            words.append(_numeric_reason_words(term["column"], raw, typical[-1], fill))
        for term in self.categorical:
            cells = frame[term["column"]].to_numpy(dtype=object)
            values.append(cells)
            typical.append(None)
            words.append(_category_reason_words(term["column"], cells))
        return Explanation(
            features=self.features,
            contributions=contributions,
            intercept=self.intercept,
            reasons=np.where(raises, raising, -1),
            words=tuple(words),
            values=tuple(values),
            typical=tuple(typical),
        )


def imputed(frame: pd.DataFrame, term: dict[str, Any]) -> np.ndarray:
    """A numeric column as the model's scaler sees it: missing cells filled, log1p'd if a count."""
    values = frame[term["column"]].to_numpy(dtype="float64", na_value=np.nan)
    if term["log1p"] == "before-imputing":
        values = np.log1p(values)
    values = np.where(np.isnan(values), term["fill"], values)
    if term["log1p"] == "after-imputing":
        values = np.log1p(values)
    return values


def standardized(frame: pd.DataFrame, term: dict[str, Any]) -> np.ndarray:
    """A numeric column as the logistic regression sees it: in standard deviations from the mean."""
    return (imputed(frame, term) - term["mean"]) / term["scale"]


def category_texts(frame: pd.DataFrame, term: dict[str, Any]) -> list[str]:
    """A categorical column's cells as the model's categories: text, missing ones as the fill."""
    fill = term["fill"]
    return [fill if pd.isna(cell) else str(cell) for cell in frame[term["column"]].to_numpy(object)]


def probabilities_of(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) for log-odds x, computed without overflow for large |x|."""
    return np.exp(-np.logaddexp(0.0, -logits))


def typical_value(term: dict[str, Any]) -> float:
    """The raw value at which a numeric feature adds nothing: the training mean, transformed back.

    For a log-transformed count that is expm1 of the mean of log1p: the geometric mean of
    (count + 1), less one. Below it and above it the feature pushes the risk opposite ways.
    """
    return float(np.expm1(term["mean"])) if term["log1p"] else float(term["mean"])


def calibrated_probabilities(logits: np.ndarray, calibrator: dict[str, Any] | None) -> np.ndarray:
    """The probabilities a model gives for its log-odds, through its calibration if it has one.

    The calibration is scikit-learn's CalibratedClassifierCV as training fits it, which calibrates
    the logistic regression's decision function (the log-odds): "sigmoid" is Platt's
    1 / (1 + e^(a x + b)) (sklearn's _SigmoidCalibration), "isotonic" the fitted step points,
    interpolated linearly and clipped at both ends (IsotonicRegression(out_of_bounds="clip")).
    """
    if calibrator is None:
        return probabilities_of(logits)
    if calibrator["method"] == "sigmoid":
        return probabilities_of(-(calibrator["a"] * logits + calibrator["b"]))
    points = np.asarray(calibrator["x"], dtype="float64")
    values = np.asarray(calibrator["y"], dtype="float64")
    return np.interp(np.clip(logits, points[0], points[-1]), points, values)


_scorers: weakref.WeakKeyDictionary[Any, LinearScorer | None] = weakref.WeakKeyDictionary()


# --- Why: the reasons of a risk -----------------------------------------------------------------

@dataclass(frozen=True)
class Words:
    """One feature's reason, row by row, in words: each row's index into the feature's texts.

    A million clients share a few thousand distinct values, so each text is made once and the rows
    hold integers (a missing value has a text of its own).
    """

    codes: np.ndarray
    texts: np.ndarray  # object array of str

    def of_row(self, row: int) -> str:
        return self.texts[self.codes[row]]


@dataclass(frozen=True)
class Explanation:
    """Why the model in use gives each row its risk: every feature's exact term of the log-odds.

    `contributions[i, j]` is what feature j adds to row i's log-odds against the typical client
    (the training data's mean, after the model's transforms), so the intercept plus a row's
    contributions is its log-odds, exactly. `reasons[i]` holds the indices of the features that
    raise row i's risk most, largest first (-1 where fewer raise it at all); `words[j]` says each
    row's value of feature j against the typical one.
    """

    features: tuple[str, ...]
    contributions: np.ndarray
    intercept: float
    reasons: np.ndarray
    words: tuple[Words, ...]
    values: tuple[np.ndarray, ...]
    typical: tuple[float | None, ...]

    def logits(self) -> np.ndarray:
        return self.intercept + self.contributions.sum(axis=1)

    def reason_texts(self, position: int) -> np.ndarray:
        """Each row's reason number `position` (0: the strongest) in words; "" where it has none."""
        return np.asarray(self.reason_column(position, np.arange(len(self.reasons))), dtype=object)

    def reason_column(self, position: int, rows: np.ndarray) -> pd.Categorical:
        """Reason number `position` of each of `rows`, as categories: "" where a row has none.

        The rows hold integer codes into the distinct texts; a million clients' reasons are then
        put in order, and written, without touching a million Python strings.
        """
        categories, codes = self._reason_codes
        return pd.Categorical.from_codes(codes[rows, position], dtype=categories)

    @cached_property
    def _reason_codes(self) -> tuple[pd.CategoricalDtype, np.ndarray]:
        """Every distinct reason text, and each row's reasons as codes into them (rows x reasons).

        Two features' texts never match (each begins with its column's name), but within one a
        category may read like the feature's missing value: the texts are made distinct here.
        """
        every_text = [text for words in self.words for text in words.texts.tolist()] + [""]
        distinct = pd.Index(list(dict.fromkeys(every_text)), dtype=object)
        category_of = distinct.get_indexer(every_text)
        starts = np.cumsum([0] + [len(words.texts) for words in self.words])
        # Column j: each row's text of feature j, as a code into every_text; the last column "".
        by_feature = np.full((len(self.reasons), len(self.words) + 1), starts[-1], dtype="int64")
        for feature, words in enumerate(self.words):
            by_feature[:, feature] = starts[feature] + words.codes
        texts = np.take_along_axis(by_feature, self.reasons, axis=1)  # -1 picks the last column
        return pd.CategoricalDtype(distinct), category_of[texts]

    def as_records(self) -> list[list[dict[str, Any]]]:
        """Each row's reasons as JSON-ready dicts: feature, value, typical value, term, words."""
        rows = []
        for row, chosen in enumerate(self.reasons.tolist()):
            rows.append([
                {
                    "feature": self.features[index],
                    "value": _json_value(self.values[index][row]),
                    "typical": self.typical[index],
                    "contribution": float(self.contributions[row, index]),
                    "text": self.words[index].of_row(row),
                }
                for index in chosen if index >= 0
            ])
        return rows


def explain(model: Any, frame: pd.DataFrame) -> Explanation:
    """The reasons of each row's risk under `model`, which must be one of our linear models."""
    scorer = linear_scorer(model)
    if scorer is None:
        raise ValueError("reasons are the arithmetic of a linear model; this model is not one")
    return scorer.explain(frame)


def number_text(value: float) -> str:
    """A number as a manager reads it: whole numbers whole, others to three significant digits."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _numeric_reason_words(column: str, values: np.ndarray, typical: float, fill: float) -> Words:
    typical_text = number_text(typical)
    unknown = f"{column} unknown (taken as {number_text(fill)}), typical {typical_text}: raises risk"
    if len(values) < FEW_ROWS:  # an API request: plain Python beats pandas' fixed cost
        return _row_by_row([
            unknown if value != value else f"{column} {number_text(value)}, typical "
            f"{typical_text}: raises risk" for value in values.tolist()
        ])
    # Worded once per distinct value: a million clients have far fewer distinct counts.
    codes, distinct = pd.factorize(values, use_na_sentinel=True)
    whole = np.isfinite(distinct) & (np.mod(distinct, 1) == 0) & (np.abs(distinct) < 1e15)
    numbers = np.empty(len(distinct), dtype=object)
    numbers[whole] = distinct[whole].astype("int64").astype(str)  # counts: the usual case
    numbers[~whole] = [number_text(value) for value in distinct[~whole].tolist()]
    worded = [f"{column} {number}, typical {typical_text}: raises risk" for number in numbers]
    return _worded_once(codes, worded, unknown)


def _category_reason_words(column: str, cells: np.ndarray) -> Words:
    unknown = f"{column} unknown: raises risk"
    if len(cells) < FEW_ROWS:
        return _row_by_row([
            unknown if pd.isna(cell) else f"{column} {cell}: raises risk" for cell in cells.tolist()
        ])
    codes, distinct = pd.factorize(cells, use_na_sentinel=True)
    worded = [f"{column} {category}: raises risk" for category in distinct]
    return _worded_once(codes, worded, unknown)


def _row_by_row(texts: list[str]) -> Words:
    return Words(np.arange(len(texts)), np.array(texts or [], dtype=object))


def _worded_once(codes: np.ndarray, worded: list[str], unknown: str) -> Words:
    """Words of rows coded by pd.factorize: code -1 (a missing value) reads `unknown`."""
    texts = np.array([*worded, unknown], dtype=object)
    return Words(np.where(codes < 0, len(worded), codes), texts)


def _json_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (np.floating, float)):
        number = float(value)
        return int(number) if number == int(number) and abs(number) < 2**53 else number
    return str(value)


def linear_scorer(model: Any) -> LinearScorer | None:
    """The model's LinearScorer, made once per model object; None for a model of another shape."""
    if isinstance(model, ServedModel):
        # An older release's pickle, when it is our linear pipeline, still has its arithmetic.
        return model.scorer if model.model is None else linear_scorer(model.model)
    if model not in _scorers:
        from training import linear_model_params  # the model is a scikit-learn object already

        try:
            _scorers[model] = LinearScorer(linear_model_params(model))
        except ValueError as error:
            log.info("predictions use predict_proba: %s", error)
            _scorers[model] = None
    return _scorers[model]


@dataclass(frozen=True)
class PredictionResult:
    """The model's answer for each row of a dataset, in the dataset's order."""

    model_version: str
    ids: list[str]
    predictions: list[int]
    probabilities: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "predictions": self.predictions,
            "probabilities": self.probabilities,
            "ids": self.ids,
        }


def predict_frame(
    model: Any, model_version: str, frame: pd.DataFrame, schema: Schema
) -> PredictionResult:
    """Class and probability of leaving for each row of a validated frame; no disk, no checks.

    The API calls this for every request with a cached model, so it asks the model once: the class
    is the probability against the model's own decision threshold, exactly as model.predict does.
    Our own models are scored by their LinearScorer, without scikit-learn's per-call overhead.
    """
    scorer = linear_scorer(model)
    if scorer is not None:
        probabilities = scorer.probabilities(frame)
        return PredictionResult(
            model_version=model_version,
            ids=client_ids(frame, schema),
            predictions=(probabilities >= scorer.threshold).astype(int).tolist(),
            probabilities=probabilities.tolist(),
        )
    if isinstance(model, ServedModel):
        model = model.model
    features = model_input(frame, schema)
    probabilities = model.predict_proba(features)[:, 1]
    threshold = _decision_threshold(model)
    if threshold is None:
        predictions = np.asarray(model.predict(features)).astype(int)
    else:
        predictions = (probabilities >= threshold).astype(int)
    return PredictionResult(
        model_version=model_version,
        ids=client_ids(frame, schema),
        predictions=predictions.tolist(),
        probabilities=probabilities.tolist(),
    )


def model_input(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """The feature columns as a scikit-learn model takes them fastest: numbers as float64 with NaN.

    Nullable Int64 columns take a slow path through scikit-learn's input checks; plain float64
    gives the model the same numbers faster.
    """
    columns = {
        column: (
            frame[column].to_numpy(dtype="float64", na_value=np.nan)
            if column in schema.numeric_features
            else frame[column]
        )
        for column in schema.features
    }
    return pd.DataFrame(columns, index=frame.index, copy=False)


def decision_threshold(model: Any) -> float:
    """The probability from which `model` predicts that a client leaves (0.5 when it keeps none)."""
    if isinstance(model, ServedModel):
        threshold = model.threshold
    else:
        scorer = linear_scorer(model)
        threshold = scorer.threshold if scorer is not None else _decision_threshold(model)
    return 0.5 if threshold is None else threshold


def _decision_threshold(model: Any) -> float | None:
    """The probability threshold model.predict applies, when the model is one of ours."""
    if list(getattr(model, "classes_", [])) != [0, 1]:
        return None
    if getattr(model, "response_method", None) not in ("auto", "predict_proba"):
        return None
    # TunedThresholdClassifierCV keeps the tuned value; FixedThresholdClassifier its parameter.
    threshold = getattr(model, "best_threshold_", getattr(model, "threshold", None))
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return float(threshold)
    return None


def client_ids(frame: pd.DataFrame, schema: Schema) -> list[str]:
    """Each row's client id as text (several id columns joined by " / "; row numbers if none)."""
    id_columns = list(schema.id_columns)
    if not id_columns or any(column not in frame.columns for column in id_columns):
        return [str(number) for number in range(1, len(frame) + 1)]
    if len(id_columns) == 1:
        ids = frame[id_columns[0]]
        if isinstance(ids.dtype, pd.StringDtype):  # text already: no conversion to dispatch
            return ids.tolist()
        return ids.astype("str").tolist()
    return frame[id_columns].astype("str").agg(" / ".join, axis=1).tolist()


# --- Measuring ---------------------------------------------------------------------------------


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
    # ROC AUC's interval (Hanley and McNeil's normal approximation); None with one class only.
    roc_auc_low: float | None = None
    roc_auc_high: float | None = None
    # The call list's own measure: the share of leavers among the `top_rows` highest-risk rows.
    top_rows: int = 0
    top_precision: float | None = None
    top_precision_low: float | None = None
    top_precision_high: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def everyone_leaves_f1(self) -> float:
        """The F1 of predicting "leaves" for every row: a model below it is worse than no model."""
        return 2 * self.leaver_share / (1 + self.leaver_share)


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


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random leaver scores above a random stayer (ties half).

    The Mann-Whitney form with average ranks gives exactly what sklearn.metrics.roc_auc_score
    gives, without importing scikit-learn into scoring.
    """
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype="float64")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based ranks, ties averaged
    positives = int(truth.sum())
    negatives = len(truth) - positives
    rank_sum = float(average_ranks[truth].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def two_proportion_z(
    hits_a: float, rows_a: float, hits_b: float, rows_b: float
) -> tuple[float, float]:
    """z statistic and two-sided p-value of the difference of two proportions (pooled).

    a's share minus b's share; (0, 1) when there is no spread to compare against.
    """
    pooled = (hits_a + hits_b) / (rows_a + rows_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / rows_a + 1 / rows_b))
    if spread == 0:
        return 0.0, 1.0
    z = (hits_a / rows_a - hits_b / rows_b) / spread
    return z, math.erfc(abs(z) / math.sqrt(2))


def wilson_interval(hits: int, rows: int, z: float) -> tuple[float, float]:
    """Wilson's interval of a proportion hits / rows: sound for small counts and shares near 0 or 1,
    where the normal approximation gives bounds outside [0, 1]."""
    if rows == 0:
        return 0.0, 1.0
    share = hits / rows
    denominator = 1 + z**2 / rows
    centre = (share + z**2 / (2 * rows)) / denominator
    half = z * math.sqrt(share * (1 - share) / rows + z**2 / (4 * rows**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def normal_quantile(confidence: float) -> float:
    """The z of a two-sided normal interval at `confidence` (1.96 for 0.95)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def f1_of(truth: np.ndarray, predictions: np.ndarray) -> float:
    """F1 of predicted leavers against the truth (0 when there is nothing to score)."""
    truth, predictions = np.asarray(truth, dtype=bool), np.asarray(predictions, dtype=bool)
    return float(f1_from_counts(
        np.array((truth & predictions).sum()), np.array((~truth & predictions).sum()),
        np.array((truth & ~predictions).sum()),
    ))


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
    z = normal_quantile(options.confidence)
    auc = roc_auc(truth, probabilities) if 0 < truth.sum() < rows else None
    auc_low, auc_high = _auc_interval(auc, int(truth.sum()), rows - int(truth.sum()), z)
    top_rows = max(1, round(rows * options.top_share))
    top = np.argsort(-np.asarray(probabilities, dtype="float64"), kind="stable")[:top_rows]
    top_precision = float(truth[top].mean())
    top_spread = z * math.sqrt(top_precision * (1 - top_precision) / top_rows)
    return Metrics(
        rows=rows,
        f1=float(f1_from_counts(np.array(tp), np.array(fp), np.array(fn))),
        f1_low=low,
        f1_high=high,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        roc_auc=auc,
        leaver_share=float(truth.mean()),
        predicted_leaver_share=float(predictions.mean()),
        roc_auc_low=auc_low,
        roc_auc_high=auc_high,
        top_rows=top_rows,
        top_precision=top_precision,
        top_precision_low=max(0.0, top_precision - top_spread),
        top_precision_high=min(1.0, top_precision + top_spread),
    )


def _auc_interval(
    auc: float | None, positives: int, negatives: int, z: float
) -> tuple[float | None, float | None]:
    """Hanley and McNeil's (1982) normal interval of ROC AUC: cheap at any size."""
    if auc is None:
        return None, None
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)
    ) / (positives * negatives)
    spread = z * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - spread), min(1.0, auc + spread)


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
class Calibration:
    """How far a model's probabilities are from the shares that come true, on labelled rows.

    `curve` is the reliability curve: per bin of predicted probability (equal widths on [0, 1]) its
    edges, rows, mean predicted probability and observed share of leavers (None for an empty bin).
    The Brier score is the mean squared difference of probability and outcome; the expected
    calibration error (ECE) the rows-weighted mean of |observed share - mean predicted| over bins.
    """

    rows: int
    brier: float
    ece: float
    curve: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration(truth: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> Calibration:
    """The reliability curve, Brier score and expected calibration error of `probabilities`."""
    truth = np.asarray(truth, dtype="float64")
    probabilities = np.asarray(probabilities, dtype="float64")
    rows = len(truth)
    if rows == 0:
        raise DataError("cannot measure calibration on an empty dataset")
    # Bin b holds [b/bins, (b+1)/bins); the last bin also holds 1.
    index = np.minimum((probabilities * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    predicted = np.bincount(index, weights=probabilities, minlength=bins)
    observed = np.bincount(index, weights=truth, minlength=bins)
    present = counts > 0
    mean_predicted = np.divide(predicted, counts, out=np.zeros(bins), where=present)
    observed_share = np.divide(observed, counts, out=np.zeros(bins), where=present)
    curve = [
        {
            "low": b / bins,
            "high": (b + 1) / bins,
            "rows": int(counts[b]),
            "mean_predicted": float(mean_predicted[b]) if present[b] else None,
            "observed_share": float(observed_share[b]) if present[b] else None,
        }
        for b in range(bins)
    ]
    return Calibration(
        rows=rows,
        brier=float(np.mean((probabilities - truth) ** 2)),
        ece=float(np.sum(counts * np.abs(observed_share - mean_predicted)) / rows),
        curve=curve,
    )


@dataclass(frozen=True)
class PerformanceEstimate:
    """The performance a calibrated model should have on rows whose outcomes are not known yet.

    Point estimates come from the expected confusion matrix (a row predicted to leave counts p of a
    true positive and 1 - p of a false positive, one predicted to stay p of a false negative);
    intervals from outcomes simulated as Bernoulli(p): the spread the realised figures will have
    around the estimate when the probabilities are right (NannyML's CBPE, with sampling noise).
    """

    rows: int
    f1: float
    f1_low: float
    f1_high: float
    precision: float
    precision_low: float
    precision_high: float
    recall: float
    recall_low: float
    recall_high: float
    leaver_share: float
    leaver_share_low: float
    leaver_share_high: float
    predicted_leaver_share: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Simulated outcomes are drawn this many rows x draws at a time, to bound memory at any size.
_SIMULATION_CELLS = 2_000_000


def estimate_performance(
    probabilities: np.ndarray, threshold: float, options: ScoringSettings
) -> PerformanceEstimate:
    """Expected F1, precision, recall and share of leavers of a model's predictions, with intervals.

    Sound when the probabilities are calibrated (training calibrates a model that is not).
    """
    probabilities = np.asarray(probabilities, dtype="float64")
    rows = len(probabilities)
    if rows == 0:
        raise DataError("cannot estimate performance on an empty dataset")
    chosen = probabilities >= threshold
    flagged, others = probabilities[chosen], probabilities[~chosen]
    tp, fp, fn = flagged.sum(), (1.0 - flagged).sum(), others.sum()

    rng = np.random.default_rng(options.random_state)
    draws = options.estimate_draws
    hits_flagged = np.empty(draws)
    hits_others = np.empty(draws)
    chunk = max(1, _SIMULATION_CELLS // max(rows, 1))
    for start in range(0, draws, chunk):
        size = min(chunk, draws - start)
        hits_flagged[start:start + size] = (rng.random((size, len(flagged))) < flagged).sum(axis=1)
        hits_others[start:start + size] = (rng.random((size, len(others))) < others).sum(axis=1)
    drawn_f1 = f1_from_counts(hits_flagged, len(flagged) - hits_flagged, hits_others)
    drawn_precision = hits_flagged / len(flagged) if len(flagged) else np.zeros(draws)
    leavers = hits_flagged + hits_others
    drawn_recall = np.divide(hits_flagged, leavers, out=np.zeros(draws), where=leavers > 0)
    tail = (1 - options.confidence) / 2 * 100

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(values, [tail, 100 - tail])
        return float(low), float(high)

    f1_low, f1_high = interval(drawn_f1)
    precision_low, precision_high = interval(drawn_precision)
    recall_low, recall_high = interval(drawn_recall)
    share_low, share_high = interval(leavers / rows)
    return PerformanceEstimate(
        rows=rows,
        f1=float(f1_from_counts(np.array(tp), np.array(fp), np.array(fn))),
        f1_low=f1_low,
        f1_high=f1_high,
        precision=float(tp / len(flagged)) if len(flagged) else 0.0,
        precision_low=precision_low,
        precision_high=precision_high,
        recall=float(tp / (tp + fn)) if tp + fn else 0.0,
        recall_low=recall_low,
        recall_high=recall_high,
        leaver_share=float(probabilities.mean()),
        leaver_share_low=share_low,
        leaver_share_high=share_high,
        predicted_leaver_share=float(chosen.mean()),
    )


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


@dataclass(frozen=True)
class Evaluation:
    """A model's predictions on labelled rows and the metrics they give."""

    metrics: Metrics
    truth: np.ndarray
    probabilities: np.ndarray
    predictions: np.ndarray


def evaluate(model: Any, frame: pd.DataFrame, settings: Settings) -> Evaluation:
    """Measure `model` on a labelled, validated frame, through the same path as every prediction."""
    prediction = predict_frame(model, "", frame, settings.schema)
    truth = frame[settings.schema.target].to_numpy(dtype=int)
    probabilities = np.asarray(prediction.probabilities)
    predictions = np.asarray(prediction.predictions)
    return Evaluation(
        metrics=compute_metrics(truth, probabilities, predictions, settings.scoring),
        truth=truth,
        probabilities=probabilities,
        predictions=predictions,
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
    *,
    model: Any = None,
) -> ScoreReport:
    """Score a model (default: the one just trained) on the test data (or `data_path`).

    latestscore.txt is written only for the trained model on the test data, so that scoring some
    other model or dataset by hand never changes what deployment will ship. `model` is the object
    saved at `model_path` when the caller already holds it (the cycle's fresh candidate), which
    spares loading it again; otherwise its model.json is scored, when training wrote one.
    """
    started = time.perf_counter()
    writes_score = model_path is None and data_path is None
    model_path = Path(model_path) if model_path else settings.model_path
    metadata = model_metadata(model_path)
    if model is None:
        model = load_trained_model(model_path, metadata)
    if data_path is None:
        frame = read_test_data(settings)
        data_label = ", ".join(str(p) for p in settings.test_data_files())
    else:
        frame = read_dataset(Path(data_path), settings.schema)
        data_label = str(data_path)
    evaluation = evaluate(model, frame, settings)
    metrics = evaluation.metrics
    score_path = None
    if writes_score:
        score_path = settings.score_path
        write_score_file(score_path, metrics.f1)
    record_score(settings, metrics, purpose, metadata, model_path, data_label)
    measured = calibration(
        evaluation.truth, evaluation.probabilities, settings.scoring.calibration_bins
    )
    records.add(
        settings.records_path,
        "calibrations",
        {
            "time": records.utc_now(),
            "purpose": purpose,
            "model_version": metadata.get("version"),
            "data_path": data_label,
            "rows": measured.rows,
            "brier": measured.brier,
            "ece": measured.ece,
            "curve": measured.curve,
        },
    )
    records.add_stage_run(settings.records_path, "scoring", time.perf_counter() - started, len(frame))
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


def write_score_file(path: Path, f1: float) -> None:
    """Write F1 as latestscore.txt holds it: the number alone, as the original course reads it."""
    atomicio.write_text(path, f"{f1}\n")


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
    with pipeline_lock(settings, "scoring"):  # latestscore.txt is what a cycle's deployment copies
        report = score(settings, model_path=args.model, data_path=args.data)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
