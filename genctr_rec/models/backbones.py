"""The CTR backbones of the paper's Table 1: DNN, DCN V2, DCN V2 with target attention.

Each takes the impression's dense input ``x0`` (target item, target category, query category,
mean-pooled history items and categories: 5 x dim) plus, for TA, the padded history, and an
optional extra vector ``g`` (GenCTR's g(s, c), model integration) that is concatenated **before
the final layer**, as the paper places it. ``forward`` returns logits [B].
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankMixtureCrossNet
from torchrec.modules.mlp import MLP

from genctr_rec.models.layers import TargetAttention


class DNN(nn.Module):
    """Embedding layer, then an MLP (paper: 256 -> 128, ReLU), then the final layer.

    Args:
        in_features: width of ``x0``.
        extra_features: width of ``g`` (0 without model integration).
        hidden: MLP widths (default 256, 128).
    """

    def __init__(self, in_features: int, extra_features: int = 0, hidden=(256, 128)) -> None:
        super().__init__()
        self.mlp = MLP(in_features, list(hidden), activation="relu")
        self.final = nn.Linear(hidden[-1] + extra_features, 1)

    def forward(self, x0: torch.Tensor, g: torch.Tensor | None = None, **_: torch.Tensor):
        h = self.mlp(x0)
        return self.final(h if g is None else torch.cat([h, g], dim=1)).squeeze(1)


class DCNv2(nn.Module):
    """DCN V2 (Wang et al. 2021), stacked: a low-rank mixture-of-experts cross network
    (paper: 3 experts, depth 3, rank 16, TorchRec's ``LowRankMixtureCrossNet``), then the
    256 -> 128 MLP, then the final layer.

    Args:
        in_features: width of ``x0``.
        extra_features: width of ``g``.
        num_experts, cross_layers, low_rank: the cross network.
        hidden: MLP widths.
    """

    def __init__(
        self,
        in_features: int,
        extra_features: int = 0,
        num_experts: int = 3,
        cross_layers: int = 3,
        low_rank: int = 16,
        hidden=(256, 128),
    ) -> None:
        super().__init__()
        self.cross = LowRankMixtureCrossNet(in_features, cross_layers, num_experts, low_rank)
        self.mlp = MLP(in_features, list(hidden), activation="relu")
        self.final = nn.Linear(hidden[-1] + extra_features, 1)

    def forward(self, x0: torch.Tensor, g: torch.Tensor | None = None, **_: torch.Tensor):
        h = self.mlp(self.cross(x0))
        return self.final(h if g is None else torch.cat([h, g], dim=1)).squeeze(1)


class DCNv2TA(DCNv2):
    """DCN V2 plus target attention over the behaviour sequence, keyed by the target ad; the
    attended history joins ``x0`` before the cross network."""

    def __init__(self, in_features: int, extra_features: int = 0, dim: int = 16, **kwargs) -> None:
        super().__init__(in_features + dim, extra_features, **kwargs)
        self.attention = TargetAttention(dim)

    def forward(
        self,
        x0: torch.Tensor,
        g: torch.Tensor | None = None,
        *,
        target: torch.Tensor,
        history: torch.Tensor,
        lengths: torch.Tensor,
    ):
        attended = self.attention(target, history, lengths)
        return super().forward(torch.cat([x0, attended], dim=1), g)


BACKBONES = {"dnn": DNN, "dcnv2": DCNv2, "dcnv2_ta": DCNv2TA}
