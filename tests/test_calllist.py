"""The call list: who is ranked, why, what changed, how earlier lists fared, and which release.

Scenarios on generated data with recurring clients: a labeled batch, a roster of its clients who
stayed (plus new ones) months later, and the outcomes of that roster later still.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import calllist
import deployment
import diagnostics
import fullprocess
import generate_data
import records
from conftest import SOURCE_ROWS
from dataset import read_master
from ingestion import ingest
from scoring import explain, number_text, wilson_interval
from settings import DiagnosticsSettings, ModelSettings, Settings
from training import train

ID = "corporation"


@pytest.fixture(autouse=True)
def offline_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollback rebuilds the report, which may run diagnostics: answer for pip, offline."""
    monkeypatch.setattr(
        diagnostics, "ask_index",
        lambda name, timeout: {"latest": None, "error": "offline", "checked_at": records.utc_now()},
    )


def second_batch() -> pd.DataFrame:
    """The workspace's batch2.csv, as conftest made it: clients who recur on the roster."""
    return generate_data.make_clients(SOURCE_ROWS, seed=12, id_offset=100_000)


def shipped_roster(settings: Settings, name: str = "roster.csv") -> generate_data.Roster:
    """Write a roster of the second batch's stayers, three months on, plus 40 new clients."""
    roster = generate_data.make_roster(second_batch(), seed=3, new_clients=40, id_offset=900_000)
    generate_data.write_csv(roster.frame, settings.input_folder / name)
    return roster


def written_list(settings: Settings) -> pd.DataFrame:
    return calllist.read_list(settings.risk_scores_path, settings.schema)


def newest_labels(settings: Settings) -> pd.Series:
    return read_master(settings).drop_duplicates(ID, keep="last").set_index(ID)["exited"]


# --- Who is on the list ------------------------------------------------------------------------


def test_clients_whose_newest_row_says_they_left_are_never_ranked(deployed):
    labels = newest_labels(deployed)

    result = calllist.rebuild_call_list(deployed)

    ranked = written_list(deployed)[ID]
    assert set(ranked) == set(labels[labels == 0].index)
    assert result.left_not_ranked == (labels == 1).sum() > 0
    assert f"{result.left_not_ranked:,} already left, not ranked" in result.summary()


def test_a_roster_is_ranked_and_never_trained_on(deployed):
    master_before = deployed.finaldata_path.read_bytes()
    roster = shipped_roster(deployed)

    report = ingest(deployed)
    result = calllist.rebuild_call_list(deployed)

    assert deployed.finaldata_path.read_bytes() == master_before
    assert report.accepted_rows == 0 and report.roster_clients == len(roster.frame)
    ranked = written_list(deployed).set_index(ID)
    assert set(roster.frame[ID]) <= set(ranked.index)
    assert result.from_rosters == len(roster.frame)
    assert result.roster == "roster.csv"
    # A recurring client is ranked on its roster row, not on its older labeled row.
    model, _ = deployment.load_deployed_model(deployed)
    row = roster.frame.iloc[[0]]
    assert ranked.loc[row[ID].iloc[0], "probability"] == pytest.approx(
        model.predict_proba(row[list(deployed.schema.features)])[0, 1], abs=1e-6
    )
    assert train(deployed).metadata["training_data"]["rows"] == len(read_master(deployed))


def test_a_labeled_row_newer_than_a_roster_decides_whether_the_client_is_current(deployed):
    roster = shipped_roster(deployed)
    ingest(deployed)
    leaver, stayer = roster.frame[ID].iloc[0], roster.frame[ID].iloc[1]
    header = "corporation,lastmonth_activity,lastyear_activity,number_of_employees,exited\n"
    (deployed.input_folder / "zz_outcomes.csv").write_text(
        header + f"{leaver},1,20,3,1\n{stayer},1,20,3,0\n"
    )
    ingest(deployed)

    calllist.rebuild_call_list(deployed)

    ranked = written_list(deployed).set_index(ID)
    assert leaver not in ranked.index
    assert stayer in ranked.index
    assert ranked.loc[stayer, "reason_1"].startswith("lastmonth_activity 1,")


def test_a_roster_read_before_a_labeled_file_of_the_same_run_is_the_older_row(deployed):
    # Files are read in name order: the labeled file after the roster is the newest word.
    roster = shipped_roster(deployed, name="a_roster.csv")
    client = roster.frame[ID].iloc[0]
    (deployed.input_folder / "b_outcomes.csv").write_text(
        "corporation,lastmonth_activity,lastyear_activity,number_of_employees,exited\n"
        f"{client},5,60,2,1\n"
    )
    ingest(deployed)

    calllist.rebuild_call_list(deployed)

    assert client not in set(written_list(deployed)[ID])


