"""The MLflow and Prefect UIs after a tiny pipeline, as a user sees them: `medplib ui` on the pipeline's state folder,
then its pages in headless Chromium (tests/serve/browser.py), asserting on visible text. Screenshots are kept in
test-artifacts/ (ui-mlflow-runs.png, ui-mlflow-version.png, ui-prefect-flow-run.png)."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from medplib.config import load_tracking_config
from medplib.registry import Registry, ui_version_url
from tests.serve.browser import ARTIFACTS, Browser

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_db_copy(dest: Path) -> str:
    """A copy of the session's Prefect test database (the harness's), for the UI's own server: it must not run its
    services on the database the other tests use."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    source = url.split(":///", 1)[1]
    with sqlite3.connect(source) as src, sqlite3.connect(dest) as dst:
        src.backup(dst)
    return f"sqlite+aiosqlite:///{dest}"


def _start_ui(home: Path, db_url: str, log: Path) -> tuple[subprocess.Popen, dict]:
    """`medplib ui --json` on free ports; returns the process and its JSON line (the URLs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env |= {"PREFECT_API_DATABASE_CONNECTION_URL": db_url, "MEDPLIB_HOME": str(home)}
    out = log.with_suffix(".json")
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "medplib_cli.main", "ui", "--home", str(home), "--json",
                                 "--prefect-port", str(_free_port()), "--mlflow-port", str(_free_port())],
                                env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:  # its JSON summary (indented, several lines) once both servers answer
        try:
            return proc, json.loads(out.read_text())
        except json.JSONDecodeError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError(f"`medplib ui` gave no URLs (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


TEXT = "(document.body ? document.body.innerText : '')"  # no body while a page loads


def _text(browser: Browser) -> str:
    return browser.evaluate(TEXT)


def _wait_text(browser: Browser, *needles: str, timeout: float = 90) -> str:
    """Wait until every needle is visible on the page; the page's text."""
    js = " && ".join(f"{TEXT}.includes({json.dumps(n)})" for n in needles)
    try:
        browser.wait_for(js, timeout)
    except TimeoutError:
        missing = [n for n in needles if n not in _text(browser)]
        raise AssertionError(f"not on the page after {timeout:.0f} s: {missing}\n---\n{_text(browser)[:3000]}") \
            from None
    return _text(browser)


def _click_text(browser: Browser, text: str) -> None:
    """Click the tab, button or link whose own text is `text`."""
    clicked = browser.evaluate(
        "(() => { const e = Array.from(document.querySelectorAll('button, a, [role=tab], li, span'))"
        f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)}); if (e) e.click(); return !!e; }})()")
    assert clicked, f"nothing to click named {text!r}"


def _subflow_id(prefect_api: str, name: str) -> str:
    body = json.dumps({"flow_runs": {"name": {"any_": [name]}}}).encode()
    req = urllib.request.Request(f"{prefect_api}/flow_runs/filter", data=body,
                                 headers={"content-type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read())
    assert len(runs) == 1, f"flow runs named {name}: {[r['name'] for r in runs]}"
    return runs[0]["id"]


def test_mlflow_and_prefect_uis_show_the_pipeline_runs_data_version_card_and_tasks(pipeline_runs, tmp_path: Path):
    home, _project, first, _second = pipeline_runs
    run_name, data_version = first["flow_run"], first["data_version"]
    version = first["evaluation"]["version"]
    gate = first["evaluation"]["primary_metric"]
    headline = f"{first['evaluation']['val_metrics'][gate]:.3f}"
    registry = Registry(load_tracking_config().resolved(home))
    champion = registry.champion_version()
    # the session's versions stayed below the gate's floor (tests/flows/test_pipeline_flow.py): version 1 is made
    # champion for this test alone, and the alias is put back as it was
    registry.client.set_registered_model_alias(registry.name, "champion", version)
    proc, urls = _start_ui(home.root, _prefect_db_copy(tmp_path / "prefect.db"), tmp_path / "ui.log")
    try:
        with Browser(1400, 1000) as browser:
            # MLflow: the URL `medplib ui` prints opens the experiment's training runs, each naming its data
            browser.send("Page.navigate", url=urls["mlflow_training_runs"])
            _wait_text(browser, "Model training", f"pipeline-{run_name}", f"medplib-data ({data_version[:12]}")
            unfolded = browser.evaluate(  # the `+` before the first pipeline run's name: its child runs
                "(() => { const a = Array.from(document.querySelectorAll('a'))"
                f".find(e => e.innerText.trim() === {json.dumps('pipeline-' + run_name)});"
                " const b = a && a.closest('[role=gridcell]').querySelector('button'); if (b) b.click(); return !!b; })()")
            assert unfolded, "no button unfolds the pipeline run"
            text = _wait_text(browser, "stage1-align", "stage2-vl_expert", "stage3-grounding_expert",
                              "stage4-moe")
            assert "GenAI overview" not in text and "Traces\n0" not in text
            browser.screenshot(ARTIFACTS / "ui-mlflow-runs.png")

            # the registered version's page: its card (data version, the gate's metric with its value) and aliases
            browser.send("Page.navigate", url=ui_version_url(urls["mlflow_ui"], registry.name, version))
            text = _wait_text(browser, f"{registry.name} version {version}", data_version, f"{gate} (gate)",
                              "Aliases")
            try:  # "Aliases\n:\n@ champion\n…" once the aliases are fetched ("Add" before)
                browser.wait_for(f"{TEXT}.split('Aliases')[1].slice(0, 60).includes('champion')", 60)
            except TimeoutError:
                raise AssertionError(f"no alias champion on version {version}'s page: "
                                     f"{_text(browser).split('Aliases', 1)[1][:60]!r}") from None
            assert headline in text.split(f"{gate} (gate)", 1)[1][:40], f"{gate} = {headline} not in the card"
            browser.screenshot(ARTIFACTS / "ui-mlflow-version.png")

            # Prefect: the pipeline's flow run, its subflows named after it, the train subflow's stage tasks
            browser.send("Page.navigate", url=f"{urls['prefect_ui']}/runs/flow-run/{first['flow_run_id']}")
            _wait_text(browser, run_name, "medplib-pipeline", "Subflow Runs")
            _click_text(browser, "Subflow Runs")
            _wait_text(browser, f"{run_name}-ingest", f"{run_name}-validate", f"{run_name}-train",
                       f"{run_name}-evaluate")
            browser.screenshot(ARTIFACTS / "ui-prefect-flow-run.png")
            train = _subflow_id(urls["prefect_api"], f"{run_name}-train")
            browser.send("Page.navigate", url=f"{urls['prefect_ui']}/runs/flow-run/{train}")
            _wait_text(browser, f"{run_name}-train", "Task Runs")
            _click_text(browser, "Task Runs")
            _wait_text(browser, *(f"train-stage-{s}" for s in (1, 2, 3, 4)))
            browser.screenshot(ARTIFACTS / "ui-prefect-train-tasks.png")
    finally:
        _stop(proc)
        if champion:
            registry.client.set_registered_model_alias(registry.name, "champion", champion)
        else:
            registry.client.delete_registered_model_alias(registry.name, "champion")
