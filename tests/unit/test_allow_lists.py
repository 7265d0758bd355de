"""Allow-lists that keep a config or the caption tools from running code or writing non-text files (issue 11).

Caption files: only the text extensions of CAPTION_EXTENSIONS, wherever an extension is accepted (config, CLI,
GUI editor, importers). Class paths (optimizer_type): only classes of CLASS_PATH_PACKAGES, refused by validate
without importing anything, and again right before the import.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from engine.caption.edit import EditOptions, edit_folder
from engine.caption.runner import FolderOptions, caption_path
from engine.cli import main
from engine.config.choices import CAPTION_EXTENSIONS, CLASS_PATH_PACKAGES, dotted_caption_extension
from engine.config.errors import ConfigError
from engine.config.importers.registry import import_file
from engine.config.io import validate_config
from engine.config.sections_training import OptimizerSection
from engine.data.caption_files import caption_candidates
from engine.train.optimizers import OptimizerConfigError, build_optimizer
from gui.views import captioning as view
from gui.views.captioning import CaptionViewError

BAD_EXTENSIONS = [".pt", "pt", ".pth", ".py", ".pkl", ".safetensors", "", ".", "../x", ".txt/../evil"]
MARKER_PACKAGE = "atelier_marker_pkg"


def _problems(config: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(config, check_packages=False)
    return {problem.path: problem.message for problem in caught.value.problems}


# --- caption extensions ------------------------------------------------------------------------------------------


def test_only_the_listed_text_extensions_and_their_undotted_forms_are_caption_extensions():
    assert {".txt", ".caption"} <= set(CAPTION_EXTENSIONS)
    for extension in CAPTION_EXTENSIONS:
        assert dotted_caption_extension(extension) == extension
        assert dotted_caption_extension(extension[1:]) == extension  # sd-scripts' "txt"
    for bad in BAD_EXTENSIONS:
        with pytest.raises(ValueError, match=r"not a caption file extension; use one of \.txt, \.caption"):
            dotted_caption_extension(bad)


def test_validate_refuses_a_bad_caption_extension_at_every_level_naming_the_field():
    config = {"dataset": {"general": {"caption_extension": ".pt"},
                          "datasets": [{"caption_extension": "py",
                                        "subsets": [{"image_dir": "/data/img", "caption_extension": ".pkl"}]}]}}
    problems = _problems(config)
    for path, value in (("dataset.general.caption_extension", "'.pt'"),
                        ("dataset.datasets[0].caption_extension", "'py'"),
                        ("dataset.datasets[0].subsets[0].caption_extension", "'.pkl'")):
        assert value in problems[path] and ".txt, .caption" in problems[path]


def test_validate_keeps_allowed_caption_extensions_as_written():
    subset = {"image_dir": "/d", "caption_extension": ".caption"}
    dataset = {"general": {"caption_extension": "txt"}, "datasets": [{"subsets": [subset]}]}
    config = validate_config({"dataset": dataset}, check_packages=False)
    assert config.dataset.general.caption_extension == "txt"
    assert config.dataset.datasets[0].subsets[0].caption_extension == ".caption"


def test_the_validate_command_refuses_a_bad_caption_extension(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = tmp_path / "run.toml"
    path.write_text('[dataset.general]\ncaption_extension = ".pt"\n', encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    assert "dataset.general.caption_extension: '.pt' is not a caption file extension" in capsys.readouterr().err


def test_the_engine_never_reads_or_writes_a_caption_with_another_extension(tmp_path: Path):
    image = tmp_path / "a.png"
    image.write_bytes(b"")  # the name is all that matters here
    assert caption_path(image, "caption") == tmp_path / "a.caption"
    for bad in (".pt", "py"):
        with pytest.raises(ValueError, match="not a caption file extension"):
            caption_path(image, bad)
        with pytest.raises(ValueError, match="not a caption file extension"):
            caption_candidates(image, bad)
        with pytest.raises(ValueError, match="not a caption file extension"):
            FolderOptions(caption_extension=bad)
        with pytest.raises(ValueError, match="not a caption file extension"):
            edit_folder(tmp_path, EditOptions(add_tags=("x",)), caption_extension=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


@pytest.mark.parametrize("command", [["caption", "--captioner", "wd14"], ["captions", "edit", "--add-tag", "x"]])
def test_the_caption_commands_refuse_a_bad_extension_before_touching_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture, command: list[str]):
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.pt").write_text("x\n", encoding="utf-8")  # an edit would add the tag here
    with pytest.raises(SystemExit) as caught:
        main([*command, str(tmp_path), "--caption-extension", ".pt"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--caption-extension: '.pt' is not a caption file extension; use one of .txt, .caption" in err
    assert (tmp_path / "a.pt").read_text(encoding="utf-8") == "x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.pt"]


def test_the_gui_caption_editor_refuses_to_write_a_pickle_file(tmp_path: Path):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    for bad in (".pt", "pth", "../../x"):
        with pytest.raises(CaptionViewError, match="Caption extension: .* is not a caption file extension"):
            view.save_caption(image, bad, "payload")
        with pytest.raises(CaptionViewError, match="not a caption file extension"):
            view.caption_extension(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    assert view.save_caption(image, "caption", "a dog") == tmp_path / "a.caption"
    assert view.read_caption(image, ".caption") == "a dog"


def test_importers_report_a_bad_caption_extension_instead_of_crashing(tmp_path: Path):
    args = tmp_path / "args.toml"
    args.write_text('pretrained_model_name_or_path = "/m/model.safetensors"\ntrain_data_dir = "/data/img"\n'
                    'output_dir = "/out"\nnetwork_module = "networks.lora"\ncaption_extension = ".pt"\n',
                    encoding="utf-8")
    result = import_file(args)
    skipped = {item.key: item.reason for item in result.skipped}
    assert "not a caption file extension" in skipped["caption_extension"]
    assert result.overlay["dataset"]["general"]["caption_extension"] != ".pt"
    dataset = tmp_path / "dataset.toml"
    dataset.write_text('[general]\ncaption_extension = ".py"\n[[datasets]]\n[[datasets.subsets]]\n'
                       'image_dir = "/data/img"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        import_file(dataset)
    assert [problem.path for problem in caught.value.problems] == ["general.caption_extension"]


# --- class paths -------------------------------------------------------------------------------------------------


@pytest.fixture
def marker_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package on sys.path that, if ever imported, creates a marker file: proof that nothing imported it."""
    marker = tmp_path / "imported"
    package = tmp_path / "site" / MARKER_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "import torch\nclass Opt(torch.optim.SGD):\n    pass\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield marker
    sys.modules.pop(MARKER_PACKAGE, None)


