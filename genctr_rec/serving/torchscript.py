"""The inference model: a trained :class:`CTRModel` rebuilt unsharded and compiled to TorchScript.

Why TorchScript and not ``torch.export``: the int8 tables are fbgemm objects without a fake
(meta) implementation, so ``torch.export`` handles the fp32 model only, and it specialises a
batch of one away; ``torch.jit.script(torchrec.fx.symbolic_trace(m))`` compiles both the fp32
and the int8 model, keeps dynamic shapes and reloads bit-exactly without Python model code.

The compiled :class:`ServingModel` scores a batch of requests (padded histories, any number of
candidates per request) and has three entry points:

* ``forward``: probabilities of every candidate; g(s, c) computed once per distinct
  (request, candidate category), not once per candidate;
* ``contexts``: g(s, c) alone for given (request, category) pairs, so that a caller can cache it;
* ``score``: probabilities given g per candidate (from ``contexts`` or a cache).

Every table has one row more than training's: the mean of its trained rows, the **default
row** where the predictor looks up ids the model never saw (a new ad, a new category, a feature
value past its vocabulary; the user table already ends in its trained default row). The
tables sit in one unsharded ``EmbeddingCollection`` (plain sequence lookups: no backward at
inference, so the pooled-bag trick of training buys nothing), optionally int8 row-wise
quantised with TorchRec's ``quantize_inference_model``. The user and side-feature tables sit in
the same ``EmbeddingBagCollection`` training used (``embeddings.feature_collection``),
quantised the same way; per-candidate side features arrive as a key-major jagged pair
(``side_values``, ``side_lengths``) and dense features as ``dense`` [N, num_dense].
"""

import copy

import torch
import torchrec.fx
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from torchrec.inference.modules import quantize_inference_model
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from genctr_rec.data.features import FeatureSchema
from genctr_rec.embeddings import (
    CATEGORY_TABLE,
    FEATURES_MODULE,
    ITEM_TABLE,
    TABLES,
    feature_collection,
)
from genctr_rec.models.ctr import CTRModel
from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.models.inputs import impression_input

QUANTIZE_CHOICES = ("none", "int8")
# fbgemm stores an int8 row as dim bytes + fp16 scale and bias (4 bytes), padded to this
# alignment. TorchRec's default of 16 turns a 20-byte row (dim 16) into 32 bytes; 4 wastes none.
INT8_ROW_ALIGNMENT = 4


class TableLookup(nn.Module):
    """Rows of the item and category tables for flat id tensors (one KJT, two features)."""

    def __init__(self, num_items: int, num_categories: int, dim: int) -> None:
        super().__init__()
        sizes = {ITEM_TABLE: num_items, CATEGORY_TABLE: num_categories}
        self.tables = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=name, embedding_dim=dim, num_embeddings=sizes[name], feature_names=[name]
                )
                for name in TABLES
            ],
            device=torch.device("cpu"),
        )

    def forward(
        self, item_ids: torch.Tensor, category_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.cat(
            [
                item_ids.new_full((1,), item_ids.shape[0]),
                item_ids.new_full((1,), category_ids.shape[0]),
            ]
        )
        kjt = KeyedJaggedTensor(
            keys=list(TABLES), values=torch.cat([item_ids, category_ids]), lengths=lengths.int()
        )
        out = self.tables(kjt)
        return out[ITEM_TABLE].values(), out[CATEGORY_TABLE].values()


class FeatureLookup(nn.Module):
    """Pooled side features [N, len(keys) * dim] (``user_id`` and the declared sparse ones, in
    the schema's order) from a key-major jagged pair; [N, 0] when the model reads none."""

    def __init__(self, schema: FeatureSchema | None, dim: int, default_rows: bool = False) -> None:
        super().__init__()
        self.keys: list[str] = schema.sparse_keys if schema is not None else []
        self.tables = (
            feature_collection(schema, dim, torch.device("cpu"), default_rows)
            if self.keys
            else None
        )

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """``candidates`` [N] only gives the row count when there is no table."""
        if self.tables is None:
            return candidates.unsqueeze(1)[:, :0].float()  # [N, 0]
        kjt = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths.int())
        pooled = self.tables(kjt).to_dict()
        return torch.cat([pooled[key] for key in self.keys], dim=1)


class ContextNet(nn.Module):
    """g(s, c) for padded histories [U, L, D] and candidate-category rows [U, D]; [U, 0]
    without model integration (the head then ignores it)."""

    def __init__(self, decoder: GenerativeDecoder | None) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(
        self,
        items: torch.Tensor,
        cats: torch.Tensor,
        lengths: torch.Tensor,
        category_rows: torch.Tensor,
    ) -> torch.Tensor:
        if self.decoder is None:
            return category_rows[:, :0]
        return self.decoder.forward_target(items, cats, lengths, category_rows)


