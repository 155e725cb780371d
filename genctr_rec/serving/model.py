"""The inference model: a trained :class:`CTRModel` rebuilt unsharded from plain tensor ops, so
that ``torch.export`` captures it and AOTInductor compiles it (``serving/exported.py``).

:class:`ServingModel` scores a batch of requests (padded histories, any number of candidates
per request) through two entry points, each exported as its own program:

* ``contexts``: g(s, c) alone for given (request, category) pairs (model integration only), so
  that a caller can compute it once per pair and cache it;
* ``score``: probabilities given g per candidate.

``forward`` (probabilities, g computed once per distinct (request, candidate category)) is the
two composed; the predictor composes the compiled programs the same way.

Every table has one row more than training's: the mean of its trained rows, the **default
row** where the predictor looks up ids the model never saw (a new ad, a new category, a feature
value past its vocabulary; the user table already ends in its trained default row). A table is
a :class:`RowTable`: fp32 rows, or fbgemm's fused row-wise int8 / int4 rows (values, then an
fp16 scale and bias per row: the layout of TorchRec's quantised tables, made by fbgemm's
``FloatToFusedNBitRowwiseQuantizedSBHalf``) dequantised with plain tensor ops. Why not
TorchRec's quantised modules in the graph: their lookup is an fbgemm kernel that AOTInductor
would run through its Python proxy executor, and a gather of the few rows a batch reads,
dequantised in place, compiles into the same kernel as the model around it.
"""

import copy

import torch
from torch import nn

from genctr_rec.data.features import FeatureSchema
from genctr_rec.embeddings import CATEGORY_TABLE, FEATURES_MODULE, ITEM_TABLE, TABLES
from genctr_rec.models.ctr import CTRModel
from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.models.inputs import candidate_logits
from genctr_rec.serving.requests import unique_pairs

QUANTIZE_CHOICES = ("none", "int8", "int4")
BITS = {"none": 32, "int8": 8, "int4": 4}


