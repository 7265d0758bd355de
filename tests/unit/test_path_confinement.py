"""Every GUI path entry follows one rule with one message: a path must lie inside the home folder, the runs folder or
an --allow-path folder (symlinks resolved), and hidden folders below home or the runs folder (~/.ssh, ~/.config) are
refused unless an --allow-path folder holds them. Real folders, with HOME pointed at a temporary folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from engine.config.errors import ConfigError
from engine.config.io import deep_merge, default_config_dict
from engine.data.project import ProjectError
from gui import tools_commands
from gui.browse import BrowseError, FileRoots, PathNotAllowed, complete, list_folder, start_folder
from gui.presets import preset_path
from gui.runner import RunManager
from gui.train_start import config_paths, path_refusals, prepare_run
from gui.views import captioning as caption_view
from gui.views import dataset as dataset_view
from gui.views import regularization as reg_view
from gui.views import tools as tools_view
from gui.views.captioning import CaptionViewError

OUTSIDE = "is outside the folders this app may use (your home folder, the runs folder and --allow-path folders)"
HIDDEN = "is a hidden folder or file"


def images(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (64, 64), (index * 60, 90, 30)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("sks dog", encoding="utf-8")
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder with a project, a model, a runs folder and the hidden folders an attacker wants."""
    home = tmp_path / "home"
    images(home / "photos")
    images(home / "proj" / "img" / "5_sks dog")
    (home / "model.safetensors").write_bytes(b"weights")
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("secret")
    images(home / ".config" / "pics")
    (home / ".cache" / "models").mkdir(parents=True)
    (home / ".bashrc").write_text("# shell")
    (home / "runs").mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside home, in no root: what /etc or another user's files are to the app."""
    folder = images(tmp_path / "outside")
    (folder / "settings.toml").write_text("[training]\nmax_train_epochs = 1\n", encoding="utf-8")
    return folder


@pytest.fixture
def roots(home) -> FileRoots:
    """What app.py builds without --allow-path: home and the runs folder."""
    return FileRoots.from_paths(runs_dir=home / "runs")


# --- the rule and its message -------------------------------------------------------------------------------------


def test_the_rule_outside_hidden_symlinks_and_explicit_roots(home, outside, roots):
    assert roots.allows(home / "photos") and roots.allows(home / "not-yet" / "made")
    assert roots.allows("photos", base=home)  # a relative path starts from base
    for refused in (outside, home / ".ssh", home / ".ssh" / "id_rsa", home / ".bashrc", home / ".config" / "pics",
                    home / "runs" / ".tmp-1234", home / "photos" / ".." / ".ssh"):
        assert not roots.allows(refused), refused
    (home / "keys").symlink_to(home / ".ssh", target_is_directory=True)  # a plain name leading into a hidden folder
    assert not roots.allows(home / "keys" / "id_rsa")
    explicit = FileRoots.from_paths([home / ".cache" / "models"], runs_dir=home / "runs")
    assert explicit.allows(home / ".cache" / "models" / "sd15") and not explicit.allows(home / ".cache")
    assert not explicit.allows(home / ".ssh")


def test_one_message_names_the_field_the_path_and_the_flag(home, outside, roots):
    with pytest.raises(PathNotAllowed) as raised:
        roots.check(outside / "x", "Images folder")
    assert str(raised.value) == (f"Images folder: {outside / 'x'} {OUTSIDE}; start the app with --allow-path "
                                 f"{outside / 'x'} to allow it")
    with pytest.raises(PathNotAllowed) as raised:
        roots.check("~/.ssh/id_rsa", "Images folder")
    message = str(raised.value)
    assert message.startswith(f"Images folder: {home / '.ssh' / 'id_rsa'} {HIDDEN} ({home / '.ssh'})")
    assert message.endswith(f"start the app with --allow-path {home / '.ssh'} to allow it")
    assert roots.check("~/photos", "Images folder") == home / "photos"


