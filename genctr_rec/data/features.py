"""Declared side features and the user feature: the part of the data schema beyond item ids.

``meta.json`` may declare side features (``docs/data-format.md``)::

    "features": [
      {"name": "user_gender", "kind": "id",    "vocab_size": 2,  "where": "impression"},
      {"name": "user_age",    "kind": "dense",                   "where": "impression"},
      {"name": "item_genres", "kind": "ids",   "vocab_size": 19, "where": "item"}
    ]

``kind``: ``id`` (int64 in [0, vocab_size)), ``ids`` (list<int64>, each in range, mean-pooled),
``dense`` (float32, finite). ``where``: ``impression`` features are columns of train/ and
test/ (and fields of a serving request); ``item`` features are columns of items.parquet,
looked up for the target item. Every model also reads ``user_id`` through its own table of
``num_users + 1`` rows: the last row is the default row that unseen users share.

This module owns the feature keys: which names go into the sparse ``KeyedJaggedTensor`` of
side features (``USER_ID`` first, then the declared ``id``/``ids`` features in declared order)
and which into the dense tensor.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

FEATURE_KINDS = ("id", "ids", "dense")
FEATURE_WHERE = ("impression", "item")
USER_ID = "user_id"
# names the format already uses, and our own KJT keys: a declared feature may not take them
RESERVED_NAMES = frozenset(
    {
        "user_id",
        "timestamp",
        "item_id",
        "category_id",
        "query_category_id",
        "label",
        "hist_item_ids",
        "hist_category_ids",
        "hist_timestamps",
        "item",
        "category",
    }
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class FeatureSpecError(ValueError):
    """A ``features`` entry of meta.json is malformed (raised as DataFormatError by callers)."""

    def __init__(self, message: str, field: str) -> None:
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class FeatureSpec:
    """One declared side feature.

    Args:
        name: the column's name (in train/test for ``impression``, items.parquet for ``item``).
        kind: ``id``, ``ids`` or ``dense``.
        where: ``impression`` or ``item``.
        vocab_size: rows of the feature's table (``id`` / ``ids`` only).
    """

    name: str
    kind: str
    where: str
    vocab_size: int | None = None

    @property
    def sparse(self) -> bool:
        return self.kind != "dense"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["vocab_size"] is None:
            out.pop("vocab_size")
        return out

    @classmethod
    def from_json(cls, raw: Any, index: int = 0, raw_ids: bool = False) -> FeatureSpec:
        """Parse one ``features[index]`` entry, naming the bad key in the error. A feature of
        raw ids (meta.json's ``raw_ids``) needs no ``vocab_size``: its id map sizes it."""
        at = f"features[{index}]"
        if not isinstance(raw, dict):
            raise FeatureSpecError(f"must be a JSON object, got {raw!r}", at)
        unknown = sorted(set(raw) - {"name", "kind", "where", "vocab_size"})
        if unknown:
            raise FeatureSpecError(f"unknown keys {unknown}", at)
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise FeatureSpecError(
                f"must be a name of letters, digits and '_', got {name!r}", f"{at}.name"
            )
        if name in RESERVED_NAMES:
            raise FeatureSpecError(f"{name!r} is a column the format already defines", f"{at}.name")
        kind, where = raw.get("kind"), raw.get("where")
        if kind not in FEATURE_KINDS:
            raise FeatureSpecError(f"must be one of {FEATURE_KINDS}, got {kind!r}", f"{at}.kind")
        if where not in FEATURE_WHERE:
            raise FeatureSpecError(f"must be one of {FEATURE_WHERE}, got {where!r}", f"{at}.where")
        vocab = raw.get("vocab_size")
        if kind == "dense":
            if vocab is not None:
                raise FeatureSpecError("dense features take no vocab_size", f"{at}.vocab_size")
        elif raw_ids and vocab is None:
            pass
        elif not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
            raise FeatureSpecError(
                f"{kind} features need a positive integer vocab_size, got {vocab!r}",
                f"{at}.vocab_size",
            )
        return cls(name=name, kind=kind, where=where, vocab_size=vocab)


def parse_features(raw: Any, raw_ids: set[str] | None = None) -> list[FeatureSpec]:
    """meta.json's ``features`` list (absent: none); ``raw_ids``: the names meta.json
    declares raw."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise FeatureSpecError(f"must be a list of feature objects, got {raw!r}", "features")
    raw_ids = raw_ids or set()
    specs = [
        FeatureSpec.from_json(
            entry, i, raw_ids=isinstance(entry, dict) and entry.get("name") in raw_ids
        )
        for i, entry in enumerate(raw)
    ]
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise FeatureSpecError(f"{spec.name!r} is declared twice", f"features[{i}].name")
        seen.add(spec.name)
    return specs


@dataclass(frozen=True)
class FeatureSchema:
    """What a model reads besides items and categories: the user table and the declared
    features, in the order every reader, model and request uses.

    Args:
        num_users: users with a row of their own; ``num_users`` itself is the shared default
            row of unseen users, so the user table has ``num_users + 1`` rows.
        features: the declared side features.
        dense_stats: ``name -> (mean, std)`` of each dense feature over the training data: the
            model standardises with them (stored with the run and the artifact).
    """

    num_users: int
    features: tuple[FeatureSpec, ...] = ()
    dense_stats: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def sparse(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.sparse]

    @property
    def dense(self) -> list[FeatureSpec]:
        return [f for f in self.features if not f.sparse]

    @property
    def sparse_keys(self) -> list[str]:
        """Keys of the side-feature KJT: ``user_id`` first, then the sparse features."""
        return [USER_ID] + [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    def table_sizes(self) -> dict[str, int]:
        """Rows of each side-feature table, keyed like the KJT."""
        sizes = {USER_ID: self.num_users + 1}
        sizes.update({f.name: int(f.vocab_size) for f in self.sparse})
        return sizes

    def pooled_lists(self) -> set[str]:
        """Keys whose bags hold a list (mean-pooled); the others hold one id."""
        return {f.name for f in self.sparse if f.kind == "ids"}

    def of(self, where: str) -> list[FeatureSpec]:
        return [f for f in self.features if f.where == where]

    def dense_moments(self) -> tuple[list[float], list[float]]:
        """Means and standard deviations of the dense features, in :attr:`dense` order."""
        stats = [self.dense_stats.get(f.name, (0.0, 1.0)) for f in self.dense]
        return [m for m, _ in stats], [s for _, s in stats]

    def to_json(self) -> dict[str, Any]:
        return {
            "num_users": self.num_users,
            "features": [f.to_json() for f in self.features],
            "dense_stats": {k: list(v) for k, v in self.dense_stats.items()},
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> FeatureSchema:
        if not raw:
            return cls(num_users=0)
        stats = {k: (float(v[0]), float(v[1])) for k, v in raw.get("dense_stats", {}).items()}
        return cls(int(raw["num_users"]), tuple(parse_features(raw.get("features"))), stats)
