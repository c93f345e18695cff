"""Sparse k-reciprocal re-ranking against a dense textbook implementation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.eval_scale import dense_rerank_reference
from configs.defaults import get_cfg_defaults
from processor.evaluate import build_eval_settings
from utils.metrics import eval_func, evaluate_features
from utils.reranking import (
    RerankParams,
    _half_sums_in_order,
    k_reciprocal_rerank_chunks,
    re_ranking,
)


def textbook_re_ranking(qf, gf, k1, k2, lambda_value):
    """Dense float64 k-reciprocal re-ranking written from the paper's definitions.

    Uses the paper's Jaccard form sum(min) / sum(max) rather than 1 - s / (2 - s).
    """
    x = np.concatenate([qf, gf]).astype(np.float64)
    n, num_q = len(x), len(qf)
    sq = (x**2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    original = (dist / dist.max(axis=0)).T
    ranking = np.argsort(original, axis=1, kind="stable")

    def reciprocal_set(i, k):
        return {int(j) for j in ranking[i, : k + 1] if i in ranking[j, : k + 1]}

    half = int(np.around(k1 / 2))
    weights = np.zeros((n, n))
    for i in range(n):
        core = reciprocal_set(i, k1)
        expanded = set(core)
        for cand in core:
            cand_set = reciprocal_set(cand, half)
            if len(cand_set & core) > 2 / 3 * len(cand_set):
                expanded |= cand_set
        cols = sorted(expanded)
        w = np.exp(-original[i, cols])
        weights[i, cols] = w / w.sum()
    if k2 != 1:
        weights = np.stack([weights[ranking[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.empty((num_q, n))
    for i in range(num_q):
        jaccard[i] = 1.0 - (
            np.minimum(weights[i], weights).sum(1) / np.maximum(weights[i], weights).sum(1)
        )
    final = (1 - lambda_value) * jaccard + lambda_value * original[:num_q]
    return final[:, num_q:]


def clustered_features(seed, num_q=14, num_g=46, num_ids=6, dim=12):
    """Features around a few identity centres: reciprocal sets and expansions are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=gen)
    q_pids = torch.randint(0, num_ids, (num_q,), generator=gen)
    g_pids = torch.randint(0, num_ids, (num_g,), generator=gen)
    qf = centres[q_pids] + 0.7 * torch.randn(num_q, dim, generator=gen)
    gf = centres[g_pids] + 0.7 * torch.randn(num_g, dim, generator=gen)
    return qf, gf, q_pids.numpy(), g_pids.numpy()


@pytest.mark.parametrize(
    "k1,k2,lambda_value",
    [
        (20, 6, 0.3),
        (8, 3, 0.3),
        (5, 1, 0.0),
        (7, 4, 0.5),
        (3, 2, 0.6),
        (9, 3, 1.0),
        (11, 5, 0.1),
        (50, 15, 0.3),
    ],
)
def test_sparse_equals_textbook(k1, k2, lambda_value):
    qf, gf, _, _ = clustered_features(seed=k1 * 10 + k2)
    expected = textbook_re_ranking(qf.numpy(), gf.numpy(), k1, k2, lambda_value)
    got = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
    assert got.shape == (len(qf), len(gf)) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    if lambda_value < 1.0:  # the Jaccard part is informative, not all ones
        assert np.ptp(got) > 0.1


@pytest.mark.parametrize("num_q,num_g", [(1, 1), (2, 3), (4, 2)])
def test_sets_smaller_than_k1(num_q, num_g):
    gen = torch.Generator().manual_seed(num_q * 10 + num_g)
    qf, gf = torch.randn(num_q, 8, generator=gen), torch.randn(num_g, 8, generator=gen)
    expected = textbook_re_ranking(qf.numpy(), gf.numpy(), 20, 6, 0.3)
    np.testing.assert_allclose(re_ranking(qf, gf, 20, 6, 0.3), expected, atol=2e-5)


def test_official_signature_defaults_and_numpy_input():
    qf, gf, _, _ = clustered_features(seed=11)
    expected = textbook_re_ranking(qf.numpy(), gf.numpy(), 20, 6, 0.3)
    np.testing.assert_allclose(re_ranking(qf.numpy(), gf.numpy()), expected, atol=2e-5)


