"""The item and category tables, declared once and shared by the decoder and the CTR backbone.

Both stages look up ids through one :class:`SharedEmbeddings` module, so stage 2 starts from
stage 1's tables by loading the same state-dict keys (``embeddings.*``).

How lookups run: on CPU, fbgemm's sequence (unpooled) kernel behind ``EmbeddingCollection``
has a backward several times slower than the pooled kernel behind ``EmbeddingBagCollection``
(``benchmarks/results/lookup_layouts.md``). So the default ``lookup="pooled"`` keeps each
table in an ``EmbeddingBagCollection`` and looks every id up as **a bag of one** (SUM pooling
of a single row is the row itself; gradients of repeated ids add up exactly as in a sequence
lookup).
``lookup="sequence"`` uses an ``EmbeddingCollection`` instead, the textbook layout. With
``dedup=True`` each sharded table's ids are made unique before the lookup and gathered back,
which cuts the ids and rows the all-to-all moves and changes no value or gradient; tables that
move nothing (one rank, or replicated: :meth:`SharedEmbeddings.set_routed`) skip it.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.distributed as dist
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    KeyedTensor,
    PoolingType,
)

from genctr_rec.data.features import USER_ID, FeatureSchema
from genctr_rec.data.keys import CATEGORY_TABLE, ITEM_TABLE
from genctr_rec.data.lookups import pad_stride

TABLES = (ITEM_TABLE, CATEGORY_TABLE)
FEATURES_MODULE = "features"  # tables.features: the user table and declared side features


def feature_collection(
    schema: FeatureSchema,
    dim: int,
    device: torch.device | None = None,
    default_rows: bool = False,
) -> EmbeddingBagCollection:
    """One pooled table per side feature, named like its KJT key (``user_id``, then the
    declared ``id`` / ``ids`` features): a single id is its own bag (SUM), a list is
    mean-pooled. Training shards it with the rest; serving builds the same one unsharded, with
    ``default_rows`` one row more in each declared feature's table (the user table has its
    default row already)."""
    lists = schema.pooled_lists()
    configs = [
        EmbeddingBagConfig(
            name=key,
            embedding_dim=dim,
            num_embeddings=rows + (default_rows and key != USER_ID),
            feature_names=[key],
            pooling=PoolingType.MEAN if key in lists else PoolingType.SUM,
        )
        for key, rows in schema.table_sizes().items()
    ]
    return EmbeddingBagCollection(tables=configs, device=device)


def _common_strides(strides: list[int], device: torch.device) -> list[int]:
    """The largest of each stride over ranks (one all-reduce): a sharded pooled lookup needs
    one batch size on every rank (row-wise reduce-scatter, table-wise all-to-all); shorter
    ranks pad with empty bags."""
    if strides and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor(strides, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.tolist()
    return strides


class SharedEmbeddings(nn.Module):
    """Item and category tables, one TorchRec module each, looked up by flat id tensors.

    One module per table (``tables.item``, ``tables.category``) rather than one collection of
    both: each table's lookup then has its own batch size (no padding of the shorter id list
    to the longer, no splitting of a shared output), and DMP can shard the item table while
    it replicates the small category table.

    Args:
        num_items: rows of the item table.
        num_categories: rows of the category table.
        dim: embedding width of both tables (the paper uses 16 everywhere).
        lookup: ``"pooled"`` (EmbeddingBagCollection, bags of one) or ``"sequence"``
            (EmbeddingCollection).
        dedup: look up unique ids only, then gather back (tables sharded over ranks only).
        device: ``meta`` to let ``DistributedModelParallel`` materialise the shards.
        features: also hold the user table and the declared side-feature tables
            (``tables.features``, looked up by :meth:`side_features`); the pre-training model
            has none.

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
        features: FeatureSchema | None = None,
    ) -> None:
        super().__init__()
        if lookup not in ("pooled", "sequence"):
            raise ValueError(f"lookup must be 'pooled' or 'sequence', got {lookup!r}")
        self.dim = dim
        self.lookup = lookup
        self.dedup = dedup
        # until the plan is known (set_routed): treat every table as sharded over ranks
        self.routed: frozenset[str] = frozenset(TABLES)
        sizes = {ITEM_TABLE: num_items, CATEGORY_TABLE: num_categories}
        self.tables = nn.ModuleDict()
        for name in TABLES:
            common = {
                "name": name,
                "embedding_dim": dim,
                "num_embeddings": sizes[name],
                "feature_names": [name],
            }
            if lookup == "pooled":
                config = EmbeddingBagConfig(**common, pooling=PoolingType.SUM)
                self.tables[name] = EmbeddingBagCollection(tables=[config], device=device)
            else:
                config = EmbeddingConfig(**common)
                self.tables[name] = EmbeddingCollection(tables=[config], device=device)
        self.feature_keys: list[str] = []
        if features is not None:
            self.feature_keys = features.sparse_keys
            self.tables[FEATURES_MODULE] = feature_collection(features, dim, device)

    def set_routed(self, tables: Collection[str]) -> None:
        """Tell the lookup which tables' ids go through an all-to-all (sharded, more than one
        rank; the plan decides). Only those are de-duplicated (it shrinks what is sent; locally
        fbgemm's backward sums repeated rows anyway, and the sort costs more than it saves) and
        padded to the batch size of the largest rank."""
        self.routed = frozenset(tables)

    def forward(
        self, item_ids: torch.Tensor, category_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for ``item_ids`` [N] and ``category_ids`` [M]: tensors [N, dim] and [M, dim]."""
        ids = {ITEM_TABLE: item_ids, CATEGORY_TABLE: category_ids}
        inverse: dict[str, torch.Tensor] = {}
        for name in TABLES:
            if self.dedup and name in self.routed:
                ids[name], inverse[name] = torch.unique(ids[name], return_inverse=True)
        rows = self._pooled(ids) if self.lookup == "pooled" else self._sequence(ids)
        for name, where in inverse.items():
            rows[name] = rows[name][where]
        return rows[ITEM_TABLE], rows[CATEGORY_TABLE]

    def side_features(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled side features [B, len(keys) * dim], in :attr:`feature_keys` order."""
        b = kjt.stride()
        if any(key in self.routed for key in self.feature_keys):
            (stride,) = _common_strides([b], kjt.values().device)
            kjt = pad_stride(kjt, stride)
        return self.side_rows(self.tables[FEATURES_MODULE](kjt), b)

    def side_rows(self, pooled: KeyedTensor, rows: int) -> torch.Tensor:
        """The features table's pooled output as [rows, len(keys) * dim] in
        :attr:`feature_keys` order, without the padding bags past ``rows``."""
        out = pooled.to_dict()
        return torch.cat([out[key][:rows] for key in self.feature_keys], dim=1)

    def _pooled(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every id a bag of one; a sharded table's batch padded to the ranks' largest."""
        counts = {name: int(ids[name].numel()) for name in TABLES}
        strides = {name: max(n, 1) for name, n in counts.items()}  # fbgemm wants a bag
        sharded = [name for name in TABLES if name in self.routed]
        common = _common_strides([strides[n] for n in sharded], ids[ITEM_TABLE].device)
        strides.update(zip(sharded, common, strict=True))
        rows = {}
        for name in TABLES:
            n, stride = counts[name], strides[name]
            lengths = torch.ones(stride, dtype=torch.int32, device=ids[name].device)
            lengths[n:] = 0
            kjt = KeyedJaggedTensor(keys=[name], values=ids[name], lengths=lengths)
            pooled = self.tables[name](kjt).values()
            rows[name] = pooled if n == stride else pooled[:n]
        return rows

    def _sequence(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = {}
        for name in TABLES:
            lengths = torch.tensor([ids[name].numel()], dtype=torch.int32, device=ids[name].device)
            kjt = KeyedJaggedTensor(keys=[name], values=ids[name], lengths=lengths)
            rows[name] = self.tables[name](kjt)[name].values()
        return rows
