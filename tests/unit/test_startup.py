"""engine.startup: the garbage collector is off during a process's start-up and comes back, with start-up's objects
frozen, once the model is loaded. Each check runs in a fresh interpreter: the collector is process state."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_collector_is_off_until_start_up_is_done_and_start_up_is_then_frozen():
    out = run_python("""
        import gc
        from engine.startup import pause_collector, start_up_done
        seen = []
        gc.callbacks.append(lambda phase, info: phase == "stop" and seen.append(info["generation"]))
        pause_collector()
        keep = [[i] for i in range(300_000)]  # a growing heap, as imports make
        print("paused", gc.isenabled(), seen)
        frozen_before = gc.get_freeze_count()
        start_up_done()
        print("done", gc.isenabled(), gc.get_freeze_count() - frozen_before >= 300_000)
        start_up_done()  # a second call changes nothing
        print("again", gc.isenabled(), gc.get_freeze_count() - frozen_before >= 300_000)
        more = [[i] for i in range(10_000)]
        print("collecting", 0 in seen)
    """)
    assert out.splitlines() == ["paused False []", "done True True", "again True True", "collecting True"]


def test_a_start_up_that_never_says_done_gets_the_collector_back_after_the_longest_wait():
    out = run_python("""
        import gc, time
        from engine.startup import pause_collector
        pause_collector(longest_s=0.2)
        print(gc.isenabled())
        deadline = time.monotonic() + 30
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(gc.isenabled(), gc.get_freeze_count() > 0)
    """)
    assert out.splitlines() == ["False", "True True"]


def test_engine_code_in_another_program_leaves_its_collector_alone():
    out = run_python("""
        import gc
        from engine.startup import start_up_done
        gc.disable()  # the program's own choice
        start_up_done()
        print(gc.isenabled(), gc.get_freeze_count())
    """)
    assert out.strip() == "False 0"


def test_python_m_engine_defers_and_loading_the_model_ends_start_up(tiny_models):
    """The entry point pauses the collector (its first lines, run as `python -m engine` runs them) and load_model
    ends start-up."""
    out = run_python(f"""
        import gc, runpy, sys
        sys.argv = ["engine", "--version"]
        try:
            runpy.run_module("engine", run_name="__main__")
        except SystemExit:
            pass
        print("entry paused", not gc.isenabled())
        from engine.models import load_model
        load_model({str(tiny_models["sd1"])!r}, family="sd1")
        print("after load", gc.isenabled(), gc.get_freeze_count() > 0)
    """)
    assert out.splitlines()[-2:] == ["entry paused True", "after load True True"]
