"""engine.config.readiness: a valid config that cannot start (no base model, a missing path, no images) is named,
every problem at once, so that the Parameters tab's "Valid." means ready."""

from pathlib import Path

from PIL import Image

from engine.config.io import deep_merge, default_config_dict, validate_config
from engine.config.readiness import readiness_problems


def config(tmp_path: Path, **sections):
    return validate_config(deep_merge(default_config_dict(), sections), check_packages=False)


def ready_folders(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "base.safetensors"
    model.write_bytes(b"x")
    concept = tmp_path / "img" / "10_dog"
    concept.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(concept / "a.png")
    return model, tmp_path / "img"


def paths_of(problems) -> list[str]:
    return [problem.path for problem in problems]


def test_the_default_config_names_the_base_model_and_the_dataset_at_once(tmp_path):
    problems = readiness_problems(config(tmp_path), tmp_path)
    assert paths_of(problems) == ["model.pretrained_model_name_or_path", "dataset"]
    assert all(problem.severity == "error" for problem in problems)


def test_a_config_with_a_model_and_images_is_ready(tmp_path):
    model, images = ready_folders(tmp_path)
    ready = config(tmp_path, model={"pretrained_model_name_or_path": str(model)},
                   dataset={"train_data_dir": str(images)}, saving={"output_dir": str(tmp_path / "not-yet")})
    assert readiness_problems(ready, tmp_path) == []  # an output folder need not exist: the run creates it


def test_paths_that_do_not_exist_are_named(tmp_path):
    model, images = ready_folders(tmp_path)
    broken = config(tmp_path, model={"pretrained_model_name_or_path": "models/gone.safetensors"},
                    dataset={"train_data_dir": str(images)},
                    sampling={"sample_prompts_file": str(tmp_path / "prompts.txt")})
    problems = readiness_problems(broken, tmp_path)
    assert paths_of(problems) == ["model.pretrained_model_name_or_path", "sampling.sample_prompts_file"]
    assert "prompts.txt` does not exist" in problems[1].message


def test_a_hugging_face_id_is_left_to_the_engine(tmp_path):
    _, images = ready_folders(tmp_path)
    hub = config(tmp_path, model={"pretrained_model_name_or_path": "stabilityai/sdxl-base"},
                 dataset={"train_data_dir": str(images)})
    assert readiness_problems(hub, tmp_path) == []


def test_an_empty_dataset_is_named(tmp_path):
    model, images = ready_folders(tmp_path)
    (images / "10_dog" / "a.png").unlink()
    empty = config(tmp_path, model={"pretrained_model_name_or_path": str(model)},
                   dataset={"train_data_dir": str(images)})
    assert paths_of(readiness_problems(empty, tmp_path)) == ["dataset.train_data_dir"]
    (tmp_path / "empty").mkdir()
    inline = config(tmp_path, model={"pretrained_model_name_or_path": str(model)},
                    dataset={"datasets": [{"subsets": [{"image_dir": str(images / "10_dog")},
                                                       {"image_dir": str(tmp_path / "missing")}]}]})
    assert paths_of(readiness_problems(inline, tmp_path)) == ["dataset.datasets[0].subsets[1].image_dir",
                                                              "dataset.datasets[0].subsets[0].image_dir"]


def test_a_refused_path_is_named_and_never_looked_at(tmp_path):
    """The GUI passes FileRoots.refusal: the form must not tell whether a file outside the allowed folders exists
    or what it holds (a broken dataset TOML out there would otherwise show its own errors)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    model, _ = ready_folders(allowed)
    outside.mkdir()
    secret = outside / "datasets.toml"
    secret.write_text("[[datasets]]\nnot_a_key = 1\n", encoding="utf-8")
    asked = []

    def refusal(path: str, base: Path) -> str | None:
        asked.append(path)
        return None if Path(path).is_relative_to(allowed) else f"{path} is outside the folders this app may use"

    for dataset in ({"config_file": str(secret)}, {"train_data_dir": str(outside)},
                    {"datasets": [{"subsets": [{"image_dir": str(outside)}]}]}):
        ready = config(tmp_path, model={"pretrained_model_name_or_path": str(model)}, dataset=dataset)
        problems = readiness_problems(ready, tmp_path, refusal=refusal)
        named = secret if "config_file" in dataset else outside
        assert [problem.message for problem in problems] == [f"{named} is outside the folders this app may use"]
        assert readiness_problems(ready, tmp_path) != problems  # without the refusal the path is read
    assert str(model) in asked
