"""How the history lookup is laid out: forward+backward time of SharedEmbeddings' layouts on a
row-wise sharded table at 1 and 2 ranks, the choice behind ``ModelConfig.lookup`` and
``dedup`` (de-duplication is measured at one rank too, where the default skips it). The
100-row category table is placed as the default plan places it (replicated where it can be).

Baseline in the same run: ``lookup="sequence"`` without de-duplication, i.e. TorchRec's
``EmbeddingCollection`` as the textbook layout uses it.

    python -m benchmarks.lookup_layouts [--rows 1000000] [--ids 51200] [--dim 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import write_results
from genctr_rec.distributed import free_port, join_local_group

LAYOUTS = [("sequence", False), ("sequence", True), ("pooled", False), ("pooled", True)]


def _ids(kind: str, n: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randint(0, rows, (n,), generator=g)
    # popularity-skewed: Zipf-like ranks
    u = torch.rand(n, generator=g)
    return ((rows**u - 1).long()).clamp(max=rows - 1)


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    join_local_group(rank, world, port)
    from genctr_rec.distributed import init_distributed
    from genctr_rec.embeddings import ITEM_TABLE, SharedEmbeddings
    from genctr_rec.training.sharding import apply_fused_optimizer, default_sharding, shard_model

    ctx = init_distributed()
    results = []
    for lookup, dedup in LAYOUTS:
        for kind in ("uniform", "skewed"):
            emb = SharedEmbeddings(args.rows, 100, args.dim, lookup, dedup, torch.device("meta"))
            apply_fused_optimizer(emb.tables, "rowwise_adagrad", 0.01)
            plan = {**default_sharding(emb.tables, world, 1.0), "item": "row_wise"}
            dmp = shard_model(emb, ctx, 1024, plan)
            if dedup:  # measured even where the default skips it (one rank)
                emb.set_routed([ITEM_TABLE])
            cats = torch.randint(0, 100, (1024,))
            times = []
            for step in range(args.steps + 2):
                ids = _ids(kind, args.ids, args.rows, seed=step * 10 + rank)
                start = time.perf_counter()
                items, c = dmp(ids, cats)
                (items.sum() + c.sum()).backward()
                times.append(time.perf_counter() - start)
            results.append(
                {
                    "world": world,
                    "lookup": lookup,
                    "dedup": dedup,
                    "ids": kind,
                    "step_ms": 1000 * float(np.median(times[2:])),
                }
            )
    if rank == 0:
        Path(out, f"{world}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ids", type=int, default=51_200, help="ids per rank per step")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            mp.start_processes(
                _worker, args=(world, free_port(), args, tmp), nprocs=world, start_method="spawn"
            )
            results += json.loads(Path(tmp, f"{world}.json").read_text())
    base = {
        (r["world"], r["ids"]): r["step_ms"]
        for r in results
        if r["lookup"] == "sequence" and not r["dedup"]
    }
    lines = [
        "| ranks | layout | de-duplicated | ids | fwd+bwd ms / step | "
        "speed-up over EmbeddingCollection |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        name = (
            "EmbeddingBagCollection, bags of one"
            if r["lookup"] == "pooled"
            else "EmbeddingCollection (sequence)"
        )
        lines.append(
            f"| {r['world']} | {name} | {'yes' if r['dedup'] else 'no'} | {r['ids']} | "
            f"{r['step_ms']:.1f} | {base[r['world'], r['ids']] / r['step_ms']:.1f}x |"
        )
    table = (
        f"1 and 2 ranks (gloo, one thread each), row-wise sharded {args.rows:,} x {args.dim} "
        f"item table, {args.ids:,} ids per rank per step, fused row-wise Adagrad, median of "
        f"{args.steps} steps.\n\n" + "\n".join(lines)
    )
    print(write_results("lookup_layouts", {"results": results, "args": vars(args)}, table))


if __name__ == "__main__":
    main()
