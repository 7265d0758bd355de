"""Walking one source file: the `Source` bookkeeping, table mapping, leftover keys and sd-scripts' default pins.

Every key of a source file passes through here exactly once: a handler or `map_keys` maps it, or `finish` records
it as unset (empty, or at the source tool's own default) or skipped (a value Atelier cannot use).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from engine.config.importers import ImportResult, Skipped
from engine.config.importers.common import MISSING, NOT_SUPPORTED, convert, field_specs, is_blank, put, same_value
from engine.config.paths import get_path, set_path

# --- walking a source file ---------------------------------------------------------------------------------------


@dataclass
class Source:
    """One source file being imported: its flat keys, the result, and which keys have been dealt with."""

    data: Mapping[str, Any]
    result: ImportResult
    blank: Callable[[Any], bool] = is_blank
    done: set[str] = field(default_factory=set)

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def given(self, key: str) -> bool:
        """The key is present with a value that counts (not blank/off for this format)."""
        return key in self.data and not self.blank(self.data[key])

    def mark(self, key: str) -> None:
        """Mark a key (or the key holding a sub-key such as 'network_args.conv_dim') as dealt with."""
        self.done.add(key.split(".")[0].split("[")[0])

    def put(self, key: str, path: str, value: Any = MISSING) -> bool:
        self.mark(key)
        return put(self.result, path, self.data[key] if value is MISSING else value, key)

    def put_converted(self, key: str, path: str, parse: Callable[[Any], Any]) -> bool:
        try:
            value = parse(self.data[key])
        except (ValueError, TypeError) as error:
            self.skip(key, f"cannot be read for {path}: {error}")
            return False
        return self.put(key, path, value)

    def skip(self, key: str, reason: str, value: Any = MISSING) -> None:
        self.mark(key)
        self.result.skipped.append(Skipped(key, self.data.get(key) if value is MISSING else value, reason))

    def unset(self, key: str) -> None:
        self.mark(key)
        if (key in self.data or "." in key) and key not in self.result.unset:
            self.result.unset.append(key)

    def note(self, text: str) -> None:
        self.result.notes.append(text)

    def inert(self, key: str, default: Any, why: str) -> None:
        """A key the source tool itself ignored here: unset at its default, skipped (with why) otherwise."""
        if key not in self.data or key in self.done:
            return
        value = self.data[key]
        if self.blank(value) or same_value(value, default):
            self.unset(key)
        else:
            self.skip(key, why)

    def used(self, key: str, paths: list[str]) -> None:
        """A selector key (e.g. noise_offset_type) that decided how other keys were mapped."""
        self.mark(key)
        self.result.mapped.setdefault(key, []).extend(paths)

    def is_set(self, path: str) -> bool:
        return get_path(self.result.overlay, path, MISSING) is not MISSING


Converter = Callable[[Any], Any]
Target = str | tuple[str, Converter]


def map_keys(source: Source, table: Mapping[str, Target]) -> None:
    """Map every not-yet-handled key of `table`: blank values are unset, others converted onto their field."""
    for key, target in table.items():
        if key not in source.data or key in source.done:
            continue
        if source.blank(source.data[key]):
            source.unset(key)
        elif isinstance(target, tuple):
            source.put_converted(key, *target)
        else:
            source.put(key, target)


def finish(source: Source, known_defaults: Mapping[str, Any] | None = None, reason: str = NOT_SUPPORTED) -> None:
    """Account for the keys nothing handled: unset when empty or at the source tool's default, skipped otherwise."""
    known_defaults = known_defaults or {}
    for key, value in source.data.items():
        if key in source.done:
            continue
        if source.blank(value) or (key in known_defaults and same_value(value, known_defaults[key])):
            source.unset(key)
        else:
            source.skip(key, reason)


@dataclass(frozen=True)
class Pin:
    """A default of sd-scripts that differs from Atelier's, applied when the source leaves the key unset."""

    path: str
    value: Any
    methods: tuple[str, ...] = ("lora", "dreambooth", "finetune", "textual_inversion")


def apply_pins(source: Source, pins: Iterable[Pin], why: str = "not set in the file, so sd-scripts' default is kept"
               ) -> None:
    """Set each pinned default the overlay leaves unset, with a note, so the run behaves as it did before."""
    method = source.result.overlay.get("method", "lora")
    family = get_path(source.result.overlay, "model.model_family", "auto")
    for pin in pins:
        families = field_specs()[pin.path].families
        if method not in pin.methods or source.is_set(pin.path) or (families and family not in families):
            continue  # a setting of another family (or of one not declared yet) keeps Atelier's default
        set_path(source.result.overlay, pin.path, convert(pin.path, pin.value))
        default = field_specs()[pin.path].default
        source.note(f"{pin.path} = {pin.value!r}: {why} (Atelier's default is {default!r})")


# --- relative paths ----------------------------------------------------------------------------------------------

_PATH_WIDGETS = ("folder", "file")
_SUBSET_PATH_KEYS = ("image_dir", "metadata_file", "conditioning_data_dir")


def _is_relative(value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and not PurePosixPath(value).is_absolute()
            and not PureWindowsPath(value).is_absolute())


def note_relative_paths(result: ImportResult, tool: str) -> None:
    """Relative paths meant the tool's working folder; Atelier reads them relative to the config file."""
    overlay = result.overlay
    found = [spec.path for spec in field_specs().values()
             if spec.widget in _PATH_WIDGETS and _is_relative(get_path(overlay, spec.path, ""))]
    for index, dataset in enumerate(get_path(overlay, "dataset.datasets", [])):
        for sub, subset in enumerate(dataset.get("subsets", [])):
            found += [f"dataset.datasets[{index}].subsets[{sub}].{key}" for key in _SUBSET_PATH_KEYS
                      if _is_relative(subset.get(key))]
    if found:
        result.notes.append(f"relative paths ({', '.join(found)}) were relative to the folder {tool} was started "
                            "in; Atelier reads them relative to the config file, so check them or make them absolute")
