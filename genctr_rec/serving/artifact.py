"""``genctr export``: a fine-tuning run's sharded checkpoint -> one self-contained artifact.

An artifact is a directory::

    ARTIFACT/
      model.pt             TorchScript ServingModel (fp32 or int8 tables), loads without our code
      item_categories.npy  int64 [num_items]: the category of every item id
      item_features.npz    the declared item features of every item id (when there are any)
      id_maps.npz          raw id of every row, per raw id space (a dataset of raw ids only)
      artifact.json        version, stack, run config, vocab sizes, quantisation, parity figures
      manifest.json        size and SHA-256 of every file, checked when the artifact is loaded

It is written under a temporary name and renamed when complete. Export checks itself on the
run's test split before writing: the fp32 model must match the trained model within
``FP32_TOLERANCE`` and int8 must not lose more than ``INT8_MAX_AUC_DROP`` test AUC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genctr_rec import __version__
from genctr_rec.checkpoint import (
    MANIFEST,
    CheckpointError,
    load_model,
    verify_manifest,
    write_manifest,
)
from genctr_rec.compat import installed_stack
from genctr_rec.config import ConfigError, RunConfig, absolute_location
from genctr_rec.data.catalogue import ItemCatalogue, read_item_catalogue
from genctr_rec.data.features import FeatureSchema
from genctr_rec.data.id_maps import ID_MAPS_DIR, IdMap, IdMaps
from genctr_rec.data.reader import (
    HIST_CATEGORIES,
    HIST_ITEMS,
    QUERY_CATEGORY,
    TARGET_CATEGORY,
    TARGET_ITEM,
    ImpressionBatch,
    ImpressionReader,
)
from genctr_rec.data.schema import DatasetMeta
from genctr_rec.data.stream import Jagged
from genctr_rec.data.writer import atomic_directory, check_replaceable
from genctr_rec.factory import build_stage_model, feature_schema
from genctr_rec.metrics import ctr_metrics
from genctr_rec.models.ctr import CTRModel
from genctr_rec.models.jagged import to_padded
from genctr_rec.progress import Progress
from genctr_rec.serving import ArtifactError
from genctr_rec.serving.torchscript import build_serving_model
from genctr_rec.storage import (
    cache_dir,
    download_files,
    file_lock,
    is_remote,
    is_url,
    location,
    remove_tree,
    safe_relative,
    shared_permissions,
    upload_tree,
)

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "genctr-serving-artifact"
# 2: side features (user_id, declared features) in the model; 3: a default row per table,
# where unknown ids are scored (serving/model.py). Both are read.
ARTIFACT_VERSION = 3
READABLE_VERSIONS = (2, 3)
MODEL_FILE = "model.pt"
ITEM_CATEGORIES_FILE = "item_categories.npy"
ITEM_FEATURES_FILE = "item_features.npz"
ID_MAPS_FILE = "id_maps.npz"  # raw id -> row of each raw id space (data/id_maps.py)
META_FILE = "artifact.json"
FP32_TOLERANCE = 1e-5
INT8_MAX_AUC_DROP = 0.002


@dataclass
class RequestTensors:
    """A batch of requests as the ServingModel takes them (see ``serving/model.py``)."""

    hist_items: torch.Tensor
    hist_cats: torch.Tensor
    hist_lengths: torch.Tensor
    query_cats: torch.Tensor
    cand_items: torch.Tensor
    cand_cats: torch.Tensor
    cand_rows: torch.Tensor
    side_values: torch.Tensor  # per candidate, key-major: user_id, then declared sparse features
    side_lengths: torch.Tensor  # [num_keys * N]
    dense: torch.Tensor  # [N, num_dense]

    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.hist_items,
            self.hist_cats,
            self.hist_lengths,
            self.query_cats,
            self.cand_items,
            self.cand_cats,
            self.cand_rows,
            self.side_values,
            self.side_lengths,
            self.dense,
        )


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
    served: torch.jit.ScriptModule,
    data: str | Path,
    max_history: int,
    split: str = "test",
    batch_size: int = 2048,
    features: FeatureSchema | None = None,
) -> dict[str, Any]:
    """Both models' probabilities on every impression of ``split``: largest difference and
    each model's AUC / GAUC / LogLoss."""
    reader = ImpressionReader(
        data, split, batch_size, shuffle=False, max_history=max_history, features=features
    )
    ours, theirs, labels, users = [], [], [], []
    with Progress(f"export check on {split}", len(reader), "batch") as progress:
        for batch in reader:
            theirs.append(torch.sigmoid(trained(*batch.model_inputs())).double().numpy())
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
) -> dict[str, Any]:
    """Export ``run`` to ``out``; returns the artifact's metadata (with the parity figures).

    Raises :class:`ArtifactError` (writing nothing) when the exported model disagrees with the
    trained one beyond the tolerances above.
    """
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
    served, sizes = build_serving_model(trained, quantize, schema)
    parity = compare_on_split(trained, served, data, cfg.max_history, features=schema)
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
    if quantize == "int8" and auc_change is None:
        logger.warning(
            "int8 export: the test AUC is undefined on %s/test (one label class), so the AUC "
            "check did not run; max |p - p_trained| = %.3g",
            data,
            parity["max_abs_diff"],
        )
    elif quantize == "int8" and -auc_change > INT8_MAX_AUC_DROP:
        raise ArtifactError(
            f"int8 tables lose {-auc_change:.4f} test AUC on {data}/test (limit "
            f"{INT8_MAX_AUC_DROP}); export fp32 instead; nothing written"
        )
    metadata = {
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
        "parity": parity,
        "export_seconds": round(time.time() - started, 2),
    }
    catalogue = read_item_catalogue(data, meta, list(schema.of("item")) if schema else [])
    maps = IdMaps.read(location(run) / ID_MAPS_DIR) if cfg.raw_ids else None
    metadata["raw_ids"] = cfg.raw_ids
    write_artifact(out, served, catalogue, metadata, overwrite, maps)
    metadata["artifact_sha256"] = artifact_digest(out)
    return metadata


