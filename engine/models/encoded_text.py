"""What encoding captions gives the denoiser, for every family: the type shared by engine.models.text_encoding and
the families' own encoders (engine.models.flux.text, engine.models.sd3.text), which it dispatches to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["EncodedText"]


@dataclass
class EncodedText:
    """Text-encoder outputs for a batch of captions, on the encoders' device and dtype.

    Attributes:
        hidden_states: [B, max_token_length + 2, D]; D is the encoder width (SD1/SD2) or both widths (SDXL).
        pooled: [B, projection dim] of SDXL's second encoder, or CLIP-L's pooled output for FLUX.1; None for SD1/SD2
            and Chroma.
        mask: [B, L] bool, True at real tokens: T5's padding mask (FLUX.1, Chroma); None for the CLIP families.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor | None = None
