"""Packed jagged attention: every row's tokens one after another in one sequence, attention kept
inside each row by a document-causal mask, so no row pays for another row's length.

Row r of a batch takes ``1 + lengths[r]`` consecutive slots: its BOS token, then one slot per
item. The query that predicts item t sits at the row's slot t and sees slots 0..t of the same
row (BOS and the items before t): an ordinary causal mask restricted to one "document", the
pattern FlexAttention's block-sparse kernel runs in one launch for the whole batch
(``torch.nn.attention.flex_attention``). The sequence is padded at its end (:func:`packed_size`)
with one-slot dummy rows, so the kernel sees whole blocks and few distinct shapes.

Everything here is built from the lengths with tensor operations whose output sizes are known
on the host (the number of items is the values' length), so a batch needs no host
synchronisation: :meth:`PackedLayout.build` and :func:`document_causal_block_mask` replace
``create_block_mask``, which evaluates the mask on every block, eagerly, and cost more than
the attention itself (``benchmarks/results/decoder_cost_cuda.md``).

On CUDA the kernel is FlexAttention compiled once per head width and dtype (dynamic shapes
after the first change of length). FlexAttention has no backward on CPU, so there the same
layout runs through SDPA with a dense boolean mask: quadratic in the batch's total length, for
tests and small batches (on CPU the decoder groups rows by length instead: see
:func:`genctr_rec.models.decoder.choose_layout`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from genctr_rec.models.jagged import row_positions

# FlexAttention's block edge (its default): the packed length is a multiple of it
BLOCK = 128
# FlexAttention refuses head widths under 16: narrower heads are zero-padded (exact: padded
# query/key components add 0 to every dot product, padded value components are sliced off)
MIN_HEAD_WIDTH = 16


def packed_size(slots: int) -> int:
    """The packed length for ``slots`` tokens: whole blocks, and above 8 blocks one of four
    sizes an octave (at most 25 % padding, 12 % on average), so that a training run meets
    a handful of shapes and the compiled kernel is not rebuilt for every batch."""
    blocks = -(-slots // BLOCK)
    if blocks > 8:
        step = 1 << (blocks.bit_length() - 3)
        blocks = -(-blocks // step) * step
    return blocks * BLOCK


def flex_attention_available() -> bool:
    """Whether this torch has FlexAttention (2.5 and later)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class PackedLayout:
    """Where a jagged batch's tokens sit in the packed sequence.

    Attributes:
        num_rows: B, the batch's rows (the padding rows come after them).
        size: packed length T (real slots ``N + B`` plus at least one, rounded up by
            :func:`packed_size`).
        row_starts: [B + P] slot of each row's BOS, then of each of the P padding slots (each
            a row of its own).
        documents: [T] row of each slot (B, B + 1, ... for the padding slots).
        item_slots: [N] slot holding each item's key/value token (``row start + 1 + t``).
        query_slots: [N] slot of the query that predicts each item (``row start + t``).
        positions: [N] each item's position t within its row.
    """

    num_rows: int
    size: int
    row_starts: torch.Tensor
    documents: torch.Tensor
    item_slots: torch.Tensor
    query_slots: torch.Tensor
    positions: torch.Tensor

    @staticmethod
    def build(lengths: torch.Tensor, num_items: int) -> PackedLayout:
        """The layout of rows of ``lengths`` [B] holding ``num_items`` (= lengths.sum(), passed
        so that nothing reads the device) items."""
        lengths = lengths.long()
        device, rows_n = lengths.device, len(lengths)
        real = num_items + rows_n
        size = packed_size(real + 1)  # at least one padding slot
        rows, positions = row_positions(lengths, num_items)
        # one BOS per earlier row
        starts = torch.cumsum(lengths, 0) - lengths + torch.arange(rows_n, device=device)
        # each padding slot is a row of its own, so it attends to itself alone: one padding row
        # would cost attention quadratic in the padding
        row_starts = torch.cat([starts, torch.arange(real, size, device=device)])
        documents = torch.repeat_interleave(
            torch.arange(rows_n + size - real, device=device),
            torch.cat([lengths + 1, torch.ones(size - real, dtype=torch.long, device=device)]),
            output_size=size,
        )
        query_slots = starts[rows] + positions
        return PackedLayout(
            rows_n, size, row_starts, documents, query_slots + 1, query_slots, positions
        )

    @cached_property
    def block_mask(self):
        """:func:`document_causal_block_mask`, built once for all of a forward's layers."""
        return document_causal_block_mask(self)

    @cached_property
    def dense_mask(self) -> torch.Tensor:
        """[T, T] bool: slot q (row) may see slot k (column)."""
        slots = torch.arange(self.size, device=self.documents.device)
        docs = self.documents
        return (docs.unsqueeze(1) == docs.unsqueeze(0)) & (slots.unsqueeze(0) <= slots.unsqueeze(1))


