"""Embedding sharding matrix: every TorchRec sharding type x sequence / pooled tables x world
size 1, 2, 4 x item tables of 100k, 1M and 10M rows at width 16 and 64, with history-like
jagged lookups; against plain PyTorch tables and the machine's random-row-gather ceiling.

    python -m benchmarks.sharding_matrix [--worlds 1 2 4] [--rows 100000 1000000 10000000]

Per configuration and rank: forward+backward lookups/s (fused row-wise Adagrad update
included), the same as GB/s of rows and as a fraction of the gather ceiling, bytes each rank
sends through TorchRec's collectives per step (its own share excluded), peak RSS, and the
planner's own storage and time estimates for the rank next to the measured ones. A
combination that fails (e.g. data-parallel sequence tables in fbgemm's CPU kernel) is kept
with its error.

Modules: ``sequence`` is TorchRec's ``EmbeddingCollection`` (``SharedEmbeddings(lookup=
"sequence", dedup=False)``); ``pooled`` is our history-feature path, an
``EmbeddingBagCollection`` per table with every id a bag of one (``SharedEmbeddings``
defaults: ids de-duplicated only where they cross ranks). Every rank looks up 51,200 uniform
random item ids per step (1,024 impressions x history 50) plus 1,024 category ids; the item
table is sharded as the row says, the 1,000-row category table as the default plan has it
(table-wise on one rank, replicated on more where it can be). World size 4 oversubscribes 2
cores: read it for traffic and memory.

Baselines, one process, one thread: ``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag``
(bags of one) with ``SparseAdam``; ``index_select`` + ``index_add_`` (a forward and an SGD
update in PyTorch's own ops); fbgemm's table-batched kernel called directly (pooled bags of one
and sequence mode, fused row-wise Adagrad: what TorchRec runs underneath, without TorchRec),
and its pooled forward alone; ceiling: ``index_select`` of the same number of random rows of a
table of the same size (a forward alone, nothing written back).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as std_mp
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)

from benchmarks.common import peak_rss_bytes, reset_peak_rss, write_results
from genctr_rec.distributed import free_port, join_local_group

SHARDINGS = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]
MODULES = {"sequence": ("sequence", False), "pooled": ("pooled", True)}
IDS, CATEGORY_IDS, CATEGORIES = 51_200, 1024, 1000
SPAWN_TIMEOUT_S = 1800
TBE_MODES = (("fbgemm_pooled", PoolingMode.SUM), ("fbgemm_sequence", PoolingMode.NONE))


class _Traffic:
    """Counts the bytes this rank sends to other ranks through torch.distributed's
    collectives (TorchRec calls them as ``dist.<name>``, so wrapping the module attributes
    sees every call); the own share of each exchange is not traffic."""

    def __init__(self) -> None:
        self.bytes = 0
        rank, world = dist.get_rank(), dist.get_world_size()

        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        def a2a(original):
            def wrapped(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
                row = nbytes(input) // max(1, input.shape[0]) if input.dim() else 0
                own = input_split_sizes[rank] * row if input_split_sizes else nbytes(input) // world
                self.bytes += nbytes(input) - own
                return original(output, input, output_split_sizes, input_split_sizes, *a, **k)

            return wrapped

        def scaled(original, share):
            def wrapped(*args, **kwargs):
                tensors = [x for x in args[:2] if isinstance(x, torch.Tensor)]
                lists = [x for x in args[:2] if isinstance(x, list)]
                size = nbytes(tensors[-1]) if tensors else sum(nbytes(t) for t in lists[-1])
                self.bytes += int(size * share)
                return original(*args, **kwargs)

            return wrapped

        self.originals = {
            name: getattr(dist, name)
            for name in (
                "all_to_all_single",
                "reduce_scatter_tensor",
                "reduce_scatter",
                "all_gather_into_tensor",
                "all_gather",
                "all_reduce",
            )
        }
        dist.all_to_all_single = a2a(self.originals["all_to_all_single"])
        for name in ("reduce_scatter_tensor", "reduce_scatter"):  # input: all ranks' parts
            setattr(dist, name, scaled(self.originals[name], (world - 1) / world))
        for name in ("all_gather_into_tensor", "all_gather"):  # input: this rank's part
            setattr(dist, name, scaled(self.originals[name], world - 1))
        dist.all_reduce = scaled(self.originals["all_reduce"], 2 * (world - 1) / world)  # ring


def _rank_estimates(planner, rank: int) -> dict:
    """The planner's storage (bytes) and time (ms per step) estimates for this rank."""
    storage, perf = 0, 0.0
    for option in getattr(planner, "_best_plan", None) or []:
        for shard in option.shards:
            if shard.rank == rank:
                storage += shard.storage.ddr + shard.storage.hbm if shard.storage else 0
                perf += shard.perf.total if shard.perf else 0.0
    return {"planner_storage_bytes": storage, "planner_step_ms": perf}


