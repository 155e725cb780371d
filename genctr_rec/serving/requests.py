"""A batch of requests as the serving model's entry points take it, and how g(s, c) is composed
per candidate from the ``contexts`` entry point: what the predictor needs at serving time, apart
from the inference model's own modules (``serving/model.py``) that only export builds."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RequestTensors:
    """A batch of requests as the ServingModel takes them (see ``serving/model.py``)."""

    hist_items: torch.Tensor
    hist_cats: torch.Tensor
    hist_lengths: torch.Tensor
    query_cats: torch.Tensor
    cand_items: torch.Tensor
    cand_cats: torch.Tensor
    cand_rows: torch.Tensor
    side_values: torch.Tensor  # per candidate, key-major: user_id, then declared sparse features
    side_lengths: torch.Tensor  # [num_keys * N]
    dense: torch.Tensor  # [N, num_dense]

    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.hist_items,
            self.hist_cats,
            self.hist_lengths,
            self.query_cats,
            self.cand_items,
            self.cand_cats,
            self.cand_rows,
            self.side_values,
            self.side_lengths,
            self.dense,
        )


def unique_pairs(
    cand_rows: torch.Tensor, cand_cats: torch.Tensor, num_categories: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct (request, category) pairs of the candidates: their rows [U], categories [U],
    and each candidate's pair [N] (g(s, c) depends on nothing else)."""
    pairs, inverse = torch.unique(cand_rows * num_categories + cand_cats, return_inverse=True)
    rows = torch.div(pairs, num_categories, rounding_mode="floor")
    return rows, pairs % num_categories, inverse


def compose_contexts(
    contexts,
    model_integration: bool,
    hist_items: torch.Tensor,
    hist_cats: torch.Tensor,
    hist_lengths: torch.Tensor,
    cand_rows: torch.Tensor,
    cand_cats: torch.Tensor,
    num_categories: int,
    cand_items: torch.Tensor,
) -> torch.Tensor:
    """g(s, c) per candidate [N, D] through ``contexts`` (an exported or compiled entry
    point), once per distinct (request, candidate category); [N, 0] without integration."""
    if not model_integration:
        return torch.zeros(cand_items.shape[0], 0)
    rows, cats, inverse = unique_pairs(cand_rows, cand_cats, num_categories)
    return contexts(hist_items, hist_cats, hist_lengths, rows, cats)[inverse]
