"""Broken datasets get a clear error naming file, column and first bad row, from both the
validator and the training reader; recipes that fail leave no partial output behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genctr_rec.cli import main
from genctr_rec.data import movielens, synth
from genctr_rec.data.reader import ImpressionReader
from genctr_rec.data.schema import DataFormatError, DatasetMeta
from genctr_rec.data.statistics import resolve_features
from genctr_rec.data.validate import validate_dataset
from tests.helpers import NUM_ITEMS

TRAIN0 = "train/part-00000.parquet"


def _break(root: Path, case: str) -> tuple[str, str | None, int | None]:
    """Apply one breakage; returns (file, column, row) the error must name."""
    path = root / TRAIN0
    table = pq.read_table(path)
    n = table.num_rows

    def set_col(name: str, array: pa.Array) -> None:
        t = table.set_column(table.schema.get_field_index(name), name, array)
        pq.write_table(t, path, row_group_size=64)

    if case == "missing_column":
        pq.write_table(table.drop_columns(["query_category_id"]), path)
        return TRAIN0, "query_category_id", None
    if case == "wrong_type":
        set_col("item_id", pa.array([str(v) for v in table["item_id"].to_pylist()]))
        return TRAIN0, "item_id", None
    if case == "id_out_of_range":
        ids = table["item_id"].to_numpy().copy()
        ids[77] = NUM_ITEMS
        set_col("item_id", pa.array(ids))
        return TRAIN0, "item_id", 77
    if case == "negative_id":
        ids = table["query_category_id"].to_numpy().copy()
        ids[130] = -1
        set_col("query_category_id", pa.array(ids))
        return TRAIN0, "query_category_id", 130
    if case == "history_id_out_of_range":
        items = table["hist_item_ids"].combine_chunks().to_pylist()
        row = next(i for i in range(200, n) if items[i])
        items[row][-1] = 10**6
        set_col("hist_item_ids", pa.array(items, type=pa.list_(pa.int64())))
        return TRAIN0, "hist_item_ids", row
    if case == "nan_label":
        labels = table["label"].to_numpy().astype(np.float64)
        labels[5] = np.nan
        set_col("label", pa.array(labels))
        return TRAIN0, "label", 5
    if case == "label_two":
        labels = table["label"].to_numpy().copy()
        labels[99] = 2
        set_col("label", pa.array(labels))
        return TRAIN0, "label", 99
    if case == "unequal_history":
        cats = table["hist_category_ids"].combine_chunks().to_pylist()
        items = table["hist_item_ids"].combine_chunks().to_pylist()
        row = next(i for i in range(150, n) if items[i])
        cats[row] = cats[row] + [0]
        set_col("hist_category_ids", pa.array(cats, type=pa.list_(pa.int64())))
        return TRAIN0, "hist_category_ids", row
    if case == "duplicate_column":  # Arrow allows two columns of one name
        pq.write_table(table.append_column("item_id", table["item_id"]), path)
        return TRAIN0, "item_id", None
    if case == "truncated_parquet":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return TRAIN0, None, None
    if case == "corrupt_parquet":
        data = bytearray(path.read_bytes())
        data[-40:-8] = b"\xff" * 32  # garbage in the footer's metadata
        path.write_bytes(bytes(data))
        return TRAIN0, None, None
    if case == "meta_missing":
        (root / "meta.json").unlink()
        return "meta.json", None, None
    if case == "meta_bad_value":
        meta = json.loads((root / "meta.json").read_text())
        meta["num_items"] = "many"
        (root / "meta.json").write_text(json.dumps(meta))
        return "meta.json", "num_items", None
    if case == "meta_inconsistent":
        # meta says fewer items than the data uses: ids beyond it are out of range
        meta = json.loads((root / "meta.json").read_text())
        meta["num_items"] = 10
        (root / "meta.json").write_text(json.dumps(meta))
        return "items.parquet", "item_id", None
    if case == "empty_dataset":
        for f in (root / "train").glob("*.parquet"):
            f.unlink()
        return "train", None, None
    if case == "empty_file":
        for f in (root / "train").glob("*.parquet"):
            pq.write_table(table.slice(0, 0), f)
        return "train", None, None
    raise AssertionError(case)


CASES = [
    "missing_column",
    "wrong_type",
    "id_out_of_range",
    "negative_id",
    "history_id_out_of_range",
    "nan_label",
    "label_two",
    "unequal_history",
    "duplicate_column",
    "truncated_parquet",
    "corrupt_parquet",
    "meta_missing",
    "meta_bad_value",
    "meta_inconsistent",
    "empty_dataset",
    "empty_file",
]
READER_SKIPS = {"meta_inconsistent"}  # the reader reports it as an out-of-range train id


def _assert_names(err: DataFormatError, where: str, column: str | None, row: int | None) -> None:
    message = str(err)
    assert where in message, message
    if column is not None:
        assert err.column == column and f"column '{column}'" in message, message
    if row is not None:
        assert err.row == row and re.search(rf"\brow {row}\b", message), message


@pytest.mark.parametrize("case", CASES)
def test_validator_names_file_column_row(small_dataset: Path, case: str) -> None:
    where, column, row = _break(small_dataset, case)
    with pytest.raises(DataFormatError) as info:
        validate_dataset(small_dataset)
    _assert_names(info.value, where, column, row)


@pytest.mark.parametrize("case", [c for c in CASES if c not in READER_SKIPS])
def test_reader_refuses_to_train_on_it(small_dataset: Path, case: str) -> None:
    where, column, row = _break(small_dataset, case)
    with pytest.raises(DataFormatError) as info:
        reader = ImpressionReader(small_dataset, "train", batch_size=32, shuffle=False)
        for _ in reader:
            pass
    _assert_names(info.value, where, column, row)


def test_reader_reports_inconsistent_meta_as_range_error(small_dataset: Path) -> None:
    _break(small_dataset, "meta_inconsistent")
    with pytest.raises(DataFormatError, match=r"outside the dense range \[0, 10\)") as info:
        for _ in ImpressionReader(small_dataset, "train", batch_size=32, shuffle=False):
            pass
    assert info.value.column in {"item_id", "hist_item_ids"}


def test_cli_prints_error_and_exits_nonzero(small_dataset: Path, capsys) -> None:
    _break(small_dataset, "label_two")
    assert main(["data", "validate", str(small_dataset)]) == 2
    err = capsys.readouterr().err
    assert "column 'label'" in err and "row 99" in err and TRAIN0 in err


SEQUENCES0 = "sequences/part-0.parquet"


def _break_sequences(root: Path, case: str) -> tuple[str, int]:
    """One breakage of the pre-training corpus; returns (column, row) the error must name."""
    path = root / SEQUENCES0
    table = pq.read_table(path)
    lists = {name: table[name].to_pylist() for name in ("item_ids", "timestamps")}
    row = next(i for i, items in enumerate(lists["item_ids"]) if len(items) > 2)
    column = "timestamps" if case != "item_out_of_range" else "item_ids"
    if case == "timestamps_unpaired":
        lists["timestamps"][row] = lists["timestamps"][row][:-1]
    elif case == "timestamps_backwards":
        lists["timestamps"][row] = lists["timestamps"][row][::-1]
    else:
        lists["item_ids"][row][1] = NUM_ITEMS
    for name, values in lists.items():
        at = table.schema.get_field_index(name)
        table = table.set_column(at, name, pa.array(values, type=pa.list_(pa.int64())))
    pq.write_table(table, path)
    return column, row


@pytest.mark.parametrize(
    "case", ["timestamps_unpaired", "timestamps_backwards", "item_out_of_range"]
)
def test_pretraining_refuses_a_broken_corpus(small_dataset: Path, tmp_path: Path, capsys, case):
    """The pre-training reader and the negative sampler check sequences/ as the validator does
    (before: unpaired or backward timestamps trained silently, an out-of-range id crashed the
    sampler with an IndexError); nothing is written for the run."""
    column, row = _break_sequences(small_dataset, case)
    with pytest.raises(DataFormatError) as info:
        validate_dataset(small_dataset)
    _assert_names(info.value, SEQUENCES0, column, row)
    out = tmp_path / "pre"
    code = main(["pretrain", "--data", str(small_dataset), "--out", str(out), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert SEQUENCES0 in err and f"column '{column}'" in err and f"row {row}" in err, err
    assert not (out / "checkpoint").exists() and not list(out.glob("checkpoints/*"))


@pytest.mark.parametrize("case", ["missing", "nan"])
def test_dense_feature_statistics_check_their_column(
    small_dataset: Path, tmp_path: Path, capsys, case: str
) -> None:
    """A declared dense feature is standardised with train/'s mean and deviation before any
    reader runs: that pass checks the column as the readers do (before: a missing column was
    an Arrow traceback, a NaN became the mean)."""
    meta = json.loads((small_dataset / "meta.json").read_text())
    meta["features"] = [{"name": "user_age", "kind": "dense", "where": "impression"}]
    (small_dataset / "meta.json").write_text(json.dumps(meta))
    for split in ("train", "test"):
        for path in sorted((small_dataset / split).glob("*.parquet")):
            table = pq.read_table(path)
            ages = np.full(table.num_rows, 30.0, dtype=np.float32)
            broken = path.name == Path(TRAIN0).name and split == "train"
            if broken and case == "nan":
                ages[7] = np.nan
            if not (broken and case == "missing"):
                table = table.append_column("user_age", pa.array(ages))
            pq.write_table(table, path)
    with pytest.raises(DataFormatError) as info:
        resolve_features(DatasetMeta.read(small_dataset), small_dataset)
    _assert_names(info.value, TRAIN0, "user_age", 7 if case == "nan" else None)
    if case == "missing":
        assert "file has: user_id" in str(info.value)
        out = tmp_path / "ft"
        args = ["finetune", "--data", str(small_dataset), "--out", str(out), "--backbone", "dnn"]
        assert main([*args, "--transfer", "none", "--epochs", "1"]) == 2
        err = capsys.readouterr().err
        assert TRAIN0 in err and "column 'user_age'" in err and "Traceback" not in err, err


def test_history_after_impression_is_rejected(small_dataset: Path) -> None:
    path = small_dataset / TRAIN0
    table = pq.read_table(path)
    lengths = np.diff(table["hist_item_ids"].combine_chunks().offsets.to_numpy())
    ts = table["timestamp"].to_numpy()
    hist_ts = [list(range(int(t) - int(k), int(t))) for t, k in zip(ts, lengths, strict=True)]
    row = int(np.flatnonzero(lengths)[3])
    hist_ts[row][-1] = int(ts[row])  # same second as the impression: not strictly earlier
    table = table.append_column("hist_timestamps", pa.array(hist_ts, type=pa.list_(pa.int64())))
    pq.write_table(table, path)
    with pytest.raises(DataFormatError) as info:
        validate_dataset(small_dataset)
    assert info.value.column == "hist_timestamps" and info.value.row == row


def test_test_split_must_follow_train(small_dataset: Path) -> None:
    path = small_dataset / "test" / "part-0.parquet"
    table = pq.read_table(path)
    ts = table["timestamp"].to_numpy().copy()
    ts[0] = 5
    pq.write_table(table.set_column(1, "timestamp", pa.array(ts)), path)
    with pytest.raises(DataFormatError, match="strictly later than train"):
        validate_dataset(small_dataset)


def test_movielens_bad_source_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "ml-100k"
    src.mkdir()
    (src / "u.data").write_text("1\t10\t5\t100\n2\t11\tfive\t101\n")
    (src / "u.item").write_text("10|A|x||u" + "|0" * 19 + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as info:
        movielens.build(out, src)
    assert info.value.column == "rating" and info.value.row == 2 and "u.data" in str(info.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ml-100k"], "no temporary directory left"


def test_failed_synth_keeps_previous_dataset(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "d"
    cfg = synth.SynthConfig.preset("toy")
    synth.generate(cfg, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def explode(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(synth, "_sequence_table", explode)
    with pytest.raises(OSError, match="No space"):
        synth.generate(cfg, out, overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_finetune_refuses_inconsistent_transfer(toy_synth: Path, tmp_path: Path, capsys) -> None:
    args = [
        "finetune",
        "--data",
        str(toy_synth),
        "--out",
        str(tmp_path / "ft"),
        "--backbone",
        "dnn",
        "--transfer",
        "ps_mi",
    ]
    assert main(args) == 2
    assert "needs --init-from" in capsys.readouterr().err
    assert main(args[:-2] + ["--transfer", "none", "--sharding", "item=diagonal"]) == 2
    assert "unknown sharding type 'diagonal'" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_every_training_option_has_its_help_from_the_config_docstrings() -> None:
    """``genctr finetune -h`` explains each flag with the dataclass's own Args entry."""
    import dataclasses

    from genctr_rec.cli import STAGE_ONLY, build_parser
    from genctr_rec.config import ModelConfig, TrainConfig

    stages = build_parser()._subparsers._group_actions[0].choices
    for stage in ("pretrain", "finetune"):
        helps = {a.dest: a.help for a in stages[stage]._actions}
        other = set().union(*(v for k, v in STAGE_ONLY.items() if k != stage))
        for cls in (ModelConfig, TrainConfig):
            for f in dataclasses.fields(cls):
                if f.name == "sharding":
                    continue
                if f.name in other:  # another stage's flag is not offered here
                    assert f.name not in helps, (stage, f.name)
                else:
                    assert helps.get(f.name), (stage, f.name)
    finetune = stages["finetune"]
    helps = {a.dest: a.help for a in finetune._actions}
    assert "replicated (data_parallel)" in helps["replicate_max_mb"]
    assert "sharded over ranks" in " ".join(finetune.format_help().split())


