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
