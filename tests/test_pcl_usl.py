"""Unsupervised PCL-CLIP: sparse Jaccard distance, DBSCAN pseudo labels, relabelled loader, runs."""

import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import datasets.build as build_mod
import train_clipreid
from configs.config import ConfigError, load_cfg
from datasets.build import build_dataloaders
from processor.memory import (
    ClusterSettings,
    build_cluster_settings,
    cluster_eps,
    cluster_pseudo_labels,
    split_by_camera,
)
from tests.conftest import ROOT, run_in_fork
from tests.conftest import last_eval as _last_eval
from tests.conftest import tiny_run_opts as _opts
from utils.reranking import jaccard_distance_sparse


def _dense_jaccard(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """Textbook k-reciprocal Jaccard distance (Zhong et al.), dense, without column scaling."""
    n = len(x)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[(backward == i).any(1)]

    v = np.zeros((n, n))
    for i in range(n):
        core = reciprocal(i, k1)
        expanded = list(core)
        for c in core:
            cand = reciprocal(c, int(np.around(k1 / 2)))
            if len(np.intersect1d(cand, core)) > 2 / 3 * len(cand):
                expanded += list(cand)
        expanded = np.unique(expanded)
        w = np.exp(-d[i, expanded])
        v[i, expanded] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    shared = np.minimum(v[:, None, :], v[None, :, :]).sum(-1)
    return 1.0 - shared / (2.0 - shared)


@pytest.mark.parametrize("k1,k2", [(6, 3), (10, 1), (4, 6)])
def test_sparse_jaccard_matches_dense_textbook(k1, k2):
    gen = torch.Generator().manual_seed(k1 * 10 + k2)
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=1)
    t = 0.9
    dense = _dense_jaccard(x.double().numpy(), k1, k2)
    rows, cols, dists = jaccard_distance_sparse(
        x, k1, k2, t, convention="reranking", memory_budget_mb=0.01
    )
    got = np.full_like(dense, np.nan)
    got[rows.numpy(), cols.numpy()] = dists.numpy()
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == len(rows)  # no duplicate
    np.testing.assert_allclose(got[~np.isnan(got)], dense[~np.isnan(got)], atol=1e-5)
    assert (dense[~np.isnan(got)] <= t + 1e-5).all()
    # Every pair clearly inside the radius is returned, the diagonal (distance 0) included.
    assert not np.isnan(got[dense < t - 1e-5]).any()
    np.testing.assert_allclose(np.diag(got), 0.0, atol=1e-6)
    assert 0 < len(rows) < 40 * 40  # truly sparse, and not empty


def _clustercontrast_jaccard(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """ClusterContrast's compute_jaccard_distance as published, dense (its kNN search: k1)."""
    n = len(x)
    initial_rank = np.argsort(2 - 2 * x @ x.T, axis=1, kind="stable")[:, :k1]

    def k_reciprocal_neigh(i, k):
        forward = initial_rank[i, : k + 1]
        backward = initial_rank[forward, : k + 1]
        return forward[np.where(backward == i)[0]]

    nn_k1 = [k_reciprocal_neigh(i, k1) for i in range(n)]
    nn_k1_half = [k_reciprocal_neigh(i, int(np.around(k1 / 2))) for i in range(n)]
    v = np.zeros((n, n))
    for i in range(n):
        core = nn_k1[i]
        expansion = core
        for candidate in core:
            cand = nn_k1_half[candidate]
            if len(np.intersect1d(cand, core)) > 2 / 3 * len(cand):
                expansion = np.append(expansion, cand)
        expansion = np.unique(expansion)
        w = np.exp(-(2 - 2 * x[i] @ x[expansion].T))
        v[i, expansion] = w / w.sum()  # softmax(-dist)
    if k2 != 1:
        v = np.stack([v[initial_rank[i, :k2]].mean(0) for i in range(n)])
    shared = np.minimum(v[:, None, :], v[None, :, :]).sum(-1)
    jaccard = 1 - shared / (2 - shared)
    jaccard[jaccard < 0] = 0.0
    return jaccard


def _sparse_to_dense(rows, cols, dists, n):
    out = np.full((n, n), np.nan)
    out[rows.numpy(), cols.numpy()] = dists.numpy()
    return out


@pytest.mark.parametrize("k1,k2", [(6, 3), (10, 1), (4, 6), (7, 2)])
def test_clustercontrast_jaccard_matches_the_published_definition(k1, k2):
    gen = torch.Generator().manual_seed(k1 * 7 + k2)
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=1)
    t = 0.9
    dense = _clustercontrast_jaccard(x.double().numpy(), k1, k2)
    rows, cols, dists = jaccard_distance_sparse(x, k1, k2, t, memory_budget_mb=0.01)
    got = _sparse_to_dense(rows, cols, dists, 40)
    kept = ~np.isnan(got)
    np.testing.assert_allclose(got[kept], dense[kept], atol=1e-5)
    assert not np.isnan(got[dense < t - 1e-5]).any() and (dense[kept] <= t + 1e-5).all()
    # The re-ranking convention (k1 + 1 neighbours) is another distance at the same k1.
    other = jaccard_distance_sparse(x, k1, k2, t, convention="reranking")
    both = kept & ~np.isnan(_sparse_to_dense(*other, 40))
    assert np.abs(_sparse_to_dense(*other, 40)[both] - got[both]).max() > 0.05


