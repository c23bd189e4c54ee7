"""What the generator stages for the pipeline beyond single batches: a process that changes at a
known point, and a shift of the features alone."""

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
    OUTGROWN,
    TARGET,
    UPMARKET,
    client_ids,
    make_clients,
    make_process_change,
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
