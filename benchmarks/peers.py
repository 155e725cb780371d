"""Peers from two stock CTR libraries on a dataset in our format, with the same features, the
same embedding width, the same validation split and the same epoch budget as ``genctr
finetune``: so that Table 1 and the rolling-origin benchmark can put them beside our rows.

* DeepCTR-Torch 0.3.0: ``din``, ``dcnmix``.
* torch-rechub 0.9.0 (maintained, torch 2.x): ``rechub_din``, ``rechub_bst`` (Behavior
  Sequence Transformer), ``rechub_dcnv2`` (DCN V2 stacked, 3 cross layers, a mixture of 3
  rank-16 experts, MLP 256-128: our DCN V2's shape). torch-rechub's HSTU is not a peer: it is
  a next-item model whose output is logits over the vocabulary, with no impression or click
  head, so it cannot rank a labelled impression without a head of ours on top.

Needs the benchmark extra (``pip install -r requirements/bench.txt``: deepctr-torch,
torch-rechub, scikit-learn). Not used by the library or the tests.

Protocol, as for our runs: train on train/ minus its newest ``valid_fraction`` by timestamp,
validate after every epoch (up to ``max_epochs``), stop after ``patience`` epochs without a
better validation AUC, report test AUC / LogLoss of the best epoch. Adam at 1e-3 (both
libraries' default), batches of 1,024. Features: user_id (unseen users share one row), target
item and category, query category, the history of items and categories (DIN and BST attend
over it with the target as query; DCNMix and DCN V2 mean-pool it), and every declared side
feature (``id`` / ``ids`` embedded, ``ids`` mean-pooled; ``dense`` standardised with the
training statistics).
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

PEERS = ("din", "dcnmix", "rechub_din", "rechub_bst", "rechub_dcnv2")
PEER_LABELS = {
    "din": "DeepCTR-Torch DIN",
    "dcnmix": "DeepCTR-Torch DCNMix",
    "rechub_din": "torch-rechub DIN",
    "rechub_bst": "torch-rechub BST",
    "rechub_dcnv2": "torch-rechub DCN V2",
}
MLP_DIMS = [256, 128]  # our backbones' MLP


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


def _rechub_model(name: str, meta: DatasetMeta, schema, cols: dict[str, Any], dim: int):
    """A torch-rechub model and the names of the inputs it reads. Ids are shifted by +1, 0 pads;
    the history is one sequence per field (DIN and BST attend over it, DCN V2 mean-pools it)."""
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
    from torch_rechub.models.ranking import BST, DIN, DCNv2

    attend = name != "rechub_dcnv2"
    target = [
        SparseFeature("item_id", meta.num_items + 1, dim, padding_idx=0),
        SparseFeature("category_id", meta.num_categories + 1, dim, padding_idx=0),
    ]
    history = [
        SequenceFeature(
            f"hist_{t.name}", t.vocab_size, dim, pooling="concat" if attend else "mean",
            shared_with=t.name, padding_idx=0,
        )
        for t in target
    ]  # fmt: skip
    context = [
        SparseFeature("user_id", schema.num_users + 2, dim),
        SparseFeature(
            "query_category_id", meta.num_categories + 1, dim, shared_with="category_id",
            padding_idx=0,
        ),
    ]  # fmt: skip
    for spec in schema.features:
        if spec.kind == "id":
            context.append(SparseFeature(spec.name, spec.vocab_size + 1, dim))
        elif spec.kind == "ids":
            context.append(
                SequenceFeature(spec.name, spec.vocab_size + 1, dim, pooling="mean", padding_idx=0)
            )
        elif name == "rechub_din":  # its MLP input takes embeddings only: deciles, embedded
            context.append(SparseFeature(f"{spec.name}_decile", 11, dim))
        else:
            context.append(DenseFeature(spec.name))
    mlp = {"dims": MLP_DIMS, "dropout": 0.0}
    if name == "rechub_din":
        model = DIN(context, history, target, mlp, {"dims": [36], "activation": "dice"})
    elif name == "rechub_bst":
        model = BST(context, history, target, mlp, nhead=2, dropout=0.0,
                    max_seq_len=meta.max_history + 1)  # fmt: skip
    else:
        model = DCNv2(
            target + context + history, n_cross_layers=3, mlp_params=mlp,
            model_structure="stacked", low_rank=16, num_experts=3,
        )  # fmt: skip
    names = [f.name for f in target + history + context]
    return model, names


def _deciles(cols: dict[str, Any], reference: dict[str, Any], schema) -> None:
    """Dense features as training-quantile buckets 1..10 (0 unused), for rechub's DIN."""
    for spec in schema.features:
        if spec.kind == "dense":
            edges = np.quantile(reference[spec.name], np.linspace(0.1, 0.9, 9))
            cols[f"{spec.name}_decile"] = np.searchsorted(edges, cols[spec.name]) + 1