def _one(ctx, module: str, sharding: str, rows: int, dim: int, steps: int, budget: int) -> dict:
    from torchrec.distributed import DistributedModelParallel

    from genctr_rec.embeddings import SharedEmbeddings
    from genctr_rec.training.sharding import (
        apply_fused_optimizer,
        default_sharding,
        make_planner,
        sharders,
        table_specs,
        tell_routed,
    )

    lookup, dedup = MODULES[module]
    rank = ctx.rank
    reset_peak_rss()
    emb = SharedEmbeddings(rows, CATEGORIES, dim, lookup, dedup, torch.device("meta"))
    apply_fused_optimizer(emb.tables, "rowwise_adagrad", 0.01)
    # the category table as the default plan has it; the item table as this row says
    overrides = {**default_sharding(emb.tables, ctx.world_size, 1.0), "item": sharding}
    planner = make_planner(ctx, IDS, overrides)
    plan = planner.plan(emb, sharders())
    out = _rank_estimates(planner, rank)
    spec = table_specs(plan)["item"]
    out["item_shards"] = len(spec.sharding_spec.shards) if spec.sharding_spec else 1
    # every rank decides alike (same plan), so a skip never strands a collective
    needed = sum(
        shard.storage.ddr + shard.storage.hbm
        for option in planner._best_plan
        for shard in option.shards
        if shard.storage
    )
    if needed > budget:
        out["status"] = (
            f"not run: the plan needs {needed / 2**30:.1f} GiB over all ranks, more than "
            f"this machine's {budget / 2**30:.1f} GiB budget"
        )
        return out
    dmp = DistributedModelParallel(emb, device=ctx.device, plan=plan, sharders=sharders())
    tell_routed(emb, dmp, ctx.world_size)
    traffic = _Traffic()
    try:
        times = []
        for step in range(steps + 2):
            g = torch.Generator().manual_seed(1000 * step + rank)
            ids = torch.randint(0, rows, (IDS,), generator=g)
            cats = torch.randint(0, CATEGORIES, (CATEGORY_IDS,), generator=g)
            if step == 2:
                traffic.bytes = 0
            start = time.perf_counter()
            items, c = dmp(ids, cats)
            (items.sum() + c.sum()).backward()
            times.append(time.perf_counter() - start)
        step_s = float(np.median(times[2:]))
        out.update(
            status="ok",
            step_ms=step_s * 1e3,
            lookups_per_s=IDS / step_s,
            gb_per_s=IDS * dim * 4 / step_s / 1e9,
            sent_bytes_per_step=traffic.bytes / steps,
        )
    finally:
        for name, fn in traffic.originals.items():
            setattr(dist, name, fn)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _worker(rank: int, world: int, port: int, module: str, sharding: str, args, out: str):
    torch.set_num_threads(1)
    join_local_group(rank, world, port)
    from genctr_rec.distributed import init_distributed

    ctx = init_distributed()
    budget = int(psutil.virtual_memory().available * 0.7)
    results = []
    for rows in sorted(args.rows):
        for dim in sorted(args.dims):
            base = {"world": world, "module": module, "sharding": sharding, "rows": rows}
            base.update(dim=dim, rank=rank)
            steps = args.steps if rows * dim < 100_000_000 else max(2, args.steps // 2)
            try:
                results.append({**base, **_one(ctx, module, sharding, rows, dim, steps, budget)})
            except Exception as exc:  # recorded, not dropped
                message = " ".join(str(exc).split())[:300]
                results.append({**base, "status": f"failed: {type(exc).__name__}: {message}"})
            Path(out, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def matrix(args) -> list[dict]:
    rows = []
    for world in args.worlds:
        for module in args.modules:
            for sharding in args.shardings:
                with tempfile.TemporaryDirectory() as tmp:
                    ctx = mp.start_processes(
                        _worker,
                        args=(world, free_port(), module, sharding, args, tmp),
                        nprocs=world,
                        join=False,
                        start_method="spawn",
                    )
                    deadline = time.time() + SPAWN_TIMEOUT_S
                    reason = "the processes ended without a result"
                    try:
                        while not ctx.join(timeout=5):
                            if time.time() > deadline:
                                raise TimeoutError(f"no result in {SPAWN_TIMEOUT_S} s")
                    except Exception as exc:
                        for p in ctx.processes:
                            p.kill()
                        print(f"world {world} {module} {sharding}: {exc}", flush=True)
                        reason = " ".join(str(exc).split())[:200]
                        if "SIGKILL" in reason:
                            reason += " (killed by the OS: out of memory)"
                    per_rank = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("*.json"))]
                rows.extend(_merge(per_rank, world, module, sharding, args, reason))
                for r in rows[-len(args.rows) * len(args.dims) :]:
                    keys = ("world", "module", "sharding", "rows", "dim", "status", "lookups_per_s")
                    print({k: r.get(k) for k in keys}, flush=True)
    return rows


