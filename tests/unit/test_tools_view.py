"""The Tools tab's logic (gui/views/tools.py) on real engine output: a tiny LoRA built with engine.networks, inspected,
resized and cached by `python -m engine ...` processes, and the page text checked against the file's own tensors."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open
from train_helpers import make_locon_file

from engine.config.errors import ConfigError
from engine.config.io import load_config
from engine.networks.network_file import read_network_file, save_network_file
from gui import tools_commands as commands
from gui import tools_render as render
from gui.file_browser import FileRoots
from gui.jobs import EngineJob, JobUpdate
from gui.views import tools as view

METADATA = {"ss_base_model_version": "sd_v1", "ss_output_name": "tiny-style", "ss_network_dim": "4",
            "ss_learning_rate": "0.0001", "ss_tag_frequency": json.dumps({"10_sks dog": {"sks": 5, "dog": 4}}),
            "ss_dataset_dirs": json.dumps({"10_sks dog": {"n_repeats": 10, "img_count": 5}})}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tools")


@pytest.fixture(scope="module")
def roots(folder, tiny_models) -> FileRoots:
    return FileRoots.from_paths([folder, Path(tiny_models["sd1"]).parent], include_home=False)


@pytest.fixture(scope="module")
def lora(folder, tiny_models) -> Path:
    return make_locon_file(tiny_models["sd1"], folder / "style.safetensors", METADATA)


@pytest.fixture(scope="module")
def inspected(lora, roots) -> view.ToolOutcome:
    return view.run_lora_tool(commands.inspect_args(str(lora), roots))


def file_ranks(path: Path) -> tuple[int, Counter, Counter]:
    """Module count, rank -> modules and alpha -> modules, read from the file's tensors."""
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        ranks = Counter(str(handle.get_tensor(key).shape[0]) for key in keys if key.endswith(".lora_down.weight"))
        alphas = Counter(f"{float(handle.get_tensor(key)):g}" for key in keys if key.endswith(".alpha"))
    return sum(ranks.values()), ranks, alphas


def test_inspect_summary_shows_what_the_file_holds(lora, inspected):
    assert inspected.error == ""
    text = render.inspect_markdown(inspected.report)
    modules, ranks, alphas = file_ranks(lora)
    assert f"**Modules:** {modules} (" in text
    rank_line = next(line for line in text.splitlines() if line.startswith("- **Rank:**"))
    alpha_line = next(line for line in text.splitlines() if line.startswith("- **Alpha:**"))
    assert all(f"{rank} ({count} modules)" in rank_line for rank, count in ranks.items())
    assert all(f"{alpha} ({count} modules)" in alpha_line for alpha, count in alphas.items())
    assert "sd_v1" in text  # the base model, from ss_base_model_version
    assert "✔ No NaN or inf weights." in text
    assert "dog (4), sks (5)" not in text and "sks (5), dog (4)" in text  # most frequent tag first


def test_metadata_table_lists_the_training_keys_and_folders(inspected):
    frame = render.metadata_frame(inspected.report)
    table = dict(zip(frame["key"], frame["value"], strict=True))
    for key in ("ss_base_model_version", "ss_output_name", "ss_network_dim", "ss_learning_rate"):
        assert table[key] == METADATA[key]
    assert json.loads(table["dataset folder 10_sks dog"]) == json.loads(METADATA["ss_dataset_dirs"])["10_sks dog"]


def test_nan_weights_are_flagged_by_module(lora, folder, roots):
    tensors, metadata = read_network_file(lora)
    broken = next(key for key in tensors if key.endswith(".lora_up.weight"))
    tensors[broken] = tensors[broken].clone()
    tensors[broken][0, 0] = float("nan")
    path = folder / "broken.safetensors"
    save_network_file(path, tensors, metadata, save_as="safetensors")
    outcome = view.run_lora_tool(commands.inspect_args(str(path), roots))
    assert outcome.report is not None and outcome.report["ok"] is False
    text = render.inspect_markdown(outcome.report)
    module = broken.removesuffix(".lora_up.weight")
    assert "✖" in text and module in text and "No NaN" not in text
    assert [module in error for error in render.non_finite_errors(outcome.report)] == [True]


