"""CMC / mAP / mINP: the dense reference, the chunked evaluator and a brute-force loop agree."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.distance import squared_euclidean_distance
from utils.metrics import (
    EvalResult,
    eval_func,
    evaluate_distmat,
    evaluate_distmat_chunks,
    evaluate_features,
)


def brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Per-query loop written from the protocol's definitions, independent of the library."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    aps, inps, firsts, cmc_rows = [], [], [], []
    for i in range(num_q):
        ranked = sorted(range(num_g), key=lambda j: (float(distmat[i, j]), j))
        kept = [j for j in ranked if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        hit_ranks = [r + 1 for r, j in enumerate(kept) if g_pids[j] == q_pids[i]]
        if not hit_ranks:
            continue
        precisions = [(k + 1) / r for k, r in enumerate(hit_ranks)]
        aps.append(sum(precisions) / len(hit_ranks))
        inps.append(len(hit_ranks) / hit_ranks[-1])
        firsts.append(hit_ranks[0])
        cmc_rows.append([1.0 if hit_ranks[0] <= r else 0.0 for r in range(1, max_rank + 1)])
    cmc = np.mean(np.array(cmc_rows), axis=0)
    return cmc, float(np.mean(aps)), float(np.mean(inps)), len(aps)


def make_ids(rng, num_q, num_g, num_pids, num_cams):
    q_pids = rng.integers(0, num_pids, num_q)
    g_pids = rng.integers(0, num_pids, num_g)
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    return q_pids, g_pids, q_camids, g_camids


def assert_matches(result: EvalResult, expected):
    cmc, m_ap, m_inp, num_valid = expected
    assert result.num_valid_queries == num_valid
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-9)
    assert result.mAP == pytest.approx(m_ap, abs=1e-9)
    assert result.mINP == pytest.approx(m_inp, abs=1e-9)


def test_eval_func_hand_worked_example():
    # Gallery: pids and cameras of 6 items. Query 0: pid 1 cam 0; query 1: pid 2 cam 0;
    # query 2: pid 3 cam 0, whose only same-pid item g3 is on its camera (skipped).
    g_pids = np.array([1, 2, 1, 3, 2, 1])
    g_camids = np.array([0, 1, 1, 0, 0, 2])
    q_pids = np.array([1, 2, 3])
    q_camids = np.array([0, 0, 0])
    distmat = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            [0.3, 0.5, 0.1, 0.2, 0.4, 0.05],
            [0.9, 0.8, 0.7, 0.1, 0.6, 0.5],
        ]
    )
    # Query 0: g0 removed; kept order g1 g2 g3 g4 g5, hits at ranks 2 and 5:
    #   AP = (1/2 + 2/5) / 2 = 0.45, INP = 2/5.
    # Query 1: order g5 g2 g3 g0 g4 g1, g4 removed, hit at rank 5: AP = 1/5, INP = 1/5.
    cmc, m_ap = eval_func(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=6)
    np.testing.assert_allclose(cmc, [0.0, 0.5, 0.5, 0.5, 1.0, 1.0], atol=1e-7)
    assert m_ap == pytest.approx((0.45 + 0.2) / 2)

    result = evaluate_distmat(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=6)
    assert result.num_valid_queries == 2 and result.num_queries == 3
    assert result.mAP == pytest.approx(0.325)
    assert result.mINP == pytest.approx((0.4 + 0.2) / 2)
    np.testing.assert_allclose(result.ap[:2], [0.45, 0.2])
    assert math.isnan(result.ap[2]) and math.isnan(result.inp[2])
    np.testing.assert_array_equal(result.first_match_rank, [2, 5, -1])
    assert result.rank(1) == 0.0 and result.rank(5) == 1.0
    assert result.as_dict()["rank1"] == 0.0


def test_tie_rule_is_gallery_index_order():
    # Two gallery items at the same distance: the lower index is ranked first.
    g_pids = np.array([7, 5, 7])
    g_camids = np.array([1, 1, 1])
    distmat = np.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    q_pids, q_camids = np.array([5, 7]), np.array([0, 0])
    # Query 0 (pid 5): hit at rank 2 -> AP 0.5. Query 1 (pid 7): hits at ranks 1 and 3.
    _, m_ap = eval_func(distmat, q_pids, g_pids, q_camids, g_camids)
    assert m_ap == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 2)
    result = evaluate_distmat(distmat, q_pids, g_pids, q_camids, g_camids)
    assert result.mAP == pytest.approx(m_ap)
    np.testing.assert_allclose(result.inp, [0.5, 2 / 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_equals_dense_and_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    num_q, num_g = 23, 61
    ids = make_ids(rng, num_q, num_g, num_pids=6, num_cams=3)
    # Integer-valued features: products are exact in float32 and many distances tie.
    qf = torch.from_numpy(rng.integers(-2, 3, (num_q, 4))).float()
    gf = torch.from_numpy(rng.integers(-2, 3, (num_g, 4))).float()
    distmat = squared_euclidean_distance(qf, gf).numpy()
    assert len(np.unique(distmat)) < distmat.size / 4  # plenty of ties
    expected = brute_force(distmat, *ids, max_rank=50)
    cmc, m_ap = eval_func(distmat, *ids, max_rank=50)
    np.testing.assert_allclose(cmc, expected[0], atol=1e-6)
    assert m_ap == pytest.approx(expected[1], abs=1e-12)
    for budget in (1e-6, 0.01, 64.0):  # one row per block and per group ... all in one block
        result = evaluate_features(
            qf, gf, *ids, feat_norm=False, memory_budget_mb=budget, show_progress=False
        )
        assert_matches(result, expected)


def test_uneven_blocks_and_block_of_one_row():
    rng = np.random.default_rng(3)
    num_q, num_g = 17, 40
    ids = make_ids(rng, num_q, num_g, num_pids=5, num_cams=2)
    distmat = rng.integers(0, 6, (num_q, num_g)).astype(np.float32)
    expected = brute_force(distmat, *ids, max_rank=10)
    bounds = [0, 1, 2, 7, 8, 16, 17]
    blocks = [torch.from_numpy(distmat[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    result = evaluate_distmat_chunks(blocks, *ids, max_rank=10, show_progress=False)
    assert_matches(result, expected)
    assert len(result.cmc) == 10


def test_normalised_float_features_match_dense_reference():
    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    ids = make_ids(rng, 30, 90, num_pids=8, num_cams=4)
    centres = torch.randn(8, 32)
    qf = centres[ids[0]] + 0.8 * torch.randn(30, 32)
    gf = centres[ids[1]] + 0.8 * torch.randn(90, 32)
    dense = squared_euclidean_distance(F.normalize(qf, dim=1), F.normalize(gf, dim=1)).numpy()
    expected = brute_force(dense, *ids, max_rank=50)
    cmc, m_ap = eval_func(dense, *ids)
    result = evaluate_features(qf, gf, *ids, memory_budget_mb=0.05, show_progress=False)
    assert_matches(result, expected)
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-6)
    assert result.mAP == pytest.approx(m_ap, abs=1e-6)
    assert 0.0 < result.mINP <= result.mAP <= 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_are_widened(dtype):
    rng = np.random.default_rng(5)
    ids = make_ids(rng, 12, 50, num_pids=4, num_cams=3)
    qf = torch.randn(12, 16).to(dtype)
    gf = torch.randn(50, 16).to(dtype)
    dense = squared_euclidean_distance(
        F.normalize(qf.float(), dim=1), F.normalize(gf.float(), dim=1)
    ).numpy()
    result = evaluate_features(qf, gf, *ids, show_progress=False)
    assert_matches(result, brute_force(dense, *ids, max_rank=50))


def test_gallery_smaller_than_max_rank_and_removed_matches():
    # 7 gallery items, max_rank 50 -> CMC of length 7. Query 1's only same-pid item shares its
    # camera (skipped). Query 0 loses 3 of 7 items to removal, so its ranking has 4 entries.
    g_pids = np.array([1, 1, 1, 1, 2, 3, 4])
    g_camids = np.array([0, 0, 0, 1, 1, 1, 1])
    q_pids, q_camids = np.array([1, 2, 1]), np.array([0, 1, 2])
    distmat = np.random.default_rng(6).random((3, 7))
    expected = brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50)
    cmc, m_ap = eval_func(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50)
    result = evaluate_distmat(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50)
    assert len(cmc) == len(result.cmc) == 7
    assert result.num_valid_queries == 2
    assert_matches(result, expected)
    np.testing.assert_allclose(cmc, expected[0], atol=1e-6)
    assert cmc[-1] == 1.0


def test_no_valid_query_raises():
    g_pids, g_camids = np.array([1, 2]), np.array([0, 0])
    q_pids, q_camids = np.array([1, 3]), np.array([0, 0])
    distmat = np.ones((2, 2))
    with pytest.raises(ValueError, match="no query has a true match"):
        eval_func(distmat, q_pids, g_pids, q_camids, g_camids)
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_distmat(distmat, q_pids, g_pids, q_camids, g_camids)


def test_input_checks():
    ids = (np.array([1]), np.array([1, 2]), np.array([0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="q_pids"):
        eval_func(np.ones((2, 2)), *ids)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_distmat(np.array([[np.nan, 0.0]]), *ids)
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluate_features(torch.full((1, 3), np.inf), torch.ones(2, 3), *ids)
    with pytest.raises(ValueError, match="covered"):
        evaluate_distmat_chunks([], *ids)


def test_nan_negatives_rank_last_as_numpy_does():
    distmat = np.array([[np.nan, 0.3, 0.1, np.nan]])
    g_pids, g_camids = np.array([0, 1, 0, 2]), np.array([0, 1, 1, 1])
    q_pids, q_camids = np.array([1]), np.array([0])
    _, m_ap = eval_func(distmat, q_pids, g_pids, q_camids, g_camids)
    result = evaluate_distmat(distmat, q_pids, g_pids, q_camids, g_camids)
    assert m_ap == pytest.approx(0.5) and result.mAP == pytest.approx(0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu():
    rng = np.random.default_rng(7)
    ids = make_ids(rng, 40, 300, num_pids=10, num_cams=4)
    qf, gf = torch.randn(40, 64), torch.randn(300, 64)
    cpu = evaluate_features(qf, gf, *ids, show_progress=False)
    gpu = evaluate_features(qf.cuda(), gf.cuda(), *ids, show_progress=False)
    np.testing.assert_allclose(gpu.cmc, cpu.cmc, atol=1e-6)
    assert gpu.mAP == pytest.approx(cpu.mAP, abs=1e-6)
    assert gpu.mINP == pytest.approx(cpu.mINP, abs=1e-6)


def test_progress_log_lines_when_not_a_terminal(monkeypatch, caplog):
    import utils.logger

    monkeypatch.setattr(utils.logger, "LOG_PERIOD_S", 0.0)
    rng = np.random.default_rng(8)
    ids = make_ids(rng, 6, 20, num_pids=3, num_cams=2)
    distmat = rng.random((6, 20))
    blocks = [torch.from_numpy(distmat[i : i + 2]) for i in range(0, 6, 2)]
    with caplog.at_level("INFO", logger="utils.metrics"):
        evaluate_distmat_chunks(blocks, *ids, desc="eval test")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval test")]
    assert lines and "2/6 queries" in lines[0]