def test_rerank_params_come_from_the_config_only():
    # No second copy of the values: RerankParams has no defaults, the evaluation settings are
    # built from TEST.RE_RANKING_K1/K2/LAMBDA.
    with pytest.raises(TypeError):
        RerankParams()
    cfg = get_cfg_defaults()
    cfg.TEST.RE_RANKING = True
    cfg.TEST.RE_RANKING_K1, cfg.TEST.RE_RANKING_K2, cfg.TEST.RE_RANKING_LAMBDA = 31, 7, 0.25
    assert build_eval_settings(cfg).rerank == RerankParams(31, 7, 0.25)
    defaults = build_eval_settings(get_cfg_defaults()).rerank
    assert defaults is None  # TEST.RE_RANKING False


def test_block_size_does_not_change_the_result():
    qf, gf, _, _ = clustered_features(seed=12, num_q=25, num_g=70)
    # Blocks are reused buffers: copy each one before asking for the next.
    whole = [b.numpy().copy() for b in k_reciprocal_rerank_chunks(qf, gf, 9, 3, 0.3)]
    blocks = [
        b.numpy().copy()
        for b in k_reciprocal_rerank_chunks(
            qf, gf, 9, 3, 0.3, memory_budget_mb=1e-4, show_progress=False
        )
    ]
    assert len(whole) == 1 and len(blocks) == len(qf)  # the tiny budget: one query per block
    np.testing.assert_allclose(np.concatenate(blocks), whole[0], atol=1e-6)


def test_evaluator_with_rerank_equals_dense_path():
    qf, gf, q_pids, g_pids = clustered_features(seed=13, num_q=20, num_g=80)
    q_camids = np.zeros(len(q_pids), dtype=np.int64)
    g_camids = np.ones(len(g_pids), dtype=np.int64)
    params = RerankParams(k1=10, k2=4, lambda_value=0.3)
    dense = re_ranking(F.normalize(qf, dim=1), F.normalize(gf, dim=1), 10, 4, 0.3)
    cmc, m_ap = eval_func(dense, q_pids, g_pids, q_camids, g_camids)
    result = evaluate_features(
        qf, gf, q_pids, g_pids, q_camids, g_camids, rerank=params, show_progress=False
    )
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-6)
    assert result.mAP == pytest.approx(m_ap, abs=1e-6)
    plain = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, show_progress=False)
    assert result.mAP != pytest.approx(plain.mAP, abs=1e-9)  # re-ranking did change the ranking


