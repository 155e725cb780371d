"""How the history lookup is laid out: forward+backward time of SharedEmbeddings' layouts on a
2-rank row-wise sharded table, the choice behind ``ModelConfig.lookup`` and ``dedup``.

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
from genctr_rec.training.distributed import free_port, join_local_group

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
    from genctr_rec.embeddings import SharedEmbeddings
    from genctr_rec.training.distributed import init_distributed
    from genctr_rec.training.sharding import apply_fused_optimizer, shard_model

    ctx = init_distributed()
    results = []
    for lookup, dedup in LAYOUTS:
        for kind in ("uniform", "skewed"):
            emb = SharedEmbeddings(args.rows, 100, args.dim, lookup, dedup, torch.device("meta"))
            apply_fused_optimizer(emb.tables, "rowwise_adagrad", 0.01)
            dmp = shard_model(emb, ctx, 1024, {"item": "row_wise", "category": "row_wise"})
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
                    "lookup": lookup,
                    "dedup": dedup,
                    "ids": kind,
                    "step_ms": 1000 * float(np.median(times[2:])),
                }
            )
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ids", type=int, default=51_200, help="ids per rank per step")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r.json")
        mp.start_processes(
            _worker, args=(2, free_port(), args, out), nprocs=2, start_method="spawn"
        )
        results = json.loads(Path(out).read_text())
    base = {r["ids"]: r["step_ms"] for r in results if r["lookup"] == "sequence" and not r["dedup"]}
    lines = [
        "| layout | de-duplicated | ids | fwd+bwd ms / step | speed-up over EmbeddingCollection |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        name = (
            "EmbeddingBagCollection, bags of one"
            if r["lookup"] == "pooled"
            else "EmbeddingCollection (sequence)"
        )
        lines.append(
            f"| {name} | {'yes' if r['dedup'] else 'no'} | {r['ids']} | "
            f"{r['step_ms']:.1f} | {base[r['ids']] / r['step_ms']:.1f}x |"
        )
    table = (
        f"2 ranks (gloo, one thread each), row-wise sharded {args.rows:,} x {args.dim} item "
        f"table, {args.ids:,} ids per rank per step, fused row-wise Adagrad, median of "
        f"{args.steps} steps.\n\n" + "\n".join(lines)
    )
    print(write_results("lookup_layouts", {"results": results, "args": vars(args)}, table))


if __name__ == "__main__":
    main()
