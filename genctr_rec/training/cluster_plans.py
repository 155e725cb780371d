"""TorchRec's sharding plan for a GPU cluster nobody here can run, computed on a CPU.

The planner needs only the tables' shapes (the model is built on ``meta``), the optimizer
(its state multiplies each table's memory: fused Adam keeps two moments) and a topology: GPUs
per node, nodes, HBM, and the bandwidths its cost model uses. :func:`plan_for_cluster` returns
the layout the planner chose for GenCTR's fine-tuning model (the shared item and category
tables and the user table) with the planner's own per-GPU memory and step-time estimates:
estimates, not measurements, and the first thing to check on a real cluster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    TopologyFactory,
    TrainerConfig,
)

from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
from genctr_rec.data.features import FeatureSchema
from genctr_rec.factory import build_stage_model
from genctr_rec.training.sharding import apply_fused_optimizer, sharders

GB = 1e9
# bytes per millisecond, the unit of TorchRec's cost model
PER_MS = 1e-3


@dataclass(frozen=True)
class GPUNode:
    """One node of a current data-centre GPU (defaults: 8 x 80 GB HBM3 at 3.35 TB/s, NVLink
    at 450 GB/s a direction, one 400 Gb/s NIC per GPU: H100 SXM class)."""

    gpus: int = 8
    hbm_gb: float = 80.0
    hbm_tb_s: float = 3.35
    nvlink_gb_s: float = 450.0
    network_gb_s: float = 50.0
    ddr_gb: float = 2000.0


@dataclass
class ClusterPlan:
    """What the planner chose, per table, and its per-GPU estimates."""

    items: int
    users: int
    nodes: int
    gpus: int
    tables: dict[str, dict[str, Any]]
    hbm_gb_per_gpu_max: float
    hbm_gb_per_gpu_min: float
    hbm_cap_gb: float
    est_step_ms: float
    forced: dict[str, str] = field(default_factory=dict)

    def fits(self) -> bool:
        return self.hbm_gb_per_gpu_max <= self.hbm_cap_gb

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits()}


def genctr_config(items: int, users: int, categories: int = 10_000, dim: int = 16) -> RunConfig:
    """GenCTR fine-tuning (DNN, PS + MI) over ``items`` items and ``users`` users (the user
    table of the real-data work), no other side features."""
    cfg = RunConfig(
        "finetune",
        "/nonexistent",
        ModelConfig(dim=dim),
        TrainConfig(),
        backbone="dnn",
        transfer="ps_mi",
        num_items=items,
        num_categories=categories,
        max_history=50,
    )
    cfg.features = FeatureSchema(num_users=users).to_json()
    return cfg


def plan_for_cluster(
    cfg: RunConfig,
    nodes: int,
    node: GPUNode | None = None,
    batch_size: int = 1024,
    optimizer: str = "adam",
    forced: dict[str, str] | None = None,
) -> ClusterPlan:
    """TorchRec's plan of ``cfg``'s model on ``nodes`` x ``node.gpus`` GPUs, with the fused
    ``optimizer`` the CUDA path uses. ``forced`` fixes sharding types per table (a baseline);
    the planner raises when nothing fits."""
    node = node or GPUNode()
    model = build_stage_model(cfg, torch.device("meta"))
    apply_fused_optimizer(model.embeddings.tables, optimizer, 1e-3)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=nodes * node.gpus, local_world_size=node.gpus),
        hardware_config=HardwareConfig(
            hbm_cap_bytes=int(node.hbm_gb * GB),
            ddr_cap_bytes=int(node.ddr_gb * GB),
            hbm_mem_bw=node.hbm_tb_s * 1000 * GB * PER_MS,
            intra_host_bw=node.nvlink_gb_s * GB * PER_MS,
            inter_host_bw=node.network_gb_s * GB * PER_MS,
        ),
        kernel_config=KernelConfig(compute_device="cuda"),
    )
    constraints = {t: ParameterConstraints(sharding_types=[s]) for t, s in (forced or {}).items()}
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, debug=False
    )
    planner.plan(model, sharders())
    hbm = [0.0] * topology.world_size
    perf = [0.0] * topology.world_size
    tables: dict[str, dict[str, Any]] = {}
    for option in planner._best_plan or []:
        rows, dim = option.tensor.shape
        tables[option.name] = {
            "rows": int(rows),
            "dim": int(dim),
            "sharding": option.sharding_type,
            "kernel": option.compute_kernel,
            "gpus": sorted({s.rank for s in option.shards if s.rank is not None}),
        }
        for shard in option.shards:
            hbm[shard.rank] += shard.storage.hbm / GB
            perf[shard.rank] += shard.perf.total
    return ClusterPlan(
        items=cfg.num_items,
        users=FeatureSchema.from_json(cfg.features).num_users if cfg.features else 0,
        nodes=nodes,
        gpus=topology.world_size,
        tables=tables,
        hbm_gb_per_gpu_max=round(max(hbm), 3),
        hbm_gb_per_gpu_min=round(min(hbm), 3),
        hbm_cap_gb=node.hbm_gb,
        est_step_ms=round(max(perf), 4),
        forced=dict(forced or {}),
    )