def _merge(
    per_rank: list[list[dict]], world: int, module: str, sharding: str, args, reason: str
) -> list:
    """One row per configuration: the slowest rank's speed, the largest rank's memory."""
    merged = []
    for rows in sorted(args.rows):
        for dim in sorted(args.dims):
            found = [r for ranks in per_rank for r in ranks if (r["rows"], r["dim"]) == (rows, dim)]
            row = {"world": world, "module": module, "sharding": sharding, "rows": rows, "dim": dim}
            if not found:
                row["status"] = f"failed: {reason}"
            elif any(r["status"] != "ok" for r in found):
                row["status"] = next(r["status"] for r in found if r["status"] != "ok")
                row.update({k: found[0].get(k) for k in ("item_shards", "planner_storage_bytes")})
            else:
                slowest = max(found, key=lambda r: r["step_ms"])
                row.update(
                    status="ok",
                    item_shards=found[0]["item_shards"],
                    step_ms=slowest["step_ms"],
                    lookups_per_s=slowest["lookups_per_s"],
                    gb_per_s=slowest["gb_per_s"],
                    sent_bytes_per_step=max(r["sent_bytes_per_step"] for r in found),
                    peak_rss_bytes=max(r["peak_rss_bytes"] for r in found),
                    planner_storage_bytes=max(r["planner_storage_bytes"] for r in found),
                    planner_step_ms=max(r["planner_step_ms"] for r in found),
                )
            merged.append(row)
    return merged


def _median_rate(fn, steps: int = 7) -> float:
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return IDS / float(np.median(times[2:]))


