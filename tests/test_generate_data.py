"""The synthetic data generator: deterministic, well-formed, learnable, drifting on request, and
dirty in exactly the ways it says."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

import generate_data
from errors import run_cli
from generate_data import (
    COLUMNS,
    FEATURES,
    SHIPPED_ROSTER,
    TARGET,
    UPMARKET,
    dirty_expectations,
    make_clients,
    make_dirty,
    make_outcomes,
    make_process_change,
    make_roster,
    make_shipped_roster,
    write_csv,
    write_shipped_data,
    write_shipped_roster,
)

WORD_LABELS = {"yes", "no", "true", "false"}


def read_as_text(path) -> pd.DataFrame:
    """A CSV file exactly as written: every cell a string, nothing read as missing."""
    return pd.read_csv(path, dtype="str", keep_default_na=False)


def read_clients(path) -> pd.DataFrame:
    """A clean CSV file of clients: ids as text, counts as numbers."""
    return pd.read_csv(path, dtype={"corporation": "str"})


# --- clean batches -------------------------------------------------------------------------------


@pytest.mark.parametrize("drifted", [False, True])
def test_same_seed_gives_identical_data(drifted):
    first = make_clients(500, seed=7, drifted=drifted, id_offset=3)
    second = make_clients(500, seed=7, drifted=drifted, id_offset=3)
    pd.testing.assert_frame_equal(first, second)


def test_different_seeds_give_different_data():
    first = make_clients(500, seed=1)
    second = make_clients(500, seed=2)
    assert not first[list(FEATURES)].equals(second[list(FEATURES)])


def test_batch_has_the_schema_columns_in_order_and_types():
    frame = make_clients(100, seed=0)
    assert tuple(frame.columns) == COLUMNS
    assert len(frame) == 100
    assert pd.api.types.is_string_dtype(frame["corporation"])
    for column in (*FEATURES, TARGET):
        assert frame[column].dtype == np.int64


@pytest.mark.parametrize("drifted", [False, True])
def test_counts_are_non_negative_whole_numbers(drifted):
    frame = make_clients(3_000, seed=4, drifted=drifted)
    assert (frame[list(FEATURES)] >= 0).all().all()
    assert (frame["number_of_employees"] >= 1).all()
    assert set(frame[TARGET].unique()) == {0, 1}


def test_company_sizes_are_heavy_tailed():
    employees = make_clients(5_000, seed=5)["number_of_employees"]
    assert employees.median() < 100
    assert employees.max() > 5_000


def test_ids_are_unique_six_letter_words():
    ids = make_clients(5_000, seed=0)["corporation"]
    assert ids.is_unique
    assert ids.str.fullmatch(r"[a-z]{6}").all()


def test_batches_with_disjoint_id_ranges_share_no_client():
    first = make_clients(1_000, seed=1, id_offset=0)
    second = make_clients(1_000, seed=1, id_offset=1_000)
    assert not set(first["corporation"]) & set(second["corporation"])


def test_client_id_depends_only_on_client_number():
    within_larger_batch = make_clients(30, seed=1)["corporation"].iloc[10:20]
    offset_batch = make_clients(10, seed=2, id_offset=10)["corporation"]
    assert within_larger_batch.tolist() == offset_batch.tolist()


@pytest.mark.parametrize("drifted", [False, True])
def test_leaver_share_is_between_15_and_30_percent(drifted):
    share = make_clients(4_000, seed=6, drifted=drifted)[TARGET].mean()
    assert 0.15 <= share <= 0.30


def test_clean_csv_writes_counts_as_plain_integers(tmp_path):
    path = tmp_path / "nested" / "clients.csv"
    write_csv(make_clients(200, seed=0), path)
    text = read_as_text(path)
    assert tuple(text.columns) == COLUMNS
    for column in (*FEATURES, TARGET):
        assert text[column].str.fullmatch(r"\d+").all()


# --- learnability and drift ----------------------------------------------------------------------


def features_of(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[list(FEATURES)]


@pytest.fixture(scope="module")
def normal_model() -> Pipeline:
    """Logistic regression on log1p features, fitted to 3,000 clients of the normal process."""
    training = make_clients(3_000, seed=11, id_offset=0)
    model = make_pipeline(FunctionTransformer(np.log1p), StandardScaler(), LogisticRegression())
    return model.fit(features_of(training), training[TARGET])


def f1_on(model: Pipeline, frame: pd.DataFrame) -> float:
    return f1_score(frame[TARGET], model.predict(features_of(frame)))


def test_model_of_normal_data_reaches_f1_above_half_on_a_fresh_batch(normal_model):
    fresh = make_clients(2_000, seed=12, id_offset=10_000)
    assert f1_on(normal_model, fresh) > 0.5


def test_fresh_normal_batches_score_alike(normal_model):
    first = make_clients(2_000, seed=13, id_offset=20_000)
    second = make_clients(2_000, seed=14, id_offset=30_000)
    assert abs(f1_on(normal_model, first) - f1_on(normal_model, second)) < 0.1


def test_drifted_batch_lowers_f1_by_at_least_0_15(normal_model):
    fresh = make_clients(2_000, seed=12, id_offset=10_000)
    drifted = make_clients(2_000, seed=15, drifted=True, id_offset=40_000)
    assert f1_on(normal_model, fresh) - f1_on(normal_model, drifted) >= 0.15


# --- dirty batches -------------------------------------------------------------------------------


def defects_of(row: dict[str, str]) -> list[str]:
    """Every defect of one row of text, judged independently of how the generator made it."""
    found = []
    for column in FEATURES:
        value = row[column]
        if value == "":
            found.append("missing_feature_rows")
        elif not re.fullmatch(r"-?\d+(\.\d+)?", value):
            found.append("non_numeric_counts")
        elif value.startswith("-"):
            found.append("negative_counts")
        elif "." in value:
            found.append("non_whole_counts")
    label = row[TARGET]
    if label == "":
        found.append("missing_targets")
    elif label in WORD_LABELS:
        found.append("word_targets")
    elif label not in {"0", "1"}:
        found.append("invalid_targets")
    return found


@pytest.fixture(scope="module")
def dirty_batch() -> pd.DataFrame:
    return make_dirty(2_000, seed=3, id_offset=500)


def test_dirty_batch_has_the_reported_number_of_rows(dirty_batch):
    assert len(dirty_batch) == dirty_expectations(2_000).rows == 2_000


def test_dirty_batch_is_all_text_and_survives_csv(dirty_batch, tmp_path):
    assert tuple(dirty_batch.columns) == COLUMNS
    assert all(pd.api.types.is_string_dtype(dirty_batch[c]) for c in COLUMNS)
    path = tmp_path / "dirty.csv"
    write_csv(dirty_batch, path)
    pd.testing.assert_frame_equal(read_as_text(path), dirty_batch, check_dtype=False)


def test_same_seed_gives_identical_dirty_batch(dirty_batch):
    pd.testing.assert_frame_equal(make_dirty(2_000, seed=3, id_offset=500), dirty_batch)


def test_every_dirty_row_has_at_most_one_defect(dirty_batch):
    rows = dirty_batch.to_dict("records")
    assert max(len(defects_of(row)) for row in rows) == 1


def test_dirty_defect_counts_match_what_make_dirty_reports(dirty_batch):
    expected = dirty_expectations(2_000, seed=3, id_offset=500)
    found = Counter(d for row in dirty_batch.to_dict("records") for d in defects_of(row))
    for kind in (
        "non_numeric_counts",
        "negative_counts",
        "non_whole_counts",
        "invalid_targets",
        "missing_targets",
        "missing_feature_rows",
        "word_targets",
    ):
        assert found[kind] == getattr(expected, kind), kind
    assert expected.quarantined == sum(
        found[k]
        for k in ("non_numeric_counts", "negative_counts", "non_whole_counts",
                  "invalid_targets", "missing_targets")
    )
    assert expected.accepted == expected.rows - expected.duplicates - expected.quarantined


def test_dirty_duplicates_are_copies_of_clean_rows(dirty_batch):
    expected = dirty_expectations(2_000)
    repeated = dirty_batch[dirty_batch.duplicated(keep="first")]
    assert len(repeated) == expected.duplicates > 0
    assert all(defects_of(row) == [] for row in repeated.to_dict("records"))
    # Apart from the copies, every client appears once.
    assert dirty_batch.drop_duplicates()["corporation"].is_unique


def test_too_small_dirty_batch_is_refused():
    with pytest.raises(ValueError, match="more rows"):
        make_dirty(5)


# --- shipped data and the command line -----------------------------------------------------------


def test_shipped_data_holds_distinct_clients_in_every_file(tmp_path):
    write_shipped_data(tmp_path)
    sizes = {
        "practicedata/dataset1.csv": 150,
        "practicedata/dataset2.csv": 150,
        "sourcedata/dataset3.csv": 5_000,
        "sourcedata/dataset4.csv": 5_000,
        "testdata/testdata.csv": 2_000,
    }
    frames = {name: read_as_text(tmp_path / name) for name in sizes}
    assert {name: len(frame) for name, frame in frames.items()} == sizes
    all_ids = pd.concat([frame["corporation"] for frame in frames.values()])
    assert all_ids.is_unique


# The shipped files exactly as committed: a change to the generator must not rewrite them silently.
SHIPPED_SHA256 = {
    "practicedata/dataset1.csv": "8e58d496ae0984cda2363e4e56e3cfa0831e496a82e42016084f3ddc7203e524",
    "practicedata/dataset2.csv": "b8ce0bfb7d5b3692e014fb36d5a9af28e9670c7b08fa12fd61cb61e2d98482a9",
    "sourcedata/dataset3.csv": "6ab7ad04de4470fcad5572309623aef77637c7803767883892a50912894cdc59",
    "sourcedata/dataset4.csv": "3162d3c56b950bc00e22f8875b00db0dfdc4f3299ed066fd753d3cf0ff912edb",
    "testdata/testdata.csv": "09f135484b194dcf0896eaf8f00b809ec5083c6c8e3814cc02495e3b85cf45f2",
    "sourcedata/roster.csv": "973dd672f767abe9f523025631c506b3c154ffd1e080280568f1fa07ad064f05",
}


def test_shipped_data_is_byte_identical_to_the_committed_files(tmp_path):
    write_shipped_data(tmp_path)
    written = {
        path.relative_to(tmp_path).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in tmp_path.rglob("*") if path.is_file()
    }
    assert written == SHIPPED_SHA256


def test_shipped_roster_lists_the_clients_who_stayed_in_the_last_source_file(tmp_path):
    shipped = write_shipped_data(tmp_path)
    roster_path = tmp_path.joinpath(*SHIPPED_ROSTER)
    assert shipped[roster_path] == len(make_shipped_roster().frame)
    written = write_shipped_roster(tmp_path)
    roster = read_as_text(tmp_path.joinpath(*SHIPPED_ROSTER))
    assert written == {tmp_path.joinpath(*SHIPPED_ROSTER): len(roster)}
    assert tuple(roster.columns) == COLUMNS[:-1]
    last_source = read_as_text(tmp_path / "sourcedata" / "dataset4.csv")
    stayers = last_source.loc[last_source[TARGET] == "0", "corporation"]
    assert roster["corporation"].iloc[: len(stayers)].tolist() == stayers.tolist()
    shipped_ids = pd.concat(
        [read_as_text(path)["corporation"] for path in shipped if path != roster_path]
    )
    new_ids = roster["corporation"].iloc[len(stayers) :]
    assert len(new_ids) > 0
    assert not set(new_ids) & set(shipped_ids)
    pd.testing.assert_frame_equal(
        read_clients(tmp_path.joinpath(*SHIPPED_ROSTER)),
        make_shipped_roster().frame,
        check_dtype=False,
    )


def test_command_writes_one_generated_file(tmp_path, capsys):
    path = tmp_path / "bench" / "drifted.csv"
    argv = ["--rows", "50", "--out", str(path), "--seed", "9", "--drifted", "--id-offset", "7"]
    assert generate_data.main(argv) == 0
    assert f"{path}: 50 rows" in capsys.readouterr().out
    written = pd.read_csv(path, dtype={"corporation": "str"})
    pd.testing.assert_frame_equal(
        written, make_clients(50, seed=9, drifted=True, id_offset=7), check_dtype=False
    )


def test_command_writes_a_dirty_file(tmp_path, capsys):
    path = tmp_path / "dirty.csv"
    assert generate_data.main(["--rows", "300", "--out", str(path), "--dirty"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    pd.testing.assert_frame_equal(read_as_text(path), make_dirty(300), check_dtype=False)


def test_command_writes_shipped_data_under_root(tmp_path, capsys):
    assert generate_data.main(["--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6  # five labeled files and the roster
    assert f"{tmp_path / 'sourcedata' / 'dataset3.csv'}: 5000 rows" in lines
    assert len(read_as_text(tmp_path / "sourcedata" / "dataset3.csv")) == 5_000


def test_command_writes_a_shifted_file(tmp_path, capsys):
    path = tmp_path / "shifted.csv"
    assert generate_data.main(["--rows", "80", "--out", str(path), "--shift", "--seed", "2"]) == 0
    assert f"{path}: 80 rows (shifted)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(
        read_clients(path), make_clients(80, seed=2, shift=UPMARKET), check_dtype=False
    )


def test_command_writes_a_process_change_as_batches_in_arrival_order(tmp_path, capsys):
    folder = tmp_path / "batches"
    argv = ["--process-change", str(folder), "--rows", "40", "--batches", "3", "--change-at", "2",
            "--seed", "5", "--id-offset", "100"]
    assert generate_data.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{folder / 'batch00.csv'}: 40 rows (normal)",
        f"{folder / 'batch01.csv'}: 40 rows (normal)",
        f"{folder / 'batch02.csv'}: 40 rows (changed)",
    ]
    expected = make_process_change(40, 3, change_at=2, seed=5, id_offset=100)
    for index, batch in enumerate(expected):
        written = read_clients(folder / f"batch{index:02d}.csv")
        pd.testing.assert_frame_equal(written, batch, check_dtype=False)


def test_command_writes_a_roster_of_a_file_and_its_outcomes(tmp_path, capsys):
    earlier, roster, outcomes = tmp_path / "earlier.csv", tmp_path / "r.csv", tmp_path / "o.csv"
    write_csv(make_clients(300), earlier)
    argv = ["--roster-of", str(earlier), "--out", str(roster), "--outcomes", str(outcomes),
            "--seed", "3", "--months-later", "6", "--new-clients", "20", "--id-offset", "300"]
    assert generate_data.main(argv) == 0
    expected = make_roster(make_clients(300), seed=3, months_later=6, new_clients=20, id_offset=300)
    assert capsys.readouterr().out.splitlines() == [
        f"{roster}: {len(expected.frame)} rows (roster)",
        f"{outcomes}: {len(expected.frame)} rows (outcomes of {roster})",
    ]
    pd.testing.assert_frame_equal(read_clients(roster), expected.frame, check_dtype=False)
    pd.testing.assert_frame_equal(
        read_clients(outcomes), make_outcomes(expected, seed=3), check_dtype=False
    )


def test_command_refuses_a_roster_of_a_file_without_outcomes(tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled.csv"
    write_csv(make_clients(50).drop(columns=TARGET), unlabelled)
    argv = ["--roster-of", str(unlabelled), "--out", str(tmp_path / "roster.csv")]
    assert run_cli(generate_data.main, argv) == 2
    assert "is not a clean labelled batch" in capsys.readouterr().err
    assert not (tmp_path / "roster.csv").exists()


def test_command_refuses_new_clients_with_ids_of_the_earlier_file(tmp_path, capsys):
    earlier = tmp_path / "earlier.csv"
    write_csv(make_clients(50), earlier)
    argv = ["--roster-of", str(earlier), "--out", str(tmp_path / "roster.csv"),
            "--new-clients", "5"]
    assert run_cli(generate_data.main, argv) == 2
    assert "--id-offset" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--rows", "10"], ["--out", "x.csv"], ["--seed", "3"], ["--rows", "-1", "--out", "x.csv"],
     ["--rows", "10", "--out", "x.csv", "--dirty", "--drifted"],
     ["--rows", "10", "--out", "x.csv", "--batches", "2"],
     ["--process-change", "b", "--rows", "10", "--batches", "2"],
     ["--process-change", "b", "--rows", "10", "--batches", "2", "--change-at", "3"],
     ["--process-change", "b", "--rows", "10", "--batches", "0", "--change-at", "0"],
     ["--process-change", "b", "--rows", "10", "--batches", "2", "--change-at", "1", "--shift"],
     ["--roster-of", "x.csv"],
     ["--roster-of", "x.csv", "--out", "r.csv", "--months-later", "0"],
     ["--roster-of", "x.csv", "--out", "r.csv", "--rows", "10"],
     ["--outcomes", "o.csv"]],
)
def test_command_rejects_incomplete_or_conflicting_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_data.main(argv)
    assert exit_info.value.code == 2