def test_a_hub_id_is_not_a_path_but_a_local_model_is(home, outside, roots):
    assert roots.check_location("stabilityai/stable-diffusion-xl-base-1.0", "Base model") == \
        "stabilityai/stable-diffusion-xl-base-1.0"
    assert roots.check_location(str(home / "model.safetensors"), "Base model")
    for local in (str(outside / "0.png"), "~/.cache/models", str(outside)):
        with pytest.raises(PathNotAllowed, match="Base model: "):
            roots.check_location(local, "Base model")


# --- the file browser ---------------------------------------------------------------------------------------------


def test_hidden_folders_under_home_are_not_browsable_or_completable(home, roots):
    with pytest.raises(BrowseError, match=HIDDEN):
        list_folder(home / ".ssh", roots, kind="file", show_hidden=True)
    shown = [entry.name for entry in list_folder(home, roots, kind="file", show_hidden=True).entries]
    assert "photos" in shown and not any(name.startswith(".") for name in shown)
    assert complete("~/.", roots, kind="file") == []
    assert complete("~/.ssh/", roots, kind="file") == []
    folder, note = start_folder(str(home / ".ssh"), roots)
    assert folder == home and HIDDEN in note


def test_an_allowed_hidden_folder_is_browsable_and_offered(home):
    roots = FileRoots.from_paths([home / ".cache" / "models"], runs_dir=home / "runs")
    assert list_folder(home / ".cache" / "models", roots, kind="folder").parent is None  # ~/.cache is not allowed
    assert complete("~/.c", roots, kind="folder") == [f"{home / '.cache' / 'models'}/"]
    assert ".ssh/" not in "".join(complete("~/.", roots, kind="folder"))


# --- every path entry of the tabs ---------------------------------------------------------------------------------


def refused_paths(home: Path, outside: Path) -> list[tuple[Path, str]]:
    """A path outside the roots and one in a hidden folder under home, each with its message as a regex."""
    return [(outside, re.escape(OUTSIDE)), (home / ".config" / "pics", re.escape(HIDDEN))]


def test_dataset_tab_create_add_preview_doctor_refuse(home, outside, roots):
    for path, message in refused_paths(home, outside):
        with pytest.raises(ProjectError, match=message):
            dataset_view.project_path(str(path / "project"), roots)  # create, add, preview, balance, doctor, use
        with pytest.raises(ProjectError, match=f"Images folder: .*{message}"):
            dataset_view.source_path(str(path), roots)  # the pictures copied by create and add
    assert dataset_view.project_path("~/proj", roots) == home / "proj"
    assert dataset_view.source_path(str(home / "photos"), roots) == str(home / "photos")
    assert dataset_view.source_path(" ", roots) == ""


def test_parameters_load_and_presets_refuse(home, outside, roots, tmp_path):
    from gui.views.parameters import settings_file

    for path, message in refused_paths(home, outside):
        with pytest.raises(PathNotAllowed, match=f"Open a settings file: .*{message}"):
            settings_file(str(path / "settings.toml"), roots)
    assert settings_file(str(home / "a.toml"), roots) == home / "a.toml"
    user = tmp_path / "presets"
    user.mkdir()
    (user / "mine.json").write_text(json.dumps({"format": "atelier-preset", "title": "mine", "config": {}}))
    with pytest.raises(ValueError, match="not one of the presets"):
        preset_path(str(outside / "settings.toml"), user)


def test_captioning_folder_refuses_before_saying_whether_it_exists(home, outside, roots):
    for path, message in [*refused_paths(home, outside), (outside / "missing", re.escape(OUTSIDE))]:
        with pytest.raises(CaptionViewError, match=f"Folder: .*{message}"):
            caption_view.resolve_folder(str(path), roots)
    assert caption_view.resolve_folder("~/photos", roots) == home / "photos"
    for path, message in refused_paths(home, outside):  # a local captioning model folder
        with pytest.raises(CaptionViewError, match=f"Model: .*{message}"):
            caption_view.model_location(str(path), roots)
    assert caption_view.model_location(" SmilingWolf/wd-v1-4-convnext-tagger-v2 ", roots) == \
        "SmilingWolf/wd-v1-4-convnext-tagger-v2"
    assert caption_view.model_location("", roots) == ""


