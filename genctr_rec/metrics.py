"""Evaluation metrics: AUC (torchmetrics), GAUC (per-user AUC weighted by impressions), LogLoss,
normalized entropy and calibration (TorchRec's own definitions, ``torchrec.metrics``), and
next-item HR@K / NDCG@K.

Exact AUC and GAUC need every prediction in one place: they are gathered to rank 0 only
(:func:`on_main`), computed there, and the few numbers broadcast back."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from torchrec.metrics.calibration import compute_calibration
from torchrec.metrics.ne import compute_cross_entropy, compute_ne

from genctr_rec.distributed import from_main

logger = logging.getLogger(__name__)

NE_ETA = 1e-12  # TorchRec's NEMetric default


def gather_to_main(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Concatenate each array over ranks on rank 0 (None on the others)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return arrays
    parts: list[dict[str, np.ndarray] | None] | None = (
        [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    )
    dist.gather_object(arrays, parts, dst=0)
    if parts is None:
        return None
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def on_main(arrays: dict[str, np.ndarray], compute: Callable[..., dict]) -> dict:
    """``compute(**arrays)`` over every rank's rows, run on rank 0; every rank gets its result."""
    gathered = gather_to_main(arrays)
    return from_main(compute(**gathered) if gathered is not None else None)


def _group_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray):
    """Per-group Mann-Whitney AUC with tied scores sharing their average rank.

    Returns (auc per group, impressions per group, mask of groups with both labels)."""
    order = np.lexsort((scores, groups))
    s, y, g = scores[order], labels[order], groups[order]
    group_start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    group_id = np.cumsum(np.r_[True, g[1:] != g[:-1]]) - 1
    # average rank within (group, score) ties, ranks starting at 1 inside each group
    tie_start = np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])]
    tie_id = np.cumsum(tie_start) - 1
    position = np.arange(len(s)) - group_start[group_id] + 1
    tie_last = np.zeros(tie_id[-1] + 1)
    tie_first = np.full(tie_id[-1] + 1, np.inf)
    np.minimum.at(tie_first, tie_id, position)
    np.maximum.at(tie_last, tie_id, position)
    rank = (tie_first[tie_id] + tie_last[tie_id]) / 2
    n = np.bincount(group_id)
    pos = np.bincount(group_id, weights=y)
    neg = n - pos
    rank_sum = np.bincount(group_id, weights=rank * y)
    valid = (pos > 0) & (neg > 0)
    auc = np.where(valid, (rank_sum - pos * (pos + 1) / 2) / np.maximum(pos * neg, 1), 0.0)
    return auc, n, valid


def ctr_metrics(
    scores: np.ndarray, labels: np.ndarray, users: np.ndarray
) -> dict[str, float | int | None]:
    """AUC, GAUC, LogLoss, NE and calibration of click probabilities ``scores`` against 0/1
    ``labels``.

    NE (normalized entropy) is the cross-entropy over that of always predicting the base rate
    (below 1 is better than the base rate); calibration is predicted clicks over actual clicks
    (1 is calibrated). Both through ``torchrec.metrics``' functions, as production jobs report
    them. A figure the labels leave undefined is None (JSON null), never a number: AUC and NE
    when every label is the same (torchmetrics would say 0.0, NE divides by a zero entropy),
    calibration without a click (TorchRec would say 0.0), GAUC when no user has both labels."""
    p = torch.from_numpy(scores.astype(np.float64))
    y = torch.from_numpy(labels.astype(np.float64))
    auc = float(binary_auroc(p, y.long()))
    logloss = float(F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
    group_auc, n, valid = _group_auc(scores, labels, users)
    gauc = float((group_auc * n)[valid].sum() / n[valid].sum()) if valid.any() else None
    ones = torch.ones_like(y)
    ce_sum = compute_cross_entropy(y, p, ones, NE_ETA).sum()
    positives = y.sum()
    ne = compute_ne(ce_sum, ones.sum(), positives, ones.sum() - positives, NE_ETA)
    calibration = compute_calibration(p.sum(), positives)
    one_class = bool(positives == 0 or positives == len(y))
    if one_class:
        logger.warning(
            "all %d labels are %d: AUC and NE are undefined (reported as null)",
            len(y),
            int(positives > 0),
        )
    if gauc is None:
        logger.warning("no user has both a click and a non-click: GAUC is undefined (null)")
    return {
        "auc": None if one_class else auc,
        "gauc": gauc,
        "logloss": logloss,
        "ne": None if one_class else float(ne),
        "calibration": float(calibration) if positives > 0 else None,
        "rows": int(len(scores)),
    }
