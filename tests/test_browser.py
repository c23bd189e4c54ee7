"""The pages in a real browser: headless Chromium driven by Selenium, gunicorn on 127.0.0.1.

One server and one browser serve the whole module. Chromium and its driver come from the system's
packages (Debian's `chromium` and `chromium-driver`); where they are absent these tests skip, and
`.ci/run` installs them first so that CI always runs them. With RISK_SCREENSHOTS=docs/ the tests
also save a screenshot of each page there, for the README.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import diagnostics
from conftest import PROJECT_DIR, running_gunicorn
from test_pages import build_site, offline_index

CHROMIUM = Path("/usr/bin/chromium")  # where Debian's chromium package puts it
CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian's chromium-driver package
TOKEN = "browser-token-43a9"
WAIT_SECONDS = 30
DESKTOP, PHONE = (1200, 900), (390, 844)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Chromium and its driver from the system's packages "
    "(apt-get install chromium chromium-driver; .ci/run does it)",
)


@pytest.fixture(scope="module")
def site(_deployed_template, tmp_path_factory):
    """The same workspace with a history as test_pages.py's."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(diagnostics, "ask_index", offline_index)
        return build_site(_deployed_template, tmp_path_factory.mktemp("site") / "workspace")


@pytest.fixture(scope="module")
def server(site, tmp_path_factory):
    """gunicorn serving the site with a token, as production does; its URL."""
    log_path = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    with running_gunicorn(
        site, log_path, set_env={"RISK_API_TOKEN": TOKEN}, drop_env=["RISK_SECRET_KEY"]
    ) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(tmp_path_factory, downloads):
    """Headless Chromium with a fresh profile; Selenium is given the driver, never fetches one."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={tmp_path_factory.mktemp('profile')}",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ]:
        options.add_argument(argument)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False,
    })
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not go looking online
        driver = webdriver.Chrome(
            options=options, service=Service(executable_path=str(CHROMEDRIVER))
        )
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, name: str) -> None:
    """Save what the browser shows as docs/<name>.png, when RISK_SCREENSHOTS names a folder."""
    folder = os.environ.get("RISK_SCREENSHOTS")
    if not folder:
        return
    path = PROJECT_DIR / folder / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))


def heading(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.TAG_NAME, "h1").text


def wait_for(driver: webdriver.Chrome, condition) -> object:
    # While a page is replaced by the next one, an element just found can go stale: look again.
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    return WebDriverWait(
        driver, WAIT_SECONDS,
        ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
    ).until(lambda _: condition())


def open_page(driver: webdriver.Chrome, url: str) -> None:
    """Open a page, logging in with the token first if the site asks for it."""
    driver.get(url)
    if heading(driver) == "Log in":
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "form.login button").click()
        wait_for(driver, lambda: heading(driver) != "Log in")


def risk_list_clients(site) -> list[str]:
    return pd.read_csv(site.risk_scores_path, dtype={"corporation": "str"})["corporation"].tolist()


def test_manager_logs_in_finds_a_client_and_downloads_the_list(browser, server, site, downloads):
    wanted = risk_list_clients(site)[2]
    browser.set_window_size(*DESKTOP)

    browser.get(f"{server}/")
    assert heading(browser) == "Log in"
    screenshot(browser, "login")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()

    wait_for(browser, lambda: heading(browser) == "Call list")
    cookie = browser.get_cookie("risk_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""
    screenshot(browser, "calllist")

    browser.find_element(By.ID, "q").send_keys(wanted)
    browser.find_element(By.CSS_SELECTOR, "form.search button").click()
    wait_for(browser, lambda: heading(browser) == f"Client {wanted}")
    assert "Rank\n3 of" in browser.find_element(By.CSS_SELECTOR, "dl.facts").text
    screenshot(browser, "client")

    browser.find_element(By.LINK_TEXT, "Call list").click()
    browser.find_element(By.PARTIAL_LINK_TEXT, "Download the whole list").click()
    saved = downloads / "riskscores.csv"
    wait_for(browser, lambda: saved.is_file() and saved.stat().st_size > 0)
    assert saved.read_bytes() == site.risk_scores_path.read_bytes()


@pytest.mark.parametrize(
    "path", ["/", "/model", "/clients/{client}"], ids=["call-list", "model", "client"]
)
def test_page_fits_a_phone_screen_without_sideways_scrolling(browser, server, site, path):
    browser.set_window_size(*PHONE)
    open_page(browser, f"{server}{path.format(client=risk_list_clients(site)[0])}")

    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )

    assert overflow <= 0
    if path == "/":
        screenshot(browser, "calllist-phone")


def test_model_page_draws_its_charts(browser, server):
    browser.set_window_size(*DESKTOP)
    open_page(browser, f"{server}/model")

    charts = browser.find_elements(By.CSS_SELECTOR, "svg.plot")

    assert len(charts) == 3
    assert all(chart.size["width"] > 200 for chart in charts)
    screenshot(browser, "model")
