"""MovieLens in the public format: GroupLens 100k / 1M layouts and the recbole copy."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from genctr_rec.cli import main
from genctr_rec.data import movielens
from genctr_rec.data.schema import DatasetMeta
from genctr_rec.data.validate import validate_dataset

# user, movie, rating, timestamp: user 1 clicks 10 (t=100) and 12 (t=300)
RATINGS = [
    (1, 10, 5, 100),
    (1, 11, 2, 200),
    (1, 12, 4, 300),
    (1, 10, 3, 900),
    (2, 11, 4, 150),
    (2, 12, 1, 250),
    (2, 10, 5, 800),
    (3, 12, 5, 50),
    (3, 11, 4, 400),
    (3, 10, 4, 950),
]


def _write_100k(folder: Path, extra: list[tuple[int, int, int, int]] = ()) -> Path:
    """The toy ratings (and ``extra`` ones) in GroupLens' 100k layout; movie 13 and user 4
    are described though only ``extra`` may rate or be."""
    folder.mkdir(parents=True)
    ratings = RATINGS + list(extra)
    (folder / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in ratings))
    genres = {10: [1, 5], 11: [8], 12: [], 13: [8]}  # Action+Comedy, Drama, none -> unknown
    lines = []
    for movie, flags in genres.items():
        bits = ["1" if i in flags else "0" for i in range(19)]
        lines.append("|".join([str(movie), f"Movie {movie}", "01-Jan-1995", "", "url"] + bits))
    (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (folder / "u.user").write_text(
        "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|K3A1X\n4|30|F|writer|10001\n"
    )
    return folder


def _write_1m(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in RATINGS))
    (folder / "movies.dat").write_text(
        "10::Movie 10 (1995)::Action|Comedy\n11::Movie 11::Drama\n12::Movie 12::Comedy\n",
        encoding="latin-1",
    )
    return folder


def test_100k_folder_mapping(tmp_path: Path) -> None:
    src = _write_100k(tmp_path / "ml-100k")
    meta = movielens.build(tmp_path / "out", src, max_history=5, test_fraction=0.2)
    assert meta.extra["categories"] == ["Action", "Drama", "unknown"]
    validate_dataset(tmp_path / "out")
    train = pq.read_table(tmp_path / "out" / "train").to_pylist()
    test = pq.read_table(tmp_path / "out" / "test").to_pylist()
    assert max(r["timestamp"] for r in train) < min(r["timestamp"] for r in test)
    assert [r["timestamp"] for r in test] == [900, 950]  # the last 20% of ratings by time
    # user 1 (dense id 0) at t=900: history = clicks strictly before, newest last: 10 then 12
    row = next(r for r in test if r["timestamp"] == 900)
    assert row["hist_item_ids"] == [0, 2] and row["label"] == 0
    assert row["hist_category_ids"] == [0, 2]
    assert row["query_category_id"] == row["category_id"] == 0
    labels = {(r["user_id"], r["timestamp"]): r["label"] for r in train + test}
    assert labels[(1, 150)] == 1 and labels[(0, 200)] == 0
    seq = {r["user_id"]: r for r in pq.read_table(tmp_path / "out" / "sequences").to_pylist()}
    assert seq[2]["item_ids"] == [2, 1]  # user 3: clicks at 50 and 400; 950 is in test
    assert max(max(r["timestamps"]) for r in seq.values()) < 900


def test_100k_side_features_are_declared_and_valid(tmp_path: Path) -> None:
    """User profile on every impression, release year and every genre per movie, declared in
    meta.json so that the validator checks them and the models read them."""
    src = _write_100k(tmp_path / "ml-100k")
    meta = movielens.build(tmp_path / "out", src, max_history=5, test_fraction=0.2)
    kinds = {f.name: (f.kind, f.where, f.vocab_size) for f in meta.features}
    assert kinds == {
        "user_age": ("dense", "impression", None),
        "user_gender": ("id", "impression", 2),
        "user_occupation": ("id", "impression", 3),
        "user_zip": ("id", "impression", 3),  # "8", "9", and "other" for a non-digit zip
        "item_genres": ("ids", "item", 3),
        "item_year": ("dense", "item", None),
    }
    assert meta.num_users == 3
    assert DatasetMeta.read(tmp_path / "out").features == meta.features
    validate_dataset(tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / "train").to_pylist()
    user2 = next(r for r in rows if r["user_id"] == 1)  # source user 2: 53, F, other, 94043
    assert user2["user_age"] == 53.0
    assert meta.extra["vocabularies"]["user_gender"][user2["user_gender"]] == "F"
    assert meta.extra["vocabularies"]["user_zip"][user2["user_zip"]] == "9"
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pylist()
    genres = meta.extra["vocabularies"]["item_genres"]
    assert [genres[g] for g in items[0]["item_genres"]] == ["Action", "Comedy"]  # movie 10
    assert items[2]["item_genres"] == [] and items[0]["item_year"] == 1995.0


def test_1m_zip_gives_first_genre(tmp_path: Path) -> None:
    folder = _write_1m(tmp_path / "ml-1m")
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in folder.iterdir():
            z.write(f, f"ml-1m/{f.name}")
    meta = movielens.build(tmp_path / "out", archive)
    assert meta.source == "movielens-1m"
    assert meta.extra["categories"] == ["Action", "Comedy", "Drama"]
    assert validate_dataset(tmp_path / "out")["train"]["rows"] == 9


@pytest.mark.slow
def test_default_source_is_hash_checked_ml100k(tmp_path: Path, monkeypatch) -> None:
    """No --source: MovieLens-100k from the recbole wheel, cached and SHA-256 checked."""
    monkeypatch.setenv("GENCTR_CACHE", str(tmp_path / "cache"))
    assert main(["data", "movielens", "--out", str(tmp_path / "ml")]) == 0
    meta = DatasetMeta.read(tmp_path / "ml")
    assert meta.num_items == 1682 and meta.num_categories == 19
    report = validate_dataset(tmp_path / "ml")
    assert report["train"]["rows"] + report["test"]["rows"] == 100_000
    cached = tmp_path / "cache" / "ml-100k-recbole" / "ml-100k.inter"
    cached.write_bytes(cached.read_bytes()[:-10])
    with pytest.raises(Exception, match="SHA-256"):
        movielens.fetch_ml100k()


def test_days_cut_by_time_with_ids_in_order_of_first_appearance(tmp_path: Path) -> None:
    """`--days 2`: three periods of equal rating count; day 0's test is day 1's train; movies
    and users numbered by first appearance, so a movie first rated late (13, by a new user 4)
    extends the catalogue without moving any earlier id."""
    src = _write_100k(tmp_path / "ml-100k", extra=[(4, 13, 5, 960)])
    metas = movielens.build_days(tmp_path / "out", days=2, source=src, max_history=5)
    day = [tmp_path / "out" / f"day-{k:02d}" for k in range(2)]
    for d in day:
        validate_dataset(d)
    assert [m.num_items for m in metas] == [3, 4] and [m.num_users for m in metas] == [3, 4]
    train = [pq.read_table(d / "train").to_pylist() for d in day]
    test = [pq.read_table(d / "test").to_pylist() for d in day]
    assert [r["timestamp"] for r in train[0]] == [50, 100, 150]
    assert test[0] == train[1]  # the same rows, the same ids
    assert [r["item_id"] for r in train[0]] == [0, 1, 2]  # movies 12, 10, 11: first seen order
    late = next(r for r in test[1] if r["timestamp"] == 960)
    assert (late["item_id"], late["user_id"]) == (3, 3)
    items = [pq.read_table(d / "items.parquet").to_pylist() for d in day]
    assert items[1][:3] == items[0]
    assert movielens.build(tmp_path / "whole", src).num_items == 4  # the one-split recipe
