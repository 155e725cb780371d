"""The two stage models, both built on one :class:`SharedEmbeddings`.

* :class:`PretrainModel`: embeddings + decoder, sampled-softmax next-item loss.
* :class:`CTRModel`: embeddings + backbone (+ decoder for model integration), click logits.

State-dict keys are shared on purpose: ``embeddings.*`` (parameter sharing) and ``decoder.*``
(model integration) of a pre-training checkpoint load straight into the CTR model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from genctr_rec.data.keys import (
    HIST_CATEGORIES,
    HIST_ITEMS,
    QUERY_CATEGORY,
    SEQ_CATEGORIES,
    SEQ_ITEMS,
    TARGET_CATEGORY,
    TARGET_ITEM,
)
from genctr_rec.embeddings import (
    CATEGORY_TABLE,
    FEATURES_MODULE,
    ITEM_TABLE,
    SharedEmbeddings,
)
from genctr_rec.models.backbones import build_backbone
from genctr_rec.models.decoder import GenerativeDecoder
from genctr_rec.models.inputs import DenseNorm, candidate_logits, input_width
from genctr_rec.models.jagged import mean_pool, to_padded


class PretrainModel(nn.Module):
    """Stage 1: next-item prediction over click sequences.

    ``forward(sequences, negatives)`` returns the mean sampled-softmax cross-entropy over every
    predicted position: logits are dot products of g against the true item's and ``K``
    negatives' item embeddings.
    """

    def __init__(self, embeddings: SharedEmbeddings, decoder: GenerativeDecoder) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.decoder = decoder

    def forward(self, sequences: KeyedJaggedTensor, negatives: torch.Tensor) -> torch.Tensor:
        """sequences: KJT (seq_item_ids, seq_category_ids); negatives [N_targets, K] where the
        targets are the sequence elements in order, every element a target."""
        items_jt, cats_jt = sequences[SEQ_ITEMS], sequences[SEQ_CATEGORIES]
        lengths = items_jt.lengths().long()
        item_ids = items_jt.values()
        n, k = item_ids.numel(), negatives.shape[1]
        item_emb, cat_emb = self.embeddings(
            torch.cat([item_ids, negatives.reshape(-1)]), cats_jt.values()
        )
        seq_emb, neg_emb = item_emb[:n], item_emb[n:].view(n, k, -1)
        g = self.decoder.sequence(seq_emb, cat_emb, lengths)  # [N, D], one per target
        pos_logit = (g * seq_emb).sum(-1, keepdim=True)
        neg_logit = torch.einsum("nd,nkd->nk", g, neg_emb)
        logits = torch.cat([pos_logit, neg_logit], dim=1)
        return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=logits.device))

    @torch.no_grad()
    def score_next(
        self,
        sequences: KeyedJaggedTensor,
        target_categories: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """Scores [B, C] of candidate items [B, C] as the next item after each sequence, given
        the next item's category [B] (the held-out evaluation: HR@10, NDCG@10)."""
        items_jt, cats_jt = sequences[SEQ_ITEMS], sequences[SEQ_CATEGORIES]
        lengths = items_jt.lengths().long()
        n = items_jt.values().numel()
        item_emb, cat_emb = self.embeddings(
            torch.cat([items_jt.values(), candidates.reshape(-1)]),
            torch.cat([cats_jt.values(), target_categories]),
        )
        hist_cat, target_cat = cat_emb[:n], cat_emb[n:]
        g = self.decoder.forward_target(
            to_padded(item_emb[:n], lengths), to_padded(hist_cat, lengths), lengths, target_cat
        )
        cand = item_emb[n:].view(candidates.shape[0], candidates.shape[1], -1)
        return torch.einsum("bd,bcd->bc", g, cand)


