"""Re-identification metrics: CMC, mAP and mINP, exact and memory-bounded.

Two evaluators give identical numbers:

* :func:`eval_func` is the dense reference with the official signature. It sorts the whole
  query x gallery distance matrix in host memory (about 20 GB for MSMT17), so it is meant for
  small sets and for checking.
* :func:`evaluate_features` (features in, :class:`EvalResult` out) and
  :func:`evaluate_distmat_chunks` (distance blocks in) compute the same metrics one query chunk at
  a time, on the device of the input tensors, without any query x gallery array and without a
  full sort of each row. Asked to (``keep_topk``), they also keep each query's top-k gallery list
  (:func:`utils.distance.block_topk`) for ranked lists, so nothing needs evaluating twice.

Protocol (Market-1501 style, as the official code): for each query, gallery items with the same
pid AND the same camid are removed; a query left without a true match is skipped; CMC is the
fraction of valid queries whose first true match is within rank k; AP is the mean of precision@k
over the positions of the true matches; INP (Ye et al., TPAMI 2021) is num_pos / rank of the
hardest (last) true match.

Tie rule: gallery items at equal distance are ranked by ascending gallery index (a stable sort).
Both evaluators apply it, so their results agree exactly, ties included.

The exact ranking of each query's true matches, without sorting each row, is in
:mod:`utils.match_ranks`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from utils.distance import (
    DEFAULT_MEMORY_BUDGET_MB,
    block_topk,
    chunk_rows,
    distance_chunks,
    prepare_features,
)
from utils.logger import Progress
from utils.match_ranks import MatchRanker
from utils.reranking import RerankParams, k_reciprocal_rerank_chunks
from utils.roc import TprAtFpr, count_negative_pairs, tpr_summary

logger = logging.getLogger(__name__)

# Bytes per query x gallery pair of one chunk's dense buffers: float32 distance + bool mask.
_DENSE_BYTES_PER_PAIR = 5

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]


@dataclass
class EvalResult:
    """Metrics of one query set against one gallery (fractions in [0, 1]).

    Attributes:
        cmc: float64 [max_rank]; cmc[k - 1] is rank-k accuracy over valid queries.
        mAP: mean average precision over valid queries.
        mINP: mean inverse negative penalty over valid queries.
        num_valid_queries: queries with at least one true match left after removal.
        num_queries: all queries.
        ap: float64 [Q], per-query AP; NaN for skipped queries.
        inp: float64 [Q], per-query INP; NaN for skipped queries.
        first_match_rank: int64 [Q], 1-based rank of the first true match; -1 when skipped.
        topk_indices: int64 [Q, k], each query's k nearest gallery items in rank order (its
            same-identity same-camera items left out, ties by gallery index), -1 past the end
            of a short list; None unless asked for (``keep_topk``).
        topk_distances: float32 [Q, k], their distances (inf past the end); None likewise.
        tpr_at_fpr: ``{fpr: tpr}`` of the verification ROC over the query-gallery pairs
            (:mod:`utils.roc`); None unless asked for (``roc_fprs``).
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_queries: int
    ap: np.ndarray
    inp: np.ndarray
    first_match_rank: np.ndarray
    topk_indices: np.ndarray | None = None
    topk_distances: np.ndarray | None = None
    tpr_at_fpr: dict[float, float] | None = None

    @property
    def valid(self) -> np.ndarray:
        """bool [Q]: queries with a true match left after removal (the ones averaged)."""
        return self.first_match_rank > 0

    def rank(self, k: int) -> float:
        """Rank-k accuracy (k clipped to the CMC length).

        Args:
            k: 1-based rank.

        Returns:
            The fraction of valid queries with a true match within the first k.
        """
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def as_dict(self) -> dict[str, float]:
        """The usual summary numbers: mAP, mINP, rank1, rank5, rank10 and the query counts.

        Returns:
            A JSON-serialisable dict of plain floats and ints, plus ``tpr@fpr1e-4``-style keys
            when the ROC was computed.
        """
        return {
            "mAP": float(self.mAP),
            "mINP": float(self.mINP),
            "rank1": self.rank(1),
            "rank5": self.rank(5),
            "rank10": self.rank(10),
            "num_valid_queries": int(self.num_valid_queries),
            "num_queries": int(self.num_queries),
            **tpr_summary(self.tpr_at_fpr),
        }


