"""The run control file and the signal handlers, with real files and real signals."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine.rundir.control import COMMANDS, ControlChannel, control_path, send_command


def append_raw(run_dir, text):
    with control_path(run_dir).open("a", encoding="utf-8") as stream:
        stream.write(text)


def test_commands_sent_are_polled_once_in_order(tmp_path):
    channel = ControlChannel(tmp_path)
    assert channel.poll() == []  # no file yet
    send_command(tmp_path, "save")
    send_command(tmp_path, "sample")
    assert control_path(tmp_path).read_text() == "save\nsample\n"
    assert channel.poll() == ["save", "sample"]
    assert channel.poll() == []
    send_command(tmp_path, "save")
    assert channel.poll() == ["save"]
    assert not channel.stop_requested


def test_stop_command_requests_the_stop(tmp_path):
    channel = ControlChannel(tmp_path)
    send_command(tmp_path, "stop")
    assert channel.poll() == ["stop"]
    assert channel.stop_requested and channel.stop_reason == "stop command"


def test_repeats_between_polls_count_once(tmp_path):
    channel = ControlChannel(tmp_path)
    for command in ("save", "save", "sample", "save"):
        send_command(tmp_path, command)
    assert channel.poll() == ["save", "sample"]


def test_send_rejects_unknown_commands(tmp_path):
    with pytest.raises(ValueError, match="stop, save, sample"):
        send_command(tmp_path, "explode")
    assert not control_path(tmp_path).exists()


def test_shell_style_lines_are_accepted(tmp_path):
    channel = ControlChannel(tmp_path)
    append_raw(tmp_path, "\n  Stop \r\n\nsample\n")  # `echo`, a Windows editor, stray blank lines
    assert channel.poll() == ["stop", "sample"]


def test_partial_last_line_waits_until_complete(tmp_path):
    channel = ControlChannel(tmp_path)
    append_raw(tmp_path, "save\nsto")
    assert channel.poll() == ["save"]
    assert channel.poll() == []
    append_raw(tmp_path, "p\n")
    assert channel.poll() == ["stop"]


def test_file_existing_before_the_run_is_not_replayed(tmp_path):
    send_command(tmp_path, "stop")
    send_command(tmp_path, "save")
    channel = ControlChannel(tmp_path)
    assert channel.poll() == [] and not channel.stop_requested
    send_command(tmp_path, "sample")
    assert channel.poll() == ["sample"]


def test_truncated_file_is_read_from_its_start(tmp_path):
    channel = ControlChannel(tmp_path)
    send_command(tmp_path, "save")
    send_command(tmp_path, "sample")
    assert channel.poll() == ["save", "sample"]
    control_path(tmp_path).write_text("stop\n")  # replaced by a shorter file
    assert channel.poll() == ["stop"]


def test_unknown_commands_are_ignored_and_reported_once(tmp_path):
    channel = ControlChannel(tmp_path)
    append_raw(tmp_path, "pause\nsave\npause\n")
    assert channel.poll() == ["save"]
    warnings = channel.pop_warnings()
    assert len(warnings) == 1 and "'pause'" in warnings[0]
    append_raw(tmp_path, "pause\nresume\n")
    assert channel.poll() == []
    warnings = channel.pop_warnings()
    assert len(warnings) == 1 and "'resume'" in warnings[0]
    assert channel.pop_warnings() == []


def test_appends_from_another_process_while_polling(tmp_path):
    channel = ControlChannel(tmp_path)
    code = ("import sys; from engine.rundir.control import send_command\n"
            "for command in sys.argv[2:]: send_command(sys.argv[1], command)\n")
    seen = []
    writers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), *COMMANDS]) for _ in range(3)]
    while any(writer.poll() is None for writer in writers):
        seen.append(channel.poll())
    seen.append(channel.poll())
    assert all(writer.returncode == 0 for writer in writers)
    lines = control_path(tmp_path).read_text().splitlines()
    assert sorted(lines) == sorted(list(COMMANDS) * 3)  # single O_APPEND writes: no torn or merged lines
    assert {command for batch in seen for command in batch} == set(COMMANDS)


def test_request_stop_keeps_the_first_reason(tmp_path):
    channel = ControlChannel(tmp_path)
    assert not channel.stop_requested and channel.stop_reason is None
    channel.request_stop("first")
    channel.request_stop("second")
    assert channel.stop_requested and channel.stop_reason == "first"


# --- signals -----------------------------------------------------------------------------------------------------


def deliver(number):
    """Send a signal to this process and give the interpreter the moment it needs to run the Python handler."""
    os.kill(os.getpid(), number)
    time.sleep(0.05)


@pytest.fixture
def channel_with_handlers(tmp_path):
    # The handlers of a fresh engine process, whatever an earlier test in this worker left (an in-process app or
    # browser may take SIGINT); put back afterwards.
    outer = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    before = {number: signal.getsignal(number) for number in outer}
    channel = ControlChannel(tmp_path)
    assert channel.install_signal_handlers()
    yield channel
    channel.restore_signal_handlers()
    assert {number: signal.getsignal(number) for number in before} == before
    for number, handler in outer.items():
        signal.signal(number, handler)


def test_sigterm_requests_a_graceful_stop(channel_with_handlers):
    deliver(signal.SIGTERM)
    assert channel_with_handlers.stop_requested and channel_with_handlers.stop_reason == "SIGTERM"
    deliver(signal.SIGTERM)  # still graceful: the process is alive to assert this
    assert channel_with_handlers.stop_reason == "SIGTERM"


def test_second_sigint_falls_back_to_the_previous_handler(channel_with_handlers):
    deliver(signal.SIGINT)
    assert channel_with_handlers.stop_reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # Python's default handler is back: a force-quit
        deliver(signal.SIGINT)


def test_handlers_are_left_alone_off_the_main_thread(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    results = []
    thread = threading.Thread(target=lambda: results.append(ControlChannel(tmp_path).install_signal_handlers()))
    thread.start()
    thread.join()
    assert results == [False] and signal.getsignal(signal.SIGTERM) is before