def _catalogue_arrays(catalogue: ItemCatalogue) -> dict[str, np.ndarray]:
    arrays = dict(catalogue.scalars)
    for name, jag in catalogue.lists.items():
        jag = jag.compact()
        arrays.update({f"{name}.values": jag.values, f"{name}.lengths": jag.lengths})
    return arrays


def _catalogue_from(categories: np.ndarray, arrays: dict[str, np.ndarray]) -> ItemCatalogue:
    catalogue = ItemCatalogue(categories)
    for key, value in arrays.items():
        name, _, part = key.partition(".")
        if not part:
            catalogue.scalars[name] = value
        elif part == "lengths":
            starts = np.concatenate([[0], np.cumsum(value)[:-1]]).astype(np.int64)
            catalogue.lists[name] = Jagged(arrays[f"{name}.values"], starts, value)
    return catalogue


def write_artifact(
    out: str | Path,
    served: torch.jit.ScriptModule,
    catalogue: ItemCatalogue,
    metadata: dict[str, Any],
    overwrite: bool = False,
    id_maps: IdMaps | None = None,
) -> None:
    """Write the artifact's files under a temporary name with their manifest, then rename. On
    object storage: written locally, then uploaded with the manifest last (a reader requires
    it); an artifact replaced there loses its manifest first, so it is never half old, half
    new."""
    metadata = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, **metadata}
    target = location(out)
    if is_remote(target):
        check_replaceable(target, overwrite, META_FILE)
        with tempfile.TemporaryDirectory(prefix="genctr-artifact-") as local:
            _write_files(Path(local), served, catalogue, metadata, id_maps)
            (target / MANIFEST).unlink(missing_ok=True)
            remove_tree(target)
            upload_tree(Path(local), target, last=MANIFEST)
    else:
        with atomic_directory(out, overwrite=overwrite, marker=META_FILE) as tmp:
            _write_files(tmp, served, catalogue, metadata, id_maps)
    logger.info("wrote %s", out)


def _write_files(
    directory: Path,
    served: torch.jit.ScriptModule,
    catalogue: ItemCatalogue,
    metadata: dict[str, Any],
    id_maps: IdMaps | None = None,
) -> None:
    torch.jit.save(served, str(directory / MODEL_FILE))
    np.save(directory / ITEM_CATEGORIES_FILE, np.asarray(catalogue.categories, dtype=np.int64))
    np.savez(directory / ITEM_FEATURES_FILE, **_catalogue_arrays(catalogue))
    if id_maps is not None:
        np.savez(directory / ID_MAPS_FILE, **{s: m.raw for s, m in id_maps.maps.items()})
    (directory / META_FILE).write_text(json.dumps(metadata, indent=1, sort_keys=True))
    write_manifest(directory)


