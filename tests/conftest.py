"""Shared pytest configuration for Atelier's tests."""

import os

# Before any test module imports huggingface_hub / gradio, which read these once: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import fcntl  # noqa: E402
import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


# --- tiny models (tools/make_tiny_model.py) -------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the tiny test models and data once per session and return their paths.

    Keys: ``sd1``/``sd2``/``sdxl`` (diffusers folders), ``sd1_ckpt``/``sd2_ckpt``/``sdxl_ckpt`` (LDM single-file
    checkpoints), ``blip``, ``git``, ``wd14`` (folders), ``dataset``, ``dataset_img``, ``dataset_reg``.
    Set ``ATELIER_TINY_MODELS`` to a folder to keep the build between sessions (its stamps make reuse instant).
    """
    # tools/ is not a package, so load the builder from its file.
    script = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("atelier_make_tiny_model", script)
    assert spec is not None and spec.loader is not None, f"cannot load {script}"
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    # Under pytest-xdist every worker asks for them: build once into the run's shared temp folder (or the
    # ATELIER_TINY_MODELS folder), the other workers waiting on a lock and then finding the stamps.
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    out_dir = Path(os.environ.get("ATELIER_TINY_MODELS") or (shared or tmp_path_factory.mktemp("run")) / "tiny_models")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return builder.build_all(out_dir)


# --- test order: longest files first ----------------------------------------------------------------------------
# tools/test.sh runs two xdist workers with --dist loadfile: each file is one unit of work, handed to whichever
# worker is free, and the run ends when the last unit does. So the long files must start first and the many short
# ones fill in at the end. (xdist's own reordering, which tools/test.sh turns off, puts the files with the most
# tests first: it left the single-test browser runs of several minutes for the end, one worker running them alone.)
# The seconds come from tests/file_durations.json (tools/test_durations.py records them from a run); a file not
# recorded yet is estimated from its tests' marks, rough averages of a test of each kind on 2 cores.
FILE_DURATIONS = Path(__file__).with_name("file_durations.json")
_SECONDS_BY_MARK = (("browser", 25.0), ("slow", 6.0))
_SECONDS_UNMARKED = 0.1


def _estimated_seconds(item: pytest.Item) -> float:
    for mark, seconds in _SECONDS_BY_MARK:
        if item.get_closest_marker(mark) is not None:
            return seconds
    return _SECONDS_UNMARKED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the files by their expected time, longest first; each file's tests keep their order."""
    import json

    recorded = json.loads(FILE_DURATIONS.read_text(encoding="utf-8")) if FILE_DURATIONS.exists() else {}
    estimated: dict[Path, float] = {}
    for item in items:
        estimated[item.path] = estimated.get(item.path, 0.0) + _estimated_seconds(item)
    root = config.rootpath

    def seconds(path: Path) -> float:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        return recorded.get(name, estimated[path])

    cost = {path: seconds(path) for path in estimated}
    # Ties by name, so that every worker orders the same (xdist checks that the workers' collections match).
    items.sort(key=lambda item: (-cost[item.path], str(item.path)))
