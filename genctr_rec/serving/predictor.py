"""Scores requests against a loaded artifact; reuses g(s, c) within and between requests.

A request is a user's history (items, categories, optional timestamps), the query's category
and N candidate ads. With model integration the decoder output g(s, c) depends only on the
history and the candidate's category, so the predictor computes it once per distinct category
in a request and keeps it in a bounded LRU cache keyed by (history digest, category).

Out-of-vocabulary policy (``oov``):

* ``reject`` (default): any id outside ``[0, vocab)`` fails the request with a
  :class:`RequestError` naming the field and the position (HTTP 422).
* ``skip_history``: history entries with an unknown item or category are dropped (new items
  reach user histories before the next training run); unknown candidates and an unknown query
  category still fail the request, since the model has nothing to score them with.

Histories longer than the model's ``max_history`` keep the newest ``max_history`` entries, as
training did; beyond ``max_request_history`` the request is refused. A candidate or history
entry without a category takes the item's category from the artifact's catalogue.
"""

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from genctr_rec.serving.artifact import Artifact, RequestTensors, load_artifact

OOV_POLICIES = ("reject", "skip_history")


class RequestError(ValueError):
    """A request the model cannot score; ``field`` says where (e.g. ``candidates[3].item_id``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class Request:
    """One scoring request (the JSON body of ``POST /score``, as Python values)."""

    history_items: Sequence[int]
    history_categories: Sequence[int] | None
    query_category: int
    candidate_items: Sequence[int]
    candidate_categories: Sequence[int | None] | None = None
    history_timestamps: Sequence[int] | None = None


@dataclass
class PreparedRequest:
    """A validated request: int64 arrays, history truncated, categories filled in."""

    hist_items: np.ndarray
    hist_cats: np.ndarray
    query_category: int
    cand_items: np.ndarray
    cand_cats: np.ndarray
    history_key: bytes = field(default=b"")


class ContextCache:
    """Bounded LRU of g(s, c) vectors keyed by (history digest, category); thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[bytes, int], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[bytes, int]) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[bytes, int], value: torch.Tensor) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self),
            "capacity": self.capacity,
            "hits": self.hits,
            "misses": self.misses,
        }


