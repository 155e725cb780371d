"""``genctr export``: a fine-tuning run's sharded checkpoint -> one self-contained artifact.

The run's checkpoint is read in one process (whatever world size or plan wrote it), the model
rebuilt from plain tensor ops (``serving/model.py``: fp32 tables, or int8 / int4 rows), its
entry points captured with ``torch.export`` and compiled by AOTInductor for this machine
(``serving/exported.py``), and the compiled artifact checked on the run's test split before
anything is written: the fp32 model must match the trained one within ``FP32_TOLERANCE``, a
quantised one must not lose more than ``MAX_AUC_DROP`` test AUC. ``--format torchscript``
writes the legacy TorchScript artifact instead (deprecated, for comparisons).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genctr_rec import __version__
from genctr_rec.calibration import Calibration
from genctr_rec.checkpoint import load_model
from genctr_rec.compat import installed_stack
from genctr_rec.config import ConfigError, RunConfig, absolute_location
from genctr_rec.data.catalogue import read_item_catalogue
from genctr_rec.data.features import FeatureSchema
from genctr_rec.data.id_maps import ID_MAPS_DIR, IdMaps
from genctr_rec.data.keys import (
    HIST_CATEGORIES,
    HIST_ITEMS,
    QUERY_CATEGORY,
    TARGET_CATEGORY,
    TARGET_ITEM,
)
from genctr_rec.data.reader import ImpressionBatch, ImpressionReader
from genctr_rec.data.schema import DatasetMeta
from genctr_rec.factory import build_stage_model, feature_schema
from genctr_rec.metrics import ctr_metrics
from genctr_rec.models.ctr import CTRModel
from genctr_rec.models.jagged import to_padded
from genctr_rec.progress import Progress
from genctr_rec.serving import ArtifactError
from genctr_rec.serving.artifact import (
    LEGACY_MODEL_FILE,
    META_FILE,
    artifact_digest,
    load_artifact,
    write_artifact,
)
from genctr_rec.serving.exported import (
    PACKAGE_FILE,
    CompiledModel,
    export_programs,
    load_package,
    write_package,
)
from genctr_rec.serving.model import build_serving_model
from genctr_rec.serving.requests import RequestTensors
from genctr_rec.storage import check_replaceable, location

logger = logging.getLogger(__name__)
FP32_TOLERANCE = 1e-5
MAX_AUC_DROP = 0.002  # a quantised artifact may lose at most this much test AUC
FORMATS = ("export", "torchscript")
COMPILE_CHOICES = ("aoti", "none")


def impressions_as_requests(batch: ImpressionBatch) -> RequestTensors:
    """An impression batch as one request per impression with one candidate each."""
    features = batch.sparse_features
    items_jt = features[HIST_ITEMS]
    lengths = items_jt.lengths().long()
    pad = int(lengths.max()) if len(lengths) else 0
    b = len(lengths)
    side = batch.side_features
    return RequestTensors(
        to_padded(items_jt.values(), lengths, pad),
        to_padded(features[HIST_CATEGORIES].values(), lengths, pad),
        lengths,
        features[QUERY_CATEGORY].values(),
        features[TARGET_ITEM].values(),
        features[TARGET_CATEGORY].values(),
        torch.arange(b),
        side.values() if side is not None else torch.zeros(0, dtype=torch.long),
        side.lengths() if side is not None else torch.zeros(0, dtype=torch.int32),
        batch.dense_features if batch.dense_features is not None else torch.zeros(b, 0),
    )


def load_trained(run: str | Path) -> tuple[RunConfig, CTRModel]:
    """A fine-tuning run's model, unsharded in this process, from a checkpoint written by any
    world size or sharding plan (DCP reshards on load)."""
    run = location(run)
    cfg = RunConfig.load(run)
    if cfg.stage != "finetune":
        raise ConfigError(f"{run} is a {cfg.stage} run; export takes a finetune run")
    model = build_stage_model(cfg, torch.device("cpu"), dedup=False)
    load_model(model, run / "checkpoint", no_dist=True)
    return cfg, model.eval()


@torch.no_grad()
def compare_on_split(
    trained: CTRModel,
    served: CompiledModel,
    data: str | Path,
    max_history: int,
    split: str = "test",
    batch_size: int = 2048,
    features: FeatureSchema | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Both models' probabilities on every impression of ``split`` (the trained model's
    through the run's ``calibration``, which the served one holds): largest difference and
    each model's AUC / GAUC / LogLoss."""
    calibration = calibration or Calibration()
    reader = ImpressionReader(
        data, split, batch_size, shuffle=False, max_history=max_history, features=features
    )
    ours, theirs, labels, users = [], [], [], []
    with Progress(f"export check on {split}", len(reader), "batch") as progress:
        for batch in reader:
            logits = trained(*batch.model_inputs()).double()
            theirs.append(calibration.probabilities(logits).numpy())
            ours.append(served(*impressions_as_requests(batch).args()).double().numpy())
            labels.append(batch.labels.numpy())
            users.append(batch.user_ids.numpy())
            progress.update(1, batch.batch_size)
    ours_a, theirs_a = np.concatenate(ours), np.concatenate(theirs)
    labels_a, users_a = np.concatenate(labels), np.concatenate(users)
    return {
        "split": split,
        "rows": int(len(labels_a)),
        "max_abs_diff": float(np.abs(ours_a - theirs_a).max()),
        "trained": ctr_metrics(theirs_a, labels_a, users_a),
        "exported": ctr_metrics(ours_a, labels_a, users_a),
    }