def test_regularization_folders_and_model_refuse(home, outside, roots):
    for path, message in refused_paths(home, outside):
        with pytest.raises(ValueError, match=f"Regularization folder: .*{message}"):
            reg_view.create_class_folder(str(path), 1, "dog", roots)
        assert re.search(message, reg_view.outside_roots({reg_view.TRAIN_LABEL: str(path)}, roots))
    request = reg_view.GenerateRequest(model=str(outside / "model.safetensors"), out=str(home / "reg" / "1_dog"),
                                       prompt="a dog")
    assert "Base model: " in reg_view.outside_roots(reg_view.generate_paths(request, None), roots)
    config = {"model": {"pretrained_model_name_or_path": str(home / "model.safetensors"),
                        "vae": str(home / ".cache" / "vae.safetensors")}}
    request = reg_view.GenerateRequest(model=str(home / "model.safetensors"), out=str(home / "reg" / "1_dog"),
                                       prompt="a dog")
    assert HIDDEN in reg_view.outside_roots(reg_view.generate_paths(request, config), roots)
    hub = reg_view.GenerateRequest(model="runwayml/stable-diffusion-v1-5", out=str(home / "reg"), prompt="a dog")
    assert reg_view.outside_roots(reg_view.generate_paths(hub, None), roots) == ""
    assert not (outside / "1_dog").exists()


def test_tools_fields_and_the_paths_inside_configs_refuse(home, outside, roots):
    for path, message in refused_paths(home, outside):
        with pytest.raises(tools_commands.ToolInputError, match=f"LoRA file: .*{message}"):
            tools_commands.inspect_args(str(path / "style.safetensors"), roots)
    config = home / "run.toml"
    config.write_text(f'[dataset]\ntrain_data_dir = "{outside}"\n', encoding="utf-8")
    with pytest.raises(tools_commands.ToolInputError,
                       match=re.escape(f"`dataset.train_data_dir`: {outside} {OUTSIDE}")):
        tools_view.doctor_report("file", str(config), None, roots)
    with pytest.raises(tools_commands.ToolInputError, match="dataset.train_data_dir"):
        tools_view.cache_config_path("file", str(config), None, roots)
    current = {"dataset": {"train_data_dir": str(home / ".config" / "pics")}}
    with pytest.raises(tools_commands.ToolInputError, match=re.escape(HIDDEN)):
        tools_view.doctor_report("current", "", current, roots)
    with pytest.raises(tools_commands.ToolInputError, match=re.escape(HIDDEN)):
        tools_view.write_temp_config(current, home, roots)


# --- a run started from the GUI -----------------------------------------------------------------------------------


def run_config(home: Path, **sections: dict) -> dict:
    overlay = {"model": {"pretrained_model_name_or_path": str(home / "model.safetensors")},
               "dataset": {"train_data_dir": str(home / "proj" / "img")}, "training": {"max_train_epochs": 1}}
    for section, values in sections.items():
        overlay[section] = {**overlay.get(section, {}), **values}
    return deep_merge(default_config_dict(), overlay)


@pytest.mark.parametrize(("field", "section", "values"), [
    ("saving.output_dir", "saving", {"output_dir": "{outside}/out"}),
    ("saving.resume", "saving", {"resume": "{outside}/state"}),
    ("saving.resume", "saving", {"resume": "{home}/.config/state"}),
    ("logging.logging_dir", "logging", {"logging_dir": "{outside}/logs"}),
    ("model.pretrained_model_name_or_path", "model", {"pretrained_model_name_or_path": "{outside}/m.safetensors"}),
    ("model.vae", "model", {"vae": "{home}/.cache/vae.safetensors"}),
    ("network.network_weights", "network", {"network_weights": "{outside}/w.safetensors"}),
    ("dataset.train_data_dir", "dataset", {"train_data_dir": "{outside}"}),
    ("dataset.reg_data_dir", "dataset", {"reg_data_dir": "{home}/.config"}),
    ("sampling.sample_prompts_file", "sampling", {"sample_prompts_file": "{outside}/prompts.txt"}),
])
def test_start_refuses_each_path_field_outside_the_roots(home, outside, field, section, values):
    values = {key: value.format(home=home, outside=outside) for key, value in values.items()}
    manager = RunManager(home / "runs")
    result = prepare_run(manager, run_config(home, **{section: values}), base_dir=home)
    assert result.handle is None and result.message.startswith("**Not started:**")
    assert f"`{field}`: {next(iter(values.values()))}" in result.message
    assert manager.discover() == []  # nothing was created


