"""Atomic writes: whole files or nothing, with the user's normal permissions (not a temp file's private 0600)."""

import os
import stat

import pytest

from engine.files import atomic_output, atomic_write_text, default_file_mode, replace_folder


def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    target = tmp_path / "model.safetensors"
    atomic_write_text(target, "weights")
    assert stat.S_IMODE(target.stat().st_mode) == default_file_mode()
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(plain.stat().st_mode) == default_file_mode()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_replace_folder_swaps_a_complete_folder_in(tmp_path):
    old, new = tmp_path / "state", tmp_path / ".state.tmp"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    replace_folder(new, old)
    assert (old / "a").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["state"]