def export_run(
    run: str | Path,
    out: str | Path,
    quantize: str = "none",
    data: str | Path | None = None,
    overwrite: bool = False,
    fmt: str = "export",
    compile_aoti: str = "aoti",
) -> dict[str, Any]:
    """Export ``run`` to ``out``; returns the artifact's metadata (with the parity figures).

    ``fmt``: ``export`` (torch.export programs, AOTInductor-compiled unless ``compile_aoti`` is
    ``none``) or ``torchscript`` (legacy, deprecated). Raises :class:`ArtifactError` (writing
    nothing) when the compiled model disagrees with the trained one beyond the tolerances.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if compile_aoti not in COMPILE_CHOICES:
        raise ConfigError(f"--compile must be one of {COMPILE_CHOICES}, got {compile_aoti!r}")
    started = time.time()
    check_replaceable(out, overwrite, META_FILE)  # before 10 s of work, not after
    cfg, trained = load_trained(run)
    data = location(cfg.dataset_for(data))
    if not data.is_dir():
        raise ConfigError(
            f"the run's dataset {data} is not here; pass --data DIR (its items.parquet gives "
            "the item categories and its test split the parity check)"
        )
    meta = DatasetMeta.read(data)
    if (meta.num_items, meta.num_categories) != (cfg.num_items, cfg.num_categories):
        raise ConfigError(
            f"{data} has {meta.num_items} items / {meta.num_categories} categories, the run was "
            f"trained on {cfg.num_items} / {cfg.num_categories}"
        )
    schema = feature_schema(cfg)
    calibration = Calibration.of_run(run)
    metadata: dict[str, Any] = {
        "genctr_rec": __version__,
        "stack": installed_stack(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": absolute_location(run),
        "data": absolute_location(data),
        "config": cfg.to_json(),
        "num_items": cfg.num_items,
        "num_categories": cfg.num_categories,
        "features": schema.to_json() if schema is not None else None,
        "max_history": cfg.max_history,
        "dim": cfg.model.dim,
        "backbone": cfg.backbone,
        "model_integration": trained.decoder is not None,
        "default_rows": True,  # row num_items / num_categories / vocab_size: unknown ids
        "quantize": quantize,
        "raw_ids": cfg.raw_ids,
        "calibration": calibration.to_json(),  # applied inside the model
    }
    with tempfile.TemporaryDirectory(prefix="genctr-export-") as staging:
        model_file, compiled, sizes = _compile(
            trained, quantize, schema, data, cfg.max_history, metadata, Path(staging), fmt,
            compile_aoti, calibration,
        )  # fmt: skip
        parity = compare_on_split(
            trained, compiled, data, cfg.max_history, features=schema, calibration=calibration
        )
        _check_parity(parity, sizes, quantize, data)
        metadata["parity"] = parity
        metadata["export_seconds"] = round(time.time() - started, 2)
        catalogue = read_item_catalogue(data, meta, list(schema.of("item")) if schema else [])
        maps = IdMaps.read(location(run) / ID_MAPS_DIR) if cfg.raw_ids else None
        write_artifact(out, model_file, catalogue, metadata, overwrite, maps)
    metadata["artifact_sha256"] = artifact_digest(out)
    return metadata


def _compile(
    trained: CTRModel,
    quantize: str,
    schema: FeatureSchema | None,
    data: Path,
    max_history: int,
    metadata: dict[str, Any],
    staging: Path,
    fmt: str,
    compile_aoti: str,
    calibration: Calibration,
) -> tuple[Path, CompiledModel, dict[str, int]]:
    """The model file of the artifact, written into ``staging``, and the model loaded back
    from it (what the parity check runs: the artifact as it will be served)."""
    scale_bias = (calibration.scale, calibration.bias)
    if fmt == "torchscript":
        from genctr_rec.serving.torchscript import build_serving_model as script
        from genctr_rec.serving.torchscript import compiled_model, save

        served, sizes = script(trained, quantize, schema, scale_bias)
        metadata["model"] = {"format": "torchscript", "file": LEGACY_MODEL_FILE}
        return save(served, staging / LEGACY_MODEL_FILE), compiled_model(served), sizes
    serving, sizes = build_serving_model(trained, quantize, schema, scale_bias)
    reader = ImpressionReader(
        data, "test", 64, shuffle=False, max_history=max_history, features=schema
    )
    example = impressions_as_requests(next(iter(reader))).args()
    programs = export_programs(serving, example, max_history)
    path = staging / PACKAGE_FILE
    metadata["model"] = {
        "format": "torch.export",
        **write_package(path, programs, compile_aoti == "aoti"),
    }
    return path, load_package(path, metadata), sizes


def _check_parity(parity: dict[str, Any], sizes: dict[str, int], quantize: str, data: Path) -> None:
    aucs = (parity["exported"]["auc"], parity["trained"]["auc"])
    # None: the test split has one label class, AUC is undefined (metrics.ctr_metrics)
    auc_change = None if None in aucs else aucs[0] - aucs[1]
    parity["auc_change"] = auc_change
    parity["table_bytes"] = sizes
    parity["table_shrink"] = sizes["fp32"] / sizes["served"]
    if quantize == "none" and parity["max_abs_diff"] > FP32_TOLERANCE:
        raise ArtifactError(
            f"exported fp32 model differs from the trained one by {parity['max_abs_diff']:.3g} "
            f"on {data}/test (tolerance {FP32_TOLERANCE}); nothing written"
        )
    if quantize != "none" and auc_change is None:
        logger.warning(
            "%s export: the test AUC is undefined on %s/test (one label class), so the AUC "
            "check did not run; max |p - p_trained| = %.3g",
            quantize,
            data,
            parity["max_abs_diff"],
        )
    elif quantize != "none" and -auc_change > MAX_AUC_DROP:
        raise ArtifactError(
            f"{quantize} tables lose {-auc_change:.4f} test AUC on {data}/test (limit "
            f"{MAX_AUC_DROP}); export with fewer bits; nothing written"
        )


def recompile_artifact(source: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """``source``'s exported programs compiled again by AOTInductor on this machine (another
    CPU than the one that exported it), written as a new artifact at ``out``; everything else
    is copied as it is. Returns the new artifact's metadata."""
    from torch.export.pt2_archive._package import load_pt2

    artifact = load_artifact(source, compiled="none")
    metadata = {k: v for k, v in artifact.metadata.items() if k not in ("format", "format_version")}
    if metadata.get("model", {}).get("format") != "torch.export":
        raise ArtifactError(f"{source} holds no exported programs (a TorchScript artifact)")
    check_replaceable(out, overwrite, META_FILE)
    with tempfile.TemporaryDirectory(prefix="genctr-recompile-") as staging:
        programs = load_pt2(artifact.path / PACKAGE_FILE).exported_programs
        path = Path(staging) / PACKAGE_FILE
        metadata["model"] = {"format": "torch.export", **write_package(path, programs, True)}
        metadata["recompiled_from"] = str(source)
        maps = artifact.id_maps
        catalogue = artifact.catalogue
        write_artifact(out, path, catalogue, metadata, overwrite, maps)
    metadata["artifact_sha256"] = artifact_digest(out)
    return metadata
