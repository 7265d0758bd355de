"""What `lora extract` wrote, whichever path made it: through the loaded models (engine.networks.tools.extract) or
file by file (engine.networks.tools.extract_files).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ExtractReport"]


@dataclass
class ExtractReport:
    """What :func:`extract_lora` wrote: modules per part, parts left out and why, and the kept fraction."""

    base: str
    tuned: str
    output: str
    family: str
    rank: int
    conv_rank: int
    modules: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # part -> reason
    retained: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        parts = ", ".join(f"{part} {count}" for part, count in self.modules.items())
        lines = [f"extracted {self.tuned} minus {self.base} ({self.family}) at rank {self.rank}"
                 + (f", conv rank {self.conv_rank}" if self.conv_rank else ""),
                 f"modules: {sum(self.modules.values())} ({parts})"]
        lines += [f"left out {part}: {reason}" for part, reason in self.skipped.items()]
        if self.retained:
            lines.append(f"kept of each difference (Frobenius): min {self.retained['min']:.4f} "
                         f"({self.retained['min_module']}), mean {self.retained['mean']:.4f}")
        lines.append(f"wrote {self.output}")
        return "\n".join(lines)
