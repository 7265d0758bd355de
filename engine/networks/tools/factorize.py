"""Singular value decompositions of weight changes and the LoRA factors they give at a chosen rank.

A module's change is a matrix once the kernel is flattened: [out, in*kh*kw]. Cutting its SVD at rank r gives the
best rank-r approximation in the Frobenius norm (Eckart-Young), which is how resize, ``merge --svd`` and extract
choose their factors; the fraction of the norm kept is ``sqrt(sum(s[:r]^2) / sum(s^2))`` (what kohya's
resize_lora reports as "retained fro").

A change that is already a product ``up @ down`` of rank r needs no SVD of the whole matrix: QR of both factors
leaves an r x r core whose SVD gives the same singular values and vectors, exactly and in a fraction of the time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.networks.tools.lora_file import LoRAWeights

__all__ = ["RANK_RULES", "Spectrum", "choose_rank", "clamp_factors", "spectrum_of_factors", "spectrum_of_matrix"]


@dataclass
class Spectrum:
    """``u @ diag(s) @ vh`` equals a module's change flattened to [out, in*kh*kw]; s is in descending order."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    weight_shape: tuple[int, ...]

    def retained(self, rank: int) -> float:
        """The fraction of the change's Frobenius norm kept by the first ``rank`` singular values (1 for zero)."""
        squares = self.s.double().square()
        total = float(squares.sum())
        return 1.0 if total == 0 else math.sqrt(float(squares[:rank].sum()) / total)

    def to_lora(self, rank: int, scale: float = 1.0) -> LoRAWeights:
        """Factors of the rank-``rank`` cut with ``alpha/rank = scale``: the singular values are split evenly
        (``sqrt(s)`` on each side), which keeps up and down of similar size for training on and for fp16."""
        root = (self.s[:rank] / scale).sqrt()
        up = (self.u[:, :rank] * root).float()
        down = (root[:, None] * self.vh[:rank]).float()
        out, *rest = self.weight_shape
        if len(rest) == 3:  # conv: down keeps the kernel, up is 1x1 (spec §5.1)
            return LoRAWeights(down.reshape(rank, *rest).contiguous(), up.reshape(out, rank, 1, 1).contiguous(),
                               scale * rank)
        return LoRAWeights(down.contiguous(), up.contiguous(), scale * rank)


def clamp_factors(weights: LoRAWeights, quantile: float) -> LoRAWeights:
    """sd-scripts' ``--clamp_quantile`` of its extract scripts: the values of up and down together beyond their
    ``quantile`` (by value, e.g. 0.99) are clipped to +-that value, which bounds the outliers an fp16 save would
    overflow on, at the cost of changing the product a little. (sd-scripts puts the singular values into up; here
    they are split evenly, so the clipped entries differ.)"""
    import numpy

    values = torch.cat([weights.up.flatten(), weights.down.flatten()]).double().numpy()
    high = float(numpy.quantile(values, quantile))
    return LoRAWeights(weights.down.clamp(-high, high), weights.up.clamp(-high, high), weights.alpha)


def spectrum_of_factors(weights: LoRAWeights) -> Spectrum:
    """The exact SVD of ``weights.delta()`` from its factors (QR of each, then the SVD of the small core)."""
    up = weights.up.double().flatten(1) * weights.scale
    down = weights.down.double().flatten(1)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return Spectrum(q_up @ u, s, vh @ q_down.T, weights.weight_shape)


def spectrum_of_matrix(delta: torch.Tensor) -> Spectrum:
    """The SVD of a full change (float32, on the tensor's device; results come back to the CPU)."""
    u, s, vh = torch.linalg.svd(delta.float().flatten(1), full_matrices=False)
    return Spectrum(u.cpu(), s.cpu(), vh.cpu(), tuple(delta.shape))


def _fixed_rank(s: torch.Tensor, value: float) -> int:
    return int(value)


def _sv_ratio(s: torch.Tensor, value: float) -> int:
    """kohya's sv_ratio: keep the singular values at least s[0] / value."""
    return int((s >= s[0] / value).sum()) if float(s[0]) > 0 else 1


def _sv_fro(s: torch.Tensor, value: float) -> int:
    """kohya's sv_fro: the smallest rank that keeps at least ``value`` of the Frobenius norm."""
    squares = s.double().square()
    total = float(squares.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    return int((kept < value**2 - 1e-12).sum()) + 1


# How a module's new rank is chosen from its singular values: rule name -> (s, value) -> rank.
RANK_RULES: dict[str, Callable[[torch.Tensor, float], int]] = {
    "rank": _fixed_rank,
    "sv_ratio": _sv_ratio,
    "sv_fro": _sv_fro,
}


def choose_rank(spectrum: Spectrum, rule: str, value: float) -> int:
    """The rank :data:`RANK_RULES` gives, between 1 and the number of singular values (no rank is invented)."""
    rank = RANK_RULES[rule](spectrum.s, value)
    return max(1, min(rank, int(spectrum.s.numel())))
