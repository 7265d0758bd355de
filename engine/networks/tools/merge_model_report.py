"""What `lora merge --into-model` wrote, whichever path made it: through the loaded model
(engine.networks.tools.merge_model) or file by file (engine.networks.tools.merge_files).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ModelMergeReport"]


@dataclass
class ModelMergeReport:
    """What :func:`merge_into_model` wrote: the checkpoint, its family, and the modules merged from each LoRA."""

    output: str
    base: str
    family: str
    loras: list[dict[str, Any]] = field(default_factory=list)  # {"file", "ratio", "modules": {part: count}}
    components: dict[str, str] = field(default_factory=dict)  # text encoders written to their own files

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        lines = [f"base model: {self.base} ({self.family})"]
        for entry in self.loras:
            parts = ", ".join(f"{part} {count}" for part, count in entry["modules"].items())
            lines.append(f"merged {entry['file']} at {entry['ratio']:g}: {sum(entry['modules'].values())} modules "
                         f"({parts})")
        lines.append(f"wrote {self.output}")
        lines += [f"wrote {path} ({name})" for name, path in self.components.items()]
        return "\n".join(lines)
