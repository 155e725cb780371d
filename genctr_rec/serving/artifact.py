"""A serving artifact on disk: its files, how it is written, fetched and loaded.

An artifact is a directory::

    ARTIFACT/
      model.pt2            torch.export programs of the model's entry points and their
                           AOTInductor compilation (serving/exported.py); a 0.10 artifact
                           has model.pt (TorchScript) instead, still read with a warning
      item_categories.npy  int64 [num_items]: the category of every item id
      item_features.npz    the declared item features of every item id (when there are any)
      id_maps.npz          raw id of every row, per raw id space (a dataset of raw ids only)
      artifact.json        version, stack, run config, vocab sizes, quantisation, the model
                           file's format, parity figures
      manifest.json        size and SHA-256 of every file, checked when the artifact is loaded

It is written under a temporary name and renamed when complete (object storage: uploaded with
the manifest last); ``genctr export`` (``serving/export.py``) writes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genctr_rec.checkpoint import (
    MANIFEST,
    CheckpointError,
    verify_manifest,
    write_manifest,
)
from genctr_rec.compat import check_stack
from genctr_rec.data.catalogue import ItemCatalogue
from genctr_rec.data.features import FeatureSchema
from genctr_rec.data.id_maps import IdMap, IdMaps
from genctr_rec.data.stream import Jagged
from genctr_rec.serving import ArtifactError
from genctr_rec.serving.exported import CompiledModel, load_package
from genctr_rec.storage import (
    cache_dir,
    download_files,
    file_lock,
    is_url,
    location,
    publish,
    replace_dir,
    safe_relative,
    shared_permissions,
)

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "genctr-serving-artifact"
# 2: side features (user_id, declared features) in the model; 3: a default row per table,
# where unknown ids are scored; 4: the model as torch.export programs compiled by AOTInductor
# (model.pt2) instead of TorchScript (model.pt, or with --format torchscript). All are read.
ARTIFACT_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
LEGACY_MODEL_FILE = "model.pt"  # TorchScript (format 2 and 3, --format torchscript)
ITEM_CATEGORIES_FILE = "item_categories.npy"
ITEM_FEATURES_FILE = "item_features.npz"
ID_MAPS_FILE = "id_maps.npz"  # raw id -> row of each raw id space (data/id_maps.py)
META_FILE = "artifact.json"


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
    model_file: Path,
    catalogue: ItemCatalogue,
    metadata: dict[str, Any],
    overwrite: bool = False,
    id_maps: IdMaps | None = None,
) -> None:
    """Write the artifact's files (``model_file`` copied in under its name) with their
    manifest, published whole (``storage.publish``: renamed into place, or on object storage
    uploaded with the manifest last)."""
    metadata = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, **metadata}
    with publish(out, overwrite, marker=META_FILE, last=MANIFEST) as tmp:
        _write_files(tmp, model_file, catalogue, metadata, id_maps)
    logger.info("wrote %s", out)


def _write_files(
    directory: Path,
    model_file: Path,
    catalogue: ItemCatalogue,
    metadata: dict[str, Any],
    id_maps: IdMaps | None = None,
) -> None:
    shutil.copyfile(model_file, directory / model_file.name)
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
            replace_dir(staging, cached)  # a copy there lost its manifest (a disk error)
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
    model: CompiledModel
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


def load_artifact(
    path: str | Path, expected_sha256: str | None = None, compiled: str = "auto"
) -> Artifact:
    """Load ``path`` (a directory, or a URL fetched into the local cache) after checking every
    file against its manifest, and with ``expected_sha256`` the manifest against that digest
    (an artifact pinned by digest: a replaced or altered one is refused). ``compiled``: run
    the AOTInductor compilation (``auto``: when it was built for this CPU, ``aoti``: or fail)
    or the exported programs as they are (``none``)."""
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
    if metadata.get("model", {}).get("format") == "torch.export":
        model = load_package(path / metadata["model"]["file"], metadata, compiled)
    else:  # formats 2 and 3, and --format torchscript
        # the one artifact kind that needs TorchRec and fbgemm: a broken install is refused
        # by the stack check's one line, as training's is, not by an ImportError traceback
        check_stack(load_torchrec=True)
        from genctr_rec.serving.torchscript import load_legacy

        model = load_legacy(path / LEGACY_MODEL_FILE, metadata)
    categories = np.load(path / ITEM_CATEGORIES_FILE)
    with np.load(path / ITEM_FEATURES_FILE) as arrays:
        catalogue = _catalogue_from(categories, dict(arrays))
    id_maps = None
    if (path / ID_MAPS_FILE).is_file():
        with np.load(path / ID_MAPS_FILE) as arrays:
            id_maps = IdMaps({space: IdMap(arrays[space]) for space in arrays.files})
    return Artifact(path, model, categories, metadata, catalogue, id_maps)