@pytest.mark.parametrize("path", ["os.system", "mypkg.evil.Opt", f"{MARKER_PACKAGE}.Opt", "subprocess.Popen",
                                  "torch.optim._private.Opt", "torch.__main__.Opt"])
def test_validate_refuses_a_class_path_outside_the_allowed_packages(path: str, marker_package: Path):
    message = _problems({"optimizer": {"optimizer_type": path}})["optimizer.optimizer_type"]
    assert repr(path) in message
    if not path.startswith("torch."):
        assert all(package in message for package in CLASS_PATH_PACKAGES)
    assert not marker_package.exists()


def test_the_validate_command_refuses_without_importing(tmp_path: Path, marker_package: Path,
                                                        capsys: pytest.CaptureFixture):
    config = tmp_path / "run.toml"
    config.write_text(f'[optimizer]\noptimizer_type = "{MARKER_PACKAGE}.Opt"\n', encoding="utf-8")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "optimizer.optimizer_type" in err and "not in an allowed package" in err and "torch" in err
    assert not marker_package.exists() and MARKER_PACKAGE not in sys.modules


def test_validate_accepts_class_paths_of_the_allowed_packages():
    for path in ("torch.optim.RAdam", "bitsandbytes.optim.AdEMAMix8bit", "transformers.optimization.Adafactor",
                 "pytorch_optimizer.CAME", "came_pytorch.CAME"):
        assert validate_config({"optimizer": {"optimizer_type": path}}, check_packages=False) \
            .optimizer.optimizer_type == path


def test_the_optimizer_builder_refuses_an_unlisted_class_path_without_importing(marker_package: Path):
    # model_construct skips validation, as a section built in code would: the builder checks again on its own.
    section = OptimizerSection.model_construct(**{**OptimizerSection().model_dump(),
                                                  "optimizer_type": f"{MARKER_PACKAGE}.Opt"})
    with pytest.raises(OptimizerConfigError, match=r"^optimizer\.optimizer_type: .*not in an allowed package"):
        build_optimizer(section, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    assert not marker_package.exists() and MARKER_PACKAGE not in sys.modules
    # The fixture is real: importing the package does create the marker.
    importlib.import_module(MARKER_PACKAGE)
    assert marker_package.read_text() == "ran"


def test_a_model_scheduler_config_can_only_name_a_diffusers_scheduler():
    pytest.importorskip("diffusers")
    from engine.train.method_full import scheduler_for
    from engine.train.setup import RunInputError

    built = scheduler_for({"_class_name": "DDIMScheduler"}, v_prediction=True)
    assert type(built).__name__ == "DDIMScheduler" and built.config.prediction_type == "v_prediction"
    for name in ("UNet2DConditionModel", "utils", "__loader__"):
        with pytest.raises(RunInputError, match="not a diffusers scheduler class"):
            scheduler_for({"_class_name": name}, v_prediction=False)
