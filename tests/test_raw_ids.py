"""Raw int64 ids without a remapping step (data/id_maps.py): a stable map kept with the run, the
dense view every reader reads, warm starts that keep rows, and serving that takes raw ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genctr_rec.calibration import Calibration
from genctr_rec.cli import main
from genctr_rec.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from genctr_rec.data.id_maps import ID_MAPS_DIR, IdMap, IdMaps, build_maps, write_dense_view
from genctr_rec.data.reader import ImpressionReader
from genctr_rec.data.schema import DataFormatError, DatasetMeta
from genctr_rec.data.synth import SynthConfig, daily_world, generate, generate_days, raw_id
from genctr_rec.data.validate import validate_dataset
from genctr_rec.serving.export import export_run, load_trained
from genctr_rec.serving.predictor import Predictor, Request, RequestError
from genctr_rec.training.finetune import finetune
from tests.distributed import torchrun
from tests.helpers import rewrite_column


def _toy(out: Path, raw: bool, **knobs) -> Path:
    cfg = SynthConfig.preset("toy")
    cfg.raw_ids = raw
    for name, value in knobs.items():
        setattr(cfg, name, value)
    generate(cfg, out)
    return out


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[Path, Path]:
    """The toy world twice: dense ids, and the same world with raw (log) ids."""
    root = tmp_path_factory.mktemp("twins")
    return _toy(root / "dense", raw=False), _toy(root / "raw", raw=True)


def test_the_dense_view_is_the_dense_dataset_with_rows_renamed(twins, tmp_path) -> None:
    """Mapping the raw world gives the dense world up to a renaming of rows: every column of
    every file agrees once each dense id is replaced by its row of the map."""
    dense, raw = twins
    meta = DatasetMeta.read(raw)
    assert meta.raw_ids == ("item_id", "user_id")
    maps = build_maps(raw, meta)
    assert maps.sizes() == {"item_id": 2000, "user_id": 600}
    # rows are the raw ids in ascending order (a fresh map)
    assert np.all(np.diff(maps["item_id"].raw) > 0)
    view = tmp_path / "view"
    write_dense_view(raw, meta, maps, view)
    item_row = maps["item_id"].rows(raw_id(np.arange(2000), "item"))
    user_row = maps["user_id"].rows(raw_id(np.arange(600), "user"))
    assert (item_row >= 0).all() and len(set(item_row)) == 2000
    for relative in ("items.parquet", "train", "test", "sequences"):
        theirs = pq.read_table(dense / relative).to_pydict()
        ours = pq.read_table(view / relative).to_pydict()
        assert ours.keys() == theirs.keys()
        for column, values in theirs.items():
            if column in ("item_id", "hist_item_ids", "item_ids"):
                values = [item_row[v].tolist() if isinstance(v, list) else int(item_row[v])
                          for v in values]  # fmt: skip
            elif column == "user_id":
                values = [int(user_row[v]) for v in values]
            assert ours[column] == values, (relative, column)
    view_meta = DatasetMeta.read(view)
    assert (view_meta.num_items, view_meta.num_users, view_meta.raw_ids) == (2000, 600, ())
    assert validate_dataset(view)["train"]["rows"] == validate_dataset(dense)["train"]["rows"]


def test_maps_keep_every_row_from_day_to_day(tmp_path) -> None:
    """Day 1's map is day 0's with the new items and users appended; an item that day 1's
    catalogue dropped keeps its row, category and features in the dense catalogue."""
    cfg = daily_world(SynthConfig.preset("toy"), 2)
    cfg.raw_ids = True
    generate_days(cfg, tmp_path / "days", days=2)
    day0, day1 = tmp_path / "days" / "day-00", tmp_path / "days" / "day-01"
    before = build_maps(day0, DatasetMeta.read(day0))
    view0 = tmp_path / "view0"
    write_dense_view(day0, DatasetMeta.read(day0), before, view0)
    # today's catalogue drops one of yesterday's items
    items = pq.read_table(day1 / "items.parquet")
    dropped = int(items.column("item_id")[7].as_py())
    pq.write_table(items.filter(pa.array(np.arange(items.num_rows) != 7)), day1 / "items.parquet")
    after = build_maps(day1, DatasetMeta.read(day1), before)
    for space in ("item_id", "user_id"):
        n = len(before[space])
        assert len(after[space]) > n
        assert np.array_equal(after[space].raw[:n], before[space].raw)
    view1 = tmp_path / "view1"
    write_dense_view(day1, DatasetMeta.read(day1), after, view1, previous_view=str(view0))
    row = int(after["item_id"].rows(np.array([dropped]))[0])

    def item_row(view: Path) -> dict:
        table = pq.read_table(view / "items.parquet").to_pylist()
        return next(r for r in table if r["item_id"] == row)

    assert item_row(view1) == item_row(view0)
    assert DatasetMeta.read(view1).num_items == len(after["item_id"])
    validate_dataset(view1)  # a complete dense catalogue: every row once
    # without the previous view, a dropped item is one error line
    with pytest.raises(DataFormatError, match=f"item {dropped} of the previous run's map"):
        write_dense_view(day1, DatasetMeta.read(day1), after, tmp_path / "view2")


def test_bad_raw_data_names_the_file_column_row_and_id(twins, tmp_path) -> None:
    _, raw = twins
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(raw, broken)
    train = sorted((broken / "train").glob("*.parquet"))[0]
    ids = pq.read_table(train).column("item_id").to_pylist()
    ids[5] = 123456789
    rewrite_column(train, "item_id", pa.array(ids, pa.int64()))
    with pytest.raises(DataFormatError) as err:
        validate_dataset(broken)
    assert (Path(err.value.path), err.value.column, err.value.row) == (train, "item_id", 5)
    assert "item 123456789 is not in items.parquet" in str(err.value)
    ids[5] = None
    rewrite_column(train, "item_id", pa.array(ids, pa.int64()))
    with pytest.raises(DataFormatError, match="null value") as err:
        validate_dataset(broken)
    assert (err.value.column, err.value.row) == ("item_id", 5)
    # a reader never takes raw ids for rows
    with pytest.raises(DataFormatError, match="declares raw_ids"):
        ImpressionReader(raw, "train", batch_size=8)
    meta = json.loads((broken / "meta.json").read_text())
    for wrong in (["item_id", "item_id"], ["category_id"], ["user_activity"], "item_id"):
        (broken / "meta.json").write_text(json.dumps({**meta, "raw_ids": wrong}))
        with pytest.raises(DataFormatError, match="raw_ids"):
            DatasetMeta.read(broken)


def test_an_id_map_round_trips_and_answers_unknown_ids(tmp_path) -> None:
    m = IdMap(np.array([2**62 + 5, -3, 17], dtype=np.int64))
    assert m.rows(np.array([17, -3, 2**62 + 5, 4])).tolist() == [2, 1, 0, -1]
    grown = m.grown(np.array([17, 9, 2**40, 9]))
    assert grown.raw.tolist() == [2**62 + 5, -3, 17, 9, 2**40]
    IdMaps({"item_id": grown}).write(tmp_path)
    assert IdMaps.read(tmp_path)["item_id"].raw.tolist() == grown.raw.tolist()
    assert IdMap(np.zeros(0, dtype=np.int64)).rows(np.array([1])).tolist() == [-1]


@pytest.fixture(scope="module")
def raw_run(twins, tmp_path_factory) -> Path:
    _, raw = twins
    run = tmp_path_factory.mktemp("rawrun") / "run"
    cfg = RunConfig(
        "finetune", str(raw), ModelConfig(), TrainConfig(epochs=1, batch_size=256, seed=4),
        backbone="dnn",
    )  # fmt: skip
    finetune(cfg, run)
    return run


@pytest.mark.slow
def test_served_raw_ids_score_as_the_trained_model(twins, raw_run, tmp_path) -> None:
    """A raw-id run, exported: requests built from the raw test split score what the trained
    model gives the same rows of the dense view; an unknown raw id reads the default row and
    is counted, or is refused naming its raw value."""
    _, raw = twins
    cfg = RunConfig.load(raw_run)
    assert cfg.raw_ids == ["item_id", "user_id"]
    assert IdMaps.read(raw_run / ID_MAPS_DIR).sizes() == {"item_id": 2000, "user_id": 600}
    artifact = tmp_path / "artifact"
    export_run(raw_run, artifact, compile_aoti="none")
    predictor = Predictor(artifact)
    _, trained = load_trained(raw_run)
    schema = predictor.schema
    view = ImpressionReader(cfg.reads, "test", 64, shuffle=False, features=schema)
    batch = next(iter(view))
    with torch.no_grad():
        # the artifact holds the run's Platt scaling: calibrated probabilities
        expected = Calibration.of_run(raw_run).probabilities(trained(*batch.model_inputs())).numpy()
    table = pq.read_table(raw / "test").slice(0, 64).to_pydict()
    names = [f.name for f in schema.of("impression")]
    requests = [
        Request(
            table["hist_item_ids"][i][-cfg.max_history :],
            table["hist_category_ids"][i][-cfg.max_history :],
            table["query_category_id"][i],
            [table["item_id"][i]],
            user_id=table["user_id"][i],
            features={n: table[n][i] for n in names},
        )
        for i in range(64)
    ]
    got = np.concatenate(predictor.score_prepared([predictor.prepare(r) for r in requests]))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert sum(predictor.unknown_ids.values()) == 0
    # a new ad (a raw id no map holds) is scored with the default row, and counted
    known = requests[0]
    new = Request(known.history_items, None, known.query_category, [987654321, 555],
                  user_id=known.user_id, features=known.features)  # fmt: skip
    scores = predictor.score(new)
    assert scores[0] == pytest.approx(scores[1])
    assert predictor.unknown_ids["candidates.item_id"] == 2
    strict = Predictor(artifact, oov="reject")
    with pytest.raises(RequestError, match="987654321 is not an id this model knows") as err:
        strict.prepare(new)
    assert err.value.field == "candidates.item_id[0]"


@pytest.mark.slow
def test_raw_ids_warm_start_keep_rows_and_another_dataset_is_refused(
    twins, raw_run, tmp_path, capsys
) -> None:
    dense, raw = twins
    # the same world, one more day's items: a warm start keeps every row and grows the tables
    grown = _toy(tmp_path / "grown", raw=True, num_items=2100)
    out = tmp_path / "warm"
    assert main(["finetune", "--data", str(grown), "--out", str(out), "--warm-start",
                 str(raw_run), "--epochs", "1", "--batch-size", "256"]) == 0  # fmt: skip
    before, after = IdMaps.read(raw_run / ID_MAPS_DIR), IdMaps.read(out / ID_MAPS_DIR)
    assert len(after["item_id"]) == 2100
    assert np.array_equal(after["item_id"].raw[:2000], before["item_id"].raw)
    assert RunConfig.load(out).num_items == 2100
    # a dense dataset cannot continue a raw-id run (its rows would be other ids)
    with pytest.raises(ConfigError, match="raw_ids"):
        finetune(RunConfig("finetune", str(dense), warm_start=str(raw_run)), tmp_path / "x")
    # a raw-id run reads its own dataset only
    with pytest.raises(ConfigError, match="reads its own dataset only"):
        export_run(raw_run, tmp_path / "y", data=grown)


@pytest.mark.slow
def test_two_ranks_warm_start_a_one_process_raw_run_on_grown_tables(raw_run, tmp_path) -> None:
    """Under torchrun: rank 0 writes the maps and the dense view while rank 1 waits, the grown
    tables are resharded row-wise from a one-process checkpoint, and the run trains."""
    grown = _toy(tmp_path / "grown", raw=True, num_items=2050, num_users=650)
    out = tmp_path / "two"
    args = ["finetune", "--data", str(grown), "--out", str(out), "--warm-start", str(raw_run),
            "--epochs", "1", "--batch-size", "128", "--sharding", "item=row_wise"]  # fmt: skip
    torchrun(args, tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["sharding"]["item"] == "row_wise"
    assert metrics["test"]["auc"] > 0.55
    maps = IdMaps.read(out / ID_MAPS_DIR)
    assert maps.sizes() == {"item_id": 2050, "user_id": 650}
    before = IdMaps.read(raw_run / ID_MAPS_DIR)["user_id"].raw
    assert np.array_equal(maps["user_id"].raw[:600], before)