class CTRModel(nn.Module):
    """Stage 2: click-through-rate prediction for (user, history, search context, ad)
    impressions.

    Args:
        embeddings: the shared tables (with ``features`` when the model reads side features).
        backbone: ``dnn``, ``dcnv2`` or ``dcnv2_ta``.
        decoder: GenCTR's decoder for model integration (its g(s, c) enters before the final
            layer), or None for the backbone alone.
        dense_norm: standardises ``forward``'s ``dense`` argument (its width is the number of
            dense features); None without dense features.
        fusion: how g enters the final layer (:class:`~genctr_rec.models.layers.ContextHead`).
        context_dropout: dropout on g while training.
    """

    def __init__(
        self,
        embeddings: SharedEmbeddings,
        backbone: str,
        decoder: GenerativeDecoder | None = None,
        dense_norm: DenseNorm | None = None,
        fusion: str = "concat",
        context_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dim = embeddings.dim
        self.embeddings = embeddings
        num_dense = 0 if dense_norm is None else len(dense_norm.mean)
        width = input_width(dim, len(embeddings.feature_keys), num_dense)
        self.dense_norm = dense_norm
        context = dim if decoder is not None else 0
        self.backbone = build_backbone(backbone, width, dim, context, fusion, context_dropout)
        self.decoder = decoder
        # pad histories to this length rather than the batch's longest (static shapes for
        # ``--compile``: genctr_rec.training.compiled); None: the decoder's choice
        self.history_cap: int | None = None

    def forward(
        self,
        features: KeyedJaggedTensor,
        side: KeyedJaggedTensor | None = None,
        dense: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Click logits [B] from the impression KJT, the side-feature KJT (``user_id`` and
        declared sparse features) and the dense features [B, num_dense]."""
        item_emb, cat_emb = self.embeddings(
            torch.cat([features[TARGET_ITEM].values(), features[HIST_ITEMS].values()]),
            torch.cat(
                [
                    features[TARGET_CATEGORY].values(),
                    features[QUERY_CATEGORY].values(),
                    features[HIST_CATEGORIES].values(),
                ]
            ),
        )
        side_emb = None
        if side is not None and self.embeddings.feature_keys:
            side_emb = self.embeddings.side_features(side)
        return self.logits(features, item_emb, cat_emb, side_emb, dense)

    def logits(
        self,
        features: KeyedJaggedTensor,
        item_emb: torch.Tensor,
        cat_emb: torch.Tensor,
        side_emb: torch.Tensor | None,
        dense: torch.Tensor | None,
    ) -> torch.Tensor:
        """Click logits [B] from the looked-up rows: ``item_emb`` the target items then the
        history's, ``cat_emb`` the target categories, the query categories, then the
        history's, ``side_emb`` the pooled side features [B, keys * dim] (the dense half of
        :meth:`forward`, shared with :class:`BatchCTRModel`)."""
        lengths = features[HIST_ITEMS].lengths().long()
        b = features[TARGET_ITEM].values().numel()
        t_item, h_item = item_emb[:b], item_emb[b:]
        t_cat, q_cat, h_cat = cat_emb[:b], cat_emb[b : 2 * b], cat_emb[2 * b :]
        uses_history = self.backbone.uses_history
        layout = None if self.decoder is None else self.decoder.layout_for(h_item.device, "target")
        # one padded history of item + category sums serves the decoder and the backbone
        history = None
        if uses_history or layout == "padded":
            width = self.history_cap
            if width is None and self.decoder is not None:
                width = self.decoder.padded_width(h_item.device)
            history = to_padded(h_item + h_cat, lengths, width)
        g = None
        if self.decoder is not None:
            g = self.decoder.target(h_item, h_cat, lengths, t_cat, history)
        return candidate_logits(
            self.backbone,
            self.dense_norm,
            t_item,
            t_cat,
            q_cat,
            mean_pool(h_item, lengths),
            mean_pool(h_cat, lengths),
            side_emb,
            dense,
            g,
            history,
            lengths,
        )


class BatchCTRModel(CTRModel):
    """The CTR model as TorchRec's training pipelines call it: ``forward(batch)`` returns
    ``(loss, (loss, logits, labels))``, and each sharded table is called on the batch's own
    lookup (``batch.lookups``, built by the reader), with nothing computed in between, so that
    ``TrainPipelineSparseDist`` can distribute the next batch's ids while this one computes.
    Same parameters and state-dict keys as :class:`CTRModel` (checkpoints load either way)."""

    def forward(self, batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:  # noqa: D102
        lookups = batch.lookups
        items = self.embeddings.tables[ITEM_TABLE](lookups.items)
        categories = self.embeddings.tables[CATEGORY_TABLE](lookups.categories)
        side = None
        if self.embeddings.feature_keys:
            side = self.embeddings.tables[FEATURES_MODULE](lookups.features)
        return _loss_and_outputs(self, batch, items, categories, side)


@torch.fx.wrap
def _loss_and_outputs(
    model: CTRModel, batch, items, categories, side
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The dense half of :class:`BatchCTRModel`, one leaf for TorchRec's pipeline tracer (it
    traces ``forward`` only to find the sharded modules' inputs; this part has shapes that
    depend on the data, which symbolic tracing cannot follow)."""
    lookups, b = batch.lookups, batch.labels.numel()
    item_emb = items.values()[lookups.item_rows]
    cat_emb = categories.values()[lookups.category_rows]
    side_emb = None if side is None else model.embeddings.side_rows(side, b)
    logits = model.logits(batch.sparse_features, item_emb, cat_emb, side_emb, batch.dense_features)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    return loss, (loss.detach(), logits.detach(), batch.labels)
