"""The pages, through Flask's test client: every page in every state, the login, and escaping."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from html import unescape
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import pandas as pd
import pytest

import atomicio
import calllist
import deployment
import diagnostics
import fullprocess
import generate_data
import pages
import records
import reporting
from conftest import assert_refused, text_of, workspace_state, write_config
from ingestion import ingest
from settings import Settings, load_settings

TOKEN = "page-token-7d1e"
# The client links of the call list's rows, in order.
LISTED = r'<th role="rowheader"[^>]*><a href="/clients/([^"]+)">'
HOSTILE_ID = '<script>alert("x")</script>,\'&'
# Nothing listens on the discard port, so a cycle's API call reports "not reachable" and goes on.
UNREACHABLE_API = {"base_url": "http://127.0.0.1:9"}


def offline_index(name: str, timeout: float) -> dict:
    """The package index's answer while a module's workspace is built (conftest's own stand-in
    covers each test, not a module's fixtures)."""
    return {"latest": None, "error": "offline in tests", "checked_at": records.utc_now()}


@pytest.fixture(autouse=True)
def without_secrets(monkeypatch):
    """No token or session key from the environment of whoever runs the tests."""
    monkeypatch.delenv("RISK_API_TOKEN", raising=False)
    monkeypatch.delenv(pages.SECRET_KEY_ENV_VAR, raising=False)


def build_site(template: Path, root: Path) -> Settings:
    """A workspace with a history: a first release and its report, then a cycle that found drift
    in a new batch and deployed a retrained release, then a later batch that brings the outcomes
    of three clients at the top of that release's list, and a new list."""
    shutil.copytree(template, root)
    config = json.loads((root / "config.json").read_text())
    settings = load_settings(write_config(root, **{**config, "api": UNREACHABLE_API}))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(diagnostics, "ask_index", offline_index)
        reporting.build_report(settings)
        generate_data.write_csv(
            generate_data.make_clients(1000, seed=5, id_offset=300_000, drifted=True),
            settings.input_folder / "batch3.csv",
        )
        assert fullprocess.main(["--config", str(settings.config_path)]) == 0
    listed = pd.read_csv(settings.risk_scores_path, dtype={"corporation": "str"})
    # Three listed clients came back: activity gone, and they left.
    later = read_rows(settings, listed["corporation"].head(3))
    later = later.assign(lastmonth_activity=0, exited=1)
    generate_data.write_csv(later, settings.input_folder / "batch4.csv")
    ingest(settings)
    calllist.rebuild_call_list(settings)  # as a cycle does after any ingestion
    return settings


def read_rows(settings: Settings, clients: pd.Series) -> pd.DataFrame:
    master = pd.read_csv(settings.finaldata_path, dtype={"corporation": "str"})
    return master[master["corporation"].isin(clients)].drop_duplicates("corporation", keep="last")


@pytest.fixture(scope="module")
def site(_deployed_template, tmp_path_factory) -> Settings:
    """Two releases, their reports, cycles and a later batch; its tests only read it."""
    return build_site(_deployed_template, tmp_path_factory.mktemp("site") / "workspace")


@pytest.fixture
def own_site(site, tmp_path) -> Settings:
    """A copy of the site for a test that changes it."""
    root = tmp_path / "workspace"
    shutil.copytree(site.base_dir, root)
    return load_settings(root / "config.json")


@pytest.fixture
def client(make_client, site):
    return make_client(site)


def row_text(response, client_id: str) -> str:
    """The text of the table row that links to one client."""
    page = response.get_data(as_text=True)
    link = f'<a href="/clients/{quote(client_id)}">'
    row = next(row for row in page.split("<tr") if link in row)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", "<tr" + row))).strip()


def risk_list(settings: Settings) -> pd.DataFrame:
    return pd.read_csv(settings.risk_scores_path, dtype={"corporation": "str"})


def write_risk_list(settings: Settings, frame: pd.DataFrame) -> None:
    atomicio.write_with(settings.risk_scores_path, lambda path: frame.to_csv(path, index=False))


# --- States: nothing deployed, no list yet ------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/clients/abc", "/model"])
def test_page_before_any_deployment_says_to_run_fullprocess(make_client, workspace, path):
    response = make_client(workspace).get(path)

    assert_refused(response, 503, "Nothing is deployed yet", "python fullprocess.py")


@pytest.mark.parametrize("path", ["/", "/clients/abc"])
def test_list_pages_before_reporting_say_to_run_reporting(make_client, deployed, path):
    response = make_client(deployed).get(path)

    assert_refused(response, 503, "python reporting.py")


def test_model_page_before_reporting_shows_the_release_deployed_by_hand(make_client, deployed):
    response = make_client(deployed).get("/model")

    assert response.status_code == 200
    page = text_of(response)
    assert deployment.current_release(deployed).version in page
    assert "Deployed by hand with deployment.py" in page
    assert "No diagnostics recorded yet" in page


def test_model_page_says_which_release_the_confusion_matrix_was_drawn_for(make_client, reported):
    from scoring import score
    from training import train

    drawn_for = deployment.current_release(reported).version
    # A new release is deployed by hand; no report is made for it yet.
    train(reported)
    score(reported)
    deployment.deploy(reported)

    page = text_of(make_client(reported).get("/model"))

    assert f"which was made for release {drawn_for}" in page


@pytest.mark.parametrize(
    "path", ["/riskscores.csv", "/model/report.pdf", "/model/confusionmatrix.png"]
)
def test_download_before_reporting_is_503_naming_reporting_py(make_client, deployed, path):
    response = make_client(deployed).get(path)

    assert_refused(response, 503, "reporting.py")


# --- The call list ------------------------------------------------------------------------------


def test_call_list_names_the_release_the_time_and_the_number_of_clients(client, site):
    listed = calllist.latest_list(site)

    page = text_of(client.get("/"))

    assert f"Made by release {listed['model_version']}" in page
    assert f"{listed['ranked']:,} current clients ranked" in page
    assert f"{listed['left_not_ranked']:,} clients who have already left are not on it" in page
    assert re.search(r"on \d{4}-\d\d-\d\d \d\d:\d\d UTC", page)


def test_call_list_says_how_an_earlier_list_did(client, site):
    record = calllist.latest_track_record(site)

    page = text_of(client.get("/"))

    assert f"{record['top_left']} left ({record['precision']:.0%})" in page
    assert f"against {record['leaver_share']:.0%} of all the clients it ranked" in page


def test_first_page_is_the_top_group_highest_risk_first(client, site):
    top_n = site.diagnostics.risk_top_n
    listed = risk_list(site)

    html = client.get("/").get_data(as_text=True)

    shown = re.findall(LISTED, html)
    assert shown == listed["corporation"].head(top_n).tolist()
    assert f"{listed['probability'][0]:.1%}" in html


def test_pages_go_through_the_whole_list(client, site):
    listed = risk_list(site)
    top_n = site.diagnostics.risk_top_n
    last_page = -(-len(listed) // top_n)

    html = client.get(f"/?page={last_page}").get_data(as_text=True)

    shown = re.findall(LISTED, html)
    assert shown == listed["corporation"].iloc[(last_page - 1) * top_n:].tolist()
    assert f"Page {last_page} of {last_page}" in text_of(client.get(f"/?page={last_page}"))


def test_a_page_past_the_end_shows_the_last(client, site):
    last_page = -(-len(risk_list(site)) // site.diagnostics.risk_top_n)

    assert text_of(client.get("/?page=99999")) == text_of(client.get(f"/?page={last_page}"))


@pytest.mark.parametrize("page", ["0", "two", "-1"])
def test_page_that_is_not_a_whole_number_is_400_saying_so(client, page):
    response = client.get(f"/?page={page}")

    assert_refused(response, 400, "page must be a whole number")


def test_search_by_a_whole_id_opens_the_client(client, site):
    some_client = risk_list(site)["corporation"][7]

    response = client.get("/", query_string={"q": f" {some_client} "})

    assert response.status_code == 302
    assert urlsplit(response.location).path == f"/clients/{some_client}"


def test_search_by_the_start_of_an_id_lists_the_matches_highest_risk_first(client, site):
    listed = risk_list(site)
    prefix = listed["corporation"][0][:2]

    html = client.get("/", query_string={"q": prefix}).get_data(as_text=True)

    shown = re.findall(LISTED, html)
    assert shown == [c for c in listed["corporation"] if c.startswith(prefix)][:len(shown)]
    assert shown


def test_search_without_a_match_says_so(client):
    assert "No client id starts with “zzzzzzzzz”" in text_of(client.get("/?q=zzzzzzzzz"))


def test_csv_download_is_production_risk_list_byte_for_byte(client, site):
    with client.get("/riskscores.csv") as response:
        assert response.status_code == 200
        assert response.mimetype == "text/csv"
        assert response.headers["Content-Disposition"] == "attachment; filename=riskscores.csv"
        assert response.data == site.risk_scores_path.read_bytes()


def test_each_client_shows_its_reasons_and_what_changed_as_the_list_words_them(client, site):
    listed = calllist.read_list(site.risk_scores_path, site.schema, rows=100)
    response = client.get("/")

    for row in listed.itertuples():
        text = row_text(response, row.corporation)
        assert all(reason in text for reason in (row.reason_1, row.reason_2, row.reason_3))
        assert row.change in text
        if not pd.isna(row.rank_before) and row.change != "unchanged":
            assert f"(was {row.rank_before})" in text


def test_columns_a_later_list_adds_are_shown_as_they_are(make_client, own_site):
    write_risk_list(own_site, risk_list(own_site).assign(account_manager="Ada"))
    client = make_client(own_site)
    first = risk_list(own_site)["corporation"][0]

    assert "account_manager" in text_of(client.get("/"))
    assert "account_manager Ada" in text_of(client.get(f"/clients/{first}"))


def test_list_without_reasons_or_changes_shows_what_it_has(make_client, own_site):
    bare = risk_list(own_site)[["rank", "corporation", "probability", "predicted_exited",
                                "model_version"]]
    write_risk_list(own_site, bare)
    client = make_client(own_site)

    list_page = text_of(client.get("/"))
    client_page = text_of(client.get(f"/clients/{bare['corporation'][0]}"))

    assert "Reasons" not in list_page and "Change since" not in list_page
    assert f"ranking {len(bare):,} clients" in list_page
    assert "This risk list carries no reasons" in client_page


def test_list_made_by_an_earlier_release_says_to_report_again(make_client, own_site):
    deployment.rollback(own_site)

    page = text_of(make_client(own_site).get("/"))

    assert f"Release {deployment.current_release(own_site).version} is served now" in page
    assert "python reporting.py" in page


def test_a_replaced_list_is_read_again_and_an_unchanged_one_is_not(make_client, own_site, monkeypatch):
    built = []
    index = pages.RiskList
    monkeypatch.setattr(pages, "RiskList", lambda *args: built.append(1) or index(*args))
    client = make_client(own_site)
    client.get("/")
    client.get("/?page=2")
    listed = risk_list(own_site)

    write_risk_list(own_site, listed.head(10))
    after = text_of(client.get("/"))

    assert len(built) == 2
    assert "ranking 10 clients" in after



# --- One client ---------------------------------------------------------------------------------


def test_client_page_shows_rank_risk_and_the_typical_client(client, site):
    listed = risk_list(site)
    row = listed.iloc[4]
    statistics = diagnostics.latest_diagnostics(site)["summary_statistics"]

    page = text_of(client.get(f"/clients/{row['corporation']}"))

    assert f"Rank 5 of {len(listed):,}" in page
    assert f"{row['probability']:.1%}" in page
    median = statistics["number_of_employees"]["median"]
    assert "number_of_employees" in page and pages.number(median) in page


def test_client_page_shows_its_rank_in_each_list_top_group(client, site):
    lists = records.query(site.records_path, "SELECT time, top_clients FROM call_lists ORDER BY id")
    tops = [json.loads(listed["top_clients"]) for listed in lists]
    in_all = next(c for c in tops[-1] if all(c in top for top in tops))

    page = text_of(client.get(f"/clients/{in_all}"))

    for top in tops:
        assert f"rank {top.index(in_all) + 1} of 100" in page


def test_client_who_left_after_a_list_shows_that_outcome_and_is_off_the_new_list(client, site):
    lists = records.query(site.records_path, "SELECT time, top_clients FROM call_lists ORDER BY id")
    left = json.loads(lists[-2]["top_clients"])[0]  # batch4 brought its outcome: it left

    page = text_of(client.get(f"/clients/{left}"))

    assert "not on the current risk list" in page
    assert "which had this client at rank 1" in page
    assert "says the client left" in page


def test_client_without_a_later_outcome_says_none_arrived(client, site):
    listed = risk_list(site)["corporation"][10]

    assert "No labeled batch has brought this client's outcome" in text_of(
        client.get(f"/clients/{listed}")
    )


def test_unknown_client_is_a_404_page(client):
    response = client.get("/clients/nobody-of-that-name")

    assert_refused(response, 404, "No client 'nobody-of-that-name'")


# --- The model ----------------------------------------------------------------------------------


def test_model_page_says_why_the_served_release_was_deployed_with_its_numbers(client, site):
    cycle = records.query(
        site.records_path, "SELECT * FROM cycles WHERE decision = 'drift-redeployed'"
    )[0]
    details = json.loads(cycle["details"])

    page = text_of(client.get("/model"))

    assert pages.DECISIONS["drift-redeployed"] in page
    assert cycle["message"] in page
    assert f"{details['drift']['numbers']['new_f1']:.3f}" in page
    assert "since the change chosen" in page
    assert details["deploy"]["reason"] in page


def test_model_page_shows_f1_with_its_interval_and_what_it_was_measured_on(client, site):
    version = deployment.current_release(site).version
    scores = records.query(
        site.records_path,
        "SELECT * FROM scores WHERE model_version = ? AND purpose IN ('test', 'drift-holdout')",
        (version,),
    )

    page = text_of(client.get("/model"))

    for score in scores:
        assert f"{score['f1']:.3f} ({score['f1_low']:.3f}–{score['f1_high']:.3f})" in page
        assert f"{score['roc_auc']:.3f}" in page
    assert "testdata/testdata.csv" in page
    assert "held-out rows of the newest batch" in page


def test_model_page_shows_drift_per_feature_cycles_and_releases_with_rollback_hints(client, site):
    drift = diagnostics.latest_diagnostics(site)["data_drift"]
    releases = deployment.list_releases(site)
    cycles = records.query(site.records_path, "SELECT decision FROM cycles")

    page = text_of(client.get("/model"))

    for feature in drift["features"]:
        assert f"{feature['feature']} {feature['test']}" in page
    assert [c["decision"] for c in cycles] == ["drift-redeployed"]
    assert "drift-redeployed ok" in page
    earlier = next(r for r in releases if not r.is_current)
    assert f"python deployment.py --rollback {earlier.version}" in page


def test_model_page_draws_trends_as_svg_with_their_numbers_in_tables(client):
    page = client.get("/model").get_data(as_text=True)

    assert page.count('<svg class="plot"') == 3
    assert "F1 at deployment, by release" in page
    assert "drift-check" in page and "drift-holdout" in page
    assert "Track record of the lists" in page


def test_model_page_shows_each_list_track_record(client, site):
    record = calllist.latest_track_record(site)

    page = text_of(client.get("/model"))

    assert (
        f"{record['top_known']} {record['top_left']} {record['precision']:.2f} "
        f"({record['precision_low']:.2f}–{record['precision_high']:.2f})"
    ) in page


def test_model_page_links_the_report_and_the_confusion_matrix(client, site):
    page = client.get("/model").get_data(as_text=True)

    assert 'href="/model/report.pdf"' in page and 'src="/model/confusionmatrix.png"' in page
    with client.get("/model/report.pdf") as pdf, client.get("/model/confusionmatrix.png") as png:
        assert (pdf.status_code, pdf.mimetype) == (200, "application/pdf")
        assert pdf.data == site.report_path.read_bytes()
        assert (png.status_code, png.mimetype) == (200, "image/png")


# --- Escaping -----------------------------------------------------------------------------------


@pytest.fixture
def hostile(own_site) -> Settings:
    """A risk list whose top client's id is markup, with a comma and quotes."""
    listed = risk_list(own_site)
    listed.loc[0, "corporation"] = HOSTILE_ID
    write_risk_list(own_site, listed)
    return own_site


@pytest.mark.parametrize("path", ["/", f"/clients/{quote(HOSTILE_ID)}", "/?q=%3Cscr"])
def test_hostile_client_id_is_shown_as_text_never_as_markup(make_client, hostile, path):
    response = make_client(hostile).get(path)

    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;,&#39;&amp;" in html


def test_search_for_a_hostile_id_redirects_to_its_page_quoted(make_client, hostile):
    response = make_client(hostile).get("/", query_string={"q": HOSTILE_ID})

    assert response.status_code == 302
    assert "<" not in response.location and '"' not in response.location
    assert make_client(hostile).get(response.location).status_code == 200


def test_list_links_a_hostile_id_to_the_page_its_search_opens(make_client, hostile):
    client = make_client(hostile)
    location = client.get("/", query_string={"q": HOSTILE_ID}).location

    links = re.findall(LISTED, client.get("/").get_data(as_text=True))

    assert "/clients/" + unescape(links[0]) == location


def test_pages_forbid_inline_scripts_and_framing(client):
    policy = client.get("/").headers["Content-Security-Policy"]

    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy


# --- Reading only -------------------------------------------------------------------------------


def test_pages_change_no_file_and_no_record(client, site):
    before = workspace_state(site)
    first = risk_list(site)["corporation"][0]
    for path in ["/", "/?page=2", "/?q=a", f"/clients/{first}", "/model", "/riskscores.csv",
                 "/model/report.pdf", "/model/confusionmatrix.png", "/login"]:
        client.get(path).close()

    assert workspace_state(site) == before


# --- Login --------------------------------------------------------------------------------------


@pytest.fixture
def guarded(make_client, site, monkeypatch):
    """A client of the app started with a token."""
    monkeypatch.setenv("RISK_API_TOKEN", TOKEN)
    monkeypatch.setenv(pages.SECRET_KEY_ENV_VAR, "k" * 64)
    return make_client(site)


def log_in(client, token=TOKEN, next_path="/"):
    return client.post("/login", data={"token": token, "next": next_path})


@pytest.mark.parametrize("path", ["/", "/clients/abc", "/model", "/riskscores.csv"])
def test_with_a_token_a_page_sends_the_visitor_to_log_in_and_back(guarded, path):
    response = guarded.get(path)

    assert response.status_code == 302
    location = urlsplit(response.location)
    assert location.path == "/login"
    assert parse_qs(location.query)["next"] == [path]


def test_login_page_and_stylesheet_need_no_session(guarded):
    assert guarded.get("/login").status_code == 200
    with guarded.get("/static/style.css") as stylesheet:
        assert stylesheet.status_code == 200


def test_right_token_logs_in_with_a_strict_httponly_session_cookie(guarded):
    response = log_in(guarded, next_path="/model")

    assert response.status_code == 302 and response.location == "/model"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    assert guarded.get("/model").status_code == 200


def test_wrong_token_is_refused_and_keeps_the_visitor_out(guarded):
    response = log_in(guarded, token="guess")

    assert_refused(response, 403, "not the token")
    assert guarded.get("/").status_code == 302


def test_logout_ends_the_session(guarded):
    log_in(guarded)

    assert guarded.post("/logout").status_code == 302
    assert guarded.get("/").status_code == 302


@pytest.mark.parametrize("target", ["https://elsewhere.example/", "//elsewhere.example/x"])
def test_login_never_sends_the_visitor_to_another_site(guarded, target):
    assert log_in(guarded, next_path=target).location == "/"


def test_session_cookie_does_not_open_the_json_api(guarded):
    log_in(guarded)

    response = guarded.get("/risk")

    assert response.status_code == 401
    assert response.is_json


def test_bearer_token_opens_the_pages_too(guarded):
    response = guarded.get("/model", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200


def test_session_made_with_another_token_is_not_accepted(make_client, site, monkeypatch):
    monkeypatch.setenv(pages.SECRET_KEY_ENV_VAR, "k" * 64)
    monkeypatch.setenv("RISK_API_TOKEN", "the-old-token")
    old = make_client(site)
    log_in(old, token="the-old-token")
    cookie = old.get_cookie("risk_session")
    monkeypatch.setenv("RISK_API_TOKEN", TOKEN)
    new = make_client(site)
    new.set_cookie("risk_session", cookie.value)

    assert new.get("/").status_code == 302


# --- The session key ----------------------------------------------------------------------------


def test_session_key_is_made_once_readable_by_its_owner_only(own_site):
    first = pages.session_key(own_site)
    path = own_site.output_folder / pages.SECRET_KEY_FILE

    assert pages.session_key(own_site) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32


def test_session_key_from_the_environment_wins(own_site, monkeypatch):
    monkeypatch.setenv(pages.SECRET_KEY_ENV_VAR, "from-the-environment-" * 3)

    assert pages.session_key(own_site) == ("from-the-environment-" * 3).encode()
    assert not (own_site.output_folder / pages.SECRET_KEY_FILE).exists()


def test_session_key_file_others_can_read_is_refused(own_site):
    pages.session_key(own_site)
    os.chmod(own_site.output_folder / pages.SECRET_KEY_FILE, 0o644)

    with pytest.raises(pages.ConfigError, match="chmod 600"):
        pages.session_key(own_site)


# --- Reading the list's rows ----------------------------------------------------------------------


def test_rows_are_found_by_their_bytes_even_with_quoted_commas_and_line_breaks(tmp_path):
    frame = pd.DataFrame({
        "rank": [1, 2, 3],
        "corporation": ["plain", 'with "quotes", and a comma', "line\nbreak"],
        "probability": [0.9, 0.5, 0.1],
    })
    path = tmp_path / "riskscores.csv"
    frame.to_csv(path, index=False)

    listed = pages.RiskList(path, load_settings_like_default(tmp_path).schema)

    assert len(listed) == 3
    assert [row["corporation"] for row in listed.rows(0, 3)] == frame["corporation"].tolist()
    assert listed.positions_of("line\nbreak", exact=True).tolist() == [2]
    assert listed.positions_of("with", exact=False).tolist() == [1]
    assert np.array_equal(listed.positions_of("nobody", exact=False), [])


def load_settings_like_default(root: Path) -> Settings:
    (root / "sourcedata").mkdir(exist_ok=True)
    (root / "testdata").mkdir(exist_ok=True)
    return load_settings(write_config(root))


def test_model_page_shows_the_release_calibration_and_the_newest_roster_estimate(make_client, deployed):
    import generate_data
    from diagnostics import run_diagnostics
    from estimation import estimate_roster

    roster = generate_data.make_clients(300, seed=91, id_offset=950_000).drop(columns="exited")
    estimate = estimate_roster(deployed, roster, "roster.csv")
    run_diagnostics(deployed, dependencies=False)

    page = text_of(make_client(deployed).get("/model"))

    assert "expected calibration error" in page
    assert "Newest roster roster.csv (300 clients" in page
    assert f"estimated F1 {estimate.estimate.f1:.3f}" in page
