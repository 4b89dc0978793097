"""The self-contained HTML heatmap renders in headless Chromium, offline, without errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from scoring_kit.analysis import heatmap, save_chart
from scoring_kit.context.model import ContextState, Node
from scoring_kit.scoring import MemoryMatrix

pytestmark = pytest.mark.browser

PROBE = "scoring-kit-console-probe"


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
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
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
