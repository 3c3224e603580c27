"""rankopt ui: the MLflow UI over a real study, checked in headless Chromium (Selenium).

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; the browser
test skips with the reason when one is missing, and fails instead under
``RANKOPT_REQUIRE_BROWSER=1`` (set by ``.ci/run``), so CI cannot pass without the UI tested.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rankopt.cli import app
from rankopt.tracking.ui import exposure_note, server_command, url
from rankopt.tracking.urls import sqlalchemy_url
from tiny_project_support import make_tiny_project

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REQUIRE_BROWSER = "RANKOPT_REQUIRE_BROWSER"  # "1": a missing browser fails the browser tests instead of skipping
SCREENSHOT_COPY = Path("/tmp/rankopt_ui.png")
def test_ui_refuses_a_folder_without_a_store(tmp_path):
    result = CliRunner().invoke(app, ["ui", "--out", str(tmp_path), "--port", "5999"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no MLflow store at") and len(result.stderr.strip().splitlines()) == 1


def test_ui_serves_locally_by_default_and_warns_when_exposed(tmp_path):
    (tmp_path / "mlflow.db").touch()
    command = server_command(tmp_path, port=5123)
    assert command[command.index("--host") + 1] == "127.0.0.1" and "--artifacts-destination" in command
    assert command[command.index("--backend-store-uri") + 1].startswith("sqlite:///")
    # issue 25: the plain postgresql:// URL tune takes, the UI takes too (with the driver installed here)
    pg = server_command(tmp_path, "postgresql://me@db:5432/mlflow", port=5123)
    assert pg[pg.index("--backend-store-uri") + 1] == sqlalchemy_url("postgresql://me@db:5432/mlflow")
    assert exposure_note("127.0.0.1") is None
    assert "no authentication" in exposure_note("0.0.0.0")
    assert url("0.0.0.0", 5123, "7") == "http://127.0.0.1:5123/#/experiments/7/runs?workflowType=machine_learning"
    assert url("127.0.0.1", 5123, "7", "abc") == (
        "http://127.0.0.1:5123/#/experiments/7/runs?workflowType=machine_learning"
        "&searchFilter=tags.mlflow.parentRunId%20%3D%20%27abc%27&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true")
    assert command[command.index("--registry-store-uri") + 1] == command[command.index("--backend-store-uri") + 1]


def test_a_missing_browser_skips_saying_why_or_fails_where_it_is_required(monkeypatch, tmp_path):
    import test_ui_browser

    monkeypatch.setattr(test_ui_browser, "CHROMEDRIVER", str(tmp_path / "chromedriver"))
    monkeypatch.delenv(REQUIRE_BROWSER, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium chromium-driver"):
        _browser()
    monkeypatch.setenv(REQUIRE_BROWSER, "1")  # .ci/run: the UI must be tested
    with pytest.raises(pytest.fail.Exception, match="missing: apt-get install"):  # chromium or its driver
        _browser()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"rankopt ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the MLflow UI did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop rankopt ui and everything it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:  # the server's workers share the group; none may outlive the test
        os.killpg(proc.pid, 0)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _browser():
    missing = _missing_browser()
    if missing:
        (pytest.fail if os.environ.get(REQUIRE_BROWSER) == "1" else pytest.skip)(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _missing_browser() -> str | None:
    """What the browser tests lack on this machine, and how to install it; None when nothing."""
    try:
        import selenium.webdriver  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            return f"{path} missing: apt-get install -y chromium chromium-driver (Debian/Ubuntu; needs {package})"
    return None


def _wait(driver, find, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: find(d) or False)


def _show_metric_columns(driver, names: list[str]) -> None:
    """Tick metrics in the runs table's 'Columns' menu (MLflow 3 shows none by default)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.find_element(By.XPATH, "//button[contains(., 'Columns')]").click()
    box = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "input[placeholder='Search columns']"))[0]
    for name in names:
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(name)
        option = f"//*[contains(@class, 'tree-title')]//*[text()='{name}']"
        _wait(driver, lambda d: d.find_elements(By.XPATH, option))[-1].click()
    box.send_keys(Keys.ESCAPE)


def test_ui_shows_every_trial_with_its_metric(tmp_path):
    """The link `rankopt ui` prints for a study lists its trials at once (no collapsed parent row to
    open), with their metrics; MLflow's start-up chatter is not printed."""
    from selenium.webdriver.common.by import By

    from rankopt.search.tuner import tune

    driver = _browser()  # skips (or fails, under RANKOPT_REQUIRE_BROWSER=1) before any work when there is none
    out = tmp_path / "runs"
    try:
        result = tune(str(make_tiny_project(tmp_path)), out=out)
        assert result.n_complete == 3
        port, log = _free_port(), tmp_path / "ui.log"
        with log.open("w") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "rankopt.cli", "ui", "--port", str(port), "--out", str(out)],
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_server(proc, port, log)
            printed = log.read_text()
            links = dict(re.findall(r"^ +(experiment \S+|study .+?): (http://\S+)$", printed, re.M))
            assert set(links) == {"experiment tiny", "study tiny, its 3 trials"}, printed
            for noise in ("Security middleware", "Registry store URI", "Deprecat", "INFO"):
                assert noise not in printed, printed
            driver.get(links["study tiny, its 3 trials"])
            names = [f"trial {t.number}" for t in result.study.trials]
            # every trial at once, before any click; the 'study tiny' parent row is not in the way
            rows = _wait(driver, lambda d: (found := [e for n in names for e in d.find_elements(
                By.XPATH, f"//a[.//span[text()='{n}']]") if e.is_displayed()]) and len(found) == len(names) and found)
            assert sorted(r.text for r in rows) == sorted(names)
            assert not [e for e in driver.find_elements(By.XPATH, "//a[.//span[text()='study tiny']]") if e.is_displayed()]
            for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
                close.click()  # the assistant side panel, when MLflow opens it
            _show_metric_columns(driver, ["final_metric", "eval_accuracy"])
            headers = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]") if h.is_displayed()]
            assert "final_metric" in headers and "eval_accuracy" in headers, headers
            cells = driver.find_elements(By.CSS_SELECTOR, "[role=gridcell][col-id*='final_metric']")
            shown = [float(c.text) for c in cells if re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", c.text)]
            for trial in result.study.trials:  # the UI rounds; each trial's value is there
                assert any(abs(v - trial.values[0]) < 1e-3 for v in shown), ([c.text for c in cells], trial.values)
            screenshot = tmp_path / "ui_screenshot.png"
            driver.save_screenshot(str(screenshot))
            shutil.copyfile(screenshot, SCREENSHOT_COPY)
            print(f"\nMLflow UI screenshot: {screenshot} (copy: {SCREENSHOT_COPY})")
        finally:
            _stop(proc)
        assert proc.poll() is not None
    finally:
        driver.quit()
