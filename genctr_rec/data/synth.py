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
from genctr_rec.data.jagged import (
    gather_ranges,
    lengths_to_offsets,
    list_array,
    list_parts,
    suffix_ranges,
)
from genctr_rec.data.schema import (
    IMPRESSION_SCHEMA,
    ITEMS_FILE,
    ITEMS_SCHEMA,
    META_FILE,
    SEQUENCE_SCHEMA,
    DatasetMeta,
)
from genctr_rec.data.writer import DatasetCut, PartitionWriter
from genctr_rec.progress import Progress
from genctr_rec.storage import location, publish

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
        item_growth: share of the catalogue born after day 0 (evenly over the later days); ids
            are in order of birth, so each day's catalogue extends the day before's. The
            world knobs (``item_growth``, ``item_retirement``, ``user_growth``,
            ``interest_drift``) are 0 in every preset: a one-dataset world is static.
        item_retirement: daily chance that a live item is withdrawn (never shown again); one
            item per category never retires.
        user_growth: share of users born after day 0; user ids are in order of birth.
        interest_drift: daily chance that each favourite category of a user is replaced by
            a fresh one (with a fresh style).
        raw_ids: write item and user ids as a log would, 63-bit values (a fixed bijection
            of the dense ids) declared in meta.json's ``raw_ids``: a run maps them to rows
            (``data/id_maps.py``); the same id is the same item or user on every day.
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
    item_growth: float = 0.0
    item_retirement: float = 0.0
    user_growth: float = 0.0
    interest_drift: float = 0.0
    raw_ids: bool = False
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

    @property
    def changing(self) -> bool:
        """Whether the world changes from day to day (items or users born or retired, or
        interests drifting): the simulator then samples from each day's live catalogue."""
        return (
            self.item_growth > 0
            or self.item_retirement > 0
            or self.user_growth > 0
            or self.interest_drift > 0
        )


