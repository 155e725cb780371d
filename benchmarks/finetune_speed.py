"""Fine-tuning speed, epoch by epoch: GenCTR (PS + MI) and the backbones alone against
DeepCTR-Torch's DIN on the same data, and the same runs with 0.5's step as the baseline.

Why: a user times the GenCTR run first. 0.4 made it steady from epoch to epoch (0.3 lost up
to 40 % from epoch 2: checkpoints through torch.distributed.checkpoint's collectives in a
one-process job left a second OpenMP team that stopped spin-waiting; see benchmarks/README.md).
0.6 makes the step itself cheaper, with the same outputs (tests/test_layers.py):

* the DCN V2 cross network as whole-batch products (TorchRec's broadcasts each expert's
  kernel over the batch and runs B matrix-vector products);
* target attention and g(s, c) without projecting every history token (the key projection
  moves onto the query, the value projection after the weighted sum), and one padded history
  of item + category sums for both;
* no DDP around the dense part in a one-process job; Adam as one fused kernel.

The "as 0.5" rows run today's code with those four replaced by 0.5's forms (``run_as_05``).
0.9 keeps a step's freed memory mapped (``genctr_rec/training/allocator.py``: glibc handed it
back to the kernel and faulted it in again, zeroed, at the next step); the "malloc as 0.8" rows
run today's code with glibc's own thresholds (``GENCTR_KEEP_FREED_MEMORY=0``).

Each configuration runs ``genctr finetune`` as users do (validation 4 times an epoch, a
checkpoint at every epoch end) in its own process, for ``--epochs`` epochs (no early stop);
throughput counts training steps only (validation and checkpoint time excluded). DIN runs
``benchmarks.peers.train_peer`` (needs ``requirements/bench.txt``) on the same splits and
features for the same epochs. Everything runs ``--rounds`` times (3), one configuration after
another, DIN last in each round: the table gives each epoch's median over rounds and the
ratios to DIN taken within each round (this machine's speed moves by a third between minutes;
runs close together move together).

    python -m benchmarks.finetune_speed                      # MovieLens-100k, 3 epochs
    python -m benchmarks.finetune_speed --data DIR --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_results
from genctr_rec.training.allocator import ENV as ALLOCATOR_ENV

CONFIGS: dict[str, tuple[str, str, bool, bool, bool]] = {
    # name: (backbone, transfer, as 0.5: the layers in their textbook form, DDP around the
    # dense part in a one-process job, a per-tensor Adam; as 0.8: glibc's default malloc
    # thresholds, GENCTR_KEEP_FREED_MEMORY=0, see genctr_rec/training/allocator.py;
    # --compile: genctr_rec/training/compiled.py, its compile inside epoch 1)
    "DNN alone": ("dnn", "none", False, False, False),
    "GenCTR, DNN": ("dnn", "ps_mi", False, False, False),
    "GenCTR, DNN, --compile": ("dnn", "ps_mi", False, False, True),
    "GenCTR, DNN, malloc as 0.8 (baseline)": ("dnn", "ps_mi", False, True, False),
    "GenCTR, DNN, as 0.5 (baseline)": ("dnn", "ps_mi", True, True, False),
    "DCN V2 & TA alone": ("dcnv2_ta", "none", False, False, False),
    "DCN V2 & TA alone, as 0.5 (baseline)": ("dcnv2_ta", "none", True, True, False),
    "GenCTR, DCN V2 & TA": ("dcnv2_ta", "ps_mi", False, False, False),
    "GenCTR, DCN V2 & TA, --compile": ("dcnv2_ta", "ps_mi", False, False, True),
    "GenCTR, DCN V2 & TA, malloc as 0.8 (baseline)": ("dcnv2_ta", "ps_mi", False, True, False),
    "GenCTR, DCN V2 & TA, as 0.5 (baseline)": ("dcnv2_ta", "ps_mi", True, True, False),
}


def run_as_05() -> None:
    """0.5's step: TorchRec's cross network (B matrix-vector products per expert), target
    attention projecting every history token, DDP around the dense part even in one process,
    Adam looping over tensors (g(s, c) through SDPA is a flag: ``--decoder-kernel sdpa``).
    Same outputs as today's; 0.5's forms of those layers live on only here."""
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
    from torchrec.modules.crossnet import LowRankMixtureCrossNet

    import genctr_rec.models.layers as layers
    import genctr_rec.training.build as build
    import genctr_rec.training.sharding as sharding

    layers.CrossNet.forward = LowRankMixtureCrossNet.forward
    layers.TargetAttention.forward = layers.TargetAttention.forward_projected
    sharding.DataParallelWhenDistributed.wrap = DefaultDataParallelWrapper.wrap
    build.FUSED_ADAM = False


def _one_run(
    data: str, pre: str, out: str, backbone: str, transfer: str, old: bool, compile_: bool
) -> None:
    """Child process: one fine-tuning run; prints its per-epoch examples/s as JSON."""
    from genctr_rec.cli import main

    args = ["finetune", "--data", data, "--out", out, "--backbone", backbone]
    if old:
        run_as_05()
        args += ["--decoder-kernel", "sdpa"]
    args += ["--transfer", transfer, "--epochs", str(EPOCHS), "--patience", "0"]
    if transfer != "none":
        args += ["--init-from", pre]
    if compile_:
        args += ["--compile"]
    if main(args) != 0:
        raise SystemExit(f"finetune failed: {args}")
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    print(json.dumps({"examples_per_s": metrics["examples_per_s"], "auc": metrics["test"]["auc"]}))


EPOCHS = 3


def _child(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.finetune_speed", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _din(data: str, epochs: int) -> None:
    """Child process: DIN for ``epochs`` epochs; prints its examples/s as JSON."""
    from benchmarks.peers import train_peer

    result = train_peer("din", data, seed=0, max_epochs=epochs, patience=epochs)
    print(json.dumps({"examples_per_s": result["examples_per_s"], "auc": result["test"]["auc"]}))


def _spread(values: list[float]) -> str:
    """Median and range of per-round ratios: ``5.2x (4.9-5.6)``."""
    return f"{np.median(values):.1f}x ({min(values):.1f}-{max(values):.1f})"


def summarise(rows: list[dict[str, Any]], dins: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: the median over rounds of each epoch's examples/s, and its ratios to
    DIN computed round by round (a round's runs share the machine's state of the moment, so
    the ratio within a round is steadier than either figure)."""
    out = []
    for row in rows:
        rounds = row["rounds"]
        speed = np.median([r["examples_per_s"] for r in rounds], axis=0).tolist()
        summary = {**row, "examples_per_s": speed, "auc": rounds[0]["auc"]}
        if dins:
            per_round = list(zip(rounds, dins, strict=True))
            summary["x_din_mean"] = [np.mean(r["examples_per_s"]) / d["examples_per_s"]
                                     for r, d in per_round]  # fmt: skip
            summary["x_din_slowest"] = [min(r["examples_per_s"]) / d["examples_per_s"]
                                        for r, d in per_round]  # fmt: skip
            summary["x_din_slowest_after_first"] = [
                min(r["examples_per_s"][1:] or r["examples_per_s"]) / d["examples_per_s"]
                for r, d in per_round
            ]
        out.append(summary)
    return out


