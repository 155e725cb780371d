"""Builds the sharded stage models from a RunConfig (training, evaluation and export share it)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from genctr_rec.config import RunConfig
from genctr_rec.embeddings import SharedEmbeddings
from genctr_rec.models.ctr import CTRModel, PretrainModel
from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.training.distributed import DistContext
from genctr_rec.training.sharding import apply_fused_optimizer, shard_model

DECODER_TRANSFERS = ("decoder", "ps_decoder", "ps_mi")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class BuiltModel:
    """The sharded model and its optimizers: ``dense_optimizer`` steps after backward (the
    fused one already stepped inside it); ``optimizer`` combines both for checkpoints."""

    dmp: DistributedModelParallel
    dense_optimizer: KeyedOptimizerWrapper
    optimizer: CombinedOptimizer
    embedding_optimizer: str
    embedding_lr: float

    def app_state(self) -> dict:
        """Everything DCP saves and loads: model and optimizer state, keyed by name."""
        return {"model": self.dmp.state_dict(), "optim": self.optimizer.state_dict()}

    def load_app_state(self, state: dict) -> None:
        self.dmp.load_state_dict(state["model"])
        if "optim" not in state.get("resharding_reset", ()):
            self.optimizer.load_state_dict(state["optim"])


def decoder_for(cfg: RunConfig) -> GenerativeDecoder:
    m = cfg.model
    return GenerativeDecoder(
        dim=m.dim,
        max_len=cfg.max_history + 1,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        conditional=m.decoder == "conditional",
    )


def build_model(cfg: RunConfig, ctx: DistContext) -> BuiltModel:
    """The stage's model with tables on ``meta``, fused optimizer registered, wrapped in DMP."""
    seed_everything(cfg.train.seed)
    m = cfg.model
    embeddings = SharedEmbeddings(
        cfg.num_items, cfg.num_categories, m.dim, m.lookup, m.dedup, device=torch.device("meta")
    )
    if cfg.stage == "pretrain":
        model: torch.nn.Module = PretrainModel(embeddings, decoder_for(cfg))
    else:
        decoder = decoder_for(cfg) if cfg.transfer in DECODER_TRANSFERS else None
        model = CTRModel(embeddings, cfg.backbone, decoder)
    opt_name = cfg.train.resolved_embedding_optimizer(ctx.device)
    emb_lr = cfg.train.resolved_embedding_lr(ctx.device)
    apply_fused_optimizer(embeddings.tables, opt_name, emb_lr)
    dmp = shard_model(model, ctx, cfg.train.batch_size, cfg.train.sharding)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    lr = cfg.train.lr
    dense_optimizer = KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adam(params, lr=lr))
    combined = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense_optimizer)])
    return BuiltModel(dmp, dense_optimizer, combined, opt_name, emb_lr)