class _Catalogue:
    """Items with categories, styles and popularity, and vectorised samplers over them.

    In a changing world every item has a birth day and a retirement day, and the samplers draw
    from the items live on the session's day (groups are day x category); in a static world
    there is one day and the draws are exactly those of a world without days.
    """

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
        self.born = np.zeros(n_items, dtype=np.int64)
        self.retired = np.full(n_items, np.iinfo(np.int64).max)
        days = 1
        if cfg.changing:
            days = cfg.days
            self._age(cfg)
        live = (self.born[None, :] <= np.arange(days)[:, None]) & (
            self.retired[None, :] > np.arange(days)[:, None]
        )
        weight = np.exp(self.popularity)[None, :] * live  # [day, item]
        day_of = np.repeat(np.arange(days), n_items)
        self._item_of = np.tile(np.arange(n_items), days)
        day_cat = day_of * n_cat + self.category[self._item_of]
        self._cat_sampler = _GroupSampler(day_cat, weight.reshape(-1), days * n_cat)
        self._style_sampler = _GroupSampler(
            day_cat * n_sty + self.style[self._item_of], weight.reshape(-1), days * n_cat * n_sty
        )
        self.num_styles = n_sty
        self.num_categories = n_cat

    def _age(self, cfg: SynthConfig) -> None:
        """Birth and retirement days, from their own stream; ids are renumbered in order of
        birth (stable), so a day's catalogue is a prefix of the next day's."""
        rng = np.random.default_rng([cfg.seed, 11])
        n_items = cfg.num_items
        anchor = np.zeros(n_items, dtype=bool)  # one item per category: live from day 0, always
        anchor[np.unique(self.category, return_index=True)[1]] = True
        born = np.where(
            rng.random(n_items) < cfg.item_growth, rng.integers(1, max(2, cfg.days), n_items), 0
        )
        born[anchor] = 0
        life = rng.geometric(cfg.item_retirement, n_items) if cfg.item_retirement > 0 else None
        retired = np.iinfo(np.int64).max if life is None else born + life
        retired = np.where(anchor, np.iinfo(np.int64).max, retired)
        order = np.argsort(born, kind="stable")
        self.category, self.style = self.category[order], self.style[order]
        self.popularity, self.vector = self.popularity[order], self.vector[order]
        self.born = born[order]
        self.retired = np.broadcast_to(retired, (n_items,))[order].copy()

    def items_by(self, day: int) -> int:
        """Catalogue size once ``day`` has begun (items born on it or before)."""
        return int(np.searchsorted(self.born, day, side="right"))

    def sample_in_category(
        self, rng: np.random.Generator, category: np.ndarray, day: np.ndarray | int = 0
    ) -> np.ndarray:
        return self._item(self._cat_sampler.sample(rng, day * self.num_categories + category))

    def sample_in_style(
        self,
        rng: np.random.Generator,
        category: np.ndarray,
        style: np.ndarray,
        day: np.ndarray | int = 0,
    ) -> np.ndarray:
        group = (day * self.num_categories + category) * self.num_styles + style
        items = self._item(self._style_sampler.sample(rng, group))
        empty = items < 0  # a (category, style) group with no item: fall back to the category
        if empty.any():
            day_empty = day[empty] if isinstance(day, np.ndarray) else day
            items[empty] = self.sample_in_category(rng, category[empty], day_empty)
        return items

    def _item(self, entry: np.ndarray) -> np.ndarray:
        return np.where(entry < 0, -1, self._item_of[np.maximum(entry, 0)])


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
    activity = n_sessions  # sessions over a whole life: the side features' activity
    if cfg.changing:  # a user's sessions fall between their birth day and the world's end
        birth = user_birth_days(cfg)[first_user : first_user + n]
        # sessions in proportion to the days a user lives: activity per day does not depend
        # on when the user arrived
        lived = (cfg.days - birth) / cfg.days
        n_sessions = np.maximum(1, np.round(n_sessions * lived)).astype(np.int64)
        start = birth * DAY
        span = cfg.days * DAY - 4 * S - start
        offset = np.floor(rng.random((n, S)) * span[:, None]).astype(np.int64)
        times = start[:, None] + np.sort(offset, axis=1) + 4 * np.arange(S)
        drift = np.random.default_rng([cfg.seed, 13, first_user])
    else:
        span = cfg.days * DAY - 4 * S
        times = np.sort(rng.integers(0, span, size=(n, S)), axis=1) + 4 * np.arange(S)
    # (strictly increasing times)
    session_day = times // DAY if cfg.changing else np.zeros((n, S), dtype=np.int64)
    # a random subset of the time-sorted session slots is active: activity stays uniform in time
    active = np.argsort(np.argsort(rng.random((n, S)), axis=1), axis=1) < n_sessions[:, None]
    rows = np.arange(n)
    pos_bias = -0.35 * np.arange(A)
    user_side = side.users(cfg, first_user, activity) if side is not None else None

    # events per session: G organic clicks (at t-G..t-1), then A ad clicks (at t)
    G = cfg.organic_clicks
    ev_item = np.zeros((n, S, G + A), dtype=np.int64)
    ev_cat = np.zeros((n, S, G + A), dtype=np.int64)
    ev_time = np.zeros((n, S, G + A), dtype=np.int64)
    ev_valid = np.zeros((n, S, G + A), dtype=bool)
    imp = {k: np.zeros((n, S, A), dtype=np.int64) for k in ("item", "cat", "query", "label", "pos")}
    # the true click probability, and its mean over the ad positions (the ceiling of a model
    # that, like the default features, does not read the position)
    imp["prob"] = np.zeros((n, S, A), dtype=np.float64)
    imp["blind"] = np.zeros((n, S, A), dtype=np.float64)

    for s in range(S):
        day = session_day[:, s]
        if cfg.interest_drift > 0 and s > 0:  # each day passed may replace a favourite
            days_passed = (day - session_day[:, s - 1])[:, None]
            replace = drift.random((n, F)) < 1 - (1 - cfg.interest_drift) ** days_passed
            fresh = drift.choice(cfg.num_categories, size=(n, F), p=cat.category_prob)
            fresh_ok = replace & ~(fresh[:, :, None] == favourites[:, None, :]).any(axis=2)
            favourites = np.where(fresh_ok, fresh, favourites)
            style = np.where(fresh_ok, drift.integers(0, cfg.num_styles, size=(n, F)), style)
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
            ev_item[:, s, j] = cat.sample_in_style(rng, o_cat, o_style, day)
            ev_cat[:, s, j] = o_cat
            ev_time[:, s, j] = times[:, s] - G + j
            ev_valid[:, s, j] = (rng.random(n) < cfg.organic_prob) & active[:, s]

        ad_cat = np.where(
            rng.random((n, A)) < 0.7,
            query[:, None],
            rng.choice(cfg.num_categories, size=(n, A), p=cat.category_prob),
        )
        ad_day = np.repeat(day, A)
        ad_item = cat.sample_in_category(rng, ad_cat.reshape(-1), ad_day).reshape(n, A)
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
        prob = 1.0 / (1.0 + np.exp(-logit))
        label = rng.random((n, A)) < prob
        imp["prob"][:, s] = prob
        unplaced = logit - pos_bias[None, :]
        imp["blind"][:, s] = np.mean([1.0 / (1.0 + np.exp(-(unplaced + b))) for b in pos_bias], 0)
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
        "click_prob": imp["prob"][imp_active],
        "position_blind_prob": imp["blind"][imp_active],
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