class ScoreHead(nn.Module):
    """The backbone on per-candidate inputs; history pooling is done once per request."""

    def __init__(
        self,
        backbone: nn.Module,
        uses_context: bool,
        num_side: int,
        dense_norm: nn.Module | None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.uses_context = uses_context
        self.num_side = num_side
        self.dense_norm = dense_norm

    def forward(
        self,
        target_items: torch.Tensor,
        target_cats: torch.Tensor,
        query_cats: torch.Tensor,
        hist_items: torch.Tensor,
        hist_cats: torch.Tensor,
        lengths: torch.Tensor,
        rows: torch.Tensor,
        g: torch.Tensor,
        side: torch.Tensor,
        dense: torch.Tensor,
    ) -> torch.Tensor:
        """target_* [N, D]; query_cats [R, D]; hist_* [R, L, D] zero-padded; lengths [R];
        rows [N] (each candidate's request); g [N, D or 0]; side [N, F * D]; dense
        [N, num_dense] -> logits [N]."""
        count = lengths.clamp(min=1).to(hist_items.dtype).unsqueeze(1)
        x0 = impression_input(
            target_items,
            target_cats,
            query_cats[rows],
            (hist_items.sum(1) / count)[rows],
            (hist_cats.sum(1) / count)[rows],
            side if self.num_side else None,
            self.dense_norm(dense) if self.dense_norm is not None else None,
        )
        context = g if self.uses_context else None
        if self.backbone.uses_history:
            return self.backbone(
                x0,
                context,
                target_items,
                target=target_items + target_cats,
                history=(hist_items + hist_cats)[rows],
                lengths=lengths[rows],
            )
        return self.backbone(x0, context, target_items)


class ServingModel(nn.Module):
    """Requests in, click probabilities out (see the module docstring for the entry points).

    Histories are padded tensors [R, L] with ``hist_lengths`` [R] (newest last, at most the
    model's ``max_history``); candidates are flat [N] with ``cand_rows`` naming their request.
    """

    def __init__(
        self,
        lookup: nn.Module,
        features: nn.Module,
        context: nn.Module,
        head: nn.Module,
        num_categories: int,
    ) -> None:
        super().__init__()
        self.lookup = lookup
        self.features = features
        self.context = context
        self.head = head
        self.num_categories = num_categories

    def _history(
        self,
        hist_items: torch.Tensor,
        hist_cats: torch.Tensor,
        hist_lengths: torch.Tensor,
        more_items: torch.Tensor,
        more_cats: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One lookup for the histories and extra ids; history rows zeroed past each length."""
        r, length = hist_items.shape[0], hist_items.shape[1]
        items, cats = self.lookup(
            torch.cat([hist_items.reshape(-1), more_items]),
            torch.cat([hist_cats.reshape(-1), more_cats]),
        )
        positions = torch.arange(length, device=hist_items.device).unsqueeze(0)
        valid = (positions < hist_lengths.unsqueeze(1)).unsqueeze(2).to(items.dtype)
        h_items = items[: r * length].reshape(r, length, -1) * valid
        h_cats = cats[: r * length].reshape(r, length, -1) * valid
        return h_items, h_cats, items[r * length :], cats[r * length :]

    @torch.jit.export
    def contexts(
        self,
        hist_items: torch.Tensor,
        hist_cats: torch.Tensor,
        hist_lengths: torch.Tensor,
        rows: torch.Tensor,
        categories: torch.Tensor,
    ) -> torch.Tensor:
        """g(s, c) [U, D] for the requests ``rows`` [U] and categories ``categories`` [U]."""
        h_items, h_cats, _, c_rows = self._history(
            hist_items, hist_cats, hist_lengths, hist_items.new_zeros(0), categories
        )
        return self.context(h_items[rows], h_cats[rows], hist_lengths[rows], c_rows)

    @torch.jit.export
    def score(
        self,
        hist_items: torch.Tensor,
        hist_cats: torch.Tensor,
        hist_lengths: torch.Tensor,
        query_cats: torch.Tensor,
        cand_items: torch.Tensor,
        cand_cats: torch.Tensor,
        cand_rows: torch.Tensor,
        side_values: torch.Tensor,
        side_lengths: torch.Tensor,
        dense: torch.Tensor,
        g: torch.Tensor,
    ) -> torch.Tensor:
        """Probabilities [N] given g(s, c) per candidate ``g`` [N, D] (ignored without MI)."""
        n = cand_items.shape[0]
        h_items, h_cats, t_items, cats = self._history(
            hist_items, hist_cats, hist_lengths, cand_items, torch.cat([cand_cats, query_cats])
        )
        side = self.features(side_values, side_lengths, cand_items)
        logits = self.head(
            t_items, cats[:n], cats[n:], h_items, h_cats, hist_lengths, cand_rows, g, side, dense
        )
        return torch.sigmoid(logits)

    def forward(
        self,
        hist_items: torch.Tensor,
        hist_cats: torch.Tensor,
        hist_lengths: torch.Tensor,
        query_cats: torch.Tensor,
        cand_items: torch.Tensor,
        cand_cats: torch.Tensor,
        cand_rows: torch.Tensor,
        side_values: torch.Tensor,
        side_lengths: torch.Tensor,
        dense: torch.Tensor,
    ) -> torch.Tensor:
        """Probabilities [N]; g(s, c) once per distinct (request, candidate category)."""
        n = cand_items.shape[0]
        pairs, inverse = torch.unique(
            cand_rows * self.num_categories + cand_cats, return_inverse=True
        )
        h_items, h_cats, t_items, cats = self._history(
            hist_items,
            hist_cats,
            hist_lengths,
            cand_items,
            torch.cat([cand_cats, query_cats, pairs % self.num_categories]),
        )
        r = query_cats.shape[0]
        rows = torch.div(pairs, self.num_categories, rounding_mode="floor")
        g = self.context(h_items[rows], h_cats[rows], hist_lengths[rows], cats[n + r :])[inverse]
        side = self.features(side_values, side_lengths, cand_items)
        logits = self.head(
            t_items,
            cats[:n],
            cats[n : n + r],
            h_items,
            h_cats,
            hist_lengths,
            cand_rows,
            g,
            side,
            dense,
        )
        return torch.sigmoid(logits)


def _with_default_row(target: torch.Tensor, trained: torch.Tensor) -> None:
    """``target`` [n + 1, D] = the trained rows [n, D], then their mean: the default row. A
    table that already ends in a trained default row (the user table) is copied as it is."""
    if target.shape[0] == trained.shape[0]:
        target.copy_(trained)
        return
    target[:-1].copy_(trained)
    target[-1].copy_(trained.mean(0))


def table_weights(model: CTRModel) -> dict[str, torch.Tensor]:
    """The full item and category tables of an unsharded model, whichever lookup layout."""
    found = {}
    for key, value in model.embeddings.tables.state_dict().items():
        for name in TABLES:
            if key.endswith(f"{name}.weight") and not key.startswith(FEATURES_MODULE):
                found[name] = value
    return found


def table_bytes(module: nn.Module) -> int:
    """Bytes held by the embedding tables' weights (fp32 or int8 rows with scale and bias)."""
    return sum(
        v.numel() * v.element_size()
        for k, v in module.state_dict().items()
        if k.endswith(".weight") and ("embeddings." in k or "embedding_bags." in k)
    )


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    return torch.jit.script(torchrec.fx.symbolic_trace(module))


def build_serving_model(
    model: CTRModel, quantize: str = "none", schema: FeatureSchema | None = None
) -> tuple[torch.jit.ScriptModule, dict[str, int]]:
    """Compile an unsharded trained model; returns it and the table sizes in bytes
    (``fp32`` before and ``served`` after quantisation)."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    weights = table_weights(model)
    dim = weights[ITEM_TABLE].shape[1]
    # one default row more per table: where unknown ids are looked up
    num_items, num_categories = weights[ITEM_TABLE].shape[0], weights[CATEGORY_TABLE].shape[0]
    lookup = TableLookup(num_items + 1, num_categories + 1, dim)
    features = FeatureLookup(schema, dim, default_rows=True)
    with torch.no_grad():
        for name in TABLES:
            _with_default_row(lookup.tables.embeddings[name].weight, weights[name])
        if features.tables is not None:
            trained = model.embeddings.tables[FEATURES_MODULE].state_dict()
            for key, value in features.tables.state_dict().items():
                _with_default_row(value, trained[key])
    sizes = {"fp32": table_bytes(lookup) + table_bytes(features)}
    if quantize == "int8":
        quant_prep_customize_row_alignment(lookup, [EmbeddingCollection], INT8_ROW_ALIGNMENT)
        lookup = quantize_inference_model(lookup)
        if features.tables is not None:
            quant_prep_customize_row_alignment(
                features, [EmbeddingBagCollection], INT8_ROW_ALIGNMENT
            )
            features = quantize_inference_model(features)
    sizes["served"] = table_bytes(lookup) + table_bytes(features)
    decoder = copy.deepcopy(model.decoder)
    backbone = copy.deepcopy(model.backbone)
    head = ScoreHead(
        backbone, decoder is not None, len(features.keys), copy.deepcopy(model.dense_norm)
    )
    parts = [lookup, features, ContextNet(decoder), head]
    for part in parts:
        part.eval()
    serving = ServingModel(*(_script(p) for p in parts), num_categories + 1)
    return torch.jit.script(serving.eval()), sizes
