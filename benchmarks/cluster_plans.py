"""The multi-GPU path on paper: TorchRec's planner, given CUDA topologies (8 GPUs a node, 1-4
nodes, H100-class HBM and bandwidths), plans GenCTR's tables (1M, 100M, 1B items, with a user
table) with the fused Adam of the CUDA path; computed on a CPU, no GPU involved.

Per scale and cluster: the layout chosen per table, the planner's per-GPU HBM for the tables
and their optimizer state, and its estimated step time of the sharded lookups. These are the
planner's estimates, not measurements. Baseline in the same run: every table replicated
(``data_parallel``, what DDP over ``nn.Embedding`` would hold), which the planner refuses once
it no longer fits a GPU.

    python -m benchmarks.cluster_plans
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import write_results
from genctr_rec.training.cluster_plans import GPUNode, genctr_config, plan_for_cluster

SCALES = ((1_000_000, 1_000_000), (100_000_000, 10_000_000), (1_000_000_000, 100_000_000))
NODES = (1, 2, 4)
TABLES = ("item", "category", "user_id")


def _replicated(items: int, users: int, nodes: int) -> dict[str, Any]:
    try:
        plan = plan_for_cluster(
            genctr_config(items, users), nodes, forced={t: "data_parallel" for t in TABLES}
        )
        return {"fits": plan.fits(), "hbm_gb_per_gpu_max": plan.hbm_gb_per_gpu_max}
    except Exception as exc:  # the planner's "no plan fits" (PlannerError)
        return {"fits": False, "error": str(exc).splitlines()[0][:160]}


def markdown(rows: list[dict[str, Any]]) -> str:
    node = GPUNode()
    lines = [
        f"Planner estimates, not measurements: {node.gpus} GPUs a node, {node.hbm_gb:g} GB HBM "
        f"at {node.hbm_tb_s:g} TB/s, NVLink {node.nvlink_gb_s:g} GB/s, network "
        f"{node.network_gb_s:g} GB/s a GPU; GenCTR fine-tuning (DNN, PS + MI, dim 16), fused "
        "Adam, batch 1024 a GPU. HBM: the tables and their optimizer state on the fullest GPU "
        "(dense layers and activations not included).",
        "",
        "| items | users | nodes x GPUs | item table | user table | category table "
        "| HBM / GPU (max) | est. lookup step | replicated baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["plan"]["tables"]
        cell = {name: f"{t[name]['sharding']} on {len(t[name]['gpus'])}" for name in TABLES}
        base = r["replicated"]
        baseline = (
            f"{base['hbm_gb_per_gpu_max']:.1f} GB / GPU"
            if base.get("fits")
            else "does not fit one GPU"
        )
        lines.append(
            f"| {r['items']:,} | {r['users']:,} | {r['nodes']} x 8 | {cell['item']} | "
            f"{cell['user_id']} | {cell['category']} | {r['plan']['hbm_gb_per_gpu_max']:.2f} GB "
            f"| {r['plan']['est_step_ms']:.3f} ms | {baseline} |"
        )
    return "\n".join(lines)


def main() -> None:
    rows = []
    for items, users in SCALES:
        for nodes in NODES:
            plan = plan_for_cluster(genctr_config(items, users), nodes)
            rows.append(
                {
                    "items": items,
                    "users": users,
                    "nodes": nodes,
                    "plan": plan.to_json(),
                    "replicated": _replicated(items, users, nodes),
                }
            )
            print(items, nodes, {k: v["sharding"] for k, v in plan.tables.items()}, flush=True)
    print(
        write_results("cluster_plans", {"node": GPUNode().__dict__, "rows": rows}, markdown(rows))
    )


if __name__ == "__main__":
    main()
