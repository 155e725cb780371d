"""``genctr pipeline``: data -> pretrain -> finetune (baseline and GenCTR) -> evaluate -> export.

Each stage writes its output atomically and is skipped when that output already exists, so a
second run (or a run after a crash) picks up where the last one stopped. Ends with a small
table: the backbone alone against GenCTR (PS + MI, CS negatives, conditional decoder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
from genctr_rec.data.schema import META_FILE, DatasetMeta
from genctr_rec.data.synth import SynthConfig, generate
from genctr_rec.data.validate import validate_dataset
from genctr_rec.storage import write_json

logger = logging.getLogger(__name__)

METRICS = ("auc", "gauc", "logloss", "calibration")  # the summary table's columns


def prepare_data(workdir: Path, preset: str) -> Path:
    data = workdir / f"data-{preset}"
    if (data / META_FILE).is_file():
        logger.info("reusing dataset %s", data)
    else:
        logger.info("simulating the %s dataset into %s", preset, data)
        generate(SynthConfig.preset(preset), data)
    report = validate_dataset(data)
    logger.info(
        "dataset valid: %s",
        json.dumps({k: report[k]["rows"] for k in ("train", "test", "sequences")}),
    )
    return data


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _figure(value: float | None, spec: str) -> str:
    """A figure for the summary table; undefined ones (None: metrics.ctr_metrics) as n/a."""
    return "n/a" if value is None else format(value, spec)


def _done(run: Path) -> dict[str, Any] | None:
    path = run / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_pipeline(
    workdir: str | Path, preset: str = "default", seed: int = 0, backbone: str = "dnn"
) -> dict[str, Any]:
    import torch.distributed as dist

    from genctr_rec.distributed import init_distributed
    from genctr_rec.training.finetune import finetune
    from genctr_rec.training.pretrain import pretrain

    workdir = Path(workdir)
    ctx = init_distributed()
    data = workdir / f"data-{preset}"
    if ctx.is_main:  # one rank writes the data, the others wait for it
        prepare_data(workdir, preset)
    dist.barrier()
    pre_dir = workdir / f"pretrain-s{seed}"
    pre = _done(pre_dir) or pretrain(
        RunConfig("pretrain", str(data), ModelConfig(), TrainConfig(seed=seed)), pre_dir
    )
    results = {}
    for name, transfer in (("backbone", "none"), ("genctr", "ps_mi")):
        run = workdir / f"finetune-{backbone}-{transfer}-s{seed}"
        cfg = RunConfig(
            "finetune",
            str(data),
            ModelConfig(),
            TrainConfig(seed=seed),
            backbone=backbone,
            transfer=transfer,
            init_from=str(pre_dir),
        )
        results[name] = (_done(run) or finetune(cfg, run))["test"]
    summary = {
        "data": str(data),
        "pretrain": {k: v for k, v in pre.items() if "@" in k},
        "backbone": backbone,
        "results": results,
        "auc_gain": _difference(results["genctr"]["auc"], results["backbone"]["auc"]),
    }
    if not ctx.is_main:
        return summary
    summary["export"] = export_for_serving(workdir / f"finetune-{backbone}-ps_mi-s{seed}", workdir)
    write_json(workdir / "summary.json", summary)
    rows = [
        f"| model ({backbone}, seed {seed}) | test AUC | GAUC | LogLoss | calibration |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("backbone", "backbone alone"), ("genctr", "GenCTR (PS+MI, CS+CD)")):
        r = results[name]
        cells = [_figure(r[key], ".4f") for key in METRICS]
        rows.append(f"| {label} | {' | '.join(cells)} |")
    oracle = DatasetMeta.read(data).extra.get("oracle_test")
    if oracle:  # what a model could reach at best: a simulated world knows its click rates
        cells = [_figure(oracle["without_position"][key], ".4f") for key in METRICS]
        rows.append(f"| ceiling: true click rates (position unread) | {' | '.join(cells)} |")
    print("\n".join(rows))
    print(
        f"pre-training next-item HR@10 (100 random negatives): "
        f"{pre['hr@10_random']:.3f}; AUC gain: {_figure(summary['auc_gain'], '+.4f')}"
    )
    for quantize, e in summary["export"].items():
        print(
            f"export {quantize}: {e['artifact']} | "
            f"test AUC change {_figure(e['auc_change'], '+.6f')} | "
            f"max |p - p_trained| {e['max_abs_diff']:.2e} | tables {e['table_shrink']:.2f}x "
            f"smaller | sample request scores {e['sample_scores']}"
        )
    print(f"serve it: genctr serve --artifact {summary['export']['int8']['artifact']} --port 8080")
    return summary


def sample_request(data: Path) -> Any:
    """The first test impression of ``data`` as a scoring request with three candidates (its
    ad and the next two item ids), with the user and the declared impression features."""
    import pyarrow.parquet as pq

    from genctr_rec.data.schema import DatasetMeta, split_files
    from genctr_rec.serving.predictor import Request

    meta = DatasetMeta.read(data)
    row = pq.read_table(split_files(data, "test")[0]).slice(0, 1).to_pylist()[0]
    item = row["item_id"]
    return Request(
        history_items=row["hist_item_ids"],
        history_categories=row["hist_category_ids"],
        query_category=row["query_category_id"],
        candidate_items=[item, (item + 1) % meta.num_items, (item + 2) % meta.num_items],
        user_id=row["user_id"],
        features={f.name: row[f.name] for f in meta.features if f.where == "impression"},
    )


def export_for_serving(run: Path, workdir: Path) -> dict[str, Any]:
    """Export the GenCTR run fp32 and int8 (reused when present) and score one request each."""
    from genctr_rec.serving.artifact import load_artifact
    from genctr_rec.serving.export import export_run
    from genctr_rec.serving.predictor import Predictor

    out = {}
    for quantize in ("none", "int8"):
        path = workdir / f"artifact-genctr-{quantize}"
        if (path / "artifact.json").is_file():
            logger.info("reusing artifact %s", path)
        else:
            logger.info("exporting %s (%s tables) to %s", run, quantize, path)
            export_run(run, path, quantize)
        artifact = load_artifact(path)
        parity = artifact.metadata["parity"]
        scores = Predictor(artifact).score(sample_request(Path(artifact.metadata["data"])))
        out["fp32" if quantize == "none" else quantize] = {
            "artifact": str(path),
            "auc_change": parity["auc_change"],
            "max_abs_diff": parity["max_abs_diff"],
            "table_shrink": parity["table_shrink"],
            "sample_scores": [round(float(x), 4) for x in scores],
        }
    return out
