"""What saved files are called, which old ones go, and when saving and sampling are due (spec §7 "When", §8).

Names follow sd-scripts so that people who know kohya find their files where they expect them:

    <name>-000001.safetensors        after epoch 1            <name>-000001-state/
    <name>-step00000500.safetensors  after optimizer step 500 <name>-step00000500-state/
    <name>.safetensors               at the end               <name>-state/
    <stem>-ema.safetensors           the EMA of the trained weights beside each of them (ema.save = "beside")

Diffusers formats are folders named by the stem. Everything here is plain arithmetic on names and numbers, so the
GUI can use it to list a run's checkpoints without importing torch.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.config.choices import SaveModelAs
from engine.config.sections_output import SamplingSection
from engine.files import retired_name

# save_model_as -> file name extension; diffusers formats are folders, named by the bare stem
EXTENSIONS: dict[str, str] = {
    "safetensors": ".safetensors",
    "ckpt": ".ckpt",
    "pt": ".pt",
    "diffusers": "",
    "diffusers_safetensors": "",
}


def epoch_stem(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}"


def step_stem(name: str, step: int) -> str:
    return f"{name}-step{step:08d}"


def last_stem(name: str) -> str:
    """The final model keeps the plain output name, as in sd-scripts."""
    return name


EMA_SUFFIX = "-ema"


def ema_stem(stem: str) -> str:
    """The stem of the EMA weights saved beside the checkpoint `stem` (ema.save = "beside")."""
    return stem + EMA_SUFFIX


def state_dir_name(stem: str) -> str:
    return f"{stem}-state"


def file_name(stem: str, save_as: SaveModelAs) -> str:
    """The file (or, for diffusers formats, folder) name a model saved under `stem` gets."""
    return stem + EXTENSIONS[save_as]


# --- retention ---------------------------------------------------------------------------------------------------


def epoch_files_to_remove(name: str, epoch: int, *, every_n: int, keep_last_n: int) -> list[str]:
    """Stems of per-epoch saves that fall out of the kept window once epoch `epoch` is saved (0 or 1 of them).

    sd-scripts removes epoch `epoch - every_n * keep_last_n` at each save. Saves happen at multiples of every_n,
    so calling this at every save walks the same sequence and keeps exactly the newest keep_last_n files.
    The caller removes both `file_name(stem, ...)` and `state_dir_name(stem)` where they exist.
    """
    if every_n <= 0 or keep_last_n <= 0:
        return []
    old = epoch - every_n * keep_last_n
    return [epoch_stem(name, old)] if old >= 1 else []


def floor_to_multiple(value: int, multiple: int) -> int:
    return value - value % multiple


def step_files_to_remove(name: str, step: int, *, every_n: int, keep_last_n_steps: int) -> list[str]:
    """Stems of per-step saves older than the last keep_last_n_steps steps, once step `step` is saved (0 or 1).

    keep_last_n_steps is measured in steps, not files (spec §8): the save at
    floor_to_multiple(step - keep_last_n_steps - 1, every_n) is the newest one that is now too old.
    """
    if every_n <= 0 or keep_last_n_steps <= 0:
        return []
    old = floor_to_multiple(step - keep_last_n_steps - 1, every_n)
    return [step_stem(name, old)] if old >= 1 else []


def retire_sparing_best(due: list[str], spared: list[str], best: str | None) -> tuple[list[str], list[str]]:
    """saving.keep_best: of the stems retention retires now (`due`) and those it retired earlier but kept because
    they held the lowest validation loss (`spared`), which to remove now and which to keep spared.

    Only the best stem is ever spared, so at most one checkpoint outlives the retention window; when a newer file
    becomes the best, the one spared before is removed at the next call.
    """
    remove: list[str] = []
    keep: list[str] = []
    for stem in dict.fromkeys([*spared, *due]):
        (keep if stem == best else remove).append(stem)
    return remove, keep


def validation_record_name(name: str) -> str:
    """The JSON beside a run's checkpoints that lists their validation losses and the best one (docs/events.md)."""
    return f"{name}-validation.json"


# --- when ------------------------------------------------------------------------------------------------------


