"""Builds the sharded stage models from a RunConfig (training, evaluation and export share it)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from genctr_rec.checkpoint import load_state, save_model
from genctr_rec.config import SHARED_TABLE_PREFIXES, TRANSFER_PREFIXES, RunConfig
from genctr_rec.distributed import DistContext
from genctr_rec.factory import build_stage_model
from genctr_rec.training.sharding import (
    FUSED_OPTIMIZERS,
    apply_fused_optimizer,
    default_sharding,
    shard_model,
)

TABLES_PREFIX = "embeddings.tables."
# the dense layers' Adam as one fused kernel over all tensors (CPU and CUDA) instead of a loop
# of small ops per tensor (its share of a step: benchmarks/results/finetune_speed.md)
FUSED_ADAM = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class BuiltModel:
    """The sharded model and its optimizers: ``dense_optimizer`` steps after backward (dense
    layers, and replicated tables after DDP's all-reduce; the fused one already stepped inside
    the backward); ``optimizer`` combines both for checkpoints."""

    dmp: DistributedModelParallel
    dense_optimizer: KeyedOptimizer
    optimizer: CombinedOptimizer
    embedding_optimizer: str
    embedding_lr: float
    base_lrs: list[float] = field(default_factory=list)  # every param group's, as configured

    def __post_init__(self) -> None:
        self.base_lrs = [float(g["lr"]) for g in self._param_groups()]

    def fused_param_groups(self) -> list[dict]:
        """The fused table optimizer's parameter groups (none without sharded tables)."""
        fused = getattr(self.dmp, "fused_optimizer", None)
        return list(fused.param_groups) if fused is not None else []

    def _param_groups(self) -> list[dict]:
        return self.fused_param_groups() + list(self.dense_optimizer.param_groups)

    def scale_learning_rates(self, scale: float) -> None:
        """Every learning rate at ``scale`` times the configured one (plateau decay, resume).
        The fused table kernels read the rate in their optimizer's ``zero_grad``/``step``."""
        for group, base in zip(self._param_groups(), self.base_lrs, strict=True):
            group["lr"] = base * scale
        if self.fused_param_groups():
            self.dmp.fused_optimizer.zero_grad()

    def app_state(self) -> dict:
        """Everything DCP saves and loads: model and optimizer state, keyed by name."""
        return {"model": self.dmp.state_dict(), "optim": self.optimizer.state_dict()}

    def load_app_state(self, state: dict) -> None:
        self.dmp.load_state_dict(state["model"])
        if "optim" in state and "optim" not in state.get("resharding_reset", ()):
            self.optimizer.load_state_dict(state["optim"])

    def save_selected(self, path: str | Path) -> None:
        """Collective: the model with its optimizer state (what a warm start continues)."""
        save_model(self.dmp, path, {"optim": self.optimizer.state_dict()})

    def load_selected(self, path: str | Path) -> None:
        """Collective: model and optimizer state back from :meth:`save_selected`."""
        self.dense_optimizer.init_state()
        state = self.app_state()
        load_state(state, path)
        self.load_app_state(state)


def _adam(named: dict[str, torch.Tensor], lr: float, decoder_lr: float):
    """Adam over ``named``; parameters of the decoder (``decoder.*``) at ``decoder_lr``."""
    decoder = {id(v) for k, v in named.items() if ".decoder." in f".{k}"}

    def factory(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        groups = [
            {"params": [p for p in params if id(p) not in decoder], "lr": lr},
            {"params": [p for p in params if id(p) in decoder], "lr": decoder_lr},
        ]
        return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, fused=FUSED_ADAM)

    return factory


def _post_backward_optimizer(
    dmp: DistributedModelParallel,
    embedding_optimizer: str,
    embedding_lr: float,
    lr: float,
    decoder_lr: float,
    table_lrs: dict[str, float],
) -> KeyedOptimizer:
    """Adam for the dense layers (an inherited decoder at ``decoder_lr``); replicated tables
    (DDP all-reduces their gradient, so they cannot step inside the backward) keep the
    tables' own optimizer and learning rate (``table_lrs`` by table module name)."""
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    tables = {k: v for k, v in params.items() if k.startswith(TABLES_PREFIX)}
    dense = {k: v for k, v in params.items() if k not in tables}
    adam = KeyedOptimizerWrapper(dense, _adam(dense, lr, decoder_lr))
    if not tables:
        return adam
    table_optimizer = FUSED_OPTIMIZERS[embedding_optimizer]

    def rate(key: str) -> float:
        return table_lrs.get(key[len(TABLES_PREFIX) :].split(".")[0], embedding_lr)

    def by_rate(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        names = {id(v): k for k, v in tables.items()}
        groups: dict[float, list[torch.Tensor]] = {}
        for p in params:
            groups.setdefault(rate(names[id(p)]), []).append(p)
        return table_optimizer(
            [{"params": group, "lr": r} for r, group in groups.items()], lr=embedding_lr
        )

    replicated = KeyedOptimizerWrapper(tables, by_rate)
    return CombinedOptimizer([("replicated", replicated), ("", adam)])


def inherited_table_lrs(cfg: RunConfig) -> dict[str, float]:
    """The item and category tables' own rate where fine-tuning inherits them
    (``--inherited-tables-lr``; 0 freezes them, GPSD's frozen sparse transfer)."""
    rate = cfg.train.inherited_tables_lr
    if cfg.stage != "finetune" or rate is None or cfg.transfer not in TRANSFER_PREFIXES:
        return {}
    # "embeddings.tables.item." -> "item": the table modules parameter sharing loads
    return {prefix[len(TABLES_PREFIX) :].rstrip("."): rate for prefix in SHARED_TABLE_PREFIXES}


def build_model(cfg: RunConfig, ctx: DistContext, batch_forward: bool = False) -> BuiltModel:
    """The stage's model with tables on ``meta``, fused optimizer registered, wrapped in DMP;
    ``batch_forward``: the fine-tuning model TorchRec's pipelines call with the batch."""
    seed_everything(cfg.train.seed)
    model = build_stage_model(cfg, torch.device("meta"), batch_forward=batch_forward)
    embeddings = model.embeddings
    opt_name = cfg.train.resolved_embedding_optimizer(ctx.device)
    emb_lr = cfg.train.resolved_embedding_lr(ctx.device)
    table_lrs = inherited_table_lrs(cfg)
    apply_fused_optimizer(embeddings.tables, opt_name, emb_lr, table_lrs)
    defaults = default_sharding(embeddings.tables, ctx.world_size, cfg.train.replicate_max_mb)
    sharding = {**defaults, **cfg.train.sharding}
    dmp = shard_model(model, ctx, cfg.train.batch_size, sharding)
    decoder_lr = cfg.train.lr if cfg.train.decoder_lr is None else cfg.train.decoder_lr
    dense_optimizer = _post_backward_optimizer(
        dmp, opt_name, emb_lr, cfg.train.lr, decoder_lr, table_lrs
    )
    combined = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense_optimizer)])
    return BuiltModel(dmp, dense_optimizer, combined, opt_name, emb_lr)
