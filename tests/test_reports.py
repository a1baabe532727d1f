"""The rendered reports as a reader sees them: each loads in a real headless Chromium without errors,
shows its figures, and shows no code (parameters, imports and plumbing stay in the executed notebooks).

Needs Debian's chromium and chromium-driver (`.ci/run` installs them); skipped, saying why, without them.
"""

from __future__ import annotations

import re
import shutil

import pytest

STAGES = ["01_eda", "02_leakage_audit", "03_training", "04_evaluation", "05_export"]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def look(driver, path):
    """Open a report; return (severe console messages, [(image loaded, width, height)], visible text)."""
    driver.get(path.as_uri())
    driver.execute_script("return document.readyState")
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.naturalWidth, "
        "i.naturalHeight]);")
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return severe, images, driver.find_element("tag name", "body").text


@pytest.mark.parametrize("name", STAGES)
def test_each_report_loads_without_errors_and_shows_its_figures(browser, smoke_run, name):
    severe, images, text = look(browser, smoke_run[0] / "reports" / f"{name}.html")
    assert severe == [], severe
    assert images and all(ok and w > 50 and h > 50 for ok, w, h in images), images
    assert text.splitlines()[0].startswith(name[:2])  # the title opens the report
    assert "parameter" in text  # the short table of the run's resolved parameters
    for code in ("params.collect", "from lib import", "io.commit", "stage_folder"):  # no code, no plumbing
        assert code not in text, code


def test_the_index_links_every_report(browser, smoke_run):
    severe, _, text = look(browser, smoke_run[0] / "reports" / "index.html")
    assert severe == [] and "Headline figures" in text
    links = browser.execute_script("return Array.from(document.links).map(a => a.getAttribute('href'));")
    assert [f"{s}.html" for s in STAGES] == links
    # every stage's wall time and peak memory to one decimal (a stage under 10 s once showed 5.9519)
    cells = browser.execute_script("return Array.from(document.querySelectorAll('table')[1].rows).slice(1, -1)"
                                   ".map(r => [r.cells[2].textContent, r.cells[3].textContent]);")
    assert len(cells) == len(STAGES) + 2 and all(re.fullmatch(r"\d+\.\d|–", c) for row in cells for c in row), cells