# raw = (dense * _RAW_MULTIPLIER + offset) mod 2**63: a bijection (odd multiplier), so a dense
# id and its raw id name the same item or user everywhere and on every day
_RAW_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_RAW_OFFSETS = {"item": np.uint64(0x2545F4914F6CDD1D), "user": np.uint64(0x1F83D9ABFB41BD6B)}
_RAW_COLUMNS = {"item_id": "item", "hist_item_ids": "item", "item_ids": "item", "user_id": "user"}


def raw_id(dense: np.ndarray, space: str) -> np.ndarray:
    """The raw (log) id of dense ``item`` or ``user`` ids under ``SynthConfig.raw_ids``."""
    with np.errstate(over="ignore"):
        mixed = np.asarray(dense).astype(np.uint64) * _RAW_MULTIPLIER + _RAW_OFFSETS[space]
    return (mixed & np.uint64(2**63 - 1)).astype(np.int64)


def _as_raw(table: pa.Table) -> pa.Table:
    """``table`` with its item and user id columns (scalar or list) as raw ids."""
    for column, space in _RAW_COLUMNS.items():
        if column not in table.column_names:
            continue
        array = table.column(column).combine_chunks()
        if pa.types.is_list(array.type):
            offsets, values = list_parts(array)
            new = list_array(offsets, raw_id(values, space))
        else:
            new = pa.array(raw_id(array.to_numpy(), space), pa.int64())
        table = table.set_column(table.column_names.index(column), column, new)
    return table


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


def user_birth_days(cfg: SynthConfig) -> np.ndarray:
    """Each user's first day (non-decreasing in the id), from its own stream; all 0 in a static
    world."""
    if not cfg.changing:
        return np.zeros(cfg.num_users, dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, 12])
    later = rng.random(cfg.num_users) < cfg.user_growth
    return np.sort(np.where(later, rng.integers(1, max(2, cfg.days), cfg.num_users), 0))


def generate(cfg: SynthConfig, out: str | Path, overwrite: bool = False) -> DatasetMeta:
    """Simulate and write a dataset directory atomically: the last day is the test split.
    Returns its metadata."""
    split_time = (cfg.days - 1) * DAY
    with publish(out, overwrite, marker=META_FILE, last=META_FILE) as tmp:
        split = DatasetCut(tmp, 0, split_time, np.iinfo(np.int64).max, cfg.num_items, cfg.num_users)
        return _simulate(cfg, [split])[0]


DAILY_WORLD = {
    "item_growth": 0.4,
    "item_retirement": 0.04,
    "user_growth": 0.4,
    "interest_drift": 0.1,
}


def daily_world(cfg: SynthConfig, days: int, given: set[str] = frozenset()) -> SynthConfig:
    """``cfg`` made a changing world over ``days + 1`` days: the world knobs not in ``given``
    take ``DAILY_WORLD``'s values, and unless given, sessions per user scale with the days so
    a day holds as many impressions as a day of the preset's 4-day world."""
    for name, value in DAILY_WORLD.items():
        if name not in given:
            setattr(cfg, name, value)
    scale = (days + 1) / cfg.days
    for name in ("min_sessions", "max_sessions"):
        if name not in given:
            setattr(cfg, name, max(1, round(getattr(cfg, name) * scale)))
    return cfg


def generate_days(
    cfg: SynthConfig, out: str | Path, days: int, window: int = 1, overwrite: bool = False
) -> list[DatasetMeta]:
    """``genctr data synth --days N``: one world simulated over ``N + 1`` days, written as
    ``out/day-00`` ... ``out/day-{N-1}``, each a complete dataset: day k's impressions (the
    ``window`` days up to k with ``window > 1``) train it, day k + 1's test it, its catalogue
    and users are those born by day k + 1 (ids stable across days). Each directory is
    published atomically; a day already there is replaced only with ``overwrite``."""
    from contextlib import ExitStack

    if days < 1 or window < 1:
        raise ValueError("--days and --window must be at least 1")
    cfg.days = days + 1
    catalogue = _Catalogue(cfg, np.random.default_rng(cfg.seed))  # for the sizes only
    births = user_birth_days(cfg)
    world = {
        k: getattr(cfg, k)
        for k in ("item_growth", "item_retirement", "user_growth", "interest_drift")
    }
    with ExitStack() as stack:
        splits = []
        for k in range(days):
            target = location(out) / f"day-{k:02d}"
            tmp = stack.enter_context(publish(target, overwrite, META_FILE, last=META_FILE))
            live = (catalogue.born <= k) & (catalogue.retired > k)
            splits.append(
                DatasetCut(
                    tmp,
                    max(0, k + 1 - window) * DAY,
                    (k + 1) * DAY,
                    (k + 2) * DAY,
                    catalogue.items_by(k + 1),
                    int(np.searchsorted(births, k + 1, side="right")),
                    {
                        "day": k,
                        "window_days": window,
                        "world": world,
                        "live_items": int(live.sum()),
                        "new_items": int((catalogue.born == k + 1).sum()),
                        "retired_items": int((catalogue.retired <= k).sum()),
                        "new_users": int((births == k + 1).sum()),
                    },
                )
            )
        return _simulate(cfg, splits)


