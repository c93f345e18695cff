"""PCL-CLIP's centroid memory: rebuilt from the training set, or from clusters (unsupervised)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from processor.evaluate import EvalSettings, extract_features
from utils.reranking import jaccard_distance_sparse

logger = logging.getLogger(__name__)

# DBSCAN eps of the unofficial PCL-CLIP USL reproduction per dataset, used when
# MODEL.CLUSTER_EPS is 0: its train.sh trains Market-1501 with 0.5 (its README says 0.4) and
# MSMT17 with 0.7 (also its author's advice on the official repository).
USL_CLUSTER_EPS = {"market1501": 0.5, "msmt17": 0.7}


def rebuild_memory_bank(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: torch.nn.Module,
    device: torch.device,
    settings: EvalSettings,
) -> torch.Tensor:
    """Rebuild PCL-CLIP's centroid memory from the whole training set (start of every epoch).

    The features are the model's eval feature (post-BN for the PCL head, eval-mode BN) of every
    training image with test transforms, extracted by the one inference path
    (:func:`processor.evaluate.extract_features`); the criterion turns them into per-ID centroids.

    Args:
        model: the ReID model with the PCL head.
        loader: the train set with test transforms, in order (``DataBundle.train_eval``).
        criterion: the :class:`loss.pcl.PCLLoss` (``build_memory``).
        device: where the model runs.
        settings: evaluation settings (precision).

    Returns:
        The new float32 centroids [C, D] on ``device``.
    """
    t0 = time.perf_counter()
    features = extract_features(model, loader, device, settings)
    feats, pids = features.feats, features.pids
    centroids = criterion.build_memory(feats, torch.as_tensor(pids, device=feats.device))
    logger.info(
        "[stage2] memory bank %s from %d images in %.1fs",
        tuple(centroids.shape),
        feats.shape[0],
        time.perf_counter() - t0,
    )
    return centroids


@dataclass(frozen=True)
class ClusterSettings:
    """Pseudo-label clustering of unsupervised PCL-CLIP (ClusterContrast recipe).

    Attributes:
        eps: DBSCAN radius on the Jaccard distance, in (0, 1).
        min_samples: DBSCAN core-point threshold (the point itself included).
        k1: k-reciprocal neighbourhood size of the Jaccard distance.
        k2: local query expansion size of the Jaccard distance.
        jaccard: neighbour-list convention of the Jaccard distance ('clustercontrast': k1
            nearest, self included; 'reranking': k1 + 1), see
            :func:`utils.reranking.jaccard_distance_sparse`.
        camera_proxies: split every cluster into one pseudo label per camera
            (:func:`split_by_camera`).
    """

    eps: float = 0.5
    min_samples: int = 4
    k1: int = 30
    k2: int = 6
    jaccard: str = "clustercontrast"
    camera_proxies: bool = False


def cluster_eps(eps: float, dataset_names: Sequence[str]) -> float:
    """The DBSCAN eps of a run: ``MODEL.CLUSTER_EPS``, or the reproduction's value when it is 0.

    Args:
        eps: ``MODEL.CLUSTER_EPS`` (0: the per-dataset value of :data:`USL_CLUSTER_EPS`).
        dataset_names: ``DATASETS.NAMES``.

    Returns:
        The radius, in (0, 1).

    Raises:
        ValueError: eps is 0 and a dataset has no known value, or the datasets' values differ.
    """
    if eps:
        return float(eps)
    values = {USL_CLUSTER_EPS.get(n) for n in dataset_names}
    if None in values or len(values) != 1:
        known = ", ".join(f"{k} {v}" for k, v in USL_CLUSTER_EPS.items())
        raise ValueError(
            f"MODEL.CLUSTER_EPS 0 takes the USL reproduction's value per dataset ({known}), "
            f"which DATASETS.NAMES {list(dataset_names)} does not determine: set "
            "MODEL.CLUSTER_EPS to a radius in (0, 1)"
        )
    return float(values.pop())


def build_cluster_settings(cfg) -> ClusterSettings:
    """Read the clustering settings of unsupervised PCL-CLIP.

    Args:
        cfg: configuration (``MODEL.CLUSTER_{EPS, MIN_SAMPLES, K1, K2, JACCARD,
            CAMERA_PROXIES}``, ``DATASETS.NAMES`` when ``CLUSTER_EPS`` is 0).

    Returns:
        The :class:`ClusterSettings`.
    """
    m = cfg.MODEL
    names = cfg.DATASETS.NAMES
    return ClusterSettings(
        eps=cluster_eps(float(m.CLUSTER_EPS), [names] if isinstance(names, str) else names),
        min_samples=int(m.CLUSTER_MIN_SAMPLES),
        k1=int(m.CLUSTER_K1),
        k2=int(m.CLUSTER_K2),
        jaccard=str(m.CLUSTER_JACCARD),
        camera_proxies=bool(m.CLUSTER_CAMERA_PROXIES),
    )


def split_by_camera(labels: np.ndarray, camids: np.ndarray) -> np.ndarray:
    """Camera-aware proxies: one pseudo label per (cluster, camera) pair.

    The images of a cluster seen by different cameras get different labels, numbered in order
    of (cluster, camera) as ``cam_label_split`` of the CAP/O2CAP code that PCL-CLIP ships.
    Outliers keep -1.

    Args:
        labels: int [N] cluster labels, -1 for outliers.
        camids: int [N] camera ids (>= 0).

    Returns:
        int64 numpy [N] proxy labels in ``{-1, 0, ..., P-1}``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    camids = np.asarray(camids, dtype=np.int64)
    out = np.full(labels.shape, -1, dtype=np.int64)
    kept = labels >= 0
    if kept.any():
        pairs = labels[kept] * (int(camids.max()) + 1) + camids[kept]
        out[kept] = np.unique(pairs, return_inverse=True)[1]
    return out