def baselines(args) -> list[dict]:
    """Plain PyTorch tables with a sparse optimizer, and the random-row-gather ceiling."""
    torch.set_num_threads(1)
    out = []
    for rows in sorted(args.rows):
        for dim in sorted(args.dims):
            g = torch.Generator().manual_seed(0)
            table = torch.randn(rows, dim)
            ids = torch.randint(0, rows, (IDS,), generator=g)
            gather = _median_rate(
                lambda table=table, ids=ids: torch.index_select(table, 0, ids), 21
            )
            grads = torch.randn(IDS, dim)

            def gather_update(table=table, ids=ids, grads=grads) -> None:
                torch.index_select(table, 0, ids)
                table.index_add_(0, ids, grads, alpha=-0.01)

            # PyTorch's own ops for a forward and an SGD update (repeated ids summed)
            gather_update_rate = _median_rate(gather_update, 21)
            del table
            row = {"rows": rows, "dim": dim, "gather_rows_per_s": gather}
            row["gather_update_rows_per_s"] = gather_update_rate
            row["gather_gb_per_s"] = gather * dim * 4 / 1e9
            for name in ("embedding", "embedding_bag"):
                if name == "embedding":
                    module = torch.nn.Embedding(rows, dim, sparse=True)
                else:
                    module = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)
                opt = torch.optim.SparseAdam(module.parameters(), lr=0.01)
                offsets = torch.arange(IDS)

                def step(module=module, opt=opt, offsets=offsets, name=name, ids=ids) -> None:
                    opt.zero_grad()
                    x = module(ids) if name == "embedding" else module(ids, offsets)
                    x.sum().backward()
                    opt.step()

                row[f"{name}_lookups_per_s"] = _median_rate(step)
                del module, opt
            for name, pooling in TBE_MODES:
                tbe = SplitTableBatchedEmbeddingBagsCodegen(
                    [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                    optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                    learning_rate=0.01,
                    pooling_mode=pooling,
                )
                offsets = torch.arange(IDS + 1)
                row[f"{name}_lookups_per_s"] = _median_rate(
                    lambda tbe=tbe, ids=ids, offsets=offsets: tbe(ids, offsets).sum().backward()
                )
                if pooling == PoolingMode.SUM:  # how far the forward alone gets
                    with torch.no_grad():
                        row[f"{name}_forward_lookups_per_s"] = _median_rate(
                            lambda tbe=tbe, ids=ids, offsets=offsets: tbe(ids, offsets)
                        )
                del tbe
            out.append(row)
            print(row, flush=True)
    return out


def _table(rows: list[dict], base: list[dict]) -> str:
    ceiling = {(b["rows"], b["dim"]): b for b in base}
    lines = [
        "Ceiling and plain-PyTorch baselines (one process, one thread, 51,200 random ids):",
        "",
        "| rows | dim | gather rows/s (ceiling) | GB/s | fbgemm TBE forward only (bags of one) | "
        "fbgemm TBE kernel fwd+bwd, pooled (bags of one) | fbgemm TBE kernel fwd+bwd, sequence | "
        "index_select + index_add_ (SGD) | nn.Embedding sparse fwd+bwd+step | "
        "nn.EmbeddingBag (bags of one) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in base:
        cells = [
            f"{b[k] / 1e6:.2f}M ({b[k] / b['gather_rows_per_s']:.1%})"
            for k in (
                "fbgemm_pooled_forward_lookups_per_s",
                "fbgemm_pooled_lookups_per_s",
                "fbgemm_sequence_lookups_per_s",
                "gather_update_rows_per_s",
                "embedding_lookups_per_s",
                "embedding_bag_lookups_per_s",
            )
        ]
        lines.append(
            f"| {b['rows']:,} | {b['dim']} | {b['gather_rows_per_s'] / 1e6:.1f}M | "
            f"{b['gather_gb_per_s']:.2f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "TorchRec, per rank (slowest rank's speed, largest rank's memory and traffic); "
        "'of ceiling' = forward+backward lookups/s over the gather ceiling:",
        "",
        "| world | module | sharding | rows | dim | item shards | lookups/s | of ceiling | "
        "GB/s | sent MB/step | peak RSS MB | planner MB | planner ms | measured ms | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = ceiling.get((r["rows"], r["dim"]))
        if r["status"] == "ok":
            frac = r["lookups_per_s"] / c["gather_rows_per_s"] if c else float("nan")
            lines.append(
                f"| {r['world']} | {r['module']} | {r['sharding']} | {r['rows']:,} | {r['dim']} | "
                f"{r['item_shards']} | {r['lookups_per_s'] / 1e6:.2f}M | {frac:.1%} | "
                f"{r['gb_per_s']:.2f} | {r['sent_bytes_per_step'] / 1e6:.2f} | "
                f"{r['peak_rss_bytes'] / 2**20:,.0f} | {r['planner_storage_bytes'] / 2**20:,.0f} | "
                f"{r['planner_step_ms']:.2f} | {r['step_ms']:.1f} | ok |"
            )
        else:
            lines.append(
                f"| {r['world']} | {r['module']} | {r['sharding']} | {r['rows']:,} | {r['dim']} | "
                f"{r.get('item_shards', '-')} | - | - | - | - | - | - | - | - | {r['status']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=list(MODULES))
    parser.add_argument("--shardings", nargs="+", default=SHARDINGS, choices=SHARDINGS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--name", default="sharding_matrix", help="results file name")
    args = parser.parse_args()
    base = baselines(args)
    rows = matrix(args)
    md = write_results(
        args.name,
        {"ids_per_rank": IDS, "args": vars(args), "baselines": base, "configurations": rows},
        _table(rows, base),
    )
    print(md.read_text())


if __name__ == "__main__":
    std_mp.set_start_method("spawn", force=True)
    main()
