"""Object storage against local disk, same data, same run: ImpressionReader throughput and
peak memory, and checkpoint save / load time (CheckpointManager, manifest and SHA-256 check
included).

The S3 server is moto's (started on 127.0.0.1 by this script, as the tests do): a Python
server on the same 2 cores, so the S3 figures are a lower bound for a real store and show
the client-side cost (ranged GETs, no rename, checksums read back), not a network.

    python -m benchmarks.object_storage [--rows 200000] [--table-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.common import peak_rss_bytes, reset_peak_rss, write_results
from benchmarks.reader_throughput import make_dataset
from benchmarks.s3_server import make_bucket, s3_server, upload
from genctr_rec.checkpoint import CheckpointManager
from genctr_rec.data.reader import ImpressionReader

BUCKET = "bench"


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def read_pass(data: str, batch_size: int) -> tuple[float, int]:
    """(impressions/s, bytes the process grew by at its peak) of one shuffled pass."""
    reset_peak_rss()
    before = _rss_bytes()
    reader = ImpressionReader(data, "train", batch_size, shuffle=True, seed=0)
    start, rows = time.perf_counter(), 0
    for batch in reader:
        rows += batch.batch_size
    return rows / (time.perf_counter() - start), peak_rss_bytes() - before


def time_reader(data: str, batch_size: int, repeats: int) -> dict[str, float]:
    read_pass(data, batch_size)  # warm-up: page cache, connections
    runs = [read_pass(data, batch_size) for _ in range(repeats)]
    return {
        "examples_per_s": float(np.median([r[0] for r in runs])),
        "peak_growth_mb": max(r[1] for r in runs) / 2**20,
    }


class Model(nn.Module):
    """A table the size of a small catalogue and a dense tower, as a checkpoint holds them."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, dim)
        self.tower = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))


def time_checkpoints(run: str, model: Model, repeats: int) -> dict[str, float]:
    manager = CheckpointManager(run, keep=2)
    saves, loads = [], []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        manager.save(step, {"model": model.state_dict()}, {"step": step, "world_size": 1}, {})
        saves.append(time.perf_counter() - start)
        target = {"model": Model(model.table.num_embeddings, model.table.embedding_dim)}
        state = {"model": target["model"].state_dict()}
        start = time.perf_counter()
        chosen = manager.newest_valid()
        manager.load(chosen, state)
        loads.append(time.perf_counter() - start)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "mb": size / 2**20,
        "save_s": float(np.median(saves)),
        "load_s": float(np.median(loads)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, s3_server(Path(tmp) / "moto.log") as env:
        os.environ.update(env)
        make_bucket(BUCKET)
        local = make_dataset(Path(tmp) / "data", args.rows, args.history)
        upload(local, f"s3://{BUCKET}/data")
        reader = {
            "local disk": time_reader(str(local), args.batch_size, args.repeats),
            "S3 (moto, 127.0.0.1)": time_reader(f"s3://{BUCKET}/data", args.batch_size, 3),
        }
        model = Model(args.table_rows, args.dim)
        checkpoints = {
            "local disk": time_checkpoints(str(Path(tmp) / "run"), model, args.repeats),
            "S3 (moto, 127.0.0.1)": time_checkpoints(f"s3://{BUCKET}/run", model, args.repeats),
        }
    for where in reader:
        print(json.dumps({"where": where, **reader[where], **checkpoints[where]}))
    base_r, base_c = reader["local disk"], checkpoints["local disk"]
    lines = [
        "| storage | reader impressions/s | vs disk | reader memory growth, peak (MB) "
        "| checkpoint save (s) | vs disk | checkpoint load + verify (s) | vs disk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for where in reader:
        r, c = reader[where], checkpoints[where]
        lines.append(
            f"| {where} | {r['examples_per_s']:,.0f} | "
            f"{r['examples_per_s'] / base_r['examples_per_s']:.2f}x | {r['peak_growth_mb']:,.0f} | "
            f"{c['save_s']:.2f} | {c['save_s'] / base_c['save_s']:.1f}x | {c['load_s']:.2f} | "
            f"{c['load_s'] / base_c['load_s']:.1f}x |"
        )
    table = (
        f"One process, one torch thread. Reader: {args.rows:,} impressions, history "
        f"{args.history}, batch {args.batch_size}, shuffled, median of {args.repeats} passes "
        f"after a warm-up. Checkpoint: a {args.table_rows:,} x {args.dim} table and a dense "
        f"tower ({checkpoints['local disk']['mb']:.0f} MB), median of {args.repeats} saves and "
        "loads; a load includes the manifest's SHA-256 check (every byte read twice on S3). "
        "The S3 server is moto on the same machine: client-side cost, not a network.\n\n"
        + "\n".join(lines)
    )
    payload = {"reader": reader, "checkpoints": checkpoints, "args": vars(args)}
    print(write_results("object_storage", payload, table))


if __name__ == "__main__":
    main()