TRUTH_COLUMNS = ("click_prob", "position_blind_prob", "label", "user_id")


def _oracle(truth: list[dict[str, np.ndarray]]) -> dict | None:
    """The test split's metrics when every row is scored by its true click probability, and by
    its mean over the ad positions: the ceilings a model can reach in expectation, with and
    without reading the position (not a declared feature), so that a target above them is
    seen to be out of reach."""
    if not truth:
        return None
    from genctr_rec.metrics import ctr_metrics

    rows = {k: np.concatenate([t[k] for t in truth]) for k in TRUTH_COLUMNS}
    out = {}
    for name, column in (("true_ctr", "click_prob"), ("without_position", "position_blind_prob")):
        found = ctr_metrics(rows[column], rows["label"], rows["user_id"])
        out[name] = {k: found[k] for k in ("auc", "gauc", "logloss", "calibration")}
    return out


def _simulate(cfg: SynthConfig, splits: list[DatasetCut]) -> list[DatasetMeta]:
    """Simulate every user once and write each split's rows; returns each split's metadata."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(cfg.seed)
    catalogue = _Catalogue(cfg, rng)
    side = _SideFeatures(cfg) if cfg.side_features else None
    impression_schema = IMPRESSION_SIDE_SCHEMA if side is not None else IMPRESSION_WRITE_SCHEMA
    counts = [{"train": 0, "test": 0, "sequences": 0, "clicks": 0} for _ in splits]
    truths: list[list[dict[str, np.ndarray]]] = [[] for _ in splits]  # test rows' truth
    writers = []
    for split in splits:
        n = split.num_items
        columns = {"item_id": np.arange(n, dtype=np.int64), "category_id": catalogue.category[:n]}
        items_schema = ITEMS_SCHEMA
        if side is not None:
            columns["item_tier"] = side.item_tier[:n].astype(np.int64)
            items_schema = items_schema.append(pa.field("item_tier", pa.int64()))
        items = pa.table(columns, schema=items_schema)
        pq.write_table(
            _as_raw(items) if cfg.raw_ids else items,
            split.directory / ITEMS_FILE,
            compression="zstd",
        )
        writers.append(
            {
                part: PartitionWriter(split.directory / part, schema, cfg.row_group_size)
                for part, schema in (
                    ("train", impression_schema),
                    ("test", impression_schema),
                    ("sequences", SEQUENCE_SCHEMA),
                )
            }
        )
    progress = Progress("simulating", cfg.num_users, "user")
    try:
        for first in range(0, cfg.num_users, cfg.users_per_chunk):
            n = min(cfg.users_per_chunk, cfg.num_users - first)
            chunk_rng = np.random.default_rng([cfg.seed, first])
            imp, clicks = _simulate_chunk(cfg, catalogue, chunk_rng, first, n, side)
            for split, writer, count, truth in zip(splits, writers, counts, truths, strict=True):
                ts = imp["timestamp"]
                is_train = (ts >= split.train_from) & (ts < split.test_from)
                is_test = (ts >= split.test_from) & (ts < split.test_until)
                for part, mask in (("train", is_train), ("test", is_test)):
                    if mask.any():
                        table = _impression_table(imp, clicks, mask, cfg.max_history)
                        writer[part].write(_as_raw(table) if cfg.raw_ids else table)
                        count[part] += int(mask.sum())
                if is_test.any():
                    truth.append({k: imp[k][is_test] for k in TRUTH_COLUMNS})
                seq = _sequence_table(clicks, split.test_from)
                writer["sequences"].write(_as_raw(seq) if cfg.raw_ids else seq)
                count["sequences"] += seq.num_rows
                count["clicks"] += int((clicks["time"] < split.test_until).sum())
            progress.update(n, impressions=f"{sum(c['train'] for c in counts):,}")
    finally:
        progress.close()
        for writer in writers:
            for part in writer.values():
                part.close()
    metas = []
    for split, count, truth in zip(splits, counts, truths, strict=True):
        meta = DatasetMeta(
            num_items=split.num_items,
            num_categories=cfg.num_categories,
            max_history=cfg.max_history,
            source="synth",
            num_users=None if cfg.raw_ids else split.num_users,
            features=list(SIDE_FEATURES) if side is not None else [],
            raw_ids=("item_id", "user_id") if cfg.raw_ids else (),
            extra={
                "synth_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                "split_time": split.test_from,
                "rows": count,
                "oracle_test": _oracle(truth),
                **split.extra,
            },
        )
        meta.write(split.directory)
        metas.append(meta)
    return metas