def markdown(rows: list[dict[str, Any]], dins: list[dict[str, Any]], epochs: int) -> str:
    n = len(rows[0]["rounds"])
    lines = [
        f"One process, {epochs} epochs each, training examples/s per epoch (validation and "
        f"checkpoints excluded), median of {n} rounds (each round runs every configuration and "
        "DIN once, one after another); DIN: DeepCTR-Torch 0.3.0 on the same splits and "
        "features. Ratios to DIN are taken within each round: median (range) over rounds. "
        "`--compile` rows pay their one-time compile inside epoch 1.",
        "",
        "| configuration | "
        + " | ".join(f"epoch {i + 1}" for i in range(epochs))
        + " | last / first | x DIN (mean of epochs) | x DIN (slowest epoch) "
        "| x DIN (slowest epoch after the first) | test AUC |",
        "|---|" + "---|" * (epochs + 5),
    ]
    for row in rows:
        speed = row["examples_per_s"]
        ratio = _spread(row["x_din_mean"]) if dins else "n/a"
        slowest = _spread(row["x_din_slowest"]) if dins else "n/a"
        later = _spread(row["x_din_slowest_after_first"]) if dins else "n/a"
        lines.append(
            f"| {row['name']} | "
            + " | ".join(f"{s:,.0f}" for s in speed)
            + f" | {speed[-1] / speed[0]:.2f} | {ratio} | {slowest} | {later} "
            f"| {row['auc']:.4f} |"
        )
    if dins:
        speeds = [d["examples_per_s"] for d in dins]
        cells = [
            f"{np.median(speeds):,.0f} (all epochs; rounds "
            + ", ".join(f"{s:,.0f}" for s in speeds)
            + ")"
        ] + [""] * (epochs - 1)
        lines.append(
            f"| DeepCTR-Torch DIN | {' | '.join(cells)} | | 1.0x | 1.0x | 1.0x "
            f"| {dins[0]['auc']:.4f} |"
        )
        lines += ["", *_integration_bounds(rows)]
    return "\n".join(lines)


