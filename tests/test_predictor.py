"""The Predictor: g(s, c) once per distinct category, a bounded cache that changes no score,
the documented request policies (OOV, truncation, catalogue categories)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from genctr_rec.serving.predictor import ContextCache, Predictor, RequestError
from genctr_rec.serving.predictor import Request as PlainRequest
from tests.helpers import TOY_FEATURES

Request = partial(PlainRequest, features=TOY_FEATURES)  # the GenCTR toy model reads them

NUM_ITEMS, NUM_CATEGORIES = 2000, 20


class CountingModel:
    """Wraps the TorchScript model and records every ``contexts`` call's row count."""

    def __init__(self, model) -> None:
        self.model = model
        self.context_rows: list[int] = []

    def __call__(self, *args):
        return self.model(*args)

    def contexts(self, *args):
        self.context_rows.append(len(args[3]))
        return self.model.contexts(*args)

    def score(self, *args):
        return self.model.score(*args)


def _request(
    rng: np.random.Generator,
    history: int,
    candidates: int,
    cats: int,
    catalogue: np.ndarray,
    make=Request,
) -> PlainRequest:
    """Candidates from ``cats`` categories, each with its catalogue category."""
    categories = rng.choice(np.unique(catalogue), cats, replace=False)
    items = rng.choice(np.flatnonzero(np.isin(catalogue, categories)), candidates)
    return make(
        history_items=rng.integers(0, NUM_ITEMS, history).tolist(),
        history_categories=rng.integers(0, NUM_CATEGORIES, history).tolist(),
        query_category=int(categories[0]),
        candidate_items=items.tolist(),
        candidate_categories=catalogue[items].tolist(),
    )


@pytest.fixture()
def genctr(artifacts: dict) -> Predictor:
    return Predictor(artifacts["genctr-none"]["path"], cache_size=1000)


def test_context_once_per_distinct_category_then_cached(genctr: Predictor) -> None:
    counting = CountingModel(genctr.model)
    genctr.model = counting
    request = _request(np.random.default_rng(0), 30, 100, 3, genctr.item_categories)
    assert len(set(request.candidate_categories)) == 3
    first = genctr.score(request)
    assert counting.context_rows == [3]  # 100 candidates, 3 categories: 3 decoder rows
    second = genctr.score(request)
    assert counting.context_rows == [3]  # all from the cache
    assert np.array_equal(first, second)
    assert genctr.cache.stats()["hits"] == 3
    other_history = Request(
        request.history_items[:-1], request.history_categories[:-1], request.query_category,
        request.candidate_items, request.candidate_categories,
    )  # fmt: skip
    genctr.score(other_history)
    assert counting.context_rows == [3, 3]  # another history is another key


