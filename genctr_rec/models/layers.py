"""Small layers reused by several backbones."""

from __future__ import annotations

import torch
from torch import nn

from genctr_rec.config import CONTEXT_FUSIONS


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


class ContextHead(nn.Module):
    """The final layer, where GenCTR's g(s, c) joins the backbone (model integration).

    * ``concat`` (the paper's reading): logit = w · [h, g] + b, default initialisation.
    * ``residual``: the same layer with g's weights starting at zero, so fine-tuning starts
      from the backbone's own prediction and g enters only as far as it helps.
    * ``product``: ``residual`` plus g ⊙ e(target item): pre-training scored the next item by
      g · e(item), so one linear layer over the product can start from that very score.

    Args:
        hidden: width of the backbone's last hidden layer.
        context_dim: width of g (0: no model integration, the head is one linear layer).
        fusion: ``concat``, ``residual`` or ``product``.
        item_dim: width of the target item's embedding (``product``).
        dropout: dropout on g during training (regularises the decoder branch).
    """

    def __init__(
        self,
        hidden: int,
        context_dim: int = 0,
        fusion: str = "concat",
        item_dim: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if fusion not in CONTEXT_FUSIONS:
            raise ValueError(f"fusion must be one of {CONTEXT_FUSIONS}, got {fusion!r}")
        self.final = nn.Linear(hidden, 1)
        self.product = fusion == "product"
        self.context: nn.Module | None = None
        self.dropout = nn.Dropout(dropout)
        if context_dim:
            width = context_dim + (item_dim if self.product else 0)
            self.context = nn.Linear(width, 1, bias=False)
            if fusion != "concat":
                nn.init.zeros_(self.context.weight)

    def forward(
        self, h: torch.Tensor, g: torch.Tensor | None = None, item: torch.Tensor | None = None
    ) -> torch.Tensor:
        logit = self.final(h).squeeze(1)
        if self.context is None or g is None:
            return logit
        g = self.dropout(g)
        parts = torch.cat([g, g * item], dim=1) if self.product and item is not None else g
        return logit + self.context(parts).squeeze(1)
