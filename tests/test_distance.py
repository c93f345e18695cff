"""utils.distance: budgets, feature preparation, distance blocks and the exact top-k."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.distance import (
    block_topk,
    chunk_rows,
    chunked_topk,
    distance_chunks,
    float_order_key,
    prepare_features,
    row_groups,
    squared_euclidean_distance,
)


def stable_topk(dist, k, excluded=None):
    """Per row: (indices, values) of the k smallest, ties by index, NaN last (numpy's order)."""
    out = []
    for r in range(dist.shape[0]):
        cols = [j for j in range(dist.shape[1]) if excluded is None or not excluded[r, j]]
        cols.sort(
            key=lambda j: (np.isnan(dist[r, j]), 0.0 if np.isnan(dist[r, j]) else dist[r, j], j)
        )
        out.append((np.array(cols[:k], dtype=np.int64), dist[r, cols[:k]]))
    return out


def test_chunk_rows_formula():
    assert chunk_rows(1.0, 1024) == 1024  # 1 MiB / 1 KiB
    assert chunk_rows(1.0, 1000) == 1048  # floor(1048576 / 1000)
    assert chunk_rows(1.0, 1024, max_rows=10) == 10
    assert chunk_rows(1e-9, 1024) == 1  # never zero rows
    assert chunk_rows(1e-9, 1024, max_rows=0) == 1


def test_row_groups_cover_in_order_within_budget():
    costs = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    groups = row_groups(costs, 7)
    assert [a for a, _ in groups] == [0] + [b for _, b in groups[:-1]] and groups[-1][1] == 8
    for a, b in groups:
        assert costs[a:b].sum() <= 7 or b - a == 1  # a row over budget stands alone
    assert groups == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8)]


def test_float_order_key_orders_like_floats():
    specials = [-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-45, 1e-30, 2.0, 3.5, np.inf]
    values = np.concatenate([specials, np.random.default_rng(0).normal(size=200) * 1e3])
    keys = float_order_key(torch.tensor(values, dtype=torch.float32)).numpy()
    order = np.argsort(values.astype(np.float32), kind="stable")
    assert (np.diff(keys[order]) >= 0).all()
    same = values.astype(np.float32)[order][1:] == values.astype(np.float32)[order][:-1]
    np.testing.assert_array_equal(np.diff(keys[order]) == 0, same)  # equal iff equal floats
    assert keys.min() >= 0 and keys.max() < 2**32
    # NaN of either sign goes after +inf.
    nans = torch.tensor([float("nan"), -float("nan"), float("inf")])
    k = float_order_key(nans)
    assert k[0] == k[1] > k[2]


def test_prepare_features_normalises_like_f_normalize():
    x = torch.randn(7, 5) * 3
    torch.testing.assert_close(prepare_features(x, True), F.normalize(x, dim=1), rtol=0, atol=0)
    half = x.half()
    torch.testing.assert_close(
        prepare_features(half, True), F.normalize(half.float(), dim=1), rtol=0, atol=0
    )
    assert prepare_features(x, False) is not None and torch.equal(prepare_features(x, False), x)
    with pytest.raises(ValueError, match="qf contains NaN"):
        prepare_features(torch.tensor([[1.0, float("nan")]]), True, "qf")
    with pytest.raises(ValueError, match="2-D"):
        prepare_features(torch.ones(3), True)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_distance_chunks_cover_the_dense_matrix(metric):
    q, g = torch.randn(11, 6), torch.randn(9, 6)
    blocks = [b.clone() for b in distance_chunks(q, g, 4, metric)]
    assert [len(b) for b in blocks] == [4, 4, 3]
    dense = squared_euclidean_distance(q, g) if metric == "euclidean" else -(q @ g.T)
    torch.testing.assert_close(torch.cat(blocks), dense, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="metric"):
        next(distance_chunks(q, g, 4, "manhattan"))


@pytest.mark.parametrize("budget", [1e-6, 64.0])
def test_block_topk_ties_exclusion_nan_and_short_lists(budget):
    rng = np.random.default_rng(1)
    dist = rng.integers(0, 4, (9, 13)).astype(np.float32)  # many exact ties
    dist[2, [3, 7]] = np.nan
    dist[4, :] = -0.0
    excluded = rng.random((9, 13)) < 0.3
    excluded[5, :10] = True  # row 5 keeps 3 items: a list shorter than k
    rows, cols = np.nonzero(excluded)
    k = 6
    values, index = block_topk(
        torch.from_numpy(dist),
        k,
        exclude=(torch.from_numpy(rows), torch.from_numpy(cols)),
        memory_budget_mb=budget,  # 1e-6: one row per group
    )
    assert values.shape == index.shape == (9, k)
    for r, (want_i, want_v) in enumerate(stable_topk(dist, k, excluded)):
        n = len(want_i)
        np.testing.assert_array_equal(index[r, :n].numpy(), want_i)
        np.testing.assert_array_equal(values[r, :n].numpy(), want_v)  # bit for bit (NaN too)
        assert (index[r, n:] == -1).all() and torch.isinf(values[r, n:]).all()
    assert (index[5] >= 0).sum() == 3
    with pytest.raises(ValueError, match="k must be positive"):
        block_topk(torch.from_numpy(dist), 0)


def test_block_topk_leaves_the_block_unchanged():
    block = torch.rand(4, 8)
    before = block.clone()
    block_topk(block, 3, exclude=(torch.tensor([0, 1]), torch.tensor([2, 3])))
    assert torch.equal(block, before)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("gallery_chunk", [None, 1, 4, 100])
def test_chunked_topk_equals_brute_force_with_ties(metric, gallery_chunk):
    gen = torch.Generator().manual_seed(2)
    # Small integer features: every product is exact in float32 and distances tie often.
    q = torch.randint(-2, 3, (10, 3), generator=gen).float()
    g = torch.randint(-2, 3, (23, 3), generator=gen).float()
    if metric == "euclidean":
        dense = ((q[:, None, :] - g[None]) ** 2).sum(-1).numpy()
    else:
        dense = -(q.double() @ g.double().T).numpy().astype(np.float32)
    assert len(np.unique(dense)) < dense.size / 4
    k = 8
    values, index = chunked_topk(
        q, g.half(), k, metric=metric, memory_budget_mb=1e-6, gallery_chunk=gallery_chunk
    )
    assert values.dtype == torch.float32 and index.shape == (10, k)
    for r, (want_i, want_v) in enumerate(stable_topk(dense, k)):
        np.testing.assert_array_equal(index[r].numpy(), want_i)
        np.testing.assert_array_equal(values[r].numpy(), want_v)
    # k above the gallery size keeps every item, in order.
    _, all_index = chunked_topk(q, g, 100, metric=metric, gallery_chunk=gallery_chunk)
    assert all_index.shape == (10, 23)
    assert sorted(all_index[0].tolist()) == list(range(23))


def test_chunked_topk_input_checks():
    with pytest.raises(ValueError, match="metric"):
        chunked_topk(torch.ones(1, 2), torch.ones(3, 2), 1, metric="dot")
    with pytest.raises(ValueError, match="k must be positive"):
        chunked_topk(torch.ones(1, 2), torch.ones(3, 2), 0)
