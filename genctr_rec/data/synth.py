"""A seeded search-advertising simulator that writes the public dataset format.

The planted structure (see ``datasets/synth.md``):

* Items belong to categories (Zipf-sized) and, inside a category, to one of ``num_styles``
  hidden *styles*. Popularity is log-normal within a category.
* Each user has a few favourite categories and, in each favourite category, a *current style*
  that drifts (re-drawn with probability ``style_switch_prob`` per session).
* A session has a query category (mostly a favourite). The user first clicks one organic item
  of the current style in that category (it enters the history), then sees ``ads_per_session``
  ads, mostly from the query category, picked by popularity with no regard to style.
* Click probability rises with position, query relevance, popularity, a static user-item
  affinity, interest in the ad's category and, most strongly, with **the ad's style matching
  the user's current style in the ad's category**. That style is visible only through the
  user's recent clicks *in the same category*: a model that reads the history conditioned on
  the ad's category (GenCTR's conditional decoder, target attention) can use it; the target
  ad's own features cannot.
* Declared side features (``side_features=True``) with planted effects: each user's
  ``user_segment`` (id) shifts the click logit by a segment x ``item_tier`` table (``item_tier``:
  an item feature in items.parquet), ``user_activity`` (dense: sessions plus noise) raises the
  click rate of active users, and ``user_interests`` (ids) lift ads whose category matches one.
  They come from their own random stream: the rest of the simulation is drawn as without them.

Users are simulated in chunks, vectorised over users, so memory stays flat as size grows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from genctr_rec.data.features import FeatureSpec
from genctr_rec.data.jagged import gather_ranges, lengths_to_offsets, list_array, suffix_ranges
from genctr_rec.data.schema import (
    IMPRESSION_SCHEMA,
    ITEMS_FILE,
    ITEMS_SCHEMA,
    META_FILE,
    SEQUENCE_SCHEMA,
    DatasetMeta,
)
from genctr_rec.data.writer import PartitionWriter, atomic_directory
from genctr_rec.progress import Progress

logger = logging.getLogger(__name__)

DAY = 86_400
IMPRESSION_WRITE_SCHEMA = IMPRESSION_SCHEMA.append(pa.field("position", pa.int8())).append(
    pa.field("hist_timestamps", pa.list_(pa.int64()))
)


@dataclass
class SynthConfig:
    """Simulator knobs. Defaults give the pipeline's default dataset (~400k impressions).

    Args:
        num_users: users simulated (impressions ~= users * mean sessions * ads_per_session).
        num_items: catalogue size.
        num_categories: number of categories (side information).
        num_styles: hidden styles per category: the within-category signal.
        favourite_categories: favourite categories per user.
        min_sessions / max_sessions: sessions per user, uniform.
        ads_per_session: ads shown per search.
        days: days covered; the last day is the test split (paper: 3 train days + 1 test day).
        max_history: histories kept in impression rows (written to meta.json).
        style_switch_prob: per-session chance that a user's style in a category is re-drawn.
        style_weight: logit added when the ad's style matches the user's current style.
        organic_clicks: organic click slots per session (1..3), each taken with
            ``organic_prob``; the last is in the query category, the others in favourites.
        side_features: declare and plant the user and item side features above.
        seed: everything is a function of this seed.
        users_per_chunk: users simulated at once (bounds memory).
    """

    num_users: int = 8_000
    num_items: int = 5_000
    num_categories: int = 100
    num_styles: int = 4
    favourite_categories: int = 4
    min_sessions: int = 8
    max_sessions: int = 24
    ads_per_session: int = 4
    days: int = 4
    max_history: int = 50
    style_switch_prob: float = 0.08
    style_weight: float = 1.6
    organic_clicks: int = 3
    organic_prob: float = 0.7
    side_features: bool = True
    seed: int = 2025
    users_per_chunk: int = 8_192
    row_group_size: int = 65_536

    @classmethod
    def preset(cls, name: str) -> SynthConfig:
        """Named sizes: toy (seconds), method (small, with a strong planted style signal: what
        the method's own tests train on), default, 1m and 10m impressions (1M items)."""
        presets = {
            "toy": cls(num_users=600, num_items=2_000, num_categories=20),
            "method": cls(
                num_users=1_200, num_items=300, num_categories=10, style_weight=2.5, max_sessions=16
            ),
            "default": cls(),
            "1m": cls(num_users=15_625, num_items=1_000_000, num_categories=2_000),
            "10m": cls(num_users=156_250, num_items=1_000_000, num_categories=2_000),
        }
        if name not in presets:
            raise ValueError(f"unknown synth preset {name!r}; choose from {sorted(presets)}")
        return presets[name]


class _Catalogue:
    """Items with categories, styles and popularity, and vectorised samplers over them."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator) -> None:
        n_items, n_cat, n_sty = cfg.num_items, cfg.num_categories, cfg.num_styles
        if not 1 <= cfg.organic_clicks <= 3:
            raise ValueError("organic_clicks must be 1, 2 or 3")
        if n_items < n_cat:
            raise ValueError("num_items must be at least num_categories")
        cat_weight = 1.0 / np.arange(1, n_cat + 1) ** 0.8
        self.category_prob = cat_weight / cat_weight.sum()
        # every category gets at least one item; the rest follow the Zipf weights
        category = np.concatenate(
            [np.arange(n_cat), rng.choice(n_cat, size=n_items - n_cat, p=self.category_prob)]
        )
        self.category = rng.permutation(category).astype(np.int64)
        self.style = rng.integers(0, n_sty, size=n_items)
        self.popularity = rng.normal(0.0, 1.0, size=n_items)
        self.vector = rng.normal(0.0, 1.0, size=(n_items, 8)).astype(np.float32)
        weight = np.exp(self.popularity)
        self._cat_sampler = _GroupSampler(self.category, weight, n_cat)
        self._style_sampler = _GroupSampler(
            self.category * n_sty + self.style, weight, n_cat * n_sty
        )
        self.num_styles = n_sty

    def sample_in_category(self, rng: np.random.Generator, category: np.ndarray) -> np.ndarray:
        return self._cat_sampler.sample(rng, category)

    def sample_in_style(
        self, rng: np.random.Generator, category: np.ndarray, style: np.ndarray
    ) -> np.ndarray:
        group = category * self.num_styles + style
        items = self._style_sampler.sample(rng, group)
        empty = items < 0  # a (category, style) group with no item: fall back to the category
        if empty.any():
            items[empty] = self._cat_sampler.sample(rng, category[empty])
        return items


IMPRESSION_SIDE_SCHEMA = (
    IMPRESSION_WRITE_SCHEMA.append(pa.field("user_segment", pa.int64()))
    .append(pa.field("user_activity", pa.float32()))
    .append(pa.field("user_interests", pa.list_(pa.int64())))
)
NUM_SEGMENTS = 8
NUM_TIERS = 4
NUM_INTERESTS = 16
SIDE_FEATURES = [
    FeatureSpec("user_segment", "id", "impression", NUM_SEGMENTS),
    FeatureSpec("user_activity", "dense", "impression"),
    FeatureSpec("user_interests", "ids", "impression", NUM_INTERESTS),
    FeatureSpec("item_tier", "id", "item", NUM_TIERS),
]


class _SideFeatures:
    """The planted side features, from their own random stream (``[seed, 7]``)."""

    def __init__(self, cfg: SynthConfig) -> None:
        rng = np.random.default_rng([cfg.seed, 7])
        self.item_tier = rng.integers(0, NUM_TIERS, size=cfg.num_items)
        self.segment_tier = rng.normal(0.0, 0.7, size=(NUM_SEGMENTS, NUM_TIERS))

    def users(self, cfg: SynthConfig, first_user: int, n_sessions: np.ndarray) -> dict:
        rng = np.random.default_rng([cfg.seed, 7, first_user])
        n = len(n_sessions)
        count = rng.integers(1, 4, size=n)
        interests = (
            np.concatenate([rng.choice(NUM_INTERESTS, size=c, replace=False) for c in count])
            if n
            else np.zeros(0, dtype=np.int64)
        )
        mid = (cfg.min_sessions + cfg.max_sessions) / 2
        spread = max(1.0, (cfg.max_sessions - cfg.min_sessions) / 2)
        return {
            "segment": rng.integers(0, NUM_SEGMENTS, size=n),
            "activity": (n_sessions + rng.normal(0, 2, size=n)).astype(np.float32),
            "activity_effect": 0.3 * (n_sessions - mid) / spread,
            "interest_offsets": lengths_to_offsets(count),
            "interests": interests.astype(np.int64),
        }

    def logit(self, user: dict, ad_item: np.ndarray, ad_cat: np.ndarray) -> np.ndarray:
        """[n, A] logit shift of each user's ads."""
        n = len(user["segment"])
        tier = self.segment_tier[user["segment"][:, None], self.item_tier[ad_item]]
        liked = np.zeros(ad_cat.shape, dtype=bool)
        owner = np.repeat(np.arange(n), np.diff(user["interest_offsets"]))
        hit = np.zeros((n, NUM_INTERESTS), dtype=bool)
        hit[owner, user["interests"]] = True
        liked = hit[np.arange(n)[:, None], ad_cat % NUM_INTERESTS]
        return tier + user["activity_effect"][:, None] + 0.5 * liked


class _GroupSampler:
    """Draws an item from a group (category, or category x style) weighted by popularity."""

    def __init__(self, group: np.ndarray, weight: np.ndarray, num_groups: int) -> None:
        self.order = np.argsort(group, kind="stable")
        sorted_weight = weight[self.order]
        self.cum = np.cumsum(sorted_weight)
        totals = np.bincount(group, weights=weight, minlength=num_groups)
        self.base = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
        self.total = totals

    def sample(self, rng: np.random.Generator, group: np.ndarray) -> np.ndarray:
        target = self.base[group] + rng.random(len(group)) * self.total[group]
        pos = np.minimum(np.searchsorted(self.cum, target, side="right"), len(self.cum) - 1)
        items = self.order[pos].astype(np.int64)
        items[self.total[group] <= 0] = -1
        return items


def _simulate_chunk(
    cfg: SynthConfig,
    cat: _Catalogue,
    rng: np.random.Generator,
    first_user: int,
    n: int,
    side: _SideFeatures | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Simulate ``n`` users. Returns (impression columns + history ranges, click stream)."""
    S, A, F = cfg.max_sessions, cfg.ads_per_session, cfg.favourite_categories
    favourites = (
        np.stack(
            [
                rng.choice(cfg.num_categories, size=F, replace=False, p=cat.category_prob)
                for _ in range(n)
            ]
        )
        if n
        else np.zeros((0, F), dtype=np.int64)
    )
    fav_weight = rng.dirichlet(np.ones(F), size=n)
    style = rng.integers(0, cfg.num_styles, size=(n, F))
    user_vec = rng.normal(0.0, 1.0, size=(n, 8)).astype(np.float32)
    n_sessions = rng.integers(cfg.min_sessions, cfg.max_sessions + 1, size=n)
    span = cfg.days * DAY - 4 * S
    times = np.sort(rng.integers(0, span, size=(n, S)), axis=1) + 4 * np.arange(S)  # strictly up
    # a random subset of the time-sorted session slots is active: activity stays uniform in time
    active = np.argsort(np.argsort(rng.random((n, S)), axis=1), axis=1) < n_sessions[:, None]
    rows = np.arange(n)
    pos_bias = -0.35 * np.arange(A)
    user_side = side.users(cfg, first_user, n_sessions) if side is not None else None

    # events per session: G organic clicks (at t-G..t-1), then A ad clicks (at t)
    G = cfg.organic_clicks
    ev_item = np.zeros((n, S, G + A), dtype=np.int64)
    ev_cat = np.zeros((n, S, G + A), dtype=np.int64)
    ev_time = np.zeros((n, S, G + A), dtype=np.int64)
    ev_valid = np.zeros((n, S, G + A), dtype=bool)
    imp = {k: np.zeros((n, S, A), dtype=np.int64) for k in ("item", "cat", "query", "label", "pos")}

    for s in range(S):
        switch = rng.random((n, F)) < cfg.style_switch_prob
        style = np.where(switch, rng.integers(0, cfg.num_styles, size=(n, F)), style)
        slot = (rng.random((n, 1)) < fav_weight.cumsum(axis=1)).argmax(axis=1)
        from_fav = rng.random(n) < 0.85
        query = np.where(
            from_fav,
            favourites[rows, slot],
            rng.choice(cfg.num_categories, size=n, p=cat.category_prob),
        )
        q_is_fav = favourites == query[:, None]
        q_style = np.where(
            q_is_fav.any(axis=1),
            style[rows, q_is_fav.argmax(axis=1)],
            rng.integers(0, cfg.num_styles, size=n),
        )
        for j in range(G):
            # the last organic click is in the query category; earlier ones browse another
            # favourite category: histories interleave categories
            if j == G - 1:
                o_cat, o_style = query, q_style
            else:
                o_slot = (rng.random((n, 1)) < fav_weight.cumsum(axis=1)).argmax(axis=1)
                o_cat, o_style = favourites[rows, o_slot], style[rows, o_slot]
            ev_item[:, s, j] = cat.sample_in_style(rng, o_cat, o_style)
            ev_cat[:, s, j] = o_cat
            ev_time[:, s, j] = times[:, s] - G + j
            ev_valid[:, s, j] = (rng.random(n) < cfg.organic_prob) & active[:, s]

        ad_cat = np.where(
            rng.random((n, A)) < 0.7,
            query[:, None],
            rng.choice(cfg.num_categories, size=(n, A), p=cat.category_prob),
        )
        ad_item = cat.sample_in_category(rng, ad_cat.reshape(-1)).reshape(n, A)
        is_fav = favourites[:, None, :] == ad_cat[:, :, None]  # (n, A, F)
        fav_style = np.take_along_axis(style, is_fav.argmax(axis=2), axis=1)
        match = is_fav.any(axis=2) & (fav_style == cat.style[ad_item])
        affinity = (cat.vector[ad_item] * user_vec[:, None, :]).sum(axis=2) / np.sqrt(8.0)
        logit = (
            -2.4
            + pos_bias[None, :]
            + 0.6 * (ad_cat == query[:, None])
            + 0.5 * is_fav.any(axis=2)
            + 0.35 * cat.popularity[ad_item]
            + 0.5 * affinity
            + cfg.style_weight * match
        )
        if side is not None:
            logit = logit + side.logit(user_side, ad_item, ad_cat)
        label = rng.random((n, A)) < 1.0 / (1.0 + np.exp(-logit))
        imp["item"][:, s], imp["cat"][:, s], imp["query"][:, s] = ad_item, ad_cat, query[:, None]
        imp["label"][:, s], imp["pos"][:, s] = label, np.arange(A)[None, :]
        ev_item[:, s, G:], ev_cat[:, s, G:] = ad_item, ad_cat
        ev_time[:, s, G:] = times[:, s, None]
        ev_valid[:, s, G:] = label & active[:, s, None]

    # click stream per user, time-ordered (session order, organic before ads)
    valid_flat = ev_valid.reshape(n, -1)
    clicks_per_user = valid_flat.sum(axis=1)
    user_click_start = lengths_to_offsets(clicks_per_user)[:-1]
    clicks = {
        "item": ev_item.reshape(n, -1)[valid_flat],
        "cat": ev_cat.reshape(n, -1)[valid_flat],
        "time": ev_time.reshape(n, -1)[valid_flat],
        "count": clicks_per_user,
        "user": first_user + np.arange(n, dtype=np.int64),
    }
    # clicks strictly before each session's ads = valid events up to its last organic slot
    before = np.cumsum(valid_flat, axis=1).reshape(n, S, G + A)[:, :, G - 1]
    imp_active = np.broadcast_to(active[:, :, None], (n, S, A))
    users = np.broadcast_to(rows[:, None, None], (n, S, A))[imp_active]
    ends = user_click_start[users] + np.broadcast_to(before[:, :, None], (n, S, A))[imp_active]
    impressions = {
        "user_id": first_user + users,
        "timestamp": np.broadcast_to(times[:, :, None], (n, S, A))[imp_active],
        "item_id": imp["item"][imp_active],
        "category_id": imp["cat"][imp_active],
        "query_category_id": imp["query"][imp_active],
        "label": imp["label"][imp_active],
        "position": imp["pos"][imp_active],
        "hist_end": ends,
        "hist_user_start": user_click_start[users],
    }
    if user_side is not None:
        impressions["user_segment"] = user_side["segment"][users]
        impressions["user_activity"] = user_side["activity"][users]
        off = user_side["interest_offsets"]
        impressions["interest_start"], impressions["interest_count"] = (
            off[users],
            np.diff(off)[users],
        )
        impressions["interest_values"] = user_side["interests"]
    return impressions, clicks


def _impression_table(
    imp: dict[str, np.ndarray], clicks: dict[str, np.ndarray], mask: np.ndarray, max_history: int
) -> pa.Table:
    starts, lengths = suffix_ranges(
        imp["hist_user_start"][mask], imp["hist_end"][mask], max_history
    )
    idx = gather_ranges(starts, lengths)
    offsets = lengths_to_offsets(lengths)
    columns = {
        k: imp[k][mask]
        for k in (
            "user_id",
            "timestamp",
            "item_id",
            "category_id",
            "query_category_id",
            "label",
            "position",
        )
    }
    columns["label"] = columns["label"].astype(np.int8)
    columns["position"] = columns["position"].astype(np.int8)
    columns["hist_item_ids"] = list_array(offsets, clicks["item"][idx])
    columns["hist_category_ids"] = list_array(offsets, clicks["cat"][idx])
    columns["hist_timestamps"] = list_array(offsets, clicks["time"][idx])
    schema = IMPRESSION_WRITE_SCHEMA
    if "user_segment" in imp:
        schema = IMPRESSION_SIDE_SCHEMA
        columns["user_segment"] = imp["user_segment"][mask]
        columns["user_activity"] = imp["user_activity"][mask]
        count = imp["interest_count"][mask]
        flat = gather_ranges(imp["interest_start"][mask], count)
        columns["user_interests"] = list_array(
            lengths_to_offsets(count), imp["interest_values"][flat]
        )
    return pa.table(columns, schema=schema)


def _sequence_table(clicks: dict[str, np.ndarray], split_time: int) -> pa.Table:
    """Per-user clicks before the test day, oldest first (the pre-training corpus)."""
    keep = clicks["time"] < split_time
    owner = np.repeat(np.arange(len(clicks["count"])), clicks["count"])
    lengths = np.bincount(owner[keep], minlength=len(clicks["count"]))
    has = lengths > 0
    offsets = lengths_to_offsets(lengths[has])
    return pa.table(
        {
            "user_id": clicks["user"][has],
            "item_ids": list_array(offsets, clicks["item"][keep]),
            "category_ids": list_array(offsets, clicks["cat"][keep]),
            "timestamps": list_array(offsets, clicks["time"][keep]),
        },
        schema=SEQUENCE_SCHEMA,
    )


def generate(cfg: SynthConfig, out: str | Path, overwrite: bool = False) -> DatasetMeta:
    """Simulate and write a dataset directory atomically. Returns its metadata."""
    rng = np.random.default_rng(cfg.seed)
    catalogue = _Catalogue(cfg, rng)
    side = _SideFeatures(cfg) if cfg.side_features else None
    split_time = (cfg.days - 1) * DAY
    counts = {"train": 0, "test": 0, "sequences": 0, "clicks": 0}
    impression_schema = IMPRESSION_WRITE_SCHEMA
    with atomic_directory(out, overwrite=overwrite, marker=META_FILE) as tmp:
        columns = {
            "item_id": np.arange(cfg.num_items, dtype=np.int64),
            "category_id": catalogue.category,
        }
        items_schema = ITEMS_SCHEMA
        if side is not None:
            columns["item_tier"] = side.item_tier.astype(np.int64)
            items_schema = items_schema.append(pa.field("item_tier", pa.int64()))
            impression_schema = IMPRESSION_SIDE_SCHEMA
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns, schema=items_schema), tmp / ITEMS_FILE, compression="zstd")
        writers = {
            "train": PartitionWriter(tmp / "train", impression_schema, cfg.row_group_size),
            "test": PartitionWriter(tmp / "test", impression_schema, cfg.row_group_size),
            "sequences": PartitionWriter(tmp / "sequences", SEQUENCE_SCHEMA, cfg.row_group_size),
        }
        progress = Progress(f"simulating {out}", cfg.num_users, "user")
        try:
            for first in range(0, cfg.num_users, cfg.users_per_chunk):
                n = min(cfg.users_per_chunk, cfg.num_users - first)
                chunk_rng = np.random.default_rng([cfg.seed, first])
                imp, clicks = _simulate_chunk(cfg, catalogue, chunk_rng, first, n, side)
                is_test = imp["timestamp"] >= split_time
                for split, mask in (("train", ~is_test), ("test", is_test)):
                    if mask.any():
                        writers[split].write(_impression_table(imp, clicks, mask, cfg.max_history))
                        counts[split] += int(mask.sum())
                seq = _sequence_table(clicks, split_time)
                writers["sequences"].write(seq)
                counts["sequences"] += seq.num_rows
                counts["clicks"] += int(clicks["count"].sum())
                progress.update(n, impressions=f"{counts['train'] + counts['test']:,}")
        finally:
            progress.close()
            for writer in writers.values():
                writer.close()
        meta = DatasetMeta(
            num_items=cfg.num_items,
            num_categories=cfg.num_categories,
            max_history=cfg.max_history,
            source="synth",
            num_users=cfg.num_users,
            features=list(SIDE_FEATURES) if side is not None else [],
            extra={
                "synth_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                "split_time": split_time,
                "rows": counts,
            },
        )
        meta.write(tmp)
    return meta
