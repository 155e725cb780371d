"""Warm start on a grown catalogue: yesterday's rows and optimizer state carried over exactly,
new rows as a fresh run's, at one process and at two ranks after resharding; errors for a
shrunk vocabulary, a contradicting flag and another model shape; the lineage recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from genctr_rec.cli import main
from genctr_rec.config import RunConfig, TrainConfig
from genctr_rec.data.schema import DatasetMeta
from genctr_rec.data.statistics import resolve_features
from tests.distributed import run_ranks
from tests.helpers import grow_catalogue, write_dataset

NEW_ITEMS, NEW_CATEGORIES = 13, 2
TRAIN = ["--epochs", "1", "--batch-size", "64", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def yesterday(tmp_path_factory) -> tuple[Path, Path]:
    """A fine-tuning run on today's data, and tomorrow's data with a grown catalogue."""
    root = tmp_path_factory.mktemp("warm")
    data = write_dataset(root / "day0")
    run = root / "run0"
    assert (
        main(["finetune", "--data", str(data), "--out", str(run), "--backbone", "dnn"] + TRAIN) == 0
    )
    grown = grow_catalogue(data, root / "day1", NEW_ITEMS, NEW_CATEGORIES)
    return run, grown


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def _plain(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """A DCP checkpoint as full tensors, whatever sharding wrote it."""
    dcp_to_torch_save(str(checkpoint), str(out))
    return _flat(torch.load(out, weights_only=False))


def _states(rank: int, world: int, data: str, previous: str, out: str, sharding: dict) -> None:
    """On every rank: build tomorrow's model fresh and warm-started, save both (DCP)."""
    from genctr_rec.distributed import init_distributed
    from genctr_rec.training.build import build_model
    from genctr_rec.training.warm_start import check_features, inherit, warm_start_model

    ctx = init_distributed()
    cfg = RunConfig("finetune", data, train=TrainConfig(batch_size=64, sharding=sharding))
    meta = DatasetMeta.read(data)
    cfg.num_items, cfg.num_categories = meta.num_items, meta.num_categories
    prev = inherit(cfg, previous, {})
    cfg.features = resolve_features(meta, data).to_json()
    check_features(prev, cfg)
    for name, warm in (("fresh", False), ("warm", True)):
        built = build_model(cfg, ctx)  # seeded: the same fresh rows both times
        built.dense_optimizer.init_state()
        if warm:
            warm_start_model(built, previous)
        dcp.save(built.app_state(), checkpoint_id=f"{out}/{name}")


@pytest.mark.slow
@pytest.mark.parametrize("world,sharding", [(1, {}), (2, {"item": "row_wise"})])
def test_warm_start_keeps_old_rows_and_their_optimizer_state(yesterday, tmp_path, world, sharding):
    run, grown = yesterday
    run_ranks(_states, world, str(grown), str(run), str(tmp_path), sharding)
    before = _plain(run / "checkpoint", tmp_path / "before.pt")
    fresh = _plain(tmp_path / "fresh", tmp_path / "fresh.pt")
    warm = _plain(tmp_path / "warm", tmp_path / "warm.pt")
    assert set(warm) == set(fresh)
    assert any(k.startswith("optim.") for k in before), "the selected model keeps its optimizer"
    grew, checked_optim = [], 0
    for key, old in before.items():
        if key not in warm:  # replicated at two ranks: its optimizer state restarts (warned)
            assert world == 2 and key.startswith("optim.state.fused."), key
            assert ".category." in key or ".features." in key, key
            continue
        new = warm[key]
        if new.shape == old.shape:
            torch.testing.assert_close(new, old, rtol=0, atol=0, msg=key)
        else:  # a table (or its optimizer state) that grew
            rows = old.shape[0]
            assert "embeddings.tables." in key and new.shape[1:] == old.shape[1:], key
            torch.testing.assert_close(new[:rows], old, rtol=0, atol=0, msg=key)
            torch.testing.assert_close(new[rows:], fresh[key][rows:], rtol=0, atol=0, msg=key)
            grew.append((key, rows, new.shape[0]))
            checked_optim += key.startswith("optim.")
    grown_tables = {(rows, after) for _, rows, after in grew}
    assert (50, 50 + NEW_ITEMS) in grown_tables and (5, 5 + NEW_CATEGORIES) in grown_tables
    assert checked_optim >= (2 if world == 1 else 1), grew  # the tables' row-wise Adagrad state
    # the new rows are not yesterday's: fresh initialisation, zero optimizer state
    item = next(k for k, r, a in grew if a == 50 + NEW_ITEMS and k.startswith("model."))
    assert warm[item][50:].abs().sum() > 0
    state = next(k for k, r, a in grew if a == 50 + NEW_ITEMS and k.startswith("optim."))
    assert torch.count_nonzero(warm[state][50:]) == 0 and torch.count_nonzero(warm[state][:50]) > 0


