"""One place that builds a stage's model from a :class:`RunConfig`: on ``meta`` for training
(``DistributedModelParallel`` materialises and shards the tables) and on the CPU for export
and serving. The transfer table (which pre-trained state each ``--transfer`` inherits) lives in
:mod:`genctr_rec.config`; what a backbone consumes is declared by the backbone itself.
"""

from __future__ import annotations

import torch
from torch import nn

from genctr_rec.config import DECODER_TRANSFERS, RunConfig
from genctr_rec.data.features import FeatureSchema
from genctr_rec.embeddings import SharedEmbeddings
from genctr_rec.models.ctr import BatchCTRModel, CTRModel, PretrainModel
from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.models.inputs import DenseNorm


def decoder_for(cfg: RunConfig) -> GenerativeDecoder:
    m = cfg.model
    return GenerativeDecoder(
        dim=m.dim,
        max_len=cfg.max_history + 1,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        conditional=m.decoder == "conditional",
        layout=m.decoder_layout,
        kernel=m.decoder_kernel,
    )


def feature_schema(cfg: RunConfig) -> FeatureSchema | None:
    """The side features the run's CTR model reads (None: pre-training, or turned off)."""
    if cfg.stage != "finetune" or not cfg.model.side_features or cfg.features is None:
        return None
    return FeatureSchema.from_json(cfg.features)


def build_stage_model(
    cfg: RunConfig,
    device: torch.device,
    dedup: bool | None = None,
    batch_forward: bool = False,
) -> nn.Module:
    """The stage's model, tables on ``device`` (``meta`` for DMP, ``cpu`` for export);
    ``batch_forward``: the CTR model whose forward takes the batch (TorchRec's pipelines)."""
    m = cfg.model
    features = feature_schema(cfg)
    embeddings = SharedEmbeddings(
        cfg.num_items,
        cfg.num_categories,
        m.dim,
        m.lookup,
        m.dedup if dedup is None else dedup,
        device=device,
        features=features,
    )
    return model_over(cfg, embeddings, batch_forward)


def model_over(cfg: RunConfig, embeddings: nn.Module, batch_forward: bool = False) -> nn.Module:
    """The stage's model over given tables (``SharedEmbeddings``, or any module with its call
    signature: the training benchmark's dense reference), so that every caller builds the
    same dense part from the same config."""
    if cfg.stage == "pretrain":
        return PretrainModel(embeddings, decoder_for(cfg))
    features = feature_schema(cfg)
    decoder = decoder_for(cfg) if cfg.transfer in DECODER_TRANSFERS else None
    return (BatchCTRModel if batch_forward else CTRModel)(
        embeddings,
        cfg.backbone,
        decoder,
        dense_norm=DenseNorm(*features.dense_moments()) if features and features.dense else None,
        fusion=cfg.model.context_fusion,
        context_dropout=cfg.model.context_dropout,
    )
