"""Small layers reused by several backbones."""

from __future__ import annotations

import torch
from torch import nn


class TargetAttention(nn.Module):
    """Attention over the behaviour sequence keyed by the target ad (DIN / ESU style).

    Scores are scaled dot products between the projected target and each history token, so
    the cost is linear in history length; padded positions are masked out.

    Args:
        dim: token width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, target: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor):
        """target [B, D], history [B, L, D], lengths [B] -> pooled history [B, D]."""
        scores = torch.einsum("bd,bld->bl", self.query(target), self.key(history)) * self.scale
        valid = torch.arange(history.shape[1], device=history.device) < lengths.unsqueeze(1)
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # empty histories pool to zero
        return torch.einsum("bl,bld->bd", weights, history)
