"""How long the app takes to answer its first request, over a one-textbox Gradio app started the same way.

    .venv/bin/python bench/app_start.py [--runs 5] [--browser]

Each run starts both as fresh processes, alternating which goes first, and times from the process start until `GET /`
answers 200 (what a user waits for after `tools/start.sh`). The ratio per run is app / minimal; the median of the
per-run ratios is the figure (issue 17 aims for <= 1.10). It also prints the first page's weight (the components,
event handlers and bytes of its /config). With --browser, it also times Chromium from opening the page until the
app's header shows, against the minimal page, and for the app the first opening of each tab built on first open
(gui/tabs/first_open.py), in turn, until an element of its content shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from app_helpers import free_port, wait_for_http  # noqa: E402

MINIMAL = """
import gc
import sys
paused = sys.argv[2] == "paused"
if paused:
    gc.disable()
import gradio as gr
with gr.Blocks(analytics_enabled=False) as demo:
    gr.Markdown("# minimal", elem_id="app-header")
    gr.Textbox(label="text")
if paused:
    gc.freeze()
    gc.enable()
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), footer_links=[])
"""
# The minimal app as it is, and with the garbage collector paused during start-up as app.py pauses it: the first ratio
# is what a user waits over a bare Gradio app, the second what our own imports and page building add.
MINIMALS = {"minimal": "plain", "minimal-gc": "paused"}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# The app's tabs built when a page first opens them, and an element their content shows (Parameters first: the
# biggest, and the one a user opens before training).
DEFERRED_TABS = {"Parameters": "#validation-status", "Captioning": "#captioning-folder",
                 "Regularization": "#reg-parent", "Train": "#train-start", "Compare": "#compare-run",
                 "Tools": "#tools-inspect-file"}


def start(kind: str, port: int, work: Path) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    if kind == "app":
        command = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--runs-dir", str(work / "runs")]
    else:
        command = [sys.executable, "-c", MINIMAL, str(port), MINIMALS[kind]]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def page_weight(url: str) -> str:
    """The first page's components, event handlers and bytes (its /config, which the page loads first)."""
    with urllib.request.urlopen(url + "config", timeout=30) as response:
        body = response.read()
    config = json.loads(body)
    return f"{len(config['components'])} components, {len(config['dependencies'])} handlers, {len(body)} bytes"


def time_start(kind: str, work: Path, browser, weigh: bool = False) -> tuple[float, float | None, dict[str, float]]:
    """Seconds until the first 200; with a browser, seconds until the page's header shows and (app) until each
    deferred tab's content shows after its first click. `weigh` prints the first page's weight."""
    port = free_port()
    began = time.perf_counter()
    process = start(kind, port, work)
    url = f"http://127.0.0.1:{port}/"
    try:
        # Asked every 10 ms: the tests' 0.3 s made every figure a multiple of it (app 3.04 s, minimal 2.72 s).
        wait_for_http(url, process, timeout=180, interval=0.01)
        answered = time.perf_counter() - began
        if weigh:
            print(f"first page of the {kind}: {page_weight(url)}", flush=True)
        if browser is None:
            return answered, None, {}
        return answered, *page_load(browser, url, DEFERRED_TABS if kind == "app" else {})
    finally:
        process.terminate()
        process.wait(timeout=30)


def page_load(browser, url: str, tabs: dict[str, str]) -> tuple[float, dict[str, float]]:
    urllib.request.urlopen(url, timeout=30).read()  # the server's first page is built; time the browser alone
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        began = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("#app-header", timeout=120_000)
        loaded = time.perf_counter() - began
        opened = {}
        for name, selector in tabs.items():
            began = time.perf_counter()
            page.get_by_role("tab", name=name, exact=True).first.click()
            page.wait_for_selector(selector, timeout=120_000)
            opened[name] = time.perf_counter() - began
        return loaded, opened
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--browser", action="store_true", help="also time the page in Chromium")
    args = parser.parse_args()
    kinds = ("app", *MINIMALS)
    results: dict[str, list[tuple[float, float | None, dict[str, float]]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as folder, _browser(args.browser) as browser:
        for run in range(args.runs):
            for kind in (kinds if run % 2 == 0 else kinds[::-1]):
                results[kind].append(time_start(kind, Path(folder), browser, weigh=run == 0))
            app = results["app"][-1]
            line = f"run {run + 1}: first answer app {app[0]:.2f} s, " + ", ".join(
                f"{kind} {results[kind][-1][0]:.2f} s (ratio {app[0] / results[kind][-1][0]:.3f})" for kind in MINIMALS)
            if app[1] is not None:
                line += f"; page app {app[1]:.2f} s, minimal {results['minimal'][-1][1]:.2f} s"
            print(line, flush=True)
    report(results)


def report(results: dict[str, list[tuple[float, float | None, dict[str, float]]]]) -> None:
    for kind in MINIMALS:
        pairs = list(zip(results["app"], results[kind], strict=True))
        ratios = [app[0] / minimal[0] for app, minimal in pairs]
        app, minimal = statistics.median(a[0] for a, _ in pairs), statistics.median(m[0] for _, m in pairs)
        print(f"first answer over {kind}: median ratio {statistics.median(ratios):.3f} "
              f"(runs {', '.join(f'{r:.3f}' for r in ratios)}); app {app:.2f} s, {kind} {minimal:.2f} s")
    pairs = list(zip(results["app"], results["minimal"], strict=True))
    if pairs[0][0][1] is not None:
        print(f"page in Chromium: app {statistics.median(a[1] for a, _ in pairs):.2f} s, "
              f"minimal {statistics.median(m[1] for _, m in pairs):.2f} s (medians)")
        print("first open of a tab built on first open (medians): " + ", ".join(
            f"{name} {statistics.median(a[2][name] for a, _ in pairs):.2f} s" for name in DEFERRED_TABS))


@contextmanager
def _browser(wanted: bool) -> Iterator[Any]:
    """Chromium through Playwright when asked for, else None."""
    if not wanted:
        yield None
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


if __name__ == "__main__":
    main()
