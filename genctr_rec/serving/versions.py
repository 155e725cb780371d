"""A directory of versioned artifacts (``MODELS/<version>/``) and the model a service serves.

``genctr serve --artifact MODELS`` takes one artifact, as before, or a directory whose
subdirectories are artifacts written by ``genctr export --out MODELS/<version>``. A version
is *complete* once its manifest is there (an export renames into place; on object storage the
manifest is uploaded last). The service serves the **pinned** version if ``MODELS/PINNED``
names one (``genctr models pin MODELS VERSION``, checked before it is written), else the
newest complete version in natural order (``2026-12-06`` < ``2026-12-07``, ``v9`` < ``v10``).
Rolling back is pinning an older version; every server watching ``MODELS`` follows.

:class:`ModelSource` answers "which version now?"; :func:`load_candidate` loads a version
beside the current one and checks it (manifest, format, warm-up, probe requests) before the
service lets it take traffic. Why a file and not an HTTP call: the pin is the fleet's state,
stored where the artifacts are, so a new replica, a restarted worker and every other server
agree on it, and the service needs no authenticated write endpoint.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genctr_rec.checkpoint import MANIFEST
from genctr_rec.serving.artifact import META_FILE, ArtifactError, load_artifact
from genctr_rec.serving.predictor import Predictor
from genctr_rec.storage import is_remote, location, write_bytes

logger = logging.getLogger(__name__)

PIN_FILE = "PINNED"
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def version_key(name: str) -> tuple:
    """Natural order: digit runs compare as numbers (``v9`` < ``v10``)."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", name)
        if part
    )


@dataclass
class ModelSource:
    """Where a service's models come from: one artifact, or a versioned directory."""

    root: str

    @property
    def versioned(self) -> bool:
        """A directory of versions: no artifact metadata at its top."""
        return not (location(self.root) / META_FILE).is_file()

    def versions(self) -> list[str]:
        """Complete versions, oldest first (names that could be a path trick are ignored)."""
        if not self.versioned:
            return [self.single_name]
        root = location(self.root)
        if not root.is_dir():
            return []
        names = []
        for child in root.iterdir():
            name = child.name
            if _VERSION_NAME.match(name) and (child / MANIFEST).is_file():
                names.append(name)
        return sorted(names, key=version_key)

    @property
    def single_name(self) -> str:
        return location(self.root).name

    def pinned(self) -> str | None:
        if not self.versioned:
            return None
        pin = location(self.root) / PIN_FILE
        if not pin.is_file():
            return None
        name = pin.read_text().strip()
        return name or None

    def target(self) -> str | None:
        """The version to serve now: the pinned one, else the newest complete one."""
        pinned = self.pinned()
        if pinned is not None:
            return pinned
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: str) -> str:
        if not self.versioned:
            return self.root
        if not _VERSION_NAME.match(version):
            raise ArtifactError(f"{version!r} is not a version name (letters, digits, . _ -)")
        return str(location(self.root) / version)

    def pin(self, version: str) -> None:
        """Pin ``version`` for every server watching: refused unless it is complete and its
        files match its manifest."""
        if not self.versioned:
            raise ArtifactError(f"{self.root} is one artifact, not a directory of versions")
        if version not in self.versions():
            raise ArtifactError(
                f"{self.root} has no complete version {version!r}; it has {self.versions()}"
            )
        load_artifact(self.path(version))  # verified against its manifest, format readable
        write_bytes(location(self.root) / PIN_FILE, (version + "\n").encode())

    def unpin(self) -> None:
        pin = location(self.root) / PIN_FILE
        if is_remote(pin):
            if pin.is_file():
                pin.unlink()
        else:
            Path(pin).unlink(missing_ok=True)


@dataclass
class ServedModel:
    """A loaded version and the predictor that scores with it."""

    version: str
    predictor: Predictor


def probe_requests(predictor: Predictor, count: int = 8) -> list:
    """Deterministic requests over the catalogue (history, candidates, the declared
    impression features at their first value): what a new version must score sanely."""
    from genctr_rec.data.id_maps import ITEM
    from genctr_rec.serving.predictor import Request

    rng = np.random.default_rng(0)
    features = predictor.first_features()
    requests = []
    for _ in range(count):
        history = rng.integers(0, predictor.num_items, size=min(20, predictor.max_history))
        candidates = rng.integers(0, predictor.num_items, size=16)
        query = int(predictor.item_categories[candidates[0]])
        requests.append(
            Request(
                predictor.ids_of(ITEM, history),
                None,
                query,
                predictor.ids_of(ITEM, candidates),
                features=features,
            )
        )
    return requests


def check_scores(predictor: Predictor, version: str) -> None:
    """Raises :class:`ArtifactError` unless every probe score is a probability."""
    scores = np.concatenate(
        predictor.score_prepared([predictor.prepare(r) for r in probe_requests(predictor)])
    )
    if not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        bad = int((~np.isfinite(scores) | (scores < 0) | (scores > 1)).sum())
        raise ArtifactError(
            f"version {version}: {bad} of {scores.size} probe scores are not probabilities"
        )


def load_candidate(
    source: ModelSource, version: str, predictor_options: dict, warm_up_rounds: int = 3
) -> ServedModel:
    """Load ``version`` and check it before it takes traffic: its files against its manifest
    and format (:func:`load_artifact`), a warm-up, and the probe requests. Raises
    :class:`ArtifactError` (or the error the model raised) when any check fails."""
    predictor = Predictor(source.path(version), **predictor_options)
    if warm_up_rounds > 0:
        predictor.warm_up(warm_up_rounds)
    check_scores(predictor, version)
    return ServedModel(version, predictor)
