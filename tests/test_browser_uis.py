"""The project's other pages in real headless Chromium: the Dagster asset lineage (`make ui`), the
MLflow experiment of the tiny lineage (`make mlflow-ui`) and the ab_report HTML report. Each test
saves a screenshot to test-artifacts/<test name>.png (kept even when the test fails)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path

import pytest

from core.config import Paths
from tests.conftest import free_port
from tests.test_browser import browser, pytestmark  # noqa: F401  (fixture + chromium skip marker)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
BIN = Path(sys.executable).parent
LINEAGE_NAMES = ("raw_catalog", "embedding_model", "ann_index", "reranker_model")   # all must show
ASSET_GRAPH_QUERY = "{ assetNodes { assetKey { path } groupName dependencyKeys { path } } }"


@pytest.fixture
def page(browser, request):  # noqa: F811
    """The browser; its screenshot goes to test-artifacts/<test name>.png after the test."""
    yield browser
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"{request.node.name}.png"))


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


class Server:
    """A server command in its own process group, logging to a file; ready once `ready_url` answers."""

    def __init__(self, cmd: list, env: dict, log: Path, ready_url: str, timeout: float = 120):
        self.log, self.cmd = log, cmd
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else f"not ready in {timeout:.0f} s"
                self.stop()
                pytest.fail(f"{' '.join(map(str, cmd))}: {ready_url} {why}; log tail:\n{_tail(log)}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue


def wait_for_text(driver, names, timeout: float, what: str, log: Path, each=None) -> str:
    """Poll the page's visible text until it shows every name; fail listing the missing ones."""
    deadline = time.monotonic() + timeout
    while True:
        if each:
            each(driver)
        text = driver.execute_script("return document.body ? document.body.innerText : ''") or ""
        missing = [n for n in names if n not in text]
        if not missing:
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"{what} ({driver.current_url}) does not show {missing} after {timeout:.0f} s; "
                        f"page text: {text[:1500]!r}\nserver log tail:\n{_tail(log)}")
        time.sleep(0.5)


def graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(url + "/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        body = json.load(r)
    assert not body.get("errors"), f"GraphQL {query!r}: {body['errors']}"
    return body["data"]


def _skip_dialog(driver) -> None:
    from selenium.webdriver.common.by import By
    for b in driver.find_elements(By.XPATH, "//button[normalize-space(.)='Skip']"):
        if b.is_displayed():
            b.click()


def test_dagster_ui_shows_the_asset_lineage(tiny_lineage, page, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "orchestration" / "dagster.yaml", home / "dagster.yaml")   # as `make ui` does
    env = {**os.environ, "DAGSTER_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PAILITAO_PROFILE": "tiny", "PAILITAO_WORKDIR": str(tiny_lineage["workdir"]),
           "MLFLOW_TRACKING_URI": tiny_lineage["mlflow"]["tracking_uri"]}
    port, log = free_port(), tmp_path / "dagster.log"
    url = f"http://127.0.0.1:{port}"
    srv = Server([BIN / "dagster-webserver", "-m", "orchestration.definitions", "-h", "127.0.0.1", "-p", str(port)],
                 env, log, url + "/server_info")
    try:
        nodes = graphql(url, ASSET_GRAPH_QUERY)["assetNodes"]
        graphql(url, "mutation { setNuxSeen }")   # no "Join the Dagster community" dialog over the graph
        # The global lineage (/asset-groups) starts with every group collapsed: open them all by URL
        # (group ids are global@global:<group>, or <repo>@<location>:<group> behind a feature flag).
        groups = sorted({n["groupName"] for n in nodes})
        expanded = [f"global@global:{g}" for g in groups] + [f"__repository__@orchestration.definitions:{g}" for g in groups]
        page.set_window_size(1920, 1080)   # below ~1600 px wide the zoomed-to-fit graph drops node labels
        page.get(f"{url}/asset-groups?expanded={','.join(expanded)}")
        text = wait_for_text(page, LINEAGE_NAMES, 120, "the Dagster global asset lineage", log, _skip_dialog)
        _skip_dialog(page)
        assert "ab_report" in text, (
            "the Dagster asset graph has no ab_report node; assets in the Definitions: "
            + ", ".join(sorted("/".join(n["assetKey"]["path"]) for n in nodes)))
    finally:
        srv.stop()
    children: dict[str, list[str]] = {}
    for n in nodes:
        for dep in n["dependencyKeys"]:
            children.setdefault("/".join(dep["path"]), []).append("/".join(n["assetKey"]["path"]))
    seen, todo = {"raw_catalog"}, deque(["raw_catalog"])
    while todo:
        for child in children.get(todo.popleft(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    assert "ab_report" in seen, f"no dependency path raw_catalog -> ab_report; downstream of raw_catalog: {sorted(seen)}"


def test_mlflow_ui_shows_the_tiny_lineage_runs(tiny_lineage, page, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = tiny_lineage["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(tiny_lineage["mlflow"]["experiment"])
    assert exp is not None, f"no experiment {tiny_lineage['mlflow']['experiment']!r} in {uri}"
    names = sorted({r.info.run_name for r in client.search_runs([exp.experiment_id], max_results=200)})
    expected = [n for n in ("raw_catalog", "stage1_embedder", "embedding_model", "item_embeddings", "ann_index")
                if n in names] or names
    assert len(expected) >= 3, f"the tiny lineage logged too few runs: {names}"
    port, log = free_port(), tmp_path / "mlflow.log"
    url = f"http://127.0.0.1:{port}"
    srv = Server([BIN / "mlflow", "ui", "--backend-store-uri", uri, "--default-artifact-root",
                  (tmp_path / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                 {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}, log, url + "/health")
    try:
        page.get(f"{url}/#/experiments/{exp.experiment_id}/runs")   # bare /experiments/<id>: GenAI overview
        wait_for_text(page, expected[:3], 120, f"the MLflow experiment page of {exp.name!r}", log)
    finally:
        srv.stop()


REPORT_CHECKS = """
const imgs = Array.from(document.images);
const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => (i.alt || i.src).slice(0, 80));
const plots = imgs.filter(i => i.closest('figure') || /plot|curve|chart|diagram|distribution|figure/i
                          .test((i.alt || '') + ' ' + (i.className || '') + ' ' + (i.parentElement.className || '')));
const heading = Array.from(document.querySelectorAll('h1,h2,h3,h4,summary,caption'))
                     .find(h => /gallery/i.test(h.textContent));
let thumbs = 0;
if (heading) {
  const next = Array.from(document.querySelectorAll(heading.tagName)).find(
      h => heading.compareDocumentPosition(h) & Node.DOCUMENT_POSITION_FOLLOWING);
  thumbs = imgs.filter(i => i.src.startsWith('data:image/jpeg')
                            && (heading.compareDocumentPosition(i) & Node.DOCUMENT_POSITION_FOLLOWING)
                            && !(next && (next.compareDocumentPosition(i) & Node.DOCUMENT_POSITION_FOLLOWING))).length;
}
return {n: imgs.length, broken: broken, plots: plots.length, gallery: !!heading, thumbs: thumbs,
        height: document.documentElement.scrollHeight};
"""


def test_ab_report_html_renders_plots_and_gallery(tiny_lineage, page):
    from selenium.webdriver.support.ui import WebDriverWait

    report = Paths.from_params(tiny_lineage).asset("ab_report") / "report.html"
    assert report.is_file(), f"{report} does not exist: the tiny lineage has no ab_report asset output"
    page.get(report.resolve().as_uri())
    WebDriverWait(page, 60).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    facts = page.execute_script(REPORT_CHECKS)
    page.set_window_size(1200, min(max(900, facts["height"] + 100), 16000))   # the full page in the screenshot
    assert not facts["broken"], f"images that did not load: {facts['broken']}"
    assert facts["n"] >= 2 and facts["plots"] >= 1, f"expected plot images in the report: {facts}"
    assert facts["gallery"] and facts["thumbs"] >= 5, f"expected a Gallery with >= 5 JPEG thumbnails: {facts}"