def test_cache_and_batching_change_no_score(artifacts: dict) -> None:
    path = artifacts["genctr-none"]["path"]
    cached, uncached = Predictor(path, cache_size=1000), Predictor(path, cache_size=0)
    assert uncached.cache is None
    rng = np.random.default_rng(1)
    catalogue = cached.item_categories
    sizes = [(0, 5, 2), (12, 40, 4), (50, 1, 1)] * 2
    requests = [_request(rng, h, c, k, catalogue) for h, c, k in sizes]
    one_by_one = [uncached.score(r) for r in requests]
    batched = cached.score_prepared([cached.prepare(r) for r in requests])
    for a, b in zip(one_by_one, batched, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # per candidate, scoring alone gives the same probability as inside a 40-candidate request
    alone = [uncached.score(Request(*_fields(requests[1], i)))[0] for i in range(40)]
    np.testing.assert_allclose(one_by_one[1], alone, atol=1e-6)


def _fields(r: PlainRequest, i: int) -> tuple:
    return (
        r.history_items,
        r.history_categories,
        r.query_category,
        [r.candidate_items[i]],
        [r.candidate_categories[i]],
    )


def test_cache_is_bounded_lru() -> None:
    cache = ContextCache(2)
    for key in ("a", "b"):
        cache.put((key.encode(), 0), torch.ones(1))
    assert cache.get((b"a", 0)) is not None  # a is now the most recent
    cache.put((b"c", 0), torch.ones(1))
    assert len(cache) == 2
    assert cache.get((b"b", 0)) is None and cache.get((b"a", 0)) is not None


def test_backbone_without_mi_has_no_cache(artifacts: dict) -> None:
    predictor = Predictor(artifacts["ta64-none"]["path"])
    assert predictor.cache is None
    request = _request(np.random.default_rng(2), 10, 7, 2, predictor.item_categories, PlainRequest)
    scores = predictor.score(request)
    assert scores.shape == (7,) and np.all((scores > 0) & (scores < 1))


def test_a_candidate_category_against_the_catalogue_is_refused_unless_trusted(
    artifacts: dict,
) -> None:
    path = artifacts["genctr-none"]["path"]
    strict = Predictor(path)
    item = 7
    right = int(strict.item_categories[item])
    wrong = (right + 1) % NUM_CATEGORIES
    assert strict.score(Request([1], [0], 0, [3, item], [None, right])).shape == (2,)
    with pytest.raises(RequestError) as err:
        strict.score(Request([1], [0], 0, [3, item], [None, wrong]))
    assert err.value.field == "candidates[1].category_id"
    assert f"item {item} is in category {right}" in err.value.message
    trusting = Predictor(path, trust_request_categories=True)
    as_given = trusting.score(Request([1], [0], 0, [item], [wrong]))
    as_catalogue = trusting.score(Request([1], [0], 0, [item]))
    assert as_given.shape == (1,) and not np.allclose(as_given, as_catalogue)


def test_oov_reject_names_the_field(artifacts: dict) -> None:
    genctr = Predictor(artifacts["genctr-none"]["path"], oov="reject")
    with pytest.raises(RequestError) as err:
        genctr.score(Request([1, NUM_ITEMS + 5], [0, 0], 0, [1]))
    assert err.value.field == "history.item_ids[1]"
    with pytest.raises(RequestError) as err:
        genctr.score(Request([1], [0], 0, [1, 2, -3]))
    assert err.value.field == "candidates[2].item_id"
    with pytest.raises(RequestError) as err:
        genctr.score(Request([1], [0], NUM_CATEGORIES, [1]))
    assert err.value.field == "query_category_id"
    with pytest.raises(RequestError) as err:
        genctr.score(Request([1, 2], [0, 99], 0, [1]))
    assert err.value.field == "history.category_ids[1]"


def test_oov_skip_history_drops_unknown_entries(artifacts: dict) -> None:
    skip = Predictor(artifacts["genctr-none"]["path"], oov="skip_history")
    with_unknown = skip.score(Request([5, NUM_ITEMS + 1, 7, 9], [1, 2, 99, 3], 4, [11, 12]))
    without = skip.score(Request([5, 9], [1, 3], 4, [11, 12]))
    np.testing.assert_array_equal(with_unknown, without)
    with pytest.raises(RequestError):  # candidates are never skipped
        skip.score(Request([5], [1], 4, [NUM_ITEMS]))


def test_long_history_keeps_the_newest(genctr: Predictor) -> None:
    rng = np.random.default_rng(3)
    items = rng.integers(0, NUM_ITEMS, 80).tolist()
    cats = rng.integers(0, NUM_CATEGORIES, 80).tolist()
    assert genctr.max_history == 50
    long = genctr.score(Request(items, cats, 2, [1, 2, 3]))
    newest = genctr.score(Request(items[-50:], cats[-50:], 2, [1, 2, 3]))
    np.testing.assert_array_equal(long, newest)
    limited = Predictor(genctr.artifact, max_request_history=60, max_candidates=2)
    with pytest.raises(RequestError, match="at most 60"):
        limited.score(Request(items, cats, 2, [1]))
    with pytest.raises(RequestError, match="at most 2"):
        limited.score(Request(items[:5], cats[:5], 2, [1, 2, 3]))


def test_missing_categories_come_from_the_catalogue(genctr: Predictor) -> None:
    catalogue = genctr.item_categories
    items, cands = [3, 8, 13], [21, 34]
    explicit = genctr.score(
        Request(items, catalogue[items].tolist(), 1, cands, catalogue[cands].tolist())
    )
    implicit = genctr.score(Request(items, None, 1, cands, [None, None]))
    np.testing.assert_array_equal(explicit, implicit)


def test_malformed_requests(genctr: Predictor) -> None:
    with pytest.raises(RequestError, match="at least one candidate"):
        genctr.score(Request([1], [0], 0, []))
    with pytest.raises(RequestError, match="expected 2"):
        genctr.score(Request([1, 2], [0], 0, [1]))
    with pytest.raises(RequestError, match="oldest first"):
        genctr.score(Request([1, 2], [0, 0], 0, [1], history_timestamps=[5, 3]))
    with pytest.raises(RequestError, match="integers"):
        genctr.score(Request([1, 2**70], [0, 0], 0, [1]))


def test_unknown_ids_score_with_the_default_rows(artifacts: dict, runs: dict) -> None:
    """A new ad in a page is scored (the default item row, the category the request gives),
    the page's other candidates score as without it, and every unknown id is counted."""
    from genctr_rec.serving.export import load_trained
    from genctr_rec.serving.model import build_serving_model, table_weights

    path = artifacts["genctr-none"]["path"]
    predictor = Predictor(path, cache_size=0)
    assert predictor.oov == "default"
    # the default rows (what export compiles) are the mean trained rows, after every trained
    # row unchanged
    _, trained = load_trained(runs["genctr"])
    served, _ = build_serving_model(trained)
    tables = {"item": served.lookup.items.rows, "category": served.lookup.categories.rows}
    for name, rows in table_weights(trained).items():
        table = tables[name]
        assert table.shape[0] == rows.shape[0] + 1
        torch.testing.assert_close(table[:-1], rows, rtol=0, atol=0)
        torch.testing.assert_close(table[-1], rows.mean(0))
    known = [5, 17, 23]
    cats = predictor.item_categories[known].tolist()
    base = predictor.score(Request([3, 4], None, cats[0], known, cats))
    page = predictor.score(Request([3, 4], None, cats[0], [5, NUM_ITEMS + 7, 17, 23],
                                   [cats[0], 2, cats[1], cats[2]]))  # fmt: skip
    np.testing.assert_allclose(page[[0, 2, 3]], base, atol=1e-6)
    assert 0 < page[1] < 1
    # any unknown id is the same default row; the request's category is used
    other = predictor.score(Request([3, 4], None, cats[0], [10**12], [2]))
    np.testing.assert_allclose(other, page[[1]], atol=1e-6)
    elsewhere = predictor.score(Request([3, 4], None, cats[0], [10**12], [3]))
    assert not np.allclose(elsewhere, other)
    no_category = predictor.score(Request([3, 4], None, cats[0], [NUM_ITEMS]))
    bad_category = predictor.score(
        Request([3, 4], None, cats[0], [NUM_ITEMS], [NUM_CATEGORIES + 4])
    )
    np.testing.assert_allclose(no_category, bad_category, atol=1e-6)  # both: default category
    assert predictor.unknown_ids == {"candidates.item_id": 5, "candidates.category_id": 1}
    # history, query and feature values past their vocabularies
    history = predictor.score(Request([3, NUM_ITEMS + 1, 4], [1, 2, 99], NUM_CATEGORIES + 3, [5]))
    assert np.isfinite(history).all()
    features = dict(TOY_FEATURES, user_segment=99, user_interests=[1, 500])
    assert np.isfinite(predictor.score(PlainRequest([3], None, 1, [5], features=features))).all()
    assert predictor.unknown_ids["history.item_ids"] == 1
    assert predictor.unknown_ids["history.category_ids"] == 1
    assert predictor.unknown_ids["query_category_id"] == 1
    assert predictor.unknown_ids["features.user_segment"] == 1
    assert predictor.unknown_ids["features.user_interests"] == 1
    # int8 tables have the default rows too
    int8 = Predictor(artifacts["genctr-int8"]["path"], cache_size=0)
    assert 0 < int8.score(Request([3, 4], None, cats[0], [NUM_ITEMS + 7], [2]))[0] < 1