# --- Why each client is on it ------------------------------------------------------------------


def test_reasons_of_a_hand_made_client_match_a_hand_computation(deployed):
    model, _ = deployment.load_deployed_model(deployed)
    client = pd.DataFrame({
        ID: ["handmade"],
        "lastmonth_activity": pd.array([3], dtype="Int64"),
        "lastyear_activity": pd.array([None], dtype="Int64"),  # imputed with the median
        "number_of_employees": pd.array([2000], dtype="Int64"),
    })
    pipeline = model.estimator_
    if hasattr(pipeline, "calibrated_classifiers_"):  # calibrated: reasons are the pipeline's
        pipeline = pipeline.calibrated_classifiers_[0].estimator
    counts = pipeline.named_steps["preprocess"].named_transformers_["counts"]
    median = counts.named_steps["simpleimputer"].statistics_
    scaler = counts.named_steps["standardscaler"]
    weights = pipeline[-1].coef_[0]
    values = np.array([3.0, median[1], 2000.0])
    by_hand = weights * (np.log1p(values) - scaler.mean_) / scaler.scale_

    why = explain(model, client)

    np.testing.assert_allclose(why.contributions[0], by_hand, rtol=1e-12)
    # The log-odds before calibration: the pipeline's own decision function.
    decision = pipeline.decision_function(client[list(deployed.schema.features)])[0]
    assert why.logits()[0] == pytest.approx(decision, abs=1e-9)
    assert why.intercept + by_hand.sum() == pytest.approx(why.logits()[0], abs=1e-12)
    features = ["lastmonth_activity", "lastyear_activity", "number_of_employees"]
    typical = [number_text(np.expm1(mean)) for mean in scaler.mean_]
    said = [
        f"lastmonth_activity 3, typical {typical[0]}: raises risk",
        f"lastyear_activity unknown (taken as {number_text(median[1])}), typical {typical[1]}: "
        "raises risk",
        f"number_of_employees 2000, typical {typical[2]}: raises risk",
    ]
    raising = [i for i in np.argsort(-by_hand, kind="stable") if by_hand[i] > 0]
    assert [reason["feature"] for reason in why.as_records()[0]] == [features[i] for i in raising]
    assert [why.reason_texts(p)[0] for p in range(len(raising))] == [said[i] for i in raising]


def test_each_client_on_the_list_carries_its_strongest_reasons(deployed):
    calllist.rebuild_call_list(deployed)
    model, _ = deployment.load_deployed_model(deployed)

    ranked = written_list(deployed)

    assert list(ranked.columns[:5]) == [
        "rank", ID, "probability", "predicted_exited", "model_version"
    ]
    first = ranked.iloc[0]
    row = read_master(deployed).drop_duplicates(ID, keep="last").set_index(ID).loc[[first[ID]]]
    why = explain(model, row.reset_index())
    strongest = why.features[int(np.argmax(why.contributions[0]))]
    assert first["reason_1"].startswith(strongest + " ")
    assert first["reason_1"].endswith(": raises risk")
    raising = int((why.contributions[0] > 0).sum())
    assert [bool(first[column]) for column in calllist.REASON_COLUMNS] == [
        position < raising for position in range(3)
    ]


def test_each_entry_says_what_changed_since_the_previous_list(deployed):
    calllist.rebuild_call_list(deployed)
    before = written_list(deployed).set_index(ID)
    top_n = deployed.diagnostics.risk_top_n
    # A client far down the list goes quiet this month: it jumps into the top group.
    mover = before.index[-1]
    row = read_master(deployed).set_index(ID).loc[mover]
    roster = pd.DataFrame({ID: [mover], "lastmonth_activity": [0],
                           "lastyear_activity": [row["lastyear_activity"]],
                           "number_of_employees": [row["number_of_employees"]]})
    generate_data.write_csv(roster, deployed.input_folder / "quiet.csv")
    ingest(deployed)

    calllist.rebuild_call_list(deployed)

    after = written_list(deployed).set_index(ID)
    moved = after.loc[mover]
    assert moved["rank"] <= top_n
    assert moved["change"] == f"new in the top {top_n}"
    assert moved["rank_before"] == before.loc[mover, "rank"] == len(before)
    assert moved["moved_by"] == "lastmonth_activity"
    pushed_down = after[(after["rank_before"] < after["rank"]).fillna(False)]
    assert (pushed_down["change"] == "fallen").all() and len(pushed_down) > 0
    assert (pushed_down["moved_by"] == "").all()  # its own risk did not move


