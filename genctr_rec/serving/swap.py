"""The service's model, kept current with its :class:`~genctr_rec.serving.versions.ModelSource`.

Every ``poll_s`` the watcher asks the source which version to serve; a different one is loaded
on a thread of its own beside the current model (which keeps answering), checked
(:func:`~genctr_rec.serving.versions.load_candidate`), and only then swapped in, by one
assignment on the event loop: a request is scored by the model that prepared it, so requests
in flight finish on the model that took them. A version that fails a check is refused, logged
and counted, and not tried again until its manifest changes (it was exported again); the
current model keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable

from genctr_rec.checkpoint import MANIFEST
from genctr_rec.serving.predictor import Predictor
from genctr_rec.serving.versions import ModelSource, ServedModel, load_candidate
from genctr_rec.storage import location

logger = logging.getLogger(__name__)


def _manifest_digest(path: str) -> str:
    manifest = location(path) / MANIFEST
    try:
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def first_loadable(source: ModelSource, predictor_options: dict) -> tuple[ServedModel, dict]:
    """The model a service starts with: the pinned version, else the newest that loads (a
    damaged newest version does not keep a fleet from restarting). Returns it and the
    versions refused on the way. Raises the last error when none loads."""
    from genctr_rec.serving.artifact import ArtifactError

    pinned = source.pinned()
    versions = [pinned] if pinned else list(reversed(source.versions()))
    if not versions:
        raise ArtifactError(
            f"{source.root} is not a genctr serving artifact (no artifact.json) and holds no "
            "complete version MODELS/<version>/ (written by genctr export --out "
            "MODELS/<version>)"
        )
    refused: dict[str, str] = {}
    for version in versions:
        try:
            predictor = Predictor(source.path(version), **predictor_options)
        except Exception as exc:  # noqa: BLE001 - the next version may load
            if version == versions[-1]:
                raise
            logger.error("version %s refused at start: %s", version, exc)
            refused[version] = str(exc)
            continue
        return ServedModel(version, predictor), refused
    raise AssertionError("unreachable")


def watch(artifact: str, predictor_options: dict, poll_s: float, warm_up_rounds: int):
    """The :class:`ModelWatcher` a service starts with for ``--artifact`` (one artifact, or a
    directory of versions). Raises when nothing there loads."""
    source = ModelSource(artifact)
    if not source.versioned:
        served = ServedModel(source.single_name, Predictor(artifact, **predictor_options))
        return ModelWatcher(source, served, predictor_options, 0.0, warm_up_rounds)
    served, refused = first_loadable(source, predictor_options)
    watcher = ModelWatcher(source, served, predictor_options, poll_s, warm_up_rounds)
    for version, reason in refused.items():
        watcher.refuse(version, reason)
    return watcher


class ModelWatcher:
    """Holds the served model; polls the source and swaps in a checked new version."""

    def __init__(
        self,
        source: ModelSource,
        current: ServedModel,
        predictor_options: dict,
        poll_s: float = 30.0,
        warm_up_rounds: int = 3,
        on_swap: Callable[[ServedModel, ServedModel], None] | None = None,
        on_refusal: Callable[[str, str], None] | None = None,
    ) -> None:
        self.source = source
        self.current = current
        self.predictor_options = predictor_options
        self.poll_s = poll_s
        self.warm_up_rounds = warm_up_rounds
        self.on_swap = on_swap
        self.on_refusal = on_refusal
        self.swaps = 0
        self.refused: dict[str, str] = {}  # version -> why
        self._refused_at: dict[str, str] = {}  # version -> manifest digest when refused
        self.last_check: float | None = None
        self.pinned: str | None = None  # as of the last check

    @classmethod
    def fixed(cls, predictor: Predictor) -> ModelWatcher:
        """One artifact, never swapped (a service built from a loaded predictor)."""
        path = str(predictor.artifact.path)
        return cls(ModelSource(path), ServedModel(location(path).name, predictor), {}, 0.0)

    @property
    def watching(self) -> bool:
        return self.source.versioned and self.poll_s > 0

    def refuse(self, version: str, reason: str) -> None:
        self.refused[version] = reason
        self._refused_at[version] = _manifest_digest(self.source.path(version))
        logger.error(
            "model version %s refused, still serving %s: %s", version, self.current.version, reason
        )
        if self.on_refusal is not None:
            self.on_refusal(version, reason)

    def candidate(self) -> ServedModel | None:
        """Blocking: the checked new model to swap in, or None (nothing new, or refused)."""
        self.last_check = time.time()
        try:
            self.pinned = self.source.pinned()
            target = self.pinned or self.source.target()
        except Exception as exc:  # noqa: BLE001 - the store is unreachable: keep serving
            logger.warning("cannot list %s: %s", self.source.root, exc)
            return None
        if target is None or target == self.current.version:
            return None
        if target in self.refused:
            if self._refused_at[target] == _manifest_digest(self.source.path(target)):
                return None
            del self.refused[target]  # exported again: try it again
        try:
            return load_candidate(self.source, target, self.predictor_options, self.warm_up_rounds)
        except Exception as exc:  # noqa: BLE001 - any failure refuses the version
            self.refuse(target, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None

    def swap(self, new: ServedModel) -> None:
        """On the event loop: from now on requests are prepared (and scored) by ``new``."""
        old, self.current = self.current, new
        self.swaps += 1
        logger.info("now serving model version %s (was %s)", new.version, old.version)
        if self.on_swap is not None:
            self.on_swap(old, new)

    async def check(self) -> bool:
        """One poll: True when a new version was swapped in."""
        new = await asyncio.to_thread(self.candidate)
        if new is None:
            return False
        self.swap(new)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check()
            except Exception:  # never stops the service
                logger.exception("checking for a new model version failed")

    def describe(self) -> dict:
        """What ``GET /metadata`` shows of the versions: names and counts, no local paths
        (a refusal's reason names the version's folder as ``MODELS``)."""
        return {
            "versioned": self.source.versioned,
            "version": self.current.version,
            "pinned": self.pinned,
            "poll_s": self.poll_s,
            "swaps": self.swaps,
            "refused": {v: self._public(reason) for v, reason in self.refused.items()},
            "last_check": self.last_check,
        }

    def _public(self, reason: str) -> str:
        from genctr_rec.storage import cache_dir

        for private, shown in ((self.source.root, "MODELS"), (str(cache_dir()), "CACHE")):
            reason = reason.replace(str(private).rstrip("/"), shown)
        return reason
