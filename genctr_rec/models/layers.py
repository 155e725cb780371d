"""Small layers reused by several backbones."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankMixtureCrossNet

from genctr_rec.config import CONTEXT_FUSIONS


class CrossNet(LowRankMixtureCrossNet):
    """TorchRec's ``LowRankMixtureCrossNet`` (same parameters, same outputs, its checkpoints
    load as they are) with a forward made of whole-batch matrix products.

    Why: TorchRec multiplies each expert's ``[r, N]`` kernel with ``x_l`` shaped ``[B, N, 1]``,
    which broadcasts the kernel to ``B`` copies and runs ``B`` matrix-vector products, then
    stacks ``K`` expert outputs of ``[B, N]`` to mix them. Here all experts' ``V`` act as one
    ``[B, N] x [N, K*r]`` product, ``C`` as one batched product over the ``K`` experts, and
    the gate weights scale each expert's ``r`` values *before* ``U``, so that mixing the experts
    is one ``[B, K*r] x [K*r, N]`` product (the gates sum to one, so the shared bias is added
    once): a few large products instead of many small ones (measured in
    ``benchmarks/README.md``).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input [B, N] -> [B, N]."""
        experts, rank, width = self._num_experts, self._low_rank, self._in_features
        x0 = xl = input
        gates = None
        if experts > 1:  # one gate per expert, shared by every layer (as TorchRec's)
            gates = torch.cat([gate.weight for gate in self.gates], dim=0)  # [K, N]
        for layer in range(self._num_layers):
            v = xl @ self.V_kernels[layer].reshape(experts * rank, width).t()  # [B, K*r]
            v = self._activation(v).view(-1, experts, rank).transpose(0, 1)  # [K, B, r]
            c = self._activation(torch.bmm(v, self.C_kernels[layer].transpose(1, 2)))
            if gates is not None:
                c = c * torch.softmax(xl @ gates.t(), dim=1).t().unsqueeze(2)
            c = c.transpose(0, 1).reshape(-1, experts * rank)  # [B, K*r]
            u = self.U_kernels[layer].transpose(1, 2).reshape(experts * rank, width)
            xl = x0 * torch.addmm(self.bias[layer].view(1, width), c, u) + xl
        return xl


class TargetAttention(nn.Module):
    """Attention over the behaviour sequence keyed by the target ad (DIN / ESU style).

    Scores are scaled dot products between the projected target and each projected history
    token, so the cost is linear in history length; padded positions are masked out. The key
    projection is applied to the query instead (``(W_q t + b_q) . (W_k h + b_k)`` is
    ``(W_k^T (W_q t + b_q)) . h`` plus a term constant over the history, which softmax
    cancels): no projection of every history token, same scores up to float rounding.

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
        projected = self.query(target)  # [B, D]
        query = projected @ self.key.weight * self.scale
        # the key bias's term is the same at every position and softmax cancels it; it stays
        # so that every parameter gets its (zero) gradient, as in the projected form: plain
        # DDP (no static graph) refuses parameters that get none
        constant = (projected @ self.key.bias * self.scale).unsqueeze(1)  # [B, 1]
        scores = (history * query.unsqueeze(1)).sum(2) + constant  # [B, L]
        return self._pool(scores, history, lengths)

    @staticmethod
    def _pool(scores: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Softmax over each row's real positions, then the weighted history [B, D]."""
        valid = torch.arange(history.shape[1], device=history.device) < lengths.unsqueeze(1)
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # empty histories pool to zero
        return torch.bmm(weights.unsqueeze(1), history).squeeze(1)

    def forward_projected(self, target: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor):
        """:meth:`forward` as written in the textbook (every history token projected): the
        reference the tests and ``benchmarks/finetune_speed.py`` compare against."""
        scores = torch.einsum("bd,bld->bl", self.query(target), self.key(history)) * self.scale
        return self._pool(scores, history, lengths)


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
