"""``lora resize``: change the rank of every module of a LoRA by SVD of its change (kohya's resize_lora).

The new rank is fixed (``--rank``) or chosen per module from the singular values (``--sv-ratio``, ``--sv-fro``, as
kohya's dynamic methods). Each module keeps its scale alpha/rank, so a resized LoRA trains on at the same learning
rates; the report says how much of each module's change (Frobenius norm) the new rank keeps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.networks.metadata import SPLIT_QKV_ALPHA_KEY
from engine.networks.tools.factorize import RANK_RULES, choose_rank, spectrum_of_factors
from engine.networks.tools.lora_file import (
    ToolError,
    count_values,
    new_output,
    read_kohya_lora,
    summary_stats,
    write_lora,
)
from engine.networks.tools.metadata_keys import network_args, shape_metadata

__all__ = ["ResizeReport", "resize_lora"]

# Each rule's valid values: (check, what the message says).
_RULE_CHECKS = {
    "rank": (lambda value: value >= 1 and value == int(value), "a whole number of at least 1"),
    "sv_ratio": (lambda value: value >= 1, "at least 1 (the largest singular value over the smallest kept)"),
    "sv_fro": (lambda value: 0 < value <= 1, "above 0 and at most 1 (the fraction of the norm to keep)"),
}


@dataclass
class ResizeReport:
    """What :func:`resize_lora` wrote: ranks before and after, and the kept fraction per module (min/mean)."""

    input: str
    output: str
    rule: str
    value: float
    ranks_before: dict[str, int] = field(default_factory=dict)
    ranks_after: dict[str, int] = field(default_factory=dict)
    retained: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        def ranks(counts: dict[str, int]) -> str:
            return ", ".join(f"{rank} ({count} modules)" for rank, count in counts.items())

        return "\n".join([
            f"resized {self.input} ({self.rule} {self.value:g})",
            f"ranks before: {ranks(self.ranks_before)}", f"ranks after: {ranks(self.ranks_after)}",
            f"kept of each change (Frobenius): min {self.retained['min']:.4f} ({self.retained['min_module']}), "
            f"mean {self.retained['mean']:.4f}",
            f"wrote {self.output}",
        ])


def resize_lora(path: str | Path, output: str | Path, *, rule: str, value: float, conv_rank: int | None = None,
                save_dtype: torch.dtype | None = None) -> ResizeReport:
    """Write a copy of a kohya LoRA with new ranks.

    Args:
        rule: "rank" (``value`` is the rank), "sv_ratio" or "sv_fro" (:data:`RANK_RULES`). A rank above a module's
            current one keeps the current one: an SVD cannot add information.
        conv_rank: with rule "rank", the rank of 3x3 conv modules (default: ``value``).
        save_dtype: dtype of the saved up/down weights (default float32).

    Raises:
        ToolError: a bad rule or value, an existing output, or an input that is not a sound kohya LoRA.
    """
    _check_rule(rule, value, conv_rank)
    out = new_output(output, [path])
    lora = read_kohya_lora(path, action="resized")
    resized, retained = {}, {}
    for name, weights in lora.modules.items():
        spectrum = spectrum_of_factors(weights)
        target = conv_rank if (conv_rank and weights.is_spatial_conv) else value
        rank = choose_rank(spectrum, rule, target)
        resized[name] = spectrum.to_lora(rank, weights.scale)
        retained[name] = spectrum.retained(rank)
    note = f"resized with {rule} {value:g}" + (f", conv rank {conv_rank}" if conv_rank else "")
    comment = lora.metadata.get("ss_training_comment")
    # The SVD factors of a split_qkv module are no longer block-diagonal: the file is a plain LoRA now, which
    # loads (and trains on) without split_qkv, at the scale every loader applies (alpha / rank is kept).
    args = {key: value for key, value in network_args(lora.metadata).items() if key != "split_qkv"}
    kept = {key: value for key, value in lora.metadata.items() if key not in (SPLIT_QKV_ALPHA_KEY, "ss_network_args")}
    metadata = {**kept, **shape_metadata(resized, args),
                "ss_training_comment": f"{note}; {comment}" if comment not in (None, "", "None") else note}
    write_lora(out, resized, metadata, save_dtype)
    return ResizeReport(str(path), str(out), rule, value, count_values(w.rank for w in lora.modules.values()),
                        count_values(w.rank for w in resized.values()),
                        summary_stats(retained))


def _check_rule(rule: str, value: float, conv_rank: int | None) -> None:
    if rule not in RANK_RULES:
        raise ToolError(f"unknown resize rule {rule!r}; use one of {', '.join(RANK_RULES)}")
    check, expected = _RULE_CHECKS[rule]
    if not check(value):
        raise ToolError(f"--{rule.replace('_', '-')} must be {expected}, got {value:g}")
    if conv_rank is not None and (rule != "rank" or conv_rank < 1):
        raise ToolError("--conv-rank goes with --rank and must be at least 1")
