"""Package layout and import boundaries: engine never imports gradio/gui; gui never imports torch & co., and from
the engine only an allow-list (the config, the run-directory contract, events, files and named light helpers)."""

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUI_FORBIDDEN = {"torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "onnxruntime"}
ENGINE_FORBIDDEN = {"gradio", "gui"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def offenders(folder: str, forbidden: set[str]) -> dict[str, set[str]]:
    found = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        bad = imported_modules(path) & forbidden
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


def test_engine_never_imports_gradio_or_gui():
    assert offenders("engine", ENGINE_FORBIDDEN) == {}


def test_gui_never_imports_heavy_ml_libraries():
    found = offenders("gui", GUI_FORBIDDEN)
    app = imported_modules(REPO / "app.py") & GUI_FORBIDDEN if (REPO / "app.py").exists() else set()
    assert found == {} and app == set()


# What the GUI may import from the engine; anything else (training, models, networks, commands) runs in engine
# processes. Whole packages: the config, and the run directory's contract (engine/rundir).
GUI_ENGINE_PACKAGES = ("engine.config", "engine.rundir")
# Single modules: the event vocabulary and file writing, which every side shares ...
GUI_ENGINE_SHARED = {"engine.events", "engine.files"}
# ... and named light helpers (no torch), exactly those the GUI uses.
GUI_ENGINE_HELPERS = {
    # images, datasets and their metadata, read without decoding a model
    "engine.data.images", "engine.data.project", "engine.data.scan", "engine.data.legacy", "engine.data.records",
    "engine.data.metadata", "engine.data.finetune_metadata",
    # the dataset doctor, and what a model file's header says
    "engine.data.doctor", "engine.data.doctor_models", "engine.data.model_kinds",
    # caption files and the captioner list
    "engine.caption.edit", "engine.caption.registry", "engine.caption.runner",
    # families' facts and where a model is (a file, a folder or a hub id)
    "engine.models.families", "engine.models.locations",
    # the engine tools' options, as their command lines declare them (the LoRA tools, class images, the latent
    # cache), and the one writer of those command lines from the declarations
    "engine.cli.lora_cmd", "engine.cli.class_images_cmd", "engine.cli.cache_cmd", "engine.cli.options",
    # the comparison grid: its command's options, and a run's checkpoints and validation losses
    "engine.cli.compare_cmd", "engine.compare.plan",
}


def engine_imports(path: Path) -> set[str]:
    """The engine modules a file imports (`from engine.data import project` is engine.data.project), anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "engine")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "engine":
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            names.update({name for name in submodules if _is_module(name)} or {node.module})
    return names


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def gui_allows(module: str) -> bool:
    return (module in GUI_ENGINE_SHARED | GUI_ENGINE_HELPERS
            or any(module == package or module.startswith(package + ".") for package in GUI_ENGINE_PACKAGES))


def gui_engine_imports() -> dict[str, set[str]]:
    """Engine module -> the GUI files importing it."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "gui").rglob("*.py")):
        for module in engine_imports(path):
            found.setdefault(module, set()).add(str(path.relative_to(REPO)))
    return found


def test_gui_imports_only_the_allowed_engine_modules():
    imported = gui_engine_imports()
    assert {module: files for module, files in imported.items() if not gui_allows(module)} == {}
    # The helpers are named one by one: one the GUI stopped using leaves the list.
    assert GUI_ENGINE_HELPERS - set(imported) == set()


def test_the_allow_list_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from engine.config.io import load_config\nfrom engine.rundir import layout\n"
                   "def f():\n    from engine.train.run import run_training\n    import engine.models.loading\n")
    assert engine_imports(bad) == {"engine.config.io", "engine.rundir.layout", "engine.train.run",
                                   "engine.models.loading"}
    assert [gui_allows(name) for name in sorted(engine_imports(bad))] == [True, False, True, False]


def test_the_boundary_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom torch import nn\ndef f():\n    import gradio as gr\n")
    assert imported_modules(bad) == {"os", "torch", "gradio"}


def test_importing_engine_config_stays_light():
    # The GUI imports engine.config; it must not drag torch & co. in behind the scenes.
    code = ("import sys, engine.config.io, engine.config.describe, engine.config.reference; "
            f"print(sorted(m for m in {sorted(GUI_FORBIDDEN)!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_packages_resolve_inside_the_repository():
    import engine
    import gui

    assert Path(engine.__file__).resolve().is_relative_to(REPO)
    assert Path(gui.__file__).resolve().is_relative_to(REPO)


def test_packages_are_declared_explicitly_in_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert set(include) == {"engine", "engine.*", "gui", "gui.*"}


def test_top_level_layout():
    required = {"pyproject.toml", "app.py", "gui", "engine", "presets", "tools", "tests", "README.md"}
    # NOTICE: licences; SECURITY.md: what the GUI exposes and how to run it safely
    allowed = required | {".ci", "bench", "docs", ".git", ".gitignore", ".venv", "NOTICE", "SECURITY.md"}
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    top = {line.split("/")[0] for line in tracked.splitlines()} | {p.name for p in REPO.iterdir() if p.name in required}
    assert required <= top
    assert top <= allowed, top - allowed


# Modules the GUI imports inside its handlers (run in the GUI process when a button is pressed, or when a page first
# opens a tab: gui/tabs/first_open.py).
GUI_LAZY_IMPORTS = ("engine.data.doctor", "engine.config.importers.registry", "engine.data.project",
                    "engine.caption.edit", "engine.caption.registry", "engine.cache.latent_jobs", "engine.data.scan",
                    *(f"gui.tabs.{tab}" for tab in ("captioning", "regularization", "parameters", "train", "compare",
                                                    "tools")))


@pytest.mark.slow
def test_the_built_app_and_its_handlers_load_no_heavy_ml_library(tmp_path):
    """The static check above sees one file at a time; this builds the whole app in a fresh interpreter and also
    imports what handlers load later, then looks at what actually got imported."""
    code = (
        "import importlib, json, sys\n"
        "from pathlib import Path\n"
        "from gui.app import AppOptions, build_app\n"
        f"build_app(AppOptions(runs_dir=Path({str(tmp_path)!r})))\n"
        f"for name in {GUI_LAZY_IMPORTS!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(GUI_FORBIDDEN)!r})))\n"
    )
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
