"""What a researcher sees, checked in a real browser (Debian's Chromium, offline).

1. The self-contained HTML heatmap renders in headless Chromium without errors.
2. Notebooks 01 and 02, executed once (nbclient, as ``jupyter nbconvert --execute`` runs
   them), opened in JupyterLab on 127.0.0.1: every chart output holds a rendered Vega view,
   no console error, no request leaves 127.0.0.1.
3. The click-driven explorer, live in JupyterLab: clicking a heatmap column rewrites the
   linked table from Python. Saves the README screenshots (docs/notebook01-*.png).
4. The ``jupyter nbconvert --to html`` export of notebook 01 renders its charts offline.

Chromium is driven by playwright's Python API with ``executable_path`` the system Chromium
(playwright's own browser download is never used). Skips, saying why, without Chromium or
playwright.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest

from scoring_kit.analysis import heatmap, save_chart
from scoring_kit.context.model import ContextState, Node
from scoring_kit.scoring import MemoryMatrix

# Executing the two notebooks takes 1-2 min each on a free machine (reused afterwards).
pytestmark = [pytest.mark.browser, pytest.mark.timeout(1800)]

PROBE = "scoring-kit-console-probe"
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: notebooks opened in Lab, with how many chart outputs (HTML charts + widgets) each shows
NOTEBOOK_CHARTS = {"01_memory_importance.ipynb": 3, "02_finetune_candidates.ipynb": 1}
#: executed copies, reused while newer than the notebook and every kit source (git-ignored)
EXECUTED = ROOT / "out" / "notebooks" / "executed"


def _chromium() -> str:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium not installed: apt-get install chromium (Debian) to run this test")


def _inputs() -> tuple[MemoryMatrix, ContextState]:
    mem = [Node("memory", (10 + i,), text=f"note {i}", key=f"k{i}", role="system")
           for i in range(3)]
    conv = (
        *mem,
        Node("user", (1, 20, 2), text="q1"),
        Node("assistant", (1, 21, 2), children=(Node("text", (21,), text="a1"),)),
        Node("user", (1, 22, 2), text="q2"),
        Node("assistant", (1, 23, 2), children=(Node("text", (23,), text="a2 <b>&</b>"),)),
    )
    ctx = ContextState(system=(Node("system", (1, 5, 2), text="sys"),), conversation=conv)
    matrix = MemoryMatrix(
        keys=["k0", "k1", "k2"],
        entries=np.array([4, 6]),
        baseline=np.array([-1.0, -2.0]),
        without=np.array([[-1.5, -2.1], [np.nan, np.nan], [-1.0, -4.0]]),
        errors=[None, "boom: </script><script>alert(1)</script>", None],
    )
    return matrix, ctx


def test_html_heatmap_renders_in_headless_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    matrix, ctx = _inputs()
    page = save_chart(heatmap(matrix, ctx, interactive=True), tmp_path / "heatmap.html")
    html = page.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html), "the page must not load scripts"
    # A copy with one console line appended: proves console output reaches our log, so
    # "no errors" below cannot pass just because logging did not work.
    probe = tmp_path / "probe.html"
    head, sep, tail = html.rpartition("</body>")  # the last one: the JS bundle holds others
    assert sep
    probe.write_text(f'{head}<script>console.log("{PROBE}")</script>{sep}{tail}')
    profile = tmp_path / "profile"
    cmd = [
        browser,
        *CHROMIUM_ARGS,
        "--disable-quic",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    dom, log = proc.stdout, proc.stderr
    assert proc.returncode == 0, log[-2000:]
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert any(PROBE in line for line in console), f"console not captured:\n{log[-2000:]}"
    bad = [
        line for line in console
        if PROBE not in line
        and re.search(r"uncaught|error|warn|fail|refused|blocked", line, re.IGNORECASE)
    ]
    assert not bad, "\n".join(bad)
    # vega-embed drew the charts with the svg renderer: marks are in the DOM
    assert "<svg" in dom, dom[-2000:]
    rects = re.findall(r'<g class="mark-rect role-mark[^"]*"[^>]*>(.*?)</g>', dom, re.DOTALL)
    assert rects and sum(chunk.count("<path") for chunk in rects) >= 4, "no heatmap cells"
    assert 'class="mark-rect' in dom and "role-axis" in dom
    # both views of the vconcat rendered (heatmap cells and the linked bars)
    assert len(rects) >= 3


def test_two_notebook_charts_render_on_one_page(tmp_path: Path) -> None:
    """The renderer's fragments share a page (Altair's inline template fails the second
    with ``Identifier '…' has already been declared``)."""
    browser = _chromium()
    from scoring_kit.analysis import chart_html, memory_weights_chart

    matrix, ctx = _inputs()
    parts = [chart_html(heatmap(matrix, ctx, interactive=True).to_dict()),
             chart_html(memory_weights_chart(matrix, ctx).to_dict())]
    page = tmp_path / "two.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                    + "".join(parts) + f'<script>console.log("{PROBE}")</script></body></html>')
    cmd = [browser, *CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
           page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert any(PROBE in line for line in console), proc.stderr[-2000:]
    bad = [line for line in console if PROBE not in line]
    assert not bad, "\n".join(bad)
    charts = re.findall(r'<div id="sk-vis-[0-9a-f]+" class="scoring-kit-chart[^"]*"[^>]*>'
                        r'(.*?)</div>\s*<script', proc.stdout, re.DOTALL)
    assert len(charts) == 2 and all('class="marks"' in c for c in charts), proc.stdout[-1500:]


# ── notebooks in JupyterLab ───────────────────────────────────────


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed: pip install 'scoring_kit[dev]'")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path) -> dict[str, str]:
    """The test's own Jupyter dirs (trust database, Lab settings), our checkout first."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
    )
    return env


