"""utils/ann.py: faiss IVF / HNSW search against brute-force ranking, storage round trip."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.ann import (
    AnnParams,
    ann_kind,
    ann_search,
    build_ann,
    default_nlist,
    deserialize_ann,
    serialize_ann,
)


def _clustered(n=2000, q=60, d=24, clusters=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=gen)
    g = centres[torch.randint(clusters, (n,), generator=gen)] + 0.3 * torch.randn(
        n, d, generator=gen
    )
    rows = torch.randint(n, (q,), generator=gen)
    queries = g[rows] + 0.1 * torch.randn(q, d, generator=gen)
    return F.normalize(g, dim=1), F.normalize(queries, dim=1)


def _recall(found, truth):
    """Mean share of each query's true top-k found."""
    k = len(truth[0])
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])


def _brute_force(q, g, k, metric):
    qn, gn = q.double().numpy(), g.double().numpy()
    score = qn @ gn.T if metric == "cosine" else -((qn[:, None] - gn[None]) ** 2).sum(-1)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(score, order, 1), order


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ivf_scanning_every_cell_is_exact(metric):
    g, q = _clustered()
    nlist = default_nlist(len(g))
    assert nlist == round(2000**0.5) == 45
    index = build_ann(g, "ivf", metric, AnnParams(nprobe=nlist))
    assert ann_kind(index) == "ivf" and index.nlist == 45 and index.nprobe == 45
    scores, idx = ann_search(index, q, 10)
    ref_scores, ref_idx = _brute_force(q, g, 10, metric)
    assert idx.tolist() == ref_idx.tolist()
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_hnsw_recall_and_exact_scores(metric):
    g, q = _clustered(seed=1)
    index = build_ann(g, "hnsw", metric, AnnParams(hnsw_m=16, ef_search=200))
    assert ann_kind(index) == "hnsw"
    scores, idx = ann_search(index, q, 10)
    _, ref_idx = _brute_force(q, g, 10, metric)
    assert _recall(idx.tolist(), ref_idx.tolist()) >= 0.99
    # Found items carry their exact score (flat storage, no compression).
    qn, gn = q.double().numpy(), g.double().numpy()
    for qi in range(len(q)):
        rows = gn[idx[qi].numpy()]
        ref = rows @ qn[qi] if metric == "cosine" else -((rows - qn[qi]) ** 2).sum(1)
        np.testing.assert_allclose(scores[qi].numpy(), ref, atol=1e-5)
    assert (np.diff(scores.numpy(), axis=1) <= 1e-6).all()  # best first


def test_hnsw_candidates_by_gallery_size_and_kept_on_storage():
    from utils.ann import EF_SEARCH_LARGE_FROM, default_ef_search

    # Measured (docs/benchmarks.md): 64 enough at 200k, 128 needed at 1M.
    assert default_ef_search(200_000) == 64 and default_ef_search(1_000_000) == 128
    assert default_ef_search(EF_SEARCH_LARGE_FROM - 1) == 64
    assert default_ef_search(EF_SEARCH_LARGE_FROM) == 128
    g, _ = _clustered(n=500, seed=4)
    index = build_ann(g, "hnsw", "cosine")
    assert index.hnsw.efSearch == 64
    assert deserialize_ann(serialize_ann(index), None, None).hnsw.efSearch == 64
    assert build_ann(g, "hnsw", "cosine", AnnParams(ef_search=40)).hnsw.efSearch == 40


def test_few_probes_miss_items_and_storage_round_trip():
    g, q = _clustered(n=3000, clusters=60, seed=2)
    index = build_ann(g, "ivf", "cosine", AnnParams(nlist=50, nprobe=1))
    _, ref_idx = _brute_force(q, g, 50, "cosine")
    _, one = ann_search(index, q, 50)
    assert (
        _recall(one.tolist(), ref_idx.tolist()) < 0.99
    )  # one cell of 50 misses some of the 50 nearest items
    data = serialize_ann(index)
    assert data.dtype == torch.uint8
    same = deserialize_ann(data, ef_search=None, nprobe=None)
    assert same.nprobe == 1 and torch.equal(ann_search(same, q, 50)[1], one)
    wide = deserialize_ann(data, ef_search=None, nprobe=1000)
    assert wide.nprobe == 50  # capped at nlist: exhaustive
    assert ann_search(wide, q, 50)[1].tolist() == ref_idx.tolist()
    with pytest.raises(ValueError, match="kind must be one of"):
        build_ann(g, "lsh", "cosine")


def test_search_benchmark_gallery_and_recall():
    from benchmarks.search_scale import make_gallery, recall_at_k

    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(found, truth) == (2 / 4 + 4 / 4) / 2
    g, q, g_ids, q_ids = make_gallery(400, 30, 32, per_id=10, centre_rank=4, seed=3)
    assert g.shape == (400, 32) and q.shape == (30, 32) and g_ids.shape == (400,)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    # Without variation and noise the centres span exactly their 4-d subspace.
    flat, _, _, _ = make_gallery(400, 30, 32, per_id=10, spread=0, noise=0, centre_rank=4)
    assert np.linalg.matrix_rank(flat.astype(np.float64), tol=1e-4) == 4
    # Each query is a perturbed gallery image of its identity: its nearest item shares it.
    nearest = np.argmax(q @ g.T, axis=1)
    assert (g_ids[nearest] == q_ids).all()
