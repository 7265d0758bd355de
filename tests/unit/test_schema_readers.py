"""No dead keys: every setting the schema lists is read by the code that makes it work, or says who else reads it.

A setting is "read" when the engine outside its config package names it (as an attribute `.name` or a string key
"name"). The metadata writers do not count: a key that only they read is recorded as if it had run, which is the
defect this test exists for. Settings that the training code does not read carry `use=` (engine.config.base):
"metadata" (the metadata writer must read them), "file" (the config loader must) or "planned" (not built yet: a
value other than the default must be refused). This is a name-level check: it catches a key nothing mentions, and
the tests of each feature check that what mentions it does what it says.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from engine.config.dataset import DatasetEntry, Subset
from engine.config.describe import FieldSpec, iter_fields
from engine.config.errors import ConfigError
from engine.config.io import default_config_dict, validate_config
from engine.config.paths import set_path

ENGINE = Path(__file__).resolve().parents[2] / "engine"
METADATA_WRITERS = ("networks/metadata.py", "networks/dataset_metadata.py")
CONFIG_LOADERS = ("config/io.py", "config/migrations.py")
SUBSET_PREFIX = "dataset.datasets[].subsets[]."
DATASET_PREFIX = "dataset.datasets[]."


def all_settings() -> list[FieldSpec]:
    """Every leaf setting, the inline dataset and subset levels included (iter_fields treats those lists as one)."""
    dataset_level = [spec for spec in iter_fields(DatasetEntry, DATASET_PREFIX) if spec.name != "subsets"]
    return [*iter_fields(), *dataset_level, *iter_fields(Subset, SUBSET_PREFIX)]


@cache
def sources(kind: str) -> dict[str, str]:
    """Engine source files by relative path: "readers" (outside the config package and the metadata writers),
    "metadata" (the metadata writers) or "file" (the config loader)."""
    files = {str(path.relative_to(ENGINE)): path for path in ENGINE.rglob("*.py")}
    if kind == "metadata":
        chosen = [name for name in files if name in METADATA_WRITERS]
    elif kind == "file":
        chosen = [name for name in files if name in CONFIG_LOADERS]
    else:
        chosen = [name for name in files if not name.startswith("config/") and name not in METADATA_WRITERS]
    return {name: files[name].read_text(encoding="utf-8") for name in chosen}


def readers_of(name: str, kind: str = "readers") -> list[str]:
    mention = re.compile(rf"(\.{name}\b|[\"']{name}[\"'])")
    return [path for path, text in sources(kind).items() if mention.search(text)]


@pytest.mark.slow
def test_every_setting_is_read_or_says_who_reads_it():
    unread = [spec.path for spec in all_settings() if spec.use is None and not readers_of(spec.name)]
    assert not unread, (f"settings that nothing outside engine/config reads (implement them, or mark them with "
                        f"use='metadata' / 'planned' in their setting()): {unread}")


def test_metadata_only_settings_are_written_into_the_metadata():
    missing = [spec.path for spec in all_settings() if spec.use == "metadata" and not readers_of(spec.name, "metadata")]
    assert not missing, f"marked metadata-only but the metadata writers never read them: {missing}"


def test_loader_settings_are_read_by_the_loader():
    missing = [spec.path for spec in all_settings() if spec.use == "file" and not readers_of(spec.name, "file")]
    assert not missing, f"marked as read by the config loader but engine/config/io.py never reads them: {missing}"


def _other_value(spec: FieldSpec) -> Any:
    """A valid value other than the default, for a planned setting."""
    if spec.kind == "bool":
        return not spec.default
    if spec.kind in ("int", "float", "number"):
        low = spec.bounds.get("ge", spec.bounds.get("gt", 0))
        high = spec.bounds.get("le", spec.bounds.get("lt", low + 2))
        value = (low + high) / 2 if spec.kind != "int" else int(low) + 1
        return value if value != spec.default else (low + value) / 2
    raise AssertionError(f"add a non-default value for a planned {spec.kind} setting: {spec.path}")


def _config_with(spec: FieldSpec, value: Any) -> dict[str, Any]:
    data = default_config_dict()
    data["model"]["pretrained_model_name_or_path"] = "model.safetensors"
    if spec.path.startswith(SUBSET_PREFIX):
        data["dataset"]["datasets"] = [{"subsets": [{"image_dir": "img", spec.name: value}]}]
    elif spec.path.startswith(DATASET_PREFIX):
        data["dataset"]["datasets"] = [{spec.name: value, "subsets": [{"image_dir": "img"}]}]
    else:
        data["dataset"]["train_data_dir"] = "img"
        set_path(data, spec.path, value)
    return data


PLANNED = [spec for spec in all_settings() if spec.use == "planned"]


@pytest.mark.parametrize("spec", PLANNED, ids=[spec.path for spec in PLANNED])
def test_planned_settings_refuse_any_other_value(spec: FieldSpec):
    validate_config(_config_with(spec, spec.default), check_packages=False)  # the default is accepted
    with pytest.raises(ConfigError) as raised:
        validate_config(_config_with(spec, _other_value(spec)), check_packages=False)
    assert spec.name in str(raised.value), f"the refusal of {spec.path} does not name it: {raised.value}"


def test_the_check_finds_an_unread_key():
    # The check itself: a name no engine file mentions is found unread, one that the trainer reads is not.
    assert readers_of("gradient_checkpointing")
    assert not readers_of("no_such_setting_anywhere")
    assert readers_of("training_comment", "metadata") and not readers_of("training_comment")
