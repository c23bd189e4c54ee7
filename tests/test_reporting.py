"""Reporting: the risk list, the confusion matrix and the PDF report."""

from __future__ import annotations

import shutil

import pandas as pd
import pypdf
import pytest

import diagnostics
import generate_data
import records
import reporting
from conftest import SOURCE_ROWS
from deployment import current_release, deploy, load_deployed_model
from errors import ModelNotDeployedError
from dataset import read_master
from ingestion import ingest
from scoring import score
from settings import Settings, load_settings
from training import train


def _offline_index(name: str, timeout: float) -> dict:
    return {"latest": None, "error": "offline in tests", "checked_at": records.utc_now()}


@pytest.fixture(autouse=True)
def index_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report runs diagnostics when none are recorded: answer for pip, which may be offline."""
    monkeypatch.setattr(diagnostics, "ask_index", _offline_index)


def _ingest_rows(settings: Settings, rows: str, name: str) -> None:
    header = "corporation,lastmonth_activity,lastyear_activity,number_of_employees,exited\n"
    (settings.input_folder / name).write_text(header + rows)
    ingest(settings)


def _redeploy(settings: Settings) -> None:
    train(settings)
    score(settings)
    deploy(settings)


# --- The risk list -----------------------------------------------------------------------------


def test_risk_list_ranks_every_current_client_once_highest_risk_first(deployed):
    newest = read_master(deployed).drop_duplicates("corporation", keep="last")
    current = set(newest.loc[newest["exited"] == 0, "corporation"])

    risk = reporting.risk_scores(deployed)

    assert set(risk["corporation"]) == current
    assert len(risk) == len(current)
    assert risk["probability"].is_monotonic_decreasing
    assert risk["rank"].tolist() == list(range(1, len(risk) + 1))
    assert set(risk["model_version"]) == {current_release(deployed).version}


def test_risk_of_a_client_comes_from_its_newest_row(deployed):
    master = read_master(deployed)
    client = master["corporation"].iloc[0]
    _ingest_rows(deployed, f"{client},0,50000,900,0\n", "update.csv")
    model, _ = load_deployed_model(deployed)
    newest = pd.DataFrame({
        "lastmonth_activity": [0.0], "lastyear_activity": [50000.0], "number_of_employees": [900.0]
    })

    risk = reporting.risk_scores(deployed)

    [row] = risk[risk["corporation"] == client].itertuples()
    assert row.probability == pytest.approx(model.predict_proba(newest)[0, 1])
    assert risk["corporation"].is_unique


def test_clients_with_equal_risk_are_ordered_by_id(deployed):
    _ingest_rows(deployed, "zzzzzz,7,900,11,0\naaaaaa,7,900,11,0\n", "twins.csv")

    risk = reporting.risk_scores(deployed)

    twins = risk[risk["corporation"].isin(["aaaaaa", "zzzzzz"])]
    assert twins["corporation"].tolist() == ["aaaaaa", "zzzzzz"]
    assert twins["rank"].diff().iloc[1] == 1


def test_risk_list_without_a_deployed_model_says_so(workspace):
    with pytest.raises(ModelNotDeployedError):
        reporting.risk_scores(workspace)


# --- The report --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reported(_deployed_template, tmp_path_factory) -> tuple[Settings, reporting.ReportResult]:
    """A deployed workspace whose report has been built once; its tests only read it."""
    root = tmp_path_factory.mktemp("reported") / "workspace"
    shutil.copytree(_deployed_template, root)
    settings = load_settings(root / "config.json")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(diagnostics, "ask_index", _offline_index)
        return settings, reporting.build_report(settings)


REPORT_SECTIONS = [
    "Deployed release",
    "Model metrics on the test data",
    "bootstrap interval",
    "Files ingested",
    "Confusion matrix",
    "ROC curve",
    "Precision-recall curve",
    "Summary statistics",
    "Missing data",
    "Data drift",
    "Stage timings",
    "Dependencies",
    "Top of the risk list",
    "already left, not ranked",
    "raises risk",
    "since the previous release",
    "Track record of the risk lists",
    "Precision at the top and lift",
    "Trends over earlier runs",
    "F1 and ROC AUC of recorded scores",
    "share of leavers",
    "ROC AUC of recorded scores",
    "missing data (mean over columns)",
]


def test_report_pdf_opens_and_holds_every_section(reported):
    settings, result = reported

    text = "\n".join(page.extract_text() for page in pypdf.PdfReader(result.report_path).pages)

    assert [section for section in REPORT_SECTIONS if section not in text] == []
    assert result.model_version in text
    assert "batch1.csv" in text


def test_report_writes_the_risk_list_beside_the_deployed_model(reported):
    settings, result = reported

    written = pd.read_csv(result.risk_scores_path, dtype={"corporation": "str"})

    assert result.risk_scores_path.parent == settings.deployment_folder
    # Today's columns first, so that existing readers keep working; the new ones after them.
    assert written.columns.tolist() == [
        "rank", "corporation", "probability", "predicted_exited", "model_version",
        "reason_1", "reason_2", "reason_3", "change", "rank_before", "moved_by",
    ]
    newest = read_master(settings).drop_duplicates("corporation", keep="last")
    assert len(written) == result.clients == (newest["exited"] == 0).sum()
    assert written["probability"].is_monotonic_decreasing


def test_confusion_matrix_is_a_png_image(reported):
    _, result = reported

    assert result.confusion_matrix_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_report_runs_diagnostics_for_a_release_that_has_none(reported):
    settings, result = reported

    latest = diagnostics.latest_diagnostics(settings)

    assert latest is not None
    assert latest["model_version"] == result.model_version
    assert latest["time"] == result.diagnostics_time


def test_first_release_has_no_earlier_top_group(reported):
    _, result = reported

    assert result.top_group.previous_version is None
    assert result.top_group.entered is None


def test_report_command_again_with_nothing_new_rewrites_identical_files(reported, monkeypatch,
                                                                         capsys):
    settings, result = reported
    paths = [result.report_path, result.confusion_matrix_path, result.risk_scores_path,
             result.top_groups_path]
    contents = [path.read_bytes() for path in paths]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the report ran diagnostics although a run was recorded")

    # The second run reads the diagnostics the first one recorded, rather than running them again.
    monkeypatch.setattr(reporting, "run_diagnostics", must_not_run)
    assert reporting.main(["--config", str(settings.config_path)]) == 0

    assert [path.read_bytes() for path in paths] == contents
    assert str(result.report_path) in capsys.readouterr().out


def test_report_charts_the_track_record_only_once_outcomes_of_listed_clients_arrived(deployed):
    chart_title = "Precision at the top: share of the top group who left"
    reporting.build_report(deployed)
    assert chart_title not in pdf_text(deployed.report_path)  # the page says none arrived yet
    # Months later the outcomes of the second batch's clients, all on the list, arrive.
    roster = generate_data.make_roster(generate_data.make_clients(SOURCE_ROWS, seed=12,
                                                                  id_offset=100_000), seed=3)
    generate_data.write_csv(generate_data.make_outcomes(roster, seed=8),
                            deployed.input_folder / "outcomes.csv")
    ingest(deployed)

    reporting.build_report(deployed)

    assert chart_title in pdf_text(deployed.report_path)


def pdf_text(path) -> str:
    return "\n".join(page.extract_text() for page in pypdf.PdfReader(path).pages)


def test_report_names_clients_who_entered_or_left_the_top_group(deployed):
    top_n = deployed.diagnostics.risk_top_n
    # Diagnostics recorded beforehand (without the slow timing) spare the report running them.
    diagnostics.run_diagnostics(deployed)
    first = reporting.build_report(deployed)
    old_top = set(pd.read_csv(first.risk_scores_path, dtype="str")["corporation"].head(top_n))
    # A new release trained on more (and differently behaving) clients ranks others first.
    drifted = generate_data.make_clients(1200, seed=41, drifted=True, id_offset=500_000)
    generate_data.write_csv(drifted, deployed.input_folder / "batch3.csv")
    ingest(deployed)
    _redeploy(deployed)
    diagnostics.run_diagnostics(deployed)

    second = reporting.build_report(deployed)

    new_top = set(pd.read_csv(second.risk_scores_path, dtype="str")["corporation"].head(top_n))
    change = second.top_group
    assert change.previous_version == first.model_version
    assert change.entered
    assert set(change.entered) == new_top - old_top
    assert set(change.left) == old_top - new_top


def test_report_without_a_deployed_model_says_so(workspace):
    with pytest.raises(ModelNotDeployedError):
        reporting.build_report(workspace)


def test_report_opens_with_the_decision_and_says_what_each_f1_was_measured_on(deployed, monkeypatch):
    import json

    import fullprocess
    from conftest import write_config

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    config = json.loads(deployed.config_path.read_text())
    write_config(deployed.base_dir, **{**config, "api": {"base_url": "http://127.0.0.1:9"}})
    generate_data.write_csv(
        generate_data.make_clients(2000, seed=91, relation=generate_data.OUTGROWN,
                                   id_offset=910_000),
        deployed.input_folder / "changed.csv",
    )
    assert fullprocess.main(["--config", str(deployed.config_path)]) == 0

    pages = [page.extract_text() for page in pypdf.PdfReader(deployed.report_path).pages]

    first = pages[0]
    assert first.index("Why this release is served") < first.index("Deployed release")
    assert "decided: drift-redeployed" in first
    assert "on the new batch" in first and "allowed drop" in first
    assert "F1 at release" in first and "on held-out new rows (600 rows" in first
    assert "on the test data (95% bootstrap interval" in first
    assert "candidate since the change" in first
    assert "Dependencies" in pages[-1] and "Dependencies" not in " ".join(pages[:-1])
    assert "\u2212" not in "".join(pages)  # no Unicode minus, which the core fonts lack
