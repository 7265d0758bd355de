#!/usr/bin/env python
"""Build Atelier's tiny test models and data: offline, deterministic (fixed seeds), a few seconds on 2 cores.

    python tools/make_tiny_model.py OUT_DIR [--only sd1,sd2,sdxl,blip,git,wd14,dataset] [--force]

Layout under OUT_DIR:

* ``sd1/``, ``sd2/``, ``sdxl/``: diffusers pipeline folders with the real CLIP tokenizers; ``sd1.safetensors``
  etc.: the same weights as original-layout single-file checkpoints (converted by ``engine.models``, with the
  diffusers configs embedded in their metadata).
* ``blip/``, ``git/``: transformers captioning models with their processors.
* ``wd14/``: ``model.onnx`` + ``selected_tags.csv`` shaped like a SmilingWolf WD14 tagger.
* ``dataset/``: ``img/10_sks dog/`` (captioned) and ``reg/1_dog/`` images.

Each artefact folder holds a stamp file with a version string; a call finds a current stamp and skips the work,
so repeated builds (e.g. one per test session) are cheap. Change a ``*_VERSION`` constant to force a rebuild.

The builders are importable (``build_sd``, ``build_blip``, ``build_git``, ``build_wd14``, ``build_dataset``,
``build_all``). This folder is not a package, so load this file with ``importlib`` (see tests/conftest.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Set before anything imports huggingface_hub, which reads them once: these builders must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# tools/ is not a package: make its helper package and the repository's `engine` importable however this file
# was loaded (as a script, or through importlib from the tests). Appended, so installed copies win.
_TOOLS_DIR = Path(__file__).resolve().parent
for _path in (_TOOLS_DIR, _TOOLS_DIR.parent):
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

from tiny_models import CAPTIONER_VERSION, DATASET_VERSION, SD_VERSION, WD14_VERSION  # noqa: E402
from tiny_models.dataset import INSTANCE_FOLDER, REGULARISATION_FOLDER  # noqa: E402

SD_FAMILIES = ("sd1", "sd2", "sdxl")
ARTEFACTS = (*SD_FAMILIES, "blip", "git", "wd14", "dataset")
STAMP_NAME = ".atelier-tiny-stamp"
WD14_DEFAULT_INPUT_SIZE = 448  # what the published WD14 taggers take


def _build_once(target: Path, version: str, write: Callable[[Path], None], siblings: Iterable[Path] = ()) -> Path:
    """Run ``write(target)`` unless ``target`` already carries a stamp with ``version``.

    The stamp is written last, so an interrupted build leaves no stamp and is redone from scratch next time.
    ``siblings`` are outputs written beside ``target`` (the single-file checkpoints) that must exist too.
    """
    siblings = tuple(siblings)
    stamp = target / STAMP_NAME
    if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == version and all(p.exists() for p in siblings):
        return target
    shutil.rmtree(target, ignore_errors=True)
    for sibling in siblings:
        sibling.unlink(missing_ok=True)
    target.mkdir(parents=True)
    write(target)
    stamp.write_text(version + "\n", encoding="utf-8")
    return target


def sd_checkpoint_path(out_dir: str | Path, family: str) -> Path:
    """Where :func:`build_sd` writes the single-file checkpoint of ``family``."""
    return Path(out_dir) / f"{family}.safetensors"


def build_sd(family: str, out_dir: str | Path) -> Path:
    """Build the tiny ``family`` ("sd1", "sd2" or "sdxl") pipeline folder and its single-file checkpoint.

    Returns:
        The diffusers folder ``OUT/<family>``; the checkpoint is ``sd_checkpoint_path(OUT, family)``.
    """
    if family not in SD_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {SD_FAMILIES}")
    checkpoint = sd_checkpoint_path(out_dir, family)

    def write(folder: Path) -> None:
        from tiny_models.sd import write_sd  # Lazy: torch/diffusers load only when something must be built.

        write_sd(family, folder, checkpoint)

    return _build_once(Path(out_dir) / family, f"atelier-tiny-{family}-v{SD_VERSION}", write, siblings=[checkpoint])


def build_blip(out_dir: str | Path) -> Path:
    """Build ``OUT/blip``: a BlipForConditionalGeneration + BlipProcessor folder."""

    def write(folder: Path) -> None:
        from tiny_models.captioners import write_blip

        write_blip(folder)

    return _build_once(Path(out_dir) / "blip", f"atelier-tiny-blip-v{CAPTIONER_VERSION}", write)


def build_git(out_dir: str | Path) -> Path:
    """Build ``OUT/git``: a GitForCausalLM + GitProcessor folder."""

    def write(folder: Path) -> None:
        from tiny_models.captioners import write_git

        write_git(folder)

    return _build_once(Path(out_dir) / "git", f"atelier-tiny-git-v{CAPTIONER_VERSION}", write)


def build_wd14(out_dir: str | Path, input_size: int = WD14_DEFAULT_INPUT_SIZE) -> Path:
    """Build a WD14-style tagger folder (``model.onnx`` + ``selected_tags.csv``).

    Args:
        out_dir: the output root.
        input_size: the square input side; 448 like the real taggers (folder ``wd14``), anything else goes to
            ``wd14_<size>`` so that a small fast variant can sit beside the default one.

    Raises:
        ModuleNotFoundError: ``onnx`` is missing (``pip install onnx``).
    """

    def write(folder: Path) -> None:
        from tiny_models.wd14 import write_wd14  # imports onnx itself, with an install hint if it is missing

        write_wd14(folder, input_size=input_size)

    name = "wd14" if input_size == WD14_DEFAULT_INPUT_SIZE else f"wd14_{input_size}"
    return _build_once(Path(out_dir) / name, f"atelier-tiny-wd14-v{WD14_VERSION}-{input_size}", write)


def build_dataset(out_dir: str | Path) -> Path:
    """Build ``OUT/dataset`` with ``img/10_sks dog/`` (images + .txt captions) and ``reg/1_dog/``."""
    from tiny_models.dataset import write_dataset  # light: PIL is imported only while drawing

    return _build_once(Path(out_dir) / "dataset", f"atelier-tiny-dataset-v{DATASET_VERSION}", write_dataset)


def build_all(out_dir: str | Path, only: Iterable[str] | None = None) -> dict[str, Path]:
    """Build every artefact (or those in ``only``) under ``out_dir``.

    Returns:
        Paths by name: ``sd1``/``sd2``/``sdxl`` (diffusers folders), ``sd1_ckpt``/``sd2_ckpt``/``sdxl_ckpt``
        (single files), ``blip``, ``git``, ``wd14`` (folders), ``dataset`` with ``dataset_img`` (the
        ``img`` folder, i.e. a kohya train_data_dir) and ``dataset_reg`` (the ``reg`` folder).

    Raises:
        ValueError: ``only`` names an unknown artefact.
    """
    wanted = list(ARTEFACTS if only is None else only)
    unknown = sorted(set(wanted) - set(ARTEFACTS))
    if unknown:
        raise ValueError(f"unknown artefacts {unknown}; choose from {', '.join(ARTEFACTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in ARTEFACTS:  # fixed order, whatever the order of `only`
        if name not in wanted:
            continue
        if name in SD_FAMILIES:
            paths[name] = build_sd(name, out_dir)
            paths[f"{name}_ckpt"] = sd_checkpoint_path(out_dir, name)
        elif name == "dataset":
            paths[name] = build_dataset(out_dir)
            paths["dataset_img"] = paths[name] / Path(INSTANCE_FOLDER).parent
            paths["dataset_reg"] = paths[name] / Path(REGULARISATION_FOLDER).parent
        else:
            paths[name] = {"blip": build_blip, "git": build_git, "wd14": build_wd14}[name](out_dir)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output root folder")
    parser.add_argument("--only", default=",".join(ARTEFACTS), help=f"comma list from: {','.join(ARTEFACTS)}")
    parser.add_argument("--force", action="store_true", help="rebuild even when a current stamp exists")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.force:
        for stamp in args.out_dir.glob(f"*/{STAMP_NAME}"):
            stamp.unlink()
    started = time.perf_counter()
    try:
        paths = build_all(args.out_dir, only)
    except (ValueError, ModuleNotFoundError) as error:
        parser.error(str(error))
    for name, path in paths.items():
        print(f"{name:12} {path}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