def test_evaluate_refuses_a_dataset_with_another_catalogue(
    runs: dict[str, Path], small_dataset: Path, capsys
) -> None:
    """A model trained on 2,000 items evaluated on a 50-item dataset: one clear line, exit 2,
    no AUC."""
    from genctr_rec.cli import main

    assert main(["evaluate", "--data", str(small_dataset), "--run", str(runs["genctr"])]) == 2
    err = capsys.readouterr().err
    assert "50 items / 5 categories; the model was trained on 2000 / 20" in err


def test_overwrite_replaces_only_what_genctr_wrote(
    runs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """--overwrite on a directory of the user's (no meta.json / artifact.json) deletes nothing;
    on a dataset genctr wrote it replaces it."""
    from genctr_rec.cli import main

    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("x")
    for argv in (
        ["data", "synth", "--preset", "toy", "--out", str(mine), "--overwrite"],
        ["export", "--run", str(runs["genctr"]), "--out", str(mine), "--overwrite"],
    ):
        assert main(argv) == 2
        assert "was not written by genctr" in capsys.readouterr().err
        assert (mine / "notes.txt").read_text() == "x" and (mine / "sub").is_dir()
    data = tmp_path / "data"
    assert main(["data", "synth", "--preset", "toy", "--out", str(data)]) == 0
    assert main(["data", "synth", "--preset", "toy", "--out", str(data), "--overwrite"]) == 0
    assert (data / "meta.json").is_file()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--valid-fraction", "1.5", "--valid-fraction must be in [0, 1)"),
        ("--epochs", "0", "--epochs must be positive"),
        ("--patience", "-1", "--patience must not be negative"),
    ],
)
def test_bad_training_numbers_are_one_line(
    small_dataset: Path, tmp_path: Path, capsys, flag: str, value: str, message: str
) -> None:
    from genctr_rec.cli import main

    out = tmp_path / "ft"
    argv = ["finetune", "--data", str(small_dataset), "--out", str(out), "--backbone", "dnn"]
    assert main([*argv, flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_dataset_without_clicks_trains_and_reports_undefined_figures(
    small_dataset: Path, tmp_path: Path
) -> None:
    """No click anywhere (a valid dataset by the format): fine-tuning runs, selects without
    crashing on an undefined validation AUC, writes strict JSON with null where AUC, GAUC, NE
    and calibration have no value (before: AUC 0.0 and GAUC NaN), and an int8 export skips the
    AUC check it cannot make instead of failing."""
    for split in ("train", "test"):
        for path in sorted((small_dataset / split).glob("*.parquet")):
            table = pq.read_table(path)
            at = table.schema.get_field_index("label")
            pq.write_table(
                table.set_column(at, "label", pa.array([0] * table.num_rows, pa.int8())), path
            )
    out = tmp_path / "ft"
    args = ["finetune", "--data", str(small_dataset), "--out", str(out), "--backbone", "dnn"]
    assert main([*args, "--transfer", "none", "--epochs", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=pytest.fail)
    test = metrics["test"]
    assert test["auc"] is None and test["gauc"] is None and test["ne"] is None
    assert test["calibration"] is None and test["logloss"] > 0
    assert len(metrics["valid"]) >= 2 and all(v["auc"] is None for v in metrics["valid"])
    art = tmp_path / "art"
    args = ["export", "--run", str(out), "--out", str(art), "--quantize", "int8"]
    assert main([*args, "--compile", "none"]) == 0