def test_evaluator_topk_lists_follow_the_reranked_distances():
    qf, gf, q_pids, g_pids = clustered_features(seed=15, num_q=12, num_g=50)
    rng = np.random.default_rng(15)
    q_camids, g_camids = rng.integers(0, 3, len(q_pids)), rng.integers(0, 3, len(g_pids))
    dense = re_ranking(F.normalize(qf, dim=1), F.normalize(gf, dim=1), 10, 4, 0.3)
    k = 6
    result = evaluate_features(
        qf,
        gf,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        keep_topk=k,
        rerank=RerankParams(10, 4, 0.3),
        show_progress=False,
    )
    for qi in range(len(q_pids)):
        keep = ~((g_pids == q_pids[qi]) & (g_camids == q_camids[qi]))
        cols = np.flatnonzero(keep)
        order = cols[np.argsort(dense[qi, cols], kind="stable")][:k]
        np.testing.assert_array_equal(result.topk_indices[qi], order)
        np.testing.assert_allclose(result.topk_distances[qi], dense[qi, order], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# TEST.RE_RANKING_FLOAT16: the official code's float16 storage and arithmetic
# ------------------------------------------------------------------------------------------------
def _scaled_original(qf, gf):
    x = np.concatenate([qf, gf]).astype(np.float64)
    sq = (x**2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    return (dist / dist.max(axis=0)).T[: len(qf), len(qf) :]


@pytest.mark.parametrize(
    "k1,k2,lambda_value", [(20, 6, 0.3), (10, 1, 0.3), (9, 3, 0.25), (50, 15, 0.3)]
)
def test_float16_reproduces_the_official_float16_computation(k1, k2, lambda_value):
    qf, gf, _, _ = clustered_features(seed=k1 + k2, num_q=20, num_g=80)
    q, g = qf.numpy(), gf.numpy()
    # The official algorithm, dense, with its float16 V, float16 sums and float16 Jaccard.
    official = dense_rerank_reference(q, g, k1, k2, lambda_value)
    half = re_ranking(q, g, k1, k2, lambda_value, float16=True)
    full = re_ranking(q, g, k1, k2, lambda_value)
    # Pairs sharing V mass (Jaccard < 1); the others are 1 in every precision.
    jaccard = (official - lambda_value * _scaled_original(q, g)) / (1 - lambda_value)
    shared = jaccard < 0.999
    assert shared.sum() >= 300
    err_half, err_full = np.abs(half - official)[shared], np.abs(full - official)[shared]
    # float16: the same numbers, except a rare V weight on the other side of a float16
    # rounding boundary (float32 noise before the rounding): a few float16 steps at most.
    assert (err_half < 1e-6).mean() >= 0.99 and err_half.max() <= 1e-3
    # float32 differs almost everywhere, by up to a few 1e-3.
    assert (err_full < 1e-6).mean() < 0.05 and err_full.max() > 5e-4
    # Blocks (one query per block) give the same float16 result (the float32 original distance
    # of a smaller matrix product may differ in its last bit).
    blocks = k_reciprocal_rerank_chunks(
        qf, gf, k1, k2, lambda_value, memory_budget_mb=1e-4, show_progress=False, float16=True
    )
    blocks = np.concatenate([b.numpy().copy() for b in blocks])
    np.testing.assert_allclose(blocks, half, rtol=0, atol=2e-7)


def test_half_sums_accumulate_in_float16_in_the_given_order():
    # 2048 + 1 + 1 in float16: 2048 + 1 rounds back to 2048 (ties to even) each time, so the
    # sum in order is 2048; 1 + 1 + 2048 is 2050 (exactly representable).
    segments = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    values = torch.tensor([2048.0, 1.0, 1.0, 1.0, 1.0, 2048.0, 0.5])
    sums = _half_sums_in_order(segments, values, 4)
    assert sums.dtype == torch.float16
    assert sums.tolist() == [2048.0, 2050.0, 0.5, 0.0]


def test_float16_switch_reaches_the_evaluator():
    cfg = get_cfg_defaults()
    cfg.TEST.RE_RANKING, cfg.TEST.RE_RANKING_FLOAT16 = True, True
    params = build_eval_settings(cfg).rerank
    assert params == RerankParams(50, 15, 0.3, float16=True)
    qf, gf, q_pids, g_pids = clustered_features(seed=16, num_q=20, num_g=80)
    q_camids = np.zeros(len(q_pids), dtype=np.int64)
    g_camids = np.ones(len(g_pids), dtype=np.int64)
    qn, gn = F.normalize(qf, dim=1).numpy(), F.normalize(gf, dim=1).numpy()
    official = dense_rerank_reference(qn, gn, 10, 4, 0.3)
    cmc, m_ap = eval_func(official, q_pids, g_pids, q_camids, g_camids)
    ids = (q_pids, g_pids, q_camids, g_camids)
    params = RerankParams(10, 4, 0.3, float16=True)
    result = evaluate_features(qf, gf, *ids, rerank=params, show_progress=False)
    assert result.mAP == pytest.approx(m_ap, abs=1e-6)
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-6)


def test_jaccard_identity_for_rows_summing_to_one():
    # With rows summing to 1, sum(max) = 2 - sum(min), so 1 - s / (2 - s) is the Jaccard distance.
    rng = np.random.default_rng(0)
    a = rng.random(30) * (rng.random(30) < 0.4)
    b = rng.random(30) * (rng.random(30) < 0.4)
    a, b = a / a.sum(), b / b.sum()
    s = np.minimum(a, b).sum()
    assert np.maximum(a, b).sum() == pytest.approx(2 - s)
    assert 1 - s / (2 - s) == pytest.approx(1 - s / np.maximum(a, b).sum())


def test_two_thirds_rule_in_integers_matches_float_rule():
    for size in range(0, 60):
        for overlap in range(0, size + 1):
            assert (overlap > 2 / 3 * size) == (3 * overlap > 2 * size)


@pytest.mark.parametrize("kwargs", [{"k1": 0}, {"k2": 0}, {"lambda_value": 1.5}])
def test_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        RerankParams(**{"k1": 20, "k2": 6, "lambda_value": 0.3, **kwargs})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu():
    qf, gf, _, _ = clustered_features(seed=14, num_q=30, num_g=120)
    cpu = re_ranking(qf, gf, 12, 5, 0.3)
    gpu = re_ranking(qf.cuda(), gf.cuda(), 12, 5, 0.3)
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)
    # float16: the same operations in the same order on either device.
    cpu = re_ranking(qf, gf, 12, 5, 0.3, float16=True)
    gpu = re_ranking(qf.cuda(), gf.cuda(), 12, 5, 0.3, float16=True)
    close = np.abs(gpu - cpu) < 1e-6
    assert close.mean() >= 0.99 and np.abs(gpu - cpu).max() <= 1e-3