@pytest.mark.slow
def test_resize_writes_a_new_file_and_its_summary_shows_the_new_rank(lora, roots):
    args = commands.resize_args(str(lora), "", roots, rule="rank", value=2)
    outcome, inspected = view.run_and_inspect(args)
    written = Path(outcome.report["output"])
    assert written == lora.with_name("style_rank2.safetensors") and written.is_file()
    modules, ranks, _ = file_ranks(written)
    assert ranks == Counter({"2": modules})
    assert f"Wrote `{written}`" in render.result_markdown("resize", outcome)
    assert f"Ranks after: 2 ({modules} modules)" in render.result_markdown("resize", outcome)
    assert f"**Rank:** 2 ({modules} modules)" in render.inspect_outcome_markdown(inspected)
    # The default name of a second resize must not be the file just written: the tools never overwrite.
    assert commands.resize_args(str(lora), "", roots, rule="rank", value=2)[4] == str(lora.with_name(
        "style_rank2-2.safetensors"))


def test_the_engines_refusal_is_what_the_page_shows(lora, roots):
    outcome, inspected = view.run_and_inspect(commands.resize_args(str(lora), str(lora), roots, rule="rank", value=2))
    assert inspected is None and outcome.report is None
    assert "is one of the inputs" in outcome.error and str(lora) in outcome.error
    assert outcome.error in render.result_markdown("resize", outcome)


def test_the_report_is_read_from_the_done_event_not_from_the_output():
    report = {"ok": True, "output": "/x/y.safetensors", "ranks": {"4": 3}}
    done = {"type": "done", "time": 1.0, "task": "lora", "tool": "resize", **report}
    noisy = "Loading weights: 100%|{bar}| 36/36\n" + json.dumps({"ok": True, "output": "/not/this"}) + "\n"
    assert view.outcome_of(JobUpdate([{"type": "start"}, done], 0, noisy)) == view.ToolOutcome(report)
    refused = {"type": "done", "task": "lora", "tool": "resize", "ok": False, "error": "x.safetensors already exists"}
    assert view.outcome_of(JobUpdate([refused], 2, "")) == view.ToolOutcome(None, "x.safetensors already exists")
    crashed = view.outcome_of(JobUpdate([], 1, "Traceback (most recent call last):\n  boom"))
    assert crashed.report is None and "boom" in crashed.error


def test_fields_are_checked_before_the_engine_is_asked(lora, roots, tmp_path):
    with pytest.raises(commands.ToolInputError, match="LoRA file: enter a path"):
        commands.inspect_args("  ", roots)
    with pytest.raises(commands.ToolInputError, match="outside the folders"):
        commands.inspect_args("/etc/passwd", roots)
    with pytest.raises(commands.ToolInputError, match="New size: must be more than 0"):
        commands.resize_args(str(lora), "", roots, rule="sv_fro", value=0)
    with pytest.raises(commands.ToolInputError, match="LoRAs to merge"):
        commands.merge_args("\n \n", "", roots)
    with pytest.raises(commands.ToolInputError, match="Rank: enter a number"):
        commands.extract_args(str(lora), str(lora), "", roots, rank=None)