def _lab_settings(home: Path) -> None:
    """Render every cell (no windowing), and no news or update checks."""
    base = home / "settings" / "@jupyterlab"
    files = {
        base / "notebook-extension" / "tracker.jupyterlab-settings": {"windowingMode": "none"},
        base / "apputils-extension" / "notification.jupyterlab-settings": {
            "fetchNews": "false", "checkForUpdates": False},
    }
    for path, value in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def _fresh(executed: Path, src: Path) -> bool:
    """Whether ``executed`` is newer than ``src`` and every file of the kit."""
    if not executed.exists():
        return False
    newest = max(p.stat().st_mtime for p in [src, *(ROOT / "scoring_kit").rglob("*.py")])
    return executed.stat().st_mtime > newest


def _execute(src: Path, dst: Path, env: dict[str, str]) -> None:
    """Run ``src`` once with nbclient (widget state kept, as nbconvert does) into ``dst``."""
    import nbformat
    from nbclient import NotebookClient

    if _fresh(dst, src):
        return

    nb = nbformat.read(src, as_version=4)
    old = dict(os.environ)
    os.environ.update({k: env[k] for k in ("PYTHONPATH", "JUPYTER_DATA_DIR")})
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)


def _sign(path: Path, env: dict[str, str]) -> None:
    """``jupyter trust``: the notebook is one we ran ourselves."""
    subprocess.run([sys.executable, "-m", "jupyter", "trust", str(path)], env=env,
                   check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def _lab(root: Path, home: Path, env: dict[str, str]) -> Iterator[str]:
    port, token = _free_port(), secrets.token_hex(16)
    log = (home / "lab.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
         f"--port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False", "--allow-root",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"JupyterLab did not start:\n{(home / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.2)  # polling a port, not synchronising on a guess
        # ?reset: a fresh workspace per page (not the tabs an earlier page left open)
        yield f"{url}/lab/tree/{{}}?reset&token={token}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class _Watch:
    """Console errors, Vega warnings and off-machine requests of one page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        self.outside: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.route("**/*", self._route)

    def _console(self, msg: Any) -> None:
        text = msg.text
        if msg.type == "error" or (msg.type == "warning" and re.search(
                r"infinite extent|vega|WARN", text, re.IGNORECASE)):
            self.errors.append(f"{msg.type}: {text}")

    def _route(self, route: Any) -> None:
        url = route.request.url
        host = urlparse(url).hostname
        if url.startswith(("file:", "data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()


def _chart_views(page: Any) -> list[bool]:
    """Per chart output of the page: whether a Vega view (svg or canvas) is drawn in it."""
    return list(page.evaluate(
        """() => Array.from(document.querySelectorAll(
                 '.scoring-kit-chart, .jp-OutputArea-output .vega-embed'))
               .filter(el => !el.parentElement.closest('.scoring-kit-chart, .vega-embed'))
               .map(el => !!el.querySelector('svg.marks, canvas'))"""
    ))


@pytest.fixture(scope="module")
def browser_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    chromium = _chromium()
    sync_playwright = _playwright()
    home = tmp_path_factory.mktemp("jupyter")
    lab_root = tmp_path_factory.mktemp("lab")
    env = _env(home)
    _lab_settings(home)
    for name in NOTEBOOK_CHARTS:
        _execute(ROOT / "notebooks" / name, EXECUTED / name, env)
        shutil.copy2(EXECUTED / name, lab_root / name)
        _sign(lab_root / name, env)
    with sync_playwright() as pw, _lab(lab_root, home, env) as url:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield {"browser": browser, "url": url, "root": lab_root, "env": env}
        finally:
            browser.close()


def _open(session: dict[str, Any], name: str) -> tuple[Any, _Watch]:
    page = session["browser"].new_page(viewport={"width": 1500, "height": 1000})
    watch = _Watch(page)
    page.goto(session["url"].format(name))
    page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached", timeout=60_000)
    return page, watch


@pytest.mark.parametrize("name", list(NOTEBOOK_CHARTS))
def test_executed_notebook_charts_render_in_lab(browser_session: dict[str, Any],
                                                name: str) -> None:
    page, watch = _open(browser_session, name)
    want = NOTEBOOK_CHARTS[name]
    # widgets (progress bars, the explorer) are restored from the notebook's saved widget
    # state once Lab's widget manager has its kernel
    page.wait_for_function("() => document.body.innerText.includes('| Idle')", timeout=180_000)
    page.wait_for_function(
        f"""() => document.querySelectorAll(
                '.jp-OutputArea-output svg.marks, .jp-OutputArea-output canvas').length >= {want}""",
        timeout=90_000,
    )
    views = _chart_views(page)
    assert len(views) >= want and all(views), views
    # no loading bar or library warning in any output
    stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    texts = [t for t in stderr.all_inner_texts() if t.strip()]
    assert not texts, texts
    if name.startswith("01"):
        heat = page.locator(".scoring-kit-chart").first
        heat.scroll_into_view_if_needed()
        heat.screenshot(path=str(DOCS / "notebook01-heatmap.png"))
    assert not watch.errors, watch.errors
    assert not watch.outside, watch.outside
    page.close()


def test_heatmap_click_drives_the_linked_table(browser_session: dict[str, Any]) -> None:
    import nbformat

    matrix_file = ROOT / "out" / "notebooks" / "matrix.parquet"
    assert matrix_file.exists(), "notebook 01 saves its matrix there"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from scoring_kit.analysis import enable_notebook, heatmap_explorer\n"
        "from scoring_kit.scoring import MemoryMatrix\n"
        "enable_notebook()\n"
        f"explorer = heatmap_explorer(MemoryMatrix.load({str(matrix_file)!r}))\n"
        "explorer")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, browser_session["root"] / "explore.ipynb")
    page, watch = _open(browser_session, "explore.ipynb")
    # run the cell once the kernel is connected (Lab drops a run sent before that)
    page.wait_for_function("() => document.body.innerText.includes('| Idle')", timeout=180_000)
    page.locator(".jp-Cell .cm-content").first.click()
    page.keyboard.press("Shift+Enter")
    table = page.locator(".sk-leaned").first
    table.wait_for(timeout=120_000)
    page.wait_for_selector(".jp-OutputArea-output .vega-embed svg.marks", timeout=60_000)
    before = table.inner_text()
    assert "No response selected" in before
    # the response the matrix depends on most: click its column's top cell
    m = MemoryMatrix.load(matrix_file)
    j = int(np.nanargmax(m.response_scores))
    cells = page.locator(".vega-embed g.mark-rect.role-mark").first.locator("path")
    n_cells = cells.count()
    assert n_cells >= m.shape[1]
    cells.nth(j).click()  # cells are drawn memory by memory: the first row holds column j
    page.wait_for_function(
        "() => !document.querySelector('.sk-leaned').innerText.includes('No response selected')",
        timeout=30_000,
    )
    after = table.inner_text()
    assert f"Response {int(m.entries[j])}" in after
    # the table lists what that response leaned on, with the memory's text
    top_key = m.important_memories_for(int(m.entries[j]))[0][0]
    assert top_key in after and m.memory_texts[m.keys.index(top_key)][:40] in after
    out = page.locator(".jp-OutputArea-output").filter(has=page.locator(".sk-leaned")).first
    page.mouse.move(1, 1)  # no tooltip over the table
    page.wait_for_timeout(300)  # the tooltip's fade-out (a screenshot, not an assertion)
    out.screenshot(path=str(DOCS / "notebook01-linked-table.png"))
    assert not watch.errors, watch.errors
    assert not watch.outside, watch.outside
    page.close()


def test_nbconvert_html_export_renders_offline(browser_session: dict[str, Any],
                                               tmp_path: Path) -> None:
    src = browser_session["root"] / "01_memory_importance.ipynb"
    subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "html",
         # drops the saved widget state, whose viewer nbconvert would load from a CDN
         "--ClearMetadataPreprocessor.enabled=True",
         "--output-dir", str(tmp_path), str(src)],
        env=browser_session["env"], check=True, capture_output=True, timeout=120,
    )
    html = tmp_path / "01_memory_importance.html"
    page = browser_session["browser"].new_page(viewport={"width": 1500, "height": 1000})
    watch = _Watch(page)
    page.goto(html.as_uri())
    page.wait_for_function(
        "() => document.querySelectorAll('.scoring-kit-chart svg.marks').length >= 3",
        timeout=60_000,
    )
    views = _chart_views(page)
    assert len(views) >= 3 and all(views), views
    # nbconvert's own template (not a chart) asks cdnjs for require.js and MathJax; they
    # were blocked, the charts drew without them, and nothing else left the machine.
    template = [u for u in watch.outside if re.match(
        r"https://cdnjs\.cloudflare\.com/ajax/libs/(require\.js|mathjax)/", u)]
    assert watch.outside == template and len(template) <= 2, watch.outside
    failed = [e for e in watch.errors if "Failed to load resource: net::ERR_FAILED" in e]
    assert len(failed) == len(template)
    assert [e for e in watch.errors if e not in failed] == [], watch.errors
    page.close()