def _ids(values: Sequence[int | None] | None, name: str, expected: int | None = None) -> np.ndarray:
    try:
        array = np.asarray(values if values is not None else [], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RequestError(name, f"must be a list of integers ({exc})") from exc
    if array.ndim != 1:
        raise RequestError(name, "must be a flat list of integers")
    if expected is not None and len(array) != expected:
        raise RequestError(name, f"has {len(array)} entries, expected {expected}")
    return array


def _first_outside(array: np.ndarray, vocab: int) -> int | None:
    bad = np.flatnonzero((array < 0) | (array >= vocab))
    return int(bad[0]) if len(bad) else None


class Predictor:
    """Loads an artifact and returns a click probability per candidate.

    Args:
        artifact: artifact directory (or an already loaded :class:`Artifact`).
        cache_size: g(s, c) entries kept between requests (0 turns the cache off).
        oov: out-of-vocabulary policy, see the module docstring.
        max_candidates: more candidates in one request are refused.
        max_request_history: longer histories are refused (up to it they are truncated).

    Example::

        predictor = Predictor("artifacts/genctr")
        scores = predictor.score(Request([3, 17], [1, 4], query_category=4, candidate_items=[5, 9]))
    """

    def __init__(
        self,
        artifact: str | Path | Artifact,
        cache_size: int = 100_000,
        oov: str = "reject",
        max_candidates: int = 1000,
        max_request_history: int = 10_000,
    ) -> None:
        if oov not in OOV_POLICIES:
            raise ValueError(f"oov must be one of {OOV_POLICIES}, got {oov!r}")
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        meta = self.artifact.metadata
        self.model = self.artifact.model
        self.item_categories = self.artifact.item_categories
        self.num_items = int(meta["num_items"])
        self.num_categories = int(meta["num_categories"])
        self.max_history = int(meta["max_history"])
        self.model_integration = bool(meta["model_integration"])
        self.oov = oov
        self.max_candidates = max_candidates
        self.max_request_history = max_request_history
        self.cache = ContextCache(cache_size) if cache_size > 0 and self.model_integration else None

    # -- validation -------------------------------------------------------------------------
    def prepare(self, request: Request) -> PreparedRequest:
        """Validate and normalise one request; raises :class:`RequestError`."""
        items = _ids(request.history_items, "history.item_ids")
        if len(items) > self.max_request_history:
            raise RequestError(
                "history.item_ids",
                f"{len(items)} entries; at most {self.max_request_history} are accepted",
            )
        cats = (
            _ids(request.history_categories, "history.category_ids", len(items))
            if request.history_categories is not None
            else None
        )
        if request.history_timestamps is not None:
            stamps = _ids(request.history_timestamps, "history.timestamps", len(items))
            if len(stamps) > 1 and (np.diff(stamps) < 0).any():
                raise RequestError("history.timestamps", "must be oldest first (non-decreasing)")
        items, cats = self._history_in_vocab(items, cats)
        start = max(0, len(items) - self.max_history)  # the newest max_history entries
        items, cats = items[start:], cats[start:]
        query = int(_ids([request.query_category], "query_category_id")[0])
        if not 0 <= query < self.num_categories:
            raise RequestError(
                "query_category_id", f"{query} is outside [0, {self.num_categories})"
            )
        cand_items = _ids(request.candidate_items, "candidates")
        if len(cand_items) == 0:
            raise RequestError("candidates", "at least one candidate is needed")
        if len(cand_items) > self.max_candidates:
            raise RequestError(
                "candidates", f"{len(cand_items)} candidates; at most {self.max_candidates}"
            )
        bad = _first_outside(cand_items, self.num_items)
        if bad is not None:
            raise RequestError(
                f"candidates[{bad}].item_id",
                f"{cand_items[bad]} is outside the item vocabulary [0, {self.num_items})",
            )
        cand_cats = self._categories(request.candidate_categories, cand_items, "candidates")
        bad = _first_outside(cand_cats, self.num_categories)
        if bad is not None:
            raise RequestError(
                f"candidates[{bad}].category_id",
                f"{cand_cats[bad]} is outside [0, {self.num_categories})",
            )
        key = b""
        if self.cache is not None:
            key = hashlib.blake2b(items.tobytes() + b"|" + cats.tobytes(), digest_size=16).digest()
        return PreparedRequest(items, cats, query, cand_items, cand_cats, key)

    def _categories(
        self, given: Sequence[int | None] | None, items: np.ndarray, name: str
    ) -> np.ndarray:
        """The given categories, missing ones (None) taken from the catalogue."""
        catalogue = self.item_categories[np.clip(items, 0, self.num_items - 1)]
        if given is None:
            return catalogue.copy()
        if len(given) != len(items):
            raise RequestError(name, f"{len(given)} categories for {len(items)} items")
        filled = [catalogue[i] if c is None else c for i, c in enumerate(given)]
        return _ids(filled, name)

    def _history_in_vocab(
        self, items: np.ndarray, cats: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        item_ok = (items >= 0) & (items < self.num_items)
        if cats is None:
            cats = np.where(item_ok, self.item_categories[np.where(item_ok, items, 0)], -1)
        cat_ok = (cats >= 0) & (cats < self.num_categories)
        keep = item_ok & cat_ok
        if keep.all():
            return items, cats
        if self.oov == "skip_history":
            return items[keep], cats[keep]
        bad = int(np.flatnonzero(~keep)[0])
        field_name = "item_ids" if not item_ok[bad] else "category_ids"
        value = items[bad] if not item_ok[bad] else cats[bad]
        vocab = self.num_items if not item_ok[bad] else self.num_categories
        raise RequestError(
            f"history.{field_name}[{bad}]", f"{value} is outside the vocabulary [0, {vocab})"
        )

    # -- scoring ----------------------------------------------------------------------------
    def score(self, request: Request) -> np.ndarray:
        """Probabilities for one request's candidates, in candidate order."""
        return self.score_prepared([self.prepare(request)])[0]

    @staticmethod
    def tensors(batch: Sequence[PreparedRequest]) -> RequestTensors:
        """Pad a batch of prepared requests into the ServingModel's inputs."""
        width = max(1, max(len(r.hist_items) for r in batch))
        hist_items = np.zeros((len(batch), width), dtype=np.int64)
        hist_cats = np.zeros((len(batch), width), dtype=np.int64)
        for i, r in enumerate(batch):
            hist_items[i, : len(r.hist_items)] = r.hist_items
            hist_cats[i, : len(r.hist_cats)] = r.hist_cats
        counts = [len(r.cand_items) for r in batch]
        return RequestTensors(
            torch.from_numpy(hist_items),
            torch.from_numpy(hist_cats),
            torch.tensor([len(r.hist_items) for r in batch], dtype=torch.long),
            torch.tensor([r.query_category for r in batch], dtype=torch.long),
            torch.from_numpy(np.concatenate([r.cand_items for r in batch])),
            torch.from_numpy(np.concatenate([r.cand_cats for r in batch])),
            torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(counts)),
        )

    @torch.inference_mode()
    def score_prepared(self, batch: Sequence[PreparedRequest]) -> list[np.ndarray]:
        """Score several prepared requests in one model call (the server's micro-batches)."""
        t = self.tensors(batch)
        if self.cache is None:
            probs = self.model(*t.args())
        else:
            probs = self.model.score(*t.args(), self._contexts(batch, t))
        counts = [len(r.cand_items) for r in batch]
        return [p.numpy().astype(np.float64) for p in torch.split(probs, counts)]

    def _contexts(self, batch: Sequence[PreparedRequest], t: RequestTensors) -> torch.Tensor:
        """g(s, c) per candidate [N, D]: cached ones reused, the rest computed in one call."""
        found: dict[tuple[int, int], torch.Tensor] = {}
        missing: list[tuple[int, int]] = []
        for row, r in enumerate(batch):
            for cat in np.unique(r.cand_cats).tolist():
                value = self.cache.get((r.history_key, cat))
                if value is None:
                    missing.append((row, cat))
                else:
                    found[(row, cat)] = value
        if missing:
            rows = torch.tensor([m[0] for m in missing])
            cats = torch.tensor([m[1] for m in missing])
            computed = self.model.contexts(t.hist_items, t.hist_cats, t.hist_lengths, rows, cats)
            for (row, cat), value in zip(missing, computed, strict=True):
                value = value.clone()  # a view would keep the whole batch alive in the cache
                found[(row, cat)] = value
                self.cache.put((batch[row].history_key, cat), value)
        keys = zip(t.cand_rows.tolist(), t.cand_cats.tolist(), strict=True)
        return torch.stack([found[k] for k in keys])