def _as_numpy_ids(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_ids(q_pids, g_pids, q_camids, g_camids, num_q: int, num_g: int):
    q_pids = _as_numpy_ids(q_pids, "q_pids")
    g_pids = _as_numpy_ids(g_pids, "g_pids")
    q_camids = _as_numpy_ids(q_camids, "q_camids")
    g_camids = _as_numpy_ids(g_camids, "g_camids")
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise ValueError(
            f"{num_q} queries but {len(q_pids)} q_pids and {len(q_camids)} q_camids were given"
        )
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(
            f"{num_g} gallery items but {len(g_pids)} g_pids and {len(g_camids)} g_camids"
        )
    if num_q == 0 or num_g == 0:
        raise ValueError(f"empty query ({num_q}) or gallery ({num_g}) set")
    return q_pids, g_pids, q_camids, g_camids


_NO_VALID_QUERY = (
    "no query has a true match in the gallery once same-pid same-camera items are removed; "
    "check the pids and camids of the query and gallery sets"
)


def eval_func(
    distmat: np.ndarray,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """Dense reference evaluation with the official signature and results.

    Sorts every row of the whole distance matrix (stable: ties by ascending gallery index) and
    builds the query x gallery match matrix, like the official code, so memory grows with
    Q x G (about 20 GB for MSMT17). Use :func:`evaluate_features` for large sets.

    Args:
        distmat: float [Q, G] distances (smaller is more similar).
        q_pids: int [Q] query identities.
        g_pids: int [G] gallery identities.
        q_camids: int [Q] query cameras.
        g_camids: int [G] gallery cameras.
        max_rank: CMC length; clipped to G.

    Returns:
        (cmc float32 [min(max_rank, G)], mAP float). A valid query whose remaining ranking is
        shorter than max_rank keeps its CMC at 1 to the end (the official code would fail there).

    Raises:
        ValueError: on mismatched shapes or when no query has a true match.
    """
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D, got shape {distmat.shape}")
    num_q, num_g = distmat.shape
    q_pids, g_pids, q_camids, g_camids = _check_ids(
        q_pids, g_pids, q_camids, g_camids, num_q, num_g
    )
    max_rank = min(max_rank, num_g)
    order = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[order] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap = [], []
    for qi in range(num_q):
        ranked = order[qi]
        removed = (g_pids[ranked] == q_pids[qi]) & (g_camids[ranked] == q_camids[qi])
        hits = matches[qi][~removed]
        if not hits.any():
            continue
        cum_hits = hits.cumsum()
        cmc = np.ones(max_rank, dtype=np.int32)
        head = np.minimum(cum_hits[:max_rank], 1)
        cmc[: len(head)] = head
        all_cmc.append(cmc)
        precision = cum_hits / np.arange(1, len(hits) + 1)
        all_ap.append(float((precision * hits).sum() / hits.sum()))
    if not all_cmc:
        raise ValueError(_NO_VALID_QUERY)
    cmc = np.asarray(all_cmc).astype(np.float32).sum(0) / len(all_cmc)
    return cmc, float(np.mean(all_ap))


class _BlockEvaluator:
    """Ranks the distance blocks of :func:`evaluate_distmat_chunks` and gathers per-query results.

    Ids are copied to each block's device once; the ranker (and its buffers) follows the device.
    """

    def __init__(
        self,
        ids: tuple[np.ndarray, ...],
        keep_topk: int,
        memory_budget_mb: float,
        roc_fprs: Sequence[float] = (),
    ):
        self.ids = ids  # q_pids, g_pids, q_camids, g_camids (int64 numpy)
        num_q = len(ids[0])
        self.roc = None
        if roc_fprs:
            num_neg = count_negative_pairs(ids[0], ids[1])
            self.roc = TprAtFpr(roc_fprs, num_neg, len(ids[1]), memory_budget_mb)
        self.keep_topk, self.memory_budget_mb = keep_topk, memory_budget_mb
        self.ap = np.full(num_q, np.nan)
        self.inp = np.full(num_q, np.nan)
        self.first = np.full(num_q, -1, dtype=np.int64)
        self.topk_indices = np.full((num_q, keep_topk), -1, dtype=np.int64)
        self.topk_distances = np.full((num_q, keep_topk), np.inf, dtype=np.float32)
        self.device_ids: dict = {}
        self.ranker: MatchRanker | None = None

    def add(self, block: torch.Tensor, start: int) -> None:
        """Rank queries [start, start + len(block)) on the block's device."""
        stop = start + block.shape[0]
        device = block.device
        if device not in self.device_ids:
            self.device_ids[device] = [torch.as_tensor(v).to(device) for v in self.ids]
        q_pids, g_pids, q_camids, g_camids = self.device_ids[device]
        if self.ranker is None or self.ranker.gallery.g_pids.device != device:
            self.ranker = MatchRanker(g_pids, g_camids, self.memory_budget_mb)
        gidx, positive, removed = self.ranker.gallery.matches(
            q_pids[start:stop], q_camids[start:stop]
        )
        ap, inp, first = self.ranker.rank(block, gidx, positive, removed)
        if self.roc is not None:
            self.roc.add(block, gidx, positive, removed)
        self.ap[start:stop] = ap.cpu().numpy()
        self.inp[start:stop] = inp.cpu().numpy()
        self.first[start:stop] = first.cpu().numpy()
        if self.keep_topk > 0:
            rows, slots = torch.nonzero(removed, as_tuple=True)
            dist, index = block_topk(
                block,
                self.keep_topk,
                exclude=(rows, gidx[rows, slots]),
                memory_budget_mb=self.memory_budget_mb,
            )
            self.topk_distances[start:stop] = dist.cpu().numpy()
            self.topk_indices[start:stop] = index.cpu().numpy()

    def result(self, max_rank: int) -> EvalResult:
        """The :class:`EvalResult` of all queries (CMC clipped to ``max_rank``)."""
        valid = self.first > 0
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise ValueError(_NO_VALID_QUERY)
        # cmc[k - 1] = share of valid queries whose first true match is within rank k.
        hist = np.bincount(np.minimum(self.first[valid], max_rank + 1), minlength=max_rank + 2)
        cmc = np.cumsum(hist[1 : max_rank + 1]) / num_valid
        keep = self.keep_topk > 0
        return EvalResult(
            cmc=cmc.astype(np.float64),
            mAP=float(self.ap[valid].mean()),
            mINP=float(self.inp[valid].mean()),
            num_valid_queries=num_valid,
            num_queries=len(self.first),
            ap=self.ap,
            inp=self.inp,
            first_match_rank=self.first,
            topk_indices=self.topk_indices if keep else None,
            topk_distances=self.topk_distances if keep else None,
            tpr_at_fpr=self.roc.result() if self.roc is not None else None,
        )


def evaluate_distmat_chunks(
    chunks: Iterable[torch.Tensor | np.ndarray],
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    *,
    max_rank: int = 50,
    keep_topk: int = 0,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    show_progress: bool = True,
    desc: str = "evaluation",
    roc_fprs: Sequence[float] = (),
) -> EvalResult:
    """Exact CMC / mAP / mINP from distance blocks that arrive one query chunk at a time.

    Each block is ranked on its own device and dropped; no query x gallery array is kept.
    Results equal :func:`eval_func` on the stacked blocks (same stable tie rule).

    Args:
        chunks: float [c_i, G] distance blocks (torch or numpy) covering the queries in order,
            sum of c_i = Q. A block may be a reused buffer: it is consumed before the next one.
        q_pids: int [Q] query identities.
        g_pids: int [G] gallery identities.
        q_camids: int [Q] query cameras.
        g_camids: int [G] gallery cameras.
        max_rank: CMC length; clipped to G.
        keep_topk: also keep each query's ``keep_topk`` nearest gallery items (its
            same-identity same-camera items left out) in ``EvalResult.topk_indices`` /
            ``topk_distances``; 0 keeps none.
        memory_budget_mb: budget for the ranking work of one block (MiB), not counting the block.
        show_progress: tqdm bar on a terminal, periodic log lines otherwise.
        desc: label of the progress output.
        roc_fprs: false-positive rates at which to report the verification TPR
            (``EvalResult.tpr_at_fpr``, :mod:`utils.roc`); empty: no ROC.

    Returns:
        An :class:`EvalResult`.

    Raises:
        ValueError: on mismatched shapes, NaN distances of true matches, or no valid query.
    """
    q_pids_np = _as_numpy_ids(q_pids, "q_pids")
    g_pids_np = _as_numpy_ids(g_pids, "g_pids")
    num_q, num_g = len(q_pids_np), len(g_pids_np)
    ids = _check_ids(q_pids_np, g_pids_np, q_camids, g_camids, num_q, num_g)
    evaluator = _BlockEvaluator(ids, int(keep_topk), memory_budget_mb, roc_fprs)
    done = 0
    bar = Progress(num_q, desc, "queries", enabled=show_progress, log=logger)
    try:
        for block in chunks:
            block = torch.as_tensor(block)
            if block.ndim != 2 or block.shape[1] != num_g:
                raise ValueError(
                    f"distance block of shape {tuple(block.shape)}, expected [c, {num_g}]"
                )
            if done + block.shape[0] > num_q:
                raise ValueError(f"distance blocks cover more than the {num_q} queries")
            evaluator.add(block.float(), done)
            done += block.shape[0]
            bar.update(block.shape[0])
    finally:
        bar.close()
    if done != num_q:
        raise ValueError(f"distance blocks covered {done} of {num_q} queries")
    return evaluator.result(min(max_rank, num_g))


def block_rows(num_gallery: int, memory_budget_mb: float) -> int:
    """Query rows per distance block of the evaluator (half the budget for the dense block).

    Args:
        num_gallery: G.
        memory_budget_mb: the evaluator's working-memory budget (MiB).

    Returns:
        Rows per block, at least 1.
    """
    return chunk_rows(memory_budget_mb / 2, _DENSE_BYTES_PER_PAIR * max(num_gallery, 1))


def evaluate_distmat(
    distmat: torch.Tensor | np.ndarray,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    *,
    max_rank: int = 50,
    keep_topk: int = 0,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    show_progress: bool = True,
    roc_fprs: Sequence[float] = (),
) -> EvalResult:
    """Exact metrics of a precomputed dense distance matrix, ranked in row blocks.

    Args:
        distmat: float [Q, G] distances (torch on any device, or numpy).
        q_pids: int [Q] query identities.
        g_pids: int [G] gallery identities.
        q_camids: int [Q] query cameras.
        g_camids: int [G] gallery cameras.
        max_rank: CMC length; clipped to G.
        keep_topk: per-query top-k lists to keep (see :func:`evaluate_distmat_chunks`).
        memory_budget_mb: working-memory budget (MiB).
        show_progress: progress bar or log lines.
        roc_fprs: false-positive rates of the verification TPR (see
            :func:`evaluate_distmat_chunks`).

    Returns:
        An :class:`EvalResult` (same numbers as :func:`eval_func`, plus mINP).
    """
    distmat = torch.as_tensor(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D, got shape {tuple(distmat.shape)}")
    rows = block_rows(distmat.shape[1], memory_budget_mb)
    blocks = (distmat[s : s + rows] for s in range(0, distmat.shape[0], rows))
    return evaluate_distmat_chunks(
        blocks,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank=max_rank,
        keep_topk=keep_topk,
        memory_budget_mb=memory_budget_mb / 2,
        show_progress=show_progress,
        roc_fprs=roc_fprs,
    )


def evaluate_features(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    *,
    max_rank: int = 50,
    feat_norm: bool = True,
    keep_topk: int = 0,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    rerank: RerankParams | None = None,
    show_progress: bool = True,
    roc_fprs: Sequence[float] = (),
) -> EvalResult:
    """Exact, memory-bounded ReID evaluation from query and gallery features.

    Distances are squared Euclidean (after optional L2 normalisation, as the official code),
    computed with matrix products in query chunks on the features' device; each chunk is ranked
    and dropped. With ``rerank``, the chunks are k-reciprocal re-ranked distances
    (:func:`utils.reranking.k_reciprocal_rerank_chunks`).

    Args:
        qf: float [Q, D] query features (fp32/fp16/bf16; computed in fp32), any device.
        gf: float [G, D] gallery features, same device.
        q_pids: int [Q] query identities (numpy, tensor or sequence).
        g_pids: int [G] gallery identities.
        q_camids: int [Q] query cameras.
        g_camids: int [G] gallery cameras.
        max_rank: CMC length; clipped to G.
        feat_norm: L2-normalise the features first (official TEST.FEAT_NORM).
        keep_topk: per-query top-k lists to keep, of the distances evaluated (re-ranked ones
            with ``rerank``); see :func:`evaluate_distmat_chunks`.
        memory_budget_mb: working memory (MiB) for distance blocks and ranking; the features
            themselves (and the re-ranking neighbour structures) come on top.
        rerank: k-reciprocal re-ranking parameters, or None for plain distances.
        show_progress: progress bar or log lines.
        roc_fprs: false-positive rates at which to report the verification TPR over the
            evaluated (re-ranked with ``rerank``) distances; empty: no ROC.

    Returns:
        An :class:`EvalResult` with cmc [min(max_rank, G)], mAP, mINP and per-query values.

    Raises:
        ValueError: on shape mismatches, non-finite features or no valid query.
    """
    if qf.device != gf.device:
        raise ValueError(f"qf on {qf.device} but gf on {gf.device}")
    qf = prepare_features(qf, feat_norm, "qf")
    gf = prepare_features(gf, feat_norm, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"feature sizes differ: qf {qf.shape[1]}, gf {gf.shape[1]}")
    if rerank is not None:
        blocks = k_reciprocal_rerank_chunks(
            qf,
            gf,
            rerank.k1,
            rerank.k2,
            rerank.lambda_value,
            memory_budget_mb=memory_budget_mb / 2,
            show_progress=show_progress,
            float16=rerank.float16,
        )
    else:
        blocks = distance_chunks(qf, gf, block_rows(gf.shape[0], memory_budget_mb))
    return evaluate_distmat_chunks(
        blocks,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank=max_rank,
        keep_topk=keep_topk,
        memory_budget_mb=memory_budget_mb / 2,
        show_progress=show_progress,
        desc="re-ranked evaluation" if rerank is not None else "evaluation",
        roc_fprs=roc_fprs,
    )