@pytest.mark.slow
def test_warm_start_trains_records_lineage_and_chains(yesterday, tmp_path):
    run, grown = yesterday
    day1 = tmp_path / "run1"
    assert (
        main(
            ["finetune", "--data", str(grown), "--out", str(day1), "--warm-start", str(run)] + TRAIN
        )
        == 0
    )
    cfg = json.loads((day1 / "config.json").read_text())
    assert cfg["warm_start"] == str(run) and cfg["lineage"] == [str(run)]
    assert cfg["backbone"] == "dnn" and cfg["num_items"] == 50 + NEW_ITEMS
    metrics = json.loads((day1 / "metrics.json").read_text())
    assert metrics["warm_start"] == str(run) and np.isfinite(metrics["test"]["logloss"])
    # the same command again resumes nothing new (finished) and accepts its own config
    assert (
        main(
            ["finetune", "--data", str(grown), "--out", str(day1), "--warm-start", str(run)] + TRAIN
        )
        == 0
    )
    day2 = tmp_path / "run2"
    assert (
        main(
            ["finetune", "--data", str(grown), "--out", str(day2), "--warm-start", str(day1)]
            + TRAIN
        )
        == 0
    )
    assert json.loads((day2 / "config.json").read_text())["lineage"] == [str(run), str(day1)]


def test_warm_start_refuses_what_it_cannot_continue(yesterday, tmp_path, capsys):
    run, grown = yesterday
    day0 = RunConfig.load(run).data

    def error(*args: str) -> str:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert main(["finetune", "--out", str(out), "--warm-start", str(run), *TRAIN, *args]) == 2
        return capsys.readouterr().err

    assert "contradicts --warm-start" in error("--data", str(grown), "--backbone", "dcnv2")
    assert "contradicts --warm-start" in error("--data", str(grown), "--dim", "8")
    shrunk = grow_catalogue(Path(day0), tmp_path / "shrunk", 0, 0)
    meta = json.loads((shrunk / "meta.json").read_text())
    meta["num_categories"] = 4
    (shrunk / "meta.json").write_text(json.dumps(meta))
    (shrunk / "test").rename(tmp_path / "unused")  # never read: refused before
    assert "never shrink" in error("--data", str(shrunk))
    both = error("--data", str(grown), "--init-from", str(run))
    assert "exclude each other" in both


def test_a_warm_start_from_another_stage_is_refused(yesterday, tmp_path, capsys):
    run, grown = yesterday
    code = main(
        [
            "pretrain",
            "--data",
            str(grown),
            "--out",
            str(tmp_path / "p"),
            "--warm-start",
            str(run),
            "--epochs",
            "1",
        ]
    )
    assert code == 2 and "is a finetune run" in capsys.readouterr().err


def test_growing_planner_refuses_another_shape():
    from genctr_rec.checkpoint import check_growth
    from genctr_rec.config import ConfigError

    check_growth("model.embeddings.tables.item.w", (5, 4), (9, 4))
    with pytest.raises(ConfigError, match="never shrink"):
        check_growth("model.embeddings.tables.item.w", (9, 4), (5, 4))
    with pytest.raises(ConfigError, match="keeps the model's shape"):
        check_growth("model.embeddings.tables.item.w", (5, 4), (5, 8))
    with pytest.raises(ConfigError, match="only tables may grow"):
        check_growth("model.backbone.mlp.0.weight", (5, 4), (6, 4))
