"""The legacy TorchScript artifact (formats 2 and 3, ``genctr export --format torchscript``).

Deprecated with TorchScript itself in torch 2.13: new artifacts hold torch.export programs
(``serving/model.py``, ``serving/exported.py``). Kept so that artifacts written by genctr-rec
0.10 still load (with a warning that names ``genctr export`` as the way to rewrite them) and so
that the serving benchmark and the parity test can compare the two formats. The model is the
same :class:`~genctr_rec.serving.model.ServingModel` with TorchRec's tables in it, int8 tables
quantised by ``quantize_inference_model`` (``torch.ao.quantization`` underneath), compiled
with ``torch.jit.script(torchrec.fx.symbolic_trace(m))``.

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
import logging
from pathlib import Path
from typing import Any

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
from genctr_rec.serving.exported import CompiledModel
from genctr_rec.serving.model import ContextNet, ScoreHead, ServingModel, table_weights

logger = logging.getLogger(__name__)
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


def _with_default_row(target: torch.Tensor, trained: torch.Tensor) -> None:
    """``target`` [n + 1, D] = the trained rows [n, D], then their mean: the default row. A
    table that already ends in a trained default row (the user table) is copied as it is."""
    if target.shape[0] == trained.shape[0]:
        target.copy_(trained)
        return
    target[:-1].copy_(trained)
    target[-1].copy_(trained.mean(0))


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
    model: CTRModel,
    quantize: str = "none",
    schema: FeatureSchema | None = None,
    calibration: tuple[float, float] = (1.0, 0.0),
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
    serving = ServingModel(*(_script(p) for p in parts), num_categories + 1, calibration)
    for entry in ("contexts", "score"):  # scripted beside forward (a marker on the method)
        torch.jit.export(getattr(ServingModel, entry))
    return torch.jit.script(serving.eval()), sizes


def compiled_model(module: torch.jit.ScriptModule) -> CompiledModel:
    """A scripted model behind the interface the predictor calls."""
    return CompiledModel(
        {"forward": module, "score": module.score, "contexts": module.contexts},
        model_integration=True,  # g is computed inside forward either way
        num_categories=int(module.num_categories),
        kind="torchscript",
        pad=False,  # TorchScript keeps every dimension dynamic, 0 and 1 included
    )


def save(module: torch.jit.ScriptModule, path: Path) -> Path:
    torch.jit.save(module, str(path))
    return path


def load_legacy(path: Path, metadata: dict[str, Any]) -> CompiledModel:
    """A TorchScript artifact, with one warning that names how to rewrite it."""
    logger.warning(
        "%s is a TorchScript artifact (format %s): TorchScript is deprecated in torch 2.13; "
        "rewrite it with genctr export --run RUN --out NEW (torch.export, AOTInductor)",
        path.parent,
        metadata.get("format_version"),
    )
    return compiled_model(torch.jit.load(str(path), map_location="cpu").eval())
