"""GenCTR's conditional self-attention decoder (CD) and the SASRec-style ablation (SD).

At position t the decoder predicts item t from the items before it:

* **keys / values**: a learned BOS token, then one token per earlier item
  ``item_emb + category_emb + position_emb`` (causal: the query at t sees BOS and items < t);
* **query** (CD): ``category_emb(item t) + position_emb(t)``: the side information of the item
  being predicted, never its id; (SD): the token of item t-1, the most recent one.

The BOS key keeps every query's attention well defined (t = 0, empty histories). With more than
one layer the item stream is refined by causal self-attention before each further layer.
Attention runs through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from genctr_rec.models.jagged import length_groups, row_positions, to_padded


def length_groups_pay_off(device: torch.device) -> bool:
    """Whether to run a jagged batch in groups of similar length (``*_jagged`` methods) or pad
    it whole, on ``device``.

    On CPU groups win (``benchmarks/results/decoder_cost.md``): attention is quadratic in the
    padded length and every element costs. On a GPU the per-group loop of small launches and
    host synchronisations loses 2x-4x to one padded batch at every size measured (issue 13's
    H200 table: caps 50-4000, dims 16 and 64), so CUDA pads the whole batch.
    """
    return device.type != "cuda"


@torch.fx.wrap
def _visible_keys(lengths: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, 1, num_keys]: query b may see key k (BOS = 0, item j = j + 1) iff k <= lengths[b].

    Wrapped for ``torch.fx`` (a leaf call) so that the serving export can trace the decoder.
    """
    keys = torch.arange(num_keys, device=lengths.device)
    return (keys.unsqueeze(0) <= lengths.unsqueeze(1)).unsqueeze(1)


