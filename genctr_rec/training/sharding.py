"""Sharding the shared tables with TorchRec's planner and wrapping the model in DMP.

TorchRec's ``EmbeddingBagCollectionSharder`` offers row-wise and table-row-wise sharding only
for CUDA; on CPU they run fine over gloo (tested here), so :class:`BagSharder` allows them
there too. The plan is computed on every rank from the same inputs (deterministic), instead of
``collective_plan``, which raises on rank 0 only and leaves the other ranks waiting.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torchrec.optim as trec_optim
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ParameterSharding, ShardingPlan, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from genctr_rec.config import ConfigError
from genctr_rec.data.features import USER_ID
from genctr_rec.distributed import DistContext
from genctr_rec.embeddings import SharedEmbeddings

logger = logging.getLogger(__name__)

SHARDING_TYPES = {t.value for t in ShardingType}
FUSED_OPTIMIZERS: dict[str, Any] = {
    "adam": torch.optim.Adam,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


class BagSharder(EmbeddingBagCollectionSharder):
    """The EmbeddingBagCollection sharder with row-wise layouts enabled on CPU as well."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        extra = [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types + [t for t in extra if t not in types]


def sharders() -> list:
    return [BagSharder(), EmbeddingCollectionSharder()]


def default_sharding(
    tables: nn.ModuleDict, world_size: int, replicate_max_mb: float
) -> dict[str, str]:
    """Sharding types we fix before the planner chooses the rest (``TrainConfig.sharding``
    overrides them), for ``SharedEmbeddings.tables`` (one TorchRec module per table).

    - One rank: every table ``table_wise``. There is nothing to split, and row-wise would still
      bucket every id by row range each step.
    - More ranks: pooled tables of at most ``replicate_max_mb`` are replicated
      (``data_parallel``). A replicated table costs one all-reduce of its gradient per step and
      no id routing; a sharded one sends every id and looked-up row through the all-to-all.
      Below about a megabyte the all-reduce is the cheaper (``benchmarks/training_throughput``).
      Sequence tables cannot be replicated on CPU (the sharding benchmark records fbgemm's
      error), so they are left to the planner.
    - More ranks, a larger user table: ``row_wise``. In production it is the largest table and
      grows with the user base; row-wise spreads it (and its lookups) evenly over every rank,
      where the planner, left alone, may put it whole on one. Other large tables stay the
      planner's choice.
    """
    chosen = {}
    for module in tables.values():
        pooled = isinstance(module, EmbeddingBagCollection)
        configs = module.embedding_bag_configs() if pooled else module.embedding_configs()
        for config in configs:
            size_mb = config.num_embeddings * config.embedding_dim * 4 / 2**20
            if world_size == 1:
                chosen[config.name] = ShardingType.TABLE_WISE.value
            elif pooled and size_mb <= replicate_max_mb:
                chosen[config.name] = ShardingType.DATA_PARALLEL.value
            elif config.name == USER_ID:
                chosen[config.name] = ShardingType.ROW_WISE.value
    return chosen


def apply_fused_optimizer(
    tables: nn.Module, name: str, lr: float, table_lrs: dict[str, float] | None = None
) -> None:
    """Register the tables' optimizer so DMP fuses it into the embedding backward;
    ``table_lrs`` gives some tables (children of ``tables``) their own rate (TorchRec puts
    tables of different optimizer settings in different fused groups)."""
    if name not in FUSED_OPTIMIZERS:
        raise ConfigError(f"embedding optimizer must be one of {sorted(FUSED_OPTIMIZERS)}")
    table_lrs = table_lrs or {}
    for child, module in tables.named_children():
        rate = table_lrs.get(child, lr)
        apply_optimizer_in_backward(FUSED_OPTIMIZERS[name], module.parameters(), {"lr": rate})


def check_overrides(overrides: dict[str, str]) -> None:
    """``--sharding`` types must be TorchRec's (checked before a run directory is touched)."""
    for table, sharding in overrides.items():
        if sharding not in SHARDING_TYPES:
            raise ConfigError(
                f"table {table}: unknown sharding type {sharding!r}; "
                f"choose from {sorted(SHARDING_TYPES)}"
            )


def make_planner(
    ctx: DistContext, batch_size: int, overrides: dict[str, str]
) -> EmbeddingShardingPlanner:
    """TorchRec's planner for this job's topology, per-table sharding types forced by
    ``overrides`` (its ``plan(model, sharders())`` keeps the chosen options and their
    storage / perf estimates, which the sharding benchmark reports)."""
    check_overrides(overrides)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=ctx.world_size, local_world_size=ctx.local_world_size
        ),
        kernel_config=KernelConfig(compute_device=ctx.device.type),
    )
    constraints = {t: ParameterConstraints(sharding_types=[s]) for t, s in overrides.items()}
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, debug=False
    )


def plan_sharding(
    model: nn.Module, ctx: DistContext, batch_size: int, overrides: dict[str, str]
) -> ShardingPlan:
    """TorchRec's plan for ``model``, with per-table sharding types forced by ``overrides``."""
    return make_planner(ctx, batch_size, overrides).plan(model, sharders())


class DataParallelWhenDistributed(DefaultDataParallelWrapper):
    """TorchRec's DDP wrapping of the dense part, skipped in a one-process job.

    Why: with one rank there is nothing to all-reduce, yet DDP still copies every gradient
    into its buckets, runs an all-reduce over a one-rank group and hooks every parameter
    (its cost: ``benchmarks/results/finetune_speed.md``).
    ``dmp.module`` and the state-dict keys are the same either way (TorchRec unwraps both).
    """

    def wrap(self, dmp: DistributedModelParallel, env: Any, device: torch.device) -> None:
        if env.world_size > 1:
            super().wrap(dmp, env, device)


def shard_model(
    model: nn.Module, ctx: DistContext, batch_size: int, overrides: dict[str, str]
) -> DistributedModelParallel:
    """Plan and wrap: embedding tables sharded, the dense part data-parallel."""
    plan = plan_sharding(model, ctx, batch_size, overrides)
    dmp = DistributedModelParallel(
        model,
        device=ctx.device,
        plan=plan,
        sharders=sharders(),
        data_parallel_wrapper=DataParallelWhenDistributed(),
    )
    tell_routed(model, dmp, ctx.world_size)
    if ctx.is_main:
        for module_path, module_plan in plan.plan.items():
            for table, spec in module_plan.items():
                logger.info(
                    "table %s.%s: %s on ranks %s",
                    module_path,
                    table,
                    spec.sharding_type,
                    spec.ranks,
                )
    return dmp


def tell_routed(model: nn.Module, dmp: DistributedModelParallel, world_size: int) -> None:
    """Let every ``SharedEmbeddings`` in ``model`` know which tables' lookups cross ranks
    (with more than one rank, every sharding type but ``data_parallel``)."""
    routed = [
        table
        for table, kind in sharding_summary(dmp).items()
        if world_size > 1 and kind != ShardingType.DATA_PARALLEL.value
    ]
    for module in model.modules():
        if isinstance(module, SharedEmbeddings):
            module.set_routed(routed)


def table_specs(plan: ShardingPlan) -> dict[str, ParameterSharding]:
    """Table name -> its sharding in ``plan``, whichever module holds the table."""
    return {
        table: spec for module_plan in plan.plan.values() for table, spec in module_plan.items()
    }


def sharding_summary(dmp: DistributedModelParallel) -> dict[str, str]:
    """Table name -> sharding type actually used."""
    return {table: spec.sharding_type for table, spec in table_specs(dmp.plan).items()}
