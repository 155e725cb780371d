"""Scores requests against a loaded artifact; reuses g(s, c) within and between requests.

A request is a user's history (items, categories, optional timestamps), the query's category
and N candidate ads. With model integration the decoder output g(s, c) depends only on the
history and the candidate's category, so the predictor computes it once per distinct category
in a request and keeps it in a bounded LRU cache keyed by (history digest, category).

Unknown-id policy (``oov``; ``genctr serve --unknown-ids``):

* ``default`` (the default): an id the model never saw (a new ad, a category, a feature value
  past its vocabulary, anything outside ``[0, vocab)``) is looked up in its table's default
  row (artifact format 3: the mean trained row). A new candidate takes the category the
  request gives for it, else the default category, and the default item features. Each is
  counted per field (:attr:`Predictor.unknown_ids`, ``genctr_unknown_ids`` in ``/metrics``).
  Artifacts of format 2 have no default rows: there the policy falls back to ``reject``.
* ``reject``: any id outside ``[0, vocab)`` fails the request with a
  :class:`RequestError` naming the field and the position (HTTP 422).
* ``skip_history``: history entries with an unknown item or category are dropped (new items
  reach user histories before the next training run); unknown candidates and an unknown query
  category still fail the request, since the model has nothing to score them with.

Histories longer than the model's ``max_history`` keep the newest ``max_history`` entries, as
training did; beyond ``max_request_history`` the request is refused. A candidate or history
entry without a category takes the item's category from the artifact's catalogue.

Side features: ``user_id`` is optional (missing, or a user the model never saw: the shared
default row, as in training); every impression feature the model declares is required in
``features`` (``id``: an integer in range, ``ids``: a list of them, ``dense``: a finite number);
item features come from the artifact's catalogue for each candidate.
"""

import dataclasses
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from genctr_rec.data.catalogue import ItemCatalogue
from genctr_rec.data.features import USER_ID, FeatureSchema
from genctr_rec.data.id_maps import ITEM as ITEM_SPACE
from genctr_rec.data.kinds import FieldError, int_array, kind_of, side_arrays
from genctr_rec.data.stream import Jagged
from genctr_rec.serving.artifact import Artifact, artifact_digest, load_artifact
from genctr_rec.serving.requests import RequestTensors

logger = logging.getLogger(__name__)
OOV_POLICIES = ("default", "reject", "skip_history")


class RequestError(FieldError):
    """A request the model cannot score; ``field`` says where (e.g. ``candidates[3].item_id``)."""


@contextmanager
def _as_request_error() -> Iterator[None]:
    """A value check of ``data/kinds.py`` (a :class:`FieldError`) as this request's error."""
    try:
        yield
    except RequestError:
        raise
    except FieldError as exc:
        raise RequestError(exc.field, exc.message) from exc.__cause__


@dataclass
class Request:
    """One scoring request (the JSON body of ``POST /score``, as Python values)."""

    history_items: Sequence[int]
    history_categories: Sequence[int] | None
    query_category: int
    candidate_items: Sequence[int]
    candidate_categories: Sequence[int | None] | None = None
    history_timestamps: Sequence[int] | None = None
    user_id: int | None = None
    features: dict[str, object] | None = None


@dataclass
class PreparedRequest:
    """A validated request: int64 arrays, history truncated, categories filled in."""

    hist_items: np.ndarray
    hist_cats: np.ndarray
    query_category: int
    cand_items: np.ndarray
    cand_cats: np.ndarray
    history_key: bytes = field(default=b"")
    user_row: int = 0
    impression: dict[str, object] = field(default_factory=dict)  # checked feature values


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
    with _as_request_error():
        return int_array(values, name, expected)


def _first_outside(array: np.ndarray, vocab: int) -> int | None:
    bad = np.flatnonzero((array < 0) | (array >= vocab))
    return int(bad[0]) if len(bad) else None


