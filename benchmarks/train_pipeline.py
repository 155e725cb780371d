"""TorchRec's training pipelines against the training loop's own step: examples/s of
fine-tuning at world size 1 and 2, same batches, same model, same losses.

    python -m benchmarks.train_pipeline [--steps 60] [--repeats 3] [--batch-size 1024]

Steps compared on the same pre-read batches (reading is outside every timing), GenCTR's
fine-tuning model (DNN with the decoder, user and side features), the default plan:

* ``loop``: the training loop's step (``CTRModel``; its tables' inputs built in forward,
  de-duplicated and padded to the ranks' largest with one all-reduce per table). Baseline.
* ``by_hand``: ``BatchCTRModel`` stepped by hand: the reader's lookups (unique ids at a fixed
  stride, no collective), nothing overlapped.
* ``base``: TorchRec's ``TrainPipelineBase`` (copies the next batch ahead).
* ``sparse_dist``: TorchRec's ``TrainPipelineSparseDist`` (the next batch's id all-to-alls
  started while this one computes).

Each rank runs one thread (two ranks fill this machine's two cores); the first 5 steps are
warm-up; the step time is the median of the rest; configurations alternate within each repeat
and the median over repeats is reported. The losses of every step are compared with ``loop``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks.common import write_results
from genctr_rec.data.synth import SynthConfig, generate
from genctr_rec.distributed import free_port, join_local_group

MODES = {  # name: (pipeline, batch_forward)
    "loop": ("none", False),
    "by_hand": ("none", True),
    "base": ("base", True),
    "sparse_dist": ("sparse_dist", True),
}
WARMUP = 5
# the default plan replicates this data's small tables (nothing crosses ranks to overlap); the
# second is the plan at scale, the item table sharded row-wise
PLANS = {"default": {}, "item row-wise": {"item": "row_wise"}}


def _worker(
    rank: int,
    world: int,
    port: int,
    data: str,
    mode: str,
    plan: str,
    steps: int,
    batch: int,
    out: str,
) -> None:
    torch.set_num_threads(1)
    join_local_group(rank, world, port)
    import itertools

    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.data.lookups import LookupStrides
    from genctr_rec.data.reader import ImpressionReader
    from genctr_rec.data.schema import DatasetMeta
    from genctr_rec.data.statistics import resolve_features
    from genctr_rec.distributed import init_distributed
    from genctr_rec.training.build import build_model
    from genctr_rec.training.sharding import sharding_summary
    from genctr_rec.training.train_pipeline import train_steps

    meta = DatasetMeta.read(data)
    cfg = RunConfig(
        "finetune",
        data,
        ModelConfig(),
        TrainConfig(batch_size=batch, seed=0, sharding=dict(PLANS[plan])),
        backbone="dnn",
        transfer="decoder",
    )
    cfg.num_items, cfg.num_categories = meta.num_items, meta.num_categories
    cfg.max_history = meta.max_history
    features = resolve_features(meta, data)
    cfg.features = features.to_json()
    ctx = init_distributed()
    pipeline, batch_forward = MODES[mode]
    strides = LookupStrides.for_run(batch, meta.max_history, meta.num_items, meta.num_categories)
    reader = ImpressionReader(
        data,
        "train",
        batch,
        ctx.rank,
        ctx.world_size,
        seed=0,
        features=features,
        lookups=strides if batch_forward else None,
    )
    batches = list(itertools.islice(reader, steps))
    built = build_model(cfg, ctx, batch_forward=batch_forward)
    result = train_steps(built, batches, pipeline, ctx.device, batch_forward)
    step = statistics.median(result["seconds"][WARMUP:])
    if ctx.is_main:
        summary = {
            "examples_per_s": batch * world / step,
            "step_ms": step * 1000,
            "losses": result["losses"],
            "pipelined": result["pipelined"],
            "plan": {k: str(v) for k, v in sharding_summary(built.dmp).items()},
        }
        Path(out).write_text(json.dumps(summary))


def _measure(world: int, plan: str, data: Path, args: argparse.Namespace) -> list[dict]:
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                mp.start_processes(
                    _worker,
                    args=(world, free_port(), str(data), mode, plan, args.steps,
                          args.batch_size, out.name),
                    nprocs=world,
                    start_method="spawn",
                )  # fmt: skip
                runs[mode].append(json.loads(Path(out.name).read_text()))
    base = statistics.median(r["examples_per_s"] for r in runs["loop"])
    loop_losses = torch.tensor(runs["loop"][0]["losses"])
    rows = []
    for mode, found in runs.items():
        rate = statistics.median(r["examples_per_s"] for r in found)
        diff = (torch.tensor(found[0]["losses"]) - loop_losses).abs().max().item()
        rows.append(
            {
                "world_size": world,
                "plan_name": plan,
                "mode": mode,
                "examples_per_s": rate,
                "runs_examples_per_s": [r["examples_per_s"] for r in found],
                "vs_loop": rate / base,
                "max_loss_diff_vs_loop": diff,
                "pipelined_tables": found[0]["pipelined"],
                "plan": found[0]["plan"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", default="runs/train_pipeline")
    args = parser.parse_args()
    data = Path(args.workdir) / "data-synth"
    if not (data / "meta.json").is_file():
        generate(SynthConfig.preset("default"), data)
    rows = []
    for world in args.worlds:
        for plan in PLANS if world > 1 else ["default"]:
            rows += _measure(world, plan, data, args)
    lines = [
        f"Fine-tuning GenCTR's model (DNN + decoder, side features), synthetic default preset, "
        f"batch {args.batch_size} per rank, {args.steps} steps ({WARMUP} warm-up), one thread "
        f"a rank, median of {args.repeats} repeats.",
        "",
        "| ranks | plan | step | examples/s | vs the loop's step | runs | tables pipelined "
        "| max loss difference vs the loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs_shown = ", ".join(f"{x:,.0f}" for x in r["runs_examples_per_s"])
        lines.append(
            f"| {r['world_size']} | {r['plan_name']} | {r['mode']} | {r['examples_per_s']:,.0f} | "
            f"{r['vs_loop']:.2f}x | {runs_shown} | {r['pipelined_tables']} | "
            f"{r['max_loss_diff_vs_loop']:.1e} |"
        )
    payload = {"steps": args.steps, "batch_size": args.batch_size, "rows": rows}
    print(write_results("train_pipeline", payload, "\n".join(lines)))


if __name__ == "__main__":
    main()