def cluster_pseudo_labels(feats: torch.Tensor, settings: ClusterSettings) -> np.ndarray:
    """DBSCAN pseudo labels on the k-reciprocal Jaccard distance of L2-normalised features.

    The Jaccard distance is computed sparsely (:func:`utils.reranking.jaccard_distance_sparse`,
    pairs within ``eps`` only) and handed to scikit-learn's DBSCAN as a precomputed radius graph,
    so no N x N matrix is built. Outliers keep label -1; clusters are numbered 0..K-1 in the
    order of DBSCAN's labels.

    Args:
        feats: float [N, D] features (normalised here).
        settings: the clustering settings.

    Returns:
        int64 numpy [N] labels in ``{-1, 0, ..., K-1}``.
    """
    from scipy.sparse import csr_matrix
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import sort_graph_by_row_values

    n = feats.shape[0]
    x = F.normalize(feats.detach().float(), dim=1)
    rows, cols, dists = jaccard_distance_sparse(
        x, settings.k1, settings.k2, settings.eps, convention=settings.jaccard
    )
    graph = csr_matrix(
        (dists.cpu().double().numpy(), (rows.cpu().numpy(), cols.cpu().numpy())), shape=(n, n)
    )
    # Each row's entries by distance, as scikit-learn's precomputed neighbour graphs expect
    # (unsorted, some versions sort a copy and warn at every epoch); the clusters are the same.
    graph = sort_graph_by_row_values(graph, copy=False, warn_when_not_sorted=False)
    raw = DBSCAN(eps=settings.eps, min_samples=settings.min_samples, metric="precomputed")
    raw = raw.fit_predict(graph)
    labels = np.full(n, -1, dtype=np.int64)
    kept = raw >= 0
    labels[kept] = np.unique(raw[kept], return_inverse=True)[1]
    return labels


class ClusterMemory(NamedTuple):
    """The pseudo labels and memory of one unsupervised epoch.

    Attributes:
        labels: int64 numpy [N] training labels (camera proxies when asked), -1 for outliers.
        centroids: float32 [K, D] memory, one row per label.
        num_clusters: DBSCAN clusters (K itself unless camera proxies split them).
    """

    labels: np.ndarray
    centroids: torch.Tensor
    num_clusters: int


def rebuild_cluster_memory(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: torch.nn.Module,
    device: torch.device,
    settings: EvalSettings,
    cluster: ClusterSettings,
) -> ClusterMemory:
    """Cluster the training set and put the cluster centroids in the memory (unsupervised PCL).

    The features are those of :func:`rebuild_memory_bank` (eval mode, test transforms, in
    order); the loader's ground-truth pids are discarded (its camera ids are read for camera
    proxies). Outliers get no centroid.

    Args:
        model: the ReID model with the PCL head.
        loader: the train set with test transforms, in order (``DataBundle.train_eval``).
        criterion: the :class:`loss.pcl.PCLLoss` (``build_memory``).
        device: where the model runs.
        settings: evaluation settings (precision).
        cluster: the clustering settings.

    Returns:
        The :class:`ClusterMemory` (labels, centroids, number of clusters).

    Raises:
        RuntimeError: DBSCAN formed no cluster.
    """
    t0 = time.perf_counter()
    features = extract_features(model, loader, device, settings)
    feats = features.feats
    clusters = cluster_pseudo_labels(feats, cluster)
    keep = np.flatnonzero(clusters >= 0)
    if keep.size == 0:
        raise RuntimeError(
            f"DBSCAN formed no cluster from {len(clusters)} images (eps {cluster.eps}, "
            f"min_samples {cluster.min_samples}): raise MODEL.CLUSTER_EPS or lower "
            "MODEL.CLUSTER_MIN_SAMPLES"
        )
    num_clusters = int(clusters.max()) + 1
    labels = split_by_camera(clusters, features.camids) if cluster.camera_proxies else clusters
    index = torch.as_tensor(keep, device=feats.device)
    pids = torch.as_tensor(labels[keep], device=feats.device)
    centroids = criterion.build_memory(feats[index], pids, num_classes=int(labels.max()) + 1)
    logger.info(
        "[stage2] %d clusters%s, %d outliers of %d images; memory bank %s in %.1fs",
        num_clusters,
        f" split into {int(labels.max()) + 1} camera proxies" if cluster.camera_proxies else "",
        len(labels) - keep.size,
        len(labels),
        tuple(centroids.shape),
        time.perf_counter() - t0,
    )
    return ClusterMemory(labels, centroids, num_clusters)
