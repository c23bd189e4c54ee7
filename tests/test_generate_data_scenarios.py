"""What the generator stages for the pipeline beyond single batches: a process that changes at a
known point, a shift of the features alone, and rosters of current clients with their outcomes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from generate_data import (
    COLUMNS,
    FEATURES,
    NORMAL,
    OUTGROWN,
    TARGET,
    UPMARKET,
    client_ids,
    make_clients,
    make_outcomes,
    make_process_change,
    make_roster,
)


def fitted_model(frame: pd.DataFrame) -> Pipeline:
    """Logistic regression on the standardised log1p of the counts, as the pipeline trains it."""
    model = make_pipeline(FunctionTransformer(np.log1p), StandardScaler(), LogisticRegression())
    return model.fit(frame[list(FEATURES)], frame[TARGET])


def risk(model: Pipeline, frame: pd.DataFrame) -> np.ndarray:
    return model.predict_proba(frame[list(FEATURES)])[:, 1]


def auc_of(model: Pipeline, frame: pd.DataFrame) -> float:
    """How well the model ranks the clients of `frame`: 0.5 is chance, less is worse than chance."""
    return roc_auc_score(frame[TARGET], risk(model, frame))


# --- a process that changes ----------------------------------------------------------------------


def test_same_seed_gives_identical_batches():
    first = make_process_change(200, 3, change_at=1, seed=4, id_offset=10)
    second = make_process_change(200, 3, change_at=1, seed=4, id_offset=10)
    for first_batch, second_batch in zip(first, second, strict=True):
        pd.testing.assert_frame_equal(first_batch, second_batch)


def test_batches_have_their_own_clients():
    batches = make_process_change(200, 4, change_at=2, seed=4, id_offset=1_000)
    assert [len(batch) for batch in batches] == [200] * 4
    assert [tuple(batch.columns) for batch in batches] == [COLUMNS] * 4
    all_ids = pd.concat([batch["corporation"] for batch in batches])
    assert all_ids.tolist() == client_ids(800, 1_000).tolist()


def test_the_change_alters_who_leaves_from_the_change_point_on_and_nothing_else():
    unchanged = make_process_change(500, 4, change_at=4, seed=8)
    changed = make_process_change(500, 4, change_at=2, seed=8)
    for before in (0, 1):
        pd.testing.assert_frame_equal(changed[before], unchanged[before])
    for after in (2, 3):
        pd.testing.assert_frame_equal(
            changed[after].drop(columns=TARGET), unchanged[after].drop(columns=TARGET)
        )
        assert not changed[after][TARGET].equals(unchanged[after][TARGET])


@pytest.mark.parametrize("change_at", [-1, 4])
def test_change_point_outside_the_batches_is_refused(change_at):
    with pytest.raises(ValueError, match="outside"):
        make_process_change(100, 3, change_at=change_at)


@pytest.fixture(scope="module")
def process_change() -> list[pd.DataFrame]:
    """One batch of the normal process, then two of the changed one: to train on, and fresh."""
    return make_process_change(3_000, 3, change_at=1, seed=31, id_offset=50_000)


def test_model_of_the_normal_process_ranks_changed_clients_worse_than_chance(process_change):
    normal_batch, _, fresh_changed = process_change
    assert 0.3 < auc_of(fitted_model(normal_batch), fresh_changed) < 0.47


def test_model_of_the_changed_process_ranks_its_clients_well(process_change):
    _, changed_batch, fresh_changed = process_change
    assert auc_of(fitted_model(changed_batch), fresh_changed) > 0.75


def test_leaver_share_after_the_change_stays_between_15_and_30_percent(process_change):
    assert 0.15 <= process_change[2][TARGET].mean() <= 0.30


# --- a shift of the features alone ---------------------------------------------------------------


@pytest.fixture(scope="module")
def usual_and_shifted() -> tuple[pd.DataFrame, pd.DataFrame]:
    usual = make_clients(3_000, seed=41, id_offset=60_000)
    shifted = make_clients(3_000, seed=42, shift=UPMARKET, id_offset=70_000)
    return usual, shifted


@pytest.mark.parametrize(
    "measure, direction",
    [
        ("log employees", +1),
        ("activity per employee", +1),
        ("last month against the yearly pace", -1),
    ],
)
def test_shifted_clients_differ_clearly_in_the_shifted_direction(
    usual_and_shifted, measure, direction
):
    def measured(frame: pd.DataFrame) -> pd.Series:
        employees = frame["number_of_employees"]
        yearly = frame["lastyear_activity"] + 1
        return {
            "log employees": np.log(employees),
            "activity per employee": yearly / employees,
            "last month against the yearly pace": (frame["lastmonth_activity"] + 1) * 12 / yearly,
        }[measure]

    usual, shifted = (measured(frame) for frame in usual_and_shifted)
    assert ks_2samp(usual, shifted).pvalue < 0.001
    assert np.sign(shifted.median() - usual.median()) == direction


def test_model_of_usual_clients_ranks_shifted_clients_about_as_well_as_a_model_of_them(
    usual_and_shifted,
):
    usual, shifted = usual_and_shifted
    fresh_shifted = make_clients(3_000, seed=43, shift=UPMARKET, id_offset=80_000)
    usual_auc = auc_of(fitted_model(usual), fresh_shifted)
    shifted_auc = auc_of(fitted_model(shifted), fresh_shifted)
    assert usual_auc > 0.8
    assert abs(usual_auc - shifted_auc) < 0.05


# --- rosters of current clients ------------------------------------------------------------------


@pytest.fixture(scope="module")
def earlier_batch() -> pd.DataFrame:
    return make_clients(3_000, seed=51, id_offset=90_000)


@pytest.fixture(scope="module")
def roster(earlier_batch):
    return make_roster(earlier_batch, seed=52, months_later=3, new_clients=300, id_offset=100_000)


def test_roster_lists_the_clients_who_stayed_then_the_new_ones(earlier_batch, roster):
    stayers = earlier_batch.loc[earlier_batch[TARGET] == 0, "corporation"]
    expected = [*stayers, *client_ids(300, 100_000)]
    assert roster.frame["corporation"].tolist() == expected
    assert not set(roster.frame["corporation"]) & set(
        earlier_batch.loc[earlier_batch[TARGET] == 1, "corporation"]
    )


def test_roster_has_the_schema_columns_without_the_target(roster):
    assert tuple(roster.frame.columns) == COLUMNS[:-1]
    assert TARGET not in roster.frame.columns
    for column in FEATURES:
        assert roster.frame[column].dtype == np.int64
        assert (roster.frame[column] >= 0).all()
    assert len(roster.log_trend) == len(roster.frame)


def test_same_seed_gives_identical_roster(earlier_batch, roster):
    again = make_roster(earlier_batch, seed=52, months_later=3, new_clients=300, id_offset=100_000)
    pd.testing.assert_frame_equal(again.frame, roster.frame)
    np.testing.assert_array_equal(again.log_trend, roster.log_trend)


def test_different_seeds_give_different_rosters(earlier_batch, roster):
    other = make_roster(earlier_batch, seed=53, months_later=3, new_clients=300, id_offset=100_000)
    assert not other.frame[list(FEATURES)].equals(roster.frame[list(FEATURES)])


def test_clients_who_stayed_keep_roughly_their_size_and_yearly_activity(earlier_batch, roster):
    before = earlier_batch.set_index("corporation")
    after = roster.frame.set_index("corporation").loc[before.index[before[TARGET] == 0]]
    before = before.loc[after.index]

    def log_change(column: str) -> pd.Series:
        return np.log1p(after[column]) - np.log1p(before[column])

    assert 0 < log_change("number_of_employees").abs().median() < 0.1
    assert 0 < log_change("lastyear_activity").abs().median() < 0.2
    # The month is a new draw around the new pace, so it moves much more than the year.
    assert log_change("lastmonth_activity").abs().median() > 0.2


def test_months_later_wanders_further_from_the_earlier_batch(earlier_batch):
    def yearly_change(months_later: int) -> float:
        roster = make_roster(earlier_batch, seed=54, months_later=months_later)
        stayers = earlier_batch.loc[earlier_batch[TARGET] == 0]
        return float(np.median(np.abs(
            np.log1p(roster.frame["lastyear_activity"].to_numpy())
            - np.log1p(stayers["lastyear_activity"].to_numpy())
        )))

    assert yearly_change(1) < yearly_change(6) < yearly_change(24)


def test_roster_of_an_unlabelled_batch_is_refused(roster):
    with pytest.raises(ValueError, match="labelled batch"):
        make_roster(roster.frame, seed=1)


def test_new_clients_with_ids_of_the_earlier_batch_are_refused(earlier_batch):
    with pytest.raises(ValueError, match="share ids"):
        make_roster(earlier_batch, seed=1, new_clients=10, id_offset=90_000)


# --- outcomes of a roster ------------------------------------------------------------------------


def test_outcomes_are_the_roster_rows_in_order_with_the_target(roster):
    outcomes = make_outcomes(roster, seed=61)
    assert tuple(outcomes.columns) == COLUMNS
    pd.testing.assert_frame_equal(outcomes.drop(columns=TARGET), roster.frame)
    assert set(outcomes[TARGET].unique()) == {0, 1}


def test_same_seed_gives_identical_outcomes(roster):
    pd.testing.assert_frame_equal(make_outcomes(roster, seed=61), make_outcomes(roster, seed=61))


@pytest.mark.parametrize("relation", [NORMAL, OUTGROWN], ids=["normal", "outgrown"])
def test_leaver_share_of_outcomes_matches_the_true_probabilities(roster, relation):
    outcomes = make_outcomes(roster, seed=62, relation=relation)
    # Three standard errors of a share over about 2,500 rows.
    assert abs(outcomes[TARGET].mean() - roster.leaving_probability(relation).mean()) < 0.03


def test_model_of_the_normal_process_is_calibrated_on_the_outcomes(roster):
    model = fitted_model(make_clients(3_000, seed=63, id_offset=110_000))
    outcomes = make_outcomes(roster, seed=64)
    predicted = risk(model, roster.frame)
    # Within each fifth of the roster, from safest to riskiest, as many leave as the model expects.
    fifths = pd.qcut(predicted, 5, labels=False)
    for fifth in range(5):
        in_fifth = fifths == fifth
        observed = outcomes[TARGET].to_numpy()[in_fifth].mean()
        assert abs(observed - predicted[in_fifth].mean()) < 0.06, fifth
