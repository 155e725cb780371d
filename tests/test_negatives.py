"""Negative sampling: CS stays in the target's category, never the target; RS covers all."""

from __future__ import annotations

import torch

from genctr_rec.models.negatives import NegativeSampler

# 30 items in 4 categories; category 3 holds a single item (29)
ITEM_CATEGORY = torch.tensor([i % 3 for i in range(29)] + [3])


def _sampler(mode: str, train_items=None) -> NegativeSampler:
    items = torch.arange(30) if train_items is None else train_items
    return NegativeSampler(ITEM_CATEGORY, items, mode, torch.Generator().manual_seed(0))


def test_category_negatives_share_the_category_and_skip_the_target() -> None:
    sampler = _sampler("category")
    targets = torch.arange(29).repeat(20)
    negatives = sampler.sample(targets, 16)
    assert (ITEM_CATEGORY[negatives] == ITEM_CATEGORY[targets].unsqueeze(1)).all()
    assert (negatives != targets.unsqueeze(1)).all()
    # every other member of the category is reachable
    for target in (0, 1, 2):
        drawn = set(negatives[targets == target].flatten().tolist())
        assert drawn == {i for i in range(29) if i % 3 == target % 3 and i != target}


def test_random_negatives_cover_the_catalogue_and_skip_the_target() -> None:
    sampler = _sampler("random")
    targets = torch.randint(0, 30, (4000,))
    negatives = sampler.sample(targets, 8)
    assert (negatives != targets.unsqueeze(1)).all()
    assert set(negatives.flatten().tolist()) == set(range(30))


def test_only_training_items_are_sampled_and_singletons_fall_back() -> None:
    sampler = _sampler("category", train_items=torch.tensor([0, 3, 6, 9, 1, 29]))
    negatives = sampler.sample(torch.tensor([0, 0, 0, 29]), 50)
    assert set(negatives[:3].flatten().tolist()) == {3, 6, 9}
    assert 29 not in negatives[3].tolist() and set(negatives[3].tolist()) <= {0, 3, 6, 9, 1}
