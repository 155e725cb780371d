"""SharedEmbeddings: every lookup layout gives the same rows and the same gradients, and the
default plan for its tables; and the evaluation metrics against brute force."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from genctr_rec.data.features import FeatureSchema
from genctr_rec.embeddings import SharedEmbeddings
from genctr_rec.metrics import ctr_metrics
from genctr_rec.training.sharding import default_sharding


def _lookup_and_grads(lookup: str, dedup: bool):
    torch.manual_seed(0)
    emb = SharedEmbeddings(40, 6, dim=8, lookup=lookup, dedup=dedup, device=torch.device("cpu"))
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view_as(p) / 100)
    items = torch.tensor([3, 7, 3, 3, 39, 0])
    cats = torch.tensor([5, 1, 1])
    rows_i, rows_c = emb(items, cats)
    weights = torch.arange(rows_i.numel(), dtype=torch.float32).view_as(rows_i)
    ((rows_i * weights).sum() + rows_c.sum()).backward()
    grads = {n: p.grad.clone() for n, p in emb.named_parameters()}
    return rows_i.detach(), rows_c.detach(), grads


@pytest.mark.parametrize("lookup,dedup", itertools.product(["pooled", "sequence"], [True, False]))
def test_layouts_agree(lookup: str, dedup: bool) -> None:
    ref_i, ref_c, ref_g = _lookup_and_grads("sequence", False)
    rows_i, rows_c, grads = _lookup_and_grads(lookup, dedup)
    assert torch.equal(rows_i, ref_i) and torch.equal(rows_c, ref_c)
    item_grad = next(g for n, g in grads.items() if "item" in n)
    ref_item_grad = next(g for n, g in ref_g.items() if "item" in n)
    assert torch.allclose(item_grad, ref_item_grad)
    # repeated ids add up: id 3 appears three times
    weights = torch.arange(48, dtype=torch.float32).view(6, 8)
    assert torch.allclose(item_grad[3], weights[0] + weights[2] + weights[3])


@pytest.mark.parametrize("lookup", ["pooled", "sequence"])
def test_default_sharding(lookup: str) -> None:
    """One rank: table-wise. More: pooled tables up to replicate_max_mb replicated (1 MB holds
    16,384 rows of 16 floats), bigger ones and sequence tables left to the planner."""
    small, big = 16_384, 16_385
    emb = SharedEmbeddings(big, small, dim=16, lookup=lookup, device=torch.device("meta"))
    assert default_sharding(emb.tables, 1, 1.0) == {"item": "table_wise", "category": "table_wise"}
    expected = {"category": "data_parallel"} if lookup == "pooled" else {}
    assert default_sharding(emb.tables, 2, 1.0) == expected
    both = {"item": "data_parallel", "category": "data_parallel"} if lookup == "pooled" else {}
    assert default_sharding(emb.tables, 4, 2.0) == both
    assert default_sharding(emb.tables, 2, 0.0) == {}


def test_default_sharding_spreads_a_large_user_table_row_wise() -> None:
    """The user table is the one that grows without bound: past replicate_max_mb it is
    row-wise on more than one rank; small, it is replicated like any small table."""
    for users, expected in ((100_000, "row_wise"), (1_000, "data_parallel")):
        emb = SharedEmbeddings(
            50, 5, dim=16, device=torch.device("meta"), features=FeatureSchema(num_users=users)
        )
        plan = default_sharding(emb.tables, 2, 1.0)
        assert plan["user_id"] == expected
        assert default_sharding(emb.tables, 1, 1.0)["user_id"] == "table_wise"


def _brute_auc(scores, labels) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_gauc_logloss_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    n = 600
    users = rng.integers(0, 30, n)
    labels = (rng.random(n) < 0.3).astype(np.float32)
    scores = np.round(rng.random(n) * 0.5 + 0.3 * labels, 2)  # ties on purpose
    out = ctr_metrics(scores, labels, users)
    assert out["auc"] == pytest.approx(_brute_auc(scores, labels), abs=1e-6)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            num += _brute_auc(scores[m], labels[m]) * m.sum()
            den += m.sum()
    assert out["gauc"] == pytest.approx(num / den, abs=1e-9)
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    expected = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert out["logloss"] == pytest.approx(expected, rel=1e-6)


def test_ne_and_calibration_against_their_definitions() -> None:
    """NE: cross-entropy over the base rate's entropy; calibration: predicted over actual
    clicks (TorchRec's functions, checked against the formulas)."""
    rng = np.random.default_rng(4)
    p = rng.uniform(0.01, 0.99, 3000)
    y = (rng.random(3000) < p * 0.8).astype(np.float64)
    m = ctr_metrics(p, y, rng.integers(0, 40, 3000))
    base = y.mean()
    logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    assert m["ne"] == pytest.approx(logloss / entropy, rel=1e-9)
    assert m["calibration"] == pytest.approx(p.sum() / y.sum(), rel=1e-12)
    assert m["calibration"] > 1.1  # the labels were drawn at 0.8 p: over-predicting
    constant = ctr_metrics(np.full(3000, base), y, np.zeros(3000))
    assert constant["ne"] == pytest.approx(1.0, abs=1e-9)  # the base rate itself: NE 1


def _metrics_on_ranks(rank: int, world: int, seed: int) -> dict:
    from genctr_rec.metrics import on_main

    rng = np.random.default_rng(seed)
    p, y, u = rng.uniform(size=900), rng.integers(0, 2, 900), rng.integers(0, 30, 900)
    mine = slice(rank * 900 // world, (rank + 1) * 900 // world)
    return on_main({"scores": p[mine], "labels": y[mine], "users": u[mine]}, ctr_metrics)


@pytest.mark.slow
def test_metrics_over_ranks_equal_one_process() -> None:
    """Gathered to rank 0 only, computed there, the figures broadcast: every rank reports
    what one process computes over all rows."""
    from tests.distributed import run_ranks

    whole = _metrics_on_ranks(0, 1, 9)
    for result in run_ranks(_metrics_on_ranks, 3, 9):
        assert result == whole


@pytest.mark.parametrize("clicked", [0, 1])
def test_figures_the_labels_leave_undefined_are_null(clicked: int, caplog) -> None:
    """Every label the same: AUC and NE have no value (torchmetrics said 0.0, NE divided by a
    zero entropy); no click: no calibration (TorchRec said 0.0); no user with both labels: no
    GAUC (was NaN, which json.dumps writes as the invalid token NaN). None, JSON null."""
    rng = np.random.default_rng(0)
    scores = rng.random(50)
    labels = np.full(50, clicked, dtype=np.float32)
    with caplog.at_level("WARNING", logger="genctr_rec.metrics"):
        out = ctr_metrics(scores, labels, rng.integers(0, 5, 50))
    assert out["auc"] is None and out["ne"] is None and out["gauc"] is None
    assert (out["calibration"] is None) == (clicked == 0)
    assert out["logloss"] > 0 and out["rows"] == 50
    json.loads(json.dumps(out), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert any("undefined" in r.getMessage() for r in caplog.records)


def test_selection_survives_an_undefined_validation_figure() -> None:
    """Fine-tuning selects by validation AUC: an undefined one never beats a defined one, and
    anything beats an undefined best (the newest model is kept until the figure means
    something)."""
    from genctr_rec.training.loop import Validation

    auc = Validation(dict, "auc", 0, 3, lambda: None)
    assert auc.improves(None, None) and auc.improves(0.6, None) and auc.improves(0.7, 0.6)
    assert not auc.improves(None, 0.6) and not auc.improves(0.5, 0.6)
    logloss = Validation(dict, "logloss", 0, 3, lambda: None, higher_is_better=False)
    assert logloss.improves(0.5, 0.6) and not logloss.improves(0.7, 0.6)
    assert logloss.improves(0.7, None) and not logloss.improves(None, 0.6)