def test_clustercontrast_k1_is_the_reranking_convention_with_k1_minus_1():
    # Same lists when round(k1 / 2) agrees: ClusterContrast 21 = re-ranking 20 (10 = 10).
    x = torch.nn.functional.normalize(torch.randn(60, 8, generator=torch.Generator()), dim=1)
    cc = jaccard_distance_sparse(x, 21, 6, 0.9)
    rr = jaccard_distance_sparse(x, 20, 6, 0.9, convention="reranking")
    for a, b in zip(cc, rr, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="convention"):
        jaccard_distance_sparse(x, 20, 6, 0.9, convention="faiss")


def _cam_label_split(cluster_labels, all_img_cams):
    """cam_label_split of the CAP/O2CAP code shipped with PCL-CLIP, as published."""
    proxy_labels = -1 * np.ones(cluster_labels.shape, cluster_labels.dtype)
    cnt = 0
    for i in range(0, int(cluster_labels.max() + 1)):
        inds = np.where(cluster_labels == i)[0]
        local_cams = all_img_cams[inds]
        for cc in np.unique(local_cams):
            pc_inds = np.where(local_cams == cc)[0]
            proxy_labels[inds[pc_inds]] = cnt
            cnt += 1
    return proxy_labels


def test_camera_proxies_match_cam_label_split():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 6, 80)
    camids = rng.integers(0, 5, 80)
    got = split_by_camera(labels, camids)
    np.testing.assert_array_equal(got, _cam_label_split(labels, camids))
    # A proxy is one (cluster, camera) pair; outliers stay outliers.
    assert (got[labels == -1] == -1).all()
    assert len({(a, b) for a, b, p in zip(labels, camids, got, strict=True) if p >= 0}) == (
        got.max() + 1
    )


def test_cluster_eps_per_dataset():
    assert cluster_eps(0.0, ["market1501"]) == 0.5 and cluster_eps(0.0, ["msmt17"]) == 0.7
    assert cluster_eps(0.45, ["synthetic"]) == 0.45
    for names in (["synthetic"], ["market1501", "msmt17"]):
        with pytest.raises(ValueError, match="MODEL.CLUSTER_EPS"):
            cluster_eps(0.0, names)
    cfg = load_cfg(os.path.join(ROOT, "configs", "person", "vit_pcl_usl.yml"))
    assert build_cluster_settings(cfg).eps == 0.5  # Market-1501: the reproduction's train.sh
    cfg = load_cfg(
        os.path.join(ROOT, "configs", "person", "vit_pcl_usl.yml"), ["DATASETS.NAMES", "msmt17"]
    )
    assert build_cluster_settings(cfg).eps == 0.7


def test_sparse_jaccard_rejects_bad_radius():
    with pytest.raises(ValueError, match="max_distance"):
        jaccard_distance_sparse(torch.randn(5, 3), 2, 1, 1.0)


