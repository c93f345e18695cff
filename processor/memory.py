"""PCL-CLIP's centroid memory: rebuilt from the training set, or from clusters (unsupervised)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from processor.evaluate import EvalSettings, extract_features
from utils.reranking import jaccard_distance_sparse

logger = logging.getLogger(__name__)


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
    """

    eps: float = 0.6
    min_samples: int = 4
    k1: int = 30
    k2: int = 6


def build_cluster_settings(cfg) -> ClusterSettings:
    """Read the clustering settings of unsupervised PCL-CLIP.

    Args:
        cfg: configuration (``MODEL.CLUSTER_{EPS, MIN_SAMPLES, K1, K2}``).

    Returns:
        The :class:`ClusterSettings`.
    """
    m = cfg.MODEL
    return ClusterSettings(
        eps=float(m.CLUSTER_EPS),
        min_samples=int(m.CLUSTER_MIN_SAMPLES),
        k1=int(m.CLUSTER_K1),
        k2=int(m.CLUSTER_K2),
    )


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

    n = feats.shape[0]
    x = F.normalize(feats.detach().float(), dim=1)
    rows, cols, dists = jaccard_distance_sparse(x, settings.k1, settings.k2, settings.eps)
    graph = csr_matrix(
        (dists.cpu().double().numpy(), (rows.cpu().numpy(), cols.cpu().numpy())), shape=(n, n)
    )
    raw = DBSCAN(eps=settings.eps, min_samples=settings.min_samples, metric="precomputed")
    raw = raw.fit_predict(graph)
    labels = np.full(n, -1, dtype=np.int64)
    kept = raw >= 0
    labels[kept] = np.unique(raw[kept], return_inverse=True)[1]
    return labels


def rebuild_cluster_memory(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: torch.nn.Module,
    device: torch.device,
    settings: EvalSettings,
    cluster: ClusterSettings,
) -> tuple[np.ndarray, torch.Tensor]:
    """Cluster the training set and put the cluster centroids in the memory (unsupervised PCL).

    The features are those of :func:`rebuild_memory_bank` (eval mode, test transforms, in
    order); the loader's ground-truth pids are discarded. Outliers get no centroid.

    Args:
        model: the ReID model with the PCL head.
        loader: the train set with test transforms, in order (``DataBundle.train_eval``).
        criterion: the :class:`loss.pcl.PCLLoss` (``build_memory``).
        device: where the model runs.
        settings: evaluation settings (precision).
        cluster: the clustering settings.

    Returns:
        (pseudo labels int64 numpy [N] with -1 for outliers, float32 centroids [K, D]).

    Raises:
        RuntimeError: DBSCAN formed no cluster.
    """
    t0 = time.perf_counter()
    feats = extract_features(model, loader, device, settings).feats
    labels = cluster_pseudo_labels(feats, cluster)
    keep = np.flatnonzero(labels >= 0)
    if keep.size == 0:
        raise RuntimeError(
            f"DBSCAN formed no cluster from {len(labels)} images (eps {cluster.eps}, min_samples "
            f"{cluster.min_samples}): raise MODEL.CLUSTER_EPS or lower MODEL.CLUSTER_MIN_SAMPLES"
        )
    num_clusters = int(labels.max()) + 1
    index = torch.as_tensor(keep, device=feats.device)
    pids = torch.as_tensor(labels[keep], device=feats.device)
    centroids = criterion.build_memory(feats[index], pids, num_classes=num_clusters)
    logger.info(
        "[stage2] %d clusters, %d outliers of %d images; memory bank %s in %.1fs",
        num_clusters,
        len(labels) - keep.size,
        len(labels),
        tuple(centroids.shape),
        time.perf_counter() - t0,
    )
    return labels, centroids
