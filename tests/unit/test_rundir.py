"""The run directory's contract (engine/rundir): the one event reader, reading whole files and tailing a file that
is still being appended, and the environment every engine process is started with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.events import EventWriter
from engine.rundir import launch, layout
from engine.rundir.event_reader import EventTail, read_events, tail_events

REPO = Path(__file__).resolve().parents[2]


def line(**event) -> bytes:
    return (json.dumps(event) + "\n").encode()


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as stream:
        stream.write(data)


def test_tailing_returns_only_what_was_appended_since_the_last_look(tmp_path):
    path = layout.events_path(tmp_path)
    tail = EventTail(path)
    assert tail.read() == []  # no file yet
    with EventWriter(path) as writer:
        writer.emit("start", task="t", total=2)
        assert [event["type"] for event in tail.read()] == ["start"]
        assert tail.read() == []
        writer.emit("progress", task="t", done=1, total=2)
        writer.emit("done", task="t", ok=True)
        assert [event["type"] for event in tail.read()] == ["progress", "done"]
    assert tail.offset == path.stat().st_size
    assert [event["type"] for event in read_events(path)] == ["start", "progress", "done"]


def test_a_partial_last_line_waits_until_it_is_complete(tmp_path):
    path = tmp_path / layout.EVENTS_FILE
    first = line(type="start", task="t")
    second = line(type="done", task="t", ok=True)
    append(path, first + second[:10])
    events, offset = tail_events(path, 0)
    assert [event["type"] for event in events] == ["start"] and offset == len(first)
    assert read_events(path) == events  # a whole read skips it too
    assert tail_events(path, offset) == ([], offset)  # still half written: nothing new, the offset stays
    append(path, second[10:])
    events, offset = tail_events(path, offset)
    assert events == [json.loads(second)] and offset == len(first) + len(second)


def test_bad_lines_are_skipped_and_a_replaced_file_is_read_anew(tmp_path):
    path = tmp_path / "events.jsonl"
    append(path, line(type="start") + b"{cut short by a crash\n" + b"[1, 2]\n" + line(type="done", ok=True))
    assert [event["type"] for event in read_events(path)] == ["start", "done"]
    tail = EventTail(path)
    tail.read()
    path.write_bytes(line(type="warning", message="new file"))  # shorter than what was read: another file
    assert [event["message"] for event in tail.read()] == ["new file"]


def test_the_run_directory_names_its_files(tmp_path):
    assert layout.config_path(tmp_path) == tmp_path / "config.toml"
    assert layout.events_path(tmp_path) == tmp_path / "events.jsonl"
    assert layout.train_log_path(tmp_path) == tmp_path / "train.log"


def test_engine_processes_find_this_engine_and_write_unbuffered():
    env = launch.engine_environment({"PATH": "/bin", "PYTHONPATH": "/elsewhere"}, EXTRA="1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["EXTRA"] == "1" and env["PATH"] == "/bin"
    assert launch.engine_environment({})["PYTHONPATH"] == str(REPO)
    assert launch.engine_command(["lora", "inspect", "x"], python="py") == ["py", "-m", "engine", "lora", "inspect",
                                                                            "x"]


def test_the_contract_loads_no_heavy_library():
    # The GUI imports the whole package; the control module runs before anything heavy at a run's start.
    code = ("import sys, engine.rundir.control, engine.rundir.layout, engine.rundir.event_reader\n"
            "light = 'pydantic' not in sys.modules\n"
            "import engine.rundir.launch, engine.rundir.naming\n"
            "print(light, sorted(m for m in ('torch', 'accelerate', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True []"
