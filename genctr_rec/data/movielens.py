"""MovieLens (GroupLens 100k / 1M, or RecBole's copy of 100k) in the public format.

Mapping (also in ``datasets/movielens.md``): every rating is an impression, a click is a rating
>= 4, the category is the movie's first genre, the query category is the movie's own category
(MovieLens has no searches). Users and movies are re-indexed densely. The split is by time: the
last ``test_fraction`` of the time range is test; histories hold only clicks strictly before the
impression, sequences only clicks strictly before the test period.

Declared side features (``meta.json`` ``features``), where the source has them: the user's age
(dense), gender, occupation and zip-code prefix (first character) on every impression; the
movie's release year (dense) and all its genres (multi-valued) in items.parquet.

With no ``--source``, the MovieLens-100k files are taken from the ``recbole`` wheel on the
Python package index (``recbole/dataset_example/ml-100k/``), cached, and checked by SHA-256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genctr_rec.data.features import FeatureSpec
from genctr_rec.data.jagged import gather_ranges, lengths_to_offsets, list_array, suffix_ranges
from genctr_rec.data.schema import (
    IMPRESSION_SCHEMA,
    ITEMS_FILE,
    ITEMS_SCHEMA,
    META_FILE,
    SEQUENCE_SCHEMA,
    DataFormatError,
    DatasetMeta,
)
from genctr_rec.data.writer import DatasetCut, PartitionWriter
from genctr_rec.storage import location, publish

logger = logging.getLogger(__name__)

RECBOLE_WHEEL = "recbole==1.2.1"
RBD = "recbole/dataset_example/ml-100k"  # inside the wheel
RECBOLE_FILES = {  # path inside the wheel -> sha256
    f"{RBD}/ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    f"{RBD}/ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    f"{RBD}/ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
# ml-100k u.item genre flags, in file order
ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
IMPRESSION_WRITE_SCHEMA = IMPRESSION_SCHEMA.append(
    pa.field("hist_timestamps", pa.list_(pa.int64()))
).append(pa.field("rating", pa.int8()))


@dataclass
class Ratings:
    """Raw ratings and the first genre of every movie, with the source's own ids; and, where
    the source has them, every movie's genres and release year and every user's profile."""

    user: np.ndarray
    movie: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    movie_genre: dict[int, str]
    movie_genres: dict[int, list[str]] = field(default_factory=dict)
    movie_year: dict[int, int] = field(default_factory=dict)
    # source user id -> (age, gender, occupation, zip code)
    user_profile: dict[int, tuple[int, str, str, str]] = field(default_factory=dict)


def default_cache_dir() -> Path:
    root = os.environ.get("GENCTR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "genctr-rec"
    )
    return Path(root)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_ml100k(cache_dir: Path | None = None) -> Path:
    """MovieLens-100k from the recbole wheel: downloaded once, hash-checked, cached."""
    cache = (cache_dir or default_cache_dir()) / "ml-100k-recbole"
    wanted = {Path(p).name: digest for p, digest in RECBOLE_FILES.items()}
    if all((cache / name).is_file() for name in wanted):
        for name, digest in wanted.items():
            if _sha256((cache / name).read_bytes()) != digest:
                raise DataFormatError(
                    cache / name,
                    "cached file fails its SHA-256 check; "
                    "delete the cache directory to fetch it again",
                )
        return cache
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("downloading %s from the package index for MovieLens-100k", RECBOLE_WHEEL)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "-d",
                tmp,
                RECBOLE_WHEEL,
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for inner, digest in RECBOLE_FILES.items():
                data = archive.read(inner)
                if _sha256(data) != digest:
                    raise DataFormatError(wheel, f"{inner} fails its SHA-256 check")
                part = cache / (Path(inner).name + ".part")
                part.write_bytes(data)
                os.replace(part, cache / Path(inner).name)
    return cache


def _read_text(source: Path, names: list[str]) -> tuple[str, str]:
    """Returns (member name, text) of the first of ``names`` in a folder or zip archive."""
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for member in archive.namelist():
                if Path(member).name in names:
                    return member, archive.read(member).decode("latin-1")
    elif source.is_dir():
        for name in names:
            hits = sorted(source.rglob(name))
            if hits:
                return str(hits[0]), hits[0].read_text(encoding="latin-1")
    raise DataFormatError(source, f"none of {names} found (expected a MovieLens folder or zip)")


def _parse_table(name: str, text: str, sep: str, ncols: int, skip_header: bool) -> list[list[str]]:
    rows = []
    lines = text.splitlines()
    for number, line in enumerate(lines[1:] if skip_header else lines, start=1 + skip_header):
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) < ncols:
            raise DataFormatError(
                name,
                f"expected {ncols} fields separated by {sep!r}, found {len(fields)}",
                row=number,
            )
        rows.append(fields)
    if not rows:
        raise DataFormatError(name, "file holds no rows")
    return rows


def _ints(
    name: str, rows: list[list[str]], column: int, label: str, skip_header: bool
) -> np.ndarray:
    try:
        return np.array([int(float(r[column])) for r in rows], dtype=np.int64)
    except ValueError:
        for number, r in enumerate(rows, start=1 + skip_header):
            try:
                int(float(r[column]))
            except ValueError:
                raise DataFormatError(name, f"not a number: {r[column]!r}", label, number) from None
        raise


def load_ratings(source: Path) -> Ratings:
    """Reads GroupLens ml-100k (u.data, u.item), ml-1m (ratings.dat, movies.dat) or RecBole."""
    member, text = _read_text(source, ["u.data", "ratings.dat", "ml-100k.inter"])
    base = Path(member).name
    if base == "u.data":
        rows, header, sep = _parse_table(member, text, "\t", 4, False), False, "\t"
    elif base == "ratings.dat":
        rows, header, sep = _parse_table(member, text, "::", 4, False), False, "::"
    else:
        rows, header, sep = _parse_table(member, text, "\t", 4, True), True, "\t"
    del sep
    user = _ints(member, rows, 0, "user_id", header)
    movie = _ints(member, rows, 1, "item_id", header)
    rating = _ints(member, rows, 2, "rating", header)
    ts = _ints(member, rows, 3, "timestamp", header)
    bad = (rating < 1) | (rating > 5)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataFormatError(member, f"rating {rating[r]} outside 1..5", "rating", r + 1 + header)

    item_member, item_text = _read_text(source, ["u.item", "movies.dat", "ml-100k.item"])
    all_genres: dict[int, list[str]] = {}
    years: dict[int, int] = {}
    item_base = Path(item_member).name
    if item_base == "u.item":
        for fields in _parse_table(item_member, item_text, "|", 24, False):
            flags = [i for i, f in enumerate(fields[5:24]) if f.strip() == "1"]
            all_genres[int(fields[0])] = [ML100K_GENRES[i] for i in flags]
            _year(years, int(fields[0]), fields[2][-4:])
    elif item_base == "movies.dat":
        for fields in _parse_table(item_member, item_text, "::", 3, False):
            names = [g.strip() for g in fields[2].split("|") if g.strip()]
            all_genres[int(fields[0])] = names
            found = re.search(r"\((\d{4})\)\s*$", fields[1])
            _year(years, int(fields[0]), found.group(1) if found else "")
    else:
        for fields in _parse_table(item_member, item_text, "\t", 4, True):
            all_genres[int(fields[0])] = fields[3].split()
            _year(years, int(fields[0]), fields[2])
    genres = {m: (g[0] if g else "unknown") for m, g in all_genres.items()}
    missing = ~np.isin(movie, np.fromiter(genres, dtype=np.int64))
    if missing.any():
        r = int(np.flatnonzero(missing)[0])
        raise DataFormatError(
            member, f"movie {movie[r]} has no entry in {item_member}", "item_id", r + 1 + header
        )
    return Ratings(user, movie, rating, ts, genres, all_genres, years, _load_users(source))


def _year(years: dict[int, int], movie: int, text: str) -> None:
    text = text.strip()
    if text.isdigit() and len(text) == 4:
        years[movie] = int(text)


def _load_users(source: Path) -> dict[int, tuple[int, str, str, str]]:
    """User profiles (age, gender, occupation, zip) from u.user, users.dat or RecBole's
    ml-100k.user; empty when the source has none (the dataset then declares no user features)."""
    try:
        member, text = _read_text(source, ["u.user", "users.dat", "ml-100k.user"])
    except DataFormatError:
        return {}
    base = Path(member).name
    profiles = {}
    if base == "users.dat":  # UserID::Gender::Age::Occupation::Zip-code
        for f in _parse_table(member, text, "::", 5, False):
            profiles[int(f[0])] = (int(f[2]), f[1].strip(), f[3].strip(), f[4].strip())
    else:  # user id | age | gender | occupation | zip (tab-separated with a header in RecBole)
        sep, header = ("|", False) if base == "u.user" else ("\t", True)
        for f in _parse_table(member, text, sep, 5, header):
            profiles[int(f[0])] = (int(f[1]), f[2].strip(), f[3].strip(), f[4].strip())
    return profiles


def _index(values: list[str]) -> tuple[dict[str, int], list[str]]:
    names = sorted(set(values))
    return {v: i for i, v in enumerate(names)}, names


def _side_features(
    ratings: Ratings, users: np.ndarray, movies: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, pa.Array], list[FeatureSpec], dict[str, list[str]]]:
    """Per dense user and item: the profile columns, the item columns, their feature specs and
    the vocabularies (for meta.json)."""
    specs: list[FeatureSpec] = []
    vocab: dict[str, list[str]] = {}
    user_cols: dict[str, np.ndarray] = {}
    profiles = ratings.user_profile
    if profiles and all(int(u) in profiles for u in users.tolist()):
        rows = [profiles[int(u)] for u in users.tolist()]
        gender_of, vocab["user_gender"] = _index([r[1] for r in rows])
        occupation_of, vocab["user_occupation"] = _index([r[2] for r in rows])
        # zip prefix: the first character (a US region); non-digits share one bucket
        zips = [r[3][:1] if r[3][:1].isdigit() else "other" for r in rows]
        zip_of, vocab["user_zip"] = _index(zips)
        user_cols = {
            "user_age": np.array([r[0] for r in rows], dtype=np.float32),
            "user_gender": np.array([gender_of[r[1]] for r in rows], dtype=np.int64),
            "user_occupation": np.array([occupation_of[r[2]] for r in rows], dtype=np.int64),
            "user_zip": np.array([zip_of[z] for z in zips], dtype=np.int64),
        }
        specs += [
            FeatureSpec("user_age", "dense", "impression"),
            FeatureSpec("user_gender", "id", "impression", len(vocab["user_gender"])),
            FeatureSpec("user_occupation", "id", "impression", len(vocab["user_occupation"])),
            FeatureSpec("user_zip", "id", "impression", len(vocab["user_zip"])),
        ]
    item_cols: dict[str, pa.Array] = {}
    genre_index, vocab["item_genres"] = _index(
        [g for m in movies.tolist() for g in ratings.movie_genres.get(m, [])]
    )
    genre_lists = [
        [genre_index[g] for g in ratings.movie_genres.get(m, [])] for m in movies.tolist()
    ]
    lengths = np.array([len(g) for g in genre_lists])
    item_cols["item_genres"] = list_array(
        lengths_to_offsets(lengths),
        np.array([g for genres in genre_lists for g in genres], dtype=np.int64),
    )
    specs.append(FeatureSpec("item_genres", "ids", "item", max(1, len(genre_index))))
    if ratings.movie_year:
        known = np.array(list(ratings.movie_year.values()), dtype=np.float32)
        fill = float(np.median(known))  # the few movies without a release date
        years = [ratings.movie_year.get(m, fill) for m in movies.tolist()]
        item_cols["item_year"] = pa.array(np.array(years, dtype=np.float32))
        specs.append(FeatureSpec("item_year", "dense", "item"))
    return user_cols, item_cols, specs, vocab


def _first_seen(index: np.ndarray, ts: np.ndarray, size: int) -> np.ndarray:
    """New id of each of ``size`` entities, numbered in order of first appearance in time."""
    first = np.full(size, np.iinfo(np.int64).max)
    np.minimum.at(first, index, ts)
    rank = np.empty(size, dtype=np.int64)
    rank[np.lexsort((np.arange(size), first))] = np.arange(size)
    return rank


def convert(
    ratings: Ratings,
    out: str | Path,
    max_history: int = 50,
    test_fraction: float = 0.1,
    source_name: str = "movielens",
    overwrite: bool = False,
) -> DatasetMeta:
    """Write ``ratings`` in the public format (atomically): the last ``test_fraction`` of
    ratings by time is the test split, on a timestamp boundary so that every test timestamp
    is strictly later than every train timestamp."""
    order_ts = np.sort(ratings.timestamp)
    split_time = int(order_ts[int(len(order_ts) * (1 - test_fraction))])
    if split_time <= order_ts[0]:
        raise DataFormatError(source_name, "cannot split by time: too few distinct timestamps")
    with publish(out, overwrite, marker=META_FILE, last=META_FILE) as tmp:
        end = np.iinfo(np.int64).max
        period = DatasetCut(tmp, 0, split_time, end, 0, 0, {"test_fraction": test_fraction})
        return _write(ratings, [period], max_history, source_name, by_appearance=False)[0]


def convert_days(
    ratings: Ratings,
    out: str | Path,
    days: int,
    window: int = 1,
    max_history: int = 50,
    source_name: str = "movielens",
    overwrite: bool = False,
) -> list[DatasetMeta]:
    """``genctr data movielens --days N``: the ratings cut by time into ``N + 1`` periods of
    equal count (on timestamp boundaries), written as ``out/day-00`` ...: period k (the
    ``window`` periods up to k) trains day k, period k + 1 tests it. Movies and users are
    numbered in order of first appearance, so each day's catalogue extends the day before's
    and ids are stable across days."""
    from contextlib import ExitStack

    if days < 1 or window < 1:
        raise ValueError("--days and --window must be at least 1")
    ts = np.sort(ratings.timestamp)
    cuts = [int(ts[0])]
    cuts += [int(ts[len(ts) * k // (days + 1)]) for k in range(1, days + 1)]
    cuts.append(int(ts[-1]) + 1)
    if len(set(cuts)) != len(cuts):
        raise DataFormatError(source_name, f"cannot cut {days + 1} periods: too few timestamps")
    _, movie_index = np.unique(ratings.movie, return_inverse=True)
    _, user_index = np.unique(ratings.user, return_inverse=True)
    with ExitStack() as stack:
        periods = []
        for k in range(days):
            target = location(out) / f"day-{k:02d}"
            tmp = stack.enter_context(publish(target, overwrite, META_FILE, last=META_FILE))
            before = ratings.timestamp < cuts[k + 2]
            periods.append(
                DatasetCut(
                    tmp,
                    cuts[max(0, k + 1 - window)],
                    cuts[k + 1],
                    cuts[k + 2],
                    len(np.unique(movie_index[before])),
                    len(np.unique(user_index[before])),
                    {"day": k, "window_days": window, "period_starts": cuts},
                )
            )
        return _write(ratings, periods, max_history, source_name, by_appearance=True)


def _write(
    ratings: Ratings,
    periods: list[DatasetCut],
    max_history: int,
    source_name: str,
    by_appearance: bool,
) -> list[DatasetMeta]:
    """Histories over the whole timeline, then each period's rows; returns their metadata."""
    genre_names = sorted(set(ratings.movie_genre.values()))
    genre_index = {g: i for i, g in enumerate(genre_names)}
    ts = ratings.timestamp
    movies, movie_index = np.unique(ratings.movie, return_inverse=True)
    users, user_index = np.unique(ratings.user, return_inverse=True)
    if by_appearance:  # renumber: ids in order of first appearance
        movie_rank = _first_seen(movie_index, ts, len(movies))
        user_rank = _first_seen(user_index, ts, len(users))
        movies[movie_rank] = movies.copy()
        users[user_rank] = users.copy()
        movie_index, user_index = movie_rank[movie_index], user_rank[user_index]
    item_category = np.array([genre_index[ratings.movie_genre[m]] for m in movies.tolist()])
    user_id = user_index.astype(np.int64)
    item = movie_index.astype(np.int64)
    category = item_category[item]
    label = (ratings.rating >= 4).astype(np.int8)
    user_cols, item_cols, specs, vocab = _side_features(ratings, users, movies)
    impression_schema = IMPRESSION_WRITE_SCHEMA
    for name, column in user_cols.items():
        impression_schema = impression_schema.append(
            pa.field(name, pa.from_numpy_dtype(column.dtype))
        )
    items_schema = ITEMS_SCHEMA
    for name, column in item_cols.items():
        items_schema = items_schema.append(pa.field(name, column.type))

    # per user, time-ordered: clicks before each rating (strictly earlier timestamp)
    order = np.lexsort((ts, user_id))
    u, t, it, cat, lab = user_id[order], ts[order], item[order], category[order], label[order]
    click = lab == 1
    c_user, c_ts, c_item, c_cat = u[click], t[click], it[click], cat[click]
    n_users = len(users)
    click_start = lengths_to_offsets(np.bincount(c_user, minlength=n_users))
    # number of the user's clicks with timestamp < t: search the (user, ts)-sorted click keys
    key = c_user.astype(np.int64) * (1 << 34) + c_ts
    ends = np.searchsorted(key, u.astype(np.int64) * (1 << 34) + t, side="left")
    starts, lengths = suffix_ranges(click_start[u], ends, max_history)
    idx = gather_ranges(starts, lengths)
    offsets = lengths_to_offsets(lengths)

    metas = []
    for period in periods:
        num_items = period.num_items or len(movies)
        num_users = period.num_users or n_users
        tmp = period.directory
        pq.write_table(
            pa.table(
                {
                    "item_id": np.arange(num_items),
                    "category_id": item_category[:num_items],
                    **{name: column[:num_items] for name, column in item_cols.items()},
                },
                schema=items_schema,
            ),
            tmp / ITEMS_FILE,
        )
        is_train = (t >= period.train_from) & (t < period.test_from)
        is_test = (t >= period.test_from) & (t < period.test_until)
        for split, mask in (("train", is_train), ("test", is_test)):
            rows = np.flatnonzero(mask)
            sub_off = lengths_to_offsets(lengths[rows])
            sub_idx = gather_ranges(offsets[rows], lengths[rows])
            table = pa.table(
                {
                    "user_id": u[rows],
                    "timestamp": t[rows],
                    "item_id": it[rows],
                    "category_id": cat[rows],
                    "query_category_id": cat[rows],
                    "label": lab[rows],
                    "hist_item_ids": list_array(sub_off, c_item[idx][sub_idx]),
                    "hist_category_ids": list_array(sub_off, c_cat[idx][sub_idx]),
                    "hist_timestamps": list_array(sub_off, c_ts[idx][sub_idx]),
                    "rating": ratings.rating[order][rows].astype(np.int8),
                    **{name: column[u[rows]] for name, column in user_cols.items()},
                },
                schema=impression_schema,
            )
            with PartitionWriter(tmp / split, impression_schema, 16_384) as writer:
                writer.write(table)
        before = c_ts < period.test_from
        seq_len = np.bincount(c_user[before], minlength=n_users)
        has = seq_len > 0
        seq_off = lengths_to_offsets(seq_len[has])
        seq = pa.table(
            {
                "user_id": np.flatnonzero(has),
                "item_ids": list_array(seq_off, c_item[before]),
                "category_ids": list_array(seq_off, c_cat[before]),
                "timestamps": list_array(seq_off, c_ts[before]),
            },
            schema=SEQUENCE_SCHEMA,
        )
        with PartitionWriter(tmp / "sequences", SEQUENCE_SCHEMA, 16_384) as writer:
            writer.write(seq)
        meta = DatasetMeta(
            num_items=num_items,
            num_categories=len(genre_names),
            max_history=max_history,
            source=source_name,
            num_users=num_users,
            features=specs,
            extra={
                "categories": genre_names,
                "vocabularies": vocab,
                "split_time": period.test_from,
                "click_threshold": 4,
                **period.extra,
                "rows": {
                    "train": int(is_train.sum()),
                    "test": int(is_test.sum()),
                    "sequences": int(has.sum()),
                },
            },
        )
        meta.write(tmp)
        metas.append(meta)
    return metas


def _source(source: str | Path | None) -> tuple[Path, str]:
    path = Path(source) if source else fetch_ml100k()
    if not path.exists():
        raise DataFormatError(path, "MovieLens source does not exist")
    return path, "movielens-1m" if "1m" in path.name.lower() else "movielens-100k"


def build(
    out: str | Path,
    source: str | Path | None = None,
    max_history: int = 50,
    test_fraction: float = 0.1,
    overwrite: bool = False,
) -> DatasetMeta:
    """``genctr data movielens``: from ``source`` (folder or zip) or the cached ml-100k."""
    path, name = _source(source)
    return convert(load_ratings(path), out, max_history, test_fraction, name, overwrite)


def build_days(
    out: str | Path,
    days: int,
    window: int = 1,
    source: str | Path | None = None,
    max_history: int = 50,
    overwrite: bool = False,
) -> list[DatasetMeta]:
    """``genctr data movielens --days N``: see :func:`convert_days`."""
    path, name = _source(source)
    return convert_days(load_ratings(path), out, days, window, max_history, name, overwrite)