def _with_default_item(catalogue: ItemCatalogue, schema: FeatureSchema | None) -> ItemCatalogue:
    """The catalogue with one more item, the default one: each id feature's default row (its
    vocab_size), each dense feature's training mean (0 once standardised)."""
    specs = {f.name: f for f in schema.of("item")} if schema is not None else {}
    scalars = {}
    for name, values in catalogue.scalars.items():
        spec = specs.get(name)
        if spec is not None and not kind_of(spec).sparse:
            extra = schema.dense_stats.get(name, (0.0, 1.0))[0]
        else:
            extra = spec.vocab_size if spec is not None else 0
        scalars[name] = np.append(values, np.asarray(extra, dtype=values.dtype))
    lists = {}
    for name, jag in catalogue.lists.items():
        default = Jagged(
            np.array([specs[name].vocab_size], dtype=np.int64),
            np.zeros(1, np.int64),
            np.ones(1, np.int64),
        )
        lists[name] = Jagged.concat([jag, default])
    return ItemCatalogue(catalogue.categories, scalars, lists)


class Predictor:
    """Loads an artifact and returns a click probability per candidate.

    Args:
        artifact: artifact directory (or an already loaded :class:`Artifact`).
        cache_size: g(s, c) entries kept between requests (0 turns the cache off).
        oov: out-of-vocabulary policy, see the module docstring.
        max_candidates: more candidates in one request are refused.
        max_request_history: longer histories are refused (up to it they are truncated).
        max_feature_ids: an ``ids`` feature with more ids is refused.
        max_request_ids: a request whose ``ids`` features, copied once per candidate (each
            candidate is scored with its request's features), would hold more ids is refused:
            a 1 MiB body could otherwise ask for gigabytes.
        artifact_sha256: refuse an artifact whose manifest has another SHA-256 (pinning the
            exact artifact a service may load).

    Example::

        predictor = Predictor("artifacts/genctr")
        scores = predictor.score(Request([3, 17], [1, 4], query_category=4, candidate_items=[5, 9]))
    """

    def __init__(
        self,
        artifact: str | Path | Artifact,
        cache_size: int = 100_000,
        oov: str = "default",
        max_candidates: int = 1000,
        max_request_history: int = 10_000,
        trust_request_categories: bool = False,
        max_feature_ids: int = 1000,
        max_request_ids: int = 1_000_000,
        artifact_sha256: str | None = None,
    ) -> None:
        if oov not in OOV_POLICIES:
            raise ValueError(f"oov must be one of {OOV_POLICIES}, got {oov!r}")
        self.artifact = (
            artifact if isinstance(artifact, Artifact) else load_artifact(artifact, artifact_sha256)
        )
        meta = self.artifact.metadata
        self.artifact_sha256 = artifact_digest(self.artifact.path)  # names its exact contents
        self.model = self.artifact.model
        self.item_categories = self.artifact.item_categories
        self.num_items = int(meta["num_items"])
        self.num_categories = int(meta["num_categories"])
        self.max_history = int(meta["max_history"])
        self.model_integration = bool(meta["model_integration"])
        self.oov = oov
        self.max_candidates = max_candidates
        self.max_request_history = max_request_history
        self.max_feature_ids = max_feature_ids
        self.max_request_ids = max_request_ids
        self.trust_request_categories = trust_request_categories
        self.cache = ContextCache(cache_size) if cache_size > 0 and self.model_integration else None
        self.schema = self.artifact.features
        self.catalogue = self.artifact.catalogue
        self.default_rows = bool(meta.get("default_rows"))
        if oov == "default" and not self.default_rows:
            logger.warning(
                "%s has no default rows (format %s, before genctr-rec 0.11): unknown ids are "
                "refused; run genctr export again to score them",
                self.artifact.path,
                meta.get("format_version"),
            )
            self.oov = "reject"
        if self.default_rows:  # the default item: default category, default item features
            self.item_categories = np.append(self.item_categories, self.num_categories)
            if self.catalogue is not None:
                self.catalogue = _with_default_item(self.catalogue, self.schema)
        self.unknown_ids: Counter[str] = Counter()  # ids scored with a default row, by field
        self.on_unknown: Callable[[str, int], None] | None = None  # the service's counter
        self._unknown_lock = threading.Lock()

    def _unknown(self, field_name: str, count: int) -> None:
        if count:
            with self._unknown_lock:
                self.unknown_ids[field_name] += count
            if self.on_unknown is not None:
                self.on_unknown(field_name, count)

    # -- validation -------------------------------------------------------------------------
    def prepare(self, request: Request) -> PreparedRequest:
        """Validate and normalise one request; raises :class:`RequestError`."""
        if self.artifact.id_maps is not None:
            request = self._rows_of(request)
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
        if not 0 <= query < self.num_categories and self.oov == "default":
            self._unknown("query_category_id", 1)
            query = self.num_categories
        elif not 0 <= query < self.num_categories:
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
        given_cats = request.candidate_categories
        if bad is not None and self.oov == "default":
            unknown = (cand_items < 0) | (cand_items >= self.num_items)
            self._unknown("candidates.item_id", int(unknown.sum()))
            cand_items = np.where(unknown, self.num_items, cand_items)
        elif bad is not None:
            raise RequestError(
                f"candidates[{bad}].item_id",
                f"{cand_items[bad]} is outside the item vocabulary [0, {self.num_items})",
            )
        cand_cats = self._categories(given_cats, cand_items, "candidates")
        bad = _first_outside(cand_cats, self.num_categories)
        if bad is not None and self.oov == "default":
            unknown = (cand_cats < 0) | (cand_cats >= self.num_categories)
            # a new item without a category has the default one already: not counted twice
            given = unknown & (cand_cats != self.num_categories)
            self._unknown("candidates.category_id", int(given.sum()))
            cand_cats = np.where(unknown, self.num_categories, cand_cats)
        elif bad is not None:
            raise RequestError(
                f"candidates[{bad}].category_id",
                f"{cand_cats[bad]} is outside [0, {self.num_categories})",
            )
        if given_cats is not None and not self.trust_request_categories:
            self._check_against_catalogue(cand_items, cand_cats)
        key = b""
        if self.cache is not None:
            key = hashlib.blake2b(items.tobytes() + b"|" + cats.tobytes(), digest_size=16).digest()
        user_row, impression = self._side(request)
        self._check_copies(impression, len(cand_items))
        return PreparedRequest(items, cats, query, cand_items, cand_cats, key, user_row, impression)

    def _check_copies(self, impression: dict[str, object], candidates: int) -> None:
        """Refuse a request whose list features, copied once per candidate, exceed
        ``max_request_ids``: the memory one request may ask for is bounded."""
        ids = sum(len(v) for v in impression.values() if isinstance(v, np.ndarray) and v.ndim)
        if ids * candidates > self.max_request_ids:
            raise RequestError(
                "features",
                f"{ids} feature ids x {candidates} candidates = {ids * candidates} ids to score; "
                f"at most {self.max_request_ids} a request",
            )

    def _rows_of(self, request: Request) -> Request:
        """A request of raw ids (an artifact trained on them, ``data/id_maps.py``) in table
        rows. An id the maps lack is an unknown id: refused naming its raw value under
        ``reject``; otherwise it becomes the row past the vocabulary that the unknown-id policy
        reads (an item, a feature value: the default row; a user: the shared default row)."""
        maps = self.artifact.id_maps

        def rows(values: Sequence[int] | None, space: str, name: str, past: int) -> np.ndarray:
            raw = _ids(values, name)
            found = maps[space].rows(raw)
            missing = found < 0
            if missing.any() and self.oov == "reject":
                bad = int(np.flatnonzero(missing)[0])
                raise RequestError(f"{name}[{bad}]", f"{raw[bad]} is not an id this model knows")
            return np.where(missing, past, found)

        changes: dict[str, object] = {}
        if ITEM_SPACE in maps:
            changes["history_items"] = rows(
                request.history_items, ITEM_SPACE, "history.item_ids", self.num_items
            )
            changes["candidate_items"] = rows(
                request.candidate_items, ITEM_SPACE, "candidates.item_id", self.num_items
            )
        if USER_ID in maps and request.user_id is not None and self.schema is not None:
            user = rows([request.user_id], USER_ID, "user_id", self.schema.num_users)
            changes["user_id"] = int(user[0])
        raw_features = (
            [f for f in self.schema.of("impression") if f.name in maps]
            if (self.schema is not None)
            else []
        )
        if raw_features and request.features:
            features = dict(request.features)
            for spec in raw_features:
                if spec.name not in features:
                    continue  # _side names what is missing
                kind, where = kind_of(spec), f"features.{spec.name}"
                found = rows(kind.as_ids(features[spec.name]), spec.name, where,
                             int(spec.vocab_size))  # fmt: skip
                features[spec.name] = kind.from_ids(found)
            changes["features"] = features
        return dataclasses.replace(request, **changes)

    def _side(self, request: Request) -> tuple[int, dict[str, object]]:
        """The user's table row (unseen or missing: the default row) and the checked
        impression features."""
        if self.schema is None:
            return 0, {}
        user_row = self.schema.num_users
        if request.user_id is not None:
            user = int(_ids([request.user_id], "user_id")[0])
            if user < 0:
                raise RequestError("user_id", f"{user} is negative")
            user_row = min(user, self.schema.num_users)
        given = dict(request.features or {})
        declared = {f.name: f for f in self.schema.of("impression")}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise RequestError(
                f"features.{unknown[0]}",
                f"not a feature of this model (it reads {sorted(declared)})",
            )
        values: dict[str, object] = {}
        for name, spec in declared.items():
            where = f"features.{name}"
            if name not in given:
                raise RequestError(where, f"required ({spec.kind} feature of this model)")
            kind = kind_of(spec)
            with _as_request_error():
                value = kind.request_value(given[name], where, self.max_feature_ids)
            if kind.sparse:
                bad = _first_outside(value, spec.vocab_size)
                if bad is not None and self.oov == "default":
                    unknown = (value < 0) | (value >= spec.vocab_size)
                    self._unknown(where, int(unknown.sum()))
                    value = np.where(unknown, spec.vocab_size, value)
                elif bad is not None:
                    raise RequestError(
                        kind.outside_at(where, bad),
                        f"{value[bad]} is outside [0, {spec.vocab_size})",
                    )
            values[name] = value
        return user_row, values

    def _check_against_catalogue(self, items: np.ndarray, cats: np.ndarray) -> None:
        """A candidate's category must be its catalogue's: the model was trained so, and a
        wrong one is scored silently wrong."""
        known = self.item_categories[items]
        # a new item (the default row) has no catalogue category to contradict
        wrong = np.flatnonzero((cats != known) & (items < self.num_items))
        if wrong.size:
            i = int(wrong[0])
            raise RequestError(
                f"candidates[{i}].category_id",
                f"{cats[i]} contradicts the catalogue (item {items[i]} is in category "
                f"{known[i]}); leave category_id out, or serve with --trust-request-categories",
            )

    def _categories(
        self, given: Sequence[int | None] | None, items: np.ndarray, name: str
    ) -> np.ndarray:
        """The given categories, missing ones (None) taken from the catalogue."""
        catalogue = self.item_categories[np.clip(items, 0, len(self.item_categories) - 1)]
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
        if self.oov == "default":
            self._unknown("history.item_ids", int((~item_ok).sum()))
            self._unknown("history.category_ids", int((~cat_ok & item_ok).sum()))
            items = np.where(item_ok, items, self.num_items)
            return items, np.where(cat_ok, cats, self.num_categories)
        if self.oov == "skip_history":
            return items[keep], cats[keep]
        bad = int(np.flatnonzero(~keep)[0])
        field_name = "item_ids" if not item_ok[bad] else "category_ids"
        value = items[bad] if not item_ok[bad] else cats[bad]
        vocab = self.num_items if not item_ok[bad] else self.num_categories
        raise RequestError(
            f"history.{field_name}[{bad}]", f"{value} is outside the vocabulary [0, {vocab})"
        )

    def ids_of(self, space: str, rows: np.ndarray) -> list[int]:
        """The ids a request names table ``rows`` by: the rows themselves, or their raw ids
        for an artifact of raw ids."""
        maps = self.artifact.id_maps
        return (maps[space].raw[rows] if maps and space in maps else rows).tolist()

    def first_features(self) -> dict[str, object]:
        """Every declared impression feature at its first value (warm-up and probe requests)."""
        first = np.zeros(1, dtype=np.int64)
        features: dict[str, object] = {}
        for spec in self.schema.of("impression") if self.schema is not None else []:
            value = self.ids_of(spec.name, first)
            features[spec.name] = kind_of(spec).from_ids(value)
        return features

    def warm_up(self, rounds: int = 3, candidates: int = 100) -> float:
        """Score a synthetic request of a typical size ``rounds`` times (TorchScript's profiling
        runs, allocator arenas), leaving the cache as it was. Returns the seconds it took."""
        started = time.perf_counter()
        history = np.arange(min(self.max_history, 50)) % self.num_items
        request = Request(
            self.ids_of(ITEM_SPACE, history),
            None,
            int(self.item_categories[0]),
            self.ids_of(ITEM_SPACE, np.arange(min(candidates, self.num_items)) % self.num_items),
            features=self.first_features(),
        )
        cache, self.cache = self.cache, None
        try:
            for _ in range(rounds):
                self.score(request)
        finally:
            self.cache = cache
        return time.perf_counter() - started

    # -- scoring ----------------------------------------------------------------------------
    def score(self, request: Request) -> np.ndarray:
        """Probabilities for one request's candidates, in candidate order."""
        return self.score_prepared([self.prepare(request)])[0]

    def tensors(self, batch: Sequence[PreparedRequest]) -> RequestTensors:
        """Pad a batch of prepared requests into the ServingModel's inputs."""
        width = max(1, max(len(r.hist_items) for r in batch))
        hist_items = np.zeros((len(batch), width), dtype=np.int64)
        hist_cats = np.zeros((len(batch), width), dtype=np.int64)
        for i, r in enumerate(batch):
            hist_items[i, : len(r.hist_items)] = r.hist_items
            hist_cats[i, : len(r.hist_cats)] = r.hist_cats
        counts = [len(r.cand_items) for r in batch]
        cand_items = np.concatenate([r.cand_items for r in batch])
        side_values, side_lengths, dense = self._side_tensors(batch, counts, cand_items)
        return RequestTensors(
            torch.from_numpy(hist_items),
            torch.from_numpy(hist_cats),
            torch.tensor([len(r.hist_items) for r in batch], dtype=torch.long),
            torch.tensor([r.query_category for r in batch], dtype=torch.long),
            torch.from_numpy(cand_items),
            torch.from_numpy(np.concatenate([r.cand_cats for r in batch])),
            torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(counts)),
            side_values,
            side_lengths,
            dense,
        )

    def _side_tensors(
        self, batch: Sequence[PreparedRequest], counts: list[int], cand_items: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-candidate side features: the key-major jagged pair and the dense matrix."""
        n = len(cand_items)
        if self.schema is None:
            return (
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.int32),
                torch.zeros(n, 0),
            )
        rows = np.repeat(np.arange(len(batch)), counts)  # each candidate's request
        scalars = {USER_ID: np.array([r.user_row for r in batch])[rows]}
        lists: dict[str, Jagged] = {}
        if self.catalogue is not None:  # item features: each candidate's own
            item_scalars, item_lists = self.catalogue.gather(cand_items)
            scalars.update(item_scalars)
            lists.update(item_lists)
        for spec in self.schema.of("impression"):  # impression features: the request's
            given = [r.impression[spec.name] for r in batch]
            kind = kind_of(spec)
            (lists if kind.is_list else scalars)[spec.name] = kind.gather(given, rows)
        values, lengths, dense = side_arrays(self.schema, scalars, lists, n)
        return (
            torch.from_numpy(values),
            torch.from_numpy(lengths),
            torch.from_numpy(dense) if dense is not None else torch.zeros(n, 0),
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
