"""A process's start-up without the garbage collector: `python -m engine` and the GUI (app.py).

Start-up makes hundreds of thousands of objects that live as long as the process: the modules of torch, diffusers
and transformers (about 520,000 tracked objects), or Gradio's (about 300,000), then a model or the page. Python's
collector rescans the whole heap each time it has grown by a quarter, so start-up pays for many rescans of a heap
that is almost all alive and makes little garbage. Measured on the 2-core test machine: importing torch, diffusers
and transformers took 5.3 s with the collector and 4.1 s without (a tiny training run: 7.5 s -> 6.0 s); Gradio's
import and the page's build, 2.85 s and 2.2 s.

So the collector is off from the entry point until start-up is done. Then what start-up made is frozen (left out of
every later collection, which scans only what the work makes; the little garbage among it stays) and the collector
is back on. A command that never says it is done (one that loads no model) gets the collector back after
LONGEST_START_UP_S at the latest, so no long job runs without it.
"""

from __future__ import annotations

import gc
import threading

LONGEST_START_UP_S = 60.0
_lock = threading.Lock()
_paused = False


def pause_collector(longest_s: float = LONGEST_START_UP_S) -> None:
    """Called first thing by a process's entry point; start_up_done() ends the pause, at the latest after
    `longest_s` seconds."""
    global _paused
    with _lock:
        if _paused or not gc.isenabled():
            return
        gc.disable()
        _paused = True
    backstop = threading.Timer(longest_s, start_up_done)
    backstop.daemon = True
    backstop.start()


def start_up_done() -> None:
    """Freezes what start-up made and turns the collector back on.

    Called where the heavy part of start-up is over (the base model or a captioner loaded, the GUI's page built); the
    first call wins. Does nothing in a process whose entry point did not pause the collector: engine code run inside
    another program (a test, a notebook) leaves that program's collector alone.
    """
    global _paused
    with _lock:
        if not _paused:
            return
        _paused = False
        gc.freeze()
        gc.enable()
