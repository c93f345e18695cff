"""Verification ROC (utils.roc): TPR at fixed FPRs against sklearn's roc_curve."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from processor.evaluate import EvalSettings, FeatureSet, evaluate_sets, summarize
from utils.metrics import evaluate_distmat, evaluate_features
from utils.roc import ROC_FPRS, TprAtFpr, count_negative_pairs, tpr_key

FPRS = (1e-4, 1e-3, 1e-2, 0.05, 0.3)


def _problem(seed, num_q=30, num_g=220, ids=25, cams=3, quantise=False):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, ids, num_q)
    g_pids = rng.integers(0, ids + 10, num_g)  # some gallery-only identities
    q_cams, g_cams = rng.integers(0, cams, num_q), rng.integers(0, cams, num_g)
    centres = rng.normal(size=(ids + 10, 8))
    qf = centres[q_pids] + 0.9 * rng.normal(size=(num_q, 8))
    gf = centres[g_pids] + 0.9 * rng.normal(size=(num_g, 8))
    dist = ((qf[:, None] - gf[None]) ** 2).sum(-1)
    if quantise:  # many exact ties, between positives and negatives too
        dist = np.round(dist)
    return qf, gf, dist.astype(np.float32), q_pids, g_pids, q_cams, g_cams


def _sklearn_tpr(dist, q_pids, g_pids, q_cams, g_cams, fprs):
    same = q_pids[:, None] == g_pids[None]
    kept = ~(same & (q_cams[:, None] == g_cams[None]))  # same identity and camera: left out
    labels, scores = same[kept].astype(int), -dist[kept].astype(np.float64)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {f: float(tpr[fpr <= f].max()) for f in fprs}


@pytest.mark.parametrize("quantise", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("budget", [64.0, 1e-4], ids=["one-block", "row-by-row"])
def test_tpr_at_fpr_equals_sklearn(quantise, budget):
    _, _, dist, q_pids, g_pids, q_cams, g_cams = _problem(3, quantise=quantise)
    want = _sklearn_tpr(dist, q_pids, g_pids, q_cams, g_cams, FPRS)
    result = evaluate_distmat(
        dist, q_pids, g_pids, q_cams, g_cams,
        memory_budget_mb=budget, show_progress=False, roc_fprs=FPRS,
    )  # fmt: skip
    assert result.tpr_at_fpr == pytest.approx(want, abs=1e-12)
    assert len({round(v, 6) for v in want.values()}) >= 3  # the rates are told apart
    assert result.as_dict()["tpr@fpr1e-2"] == want[1e-2]


def test_features_path_and_summary_keys():
    qf, gf, _, q_pids, g_pids, q_cams, g_cams = _problem(5)
    qf, gf = torch.tensor(qf, dtype=torch.float32), torch.tensor(gf, dtype=torch.float32)
    result = evaluate_features(
        qf, gf, q_pids, g_pids, q_cams, g_cams, show_progress=False, roc_fprs=ROC_FPRS
    )
    # The evaluator's distance: squared Euclidean of the L2-normalised features.
    qn, gn = torch.nn.functional.normalize(qf), torch.nn.functional.normalize(gf)
    dist = ((qn[:, None] - gn[None]) ** 2).sum(-1).numpy()
    want = _sklearn_tpr(dist, q_pids, g_pids, q_cams, g_cams, ROC_FPRS)
    assert result.tpr_at_fpr == pytest.approx(want, abs=1e-6)

    def feature_set(f, pids, cams):
        n = len(pids)
        return FeatureSet(f, pids, cams, np.zeros(n, np.int64), [str(i) for i in range(n)])

    settings = EvalSettings(True, 50, 64, None, "fp32", roc=True)
    summary = summarize(
        evaluate_sets(feature_set(qf, q_pids, q_cams), feature_set(gf, g_pids, g_cams), settings)
    )
    assert {tpr_key(f) for f in ROC_FPRS} == {"tpr@fpr1e-4", "tpr@fpr1e-3", "tpr@fpr1e-2"}
    for f in ROC_FPRS:
        assert summary[tpr_key(f)] == pytest.approx(want[f], abs=1e-6)
    off = summarize(
        evaluate_sets(
            feature_set(qf, q_pids, q_cams),
            feature_set(gf, g_pids, g_cams),
            EvalSettings(True, 50, 64, None, "fp32"),
        )
    )
    assert not any(k.startswith("tpr@") for k in off)


def test_counts_and_edge_cases():
    q, g = np.array([1, 2, 2, 9]), np.array([2, 2, 1, 3, 4])
    # Same-identity pairs: query 1 -> 1, each query 2 -> 2, query 9 -> 0.
    assert count_negative_pairs(q, g) == 4 * 5 - (1 + 2 + 2)
    assert count_negative_pairs(q, np.array([], dtype=np.int64)) == 0
    roc = TprAtFpr([0.5], num_negatives=0, num_gallery=1, memory_budget_mb=1)
    assert math.isnan(roc.result()[0.5])
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        TprAtFpr([1.0], 10, 5, 1)
    # Hand-worked: 4 negatives (1, 2, 3, 4), positives (0.5, 2.5); FPR 0.25 allows one negative
    # below the threshold: t = the 2nd smallest negative (2), so 1 positive of 2 is accepted.
    roc = TprAtFpr([0.25, 0.1, 0.5], 4, 6, 1)
    block = torch.tensor([[0.5, 1.0, 2.0, 2.5, 3.0, 4.0]])
    gidx = torch.tensor([[0, 3]])
    roc.add(block, gidx, torch.tensor([[True, True]]), torch.tensor([[False, False]]))
    # FPR 0.1: no negative, t = 1 -> 0.5 too; FPR 0.5: two, t = 3 -> both positives.
    assert roc.result() == {0.25: 0.5, 0.1: 0.5, 0.5: 1.0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_equals_cpu():
    _, _, dist, q_pids, g_pids, q_cams, g_cams = _problem(11, quantise=True)
    kwargs = dict(memory_budget_mb=1e-3, show_progress=False, roc_fprs=FPRS)
    cpu = evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams, **kwargs)
    gpu = evaluate_distmat(torch.tensor(dist).cuda(), q_pids, g_pids, q_cams, g_cams, **kwargs)
    assert gpu.tpr_at_fpr == cpu.tpr_at_fpr
