"""Synthetic client data for the attrition model: shipped data sets, benchmarks, test fixtures.

Each client is a company with a heavy-tailed number of employees, a yearly activity proportional to
its size, and last month's activity drawn around the yearly pace times a per-client trend. Whether
the client left follows a logistic model of that trend and of the company's size, with enough latent
noise that no model is perfect. A drifted batch changes that relation, so that a model trained on
the normal process visibly loses F1: this is what the drift checks of the pipeline must notice.
A process change goes further (OUTGROWN): a normal model ranks its clients worse than chance. A
covariate shift (FeatureShift) moves the features' distributions but keeps the relation.

A roster is the list of current clients at a moment, without the target: the clients of an earlier
batch who stayed, months later, and new ones. make_outcomes later reveals who of them left, drawn
from the latent trends that made the roster, so that a model's probabilities can be checked.

Client ids are a fixed scramble of the client's number (i + id_offset) into six lowercase letters,
so they depend only on the offset: batches made with non-overlapping ranges never share a client.

    python generate_data.py                         # (re)write the shipped data beside this script
    python generate_data.py --rows 100000 --out bench/clients.csv [--seed S] [--id-offset K]
                            [--drifted | --dirty | --shift]
    python generate_data.py --process-change batches/ --rows 2000 --batches 6 --change-at 3
    python generate_data.py --roster-of clients.csv --out roster.csv [--outcomes later.csv]
                            [--months-later M] [--new-clients N --id-offset K]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import atomicio
from errors import DataError, run_cli

log = logging.getLogger(__name__)

COLUMNS = (
    "corporation", "lastmonth_activity", "lastyear_activity", "number_of_employees", "exited"
)
FEATURES = COLUMNS[1:4]
TARGET = COLUMNS[4]

ID_LETTERS = 6
ID_SPACE = 26**ID_LETTERS
# An affine map i -> (a*i + b) mod 26**6 is a bijection when a shares no factor with 26, so distinct
# client numbers always get distinct ids while neighbouring numbers do not look alike.
_ID_MULTIPLIER = 48_271_193
_ID_SHIFT = 97_533_117

# Company size: log(employees) ~ Normal(mean, sd): median ~30 staff, a tail into tens of thousands.
_LOG_SIZE_MEAN = 3.4
_LOG_SIZE_SD = 1.7
_MAX_EMPLOYEES = 60_000
# Yearly activity per employee, and the spread of each client's trend (log of this month's pace
# against the yearly one).
_LOG_RATE_MEAN = np.log(60.0)
_LOG_RATE_SD = 0.6
_TREND_SD = 0.5
# Gamma shape of the month's extra-Poisson noise: last month is negative-binomial around its mean.
_MONTH_DISPERSION = 30.0


@dataclass(frozen=True)
class AttritionRelation:
    """How the latent logit of leaving depends on a client's trend and (log) size."""

    intercept: float
    trend: float  # per unit of log trend; negative: a falling month raises the risk
    size: float  # per unit of log employees above the typical company
    steadiness: float  # per unit of |log trend|; negative: steady clients are the ones who leave


NORMAL = AttritionRelation(intercept=-3.0, trend=-8.0, size=-0.35, steadiness=0.0)
# After the drift the trend counts for a quarter of what it did, and large companies with steady
# activity leave: a model of the normal relation ranks the wrong clients first.
DRIFTED = AttritionRelation(intercept=-1.5, trend=-2.0, size=0.7, steadiness=-1.0)
# A process that has changed. DRIFTED is not enough for this: a normal model still ranks its
# clients better than chance (ROC AUC about 0.6), since a falling month still raises the risk there.
# Here size decides and the trend points the other way: large, growing clients outgrow the offer
# and leave. A normal model ranks these clients worse than chance (ROC AUC about 0.4), while a
# model of the changed process itself reaches about 0.8.
OUTGROWN = AttritionRelation(intercept=-1.5, trend=0.4, size=0.8, steadiness=0.0)

