"""The per-candidate forward that training (``CTRModel``) and serving (``ScoreHead``) both run:
the backbone's dense input ``x0``, then the backbone, so that the two cannot drift apart.

``x0 = [e(target item), e(target category), e(query category), mean e(history items),
mean e(history categories), pooled side features (user, declared id / ids), dense features]``.
Dense features are standardised with the training data's mean and standard deviation
(:class:`DenseNorm`, kept in the run's config and the artifact) and clipped to +-8, so that an
outlier at serving time cannot swamp the other inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from genctr_rec.models.backbones import Backbone

BASE_FIELDS = 5  # target item, target category, query category, pooled history items / cats


def input_width(dim: int, num_side: int, num_dense: int) -> int:
    """Width of ``x0`` for embeddings of width ``dim``, ``num_side`` pooled side features
    (``user_id`` included) and ``num_dense`` dense features."""
    return (BASE_FIELDS + num_side) * dim + num_dense


class DenseNorm(nn.Module):
    """(x - mean) / std, clipped to +-``clip``; the statistics are fixed buffers.

    Args:
        means, stds: one per dense feature (``FeatureSchema.dense_moments()``).
    """

    def __init__(self, means: list[float], stds: list[float], clip: float = 8.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(means, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(stds, dtype=torch.float32), persistent=False)
        self.clip = clip

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return ((dense - self.mean) / self.std).clamp(-self.clip, self.clip)


def candidate_logits(
    backbone: Backbone,
    dense_norm: DenseNorm | None,
    target_item: torch.Tensor,
    target_cat: torch.Tensor,
    query_cat: torch.Tensor,
    history_items: torch.Tensor,
    history_cats: torch.Tensor,
    side: torch.Tensor | None,
    dense: torch.Tensor | None,
    context: torch.Tensor | None,
    history: torch.Tensor | None,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Click logits [B], one per candidate row: ``x0`` (the module docstring; every argument
    one row per candidate, the histories already mean-pooled, ``side`` [B, F * dim] or None,
    ``dense`` [B, num_dense] raw, standardised here, read only by a model with a
    ``dense_norm``), then the backbone with g(s, c) ``context`` (None without model
    integration) and, for a backbone that reads it, the padded history of item + category rows
    ``history`` [B, L, D] with ``lengths`` [B]. Training calls it per impression, serving per
    candidate after pooling each request's history once."""
    parts = [target_item, target_cat, query_cat, history_items, history_cats]
    if side is not None:
        parts.append(side)
    if dense_norm is not None and dense is not None:
        parts.append(dense_norm(dense))
    x0 = torch.cat(parts, dim=1)
    if backbone.uses_history:
        return backbone(
            x0,
            context,
            target_item,
            target=target_item + target_cat,
            history=history,
            lengths=lengths,
        )
    return backbone(x0, context, target_item)
