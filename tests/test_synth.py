"""The search-advertising simulator: valid, reproducible, and carrying its planted signal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genctr_rec.cli import main
from genctr_rec.data.schema import DatasetMeta
from genctr_rec.data.synth import (
    DAY,
    SynthConfig,
    _Catalogue,
    daily_world,
    generate,
    generate_days,
)
from genctr_rec.data.validate import validate_dataset


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.parquet"))
    }


def test_valid_and_split_by_time(toy_synth: Path) -> None:
    report = validate_dataset(toy_synth)
    assert report["train"]["history_causality"] == "checked"
    assert report["train"]["timestamps"][1] < report["test"]["timestamps"][0]
    assert 0.1 < report["train"]["click_rate"] < 0.4
    assert report["test"]["rows"] > 0.15 * report["train"]["rows"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    cfg = SynthConfig.preset("toy")
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    cfg.seed += 1
    generate(cfg, tmp_path / "c")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_history_in_the_ads_category_predicts_clicks(toy_synth: Path) -> None:
    """The planted signal: an ad whose style matches the user's last click in the same category
    is clicked far more often. Only a model reading the history by category can see it."""
    cfg = SynthConfig.preset("toy")
    style = _Catalogue(cfg, np.random.default_rng(cfg.seed)).style
    table = pq.read_table(toy_synth / "train").to_pydict()
    clicks = {True: [0, 0], False: [0, 0]}
    for item, cat, label, h_items, h_cats in zip(
        table["item_id"],
        table["category_id"],
        table["label"],
        table["hist_item_ids"],
        table["hist_category_ids"],
        strict=True,
    ):
        same_cat = [i for i, c in zip(h_items, h_cats, strict=True) if c == cat]
        if not same_cat:
            continue
        match = bool(style[same_cat[-1]] == style[item])
        clicks[match][0] += label
        clicks[match][1] += 1
    ctr_match = clicks[True][0] / clicks[True][1]
    ctr_other = clicks[False][0] / clicks[False][1]
    assert clicks[True][1] > 1000 and clicks[False][1] > 1000
    assert ctr_match > 1.8 * ctr_other, (ctr_match, ctr_other)


def test_the_oracle_scores_the_test_split_by_the_true_click_probability(
    toy_synth: Path, tmp_path: Path
) -> None:
    """meta.json carries the ceiling: the test split scored by the simulator's own click
    probabilities. Those are calibrated, and a weaker planted style signal lowers the ceiling."""
    oracle = DatasetMeta.read(toy_synth).extra["oracle_test"]
    true, blind = oracle["true_ctr"], oracle["without_position"]
    assert 0.95 < true["calibration"] < 1.05 and 0.95 < blind["calibration"] < 1.05
    assert 0.65 < blind["auc"] < true["auc"] < 0.95  # the position is worth reading
    weak = SynthConfig.preset("toy")
    weak.style_weight = 0.0
    generate(weak, tmp_path / "weak")
    weaker = DatasetMeta.read(tmp_path / "weak").extra["oracle_test"]["true_ctr"]
    assert weaker["auc"] < true["auc"] - 0.02


def test_sequences_hold_only_pre_test_clicks(toy_synth: Path) -> None:
    seq = pq.read_table(toy_synth / "sequences")
    test = pq.read_table(toy_synth / "test")
    last = max(max(ts) for ts in seq["timestamps"].to_pylist() if ts)
    assert last < min(test["timestamp"].to_pylist())


def _day_tables(root: Path, day: int) -> dict:
    d = root / f"day-{day:02d}"
    return {part: pq.read_table(d / part) for part in ("train", "test", "items.parquet")}


def test_days_are_a_chain_of_valid_datasets_on_stable_ids(tmp_path: Path) -> None:
    """`--days`: each day a valid dataset; day k's test is day k + 1's train; each catalogue
    extends the one before (same ids, same categories); new items and users arrive and are
    shown; every impression shows an item live on its day."""
    cfg = daily_world(SynthConfig.preset("toy"), 3)
    metas = generate_days(cfg, tmp_path / "world", 3)
    days = [_day_tables(tmp_path / "world", k) for k in range(3)]
    for k in range(3):
        validate_dataset(tmp_path / "world" / f"day-{k:02d}")
    sizes = [m.num_items for m in metas]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] == cfg.num_items
    assert metas[0].num_users < metas[-1].num_users == cfg.num_users
    for k in range(2):
        assert days[k]["test"].equals(days[k + 1]["train"])
        before, after = days[k]["items.parquet"], days[k + 1]["items.parquet"]
        assert after.slice(0, before.num_rows).equals(before)
    # items born on day 2 are shown (in day-01's test), never before
    new = np.asarray(days[1]["test"]["item_id"]) >= sizes[0]
    assert new.any()
    assert (np.asarray(days[0]["train"]["item_id"]) < sizes[0]).all()
    catalogue = _Catalogue(cfg, np.random.default_rng(cfg.seed))
    assert metas[-1].extra["retired_items"] > 0
    for k in range(3):
        for part in ("train", "test"):
            table = days[k][part]
            items = np.asarray(table["item_id"])
            day = np.asarray(table["timestamp"]) // DAY
            assert (catalogue.born[items] <= day).all() and (catalogue.retired[items] > day).all()
            hist = np.asarray(table["hist_item_ids"].combine_chunks().flatten())
            assert hist.max() < metas[k].num_items


def test_days_window_trains_on_the_days_up_to_k(tmp_path: Path) -> None:
    one = generate_days(daily_world(SynthConfig.preset("toy"), 2), tmp_path / "one", 2)
    two = generate_days(daily_world(SynthConfig.preset("toy"), 2), tmp_path / "two", 2, window=2)
    assert two[0].extra["rows"]["train"] == one[0].extra["rows"]["train"]
    assert two[1].extra["rows"]["train"] == sum(m.extra["rows"]["train"] for m in one)
    assert two[1].extra["rows"]["test"] == one[1].extra["rows"]["test"]


def _category_overlap(root: Path, last: int) -> float:
    """Share of a returning user's last-day clicked categories also clicked on day 0."""

    def clicked(table) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        rows = table.filter(pc.equal(table["label"], 1)).to_pydict()
        for user, cat in zip(rows["user_id"], rows["category_id"], strict=True):
            out.setdefault(user, set()).add(cat)
        return out

    first = clicked(pq.read_table(root / "day-00" / "train"))
    final = clicked(pq.read_table(root / f"day-{last:02d}" / "test"))
    shared = [len(final[u] & first[u]) / len(final[u]) for u in final if u in first]
    return float(np.mean(shared))


def test_interest_drift_moves_what_users_click(tmp_path: Path) -> None:
    still = daily_world(SynthConfig.preset("toy"), 4, {"interest_drift"})
    moving = daily_world(SynthConfig.preset("toy"), 4, {"interest_drift"})
    moving.interest_drift = 0.5
    generate_days(still, tmp_path / "still", 4)
    generate_days(moving, tmp_path / "moving", 4)
    assert _category_overlap(tmp_path / "moving", 3) < 0.8 * _category_overlap(
        tmp_path / "still", 3
    )


def test_days_cli_writes_each_day_and_refuses_window_without_days(tmp_path: Path, capsys) -> None:
    out = tmp_path / "world"
    assert main(["data", "synth", "--preset", "toy", "--days", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["day-00", "day-01"]
    assert DatasetMeta.read(out / "day-01").extra["world"]["item_growth"] == 0.4
    assert main(["data", "synth", "--window", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--window needs --days" in capsys.readouterr().err
    assert main(["data", "synth", "--days", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--days and --window must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