def _integration_bounds(rows: list[dict[str, Any]]) -> list[str]:
    """Per backbone: what GenCTR's integration costs against the backbone alone in the same
    rounds, and so the most GenCTR can reach against DIN while it costs anything (the backbone
    alone is that ceiling)."""
    by_name = {row["name"]: row for row in rows}
    lines = []
    for alone_name, alone in by_name.items():
        if not alone_name.endswith(" alone"):
            continue
        backbone = alone_name.removesuffix(" alone")
        genctr = by_name.get(f"GenCTR, {backbone}")
        if genctr is None:
            continue
        share = [1 - np.mean(g["examples_per_s"]) / np.mean(a["examples_per_s"])
                 for g, a in zip(genctr["rounds"], alone["rounds"], strict=True)]  # fmt: skip
        lines.append(
            f"- {backbone}: the backbone alone is {_spread(alone['x_din_slowest'])} DIN in its "
            f"slowest epoch; GenCTR on it {_spread(genctr['x_din_slowest'])}. Integration (the "
            f"decoder's g(s, c) and its backward, and the padded history where the backbone "
            f"reads none) takes "
            f"{100 * np.median(share):.0f} % ({100 * min(share):.0f} to {100 * max(share):.0f} "
            "over rounds) of "
            "GenCTR's time (1 - GenCTR / alone, mean of epochs, per round): GenCTR can reach "
            "the backbone's own ratio only as that share goes to zero."
        )
    return lines


def main() -> None:
    global EPOCHS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="dataset (default: MovieLens-100k)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rounds", type=int, default=3, help="repeat everything N times")
    parser.add_argument("--skip-din", action="store_true")
    parser.add_argument(
        "--one", nargs=7, metavar=("DATA", "PRE", "OUT", "B", "T", "OLD", "COMPILE")
    )
    parser.add_argument("--din", metavar="DATA")
    args = parser.parse_args()
    EPOCHS = args.epochs
    if args.one:
        data, pre, out, backbone, transfer, old, compile_ = args.one
        _one_run(data, pre, out, backbone, transfer, old == "1", compile_ == "1")
        return
    if args.din:
        _din(args.din, args.epochs)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-speed-"))
    data = args.data
    env = {**os.environ}
    if data is None:
        data = str(work / "ml-100k")
        if not (Path(data) / "meta.json").is_file():
            subprocess.run(
                [sys.executable, "-m", "genctr_rec.cli", "data", "movielens", "--out", data],
                check=True,
                env=env,
            )
    pre = str(work / "pre")
    if not (Path(pre) / "checkpoint").is_dir():
        subprocess.run(
            [sys.executable, "-m", "genctr_rec.cli", "pretrain", "--data", data, "--out", pre,
             "--epochs", "3"],
            check=True,
            env=env,
        )  # fmt: skip
    rows = [
        {"name": name, "backbone": backbone, "transfer": transfer, "rounds": []}
        for name, (backbone, transfer, *_) in CONFIGS.items()
    ]
    dins: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for i, (name, config) in enumerate(CONFIGS.items()):
            backbone, transfer, old, default_malloc, compile_ = config
            out = str(work / f"ft-{i}")
            shutil.rmtree(out, ignore_errors=True)  # a fresh run each time, never a resume
            result = _child(
                "--epochs", str(args.epochs), "--one", data, pre, out, backbone, transfer,
                "1" if old else "0", "1" if compile_ else "0",
                env={**({ALLOCATOR_ENV: "0"} if default_malloc else {}),
                     # a cold Inductor cache, as a machine's first job has (warm: ~2 s)
                     **({"TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{round_}-{i}")}
                        if compile_ else {})},
            )  # fmt: skip
            rows[i]["rounds"].append(result)
            print(round_ + 1, name, [round(s) for s in result["examples_per_s"]], flush=True)
        if not args.skip_din:
            dins.append(_child("--epochs", str(args.epochs), "--din", data))
            print(round_ + 1, "DIN", round(dins[-1]["examples_per_s"]), flush=True)
    rows = summarise(rows, dins)
    payload = {"data": data, "epochs": args.epochs, "rounds": args.rounds, "rows": rows,
               "din": dins}  # fmt: skip
    print(write_results("finetune_speed", payload, markdown(rows, dins, args.epochs)))


if __name__ == "__main__":
    main()
