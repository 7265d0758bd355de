"""Reading kohya's legacy folder layout (`<repeats>_<identifier> <class>` subfolders) with findings for every
folder that would be skipped, and what its name should be."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from engine.config.dataset import parse_legacy_folder_name
from engine.data.images import is_image_file
from engine.data.records import Finding

_TRAILING_NUMBER = re.compile(r"^(?P<name>.+?)[_ ](?P<repeats>\d+)$")


def suggest_folder_name(name: str) -> str:
    """A valid name close to what the user wrote: 'sks dog' -> '10_sks dog', 'dog_5' -> '5_dog', '0_x' -> '1_x'."""
    parsed = parse_legacy_folder_name(name)
    if parsed is not None:
        return f"1_{parsed.class_tokens}"
    trailing = _TRAILING_NUMBER.match(name)
    if trailing and int(trailing["repeats"]) > 0:
        return f"{int(trailing['repeats'])}_{trailing['name']}"
    return f"10_{name}"


def legacy_subset_params(
    root: Path, *, is_reg: bool, base: dict[str, Any],
) -> tuple[list[tuple[str, dict[str, Any]]], list[Finding]]:
    """(path, params) for each valid subfolder of a legacy train/reg folder, and findings for everything else."""
    kind = "regularization" if is_reg else "training"
    if not root.is_dir():
        return [], [Finding("error", "folder-missing", str(root), f"the {kind} folder does not exist",
                            "check the path, or create it and put image folders named like '10_sks dog' in it")]
    subsets, findings = [], []
    entries = sorted(root.iterdir())
    loose_images = [entry for entry in entries if entry.is_file() and is_image_file(entry)]
    if loose_images:
        findings.append(Finding(
            "warning", "images-outside-subfolder", str(root),
            f"{len(loose_images)} image(s) sit directly in the {kind} folder and are ignored",
            "move them into a subfolder named '<repeats>_<identifier> <class>', e.g. '10_sks dog'"))
    for folder in (entry for entry in entries if entry.is_dir() and not entry.name.startswith(".")):
        parsed = parse_legacy_folder_name(folder.name)
        if parsed is None or parsed.repeats < 1:
            reason = ("has no repeat count in front" if parsed is None else
                      f"has {parsed.repeats} repeats, so it would never be used")
            findings.append(Finding(
                "error", "folder-name", str(folder), f"the folder name '{folder.name}' {reason}",
                f"rename it to '{suggest_folder_name(folder.name)}' (format: <repeats>_<identifier> <class>)"))
            continue
        params = {**base, "image_dir": str(folder), "num_repeats": parsed.repeats,
                  "class_tokens": parsed.class_tokens or None, "is_reg": is_reg, "metadata_file": None,
                  "alpha_mask": False, "conditioning_data_dir": None}
        subsets.append((str(folder), params))
    if not subsets and not any(f.code == "folder-name" for f in findings):
        findings.append(Finding("error" if not is_reg else "warning", "folder-empty", str(root),
                                f"the {kind} folder has no subfolders of images",
                                "add a subfolder named like '10_sks dog' with your images in it"))
    return subsets, findings