def epoch_save_due(epoch: int, num_epochs: int, every_n: int) -> bool:
    """Save after 1-based epoch `epoch`? Never after the last one: the final model is written under the last name."""
    return every_n > 0 and epoch % every_n == 0 and epoch < num_epochs


def step_save_due(step: int, every_n: int) -> bool:
    """Save after optimizer step `step` (counted from 1)?"""
    return every_n > 0 and step > 0 and step % every_n == 0


def sample_due_at_start(section: SamplingSection) -> bool:
    return section.sample_at_first


def sample_due_after_step(step: int, section: SamplingSection) -> bool:
    """Sample after optimizer step `step`? Epoch-based sampling, when set, overrides step-based (spec §7)."""
    if section.sample_every_n_epochs > 0:
        return False
    every_n = section.sample_every_n_steps
    return every_n > 0 and step > 0 and step % every_n == 0


def sample_due_after_epoch(epoch: int, section: SamplingSection) -> bool:
    """Sample at the end of 1-based epoch `epoch`?"""
    every_n = section.sample_every_n_epochs
    return every_n > 0 and epoch % every_n == 0


# --- never overwrite a user's files ----------------------------------------------------------------------------


# Files a full fine-tune may write beside each model: SD3's trained text encoders, `<name>_clip_l.safetensors` ...
# (sd-scripts' sd3_train naming). A user's own file of such a name makes the run pick another name, as the model does.
COMPANION_SUFFIXES = ("_clip_l", "_clip_g", "_t5xxl")


def _output_pattern(name: str, save_as: SaveModelAs) -> re.Pattern[str]:
    """Matches every name a run called `name` writes: last, per-epoch and per-step models, their EMA files, the
    text-encoder files saved beside them, and their states."""
    stems = rf"{re.escape(name)}(?:-\d{{6,}}|-step\d{{8,}})?"
    companions = "|".join(re.escape(suffix) for suffix in COMPANION_SUFFIXES)
    models = rf"(?:{re.escape(EMA_SUFFIX)})?(?:{companions})?{re.escape(EXTENSIONS[save_as])}"
    return re.compile(rf"{stems}(?:{models}|-state)")


def owns_name(name: str, save_as: SaveModelAs, entry: str) -> bool:
    """Whether `entry` (a bare file or folder name) is one a run called `name` writes."""
    return _output_pattern(name, save_as).fullmatch(entry) is not None


def _resumes_into(output_dir: Path, pattern: re.Pattern[str], resume_from: str | Path | None) -> bool:
    """True when the run continues a state saved in output_dir under this name: those files are the run's own."""
    if not resume_from:
        return False
    state = Path(resume_from).expanduser().resolve()
    return state.parent == output_dir.resolve() and pattern.fullmatch(state.name) is not None


def name_in_use(output_dir: str | Path, name: str, save_as: SaveModelAs) -> bool:
    """Whether output_dir already holds a model or state that a run called `name` would write."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return False
    pattern = _output_pattern(name, save_as)
    # A retired folder counts: the run that wrote it may be resumed, and its state is restored under its name.
    return any(pattern.fullmatch(entry.name) or _retired_match(pattern, entry.name) for entry in directory.iterdir())


def _retired_match(pattern: re.Pattern[str], entry: str) -> bool:
    retired = retired_name(entry)  # a save interrupted between the two renames of its replacement
    return retired is not None and pattern.fullmatch(retired) is not None


def unique_output_name(
    output_dir: str | Path, name: str, save_as: SaveModelAs, *, resume_from: str | Path | None = None,
) -> tuple[str, bool]:
    """The output name to use so that a new run never overwrites files it did not write, and whether it changed.

    When files of `name` (the final model, per-epoch or per-step saves, or their states) already exist,
    "-2", "-3", ... is appended. A run resuming from a state folder of `name` inside output_dir continues that
    run, so its files are its own and the name is kept.
    """
    directory = Path(output_dir)
    if _resumes_into(directory, _output_pattern(name, save_as), resume_from):
        return name, False
    candidate, suffix = name, 2
    while name_in_use(directory, candidate, save_as):
        candidate, suffix = f"{name}-{suffix}", suffix + 1
    return candidate, candidate != name
