"""'Open TensorBoard' starts the real tensorboard on a log folder, answers on 127.0.0.1, and reuses it."""

from __future__ import annotations

import urllib.request

import pytest

from gui.tensorboard import TensorBoardError, TensorBoards


def test_tensorboard_serves_a_log_folder_and_is_reused(tmp_path):
    boards = TensorBoards()
    try:
        url = boards.url_for(tmp_path)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and b"TensorBoard" in response.read()
        assert boards.url_for(tmp_path) == url  # the same process, not a second one
    finally:
        boards.close()


def test_a_missing_log_folder_says_what_to_set(tmp_path):
    with pytest.raises(TensorBoardError, match="logging.logging_dir"):
        TensorBoards().url_for(tmp_path / "logs")
