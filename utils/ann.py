"""Approximate nearest-neighbour (ANN) search over large galleries with faiss (optional dependency).

Two index kinds, both over the raw float32 features (no compression, so a found item's score is
exact and only the set of items examined is approximate):

* ``hnsw``: a graph (faiss ``IndexHNSWFlat``, Malkov & Yashunin 2018); ``ef_search`` candidates
  are explored per query. No training; slower to build, fast and accurate to query.
* ``ivf``: an inverted file (faiss ``IndexIVFFlat``): k-means splits the gallery into ``nlist``
  cells; a query scans its ``nprobe`` nearest cells. Quick to build; ``nprobe = nlist`` is exact.

Scores follow :func:`utils.distance.chunked_topk` as the search tool uses it: 'cosine' (features
L2-normalised) gives the similarity ``q . g``, 'euclidean' the negated squared distance
``-|q - g|^2``; best first. Indexes are stored in search index files as uint8 tensors
(:func:`serialize_ann`), so they are read back without unpickling anything.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

ANN_KINDS = ("hnsw", "ivf")
METRICS = ("cosine", "euclidean")
FAISS_INSTALL = "pip install faiss-cpu"
# k-means training rows per IVF cell (faiss warns below 39; more adds build time, little recall).
IVF_TRAIN_PER_LIST = 64


class MissingDependencyError(ImportError):
    """An optional package is needed for what was asked; the message says how to install it."""


@dataclass(frozen=True)
class AnnParams:
    """Build and search parameters of the ANN indexes.

    Attributes:
        hnsw_m: graph neighbours per node (memory ~ 2 * M ints per item; 32 is faiss' advice
            for high recall).
        ef_construction: candidates kept while building the graph (quality of the graph).
        ef_search: candidates explored per query (recall vs speed; at least k); 0 picks
            :func:`default_ef_search` by gallery size.
        nlist: IVF cells; 0 picks ``sqrt(N)`` (at most ``N / 39``, at least 1).
        nprobe: IVF cells scanned per query (recall vs speed); recall needs more cells on
            galleries without low-rank structure (docs/benchmarks.md).
        seed: k-means seed (the IVF build is reproducible).
    """

    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 0
    nlist: int = 0
    nprobe: int = 32
    seed: int = 0

    def as_dict(self) -> dict[str, int]:
        """The parameters as a plain dict (stored with a serialised index)."""
        return dataclasses.asdict(self)


def import_faiss() -> Any:
    """Import faiss, or say how to install it.

    Returns:
        The ``faiss`` module.

    Raises:
        MissingDependencyError: faiss is not installed.
    """
    try:
        import faiss
    except ImportError as err:
        raise MissingDependencyError(
            f"approximate search (hnsw, ivf) needs the faiss package: {FAISS_INSTALL}"
        ) from err
    return faiss


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        import_faiss()
    except MissingDependencyError:
        return False
    return True


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` items: ``sqrt(n)``, at most ``n / 39`` (k-means needs rows), >= 1."""
    return max(1, min(round(math.sqrt(n)), n // 39))


# HNSW ef_search by gallery size, measured on the hard isotropic 512-d galleries of
# docs/benchmarks.md: 64 kept 99.98% of the exact top-10 at 200k (28x exact speed) but 96.4% at
# 1M, where 128 keeps 99.2% (26x); so 128 from a little above the size where 64 was shown enough.
EF_SEARCH_SMALL, EF_SEARCH_LARGE, EF_SEARCH_LARGE_FROM = 64, 128, 250_000


def default_ef_search(n: int) -> int:
    """HNSW candidates per query for ``n`` gallery items (see ``EF_SEARCH_LARGE_FROM``)."""
    return EF_SEARCH_LARGE if n >= EF_SEARCH_LARGE_FROM else EF_SEARCH_SMALL


def _rows(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _check(kind: str, metric: str) -> None:
    if kind not in ANN_KINDS:
        raise ValueError(f"ANN index kind must be one of {ANN_KINDS}, got {kind!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def build_ann(
    feats: torch.Tensor | np.ndarray, kind: str, metric: str, params: AnnParams = AnnParams()
) -> Any:
    """Build an ANN index over gallery features.

    Args:
        feats: [N, D] gallery features (float16/32; indexed as float32).
        kind: 'hnsw' or 'ivf'.
        metric: 'cosine' (inner product of normalised features) or 'euclidean'.
        params: build parameters.

    Returns:
        The faiss index, its search parameters set from ``params``.

    Raises:
        MissingDependencyError: faiss is not installed.
        ValueError: unknown kind or metric.
    """
    _check(kind, metric)
    faiss = import_faiss()
    x = _rows(feats)
    n, d = x.shape
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    t0 = time.perf_counter()
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, fmetric)
        index.hnsw.efConstruction = params.ef_construction
        index.add(x)
    else:
        nlist = params.nlist or default_nlist(n)
        quantizer = faiss.IndexFlat(d, fmetric)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, fmetric)
        index.cp.seed = params.seed
        rng = np.random.default_rng(params.seed)
        take = min(n, IVF_TRAIN_PER_LIST * nlist)
        sample = x if take == n else x[np.sort(rng.choice(n, size=take, replace=False))]
        index.train(sample)
        index.add(x)
    set_search_params(index, params.ef_search or default_ef_search(n), params.nprobe)
    logger.info(
        "%s index of %d x %d features (%s) built in %.1f s",
        kind,
        n,
        d,
        metric,
        time.perf_counter() - t0,
    )
    return index


def ann_kind(index: Any) -> str:
    """'hnsw' or 'ivf' for an index built by :func:`build_ann`."""
    faiss = import_faiss()
    return "ivf" if isinstance(faiss.try_extract_index_ivf(index), faiss.IndexIVF) else "hnsw"


def set_search_params(index: Any, ef_search: int | None = None, nprobe: int | None = None) -> None:
    """Set the query-time parameter of an index (the one that applies to its kind).

    Args:
        index: an index of :func:`build_ann`.
        ef_search: HNSW candidates per query (None: unchanged).
        nprobe: IVF cells per query, capped at ``nlist`` (None: unchanged).
    """
    if ann_kind(index) == "ivf":
        if nprobe is not None:
            index.nprobe = max(1, min(int(nprobe), index.nlist))
    elif ef_search is not None:
        index.hnsw.efSearch = max(1, int(ef_search))


def ann_search(
    index: Any, queries: torch.Tensor | np.ndarray, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-k gallery items per query.

    Args:
        index: an index of :func:`build_ann` (or :func:`deserialize_ann`).
        queries: [Q, D] features (normalised for 'cosine', as the gallery).
        k: items per query; capped at the gallery size.

    Returns:
        (scores float32 [Q, k], indices int64 [Q, k]) best first: similarities ('cosine') or
        negated squared distances ('euclidean'). With HNSW, k above ``ef_search`` raises the
        exploration to k.
    """
    faiss = import_faiss()
    k = min(int(k), index.ntotal)
    if ann_kind(index) == "hnsw" and index.hnsw.efSearch < k:
        index.hnsw.efSearch = k
    scores, idx = index.search(_rows(queries), k)
    scores = torch.from_numpy(scores)
    if index.metric_type == faiss.METRIC_L2:
        scores = scores.neg()
    return scores, torch.from_numpy(idx.astype(np.int64))


def serialize_ann(index: Any) -> torch.Tensor:
    """An index as a uint8 tensor (storable in a weights-only checkpoint file).

    Args:
        index: a faiss index.

    Returns:
        uint8 [nbytes].
    """
    return torch.from_numpy(import_faiss().serialize_index(index).copy())


def deserialize_ann(data: torch.Tensor, ef_search: int | None, nprobe: int | None) -> Any:
    """Read back an index of :func:`serialize_ann` and set its search parameters.

    Args:
        data: uint8 tensor.
        ef_search: HNSW candidates per query (None: as stored).
        nprobe: IVF cells per query (None: as stored).

    Returns:
        The faiss index.
    """
    index = import_faiss().deserialize_index(np.ascontiguousarray(data.numpy(), dtype=np.uint8))
    set_search_params(index, ef_search, nprobe)
    return index
