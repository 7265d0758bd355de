"""The kohya_ss GUI's LoRA_type and the network options it passes for each type (kohya_ss-gui.md §2a).

The GUI saves every option of every type; for the chosen type it passes only some of them on to sd-scripts (as
network_args), and ignores the rest. This table says which, so ignored options are not reported as lost.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.config.importers import handlers as shared
from engine.config.importers.common import is_blank
from engine.config.importers.source import Source

_CONV = ("conv_dim", "conv_alpha")
_LYCORIS_COMMON = ("LyCORIS_preset", "rank_dropout_scale", "train_norm")
_LOCON = (*_CONV, *_LYCORIS_COMMON, "bypass_mode", "dora_wd", "use_tucker", "use_scalar")
_LOKR = (*_CONV, *_LYCORIS_COMMON, "bypass_mode", "dora_wd", "factor", "use_cp", "use_scalar", "decompose_both")
_OFT = (*_CONV, *_LYCORIS_COMMON, "use_tucker", "use_scalar", "constrain", "rescaled")

# Lower-cased LoRA_type -> (Atelier network type, the option keys kohya_ss passes for it).
LORA_TYPES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "standard": ("lora", ()),
    "flux1": ("lora", ()),  # networks.lora_flux; its options are fields of their own (importers/flux.py)
    "kohya locon": ("locon", _CONV),
    "locon": ("locon", _LOCON),  # old configs' name for LyCORIS/LoCon
    "lycoris/locon": ("locon", _LOCON),
    "lycoris/loha": ("loha", _LOCON),
    "kohya loha": ("loha", _CONV),
    "lycoris/lokr": ("lokr", _LOKR),
    "kohya lokr": ("lokr", (*_CONV, "factor")),
    "lycoris/dylora": ("dylora", (*_CONV, *_LYCORIS_COMMON, "use_tucker", "unit")),
    "kohya dylora": ("dylora", (*_CONV, "unit")),
    "lycoris/ia3": ("ia3", (*_CONV, "LyCORIS_preset", "train_on_input")),
    "lycoris/glora": ("glora", (*_CONV, *_LYCORIS_COMMON)),
    "lycoris/boft": ("boft", _OFT),
    "lycoris/diag-oft": ("diag-oft", _OFT),
    "lycoris/native fine-tuning": ("full", (*_LYCORIS_COMMON, "use_tucker", "use_scalar")),
}
# The GUI's defaults of those options: an ignored option at its default was never touched by the user.
OPTION_DEFAULTS: Mapping[str, object] = {
    "conv_dim": 1, "conv_alpha": 1, "LyCORIS_preset": "full", "rank_dropout_scale": False, "train_norm": False,
    "bypass_mode": False, "dora_wd": False, "use_tucker": False, "use_scalar": False, "factor": -1,
    "use_cp": False, "decompose_both": False, "constrain": 0.0, "rescaled": False, "unit": 1,
    "train_on_input": True,
}
NOT_SUPPORTED_TYPES = ("Atelier trains Standard, LoCon, LoHa, LoKr, DyLoRA, iA3, GLoRA, BOFT, Diag-OFT and Native "
                       "Fine-Tuning networks")
# GUI field -> the network_args name it is passed as.
_OPTION_NAMES = {"LyCORIS_preset": "preset", "constrain": "constraint"}
_NOTES = {
    "lycoris/locon": "LyCORIS/LoCon is trained as Atelier's locon, which saves kohya's LoCon format",
    "locon": "LoCon (LyCORIS) is trained as Atelier's locon, which saves kohya's LoCon format",
    "kohya loha": "Kohya LoHa is trained with LyCORIS' LoHa",
    "kohya lokr": "Kohya LoKr is trained with LyCORIS' LoKr",
    "lycoris/dylora": "LyCORIS/DyLoRA is trained as sd-scripts' DyLoRA (networks.dylora) with its unit; LyCORIS' "
                      "own options do not apply to it",
}


def lookup(lora_type: str) -> tuple[str, str, tuple[str, ...]] | None:
    """(table name, network type, option keys) for a LoRA_type as saved ('LyCORIS/iA3' or just 'iA3')."""
    name = lora_type.strip().lower()
    for candidate in (name, f"lycoris/{name}"):
        if candidate in LORA_TYPES:
            return (candidate, *LORA_TYPES[candidate])
    return None


def lora_type(source: Source) -> None:
    """LoRA_type -> network.network_type, and its options -> conv_dim / network_args."""
    value = str(source.get("LoRA_type") or "Standard")
    found = lookup(value)
    if found is None:
        if "LoRA_type" in source.data:
            source.skip("LoRA_type", f"{NOT_SUPPORTED_TYPES}; not {value}")
        for key, default in OPTION_DEFAULTS.items():
            source.inert(key, default, f"option of LoRA_type {value!r}, which is not imported")
        return
    name, network_type, used = found
    if "LoRA_type" in source.data:
        source.put("LoRA_type", "network.network_type", network_type)
    if name in _NOTES:
        source.note(_NOTES[name])
    options = {}
    for key, default in OPTION_DEFAULTS.items():
        if key not in source.data:
            continue
        if key not in used:
            source.inert(key, default, f"kohya_ss does not use it for LoRA_type {value!r}")
        elif is_blank(source.data[key]) or (source.blank(source.data[key]) and key not in _CONV):
            source.unset(key)  # a false/empty LyCORIS option is LyCORIS' default too; conv_dim 0 is a real value
        else:
            options[_OPTION_NAMES.get(key, key)] = (key, source.data[key])
    shared.network_options(source, network_type, options)

