"""Files that are not what a command expects end with exit 2, the file named and what to do, never a traceback:
a binary or non-UTF-8 config, a config or output folder that is a file, through every command that loads a config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG_COMMANDS = ["validate", "train", "doctor", "cache-latents"]


def engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def assert_refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, output
    return output


@pytest.mark.parametrize("command", [*CONFIG_COMMANDS, "import"])
@pytest.mark.parametrize("content", [bytes(range(256)) * 4, "[saving]\noutput_name = \"caf\xe9\"\n".encode("latin-1")],
                         ids=["binary", "latin-1"])
def test_a_config_that_is_not_utf8_text_is_refused_by_name(tmp_path, command, content):
    config = tmp_path / "run.toml"
    config.write_bytes(content)
    assert_refused(engine(command, str(config)), str(config), "UTF-8")


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_a_dataset_file_that_is_not_utf8_text_is_refused_by_name(tmp_path, command):
    (tmp_path / "data.toml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "run.toml").write_text('[dataset]\nconfig_file = "data.toml"\n')
    assert_refused(engine(command, str(tmp_path / "run.toml")), str(tmp_path / "data.toml"), "UTF-8")


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_a_config_path_that_is_a_folder_is_refused(tmp_path, command):
    assert_refused(engine(command, str(tmp_path)), str(tmp_path), "folder")


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("output_dir", ["taken", "taken/inside"], ids=["is-a-file", "under-a-file"])
def test_an_output_dir_that_is_a_file_is_refused_by_every_command(tmp_path, command, output_dir):
    (tmp_path / "taken").write_text("not a folder")
    (tmp_path / "run.toml").write_text(f'[saving]\noutput_dir = "{output_dir}"\n')
    output = assert_refused(engine(command, str(tmp_path / "run.toml")), "saving.output_dir",
                            str(tmp_path / "taken"), "choose another folder")
    assert "unexpected" not in output


def test_an_overridden_logging_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    (tmp_path / "run.toml").write_text("")
    assert_refused(engine("validate", str(tmp_path / "run.toml"), "--set", f"logging.logging_dir={tmp_path}/taken"),
                   "logging.logging_dir", str(tmp_path / "taken"))


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    (tmp_path / "run.toml").write_text("")
    assert_refused(engine("train", str(tmp_path / "run.toml"), "--run-dir", str(tmp_path / "taken")),
                   str(tmp_path / "taken"), "--run-dir")
    assert (tmp_path / "taken").read_text() == "not a folder"
