"""Package layout and import boundaries: engine never imports gradio/gui; gui never imports torch & co."""

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

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


# Modules the GUI imports inside its handlers (run in the GUI process when a button is pressed).
GUI_LAZY_IMPORTS = ("engine.data.doctor", "engine.config.importers.registry", "engine.data.project",
                    "engine.caption.edit", "engine.caption.registry", "engine.cache.latent_jobs", "engine.data.scan")


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
