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

from genctr_rec.config import DECODER_KERNELS as ONE_QUERY_KERNELS
from genctr_rec.config import DECODER_LAYOUTS as LAYOUTS
from genctr_rec.models.jagged import length_groups, row_positions, to_padded
from genctr_rec.models.packed import PackedLayout, flex_attention_available, packed_attention

# Crossovers measured on an H200 (benchmarks/results/decoder_cost_cuda.md): each threshold sits
# between the two caps measured either side of it. bf16's (BF16_MIN_HISTORY) is in config.py,
# whose precision setting reads it. Packed against padded, fp32: the packed step is a
# near-constant cost of launches, so it loses at short caps, ties at 500 and wins from 1000.
PACKED_MIN_HISTORY = 768
# Under bf16, padded attention (SDPA's fused kernels) is fast enough that packing pays only at
# the longest caps measured (4000), not at 1000.
PACKED_MIN_HISTORY_BF16 = 2048


def choose_layout(
    layout: str,
    device: torch.device,
    stage: str,
    num_layers: int = 1,
    dropout: float = 0.0,
    history_cap: int = 0,
    bf16: bool = False,
) -> str:
    """The layout a jagged batch runs in: ``padded`` (whole batch to its longest row),
    ``groups`` (rows in groups of similar length, each padded alone: ``*_jagged`` methods) or
    ``packed`` (all rows in one sequence: ``*_packed`` methods); ``layout`` other than
    ``auto`` is taken as it is.

    ``auto`` picks per device and ``stage`` (``pretrain``: attention of every position,
    quadratic in length; ``target``: fine-tuning's and serving's one query a row, linear):

    * CPU: pre-training in groups (faster than padding at caps 200-1000,
      ``benchmarks/results/decoder_cost.md``); g(s, c) padded with one decoder layer (the
      grouping loop costs more than the padding it saves; packing too: its scatter softmax
      was slower) and grouped with more (their item self-attention is quadratic).
    * CUDA: pre-training packed (FlexAttention, one launch a layer) from ``history_cap``
      :data:`PACKED_MIN_HISTORY` in fp32 and :data:`PACKED_MIN_HISTORY_BF16` under bf16
      autocast (``bf16``), where FlexAttention is there and attention dropout is off (it has
      none); else padded (to the cap: :meth:`GenerativeDecoder.padded_width`). g(s, c) padded
      (a fine-tuning step of the decoder is launches either way, and packing did not win).
      Groups never: their small launches and host reads lost to padding. Neither CUDA layout
      reads anything from the device.
    """
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ValueError(f"unknown decoder layout {layout!r}; choose from {LAYOUTS}")
        return layout
    if device.type == "cuda":
        long_enough = history_cap >= (PACKED_MIN_HISTORY_BF16 if bf16 else PACKED_MIN_HISTORY)
        packs = stage == "pretrain" and long_enough and dropout == 0.0
        return "packed" if packs and flex_attention_available() else "padded"
    if stage == "target" and num_layers < 2:
        return "padded"
    return "groups"


