"""Learning the new business: after a change of process, the cycle retrains on the data that
describes it; after a change of features alone, it keeps all history (issue 10)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import deployment
import fullprocess
import generate_data
import records
from conftest import write_config
from dataset import typed
from scoring import predict_frame
from settings import load_settings
from training import build_pipeline

CHANGED_ROWS = 3000


@pytest.fixture
def cycle_settings(deployed, monkeypatch):
    """A deployed workspace whose cycles skip the report and the API call (not under test here)."""
    monkeypatch.setattr(fullprocess, "after_deployment", lambda settings, cycle: [])
    config = json.loads(deployed.config_path.read_text())
    write_config(deployed.base_dir, **{**config, "api": {"base_url": "http://127.0.0.1:9"}})
    return load_settings(deployed.config_path)


def add_batch(settings, name, frame):
    generate_data.write_csv(frame, settings.input_folder / name)
    assert fullprocess.main(["--config", str(settings.config_path)]) == 0
    return records.query(settings.records_path, "SELECT * FROM cycles ORDER BY id DESC LIMIT 1")[0]


def served_auc(settings, clients):
    model, release = deployment.load_deployed_model(settings)
    frame = typed(clients, settings.schema)
    probabilities = predict_frame(model, release.version, frame, settings.schema).probabilities
    return roc_auc_score(clients["exited"], probabilities)


def changed_clients(rows, seed, id_offset):
    return generate_data.make_clients(
        rows, seed=seed, relation=generate_data.OUTGROWN, id_offset=id_offset
    )


def test_after_a_change_of_process_the_served_model_ranks_like_one_trained_on_the_change(
    cycle_settings,
):
    changed = changed_clients(CHANGED_ROWS, seed=71, id_offset=700_000)
    fresh = changed_clients(4000, seed=72, id_offset=710_000)
    assert served_auc(cycle_settings, fresh) < 0.5  # the old model ranks the new business backwards

    cycle = add_batch(cycle_settings, "changed.csv", changed)

    assert cycle["decision"] == "drift-redeployed"
    on_changed_alone = build_pipeline(cycle_settings.schema, cycle_settings.model).fit(
        changed[list(cycle_settings.schema.features)], changed["exited"]
    )
    best_possible = roc_auc_score(
        fresh["exited"], on_changed_alone.predict_proba(fresh[list(cycle_settings.schema.features)])[:, 1]
    )
    assert served_auc(cycle_settings, fresh) == pytest.approx(best_possible, abs=0.03)


def test_every_candidates_numbers_are_in_the_cycles_record(cycle_settings):
    cycle = add_batch(cycle_settings, "changed.csv", changed_clients(CHANGED_ROWS, 73, 720_000))

    details = json.loads(cycle["details"])
    names = [candidate["candidate"] for candidate in details["candidates"]]
    assert names == ["deployed model as it is", "all history", "since the change",
                     "recency-weighted"]
    assert all(0 <= candidate["f1"] <= 1 and 0 <= candidate["roc_auc"] <= 1
               for candidate in details["candidates"])
    assert details["chosen"] == "since the change"
    since_change = details["candidates"][2]
    assert since_change["training_rows"] == CHANGED_ROWS - int(CHANGED_ROWS * 0.3)
    assert "since the change" in " ".join(json.loads(cycle["details"])["steps"])


def test_a_second_batch_of_the_changed_process_is_not_drift_once_adapted(cycle_settings):
    add_batch(cycle_settings, "changed1.csv", changed_clients(CHANGED_ROWS, 74, 730_000))

    cycle = add_batch(cycle_settings, "changed2.csv", changed_clients(CHANGED_ROWS, 75, 740_000))

    assert cycle["decision"] == "no-drift"


def test_a_ranking_that_collapses_is_drift_even_where_f1_holds():
    from fullprocess import Measure, drift_decision
    from settings import DriftSettings

    decision = drift_decision(
        0.60, (0.56, 0.64), 0.59, (0.55, 0.63), DriftSettings(),
        ranking=(Measure("ROC AUC", 0.80, (0.77, 0.83), 0.45, (0.41, 0.49)),),
    )

    assert decision.drifted
    assert "ROC AUC fell from 0.800 to 0.450" in decision.reason


def test_f1_below_predicting_everyone_leaves_is_always_drift():
    from fullprocess import drift_decision
    from settings import DriftSettings

    decision = drift_decision(
        0.60, (0.40, 0.80), 0.55, (0.35, 0.75), DriftSettings(), everyone_leaves_f1=0.58
    )

    assert decision.drifted
    assert "predicting 'leaves' for everyone" in decision.reason


def test_a_shift_of_the_features_alone_keeps_all_history(cycle_settings):
    shifted = generate_data.make_clients(
        CHANGED_ROWS, seed=76, shift=generate_data.UPMARKET, id_offset=750_000
    )
    generate_data.write_csv(shifted, cycle_settings.input_folder / "upmarket.csv")

    # Forced, so that the candidates are judged even though the model still holds.
    assert fullprocess.main(["--config", str(cycle_settings.config_path), "--force"]) == 0

    cycle = records.query(cycle_settings.records_path, "SELECT * FROM cycles ORDER BY id DESC")[0]
    details = json.loads(cycle["details"])
    assert details["drift"]["drifted"] is False
    assert details["chosen"] in ("deployed model as it is", "all history")
    by_name = {c["candidate"]: c for c in details["candidates"]}
    assert by_name["all history"]["roc_auc"] >= by_name["since the change"]["roc_auc"] - 0.01


@pytest.mark.parametrize(
    ("f1s", "aucs", "chosen"),
    [
        ((0.50, 0.70, 0.65), (0.6, 0.80, 0.90), "c"),  # within the F1 tie: the better AUC
        ((0.50, 0.70, 0.60), (0.6, 0.80, 0.90), "b"),  # beyond it: the better F1
        ((0.70, 0.70, 0.70), (0.80, 0.805, 0.79), "a"),  # all tied: the earliest
    ],
)
def test_choose_plan_takes_the_best_f1_then_ranking_then_the_earliest(f1s, aucs, chosen):
    from fullprocess import PlanScore, choose_plan

    scores = [PlanScore(name, None, None, f1, auc, None)
              for name, f1, auc in zip("abc", f1s, aucs, strict=True)]

    assert choose_plan(scores, f1_tie=0.06, auc_tie=0.01).name == chosen


def test_recency_weights_halve_every_half_life():
    import pandas as pd

    from training import TrainingPlan, plan_rows

    frame = pd.DataFrame({"x": range(6)})
    batches = np.array(["r1", "r1", "r2", "r2", "r3", "r3"])

    _, weights = plan_rows(frame, TrainingPlan("recency", half_life_batches=1.0), batches)
    chosen, none = plan_rows(frame, TrainingPlan("since", batches=frozenset({"r3"})), batches)

    assert weights.tolist() == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    assert chosen["x"].tolist() == [4, 5] and none is None
