"""The search-advertising simulator: valid, reproducible, and carrying its planted signal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from genctr_rec.data.synth import SynthConfig, _Catalogue, generate
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


def test_sequences_hold_only_pre_test_clicks(toy_synth: Path) -> None:
    seq = pq.read_table(toy_synth / "sequences")
    test = pq.read_table(toy_synth / "test")
    last = max(max(ts) for ts in seq["timestamps"].to_pylist() if ts)
    assert last < min(test["timestamp"].to_pylist())