# Shipped files: (folder, name, rows, seed, id offset). The offsets start far above the ranges that
# benchmarks use with the default offset 0, and each file has its own range.
_SHIPPED_ID_BASE = 200_000_000
SHIPPED_FILES = (
    ("practicedata", "dataset1.csv", 150, 2, _SHIPPED_ID_BASE),
    ("practicedata", "dataset2.csv", 150, 3, _SHIPPED_ID_BASE + 1_000),
    ("sourcedata", "dataset3.csv", 5_000, 4, _SHIPPED_ID_BASE + 10_000),
    ("sourcedata", "dataset4.csv", 5_000, 5, _SHIPPED_ID_BASE + 20_000),
    ("testdata", "testdata.csv", 2_000, 6, _SHIPPED_ID_BASE + 30_000),
)
# Where the roster of current clients ships (folder, name): the clients the risk list ranks.
SHIPPED_ROSTER = ("sourcedata", "roster.csv")


def client_ids(n_rows: int, id_offset: int = 0) -> np.ndarray:
    """Six-letter ids of clients number id_offset .. id_offset + n_rows - 1, one per client."""
    if n_rows < 0 or id_offset < 0 or id_offset + n_rows > ID_SPACE:
        raise ValueError(
            f"client numbers {id_offset}..{id_offset + n_rows - 1} are outside 0..{ID_SPACE - 1}"
        )
    numbers = np.arange(id_offset, id_offset + n_rows, dtype=np.int64)
    codes = (numbers * _ID_MULTIPLIER + _ID_SHIFT) % ID_SPACE
    powers = 26 ** np.arange(ID_LETTERS - 1, -1, -1, dtype=np.int64)
    letters = (codes[:, None] // powers % 26 + ord("a")).astype(np.uint8)
    return np.ascontiguousarray(letters).view(f"S{ID_LETTERS}").ravel().astype(str)


@dataclass(frozen=True)
class FeatureShift:
    """How a batch's features are drawn differently from the usual clients (covariate shift).

    Each field moves the mean of one latent distribution; who leaves still depends on the features
    by the same relation, so a model of that relation keeps ranking clients well.
    """

    log_size: float = 0.0  # added to the mean of log employees
    log_rate: float = 0.0  # added to the mean of log yearly activity per employee
    trend: float = 0.0  # the mean of the log trend: negative, activity falling on average


NO_SHIFT = FeatureShift()
# The company wins larger, busier clients, whose activity is falling on average.
UPMARKET = FeatureShift(log_size=1.0, log_rate=0.3, trend=-0.1)


def make_clients(
    n_rows: int,
    seed: int = 0,
    *,
    drifted: bool = False,
    relation: AttritionRelation | None = None,
    shift: FeatureShift = NO_SHIFT,
    id_offset: int = 0,
) -> pd.DataFrame:
    """One row per client: ids, activity counts, size and whether the client left.

    Deterministic: the same arguments give an identical frame. Who leaves follows `relation`
    (default NORMAL); `drifted` is short for relation=DRIFTED. `shift` draws the features from
    moved distributions while the relation stays as it is.
    """
    if drifted and relation is not None:
        raise ValueError("give either drifted=True or a relation, not both")
    if relation is None:
        relation = DRIFTED if drifted else NORMAL
    rng = np.random.default_rng(seed)
    clients, log_trend = _draw_features(rng, n_rows, shift)
    clients.insert(0, "corporation", client_ids(n_rows, id_offset))
    employees = clients["number_of_employees"].to_numpy()
    clients[TARGET] = _draw_exits(rng, relation, log_trend, employees)
    return clients


def leaving_probability(
    relation: AttritionRelation, log_trend: np.ndarray, employees: np.ndarray
) -> np.ndarray:
    """The true probability that each client leaves, given its latent trend and its size."""
    return 1.0 / (1.0 + np.exp(-_leaving_logit(relation, log_trend, employees)))


def _draw_features(
    rng: np.random.Generator, n_rows: int, shift: FeatureShift
) -> tuple[pd.DataFrame, np.ndarray]:
    """The three feature columns of n_rows new clients, and the latent log trend of each."""
    log_size = rng.normal(_LOG_SIZE_MEAN + shift.log_size, _LOG_SIZE_SD, n_rows)
    employees = _employees(np.exp(log_size))
    yearly_rate = np.exp(rng.normal(_LOG_RATE_MEAN + shift.log_rate, _LOG_RATE_SD, n_rows))
    lastyear = rng.poisson(employees * yearly_rate)
    log_trend = rng.normal(shift.trend, _TREND_SD, n_rows)
    features = _activity_frame(rng, lastyear, log_trend, employees)
    return features, log_trend


def _employees(size: np.ndarray) -> np.ndarray:
    """Company sizes as whole numbers of staff within the plausible range."""
    return np.clip(np.rint(size), 1, _MAX_EMPLOYEES).astype(np.int64)


def _activity_frame(
    rng: np.random.Generator, lastyear: np.ndarray, log_trend: np.ndarray, employees: np.ndarray
) -> pd.DataFrame:
    """The feature columns, with last month drawn around the yearly pace times the trend."""
    month_mean = lastyear / 12.0 * np.exp(log_trend)
    month_noise = rng.gamma(_MONTH_DISPERSION, 1.0 / _MONTH_DISPERSION, len(lastyear))
    lastmonth = rng.poisson(month_mean * month_noise)
    return pd.DataFrame({
        "lastmonth_activity": lastmonth.astype(np.int64),
        "lastyear_activity": lastyear.astype(np.int64),
        "number_of_employees": employees,
    })


def _leaving_logit(
    relation: AttritionRelation, log_trend: np.ndarray, employees: np.ndarray
) -> np.ndarray:
    return (
        relation.intercept
        + relation.trend * log_trend
        + relation.size * (np.log(employees) - _LOG_SIZE_MEAN)
        + relation.steadiness * np.abs(log_trend)
    )


def _draw_exits(
    rng: np.random.Generator,
    relation: AttritionRelation,
    log_trend: np.ndarray,
    employees: np.ndarray,
) -> np.ndarray:
    """Whether each client left: 1 with the relation's probability, else 0."""
    logit = _leaving_logit(relation, log_trend, employees)
    # Leaving when the latent logit plus logistic noise is positive is a Bernoulli draw with
    # probability sigmoid(logit): the noise is what keeps any model from being perfect.
    return (logit + rng.logistic(0.0, 1.0, len(logit)) > 0).astype(np.int64)


def make_process_change(
    batch_rows: int,
    batches: int,
    change_at: int,
    seed: int = 0,
    *,
    id_offset: int = 0,
    changed: AttritionRelation = OUTGROWN,
) -> list[pd.DataFrame]:
    """Labelled batches of a process that changes at a known point, in the order they arrive.

    Batches before index `change_at` follow NORMAL, the rest follow `changed`. Batch i holds the
    clients numbered from id_offset + i * batch_rows, so no client is in two batches, and each batch
    has its own random stream derived from `seed`.
    """
    if not 0 <= change_at <= batches:
        raise ValueError(f"the change at batch {change_at} is outside batches 0..{batches}")
    batch_seeds = np.random.SeedSequence(seed).generate_state(batches)
    return [
        make_clients(
            batch_rows,
            int(batch_seed),
            relation=NORMAL if index < change_at else changed,
            id_offset=id_offset + index * batch_rows,
        )
        for index, batch_seed in enumerate(batch_seeds)
    ]


@dataclass(frozen=True, eq=False)
class Roster:
    """The company's current clients at one moment, and what only the generator knows of them.

    `frame` is what the company sees, the file to write: the schema's columns without the target,
    since nobody knows yet who will leave. `log_trend` is each row's latent trend, which drew its
    last month and will decide its outcome; make_outcomes needs it.
    """

    frame: pd.DataFrame
    log_trend: np.ndarray

    def leaving_probability(self, relation: AttritionRelation = NORMAL) -> np.ndarray:
        """The true probability that each client on the roster leaves, row by row."""
        employees = self.frame["number_of_employees"].to_numpy()
        return leaving_probability(relation, self.log_trend, employees)


# How far, in a year, a client's staff and its activity per employee wander (sd of their logs).
_SIZE_DRIFT_PER_YEAR = 0.1
_RATE_DRIFT_PER_YEAR = 0.15
# Random streams of make_roster and make_outcomes, so that one seed given to both never reuses the
# random numbers that drew the roster to decide its outcomes.
_STAYERS_STREAM, _NEW_CLIENTS_STREAM, _OUTCOMES_STREAM = 0, 1, 2


def make_roster(
    earlier_batch: pd.DataFrame,
    seed: int = 0,
    *,
    months_later: int = 3,
    new_clients: int = 0,
    id_offset: int = 0,
) -> Roster:
    """The current clients `months_later` months after a labelled batch: its stayers, and new ones.

    A client who had not left keeps its id; its staff and its activity per employee drift a little;
    the months since the batch replace as many months of its yearly activity; its trend is a new
    draw, since a month's trend does not last, and last month is drawn around the new pace.
    `new_clients` fresh clients, numbered from `id_offset`, join at the end. Deterministic by seed.
    """
    if TARGET not in earlier_batch.columns:
        raise ValueError(f"a roster is made from a labelled batch, with a {TARGET!r} column")
    if months_later < 1:
        raise ValueError(f"months_later must be at least 1, not {months_later}")
    new_ids = client_ids(new_clients, id_offset)
    if np.isin(new_ids, earlier_batch["corporation"].to_numpy(dtype=str)).any():
        raise ValueError(f"new clients numbered from {id_offset} share ids with the earlier batch")

    stayers = earlier_batch.loc[earlier_batch[TARGET] == 0]
    rng = np.random.default_rng([seed, _STAYERS_STREAM])
    evolved, stayer_trend = _evolve(rng, stayers, months_later)
    evolved.insert(0, "corporation", stayers["corporation"].to_numpy())
    new_rng = np.random.default_rng([seed, _NEW_CLIENTS_STREAM])
    joined, joined_trend = _draw_features(new_rng, new_clients, NO_SHIFT)
    joined.insert(0, "corporation", new_ids)
    return Roster(
        frame=pd.concat([evolved, joined], ignore_index=True),
        log_trend=np.concatenate([stayer_trend, joined_trend]),
    )


def _evolve(
    rng: np.random.Generator, stayers: pd.DataFrame, months_later: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """The feature columns of clients months later, and each one's new latent log trend."""
    n_rows = len(stayers)
    years = months_later / 12.0
    old_employees = stayers["number_of_employees"].to_numpy()
    old_lastyear = stayers["lastyear_activity"].to_numpy()
    employees = _employees(
        old_employees * np.exp(rng.normal(0.0, _SIZE_DRIFT_PER_YEAR * np.sqrt(years), n_rows))
    )
    # Half a count, so that a client idle all year is not pinned at zero activity for ever.
    old_rate = (old_lastyear + 0.5) / old_employees
    rate = old_rate * np.exp(rng.normal(0.0, _RATE_DRIFT_PER_YEAR * np.sqrt(years), n_rows))
    # The months since the batch take the place of as many of the earlier year's.
    months_new = min(months_later, 12)
    kept_activity = rng.binomial(old_lastyear, (12 - months_new) / 12.0)
    lastyear = kept_activity + rng.poisson(employees * rate * months_new / 12.0)
    log_trend = rng.normal(0.0, _TREND_SD, n_rows)
    return _activity_frame(rng, lastyear, log_trend, employees), log_trend


def make_outcomes(
    roster: Roster, seed: int = 0, *, relation: AttritionRelation = NORMAL
) -> pd.DataFrame:
    """The roster's rows, in its order, with whether each client left, drawn from `relation`.

    Each client leaves with the probability roster.leaving_probability(relation) gives, from the
    latent trend that drew its activity: a model of that process is calibrated on these outcomes.
    """
    rng = np.random.default_rng([seed, _OUTCOMES_STREAM])
    outcomes = roster.frame.copy()
    employees = outcomes["number_of_employees"].to_numpy()
    outcomes[TARGET] = _draw_exits(rng, relation, roster.log_trend, employees)
    return outcomes


@dataclass(frozen=True)
class DirtyExpectations:
    """What make_dirty put into a batch, so a test can check that ingestion accounted for every row.

    Every dirty row has exactly one defect. Rows to quarantine are the five kinds of bad cell
    below; rows with one empty feature cell and rows whose target is written as a word are valid.
    """

    rows: int  # rows in the batch, duplicates included
    duplicates: int  # extra exact copies of clean rows, each of a different row
    non_numeric_counts: int  # a feature holds a word such as "abc"
    negative_counts: int  # a feature holds a negative number
    non_whole_counts: int  # a feature holds a number with a fraction, such as "12.5"
    invalid_targets: int  # the target is text that is not a label, such as "maybe"
    missing_targets: int  # the target cell is empty
    missing_feature_rows: int  # valid rows with exactly one empty feature cell
    word_targets: int  # valid rows whose target is "yes", "no", "true" or "false"

    @property
    def quarantined(self) -> int:
        """Rows an ingestion must set aside with a reason."""
        return (
            self.non_numeric_counts
            + self.negative_counts
            + self.non_whole_counts
            + self.invalid_targets
            + self.missing_targets
        )

    @property
    def accepted(self) -> int:
        """Rows an ingestion keeps: neither a duplicate nor quarantined."""
        return self.rows - self.duplicates - self.quarantined


# The share of a dirty batch given to each defect; every kind gets at least one row.
_DIRTY_SHARES = {
    "duplicates": 0.03,
    "non_numeric_counts": 0.01,
    "negative_counts": 0.01,
    "non_whole_counts": 0.01,
    "invalid_targets": 0.01,
    "missing_targets": 0.01,
    "missing_feature_rows": 0.04,
    "word_targets": 0.05,
}
# Junk words avoid all that an ingestion may read as a missing marker ("n/a", "NA", "-", "null")
# or as a number ("inf", "1e3"), so that each one is unambiguously "not a number".
_JUNK_WORDS = ["abc", "unknown", "twelve", "#VALUE!", "?"]
_NOT_LABELS = ["maybe", "unknown", "left?"]
_WORD_LABELS = {"1": ["yes", "true"], "0": ["no", "false"]}


def dirty_expectations(n_rows: int, seed: int = 0, *, id_offset: int = 0) -> DirtyExpectations:
    """The exact counts make_dirty(n_rows, seed, id_offset=...) injects.

    They depend only on n_rows; seed and id_offset are accepted so a call can mirror make_dirty's.
    """
    del seed, id_offset
    counts = {kind: max(1, round(share * n_rows)) for kind, share in _DIRTY_SHARES.items()}
    clean_rows = n_rows - sum(counts.values())
    if clean_rows < counts["duplicates"]:
        raise ValueError(
            f"a dirty batch needs more rows than {n_rows} to hold one of each defect"
        )
    return DirtyExpectations(rows=n_rows, **counts)


def make_dirty(n_rows: int, seed: int = 0, *, id_offset: int = 0) -> pd.DataFrame:
    """A batch of n_rows clients with injected dirt, every column as text (empty string = missing).

    The batch is make_clients(n_rows - duplicates, seed, id_offset=id_offset) with one defect in
    each dirty row, plus exact copies of clean rows, in shuffled order; dirty_expectations() with
    the same arguments gives the count of each defect.
    """
    expected = dirty_expectations(n_rows)
    n_clients = n_rows - expected.duplicates
    clients = make_clients(n_clients, seed, id_offset=id_offset)
    counts = {column: clients[column].to_numpy() for column in (*FEATURES, TARGET)}
    cells = {column: _as_text(counts[column]) for column in (*FEATURES, TARGET)}
    cells["corporation"] = clients["corporation"].to_numpy(dtype=object)  # ids stay clean
    # A stream of its own, so the dirt does not shift the clients that make_clients draws.
    rng = np.random.default_rng([seed, 1])
    groups, clean_rows = _dirty_row_groups(expected, rng.permutation(n_clients))

    def spoil_one_feature(rows: np.ndarray, spoil: Callable[[np.ndarray], list[str]]) -> None:
        """Replace one randomly chosen feature cell of each row by spoil(its clean counts)."""
        chosen = rng.integers(len(FEATURES), size=len(rows))
        for index, column in enumerate(FEATURES):
            picked = rows[chosen == index]
            cells[column][picked] = spoil(counts[column][picked])

    spoil_one_feature(
        groups["non_numeric_counts"], lambda values: rng.choice(_JUNK_WORDS, len(values)).tolist()
    )
    # value + 1, so that a zero never becomes "-0", which is not negative.
    spoil_one_feature(groups["negative_counts"], lambda values: [f"-{v + 1}" for v in values])
    spoil_one_feature(groups["non_whole_counts"], lambda values: [f"{v}.5" for v in values])
    spoil_one_feature(groups["missing_feature_rows"], lambda values: [""] * len(values))

    target = cells[TARGET]
    invalid = groups["invalid_targets"]
    target[invalid] = rng.choice(_NOT_LABELS, len(invalid)).tolist()
    target[groups["missing_targets"]] = ""
    worded = groups["word_targets"]
    spelling = rng.integers(2, size=len(worded))
    target[worded] = [
        _WORD_LABELS[label][i] for label, i in zip(target[worded], spelling, strict=True)
    ]

    copies = rng.choice(clean_rows, size=expected.duplicates, replace=False)
    rows = np.concatenate([np.arange(n_clients), copies])[rng.permutation(n_rows)]
    return pd.DataFrame({column: pd.array(cells[column][rows], dtype="str") for column in COLUMNS})


def _as_text(values: np.ndarray) -> np.ndarray:
    """Values as an object array of Python strings, ready to take junk of any length."""
    text = np.empty(len(values), dtype=object)
    text[:] = [str(value) for value in values.tolist()]
    return text


def _dirty_row_groups(
    expected: DirtyExpectations, shuffled_rows: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Disjoint sets of rows, one per defect, and the clean rows left over."""
    kinds = [kind for kind in _DIRTY_SHARES if kind != "duplicates"]
    sizes = [getattr(expected, kind) for kind in kinds]
    ends = np.cumsum(sizes)
    groups = {
        kind: shuffled_rows[end - size : end]
        for kind, size, end in zip(kinds, sizes, ends, strict=True)
    }
    return groups, shuffled_rows[ends[-1] :]


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` as CSV without its index, creating folders; readers never see half a file."""
    atomicio.write_with(Path(path), lambda temp_path: frame.to_csv(temp_path, index=False))


def write_shipped_data(root: Path) -> dict[Path, int]:
    """Write the data the project ships under `root`: practice, source and test data, and a roster.

    Every labeled file has its own seed and id range, so no client appears in two of them; the
    roster lists the clients of the last source file who stayed, and new ones. Returns the rows
    written to each file.
    """
    written = {}
    for folder, name, n_rows, seed, id_offset in SHIPPED_FILES:
        path = Path(root) / folder / name
        write_csv(make_clients(n_rows, seed, id_offset=id_offset), path)
        written[path] = n_rows
    written |= write_shipped_roster(root)
    return written


def make_shipped_roster() -> Roster:
    """The current clients three months after the last shipped source file (dataset4.csv).

    Its clients who stayed, and 500 new clients in an id range of their own.
    """
    n_rows, seed, id_offset = next(
        (n_rows, seed, id_offset)
        for _, name, n_rows, seed, id_offset in SHIPPED_FILES
        if name == "dataset4.csv"
    )
    return make_roster(
        make_clients(n_rows, seed, id_offset=id_offset),
        seed=7,
        months_later=3,
        new_clients=500,
        id_offset=_SHIPPED_ID_BASE + 40_000,
    )


def write_shipped_roster(root: Path) -> dict[Path, int]:
    """Write the shipped roster under `root` (SHIPPED_ROSTER); returns the rows written.

    Without it the run command would rank the clients of labeled files only; with it the risk list
    ranks the company's current clients, as it does in production.
    """
    frame = make_shipped_roster().frame
    path = Path(root).joinpath(*SHIPPED_ROSTER)
    write_csv(frame, path)
    return {path: len(frame)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write the shipped client data, or one generated file with --rows and --out, "
        "a sequence of batches with --process-change, or a roster with --roster-of."
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent,
        metavar="PATH",
        help="folder to write the shipped data under (default: beside this script)",
    )
    parser.add_argument("--rows", type=whole_number, metavar="N", help="clients in a file")
    parser.add_argument("--out", type=Path, metavar="FILE", help="the CSV file to write")
    parser.add_argument("--seed", type=whole_number, metavar="S", help="random seed (default 0)")
    parser.add_argument(
        "--id-offset",
        type=whole_number,
        metavar="K",
        help="number of the first (new) client, to keep ids disjoint from other files (default 0)",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--drifted", action="store_true", help="leavers follow the drifted relation")
    kind.add_argument("--dirty", action="store_true", help="inject duplicates and junk cells")
    kind.add_argument(
        "--shift", action="store_true", help="larger, busier clients, falling on average"
    )
    parser.add_argument(
        "--process-change",
        type=Path,
        metavar="FOLDER",
        help="write --batches files of --rows clients; who leaves changes at batch --change-at",
    )
    parser.add_argument("--batches", type=positive_number, metavar="K", help="number of batches")
    parser.add_argument(
        "--change-at", type=whole_number, metavar="J", help="first batch of the changed process"
    )
    parser.add_argument(
        "--roster-of",
        type=Path,
        metavar="FILE",
        help="write to --out the current clients of this labelled CSV, months later",
    )
    parser.add_argument(
        "--months-later", type=positive_number, metavar="M", help="months after FILE (default 3)"
    )
    parser.add_argument(
        "--new-clients", type=whole_number, metavar="N", help="new clients to add (default 0)"
    )
    parser.add_argument(
        "--outcomes", type=Path, metavar="FILE", help="also write who on the roster left, later"
    )
    args = parser.parse_args(argv)
    _check_options(parser, args)
    return args


# Each kind of output: the options it needs, then the ones it also accepts; --root goes with any.
_OUTPUT_OPTIONS = {
    "writing the shipped data": ((), ()),
    "--rows and --out": (("rows", "out"), ("seed", "id_offset", "drifted", "dirty", "shift")),
    "--process-change": (("process_change", "rows", "batches", "change_at"), ("seed", "id_offset")),
    "--roster-of": (
        ("roster_of", "out"),
        ("seed", "id_offset", "months_later", "new_clients", "outcomes"),
    ),
}


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a usage error unless the options given make exactly one kind of output."""
    if args.process_change is not None:
        output = "--process-change"
    elif args.roster_of is not None:
        output = "--roster-of"
    elif args.rows is not None or args.out is not None:
        output = "--rows and --out"
    else:
        output = "writing the shipped data"
    needed, accepted = _OUTPUT_OPTIONS[output]
    given = {
        name for name, value in vars(args).items()
        if name != "root" and value is not None and value is not False
    }
    if missing := [name for name in needed if name not in given]:
        parser.error(f"{output} also needs {_flags(missing)}")
    if unexpected := sorted(given - set(needed) - set(accepted)):
        parser.error(f"{_flags(unexpected)} cannot go with {output}")
    if output == "--process-change" and args.change_at > args.batches:
        parser.error(f"--change-at {args.change_at} is beyond the {args.batches} batches")


def _flags(names: list[str]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


def whole_number(text: str) -> int:
    """A non-negative integer from the command line."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive_number(text: str) -> int:
    """A whole number of at least one from the command line."""
    value = whole_number(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    """Write the shipped data, or the file or files that the options ask for."""
    args = parse_args(argv)
    seed = args.seed or 0
    id_offset = args.id_offset or 0
    if args.process_change is not None:
        written = _write_process_change(args, seed, id_offset)
    elif args.roster_of is not None:
        written = _write_roster_of(args, seed, id_offset)
    elif args.rows is not None:
        written = {args.out: _one_file(args, seed, id_offset)}
    else:
        written = {path: f"{n_rows} rows" for path, n_rows in write_shipped_data(args.root).items()}
    for path, summary in written.items():
        print(f"{path}: {summary}")
    return 0


def _write_process_change(args: argparse.Namespace, seed: int, id_offset: int) -> dict[Path, str]:
    """Write the batches of a process change as batch00.csv, batch01.csv, ... (in arrival order)."""
    frames = make_process_change(args.rows, args.batches, args.change_at, seed, id_offset=id_offset)
    width = max(2, len(str(args.batches - 1)))
    written = {}
    for index, frame in enumerate(frames):
        path = args.process_change / f"batch{index:0{width}d}.csv"
        write_csv(frame, path)
        written[path] = f"{len(frame)} rows ({'normal' if index < args.change_at else 'changed'})"
    return written


def _one_file(args: argparse.Namespace, seed: int, id_offset: int) -> str:
    """Write the one file that --rows and --out ask for; returns what it holds."""
    if args.dirty:
        frame = make_dirty(args.rows, seed, id_offset=id_offset)
        expected = dirty_expectations(args.rows)
        note = (
            f" ({expected.duplicates} duplicates, {expected.quarantined} to quarantine, "
            f"{expected.missing_feature_rows} with a missing cell)"
        )
    else:
        shift = UPMARKET if args.shift else NO_SHIFT
        frame = make_clients(
            args.rows, seed, drifted=args.drifted, shift=shift, id_offset=id_offset
        )
        note = " (drifted)" if args.drifted else " (shifted)" if args.shift else ""
    write_csv(frame, args.out)
    return f"{len(frame)} rows{note}"


def _write_roster_of(args: argparse.Namespace, seed: int, id_offset: int) -> dict[Path, str]:
    """Write the roster of the clients in --roster-of, and with --outcomes who of them left."""
    earlier_batch = _read_labelled(args.roster_of)
    new_ids = client_ids(args.new_clients or 0, id_offset)
    if earlier_batch["corporation"].isin(new_ids).any():
        raise DataError(
            f"new clients numbered from {id_offset} share ids with {args.roster_of}: "
            "choose an --id-offset beyond the clients of that file"
        )
    roster = make_roster(
        earlier_batch,
        seed,
        months_later=args.months_later or 3,
        new_clients=args.new_clients or 0,
        id_offset=id_offset,
    )
    write_csv(roster.frame, args.out)
    written = {args.out: f"{len(roster.frame)} rows (roster)"}
    if args.outcomes is not None:
        write_csv(make_outcomes(roster, seed), args.outcomes)
        written[args.outcomes] = f"{len(roster.frame)} rows (outcomes of {args.out})"
    return written


def _read_labelled(path: Path) -> pd.DataFrame:
    """A clean labelled batch, as --rows and --out write it."""
    try:
        frame = pd.read_csv(path, dtype={"corporation": "str"})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    counts = [*FEATURES, TARGET]
    if (
        tuple(frame.columns) != COLUMNS
        or not all(pd.api.types.is_integer_dtype(frame[column]) for column in counts)
        or (frame[counts] < 0).any().any()
    ):
        raise DataError(
            f"{path} is not a clean labelled batch: it needs the columns {', '.join(COLUMNS)} "
            "with whole, non-negative numbers, as --rows and --out write it"
        )
    return frame


if __name__ == "__main__":
    sys.exit(run_cli(main))
