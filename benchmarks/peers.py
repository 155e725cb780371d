"""DeepCTR-Torch peers (DIN, DCNMix) on a dataset in our format, with the same features, the
same embedding width, the same validation split and the same epoch budget as ``genctr
finetune``: so that Table 1 can put a stock CTR library beside our rows.

Needs the benchmark extra (``pip install -r requirements/bench.txt``: deepctr-torch,
scikit-learn). Not used by the library or the tests.

Protocol, as for our runs: train on train/ minus its newest ``valid_fraction`` by timestamp,
validate after every epoch (up to ``max_epochs``), stop after ``patience`` epochs without a
better validation AUC, report test AUC / LogLoss of the best epoch. Features: user_id (unseen
users share one row), target item and category, query category, the history of items and
categories (DIN attends over it with the target as query; DCNMix mean-pools it), and every
declared side feature (``id`` / ``ids`` embedded, ``ids`` mean-pooled; ``dense`` standardised
with the training statistics).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from genctr_rec.data.catalogue import read_item_catalogue
from genctr_rec.data.schema import DatasetMeta, split_files
from genctr_rec.data.splits import ValidationSplit
from genctr_rec.data.statistics import resolve_features
from genctr_rec.metrics import ctr_metrics

PEERS = ("din", "dcnmix")


def _padded(lists: list[list[int]], width: int) -> np.ndarray:
    """Right-padded with 0, ids shifted by +1 (0 is DeepCTR's padding)."""
    out = np.zeros((len(lists), max(width, 1)), dtype=np.int64)
    for i, values in enumerate(lists):
        values = values[-width:] if width else []
        out[i, : len(values)] = np.asarray(values, dtype=np.int64) + 1
    return out


def _columns(data: Path, split: str, meta: DatasetMeta, schema, catalogue) -> dict[str, Any]:
    table = pq.read_table(split_files(data, split)).to_pydict()
    n = len(table["label"])
    hist = table["hist_item_ids"]
    cols: dict[str, Any] = {
        "user_id": np.minimum(np.asarray(table["user_id"]), schema.num_users) + 1,
        "item_id": np.asarray(table["item_id"]) + 1,
        "category_id": np.asarray(table["category_id"]) + 1,
        "query_category_id": np.asarray(table["query_category_id"]) + 1,
        "hist_item_id": _padded(hist, meta.max_history),
        "hist_category_id": _padded(table["hist_category_ids"], meta.max_history),
        "hist_len": np.array([min(len(h), meta.max_history) for h in hist], dtype=np.int64),
        "label": np.asarray(table["label"], dtype=np.float32),
        "timestamp": np.asarray(table["timestamp"]),
        "users": np.asarray(table["user_id"]),
    }
    items = cols["item_id"] - 1
    for spec in schema.features:
        if spec.where == "item":
            if spec.kind == "ids":
                jag = catalogue.lists[spec.name].rows(items)
                values = [
                    jag.values[s : s + k].tolist()
                    for s, k in zip(jag.starts, jag.lengths, strict=True)
                ]
            else:
                values = catalogue.scalars[spec.name][items]
        else:
            values = table[spec.name]
        if spec.kind == "ids":
            width = max(1, max((len(v) for v in values), default=1))
            cols[spec.name] = _padded(values, width)
            cols[f"{spec.name}_len"] = np.array([len(v) for v in values], dtype=np.int64)
        elif spec.kind == "id":
            cols[spec.name] = np.asarray(values, dtype=np.int64) + 1
        else:
            mean, std = schema.dense_stats[spec.name]
            cols[spec.name] = ((np.asarray(values, np.float64) - mean) / std).astype(np.float32)
    assert len(cols["label"]) == n
    return cols


def _feature_columns(meta: DatasetMeta, schema, cols: dict[str, Any], dim: int):
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    sparse = [
        SparseFeat("user_id", schema.num_users + 2, dim),
        SparseFeat("item_id", meta.num_items + 1, dim),
        SparseFeat("category_id", meta.num_categories + 1, dim),
        SparseFeat("query_category_id", meta.num_categories + 1, dim, embedding_name="category_id"),
    ]
    history = [
        VarLenSparseFeat(
            SparseFeat("hist_item_id", meta.num_items + 1, dim, embedding_name="item_id"),
            meta.max_history,
            length_name="hist_len",
        ),
        VarLenSparseFeat(
            SparseFeat(
                "hist_category_id", meta.num_categories + 1, dim, embedding_name="category_id"
            ),
            meta.max_history,
            length_name="hist_len",
        ),
    ]
    side = []
    for spec in schema.features:
        if spec.kind == "id":
            side.append(SparseFeat(spec.name, spec.vocab_size + 1, dim))
        elif spec.kind == "ids":
            side.append(
                VarLenSparseFeat(
                    SparseFeat(spec.name, spec.vocab_size + 1, dim),
                    cols[spec.name].shape[1],
                    length_name=f"{spec.name}_len",
                )
            )
        else:
            side.append(DenseFeat(spec.name, 1))
    return sparse + history + side


def _inputs(cols: dict[str, Any], names: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: cols[name][rows] for name in names}


def train_peer(
    name: str,
    data: str | Path,
    seed: int,
    dim: int = 16,
    max_epochs: int = 10,
    patience: int = 2,
    batch_size: int = 1024,
    valid_fraction: float = 0.1,
) -> dict[str, Any]:
    """Train one DeepCTR-Torch model; returns test metrics of the best validation epoch,
    the epochs run and the training examples/s."""
    import torch
    from deepctr_torch.models import DIN, DCNMix

    data = Path(data)
    meta = DatasetMeta.read(data)
    schema = resolve_features(meta, data)
    catalogue = read_item_catalogue(data, meta)
    train = _columns(data, "train", meta, schema, catalogue)
    test = _columns(data, "test", meta, schema, catalogue)
    split = ValidationSplit.for_dataset(data, valid_fraction)
    if split.boundary is None:
        raise ValueError("peers need the time-sliced validation of train/ (no valid/ split)")
    is_valid = train["timestamp"] >= split.boundary
    fit_rows, valid_rows = np.flatnonzero(~is_valid), np.flatnonzero(is_valid)
    columns = _feature_columns(meta, schema, train, dim)
    torch.manual_seed(seed)
    np.random.seed(seed)
    if name == "din":
        model = DIN(columns, ["item_id", "category_id"], seed=seed, device="cpu")
    elif name == "dcnmix":
        model = DCNMix(columns, columns, seed=seed, device="cpu")
    else:
        raise ValueError(f"peer must be one of {PEERS}, got {name!r}")
    model.compile("adam", "binary_crossentropy", metrics=[])
    names = list(model.feature_index)
    x_fit = _inputs(train, names, fit_rows)
    x_valid = _inputs(train, names, valid_rows)
    x_test = _inputs(test, names, np.arange(len(test["label"])))
    best: dict[str, Any] | None = None
    bad, seconds, epochs = 0, 0.0, 0
    for epoch in range(max_epochs):
        start = time.perf_counter()
        model.fit(x_fit, train["label"][fit_rows], batch_size=batch_size, epochs=1, verbose=0)
        seconds += time.perf_counter() - start
        epochs = epoch + 1
        valid = ctr_metrics(
            model.predict(x_valid, 4096).ravel().astype(np.float64),
            train["label"][valid_rows],
            train["users"][valid_rows],
        )
        if best is None or valid["auc"] > best["valid"]["auc"]:
            scores = model.predict(x_test, 4096).ravel().astype(np.float64)
            best = {
                "epoch": epochs,
                "valid": valid,
                "test": ctr_metrics(scores, test["label"], test["users"]),
            }
            bad = 0
        else:
            bad += 1
            if bad >= patience:
                break
    assert best is not None
    return {
        **best,
        "epochs_run": epochs,
        "examples_per_s": len(fit_rows) * epochs / max(seconds, 1e-9),
    }