class RowTable(nn.Module):
    """One table's rows for flat ids [N] -> [N, dim]: fp32, or fused row-wise int8 / int4."""

    def __init__(self, weight: torch.Tensor, bits: int = 32) -> None:
        super().__init__()
        self.bits = bits
        self.dim = int(weight.shape[1])
        if bits == 32:
            rows = weight.detach().float().contiguous()
        else:
            import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

            if self.dim * bits % 8:
                raise ValueError(f"int{bits} rows need dim * {bits} to fill whole bytes")
            rows = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(
                weight.detach().float().contiguous(), bits
            )
        self.register_buffer("rows", rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows[ids]
        if self.bits == 32:
            return rows
        packed = self.dim * self.bits // 8
        scale = rows[:, packed : packed + 2].contiguous().view(torch.float16).float()
        bias = rows[:, packed + 2 : packed + 4].contiguous().view(torch.float16).float()
        values = rows[:, :packed]
        if self.bits == 4:  # two values a byte, the first in the low nibble
            values = torch.stack([values & 15, values >> 4], dim=2).reshape(-1, self.dim)
        return values.float() * scale + bias


class TableLookup(nn.Module):
    """Rows of the item and category tables for flat id tensors."""

    def __init__(self, items: torch.Tensor, categories: torch.Tensor, bits: int = 32) -> None:
        super().__init__()
        self.items = RowTable(items, bits)
        self.categories = RowTable(categories, bits)

    def forward(
        self, item_ids: torch.Tensor, category_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items(item_ids), self.categories(category_ids)


class FeatureLookup(nn.Module):
    """Pooled side features [N, len(keys) * dim] (``user_id`` and the declared sparse ones, in
    the schema's order) from a key-major jagged pair (``values``, ``lengths`` [K * N]): a single
    id is its row (SUM of one), a list is mean-pooled (an empty one is zeros), as training's
    EmbeddingBagCollection pools. [N, 0] when the model reads none."""

    def __init__(
        self, schema: FeatureSchema | None, tables: dict[str, torch.Tensor], bits: int = 32
    ) -> None:
        super().__init__()
        self.keys: list[str] = schema.sparse_keys if schema is not None else []
        lists = schema.pooled_lists() if schema is not None else set()
        self.means = [key in lists for key in self.keys]
        self.tables = nn.ModuleList([RowTable(tables[key], bits) for key in self.keys])

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """``candidates`` [N] gives the row count."""
        n = candidates.shape[0]
        if not self.keys:
            return candidates.unsqueeze(1)[:, :0].float()  # [N, 0]
        lengths = lengths.long()
        ends = torch.cumsum(lengths, 0)
        pooled = []
        for k, (table, mean) in enumerate(zip(self.tables, self.means, strict=True)):
            counts = lengths[k * n : (k + 1) * n]
            start = ends[k * n] - counts[0]
            ids = values[start : ends[(k + 1) * n - 1]]
            owner = torch.repeat_interleave(torch.arange(n), counts, output_size=ids.shape[0])
            summed = torch.zeros(n, table.dim).index_add(0, owner, table(ids))
            pooled.append(summed / counts.clamp(min=1).unsqueeze(1).float() if mean else summed)
        return torch.cat(pooled, dim=1)


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
    """Training's per-candidate forward (:func:`~genctr_rec.models.inputs.candidate_logits`)
    on a request batch: each request's history is pooled once, then gathered per candidate."""

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
        history = (hist_items + hist_cats)[rows] if self.backbone.uses_history else None
        return candidate_logits(
            self.backbone,
            self.dense_norm,
            target_items,
            target_cats,
            query_cats[rows],
            (hist_items.sum(1) / count)[rows],
            (hist_cats.sum(1) / count)[rows],
            side if self.num_side else None,
            dense,
            g if self.uses_context else None,
            history,
            lengths[rows],
        )


class ServingModel(nn.Module):
    """Requests in, click probabilities out (see the module docstring for the entry points).

    Histories are padded tensors [R, L] with ``hist_lengths`` [R] (newest last, at most the
    model's ``max_history``); candidates are flat [N] with ``cand_rows`` naming their request.
    """

    __jit_unused_properties__ = ["model_integration"]  # the legacy TorchScript compiles it

    def __init__(
        self,
        lookup: nn.Module,
        features: nn.Module,
        context: nn.Module,
        head: nn.Module,
        num_categories: int,
        calibration: tuple[float, float] = (1.0, 0.0),
    ) -> None:
        super().__init__()
        self.lookup = lookup
        self.features = features
        self.context = context
        self.head = head
        self.num_categories = num_categories
        # the run's Platt scaling (calibration.py): p = sigmoid(scale * logit + bias)
        self.register_buffer("calibration", torch.tensor(calibration, dtype=torch.float32))

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
        return torch.sigmoid(logits * self.calibration[0] + self.calibration[1])

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
        rows, cats, inverse = unique_pairs(cand_rows, cand_cats, self.num_categories)
        g = self.contexts(hist_items, hist_cats, hist_lengths, rows, cats)[inverse]
        return self.score(
            hist_items, hist_cats, hist_lengths, query_cats, cand_items, cand_cats, cand_rows,
            side_values, side_lengths, dense, g,
        )  # fmt: skip

    @property
    def model_integration(self) -> bool:
        return self.context.decoder is not None


def with_default_row(trained: torch.Tensor, add: bool = True) -> torch.Tensor:
    """The trained rows [n, D], then their mean: the default row (``add`` False: a table that
    already ends in a trained default row, the user table, as it is)."""
    trained = trained.detach().float()
    return torch.cat([trained, trained.mean(0, keepdim=True)]) if add else trained.clone()


def table_weights(model: CTRModel) -> dict[str, torch.Tensor]:
    """The full item and category tables of an unsharded model, whichever lookup layout."""
    found = {}
    for key, value in model.embeddings.tables.state_dict().items():
        for name in TABLES:
            if key.endswith(f"{name}.weight") and not key.startswith(FEATURES_MODULE):
                found[name] = value
    return found


def feature_weights(model: CTRModel, schema: FeatureSchema | None) -> dict[str, torch.Tensor]:
    """The side-feature tables by key, each with its default row (the user table has one)."""
    if schema is None or FEATURES_MODULE not in model.embeddings.tables:
        return {}
    trained = model.embeddings.tables[FEATURES_MODULE].state_dict()
    return {
        key: with_default_row(trained[f"embedding_bags.{key}.weight"], add=key != "user_id")
        for key in schema.sparse_keys
    }


def table_bytes(module: nn.Module) -> int:
    """Bytes held by the tables' rows (fp32, or fused int8 / int4 rows with scale and bias)."""
    tables = [m for m in module.modules() if isinstance(m, RowTable)]
    return sum(m.rows.numel() * m.rows.element_size() for m in tables)


def build_serving_model(
    model: CTRModel,
    quantize: str = "none",
    schema: FeatureSchema | None = None,
    calibration: tuple[float, float] = (1.0, 0.0),
) -> tuple[ServingModel, dict[str, int]]:
    """The serving model of an unsharded trained model (eager, ready for ``torch.export``) and
    its tables' sizes in bytes (``fp32``, and ``served`` after quantisation); ``calibration``
    is the run's (scale, bias), applied to the logits in the graph."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    weights = table_weights(model)
    items, categories = (with_default_row(weights[n]) for n in (ITEM_TABLE, CATEGORY_TABLE))
    features = feature_weights(model, schema)
    fp32 = sum(t.numel() * 4 for t in (items, categories, *features.values()))
    bits = BITS[quantize]
    lookup = TableLookup(items, categories, bits)
    side = FeatureLookup(schema if features else None, features, bits)
    head = ScoreHead(
        copy.deepcopy(model.backbone),
        model.decoder is not None,
        len(side.keys),
        copy.deepcopy(model.dense_norm),
    )
    serving = ServingModel(
        lookup,
        side,
        ContextNet(copy.deepcopy(model.decoder)),
        head,
        categories.shape[0],
        calibration,
    )
    sizes = {"fp32": fp32, "served": table_bytes(lookup) + table_bytes(side)}
    return serving.eval(), sizes
