"""'Try the demo' does not start a second run beside one that is going (issue 14: Start asks; the demo button
must not share the GPU silently either)."""

import os

import pytest

from engine.config.schema import RunConfig
from gui import runs
from gui.demo import DemoError, start_demo
from gui.runner import RunManager


def test_the_demo_refuses_while_a_run_is_going_and_names_it(tmp_path):
    manager = RunManager(tmp_path / "runs")
    going = manager.create_run(RunConfig(), "mine", base_dir=tmp_path)
    # A record whose process is alive (this test's own), as a running engine leaves it.
    runs.update_record(going.run_dir, pid=os.getpid(), proc_start=runs.process_start_ticks(os.getpid()),
                       status="running")
    assert [handle.name for handle in manager.running()] == [going.name]
    with pytest.raises(DemoError, match=f"`{going.name}` is running"):
        start_demo(manager)
    assert [handle.name for handle in manager.discover()] == [going.name]  # no demo run was made
    assert not (manager.runs_dir / "_demo").exists()  # nor its model built
