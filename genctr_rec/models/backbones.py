"""The CTR backbones of the paper's Table 1: DNN, DCN V2, DCN V2 with target attention.

Every backbone is a :class:`Backbone`: it takes the impression's dense input ``x0`` (built by
:func:`genctr_rec.models.inputs.candidate_logits`, the per-candidate forward that training and
serving share), declares through ``uses_history`` whether it also reads the padded history,
and ends in a ``ContextHead`` (``layers.py``) where GenCTR's g(s, c) (model integration) joins
**before the final layer**, as the paper places it. ``forward`` returns logits [B]. Adding a
backbone is one class and its registration (:func:`register_backbone`;
``docs/contributing.md``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.mlp import MLP

from genctr_rec.config import BACKBONE_NAMES
from genctr_rec.models.layers import ContextHead, CrossNet, TargetAttention


class Backbone(nn.Module):
    """What every backbone shares: the final :class:`ContextHead` and what it consumes.

    Args:
        in_features: width of ``x0``.
        hidden: MLP widths (paper: 256, 128).
        context_dim: width of g(s, c) (0 without model integration).
        fusion: how g enters the final layer (:class:`ContextHead`).
        item_dim: width of the target item's embedding (for ``fusion="product"``).
    """

    uses_history = False  # True: forward also takes target, history and lengths

    def __init__(
        self,
        hidden: tuple[int, ...],
        context_dim: int = 0,
        fusion: str = "concat",
        item_dim: int = 0,
        context_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.head = ContextHead(hidden[-1], context_dim, fusion, item_dim, context_dropout)

    def body(self, x0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        x0: torch.Tensor,
        g: torch.Tensor | None = None,
        target_item: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.head(self.body(x0), g, target_item)


class DNN(Backbone):
    """Embedding layer, then an MLP (paper: 256 -> 128, ReLU), then the final layer."""

    def __init__(self, in_features: int, hidden=(256, 128), **head) -> None:
        super().__init__(tuple(hidden), **head)
        self.mlp = MLP(in_features, list(hidden), activation="relu")

    def body(self, x0: torch.Tensor) -> torch.Tensor:
        return self.mlp(x0)


class CrossTower(nn.Module):
    """A low-rank mixture-of-experts cross network (TorchRec's ``LowRankMixtureCrossNet``, run
    as :class:`CrossNet`), then the MLP: the body of DCN V2, shared by DCN V2 and DCN V2 & TA."""

    def __init__(
        self, in_features: int, num_experts: int, cross_layers: int, low_rank: int, hidden
    ) -> None:
        super().__init__()
        self.cross = CrossNet(in_features, cross_layers, num_experts, low_rank)
        self.mlp = MLP(in_features, list(hidden), activation="relu")

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.cross(x0))


class DCNv2(Backbone):
    """DCN V2 (Wang et al. 2021), stacked: cross network then MLP then the final layer.

    Args:
        num_experts, cross_layers, low_rank: the cross network (paper: 3, 3, 16).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int = 3,
        cross_layers: int = 3,
        low_rank: int = 16,
        hidden=(256, 128),
        **head,
    ) -> None:
        super().__init__(tuple(hidden), **head)
        self.tower = CrossTower(in_features, num_experts, cross_layers, low_rank, hidden)

    def body(self, x0: torch.Tensor) -> torch.Tensor:
        return self.tower(x0)


class DCNv2TA(DCNv2):
    """DCN V2 plus target attention over the behaviour sequence, keyed by the target ad; the
    attended history joins ``x0`` before the cross network.

    Args:
        dim: width of the history tokens and the target.
    """

    uses_history = True

    def __init__(self, in_features: int, dim: int = 16, **kwargs) -> None:
        super().__init__(in_features + dim, **kwargs)
        self.attention = TargetAttention(dim)

    def forward(
        self,
        x0: torch.Tensor,
        g: torch.Tensor | None = None,
        target_item: torch.Tensor | None = None,
        *,
        target: torch.Tensor,
        history: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        attended = self.attention(target, history, lengths)
        return self.head(self.body(torch.cat([x0, attended], dim=1)), g, target_item)


BACKBONES: dict[str, type[Backbone]] = {"dnn": DNN, "dcnv2": DCNv2, "dcnv2_ta": DCNv2TA}
# the CLI offers config.BACKBONE_NAMES without importing the models: the built-in ones
assert tuple(BACKBONES) == BACKBONE_NAMES, "add a new backbone to config.BACKBONE_NAMES too"


def register_backbone(name: str, cls: type[Backbone]) -> None:
    """Make ``cls`` available as ``backbone=name`` to training, evaluation, export and
    serving (the serving model calls the same module). To offer it on the command line too,
    add ``name`` to ``config.BACKBONE_NAMES`` and ``cls`` to :data:`BACKBONES`."""
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise TypeError(f"a backbone derives models.backbones.Backbone, {cls!r} does not")
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered ({BACKBONES[name].__name__})")
    BACKBONES[name] = cls


def build_backbone(
    name: str, in_features: int, dim: int, context_dim: int, fusion: str, context_dropout: float
) -> Backbone:
    """The backbone ``name`` for inputs of width ``in_features`` and tokens of width ``dim``."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
    extra = {"dim": dim} if BACKBONES[name].uses_history else {}
    return BACKBONES[name](
        in_features,
        context_dim=context_dim,
        fusion=fusion,
        item_dim=dim,
        context_dropout=context_dropout,
        **extra,
    )