@torch.fx.wrap
def _token_at(memory: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """memory[b, index[b]] for every row b: [B, D]."""
    return memory[torch.arange(memory.shape[0], device=memory.device), index]


def _by_length_groups(fn: Callable, lengths: torch.Tensor, per_element: bool) -> torch.Tensor:
    """Run ``fn`` per group of similar-length rows and put the outputs back in batch order.

    ``fn(idx, lens[, rows])`` gets the group's element indices into the flat values, its
    rows' lengths (and, when not ``per_element``, its row indices) and returns one output per
    element (``per_element``) or per row.
    """
    lengths = lengths.long()
    offsets = torch.cumsum(lengths, 0) - lengths
    outputs, order = [], []
    for rows in length_groups(lengths):
        lens = lengths[rows]
        r, p = row_positions(lens)
        idx = offsets[rows][r] + p
        if per_element:
            outputs.append(fn(idx, lens))
            order.append(idx)
        else:
            outputs.append(fn(idx, lens, rows))
            order.append(rows)
    return torch.cat(outputs)[torch.argsort(torch.cat(order))]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        """query [B, Q, D], memory [B, K, D]; either mask bool [B or 1, Q, K] (True = may
        attend) or ``causal``: query q sees keys k <= q (SDPA's fused causal kernel, which
        skips the masked half instead of materialising a mask)."""
        b, nq, d = query.shape
        h = self.heads
        q = self.q(query).view(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(memory).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is None else mask.unsqueeze(1),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
        )
        return self.out(out.transpose(1, 2).reshape(b, nq, d))

    def one_query(self, query: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor):
        """:meth:`forward` for one query a row, without projecting the memory.

        query [B, D], memory [B, K, D] (already normalised), mask bool [B, 1, K] -> [B, D].
        The key projection moves onto the query (``q_h . (W_h m + b_h) = (W_h^T q_h) . m``
        plus a term constant over keys, which softmax cancels) and the value projection after
        the weighted sum (the weights sum to one), so the cost per history token is two dot
        products of width D per head instead of a ``D x 2D`` projection: fine-tuning's and
        serving's g(s, c) at about half the cost (17.8 -> 9.4 ms forward and backward at
        B = 1024, 51 keys, in isolation). Same outputs as :meth:`forward` up to
        float rounding.
        """
        b, d = query.shape
        h = self.heads
        w_key, w_value = self.kv.weight.view(2, h, d // h, d).unbind(0)  # [H, d/H, D] each
        # einsum runs these as H products of B rows (a broadcast matmul would run B x H
        # products of one row each)
        q = torch.einsum("bhe,hed->bhd", self.q(query).view(b, h, d // h), w_key)
        q = q * (d // h) ** -0.5  # [B, H, D]
        scores = torch.bmm(q, memory.transpose(1, 2)).masked_fill(~mask, float("-inf"))
        weights = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
        pooled = torch.bmm(weights, memory)  # [B, H, D]
        out = torch.einsum("bhd,hed->bhe", pooled, w_value) + self.kv.bias.view(2, h, d // h)[1]
        return self.out(out.reshape(b, d))


class _Block(nn.Module):
    """Pre-norm attention + feed-forward block."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attention = _Attention(dim, heads, dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.attention(self.norm_q(x), self.norm_kv(memory), mask, causal)
        return x + self.ff(self.norm_ff(x))

    def one_query(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor):
        """:meth:`forward` for one query a row: x [B, D] -> [B, D]."""
        x = x + self.attention.one_query(self.norm_q(x), self.norm_kv(memory), mask)
        return x + self.ff(self.norm_ff(x))

    def one_query_sdpa(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor):
        """:meth:`one_query` through :meth:`forward` (projected memory, SDPA): the reference
        the tests and ``benchmarks/finetune_speed.py`` compare against."""
        return self(x.unsqueeze(1), memory, mask).squeeze(1)


class GenerativeDecoder(nn.Module):
    """g(s, c): the conditional (``conditional=True``) or SASRec-style decoder.

    Args:
        dim: token width (= embedding width, 16 in the paper).
        max_len: positions (history length + 1: the predicted item has a position too).
        num_layers: decoder layers (paper: 1).
        num_heads: attention heads (not given by the paper; default 2).
        conditional: CD (query from the predicted item's category) or SD.
        dropout: attention dropout.
        jagged: the stage models call the ``*_jagged`` methods (no padding across rows of
            different lengths) where :func:`length_groups_pay_off` (on CPU, not on CUDA);
            ``False`` always pads the whole batch to its longest row, the baseline of
            ``benchmarks/decoder_cost.py``. Same outputs either way.
    """

    def __init__(
        self,
        dim: int = 16,
        max_len: int = 51,
        num_layers: int = 1,
        num_heads: int = 2,
        conditional: bool = True,
        dropout: float = 0.0,
        jagged: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.jagged = jagged
        self.max_len = max_len
        self.conditional = conditional
        self.position = nn.Embedding(max_len, dim)
        self.bos = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, num_heads, dropout) for _ in range(num_layers))
        self.item_blocks = nn.ModuleList(
            _Block(dim, num_heads, dropout) for _ in range(num_layers - 1)
        )
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.normal_(self.bos, std=0.02)

    def _tokens(self, items: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        """Key/value tokens [B, 1 + L, D]: BOS, then item + category + position per item."""
        return self._tokens_of(items + cats)

    def _tokens_of(self, history: torch.Tensor) -> torch.Tensor:
        """:meth:`_tokens` from item + category sums [B, L, D]."""
        b, length, _ = history.shape
        pos = self.position.weight[:length].unsqueeze(0)
        return torch.cat([self.bos.expand(b, 1, self.dim), history + pos], dim=1)

    def _run(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool = False,
        one_query: bool = False,
    ) -> torch.Tensor:
        """The blocks; ``one_query``: queries [B, D], one a row (:meth:`_Block.one_query`)."""
        for i, block in enumerate(self.blocks):
            if one_query:
                queries = block.one_query(queries, memory, mask)
            else:
                queries = block(queries, memory, mask, causal)
            if i < len(self.item_blocks):
                memory = self.item_blocks[i](memory, memory, None, causal=True)
        return self.norm(queries)

    def forward_sequence(self, items: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        """Pre-training: g for every position. items, cats [B, L, D] (padded) -> [B, L, D].

        Output t predicts item t from items < t; outputs at padded positions are meaningless.
        """
        b, length, _ = items.shape
        memory = self._tokens(items, cats)
        pos = self.position.weight[:length].unsqueeze(0)
        if self.conditional:
            queries = cats + pos
        else:  # SD: the most recent item's token (BOS at t = 0)
            queries = memory[:, :length]
        # query t may attend to key k (k = 0 is BOS, k = j + 1 is item j) iff k <= t: SDPA's
        # causal mask, which for L queries and L + 1 keys is aligned top-left exactly so
        return self._run(queries, memory, None, causal=True)

    def forward_sequence_jagged(
        self, items: torch.Tensor, cats: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward_sequence` on a jagged batch without paying for its padding.

        items, cats [N, D] (rows' elements one after another), lengths [B] -> g [N, D], one per
        element. Rows run in groups of similar length (:func:`length_groups`), each padded only
        to its own longest row; attention cost is quadratic in length, so one long row no
        longer makes every short row pay for its length.
        """
        return _by_length_groups(
            lambda idx, lens: self.forward_sequence(
                to_padded(items[idx], lens), to_padded(cats[idx], lens)
            )[row_positions(lens)],
            lengths,
            per_element=True,
        )

    def forward_target(
        self,
        items: torch.Tensor,
        cats: torch.Tensor,
        lengths: torch.Tensor,
        target_cats: torch.Tensor,
    ) -> torch.Tensor:
        """Fine-tuning / serving: g(s, c) for the next position only.

        items, cats [B, L, D] padded histories (newest last), lengths [B], target_cats [B, D]
        (the candidate's category) -> [B, D].
        """
        return self.forward_target_summed(items + cats, lengths, target_cats)

    def forward_target_summed(
        self, history: torch.Tensor, lengths: torch.Tensor, target_cats: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward_target` from the padded item + category sums [B, L, D], which a
        target-attention backbone needs too (one padded history for both)."""
        length = history.shape[1]
        lengths = lengths.long().clamp(max=self.max_len - 1)
        memory = self._tokens_of(history)
        if self.conditional:
            queries = target_cats + self.position(lengths)
        else:
            queries = _token_at(memory, lengths)  # token of item L-1
        mask = _visible_keys(lengths, length + 1)  # [B, 1, 1 + L]
        return self._run(queries, memory, mask, one_query=True)

    def forward_target_jagged(
        self,
        items: torch.Tensor,
        cats: torch.Tensor,
        lengths: torch.Tensor,
        target_cats: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward_target` on jagged histories (items, cats [N, D]) -> [B, D], rows run
        in groups of similar length like :meth:`forward_sequence_jagged`."""
        return _by_length_groups(
            lambda idx, lens, rows: self.forward_target(
                to_padded(items[idx], lens), to_padded(cats[idx], lens), lens, target_cats[rows]
            ),
            lengths,
            per_element=False,
        )