def document_causal_block_mask(layout: PackedLayout):
    """FlexAttention's ``BlockMask`` for ``layout``: slot q sees slot k iff both are in the
    same row and k <= q, built from the row starts in O(blocks^2) integer work, no device read.

    For query block i (slots qs..qs + BLOCK - 1) the key blocks needed run from the block of
    its first slot's row start to block i. When the whole query block is one row, the key
    blocks strictly between that row's first whole block and i are full (no mask evaluated);
    the row's partial first block and the diagonal are partial. A query block spanning rows
    marks all its key blocks partial (correct, a little more mask work).
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = layout.documents.device
    blocks = layout.size // BLOCK
    index = torch.arange(blocks, device=device)
    first_doc = layout.documents[index * BLOCK]
    same_row = first_doc == layout.documents[index * BLOCK + BLOCK - 1]
    row_start = layout.row_starts[first_doc]
    lo = row_start // BLOCK
    first_full = -(-row_start // BLOCK)  # first key block wholly inside the row
    starts_mid_block = row_start % BLOCK != 0

    span = torch.arange(blocks, device=device)
    spanning = (lo.unsqueeze(1) + span).clamp(max=blocks - 1)  # lo..i, used where rows mix
    one_row = index.unsqueeze(1).expand(blocks, blocks).clone()  # the diagonal, repeated
    one_row[:, 0] = torch.where(starts_mid_block, lo, index)  # [partial first block,] diagonal
    kv_indices = torch.where(same_row.unsqueeze(1), one_row, spanning)
    kv_num = torch.where(same_row, 1 + starts_mid_block.long(), index - lo + 1)
    full_num = torch.where(same_row, (index - first_full).clamp(min=0), torch.zeros_like(index))
    full_indices = (first_full.unsqueeze(1) + span).clamp(max=blocks - 1)

    documents = layout.documents

    def mask_mod(b, h, q, k):
        return (documents[q] == documents[k]) & (k <= q)

    def batched(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.int32).view(1, 1, *x.shape)

    return BlockMask.from_kv_blocks(
        batched(kv_num),
        batched(kv_indices),
        batched(full_num),
        batched(full_indices),
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
    )


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _pad_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PackedLayout,
    kernel: str = "auto",
) -> torch.Tensor:
    """Attention of q, k, v [1, H, T, E] under ``layout``'s document-causal mask -> [1, H, T, E].

    kernel: ``flex`` (FlexAttention; compiled on CUDA, eager elsewhere: forward only on CPU),
    ``dense`` (SDPA with a [T, T] boolean mask: any device, quadratic memory) or ``auto``
    (flex on CUDA, dense elsewhere).
    """
    if kernel == "auto":
        kernel = "flex" if q.is_cuda else "dense"
    if kernel == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask)
    if kernel != "flex":
        raise ValueError(f"unknown packed attention kernel {kernel!r}")
    width = q.shape[-1]
    padded = max(MIN_HEAD_WIDTH, 1 << (width - 1).bit_length())
    q, k, v = (_pad_heads(x, padded) for x in (q, k, v))
    if q.is_cuda:
        attend = _compiled_flex_attention()
    else:
        from torch.nn.attention.flex_attention import flex_attention as attend
    out = attend(q, k, v, block_mask=layout.block_mask, scale=width**-0.5)
    return out[..., :width]