def test_start_refuses_subset_image_dirs_inline_and_in_the_dataset_file(home, outside):
    manager = RunManager(home / "runs")
    inline = run_config(home, dataset={"train_data_dir": "", "datasets": [{"subsets": [{"image_dir": str(outside)}]}]})
    result = prepare_run(manager, inline, base_dir=home)
    assert result.handle is None and f"`dataset.datasets[0].subsets[0].image_dir`: {outside}" in result.message
    (home / "data.toml").write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{outside}"\n')
    in_file = run_config(home, dataset={"train_data_dir": "", "config_file": str(home / "data.toml")})
    result = prepare_run(manager, in_file, base_dir=home)
    assert result.handle is None and "data.toml): datasets[0].subsets[0].image_dir`" in result.message
    (outside / "data.toml").write_text("not read")
    result = prepare_run(manager, run_config(home, dataset={"train_data_dir": "",
                                                           "config_file": str(outside / "data.toml")}), base_dir=home)
    assert "`dataset.config_file`" in result.message and OUTSIDE in result.message
    assert manager.discover() == []


def test_start_accepts_paths_inside_the_roots_and_hub_ids(home, roots):
    from engine.config.io import validate_config

    manager = RunManager(home / "runs")
    result = prepare_run(manager, run_config(home), base_dir=home)
    assert result.handle is not None, result.message
    hub = validate_config(run_config(home, model={"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5"}))
    # the default output folder is left out: the runs manager puts the models in the run's own folder
    assert [name for name, *_ in config_paths(hub)] == ["model.pretrained_model_name_or_path", "dataset.train_data_dir"]
    assert path_refusals(hub, roots, home) == []  # a hub id is no path
    images(home / ".data" / "img" / "5_sks dog")
    hidden = run_config(home, dataset={"train_data_dir": str(home / ".data" / "img")})
    assert prepare_run(manager, hidden, base_dir=home).handle is None
    explicit = FileRoots.from_paths([home / ".data"], runs_dir=home / "runs")  # --allow-path ~/.data
    result = prepare_run(manager, hidden, base_dir=home, roots=explicit)
    assert result.handle is not None, result.message


def test_the_cli_keeps_its_freedom(outside):
    """The engine reads any path it is given: the confinement lives in the GUI only."""
    from engine.config.io import validate_config

    config = validate_config(deep_merge(default_config_dict(), {"dataset": {"train_data_dir": str(outside)}}))
    assert config.dataset.train_data_dir == str(outside)
    with pytest.raises(ConfigError):
        validate_config({"training": {"max_train_epochs": -1}})


def test_the_train_tab_takes_only_a_run_of_the_runs_folder(home, outside):
    """The run picker's value names a run; a path sent instead (an HTTP client) never reaches stop, resume or read."""
    from gui.tabs.train import _handle

    manager = RunManager(home / "runs")
    (home / "runs" / "2026-run").mkdir()
    (home / "runs" / "2026-run" / "run.json").write_text("{}", encoding="utf-8")
    (outside / "run.json").write_text("{}", encoding="utf-8")
    assert _handle(manager, "2026-run").run_dir == home / "runs" / "2026-run"
    for sent in (str(outside), "../../outside", "..", ".", "2026-run/..", "", None):
        assert _handle(manager, sent) is None, sent