def fetch_artifact(url: str) -> Path:
    """A verified local copy of the artifact at ``url`` (object storage), downloaded once into
    the cache (``GENCTR_CACHE``/artifacts) per (endpoint, URL, manifest): a serving fleet pulls
    a version once per host, a replaced artifact lands in a new folder, and a folder a running
    server reads is never deleted or rewritten. Only the files the manifest names are fetched,
    each under a name checked to stay inside the folder; servers sharing the cache take a
    per-folder lock, so two of them never write one folder."""
    source = location(url)
    manifest = source / MANIFEST
    if not manifest.is_file():
        raise ArtifactError(
            f"{url} is not a complete artifact (no {MANIFEST}: missing, or an upload that did "
            "not finish)"
        )
    expected = manifest.read_bytes()
    names = _manifest_names(url, expected)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    key = hashlib.sha256(b"\0".join([endpoint.encode(), url.encode(), expected])).hexdigest()[:24]
    root = cache_dir() / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    cached = root / key
    with file_lock(root / f".{key}.lock"):
        if (cached / MANIFEST).is_file() and (cached / MANIFEST).read_bytes() == expected:
            logger.info("%s: using the cached copy %s", url, cached)
            return cached
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            download_files(source, names, staging)
            (staging / MANIFEST).write_bytes(expected)
            shared_permissions(staging)
            if cached.exists():  # a copy that lost its manifest (a disk error): set aside
                os.replace(cached, root / f".{key}.broken-{os.getpid()}")
            os.replace(staging, cached)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s: downloaded to %s", url, cached)
    return cached


def _manifest_names(url: str, manifest: bytes) -> list[str]:
    """The file names a manifest lists, each a plain relative name (no ``..``, no absolute
    path): a hostile bucket cannot make the download write elsewhere."""
    try:
        names = list(json.loads(manifest)["files"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{url}: unreadable {MANIFEST} ({exc})") from exc
    for name in names:
        try:
            safe_relative(name)
        except ValueError as exc:
            raise ArtifactError(
                f"{url}: {MANIFEST} names a file outside the artifact: {exc}"
            ) from exc
    return names


@dataclass
class Artifact:
    """A loaded, verified artifact."""

    path: Path
    model: torch.jit.ScriptModule
    item_categories: np.ndarray
    metadata: dict[str, Any]
    catalogue: ItemCatalogue | None = None
    id_maps: IdMaps | None = None  # an artifact of raw ids: raw id -> row per space

    @property
    def features(self) -> FeatureSchema | None:
        """The side features the model reads (None: an artifact without them)."""
        raw = self.metadata.get("features")
        return FeatureSchema.from_json(raw) if raw else None


def artifact_digest(path: str | Path) -> str:
    """The SHA-256 of an artifact's manifest, which holds every file's SHA-256: one digest
    that names the artifact's exact contents (``genctr serve --artifact-sha256``)."""
    return hashlib.sha256((location(path) / MANIFEST).read_bytes()).hexdigest()


def load_artifact(path: str | Path, expected_sha256: str | None = None) -> Artifact:
    """Load ``path`` (a directory, or a URL fetched into the local cache) after checking every
    file against its manifest, and with ``expected_sha256`` the manifest against that digest
    (an artifact pinned by digest: a replaced or altered one is refused)."""
    path = fetch_artifact(str(path)) if is_url(path) else Path(path)
    if not (path / META_FILE).is_file():
        raise ArtifactError(f"{path} is not a genctr serving artifact (no {META_FILE})")
    if expected_sha256 is not None and (path / MANIFEST).is_file():
        digest = artifact_digest(path)
        if digest != expected_sha256.strip().lower():
            raise ArtifactError(
                f"{path}: its manifest's SHA-256 is {digest}, not the pinned {expected_sha256}: "
                "refusing an artifact other than the one pinned"
            )
    try:
        verify_manifest(path)
    except CheckpointError as exc:
        raise ArtifactError(f"damaged artifact: {exc}") from exc
    metadata = json.loads((path / META_FILE).read_text())
    if (
        metadata.get("format") != ARTIFACT_FORMAT
        or metadata.get("format_version") not in READABLE_VERSIONS
    ):
        raise ArtifactError(
            f"{path}: format {metadata.get('format')} v{metadata.get('format_version')}, this "
            f"genctr-rec reads {ARTIFACT_FORMAT} v{READABLE_VERSIONS}"
        )
    model = torch.jit.load(str(path / MODEL_FILE), map_location="cpu").eval()
    categories = np.load(path / ITEM_CATEGORIES_FILE)
    with np.load(path / ITEM_FEATURES_FILE) as arrays:
        catalogue = _catalogue_from(categories, dict(arrays))
    id_maps = None
    if (path / ID_MAPS_FILE).is_file():
        with np.load(path / ID_MAPS_FILE) as arrays:
            id_maps = IdMaps({space: IdMap(arrays[space]) for space in arrays.files})
    return Artifact(path, model, categories, metadata, catalogue, id_maps)
