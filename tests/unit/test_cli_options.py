"""Engine tools' options declared once (engine/cli/options.py, issue 17): the parser's flags come from the options
dataclass, and every command line the GUI builds for class-images, the LoRA tools and cache-latents is written from
the same declaration, parsed back by the engine's own parser to the values the GUI gave (a round trip)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.cli.cache_cmd import CacheLatentsOptions
from engine.cli.class_images_cmd import ClassImagesOptions
from engine.cli.lora_cmd import (
    TOOL_OPTIONS,
    ConvertOptions,
    ExtractOptions,
    MergeOptions,
    ResizeOptions,
)
from engine.cli.options import add_arguments, cli_option, cli_options, option, parsed_values, to_argv, value_text
from gui import tools_commands as commands
from gui.browse import FileRoots
from gui.views import regularization as reg_view


@dataclass(frozen=True, kw_only=True)
class _Toy:
    source: str = option(positional=True, help="a file")
    extra: list[str] = option(positional=True, nargs="*", metavar="MORE")
    output: str = option(flags=("-o", "--output"))
    rank: int | None = option(None, group="rule")
    ratio: float | None = option(None, group="rule", metavar="X")
    mode: str = option("fast", choices=("fast", "slow"))
    dry_run: bool = option(False)
    shuffle: bool | None = option(None, negatable=True)
    where: Path | None = option(None)
    not_an_option: int = 3


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser, _Toy, groups={"rule": parser.add_mutually_exclusive_group(required=True)})
    return parser


def test_a_declaration_gives_the_flags_types_defaults_and_groups():
    assert [declared.name for declared in cli_options(_Toy)] == ["source", "extra", "output", "rank", "ratio", "mode",
                                                                 "dry_run", "shuffle", "where"]
    args = _toy_parser().parse_args(["in.safetensors", "-o", "out", "--ratio", "0.5"])
    assert vars(args) == {"source": "in.safetensors", "extra": [], "output": "out", "rank": None, "ratio": 0.5,
                          "mode": "fast", "dry_run": False, "shuffle": None, "where": None}
    assert cli_option(_Toy, "output").flag == "-o" and cli_option(_Toy, "mode").choices == ("fast", "slow")
    assert cli_option(_Toy, "output").required and not cli_option(_Toy, "mode").required
    with pytest.raises(SystemExit):  # the mutually exclusive group is required
        _toy_parser().parse_args(["in", "-o", "out"])
    with pytest.raises(SystemExit):  # an option without a default is required
        _toy_parser().parse_args(["in", "--rank", "2"])
    with pytest.raises(ValueError, match="has no option 'not_an_option'"):
        cli_option(_Toy, "not_an_option")


def test_values_become_a_command_line_the_parser_reads_back():
    values = {"source": "in.safetensors", "extra": ["a", "b c"], "output": "out", "rank": 8.0, "mode": "slow",
              "dry_run": True, "shuffle": False, "where": Path("/tmp/x")}
    argv = to_argv(_Toy, values)
    assert argv == ["in.safetensors", "a", "b c", "-o", "out", "--rank", "8", "--mode", "slow", "--dry-run",
                    "--no-shuffle", "--where", "/tmp/x"]
    assert parsed_values(_Toy, _toy_parser().parse_args(argv)) == values | {"rank": 8, "ratio": None}
    # None and False leave an option out; joined writes one word per option
    assert to_argv(_Toy, {"rank": None, "dry_run": False, "shuffle": None}) == []
    joined = to_argv(_Toy, {"source": "in", "output": "-x", "ratio": 0.5, "shuffle": True}, joined=True)
    assert joined == ["in", "--output=-x", "--ratio=0.5", "--shuffle"]
    assert _toy_parser().parse_args(joined).output == "-x"
    with pytest.raises(ValueError, match="_Toy has no option 'rnk'"):  # a GUI re-typing a flag that went away
        to_argv(_Toy, {"rnk": 2})


def test_numbers_are_written_as_short_as_they_stay_exact():
    assert [value_text(value) for value in (8, 8.0, 0.01, 2.5, 1e-7, 0.123456789, "x", Path("/a"))] == \
        ["8", "8", "0.01", "2.5", "1e-07", "0.123456789", "x", "/a"]


# --- the GUI's command lines, read back by the engine's parser ------------------------------------------------------


def _parsed(argv: list[str], options_type: type) -> dict:
    return parsed_values(options_type, build_parser().parse_args(argv))


def _given(parsed: dict, options_type: type) -> dict:
    """The parsed values that differ from the declaration's defaults (what the command line gave)."""
    return {name: value for name, value in parsed.items() if cli_option(options_type, name).default != value}


@pytest.fixture
def roots(tmp_path) -> FileRoots:
    return FileRoots((tmp_path,))


