"""Sample prompts in sd-scripts' format (spec §7): 'a prompt --n negative --w 512 --h 512 --d 1 --l 7 --s 28'.

Parsed here, in the config package, so a bad option is reported when the config is validated rather than when
the first sample is due hours into a run. Unlike sd-scripts, an option that cannot be read is an error, not a
silently ignored piece of the line.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config.choices import Sampler
from engine.config.literals import literal_values


def _size(text: str) -> int:
    # sd-scripts floors sizes to a multiple of 8 with a minimum of 64; we keep that so prompt files behave alike.
    return max(64, int(text) // 8 * 8)


def _steps(text: str) -> int:
    return min(1000, max(1, int(text)))


def _sampler(text: str) -> str:
    name = text.lower()
    if name not in literal_values(Sampler):
        raise ValueError(f"unknown sampler {text!r}")
    return name


# flag -> (key in the prompt dict, parser). Flags for other model families are read so shared files still load.
_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "n": ("negative_prompt", str),
    "w": ("width", _size),
    "h": ("height", _size),
    "d": ("seed", int),
    "s": ("sample_steps", _steps),
    "l": ("scale", float),
    "ss": ("sample_sampler", _sampler),
    "g": ("guidance_scale", float),
    "cn": ("controlnet_image", str),
    "ctr": ("cfg_trunc_ratio", float),
    "rcfg": ("renorm_cfg", float),
    "fs": ("flow_shift", float),
}


def parse_prompt_line(line: str) -> dict[str, Any]:
    """Parse one prompt line into sd-scripts' prompt dict keys (prompt, negative_prompt, width, ...).

    Raises:
        ValueError: naming the option that is unknown or whose value cannot be read.
    """
    prompt, *options = line.split(" --")
    if not prompt.strip():
        raise ValueError("the prompt text is empty")
    parsed: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        flag, _, value = option.strip().partition(" ")
        if flag.lower() not in _OPTIONS:
            raise ValueError(f"unknown option --{flag}; use --n, --w, --h, --d, --l, --s, --ss or --g (FLUX guidance)")
        key, parse = _OPTIONS[flag.lower()]
        try:
            parsed[key] = parse(value.strip())
        except ValueError:
            raise ValueError(f"--{flag} {value.strip()!r} is not a valid value") from None
    return parsed


def prompt_file_lines(text: str) -> list[str]:
    """The prompts of a .txt prompt file: its non-empty lines, stripped, except comments.

    A comment is a line whose first non-blank character is '#'. sd-scripts only skips a '#' in the very first column,
    so an indented comment became a prompt there (and was sampled as one); here it is a comment wherever it starts.
    """
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def load_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """Read a .txt, .toml or .json prompt file in sd-scripts' formats into a list of prompt dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [parse_prompt_line(line) for line in prompt_file_lines(path.read_text(encoding="utf-8"))]
    if suffix == ".toml":
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        defaults = {k: v for k, v in data.get("prompt", {}).items() if k != "subset"}
        return [{**defaults, **entry} for entry in data.get("prompt", {}).get("subset", [])]
    if suffix == ".json":
        entries = json.loads(path.read_text(encoding="utf-8"))
        return [parse_prompt_line(entry) if isinstance(entry, str) else dict(entry) for entry in entries]
    raise ValueError(f"{path.name}: prompt files must be .txt, .toml or .json")
