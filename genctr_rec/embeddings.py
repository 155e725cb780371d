"""The item and category tables, declared once and shared by the decoder and the CTR backbone.

Both stages look up ids through one :class:`SharedEmbeddings` module, so stage 2 starts from
stage 1's tables by loading the same state-dict keys (``embeddings.*``).

How lookups run (measured, see ``benchmarks/``): on CPU, fbgemm's sequence (unpooled) kernel
behind ``EmbeddingCollection`` has a backward about 10x slower than the pooled kernel behind
``EmbeddingBagCollection``. So the default ``lookup="pooled"`` keeps the tables in an
``EmbeddingBagCollection`` and looks every id up as **a bag of one** (SUM pooling of a single
row is the row itself; gradients of repeated ids add up exactly as in a sequence lookup).
``lookup="sequence"`` uses an ``EmbeddingCollection`` instead, the textbook layout. With
``dedup=True`` each table's ids are made unique before the lookup and gathered back, which
cuts the work on popularity-skewed ids and changes no value or gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)

ITEM_TABLE = "item"
CATEGORY_TABLE = "category"
TABLES = (ITEM_TABLE, CATEGORY_TABLE)


def _common_stride(stride: int, device: torch.device) -> int:
    """The largest stride over ranks: sharded pooled lookups need one batch size on every rank
    (row-wise reduce-scatter, table-wise all-to-all); shorter ranks pad with empty bags."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor([stride], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())
    return stride


class SharedEmbeddings(nn.Module):
    """Item and category tables in one TorchRec module, looked up by flat id tensors.

    Args:
        num_items: rows of the item table.
        num_categories: rows of the category table.
        dim: embedding width of both tables (TorchRec wants one width per collection; the
            paper uses 16 everywhere).
        lookup: ``"pooled"`` (EmbeddingBagCollection, bags of one) or ``"sequence"``
            (EmbeddingCollection).
        dedup: look up unique ids only, then gather back.
        device: ``meta`` to let ``DistributedModelParallel`` materialise the shards.

    Example::

        emb = SharedEmbeddings(1000, 10, dim=16, device=torch.device("cpu"))
        items, cats = emb(torch.tensor([1, 2, 1]), torch.tensor([0, 3]))  # [3, 16], [2, 16]
    """

    def __init__(
        self,
        num_items: int,
        num_categories: int,
        dim: int = 16,
        lookup: str = "pooled",
        dedup: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if lookup not in ("pooled", "sequence"):
            raise ValueError(f"lookup must be 'pooled' or 'sequence', got {lookup!r}")
        self.dim = dim
        self.lookup = lookup
        self.dedup = dedup
        sizes = {ITEM_TABLE: num_items, CATEGORY_TABLE: num_categories}
        if lookup == "pooled":
            self.tables: nn.Module = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=name,
                        embedding_dim=dim,
                        num_embeddings=sizes[name],
                        feature_names=[name],
                        pooling=PoolingType.SUM,
                    )
                    for name in TABLES
                ],
                device=device,
            )
        else:
            self.tables = EmbeddingCollection(
                tables=[
                    EmbeddingConfig(
                        name=name,
                        embedding_dim=dim,
                        num_embeddings=sizes[name],
                        feature_names=[name],
                    )
                    for name in TABLES
                ],
                device=device,
            )

    def forward(
        self, item_ids: torch.Tensor, category_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for ``item_ids`` [N] and ``category_ids`` [M]: tensors [N, dim] and [M, dim]."""
        ids = {ITEM_TABLE: item_ids, CATEGORY_TABLE: category_ids}
        inverse: dict[str, torch.Tensor] = {}
        if self.dedup:
            for name in TABLES:
                ids[name], inverse[name] = torch.unique(ids[name], return_inverse=True)
        counts = [int(ids[name].numel()) for name in TABLES]
        values = torch.cat([ids[name] for name in TABLES])
        if self.lookup == "pooled":
            # one bag per id; the shorter table's feature is padded with empty bags
            stride = _common_stride(max(max(counts), 1), values.device)
            lengths = torch.zeros(len(TABLES) * stride, dtype=torch.int32, device=values.device)
            for i, n in enumerate(counts):
                lengths[i * stride : i * stride + n] = 1
            kjt = KeyedJaggedTensor(keys=list(TABLES), values=values, lengths=lengths)
            pooled = self.tables(kjt).to_dict()
            rows = {name: pooled[name][:n] for name, n in zip(TABLES, counts, strict=True)}
        else:
            lengths = torch.tensor(counts, dtype=torch.int32, device=values.device)
            kjt = KeyedJaggedTensor(keys=list(TABLES), values=values, lengths=lengths)
            jagged = self.tables(kjt)
            rows = {name: jagged[name].values() for name in TABLES}
        if self.dedup:
            rows = {name: rows[name][inverse[name]] for name in TABLES}
        return rows[ITEM_TABLE], rows[CATEGORY_TABLE]