class _RechubTrainer:
    """torch-rechub's models are plain modules; this is the loop its CTRTrainer runs (Adam,
    binary cross-entropy on the sigmoid output), without its file logging."""

    def __init__(self, model, seed: int, batch_size: int) -> None:
        import torch

        self.model, self.batch_size = model, batch_size
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.rng = np.random.default_rng(seed)

    def _batch(self, x: dict[str, np.ndarray], rows: np.ndarray):
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v[rows])) for k, v in x.items()}

    def fit(self, x: dict[str, np.ndarray], labels: np.ndarray) -> None:
        import torch

        self.model.train()
        order = self.rng.permutation(len(labels))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            target = torch.from_numpy(labels[rows])
            loss = torch.nn.functional.binary_cross_entropy(
                self.model(self._batch(x, rows)), target
            )
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def predict(self, x: dict[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
        import torch

        self.model.eval()
        n = len(next(iter(x.values())))
        with torch.no_grad():
            out = [
                self.model(self._batch(x, np.arange(s, min(s + batch_size, n)))).numpy()
                for s in range(0, n, batch_size)
            ]
        return np.concatenate(out).astype(np.float64)


def train_peer(
    name: str,
    data: str | Path,
    seed: int,
    dim: int = 16,
    max_epochs: int = 10,
    patience: int = 2,
    batch_size: int = 1024,
    valid_fraction: float = 0.1,
    refit_epochs: int = 0,
) -> dict[str, Any]:
    """Train one peer; returns test metrics of the best validation epoch, the epochs run and
    the training examples/s. ``refit_epochs``: instead, train every train/ row (the validation
    slice too) for that many epochs and test the last model (``genctr finetune --refit``'s
    second half, given the epochs a selected run chose)."""
    import torch

    if name not in PEERS:
        raise ValueError(f"peer must be one of {PEERS}, got {name!r}")
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
    torch.manual_seed(seed)
    np.random.seed(seed)
    if name.startswith("rechub_"):
        for cols in (test, train):  # train last: it is the deciles' reference
            _deciles(cols, train, schema)
        module, names = _rechub_model(name, meta, schema, train, dim)
        model = _RechubTrainer(module, seed, batch_size)
        fit = model.fit
        predict = model.predict
    else:
        from deepctr_torch.models import DIN, DCNMix

        columns = _feature_columns(meta, schema, train, dim)
        if name == "din":
            model = DIN(columns, ["item_id", "category_id"], seed=seed, device="cpu")
        else:
            model = DCNMix(columns, columns, seed=seed, device="cpu")
        model.compile("adam", "binary_crossentropy", metrics=[])
        names = list(model.feature_index)

        def fit(x, labels):
            model.fit(x, labels, batch_size=batch_size, epochs=1, verbose=0)

        def predict(x):
            return model.predict(x, 4096).ravel().astype(np.float64)

    x_test = _inputs(test, names, np.arange(len(test["label"])))
    if refit_epochs:
        x_all = _inputs(train, names, np.arange(len(train["label"])))
        start = time.perf_counter()
        for _ in range(refit_epochs):
            fit(x_all, train["label"])
        seconds = time.perf_counter() - start
        return {
            "epoch": refit_epochs,
            "test": ctr_metrics(predict(x_test), test["label"], test["users"]),
            "epochs_run": refit_epochs,
            "examples_per_s": len(train["label"]) * refit_epochs / max(seconds, 1e-9),
        }
    x_fit = _inputs(train, names, fit_rows)
    x_valid = _inputs(train, names, valid_rows)
    best: dict[str, Any] | None = None
    bad, seconds, epochs = 0, 0.0, 0
    for epoch in range(max_epochs):
        start = time.perf_counter()
        fit(x_fit, train["label"][fit_rows])
        seconds += time.perf_counter() - start
        epochs = epoch + 1
        valid = ctr_metrics(
            predict(x_valid), train["label"][valid_rows], train["users"][valid_rows]
        )
        if best is None or valid["auc"] > best["valid"]["auc"]:
            best = {
                "epoch": epochs,
                "valid": valid,
                "test": ctr_metrics(predict(x_test), test["label"], test["users"]),
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
