"""Reproduce the layout of the paper's Table 1: eight configurations x three backbones, test AUC
and LogLoss as mean +- std over seeds, on the synthetic data and on MovieLens-100k.

    python -m benchmarks.table1 [--seeds 0 1 2] [--datasets synth movielens] [--rows 1 2 5]
                                [--peers din dcnmix]

Rows (as in the paper): 1 backbone; 2 backbone + PS (CS+CD); 3 +decoder from scratch;
4 +decoder with PS; 5 +decoder PS+MI (GenCTR); 6 PS+MI with CS+SD; 7 RS+CD; 8 RS+SD.
Every run is a full pre-training or fine-tuning with the project's defaults (user and declared
side features, validation-selected length) and a fixed seed; runs already finished under
--workdir are reused. Peers: DeepCTR-Torch DIN and DCNMix on the same splits and features, with
the same embedding width, validation and epoch budget (``benchmarks/peers.py``; needs
``requirements/bench.txt``), with their training examples/s beside ours.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine, write_results
from benchmarks.peers import PEER_LABELS
from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
from genctr_rec.data import movielens
from genctr_rec.data.schema import META_FILE
from genctr_rec.data.synth import SynthConfig, generate

ROWS = [  # (row, label, transfer, pre-training variant)
    (1, "Backbone", "none", None),
    (2, "Backbone + PS (CS+CD)", "ps", "cs_cd"),
    (3, "+Decoder (no pre-training)", "decoder", None),
    (4, "+Decoder, PS (CS+CD)", "ps_decoder", "cs_cd"),
    (5, "+Decoder, PS+MI (CS+CD) = GenCTR", "ps_mi", "cs_cd"),
    (6, "+Decoder, PS+MI (CS+SD)", "ps_mi", "cs_sd"),
    (7, "+Decoder, PS+MI (RS+CD)", "ps_mi", "rs_cd"),
    (8, "+Decoder, PS+MI (RS+SD)", "ps_mi", "rs_sd"),
]
VARIANTS = {
    "cs_cd": ("category", "conditional"),
    "cs_sd": ("category", "sasrec"),
    "rs_cd": ("random", "conditional"),
    "rs_sd": ("random", "sasrec"),
}
BACKBONES = ["dnn", "dcnv2", "dcnv2_ta"]
CLAIMS = [  # (claim, better row, worse row)
    ("GenCTR beats the backbone", 5, 1),
    ("PS alone helps", 2, 1),
    ("PS+MI beats PS alone", 5, 2),
    ("PS helps with a decoder", 4, 3),
    ("MI adds to PS", 5, 4),
    ("CS beats RS (CD)", 5, 7),
    ("CS beats RS (SD)", 6, 8),
    ("CD beats SD (CS)", 5, 6),
    ("CD beats SD (RS)", 7, 8),
]


def prepare(name: str, workdir: Path) -> Path:
    data = workdir / f"data-{name}"
    if not (data / META_FILE).is_file():
        if name == "synth":
            generate(SynthConfig.preset("default"), data)
        else:
            movielens.build(data)
    return data


def metrics_of(run: Path) -> dict | None:
    path = run / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_dataset(
    name: str,
    workdir: Path,
    seeds: list[int],
    backbones: list[str],
    rows: list[int],
    peers: list[str],
    peer_seeds: dict[str, list[int]] | None = None,
) -> dict:
    from genctr_rec.training.finetune import finetune
    from genctr_rec.training.pretrain import pretrain

    data = prepare(name, workdir)
    results: dict = {"auc": {}, "logloss": {}, "pretrain": {}, "speed": {}, "peers": {}}
    chosen = [r for r in ROWS if r[0] in rows]
    variants = {v for _, _, _, v in chosen if v}
    for seed in seeds:
        for variant, (negatives, decoder) in VARIANTS.items():
            if variant not in variants:
                continue
            run = workdir / name / f"pretrain-{variant}-s{seed}"
            cfg = RunConfig(
                "pretrain",
                str(data),
                ModelConfig(decoder=decoder),
                TrainConfig(seed=seed, negatives=negatives),
            )
            m = metrics_of(run) or pretrain(cfg, run)
            results["pretrain"].setdefault(variant, []).append(
                {k: v for k, v in m.items() if "@" in k}
            )
        for backbone in backbones:
            for row, _, transfer, variant in chosen:
                run = workdir / name / f"ft-{backbone}-row{row}-s{seed}"
                init = str(workdir / name / f"pretrain-{variant}-s{seed}") if variant else None
                cfg = RunConfig(
                    "finetune",
                    str(data),
                    ModelConfig(),
                    TrainConfig(seed=seed),
                    backbone=backbone,
                    transfer=transfer,
                    init_from=init,
                )
                metrics = metrics_of(run) or finetune(cfg, run)
                test = metrics["test"]
                key = f"{backbone}/{row}"
                results["auc"].setdefault(key, []).append(test["auc"])
                results["logloss"].setdefault(key, []).append(test["logloss"])
                results["speed"].setdefault(key, []).append(max(metrics["examples_per_s"]))
                print(
                    json.dumps(
                        {"dataset": name, "seed": seed, "backbone": backbone, "row": row, **test}
                    ),
                    flush=True,
                )
        for peer in peers:
            from benchmarks.peers import train_peer

            allowed = (peer_seeds or {}).get(f"{name}.{peer}", (peer_seeds or {}).get(name))
            if allowed is not None and seed not in allowed:
                continue
            path = workdir / name / f"peer-{peer}-s{seed}.json"
            if path.is_file():
                result = json.loads(path.read_text())
            else:
                result = train_peer(peer, data, seed)
                path.write_text(json.dumps(result))
            results["peers"].setdefault(peer, []).append(result)
            print(json.dumps({"dataset": name, "seed": seed, "peer": peer, **result["test"]}))
    return results


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def markdown(name: str, res: dict, backbones: list[str], seeds: list[int]) -> str:
    head = "| # | Model | " + " | ".join(f"{b} AUC | {b} LogLoss" for b in backbones) + " |"
    lines = [
        f"### {name} (test split, mean ± std over seeds {seeds})",
        "",
        head,
        "|---|---|" + "---|---|" * len(backbones),
    ]
    present = [r for r in ROWS if f"{backbones[0]}/{r[0]}" in res["auc"]]
    for row, label, _, _ in present:
        cells = [
            f"{_fmt(res['auc'][f'{b}/{row}'])} | {_fmt(res['logloss'][f'{b}/{row}'])}"
            for b in backbones
        ]
        lines.append(f"| {row} | {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| paper's claim | rows | "
        + " | ".join(f"{b} ΔAUC, paired per seed (seeds > 0)" for b in backbones)
        + " | holds on |",
        "|---|---|" + "---|" * len(backbones) + "---|",
    ]
    for claim, better, worse in CLAIMS:
        if (
            f"{backbones[0]}/{better}" not in res["auc"]
            or f"{backbones[0]}/{worse}" not in res["auc"]
        ):
            continue
        paired = [
            np.array(res["auc"][f"{b}/{better}"]) - np.array(res["auc"][f"{b}/{worse}"])
            for b in backbones
        ]
        holds = sum(d.mean() > 0 for d in paired)
        lines.append(
            f"| {claim} | {better} vs {worse} | "
            + " | ".join(
                f"{d.mean():+.4f} ± {d.std():.4f} ({(d > 0).sum()}/{len(d)})" for d in paired
            )
            + f" | {holds}/{len(paired)} |"
        )
    if res.get("peers"):
        lines += [
            "",
            "Peers on the same splits and features, and what GenCTR (row 5) does beside them "
            "(training examples/s: one process, best epoch's throughput for ours):",
            "",
            "| model | seeds | test AUC | LogLoss | epochs selected / run | training examples/s |",
            "|---|---|---|---|---|---|",
        ]
        for peer, runs in res["peers"].items():
            aucs = [r["test"]["auc"] for r in runs]
            lines.append(
                f"| {PEER_LABELS.get(peer, peer)} | {len(runs)} | {_fmt(aucs)} | "
                f"{_fmt([r['test']['logloss'] for r in runs])} | "
                f"{np.mean([r['epoch'] for r in runs]):.1f} / "
                f"{np.mean([r['epochs_run'] for r in runs]):.1f} | "
                f"{np.mean([r['examples_per_s'] for r in runs]):,.0f} |"
            )
        best_peer = max(np.mean([r["test"]["auc"] for r in v]) for v in res["peers"].values())
        for b in backbones:
            key = f"{b}/5"
            if key in res["auc"]:
                lines.append(
                    f"| GenCTR ({b}) | {len(res['auc'][key])} | {_fmt(res['auc'][key])} | "
                    f"{_fmt(res['logloss'][key])} | "
                    f"- | {np.mean(res['speed'][key]):,.0f} |"
                )
        lines.append("")
        lines.append(
            "GenCTR (row 5) minus the best peer, mean AUC: "
            + ", ".join(
                f"{b} {np.mean(res['auc'][f'{b}/5']) - best_peer:+.4f}"
                for b in backbones
                if f"{b}/5" in res["auc"]
            )
        )
    pre = res["pretrain"]
    lines += [
        "",
        "Pre-training, next-item HR@10 of the held-out last click (100 random / 100 "
        "same-category negatives):",
        "",
        "| variant | HR@10 random | HR@10 category |",
        "|---|---|---|",
    ]
    for variant, runs in pre.items():
        lines.append(
            f"| {variant} | {_fmt([r['hr@10_random'] for r in runs])} | "
            f"{_fmt([r['hr@10_category'] for r in runs])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["synth", "movielens"])
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--rows", type=int, nargs="+", default=[r[0] for r in ROWS])
    parser.add_argument("--peers", nargs="+", default=[], choices=["din", "dcnmix"])
    parser.add_argument(
        "--peer-seeds",
        nargs="+",
        default=[],
        metavar="DATASET[.PEER]=SEED[,SEED]",
        help="train the peers on fewer seeds, e.g. synth.din=0 (default: every seed)",
    )
    parser.add_argument("--workdir", default="runs/table1")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the committed results of the datasets not run now (one dataset per command)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir)
    all_results, sections, commands = {}, [], {}
    previous = RESULTS / "table1.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        for name, res in old["results"].items():
            if name not in args.datasets:
                all_results[name] = res
                commands[name] = old.get("commands", {}).get(name, old["machine"]["command"])
    for name in args.datasets:
        limits = dict(item.split("=", 1) for item in args.peer_seeds)
        peer_seeds = {key: [int(x) for x in value.split(",")] for key, value in limits.items()}
        all_results[name] = run_dataset(
            name, workdir, args.seeds, args.backbones, args.rows, args.peers, peer_seeds
        )
        commands[name] = machine()["command"]
    for name, res in all_results.items():
        backbones = list(dict.fromkeys(k.split("/")[0] for k in res["auc"]))
        seeds = sorted({len(v) for v in res["auc"].values()})
        section = markdown(name, res, backbones, list(range(max(seeds))))
        sections.append(f"{section}\n\n(command: `{commands[name]}`)")
    payload = {"results": all_results, "args": vars(args), "commands": commands}
    print(write_results("table1", payload, "\n\n".join(sections)))


if __name__ == "__main__":
    main()
