"""The decoder: causality, no target leakage, and one g(s, c) for both stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genctr_rec.models.decoder import GenerativeDecoder
from tests.helpers import jagged_embeddings

B, L, D = 3, 7, 16


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_future_items_do_not_change_the_past(conditional: bool, layers: int) -> None:
    torch.manual_seed(0)
    decoder = GenerativeDecoder(D, max_len=L, num_layers=layers, conditional=conditional).eval()
    items, cats = _inputs()
    base = decoder.forward_sequence(items, cats)
    for t in range(L - 1):
        changed_items, changed_cats = items.clone(), cats.clone()
        # random, not constant, changes: LayerNorm would hide a constant shift
        changed_items[:, t + 1 :] = torch.randn_like(changed_items[:, t + 1 :])
        if conditional:
            changed_cats[:, t + 1 :] = torch.randn_like(changed_cats[:, t + 1 :])
        out = decoder.forward_sequence(changed_items, changed_cats)
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6), f"position {t}"
        # CD: position t+1's query is item t+1's category; SD: item t+1 first shows at t+2
        first_affected = t + 1 if conditional else t + 2
        if first_affected < L:
            assert not torch.allclose(out[:, first_affected:], base[:, first_affected:])
        if not conditional:
            assert torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-6)


@pytest.mark.parametrize("conditional", [True, False])
def test_target_item_never_leaks_into_its_own_query(conditional: bool) -> None:
    torch.manual_seed(0)
    decoder = GenerativeDecoder(D, max_len=L, conditional=conditional).eval()
    items, cats = _inputs()
    base = decoder.forward_sequence(items, cats)
    t = 4
    changed = items.clone()
    changed[:, t] = torch.randn(B, D)  # a different item id at t, same category
    out = decoder.forward_sequence(changed, cats)
    assert torch.allclose(out[:, t], base[:, t], atol=1e-6)
    if conditional:  # the category of item t is the query: it must matter
        other_cats = cats.clone()
        other_cats[:, t] = torch.randn(B, D)
        assert not torch.allclose(decoder.forward_sequence(items, other_cats)[:, t], base[:, t])


@pytest.mark.parametrize("conditional", [True, False])
def test_fine_tuning_query_equals_the_pretraining_position(conditional: bool) -> None:
    """g(s, c) for the next item in stage 2 is exactly what stage 1 computed at that position,
    including for shorter, padded histories."""
    torch.manual_seed(0)
    decoder = GenerativeDecoder(D, max_len=L, num_layers=2, conditional=conditional).eval()
    items, cats = _inputs()
    full = decoder.forward_sequence(items, cats)
    lengths = torch.tensor([6, 3, 0])
    hist_items, hist_cats = items[:, :6].clone(), cats[:, :6].clone()
    for row, n in enumerate(lengths.tolist()):  # padding beyond each history is garbage
        hist_items[row, n:] = 99.0
        hist_cats[row, n:] = -99.0
    target_cats = cats[torch.arange(B), lengths]
    g = decoder.forward_target(hist_items, hist_cats, lengths, target_cats)
    expected = full[torch.arange(B), lengths]
    assert torch.allclose(g, expected, atol=1e-5)


def _jagged_batch(lengths: list[int], seed: int = 1):
    return jagged_embeddings(lengths, D, seed)


# uneven rows, an empty one, and enough elements to split into several length groups
LENGTHS = [300, 1, 45, 0, 298, 7, 150, 12, 151, 3] * 3


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_jagged_paths_equal_padded_ones(conditional: bool, layers: int) -> None:
    """Length-grouped (no cross-row padding) and whole-batch padded decoders agree in values
    and gradients, for pre-training and for g(s, c)."""
    from genctr_rec.models.jagged import length_groups, row_positions, to_padded

    torch.manual_seed(0)
    decoder = GenerativeDecoder(D, max_len=301, num_layers=layers, conditional=conditional)
    items, cats, lengths = _jagged_batch(LENGTHS)
    assert len(length_groups(lengths)) > 2
    padded = decoder.forward_sequence(to_padded(items, lengths), to_padded(cats, lengths))
    expected = padded[row_positions(lengths)]
    got = decoder.forward_sequence_jagged(items, cats, lengths)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    (grad_expected,) = torch.autograd.grad((expected * expected).sum(), items)
    (grad_got,) = torch.autograd.grad((got * got).sum(), items)
    torch.testing.assert_close(grad_got, grad_expected, atol=2e-5, rtol=1e-4)

    targets = torch.randn(len(LENGTHS), D)
    expected_g = decoder.forward_target(
        to_padded(items, lengths), to_padded(cats, lengths), lengths, targets
    )
    got_g = decoder.forward_target_jagged(items, cats, lengths, targets)
    torch.testing.assert_close(got_g, expected_g, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_every_layout_gives_the_stage_models_the_same_loss(layers: int, monkeypatch) -> None:
    """Pre-training and fine-tuning losses and gradients are the same whichever layout the
    decoder runs in (padded: CUDA's short-history choice; groups: CPU's; packed: CUDA's from
    history 512), and the layout asked for is the one that ran."""
    from torchrec import KeyedJaggedTensor

    import genctr_rec.models.ctr as ctr
    from genctr_rec.data.keys import (
        HIST_CATEGORIES,
        HIST_ITEMS,
        QUERY_CATEGORY,
        SEQ_CATEGORIES,
        SEQ_ITEMS,
        TARGET_CATEGORY,
        TARGET_ITEM,
    )
    from genctr_rec.embeddings import SharedEmbeddings

    torch.manual_seed(0)
    embeddings = SharedEmbeddings(500, 20, D, dedup=False, device=torch.device("cpu"))
    pretrain = ctr.PretrainModel(embeddings, GenerativeDecoder(D, 301, layers))
    finetune = ctr.CTRModel(embeddings, "dnn", GenerativeDecoder(D, 301, layers))
    lengths = torch.tensor(LENGTHS)
    n, b = int(lengths.sum()), len(LENGTHS)
    sequences = KeyedJaggedTensor(
        keys=[SEQ_ITEMS, SEQ_CATEGORIES],
        values=torch.cat([torch.randint(0, 500, (n,)), torch.randint(0, 20, (n,))]),
        lengths=torch.cat([lengths, lengths]).int(),
    )
    negatives = torch.randint(0, 500, (n, 4))
    ones = torch.ones(b, dtype=torch.int32)
    impressions = KeyedJaggedTensor(
        keys=[TARGET_ITEM, TARGET_CATEGORY, QUERY_CATEGORY, HIST_ITEMS, HIST_CATEGORIES],
        values=torch.cat(
            [
                torch.randint(0, 500, (b,)),
                torch.randint(0, 20, (2 * b,)),
                torch.randint(0, 500, (n,)),
                torch.randint(0, 20, (n,)),
            ]
        ),
        lengths=torch.cat([ones, ones, ones, lengths.int(), lengths.int()]),
    )
    labels = torch.randint(0, 2, (b,)).float()
    ran = []
    for method in ("forward_sequence_jagged", "forward_sequence_packed", "forward_target_packed"):
        for model in (pretrain, finetune):
            original = getattr(model.decoder, method)
            monkeypatch.setattr(
                model.decoder,
                method,
                lambda *args, _name=method, _run=original: ran.append(_name) or _run(*args),
            )

    def losses_and_grads(layout: str):
        results = []
        for model, loss_of in (
            (pretrain, lambda: pretrain(sequences, negatives)),
            (finetune, lambda: F.binary_cross_entropy_with_logits(finetune(impressions), labels)),
        ):
            model.decoder.layout = layout
            model.zero_grad(set_to_none=True)
            loss = loss_of()
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.decoder.parameters()]))
        return results

    results = {layout: losses_and_grads(layout) for layout in ("padded", "groups", "packed")}
    assert ran.count("forward_sequence_jagged") == 1
    assert ran.count("forward_sequence_packed") == 1
    assert ran.count("forward_target_packed") == 1
    for layout in ("groups", "packed"):
        for (loss, grads), (want_loss, want_grads) in zip(
            results[layout], results["padded"], strict=True
        ):
            torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
            for got, expected in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
