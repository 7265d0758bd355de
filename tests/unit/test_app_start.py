"""What keeps the app's start-up light (issue 17, bench/app_start.py): the page's handlers stay out of Gradio's API
docs, which Gradio otherwise builds into the first page on every start; app.py's concurrency default is set without
rebuilding Gradio's internal app; every tab but the first (Dataset) is built when a page opens it, not at start (the
browser tests of those tabs check that they work once opened)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_app_built_as_app_py_documents_no_endpoint_and_defers_all_but_the_first_tab(tmp_path):
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "sys.argv = ['app.py']\n"
        "import app\n"  # app.py's settings (environment) as a start from the command line has them
        "from gui.app import AppOptions, build_app\n"
        f"blocks = build_app(AppOptions(runs_dir=Path({str(tmp_path)!r})))\n"
        "info = blocks.get_api_info()\n"
        "functions, parts = blocks.fns.values(), blocks.blocks.values()\n"
        "print(json.dumps({'documented': [*info['named_endpoints'], *info['unnamed_endpoints']],\n"
        "                  'visibility': sorted({fn.api_visibility for fn in functions}),\n"
        "                  'handlers': sum(fn.fn is not None for fn in functions),\n"
        "                  'concurrency': blocks._queue.default_concurrency_limit,\n"
        "                  'ids': sorted(filter(None, (getattr(part, 'elem_id', None) for part in parts)))}))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "GRADIO_DEFAULT_CONCURRENCY_LIMIT"}
    env |= {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert built["documented"] == []
    # Undocumented handlers are still callable by the page (and by clients); "private" ones (Gradio's own, with no
    # function) stay as they were.
    assert set(built["visibility"]) <= {"undocumented", "private"}
    assert built["handlers"] > 20
    assert built["concurrency"] == 4
    # The first tab is there; the others wait for their first opening, each behind the box the page sets then.
    ids = set(built["ids"])
    assert {"app-header", "dataset-create"} <= ids
    deferred = ("captioning", "regularization", "parameters", "train", "compare", "tools")
    assert {f"opened-{tab}" for tab in deferred} <= ids
    assert not ids & {"preset-choice", "validation-status", "captioning-save", "reg-apply", "train-start",
                      "compare-run"}
    assert not [name for name in ids if name.startswith("tools-")]