def test_merge_list_keeps_ratios_as_the_engine_reads_them(lora, roots):
    text = commands.add_merge_source("", str(lora), 0.7)
    text = commands.add_merge_source(text, str(lora.with_name("other.safetensors")), None)
    assert commands.merge_sources(text) == [f"{lora}:0.7", str(lora.with_name("other.safetensors"))]
    assert commands.split_source(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", None)
    args = commands.merge_args(text, "", roots, svd_rank=8)
    assert args[2:4] == commands.merge_sources(text)
    assert args[args.index("-o") + 1] == str(lora.with_name("style_merged.safetensors"))
    assert args[args.index("--svd") + 1] == "8" and "--into-model" not in args


def test_current_settings_become_a_config_the_engine_reads(tiny_models, tmp_path):
    current = {"model": {"pretrained_model_name_or_path": str(tiny_models["sd1_ckpt"]), "model_family": "sd1"},
               "dataset": {"train_data_dir": "img"}}
    roots = FileRoots.from_paths([tmp_path, Path(tiny_models["sd1_ckpt"]).parent], include_home=False)
    path = view.write_temp_config(current, tmp_path, roots)
    config = load_config(path)
    assert config.dataset.train_data_dir == str(tmp_path / "img")  # relative paths made absolute
    assert config.model.pretrained_model_name_or_path == str(tiny_models["sd1_ckpt"])
    with pytest.raises(commands.ToolInputError, match="Parameters"):
        view.write_temp_config(None, tmp_path, roots)
    with pytest.raises(ConfigError):
        view.write_temp_config({"training": {"max_train_epochs": -3}}, tmp_path, roots)


@pytest.fixture(scope="module")
def dataset_config(folder, tiny_models) -> Path:
    """A run config on a copy of the tiny dataset (the cache writes .npz files next to the images)."""
    images = shutil.copytree(tiny_models["dataset_img"], folder / "img")
    path = folder / "run.toml"
    path.write_text(f'[model]\npretrained_model_name_or_path = "{tiny_models["sd1_ckpt"]}"\n'
                    'model_family = "sd1"\n[dataset]\ntrain_data_dir = "img"\n'
                    "[dataset.general]\nresolution = 64\nmin_bucket_reso = 64\nmax_bucket_reso = 128\n"
                    "bucket_reso_steps = 64\n", encoding="utf-8")
    assert images == path.parent / "img"  # relative to the config's folder
    return path


def image_count(dataset_config: Path) -> int:
    return sum(1 for p in (dataset_config.parent / "img").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def test_doctor_runs_on_a_config_file(folder, roots, dataset_config):
    report = view.doctor_report("file", str(dataset_config), None, roots)
    assert report["totals"]["train_images"] == image_count(dataset_config) > 0
    with pytest.raises(ConfigError, match="file not found"):
        view.doctor_report("file", str(folder / "missing.toml"), None, roots)
    with pytest.raises(commands.ToolInputError, match="Parameters"):
        view.doctor_report("current", "", None, roots)


@pytest.mark.slow
def test_cache_latents_from_a_config_file(folder, roots, dataset_config):
    config = view.cache_config_path("file", str(dataset_config), None, roots)
    update = EngineJob(commands.cache_args(config, device="cpu", workers=1), work_dir=folder / "cache-job").run()
    images = image_count(dataset_config)
    assert update.ok, update.output
    assert render.cache_markdown(update).startswith(f"✔ **Cached {images} of {images} images:** {images} encoded")
    assert f": {images}/{images}" in update.progress_text()


@pytest.mark.slow
def test_merge_into_a_model_then_extract_it_back(lora, folder, roots, tiny_models):
    """The Merge and Extract pages' commands, run for real: merge the LoRA into the tiny checkpoint, then extract a
    rank-4 LoRA from the difference; each page shows what the engine wrote."""
    base = shutil.copy(tiny_models["sd1_ckpt"], folder / "base.safetensors")
    merge = commands.merge_args(f"{lora}:0.8", "", roots, into_model=str(base))
    merged, inspected_model = view.run_and_inspect(merge)
    assert merged.report is not None, merged.error
    assert inspected_model is None  # a checkpoint, not a LoRA: the page shows no LoRA summary for it
    written = Path(merged.report["output"])
    assert written.is_file() and written != Path(base)
    text = render.result_markdown("merge", merged)
    assert f"Merged `{lora}` at 0.8" in text and "(sd1)" in text

    extracted, inspected = view.run_and_inspect(commands.extract_args(str(base), str(written), "", roots, rank=4))
    assert extracted.report is not None, extracted.error
    modules, ranks, _ = file_ranks(Path(extracted.report["output"]))
    assert ranks == Counter({"4": modules}) and modules > 0
    assert "at rank 4" in render.result_markdown("extract", extracted)
    assert f"**Rank:** 4 ({modules} modules)" in render.inspect_outcome_markdown(inspected)


def test_merge_text_encoder_fields_name_what_an_sd3_file_lacks(tmp_path):
    """An SD3 file without its text encoders opens the CLIP-L / CLIP-G / T5 fields of 'Merge into model'; the same
    weights with the encoders inside need none (the header says what is inside, as the loader reads it)."""
    from sd3_tiny import tiny_sd3_files

    bare, whole = tiny_sd3_files("5-large")["model"], tiny_sd3_files("5-large", embedded=True)["model"]
    roots = FileRoots([bare.parent, whole.parent])
    assert view.separate_text_encoders(str(bare), roots) == ("sd3", ["CLIP-L", "CLIP-G", "T5-XXL"])
    note, opened = view.text_encoder_note(str(bare), roots)
    assert opened and "sd3" in note and "CLIP-G" in note
    assert view.separate_text_encoders(str(whole), roots) is None
    assert view.text_encoder_note(str(whole), roots) == (view.TEXT_ENCODER_HELP, False)
