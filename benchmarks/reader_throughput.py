"""Reader throughput: impressions/s of ImpressionReader at history 50 and 200, one process.

Baselines in the same run: pyarrow's raw decode of the same columns (a ceiling: no batching,
no checks) and a hand-written reader (``iter_batches`` + ``to_pylist`` + padded tensors), the
code a user would otherwise write.

    python -m benchmarks.reader_throughput [--rows 400000] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import write_results
from genctr_rec.data.jagged import lengths_to_offsets, list_array
from genctr_rec.data.reader import ImpressionReader
from genctr_rec.data.schema import IMPRESSION_SCHEMA, DatasetMeta
from genctr_rec.data.writer import PartitionWriter

NUM_ITEMS, NUM_CATEGORIES = 1_000_000, 2_000


def make_dataset(root: Path, rows: int, history: int) -> Path:
    """``rows`` impressions, every history exactly ``history`` long, written like the recipes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    DatasetMeta(NUM_ITEMS, NUM_CATEGORIES, history, "bench").write(root)
    with PartitionWriter(root / "train", IMPRESSION_SCHEMA) as writer:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            offsets = lengths_to_offsets(np.full(n, history))
            hist = rng.integers(0, NUM_ITEMS, n * history)
            writer.write(
                pa.table(
                    {
                        "user_id": np.arange(start, start + n),
                        "timestamp": np.arange(n),
                        "item_id": rng.integers(0, NUM_ITEMS, n),
                        "category_id": rng.integers(0, NUM_CATEGORIES, n),
                        "query_category_id": rng.integers(0, NUM_CATEGORIES, n),
                        "label": (rng.random(n) < 0.2).astype(np.int8),
                        "hist_item_ids": list_array(offsets, hist),
                        "hist_category_ids": list_array(offsets, hist % NUM_CATEGORIES),
                    }
                )
            )
    return root


def median_rate(fn, repeats: int = 3) -> float:
    """Median of ``repeats`` timed passes after one warm-up pass (page cache, allocator)."""
    fn()
    return float(np.median([fn() for _ in range(repeats)]))


def time_genctr(root: Path, batch_size: int, shuffle: bool) -> float:
    reader = ImpressionReader(root, "train", batch_size, shuffle=shuffle, seed=0)
    start, rows = time.perf_counter(), 0
    for batch in reader:
        rows += batch.batch_size
    return rows / (time.perf_counter() - start)


def time_raw_decode(root: Path) -> float:
    start, rows = time.perf_counter(), 0
    for path in sorted((root / "train").glob("*.parquet")):
        handle = pq.ParquetFile(path)
        for rg in range(handle.metadata.num_row_groups):
            rows += handle.read_row_group(rg, columns=IMPRESSION_SCHEMA.names).num_rows
    return rows / (time.perf_counter() - start)


def time_naive(root: Path, batch_size: int, max_rows: int) -> float:
    """The hand-written reader: python lists per batch, padded dense history tensors."""
    start, rows = time.perf_counter(), 0
    for path in sorted((root / "train").glob("*.parquet")):
        for rb in pq.ParquetFile(path).iter_batches(batch_size, columns=IMPRESSION_SCHEMA.names):
            d = rb.to_pydict()
            hist = d["hist_item_ids"]
            width = max(len(h) for h in hist)
            torch.tensor([h + [0] * (width - len(h)) for h in hist])
            torch.tensor([h + [0] * (width - len(h)) for h in d["hist_category_ids"]])
            torch.tensor(d["item_id"]), torch.tensor(d["label"], dtype=torch.float32)
            rows += rb.num_rows
            if rows >= max_rows:
                return rows / (time.perf_counter() - start)
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--histories", type=int, nargs="+", default=[50, 200])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for history in args.histories:
            root = make_dataset(Path(tmp) / f"h{history}", args.rows, history)
            row = {
                "history": history,
                "rows": args.rows,
                "genctr_shuffled": median_rate(
                    lambda root=root: time_genctr(root, args.batch_size, True)
                ),
                "genctr_in_order": median_rate(
                    lambda root=root: time_genctr(root, args.batch_size, False)
                ),
                "pyarrow_decode_only": median_rate(lambda root=root: time_raw_decode(root)),
                "hand_written_baseline": median_rate(
                    lambda root=root: time_naive(root, args.batch_size, 100_000), repeats=1
                ),
            }
            results.append(row)
            print(json.dumps(row))
    lines = [
        "| history | genctr reader, shuffled | genctr reader, in order | pyarrow decode only "
        "(ceiling) | hand-written reader (baseline) | speed-up over baseline |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['history']} | {r['genctr_shuffled']:,.0f} | {r['genctr_in_order']:,.0f} | "
            f"{r['pyarrow_decode_only']:,.0f} | {r['hand_written_baseline']:,.0f} | "
            f"{r['genctr_shuffled'] / r['hand_written_baseline']:.1f}x |"
        )
    table = (
        "Impressions per second (median of 3 passes after a warm-up), one process, one torch "
        "thread, Parquet with lz4 as the recipes write it, batch "
        f"{args.batch_size}, {args.rows:,} rows, 1M items.\n\n" + "\n".join(lines)
    )
    print(write_results("reader_throughput", {"results": results, "args": vars(args)}, table))


if __name__ == "__main__":
    main()