def _under_bf16_autocast(device: torch.device) -> bool:
    if not torch.amp.is_autocast_available(device.type):  # e.g. meta
        return False
    return torch.is_autocast_enabled(device.type) and (
        torch.get_autocast_dtype(device.type) == torch.bfloat16
    )


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

    def forward_packed(
        self, query: torch.Tensor, memory: torch.Tensor, layout: PackedLayout
    ) -> torch.Tensor:
        """:meth:`forward` over a packed batch: query, memory [T, D], attention confined to
        each row, causal (``layout``) -> [T, D]."""
        if self.training and self.dropout:
            raise ValueError("the packed decoder has no attention dropout: use layout padded")
        t, d = query.shape
        h = self.heads
        q = self.q(query).view(1, t, h, d // h).transpose(1, 2)
        k, v = self.kv(memory).view(1, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = packed_attention(q, k, v, layout)
        return self.out(out.transpose(1, 2).reshape(t, d))

    def _query_on_keys(self, query: torch.Tensor) -> torch.Tensor:
        """The query moved onto the unprojected keys: [B, D] -> [B, H, D] (:meth:`one_query`)."""
        b, d = query.shape
        h = self.heads
        w_key = self.kv.weight.view(2, h, d // h, d)[0]  # [H, d/H, D]
        # einsum runs these as H products of B rows (a broadcast matmul would run B x H
        # products of one row each)
        q = torch.einsum("bhe,hed->bhd", self.q(query).view(b, h, d // h), w_key)
        return q * (d // h) ** -0.5

    def _project_values(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled unprojected values [B, H, D] -> the attention's output [B, D]."""
        b, h, d = pooled.shape
        w_value = self.kv.weight.view(2, h, d // h, d)[1]
        out = torch.einsum("bhd,hed->bhe", pooled, w_value) + self.kv.bias.view(2, h, d // h)[1]
        return self.out(out.reshape(b, d))

    def one_query_packed(
        self, query: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`one_query` over packed keys: query [B, D], memory [M, D] (already normalised,
        every row's visible tokens one after another), rows [M] (each token's row, every row
        holding at least one token) -> [B, D]. A softmax per row by scatter: no padding."""
        if self.training and self.dropout:
            raise ValueError("the packed decoder has no attention dropout: use layout padded")
        q = self._query_on_keys(query)  # [B, H, D]
        # the softmax and the pooling in fp32 (under autocast einsum gives bf16 scores)
        scores = torch.einsum("mhd,md->mh", q[rows], memory).float()
        # a shift per row (softmax does not depend on it, so no gradient through it)
        top = scores.new_full(q.shape[:2], float("-inf")).scatter_reduce(
            0, rows.unsqueeze(1).expand_as(scores), scores.detach(), "amax"
        )
        weights = torch.exp(scores - top[rows])
        total = torch.zeros_like(top).index_add_(0, rows, weights)
        weights = weights / total[rows]
        pooled = scores.new_zeros(q.shape).index_add_(
            0, rows, weights.unsqueeze(2) * memory.float().unsqueeze(1)
        )
        return self._project_values(pooled)

    def one_query(self, query: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor):
        """:meth:`forward` for one query a row, without projecting the memory.

        query [B, D], memory [B, K, D] (already normalised), mask bool [B, 1, K] -> [B, D].
        The key projection moves onto the query (``q_h . (W_h m + b_h) = (W_h^T q_h) . m``
        plus a term constant over keys, which softmax cancels) and the value projection after
        the weighted sum (the weights sum to one), so the cost per history token is two dot
        products of width D per head instead of a ``D x 2D`` projection, for fine-tuning's and
        serving's g(s, c) (``benchmarks/README.md``). Same outputs as :meth:`forward` up to
        float rounding.
        """
        q = self._query_on_keys(query)  # [B, H, D]
        scores = torch.bmm(q, memory.transpose(1, 2)).masked_fill(~mask, float("-inf"))
        weights = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
        return self._project_values(torch.bmm(weights, memory))  # pooled [B, H, D]


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

    def forward_packed(self, x: torch.Tensor, memory: torch.Tensor, layout: PackedLayout):
        """:meth:`forward` over a packed batch: x, memory [T, D] -> [T, D]."""
        x = x + self.attention.forward_packed(self.norm_q(x), self.norm_kv(memory), layout)
        return x + self.ff(self.norm_ff(x))

    def one_query_packed(self, x: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor):
        """:meth:`one_query` over packed keys (:meth:`_Attention.one_query_packed`)."""
        x = x + self.attention.one_query_packed(self.norm_q(x), self.norm_kv(memory), rows)
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
        layout: how the stage models run a jagged batch (:func:`choose_layout`): ``auto``
            (per device), ``padded`` (the whole batch to its longest row, or on CUDA to the
            history cap: :meth:`padded_width`; the baseline of ``benchmarks/decoder_cost.py``),
            ``groups`` (``*_jagged`` methods) or ``packed``
            (``*_packed`` methods). Same outputs every way.
        kernel: how the padded and grouped layouts attend with one query a row (g(s, c)):
            ``projection_free`` (:meth:`_Attention.one_query`, the default) or ``sdpa`` (the
            reference: :meth:`_Block.one_query_sdpa`, the memory projected, then SDPA).
            Same outputs either way; an attribute, so a test or benchmark may switch it.
    """

    def __init__(
        self,
        dim: int = 16,
        max_len: int = 51,
        num_layers: int = 1,
        num_heads: int = 2,
        conditional: bool = True,
        dropout: float = 0.0,
        layout: str = "auto",
        kernel: str = "projection_free",
    ) -> None:
        super().__init__()
        choose_layout(layout, torch.device("cpu"), "pretrain")  # reject an unknown name now
        if kernel not in ONE_QUERY_KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose from {ONE_QUERY_KERNELS}")
        self.kernel = kernel
        self.dim = dim
        self.layout = layout
        self.dropout = dropout
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

    def layout_for(self, device: torch.device, stage: str) -> str:
        """The layout the stage models run on ``device`` for ``stage`` (:func:`choose_layout`)."""
        bf16 = _under_bf16_autocast(device)
        return choose_layout(
            self.layout, device, stage, len(self.blocks), self.dropout, self.max_len - 1, bf16
        )

    def sequence(
        self, items: torch.Tensor, cats: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Pre-training's g for every element of a jagged batch (items, cats [N, D], lengths
        [B]) -> [N, D], in the layout :meth:`layout_for` picks on the batch's device."""
        layout = self.layout_for(items.device, "pretrain")
        if layout == "groups":
            return self.forward_sequence_jagged(items, cats, lengths)
        if layout == "packed":
            return self.forward_sequence_packed(items, cats, lengths)
        width = self.padded_width(items.device)
        padded = self.forward_sequence(
            to_padded(items, lengths, width), to_padded(cats, lengths, width)
        )
        return padded[row_positions(lengths, items.shape[0])]

    def target(
        self,
        items: torch.Tensor,
        cats: torch.Tensor,
        lengths: torch.Tensor,
        target_cats: torch.Tensor,
        history: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """g(s, c) of jagged histories (items, cats [N, D], lengths [B]) for target categories
        [B, D] -> [B, D], in the layout :meth:`layout_for` picks; ``history``: the padded
        item + category sums when the caller has them already (the padded layout reuses them).
        """
        layout = self.layout_for(items.device, "target")
        if layout == "groups":
            return self.forward_target_jagged(items, cats, lengths, target_cats)
        if layout == "packed":
            return self.forward_target_packed(items, cats, lengths, target_cats)
        if history is None:
            history = to_padded(items + cats, lengths, self.padded_width(items.device))
        return self.forward_target_summed(history, lengths, target_cats)

    def padded_width(self, device: torch.device) -> int | None:
        """How wide the padded layout pads: on CUDA to the history cap (the same shape every
        batch and no host read of the longest row, which would make the host wait for the
        GPU; with long-tailed lengths a batch's longest row is at the cap nearly always), on
        CPU to the batch's longest row (there every padded element costs and a read is
        free)."""
        return self.max_len - 1 if device.type == "cuda" else None

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
            if one_query and self.kernel == "sdpa":
                queries = block.one_query_sdpa(queries, memory, mask)
            elif one_query:
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

    def _packed_tokens(self, history: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Key/value tokens in ``layout``'s slots [T, D]: each row's BOS, then item + category +
        position per item; zeros in the padding slots."""
        memory = history.new_zeros(layout.size, self.dim)
        memory = memory.index_copy(0, layout.item_slots, history + self.position(layout.positions))
        bos = self.bos.view(1, self.dim).to(history.dtype)
        return memory.index_copy(
            0, layout.row_starts[: layout.num_rows], bos.expand(layout.num_rows, -1)
        )

    def _run_packed(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        layout: PackedLayout,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`_run` over packed memory [T, D]: queries [T, D] in the layout's slots, or
        with ``rows`` (the row of each real slot) one query a row [B, D]."""
        for i, block in enumerate(self.blocks):
            if rows is None:
                queries = block.forward_packed(queries, memory, layout)
            else:
                queries = block.one_query_packed(queries, memory[: len(rows)], rows)
            if i < len(self.item_blocks):
                memory = self.item_blocks[i].forward_packed(memory, memory, layout)
        return self.norm(queries)

    def forward_sequence_packed(
        self, items: torch.Tensor, cats: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward_sequence` on a jagged batch packed into one sequence
        (:mod:`~genctr_rec.models.packed`): items, cats [N, D], lengths [B] -> g [N, D], one per
        element; every layer's attention is one document-causal launch for the whole batch, and
        nothing reads the device."""
        layout = PackedLayout.build(lengths, items.shape[0])
        memory = self._packed_tokens(items + cats, layout)
        if self.conditional:
            queries = memory.new_zeros(layout.size, self.dim).index_copy(
                0, layout.query_slots, cats + self.position(layout.positions)
            )
        else:  # SD: the query at slot t is the token in slot t (BOS, then item t - 1)
            queries = memory
        return self._run_packed(queries, memory, layout)[layout.query_slots]

    def forward_target_packed(
        self,
        items: torch.Tensor,
        cats: torch.Tensor,
        lengths: torch.Tensor,
        target_cats: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward_target` on jagged histories (items, cats [N, D], lengths [B]) with no
        padding: the one query of each row attends to that row's BOS and items through a
        softmax per row (:meth:`_Attention.one_query_packed`) -> [B, D]. Histories are at most
        ``max_len - 1`` long (the readers' cap), as for :meth:`forward_target`."""
        layout = PackedLayout.build(lengths, items.shape[0])
        memory = self._packed_tokens(items + cats, layout)
        lengths = lengths.long()
        if self.conditional:
            queries = target_cats + self.position(lengths.clamp(max=self.max_len - 1))
        else:  # token of the newest item: the slot before the next row's BOS
            queries = memory[layout.row_starts[1 : layout.num_rows + 1] - 1]
        rows = layout.documents[: items.shape[0] + len(lengths)]  # the slots before padding
        return self._run_packed(queries, memory, layout, rows)