def _blobs(seed=0, num_blobs=4, per_blob=12, num_outliers=3, dim=32):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(num_blobs, dim, generator=gen), dim=1)
    pts = centers.repeat_interleave(per_blob, 0)
    pts = pts + 0.05 * torch.randn(pts.shape, generator=gen)
    outliers = torch.randn(num_outliers, dim, generator=gen)
    truth = np.r_[np.repeat(np.arange(num_blobs), per_blob), -np.ones(num_outliers, int)]
    order = torch.randperm(len(truth), generator=gen)
    return torch.cat([pts, outliers])[order], truth[order.numpy()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dbscan_pseudo_labels_recover_blobs_and_drop_outliers(seed):
    feats, truth = _blobs(seed)
    # k1 spans a blob, so its members share almost all V mass; k2 1 because query expansion
    # would lend an isolated point the mass of its (blob) neighbours.
    labels = cluster_pseudo_labels(feats, ClusterSettings(eps=0.3, min_samples=4, k1=12, k2=1))
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels == -1, truth == -1)
    inliers = truth >= 0
    assert adjusted_rand_score(truth[inliers], labels[inliers]) == 1.0
    assert sorted(set(labels[inliers].tolist())) == [0, 1, 2, 3]  # relabelled 0..K-1


def test_relabelled_loader_yields_only_pseudo_labels_of_kept_images(tmp_path):
    cfg = load_cfg(None, _opts(tmp_path / "data", tmp_path / "out", s1=1, s2=1))
    data = build_dataloaders(cfg)
    n = len(data.dataset.train)
    keep = np.arange(0, n, 2)  # every other image; the rest are "outliers"
    pseudo = (np.arange(len(keep)) // 4).astype(np.int64)  # clusters of 4, not the real pids
    loader = data.set_train_labels(keep, pseudo)
    assert loader is data.train_stage2
    expected = {data.dataset.train[i].path: int(p) for i, p in zip(keep, pseudo, strict=True)}
    loader.batch_sampler.set_epoch(1)
    seen = 0
    for batch in loader:
        for path, pid in zip(batch["paths"], batch["pids"].tolist(), strict=True):
            assert expected[path] == pid  # a kept image, with its pseudo label
        # P x K over pseudo labels: 2 clusters x 4 images per batch of 8.
        assert sorted(np.unique(batch["pids"].numpy(), return_counts=True)[1].tolist()) == [4, 4]
        seen += len(batch["pids"])
    assert seen > 0
    with pytest.raises(ValueError, match="0..K-1"):
        data.set_train_labels(keep, pseudo + 1)


def test_unsupervised_config_validation(tmp_path):
    base = _opts(tmp_path / "data", tmp_path / "out")
    with pytest.raises(ConfigError, match="METHOD 'pcl'"):
        load_cfg(None, [*base, "MODEL.PCL_UNSUPERVISED", "True", "MODEL.ID_LOSS_WEIGHT", "0"])
    with pytest.raises(ConfigError, match="ID_LOSS_WEIGHT"):
        load_cfg(None, [*base, "MODEL.METHOD", "pcl", "MODEL.PCL_UNSUPERVISED", "True"])
    with pytest.raises(ConfigError, match="CLUSTER_EPS"):
        load_cfg(None, [*base, *USL[:6], "MODEL.CLUSTER_EPS", "1.5"])


USL = [
    "MODEL.METHOD", "pcl",
    "MODEL.PCL_UNSUPERVISED", "True",
    "MODEL.ID_LOSS_WEIGHT", "0",
    "MODEL.CLUSTER_EPS", "0.8",
    "MODEL.CLUSTER_MIN_SAMPLES", "2",
    "MODEL.CLUSTER_K1", "6",
    "MODEL.CLUSTER_K2", "2",
    "DATALOADER.NUM_INSTANCE", "2",
]  # fmt: skip


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_unsupervised_run_clusters_evaluates_and_ignores_train_pids(tmp_path, monkeypatch):
    data = tmp_path / "data"
    out = tmp_path / "run"
    summary = train_clipreid.main(_opts(data, out, extra=USL))
    records = [r for r in _metrics(out) if "clusters" in r]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["clusters"] >= 1 and r["memory_bank"][0] == r["clusters"]
        assert r["clustered_images"] + r["outliers"] == 24  # 6 train ids x 2 cameras x 2 images
    assert _last_eval(out)["mAP"] == pytest.approx(summary["mAP"], abs=1e-9)

    # Permuting the ground-truth train pids must change nothing: they are never read.
    real = build_mod.build_datasets

    def shuffled(cfg):
        dataset, parts = real(cfg)
        pids = [r.pid for r in dataset.train]
        perm = np.random.default_rng(0).permutation(len(pids))
        assert [pids[i] for i in perm] != pids
        dataset.train[:] = [
            r._replace(pid=pids[i]) for r, i in zip(dataset.train, perm, strict=True)
        ]
        return dataset, parts

    monkeypatch.setattr(build_mod, "build_datasets", shuffled)
    other = tmp_path / "shuffled"
    train_clipreid.main(_opts(data, other, extra=USL))
    a = torch.load(out / "ViT-T-16-test_2.pth", weights_only=True)
    b = torch.load(other / "ViT-T-16-test_2.pth", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    clusters = [(r["clusters"], r["outliers"]) for r in _metrics(other) if "clusters" in r]
    assert clusters == [(r["clusters"], r["outliers"]) for r in records]


@pytest.mark.parametrize(
    ("extra", "fault"),
    [([], "step:2:TERM"), (["DATALOADER.ITERS_PER_EPOCH", "4"], "step:7:TERM")],
    ids=["sampler-pass", "fixed-length"],
)
def test_unsupervised_run_interrupted_mid_epoch_resumes_bit_identically(tmp_path, extra, fault):
    """SIGTERM mid-epoch saves the moved memory and the epoch's pseudo labels with the state."""
    data = tmp_path / "data"
    assert run_in_fork(_opts(data, tmp_path / "full", extra=[*USL, *extra])) == 0
    killed = _opts(data, tmp_path / "killed", extra=[*USL, *extra])
    assert run_in_fork(killed, fault) == 128 + 15
    ckpt = torch.load(tmp_path / "killed" / "last.pth", weights_only=True)
    assert ckpt["stage"] == 2 and set(ckpt["partial"]["recipe"]) == {"centroids", "labels"}
    assert run_in_fork([*killed, "--resume"]) == 0
    a = torch.load(tmp_path / "full" / "ViT-T-16-test_2.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "ViT-T-16-test_2.pth", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_unsupervised_run_with_the_reproduction_options(tmp_path):
    """Camera-aware batches, camera proxies, every-instance update, fixed epoch length."""
    out = tmp_path / "run"
    extra = [
        *USL,
        "MODEL.MEMORY_UPDATE", "all",
        "MODEL.CLUSTER_CAMERA_PROXIES", "True",
        "DATALOADER.CAMERA_AWARE", "True",
        "DATALOADER.ITERS_PER_EPOCH", "3",
    ]  # fmt: skip
    train_clipreid.main(_opts(tmp_path / "data", out, s2=2, extra=extra))
    records = _metrics(out)
    clustered = [r for r in records if "clusters" in r]
    assert len(clustered) == 2
    # 2 cameras: the memory holds one proxy per (cluster, camera) (split_by_camera's test).
    assert all(r["clusters"] <= r["memory_bank"][0] <= 2 * r["clusters"] for r in clustered)
    trained = [r for r in records if "loss" in r]
    assert [r["epoch"] for r in trained] == [1, 2]
    # No classifier is trained without labels: no accuracy is logged.
    assert all("acc" not in r for r in trained)
    log = (out / "train_log.txt").read_text()
    assert log.count("camera proxies") == 2
    stage2 = [line for line in log.splitlines() if "[stage2] ep" in line]
    assert stage2 and all(" acc " not in line for line in stage2)
    # A fixed 3 iterations per epoch.
    assert sum("it 3/3" in line for line in stage2) == 2