def test_class_images_round_trip(tmp_path):
    request = reg_view.GenerateRequest(model="m.safetensors", out=str(tmp_path / "1_dog"), prompt=" a  dog ",
                                       negative="blurry", count=4.0, steps=25, width=640, height=0, seed=7)
    config = {"model": {"pretrained_model_name_or_path": "m.safetensors", "model_family": "flux1", "vae": "",
                        "clip_l": "clip_l.safetensors", "t5xxl": "t5.safetensors", "ae": "ae.safetensors",
                        "t5xxl_max_token_length": 256.0, "apply_t5_attn_mask": True, "v_parameterization": False}}
    argv = reg_view.class_images_args(request, config)
    assert argv[0] == "class-images"
    assert _given(_parsed(argv, ClassImagesOptions), ClassImagesOptions) == {
        "model": "m.safetensors", "model_family": "flux1", "clip_l": "clip_l.safetensors", "t5xxl": "t5.safetensors",
        "ae": "ae.safetensors", "t5xxl_max_token_length": 256, "apply_t5_attn_mask": True, "prompt": "a dog",
        "negative": "blurry", "count": 4, "out": tmp_path / "1_dog", "width": 640, "steps": 25, "seed": 7}


def test_lora_tools_round_trip(tmp_path, roots):
    lora, other, model = (str(tmp_path / name) for name in ("style.safetensors", "b.safetensors", "base.safetensors"))
    merge = commands.merge_args(f"{lora}:0.7\n{other}", "", roots, into_model=model, precision="bf16",
                                text_encoders={"clip-l": (other, ""), "t5xxl": ("", "")})
    assert _given(_parsed(merge, MergeOptions), MergeOptions) == {
        "loras": [f"{lora}:0.7", other], "output": str(tmp_path / "base_merged.safetensors"), "into_model": model,
        "clip_l": other, "clip_l_save_to": str(tmp_path / "b_merged.safetensors"), "save_precision": "bf16"}
    resize = commands.resize_args(lora, "", roots, rule="sv_fro", value=0.9, conv_rank=4.0, precision="fp16")
    assert _given(_parsed(resize, ResizeOptions), ResizeOptions) == {
        "file": lora, "output": str(tmp_path / "style_sv_fro0.9.safetensors"), "sv_fro": 0.9, "conv_rank": 4,
        "save_precision": "fp16"}
    extract = commands.extract_args(model, lora, "", roots, rank=8.0, conv_rank=2, min_diff=0.005, device="cuda",
                                    clamp_quantile=0.99)
    assert _given(_parsed(extract, ExtractOptions), ExtractOptions) == {
        "base": model, "tuned": lora, "output": str(tmp_path / "style_lora_r8.safetensors"), "rank": 8,
        "conv_rank": 2, "min_diff": 0.005, "device": "cuda", "clamp_quantile": 0.99}
    convert = commands.convert_args(lora, "", roots, to="kohya", family="sd3")
    assert _given(_parsed(convert, ConvertOptions), ConvertOptions) == {
        "file": lora, "to": "kohya", "output": str(tmp_path / "style_kohya.safetensors"), "family": "sd3"}
    for argv in (merge, resize, extract, convert, commands.inspect_args(lora, roots)):
        args = build_parser().parse_args(argv)
        assert args.json and args.lora_command in TOOL_OPTIONS


@pytest.mark.parametrize(("skip_existing", "device", "workers", "given"), [
    (True, "auto", 0, {"skip_existing": True}),
    (False, "cuda", 3.0, {"force": True, "device": "cuda", "workers": 3}),
])
def test_cache_latents_round_trip(skip_existing, device, workers, given):
    argv = commands.cache_args("/runs/a.toml", skip_existing=skip_existing, device=device, workers=workers)
    assert argv[0] == "cache-latents"
    assert _given(_parsed(argv, CacheLatentsOptions), CacheLatentsOptions) == {"config": "/runs/a.toml", **given}


def test_the_gui_choices_are_the_declared_ones():
    assert cli_option(ResizeOptions, "save_precision").choices == commands.PRECISIONS
    assert tuple(commands.CONVERT_CHOICES) == cli_option(ConvertOptions, "to").choices
    assert commands.CONVERT_FAMILY_CHOICES[1:] == cli_option(ConvertOptions, "family").choices
    assert commands.CACHE_DEVICES[1:] == cli_option(CacheLatentsOptions, "device").choices
    assert {rule: flag for rule, (flag, _) in commands.RESIZE_RULES.items()} == \
        {name: cli_option(ResizeOptions, name).flag for name in ("rank", "sv_ratio", "sv_fro")}


def test_the_declarations_the_gui_imports_stay_light():
    code = ("import sys, engine.cli.options, engine.cli.class_images_cmd, engine.cli.cache_cmd, engine.cli.lora_cmd; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'safetensors') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
