"""Scale on one machine: memory per rank of the item table at world size 2, row-wise sharded
against data-parallel (replicated), for growing catalogues at width 16.

    python -m benchmarks.table_scale [--items 1000000 10000000 50000000]

Each configuration runs in fresh processes: DMP materialises the table, then three
forward+backward steps of 51,200 lookups per rank with the fused row-wise Adagrad. Peak RSS per
rank is read from the OS, next to the rows of the table each rank holds. Baseline in the
same run: data-parallel replication, what plain DDP over an ``nn.Embedding`` would hold.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import peak_rss_bytes, reset_peak_rss, write_results
from genctr_rec.distributed import free_port, join_local_group


def _worker(rank: int, port: int, items: int, sharding: str, out: str) -> None:
    torch.set_num_threads(1)
    reset_peak_rss()
    join_local_group(rank, 2, port)
    from genctr_rec.distributed import init_distributed
    from genctr_rec.embeddings import SharedEmbeddings
    from genctr_rec.training.sharding import (
        apply_fused_optimizer,
        plan_sharding,
        shard_model,
        table_specs,
    )

    ctx = init_distributed()
    result: dict = {"items": items, "sharding": sharding, "rank": rank}
    try:
        emb = SharedEmbeddings(items, 100, 16, "pooled", True, torch.device("meta"))
        apply_fused_optimizer(emb.tables, "rowwise_adagrad", 0.01)
        overrides = {"item": sharding, "category": "data_parallel"}
        plan = plan_sharding(emb, ctx, 1024, overrides)
        start = time.perf_counter()
        dmp = shard_model(emb, ctx, 1024, overrides)
        result["materialise_s"] = time.perf_counter() - start
        step_times = []
        for step in range(3):
            ids = torch.randint(0, items, (51_200,), generator=torch.Generator().manual_seed(step))
            t = time.perf_counter()
            rows, cats = dmp(ids, torch.randint(0, 100, (1024,)))
            (rows.sum() + cats.sum()).backward()
            step_times.append(time.perf_counter() - t)
        result["step_s"] = sorted(step_times)[1]
        shard = table_specs(plan)["item"]
        result["shard_rows_on_rank"] = (
            sum(s.shard_sizes[0] for s in shard.sharding_spec.shards if s.placement.rank() == rank)
            if shard.sharding_spec is not None
            else items
        )
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failing combination is a result, not a crash
        result.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    result["peak_rss_gb"] = peak_rss_bytes() / 2**30
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    args = parser.parse_args()
    results = []
    for items in args.items:
        for sharding in ("row_wise", "data_parallel"):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    mp.start_processes(
                        _worker,
                        args=(free_port(), items, sharding, tmp),
                        nprocs=2,
                        start_method="spawn",
                    )
                except Exception as exc:  # noqa: BLE001 - e.g. killed for memory
                    results.append(
                        {
                            "items": items,
                            "sharding": sharding,
                            "status": "failed",
                            "reason": f"{type(exc).__name__}: {str(exc)[:200]}",
                        }
                    )
                    continue
                ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(2)]
            row = {k: ranks[0][k] for k in ("items", "sharding", "status")}
            row["peak_rss_gb_per_rank"] = [round(r["peak_rss_gb"], 2) for r in ranks]
            row["rows_per_rank"] = [r.get("shard_rows_on_rank") for r in ranks]
            for key in ("materialise_s", "step_s", "reason"):
                if key in ranks[0]:
                    row[key] = ranks[0][key]
            results.append(row)
            print(json.dumps(row), flush=True)
    table_bytes = {n: n * 16 * 4 / 1024**3 for n in args.items}
    lines = [
        "| items | layout | table GB (fp32) | item rows held per rank | peak RSS per rank, GB "
        "| fwd+bwd s / step | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rss = ", ".join(f"{v:.2f}" for v in r.get("peak_rss_gb_per_rank", []))
        step = f"{r['step_s']:.2f}" if "step_s" in r else "-"
        status = r["status"] if r["status"] == "ok" else f"failed: {r.get('reason', '')[:80]}"
        held = ", ".join(f"{v:,}" for v in r.get("rows_per_rank", []) if v is not None)
        lines.append(
            f"| {r['items']:,} | {r['sharding']} | {table_bytes[r['items']]:.2f} | {held} | "
            f"{rss} | {step} | {status} |"
        )
    table = (
        "World size 2 (gloo, one thread per rank), item table at width 16 with the fused "
        "row-wise Adagrad, 51,200 lookups per rank per step; peak RSS includes the Python "
        "process with torch and torchrec loaded (~0.4 GB).\n\n" + "\n".join(lines)
    )
    print(write_results("table_scale", {"results": results, "args": vars(args)}, table))


if __name__ == "__main__":
    main()
