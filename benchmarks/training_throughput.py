"""Training throughput: examples/s and peak memory of pre-training and fine-tuning (each
backbone, with and without model integration) at world size 1 and 2, TorchRec path against a
plain-PyTorch reference of the same model in the same run.

    python -m benchmarks.training_throughput [--items 1000000 10000] [--steps 40] [--repeats 3]

The reference is the same model (``factory.model_over`` with the run's config: until 0.7 it
was built with ``CTRModel``'s default fusion of g, concat, while the TorchRec path used the
config's, product, so the MI rows compared different models) but holds the tables as dense
``nn.Embedding`` trained by Adam under ``DistributedDataParallel`` (every rank a full replica,
dense gradients all-reduced): what one writes without TorchRec. The TorchRec path is
genctr-rec's default plan: tables over ``replicate_max_mb`` sharded (planner's choice) with
the fused optimizer, smaller ones replicated at world size 2; the plan is in the results. Each
measurement is repeated (TorchRec and plain alternating, so both see the same machine state)
and the median reported: single runs on this 2-core machine move by +-15 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks.common import peak_rss_bytes, reset_peak_rss, write_results
from genctr_rec.data.synth import SynthConfig, generate
from genctr_rec.distributed import free_port, join_local_group

CONFIGS = [  # (name, stage, backbone, transfer)
    ("pretrain (CD, CS)", "pretrain", None, "none"),
    ("dnn", "finetune", "dnn", "none"),
    ("dnn + MI", "finetune", "dnn", "decoder"),
    ("dcnv2", "finetune", "dcnv2", "none"),
    ("dcnv2 + MI", "finetune", "dcnv2", "decoder"),
    ("dcnv2_ta", "finetune", "dcnv2_ta", "none"),
    ("dcnv2_ta + MI", "finetune", "dcnv2_ta", "decoder"),
]


class PlainEmbeddings(nn.Module):
    """The reference's tables: dense ``nn.Embedding`` with SharedEmbeddings' call signature."""

    def __init__(self, num_items: int, num_categories: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.feature_keys: list[str] = []  # ids only: the benchmark feeds no side features
        self.item = nn.Embedding(num_items, dim)
        self.category = nn.Embedding(num_categories, dim)

    def forward(self, item_ids: torch.Tensor, category_ids: torch.Tensor):
        return self.item(item_ids), self.category(category_ids)


def _worker(
    rank: int, world: int, port: int, data: str, config: tuple, impl: str, steps: int, out: str
) -> None:
    torch.set_num_threads(1)
    reset_peak_rss()
    join_local_group(rank, world, port)
    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.data.keys import SEQ_ITEMS
    from genctr_rec.data.reader import ImpressionReader, SequenceReader
    from genctr_rec.data.schema import DatasetMeta
    from genctr_rec.distributed import init_distributed
    from genctr_rec.factory import model_over
    from genctr_rec.models.negatives import NegativeSampler
    from genctr_rec.training.build import build_model
    from genctr_rec.training.pretrain import split_last

    _, stage, backbone, transfer = config
    ctx = init_distributed()
    meta = DatasetMeta.read(data)
    batch = 32 if stage == "pretrain" else 1024
    cfg = RunConfig(
        stage,
        data,
        ModelConfig(),
        TrainConfig(batch_size=batch),
        backbone=backbone,
        transfer=transfer,
        num_items=meta.num_items,
        num_categories=meta.num_categories,
        max_history=meta.max_history,
    )
    plan = "dense nn.Embedding + DDP"
    if impl == "torchrec":
        from genctr_rec.training.sharding import sharding_summary

        built = build_model(cfg, ctx)
        model, dense_opt = built.dmp, built.dense_optimizer
        plan = ", ".join(f"{t} {kind}" for t, kind in sorted(sharding_summary(model).items()))
    else:
        torch.manual_seed(0)
        emb = PlainEmbeddings(meta.num_items, meta.num_categories, 16)
        model = DistributedDataParallel(model_over(cfg, emb))  # the same dense part
        dense_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if stage == "pretrain":
        reader = SequenceReader(data, batch, rank, world, max_history=meta.max_history + 2)
        sampler = NegativeSampler.from_dataset(data, "category", 0, rank)

        def step(b):
            context, _, _ = split_last(b.sparse_features)
            return model(context, sampler.sample(context[SEQ_ITEMS].values(), 16))
    else:
        reader = ImpressionReader(data, "train", batch, rank, world)

        def step(b):
            return F.binary_cross_entropy_with_logits(model(b.sparse_features), b.labels)

    done, examples, start = 0, 0, None
    for b in reader:
        if done == 5:
            start = time.perf_counter()
        dense_opt.zero_grad()
        step(b).backward()
        dense_opt.step()
        done += 1
        if done > 5:
            examples += b.batch_size
        if done == steps + 5:
            break
    seconds = time.perf_counter() - start
    total = torch.tensor([examples], dtype=torch.float64)
    dist.all_reduce(total)
    peak = torch.tensor([peak_rss_bytes()], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "examples_per_s": float(total) / seconds,
                    "peak_rss_gb": float(peak) / 2**30,
                    "plan": plan,
                }
            )
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, nargs="+", default=[1_000_000, 10_000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for items in args.items:
            data = Path(tmp) / f"synth-{items}"
            generate(
                SynthConfig(
                    num_users=8_000, num_items=items, num_categories=min(2_000, items // 5)
                ),
                data,
            )
            for config in CONFIGS:
                for world in args.worlds:
                    row = {"items": items, "config": config[0], "world_size": world}
                    runs: dict[str, list[dict]] = {"torchrec": [], "plain": []}
                    for _ in range(args.repeats):
                        for impl in runs:
                            out = str(Path(tmp) / "r.json")
                            mp.start_processes(
                                _worker,
                                args=(world, free_port(), str(data), config, impl, args.steps, out),
                                nprocs=world,
                                start_method="spawn",
                            )
                            runs[impl].append(json.loads(Path(out).read_text()))
                    for impl, found in runs.items():
                        rates = [r["examples_per_s"] for r in found]
                        row[f"{impl}_examples_per_s"] = statistics.median(rates)
                        row[f"{impl}_runs_examples_per_s"] = rates
                        row[f"{impl}_peak_rss_gb"] = max(r["peak_rss_gb"] for r in found)
                    row["plan"] = runs["torchrec"][0]["plan"]
                    row["speedup"] = row["torchrec_examples_per_s"] / row["plain_examples_per_s"]
                    results.append(row)
                    print(json.dumps(row), flush=True)
    lines = [
        "| items | model | ranks | TorchRec ex/s | plain PyTorch ex/s | speed-up | "
        "peak RSS per rank, GB (TorchRec / plain) | TorchRec plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['items']:,} | {r['config']} | {r['world_size']} | "
            f"{r['torchrec_examples_per_s']:,.0f} | {r['plain_examples_per_s']:,.0f} | "
            f"{r['speedup']:.2f}x | "
            f"{r['torchrec_peak_rss_gb']:.2f} / {r['plain_peak_rss_gb']:.2f} | {r['plan']} |"
        )
    table = (
        f"Examples/s over {args.steps} steps after 5 warm-up steps, summed over ranks, median "
        f"of {args.repeats} runs (TorchRec and plain alternating); one "
        "thread per rank; fine-tuning batch 1,024 impressions per rank, pre-training 32 "
        "sequences per rank (examples = sequences). Synthetic data, 8,000 users.\n\n"
        + "\n".join(lines)
    )
    print(write_results("training_throughput", {"results": results, "args": vars(args)}, table))


if __name__ == "__main__":
    main()