def test_without_the_terms_of_the_previous_list_changes_are_told_by_id(deployed):
    calllist.rebuild_call_list(deployed)
    before = written_list(deployed).set_index(ID)
    calllist.terms_path(deployed).unlink()
    shipped_roster(deployed)
    ingest(deployed)

    calllist.rebuild_call_list(deployed)

    after = written_list(deployed).set_index(ID)
    stayed_on = after.index.intersection(before.index)
    assert (after.loc[stayed_on, "rank_before"] == before.loc[stayed_on, "rank"]).all()
    assert (after["moved_by"] == "").all()  # what moved them needs the terms
    assert calllist.terms_path(deployed).exists()


def test_a_list_that_is_up_to_date_is_left_as_it_is(deployed):
    calllist.rebuild_call_list(deployed)
    written = deployed.risk_scores_path.read_bytes()

    again = calllist.rebuild_call_list(deployed)

    assert not again.rebuilt
    assert deployed.risk_scores_path.read_bytes() == written
    assert calllist.call_list_is_current(deployed)
    assert len(records.query(deployed.records_path, "SELECT id FROM call_lists")) == 1


# --- Whether the list works --------------------------------------------------------------------


def test_track_record_of_a_list_whose_outcomes_arrive_later_matches_a_count_by_hand(deployed):
    settings = deployed._replace(diagnostics=DiagnosticsSettings(risk_top_n=60))
    roster = shipped_roster(settings)
    ingest(settings)
    first = calllist.rebuild_call_list(settings)
    listed = written_list(settings)
    # Months later the outcomes of the roster's clients arrive.
    outcomes = generate_data.make_outcomes(roster, seed=8)
    generate_data.write_csv(outcomes, settings.input_folder / "outcomes.csv")
    ingest(settings)

    second = calllist.rebuild_call_list(settings)

    outcome = outcomes.set_index(ID)[generate_data.TARGET]
    top = listed.head(60)[ID]
    top_known = int(top.isin(outcome.index).sum())
    top_left = int((outcome.reindex(top) == 1).sum())
    ranked_known = int(listed[ID].isin(outcome.index).sum())
    ranked_left = int((outcome.reindex(listed[ID]) == 1).sum())
    [result] = second.results
    assert result["list_id"] == first.list_id
    assert (result["top_known"], result["top_left"]) == (top_known, top_left)
    assert top_known > 0
    assert (result["ranked_known"], result["ranked_left"]) == (ranked_known, ranked_left)
    assert result["precision"] == pytest.approx(top_left / top_known)
    assert result["leaver_share"] == pytest.approx(ranked_left / ranked_known)
    assert result["lift"] == pytest.approx(result["precision"] / result["leaver_share"])
    low, high = wilson_interval(top_left, top_known, 1.959963984540054)
    assert (result["precision_low"], result["precision_high"]) == pytest.approx((low, high))
    assert result["lift_low"] < result["lift"] < result["lift_high"]
    assert calllist.latest_track_record(settings)["list_id"] == first.list_id


def test_wilson_interval_matches_the_formula_for_a_known_case():
    # 8 of 10 at 95%, worked by hand: centre 0.7167, half-width 0.2266.
    low, high = wilson_interval(8, 10, 1.959963984540054)

    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)


# --- The list follows the served release -------------------------------------------------------


def test_rollback_brings_back_the_old_list_and_the_next_quiet_cycle_leaves_it(deployed, capsys):
    calllist.rebuild_call_list(deployed)
    old_list = written_list(deployed)
    old_version = deployment.current_release(deployed).version
    # Another release, of another model, on the same data.
    train(deployed._replace(model=ModelSettings(C=0.0005)))
    from scoring import score

    score(deployed)
    deployment.deploy(deployed)
    calllist.rebuild_call_list(deployed)
    assert written_list(deployed)["model_version"].iloc[0] != old_version

    assert deployment.main(["--config", str(deployed.config_path), "--rollback"]) == 0

    restored = written_list(deployed)
    same = ["rank", ID, "probability", "model_version", "reason_1", "reason_2", "reason_3"]
    pd.testing.assert_frame_equal(restored[same], old_list[same])
    assert "already left, not ranked" in capsys.readouterr().out
    outputs = [deployed.risk_scores_path, deployed.report_path]
    written = [path.read_bytes() for path in outputs]
    config = json.loads(deployed.config_path.read_text())
    unreachable_api = {"base_url": "http://127.0.0.1:9"}
    deployed.config_path.write_text(json.dumps({**config, "api": unreachable_api}))

    assert fullprocess.main(["--config", str(deployed.config_path)]) == 0

    assert [path.read_bytes() for path in outputs] == written
    assert calllist.call_list_is_current(deployed)
