"""Which defaults make the GenCTR transfer help: each lever of the fine-tuning method measured
against the backbone alone and parameter sharing, same data, same seeds, same run.

    python -m benchmarks.transfer_levers [--datasets movielens synth] [--seeds 0 1 2]

Per seed: one pre-training (the defaults: CS negatives, conditional decoder, validation-selected
length), then DNN fine-tuning runs that differ in one lever each:

* ``before``: the 0.2 defaults (no user or side features, one epoch, no validation, g
  concatenated before the final layer);
* ``none`` / ``ps``: the backbone alone / parameter sharing, with today's defaults;
* ``mi_concat``: PS + MI, g concatenated before the final layer with default initialisation;
* ``mi_residual``: g's weights in the final layer start at zero;
* ``mi_product``: residual, plus g * e(target item) (the pre-training score) — the default;
* ``mi_product_declr``: the inherited decoder at Adam 1e-4 instead of 1e-3;
* ``mi_product_drop``: dropout 0.2 on g.

Runs already finished under --workdir are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from benchmarks.common import write_results
from benchmarks.table1 import metrics_of, prepare
from genctr_rec.config import ModelConfig, RunConfig, TrainConfig

VARIANTS: dict[str, tuple[str, dict, dict]] = {  # name -> (transfer, model, train overrides)
    "before": (
        "ps_mi",
        {"side_features": False, "context_fusion": "concat"},
        {"epochs": 1, "valid_fraction": 0.0},
    ),
    "none": ("none", {}, {}),
    "ps": ("ps", {}, {}),
    "mi_concat": ("ps_mi", {"context_fusion": "concat"}, {}),
    "mi_residual": ("ps_mi", {"context_fusion": "residual"}, {}),
    "mi_product": ("ps_mi", {"context_fusion": "product"}, {}),
    "mi_product_declr": ("ps_mi", {"context_fusion": "product"}, {"decoder_lr": 1e-4}),
    "mi_product_drop": ("ps_mi", {"context_fusion": "product", "context_dropout": 0.2}, {}),
}


def run_dataset(name: str, workdir: Path, seeds: list[int], backbone: str) -> dict:
    from genctr_rec.training.finetune import finetune
    from genctr_rec.training.pretrain import pretrain

    data = prepare(name, workdir)
    results: dict = {"auc": {}, "logloss": {}, "epochs": {}, "pretrain": []}
    for seed in seeds:
        pre = workdir / name / f"pretrain-s{seed}"
        cfg = RunConfig("pretrain", str(data), ModelConfig(), TrainConfig(seed=seed))
        m = metrics_of(pre) or pretrain(cfg, pre)
        results["pretrain"].append({k: v for k, v in m.items() if "@" in k})
        for variant, (transfer, model, train) in VARIANTS.items():
            run = workdir / name / f"ft-{backbone}-{variant}-s{seed}"
            cfg = RunConfig(
                "finetune",
                str(data),
                ModelConfig(**model),
                TrainConfig(seed=seed, **train),
                backbone=backbone,
                transfer=transfer,
                init_from=str(pre),
            )
            metrics = metrics_of(run) or finetune(cfg, run)
            test = metrics["test"]
            results["auc"].setdefault(variant, []).append(test["auc"])
            results["logloss"].setdefault(variant, []).append(test["logloss"])
            selected = metrics.get("selected") or {}
            results["epochs"].setdefault(variant, []).append(selected.get("epoch", 0) + 1)
            print(json.dumps({"dataset": name, "seed": seed, "variant": variant, **test}))
    return results


def markdown(name: str, res: dict, seeds: list[int], backbone: str) -> str:
    base = np.array(res["auc"]["none"])
    lines = [
        f"### {name}, {backbone} (test split, mean ± std over seeds {seeds})",
        "",
        "| variant | test AUC | Δ vs backbone alone (per seed, mean ± std) | LogLoss | "
        "selected epoch |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        auc = np.array(res["auc"][variant])
        delta = auc - base
        lines.append(
            f"| {variant} | {auc.mean():.4f} ± {auc.std():.4f} | {delta.mean():+.4f} ± "
            f"{delta.std():.4f} | {np.mean(res['logloss'][variant]):.4f} | "
            f"{np.mean(res['epochs'][variant]):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["movielens", "synth"])
    parser.add_argument("--backbone", default="dnn")
    parser.add_argument("--workdir", default="runs/transfer_levers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir)
    results, sections = {}, []
    for name in args.datasets:
        results[name] = run_dataset(name, workdir, args.seeds, args.backbone)
        sections.append(markdown(name, results[name], args.seeds, args.backbone))
    print(
        write_results(
            "transfer_levers", {"results": results, "args": vars(args)}, "\n\n".join(sections)
        )
    )


if __name__ == "__main__":
    main()
