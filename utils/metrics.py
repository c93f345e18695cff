"""Re-identification metrics: CMC, mAP and mINP, exact and memory-bounded.

Two evaluators give identical numbers:

* :func:`eval_func` is the dense reference with the official signature. It sorts the whole
  query x gallery distance matrix in host memory (about 20 GB for MSMT17), so it is meant for
  small sets and for checking.
* :func:`evaluate_features` (features in, :class:`EvalResult` out) and
  :func:`evaluate_distmat_chunks` (distance blocks in) compute the same metrics one query chunk at
  a time, on the device of the input tensors, without any query x gallery array and without a
  full sort of each row.

Protocol (Market-1501 style, as the official code): for each query, gallery items with the same
pid AND the same camid are removed; a query left without a true match is skipped; CMC is the
fraction of valid queries whose first true match is within rank k; AP is the mean of precision@k
over the positions of the true matches; INP (Ye et al., TPAMI 2021) is num_pos / rank of the
hardest (last) true match.

Tie rule: gallery items at equal distance are ranked by ascending gallery index (a stable sort).
Both evaluators apply it, so their results agree exactly, ties included.

How the chunked evaluator avoids sorting: for each query, let ``t`` be the distance of its
farthest true match. Only gallery items with distance <= t can be ranked before a true match, so
only those are gathered. The query's few true matches are sorted by (distance, gallery index), and
each gathered item is placed among them by a binary search (``torch.searchsorted`` on an integer
key that orders like the float distance, exact ties settled by gallery index). A histogram of
these positions, summed, gives the number of kept items ranked before each true match, i.e. its
rank. For a useful model the gathered items are a tiny fraction of the gallery, so the cost is
dominated by the distance product itself; for a poor one it stays within a small factor of a
sort.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from utils.reranking import RerankParams

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_MB = 512  # working memory of one chunk; small next to any GPU or host

# Bytes per query x gallery pair of one chunk's dense buffers: float32 distance + bool mask.
_DENSE_BYTES_PER_PAIR = 5
# Bytes per gathered (candidate) item while ranking: row/column indices, key, bucket (+margin).
_SELECTED_BYTES = 72
# Non-interactive progress: one log line at most this often (seconds).
_LOG_PERIOD_S = 30.0

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
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_queries: int
    ap: np.ndarray
    inp: np.ndarray
    first_match_rank: np.ndarray

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
            A JSON-serialisable dict of plain floats and ints.
        """
        return {
            "mAP": float(self.mAP),
            "mINP": float(self.mINP),
            "rank1": self.rank(1),
            "rank5": self.rank(5),
            "rank10": self.rank(10),
            "num_valid_queries": int(self.num_valid_queries),
            "num_queries": int(self.num_queries),
        }


class _Progress:
    """A tqdm bar on an interactive terminal, periodic log lines otherwise."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done = 0
        self.start = self.last_log = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional for the metrics; fall back to log lines
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self.last_log >= _LOG_PERIOD_S and self.done < self.total:
            self.last_log = now
            elapsed = now - self.start
            left = elapsed * (self.total - self.done) / max(self.done, 1)
            logger.info(
                "%s: %d/%d %s (%.0f%%), %.0f s elapsed, about %.0f s left",
                self.desc,
                self.done,
                self.total,
                self.unit,
                100.0 * self.done / max(self.total, 1),
                elapsed,
                left,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        logger.debug("%s: %d %s in %.1f s", self.desc, self.done, self.unit, self.elapsed())

    def elapsed(self) -> float:
        return time.monotonic() - self.start


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


def squared_euclidean_distance(qf: torch.Tensor, gf: torch.Tensor) -> torch.Tensor:
    """Dense squared Euclidean distances ||q||^2 + ||g||^2 - 2 q.g, as the official code.

    Args:
        qf: float [Q, D] query features.
        gf: float [G, D] gallery features (same device).

    Returns:
        float32 [Q, G] distances on the features' device.
    """
    qf, gf = qf.float(), gf.float()
    out = torch.empty(qf.shape[0], gf.shape[0], dtype=torch.float32, device=qf.device)
    return distance_block(qf, gf, (qf * qf).sum(1), (gf * gf).sum(1), out)


def distance_block(
    q: torch.Tensor, g: torch.Tensor, qq: torch.Tensor, gg: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Squared Euclidean distances of a block of rows, written into ``out``.

    Args:
        q: float32 [c, D] rows.
        g: float32 [G, D] columns (same device).
        qq: float32 [c] squared norms of ``q``.
        gg: float32 [G] squared norms of ``g``.
        out: float32 [c, G] destination.

    Returns:
        ``out``, holding |q|^2 + |g|^2 - 2 q.g.
    """
    # Same operation order as the official code: (|q|^2 + |g|^2) first, then the -2 q.g product.
    torch.add(qq[:, None], gg[None, :], out=out)
    return out.addmm_(q, g.t(), alpha=-2.0)


def _prepare_features(feats: torch.Tensor, feat_norm: bool, name: str) -> torch.Tensor:
    if feats.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(feats.shape)}")
    # Half-precision features are widened: fp16 distances lose ties and ordering.
    widened = feats.detach().float()
    norms = torch.linalg.vector_norm(widened, dim=1, keepdim=True)
    # A NaN or infinite value makes its row's norm non-finite: a check on N numbers, not N x D.
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if not feat_norm:
        return widened
    # Same arithmetic as F.normalize (x / max(|x|, eps)); in place when widening made a copy.
    norms.clamp_min_(1e-12)
    if widened.data_ptr() == feats.data_ptr():
        return widened / norms
    return widened.div_(norms)


def distance_chunks(qf: torch.Tensor, gf: torch.Tensor, chunk_rows: int) -> Iterator[torch.Tensor]:
    """Squared Euclidean distances, one block of query rows at a time.

    The yielded tensor is a reused buffer: consume it before asking for the next block.

    Args:
        qf: float32 [Q, D] query features.
        gf: float32 [G, D] gallery features (same device).
        chunk_rows: query rows per block.

    Returns:
        An iterator of float32 [c, G] blocks covering the queries in order.
    """
    chunk_rows = max(1, min(int(chunk_rows), qf.shape[0]))
    qq, gg = (qf * qf).sum(1), (gf * gf).sum(1)
    buf = torch.empty(chunk_rows, gf.shape[0], dtype=torch.float32, device=qf.device)
    for start in range(0, qf.shape[0], chunk_rows):
        stop = min(start + chunk_rows, qf.shape[0])
        yield distance_block(qf[start:stop], gf, qq[start:stop], gg, buf[: stop - start])


def default_chunk_rows(num_gallery: int, memory_budget_mb: float) -> int:
    """Query rows per distance block for a memory budget (half of it for the dense block).

    Args:
        num_gallery: G.
        memory_budget_mb: working-memory budget in MiB.

    Returns:
        Rows per block, at least 1.
    """
    budget = memory_budget_mb * 2**20
    return max(1, int(budget // 2 // (_DENSE_BYTES_PER_PAIR * max(num_gallery, 1))))


class _GalleryIndex:
    """Gallery items grouped by pid, to look up each query's same-pid items without a Q x G mask."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor) -> None:
        self.g_pids, self.g_camids = g_pids, g_camids
        self.order = torch.argsort(g_pids, stable=True)
        self.uniq, counts = torch.unique_consecutive(g_pids[self.order], return_counts=True)
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts

    def lookup(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same-pid gallery indices per query: (idx int64 [c, M], mask bool [c, M])."""
        slot = torch.searchsorted(self.uniq, q_pids).clamp_(max=len(self.uniq) - 1)
        found = self.uniq[slot] == q_pids
        count = torch.where(found, self.counts[slot], torch.zeros_like(slot))
        width = int(count.max()) if len(count) else 0
        arange = torch.arange(width, device=q_pids.device)
        mask = arange[None, :] < count[:, None]
        flat = (self.starts[slot][:, None] + arange[None, :]).clamp_(max=len(self.order) - 1)
        return self.order[flat], mask


def _float_order_key(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2^32) with the same order (no NaN)."""
    bits = (values + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    # Negative floats order backwards as integers: flip their magnitude bits.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(torch.int64) + 2**31


class _ChunkRanker:
    """Per-query AP, INP and first-match rank from blocks of distances."""

    def __init__(
        self,
        g_pids: torch.Tensor,
        g_camids: torch.Tensor,
        memory_budget_mb: float,
    ) -> None:
        self.gallery = _GalleryIndex(g_pids, g_camids)
        self.num_g = len(g_pids)
        self.padded_g = (self.num_g + 7) // 8 * 8  # whole int64 words for a cheap count bound
        self.budget = memory_budget_mb * 2**20
        self.mask_buf: torch.Tensor | None = None

    def _mask_buffer(self, rows: int, device: torch.device) -> torch.Tensor:
        buf = self.mask_buf
        if buf is None or buf.shape[0] < rows or buf.device != device:
            buf = torch.zeros(rows, self.padded_g, dtype=torch.bool, device=device)
            self.mask_buf = buf
        return buf[:rows]

    def rank(
        self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rank the true matches of one block of queries.

        Args:
            dist: float32 [c, G] distances.
            q_pids: int64 [c].
            q_camids: int64 [c].

        Returns:
            (ap float64 [c], inp float64 [c], first-match rank int64 [c]); NaN / NaN / -1 for
            queries without a true match.
        """
        c = dist.shape[0]
        device = dist.device
        ap = torch.full((c,), float("nan"), dtype=torch.float64, device=device)
        inp = ap.clone()
        first = torch.full((c,), -1, dtype=torch.int64, device=device)
        gidx, gmask = self.gallery.lookup(q_pids)
        width = gidx.shape[1]
        if width == 0:
            return ap, inp, first
        positive = gmask & (self.gallery.g_camids[gidx] != q_camids[:, None])
        removed = gmask & ~positive
        num_pos = positive.sum(1)
        pos_dist = dist.gather(1, gidx)
        if bool(torch.isnan(pos_dist[positive]).any()):
            raise ValueError("distances of true matches contain NaN")
        # Nothing farther than the farthest true match can be ranked before any true match.
        thresh = pos_dist.masked_fill(~positive, float("-inf")).amax(1)
        words = self._mask_buffer(c, device)
        selected = words[:, : self.num_g]
        torch.le(dist, thresh[:, None], out=selected)
        removed_rows, removed_slots = torch.nonzero(removed, as_tuple=True)
        selected[removed_rows, gidx[removed_rows, removed_slots]] = False  # never counted

        # The true matches of each row sorted by (distance, gallery index); gidx is ascending
        # within a row, so a stable sort on the distance key gives the tie rule. Other slots get
        # a key above every distance key. Adding row << 33 makes one globally sorted sequence
        # with exactly `width` entries per row.
        pos_key = _float_order_key(pos_dist).masked_fill_(~positive, 2**32)
        pos_key, order = torch.sort(pos_key, dim=1, stable=True)
        row_base = torch.arange(c, device=device)[:, None] << 33
        seq = (pos_key + row_base).view(-1)
        seq_cols = gidx.gather(1, order).view(-1)

        # hist[r, b]: kept items of row r that precede exactly the true matches b, b + 1, ...
        hist = torch.zeros(c * (width + 1), dtype=torch.int64, device=device)
        max_items = max(1, int(self.budget // _SELECTED_BYTES))
        # Cheap upper bound on the selected count (8 per non-zero 64-bit word); the exact
        # per-row count is needed only when the bound says the budget could be exceeded.
        bound = 8 * int(torch.count_nonzero(words.view(torch.int64)))
        if bound <= max_items:
            groups = [(0, c)]
        else:
            counts = selected.view(torch.uint8).sum(1, dtype=torch.int64).cpu().numpy()
            groups = _row_groups(counts, max_items)
        for start, stop in groups:
            self._count_preceding(dist, words, start, stop, seq, seq_cols, width, hist)

        # preceding[r, k]: kept items ranked before the k-th true match (0-based) of row r.
        preceding = torch.cumsum(hist.view(c, width + 1)[:, :width], dim=1)
        hit_rank = (preceding + 1).to(torch.float64)
        k = torch.arange(1, width + 1, device=device, dtype=torch.float64)
        is_hit = k[None, :] <= num_pos[:, None]
        precision_sum = torch.where(is_hit, k[None, :] / hit_rank, 0.0).sum(1)
        valid = num_pos > 0
        npos = num_pos.clamp(min=1)
        last_rank = hit_rank.gather(1, (npos - 1)[:, None]).view(-1)
        ap = torch.where(valid, precision_sum / npos, ap)
        inp = torch.where(valid, npos / last_rank, inp)
        first = torch.where(valid, hit_rank[:, 0].to(torch.int64), first)
        return ap, inp, first

    def _count_preceding(self, dist, words, start, stop, seq, seq_cols, width, hist) -> None:
        """Add the selected items of rows [start, stop) to the histogram of preceded matches."""
        # The padded (contiguous) mask scans faster; its padding columns are always False.
        rows, cols = torch.nonzero(words[start:stop], as_tuple=True)
        if rows.numel() == 0:
            return
        rows += start
        key = (rows << 33) + _float_order_key(dist[rows, cols])
        # Matches of the item's row with a smaller key are ranked before it ...
        bucket = torch.searchsorted(seq, key)
        # ... and so are matches at exactly the same distance with a smaller or equal gallery
        # index (equal: the item is that match itself). Ties are rare: handled apart.
        tie = seq[bucket.clamp(max=len(seq) - 1)] == key
        if bool(tie.any()):
            where = torch.nonzero(tie, as_tuple=True)[0]
            lo, tkey = bucket[where], key[where]
            span = torch.searchsorted(seq, tkey, right=True) - lo
            offsets = torch.arange(int(span.max()), device=seq.device)
            slots = (lo[:, None] + offsets[None, :]).clamp_(max=len(seq) - 1)
            before = (seq_cols[slots] <= cols[where][:, None]) & (offsets[None, :] < span[:, None])
            bucket[where] = lo + before.sum(1)
        # Each row owns `width` entries of seq, so the row's local bucket is bucket - row*width.
        hist.index_add_(0, bucket + rows, torch.ones_like(bucket))


def _row_groups(costs: np.ndarray, max_cost: float) -> list[tuple[int, int]]:
    """Split rows into consecutive groups whose summed cost stays within max_cost (>= 1 row)."""
    cum = np.concatenate([[0], np.cumsum(costs, dtype=np.float64)])
    groups, start = [], 0
    while start < len(costs):
        stop = int(np.searchsorted(cum, cum[start] + max_cost, side="right")) - 1
        stop = min(max(stop, start + 1), len(costs))
        groups.append((start, stop))
        start = stop
    return groups


def _to_device_ids(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64).to(device)


def evaluate_distmat_chunks(
    chunks: Iterable[torch.Tensor | np.ndarray],
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    *,
    max_rank: int = 50,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    show_progress: bool = True,
    desc: str = "evaluation",
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
        memory_budget_mb: budget for the ranking work of one block (MiB), not counting the block.
        show_progress: tqdm bar on a terminal, periodic log lines otherwise.
        desc: label of the progress output.

    Returns:
        An :class:`EvalResult`.

    Raises:
        ValueError: on mismatched shapes, NaN distances of true matches, or no valid query.
    """
    q_pids_np = _as_numpy_ids(q_pids, "q_pids")
    g_pids_np = _as_numpy_ids(g_pids, "g_pids")
    num_q, num_g = len(q_pids_np), len(g_pids_np)
    q_pids_np, g_pids_np, q_camids_np, g_camids_np = _check_ids(
        q_pids_np, g_pids_np, q_camids, g_camids, num_q, num_g
    )
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    first = np.full(num_q, -1, dtype=np.int64)
    ranker = None
    device_ids: dict = {}
    done = 0
    bar = _Progress(num_q, desc, "queries", enabled=show_progress)
    try:
        for block in chunks:
            block = torch.as_tensor(block)
            if block.ndim != 2 or block.shape[1] != num_g:
                raise ValueError(
                    f"distance block of shape {tuple(block.shape)}, expected [c, {num_g}]"
                )
            stop = done + block.shape[0]
            if stop > num_q:
                raise ValueError(f"distance blocks cover more than the {num_q} queries")
            block = block.float()
            device = block.device
            if device not in device_ids:
                device_ids[device] = (
                    _to_device_ids(q_pids_np, device),
                    _to_device_ids(q_camids_np, device),
                    _to_device_ids(g_pids_np, device),
                    _to_device_ids(g_camids_np, device),
                )
            qp, qc, gp, gc = device_ids[device]
            if ranker is None or ranker.gallery.g_pids.device != device:
                ranker = _ChunkRanker(gp, gc, memory_budget_mb)
            b_ap, b_inp, b_first = ranker.rank(block, qp[done:stop], qc[done:stop])
            ap[done:stop] = b_ap.cpu().numpy()
            inp[done:stop] = b_inp.cpu().numpy()
            first[done:stop] = b_first.cpu().numpy()
            bar.update(stop - done)
            done = stop
    finally:
        bar.close()
    if done != num_q:
        raise ValueError(f"distance blocks covered {done} of {num_q} queries")
    return _summarise(ap, inp, first, min(max_rank, num_g))


def _summarise(ap: np.ndarray, inp: np.ndarray, first: np.ndarray, max_rank: int) -> EvalResult:
    valid = first > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(_NO_VALID_QUERY)
    first_valid = first[valid]
    # cmc[k - 1] = share of valid queries whose first true match is within rank k.
    hist = np.bincount(np.minimum(first_valid, max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(hist[1 : max_rank + 1]) / num_valid
    return EvalResult(
        cmc=cmc.astype(np.float64),
        mAP=float(ap[valid].mean()),
        mINP=float(inp[valid].mean()),
        num_valid_queries=num_valid,
        num_queries=len(first),
        ap=ap,
        inp=inp,
        first_match_rank=first,
    )


def evaluate_distmat(
    distmat: torch.Tensor | np.ndarray,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    *,
    max_rank: int = 50,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    show_progress: bool = True,
) -> EvalResult:
    """Exact metrics of a precomputed dense distance matrix, ranked in row blocks.

    Args:
        distmat: float [Q, G] distances (torch on any device, or numpy).
        q_pids: int [Q] query identities.
        g_pids: int [G] gallery identities.
        q_camids: int [Q] query cameras.
        g_camids: int [G] gallery cameras.
        max_rank: CMC length; clipped to G.
        memory_budget_mb: working-memory budget (MiB).
        show_progress: progress bar or log lines.

    Returns:
        An :class:`EvalResult` (same numbers as :func:`eval_func`, plus mINP).
    """
    distmat = torch.as_tensor(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D, got shape {tuple(distmat.shape)}")
    rows = default_chunk_rows(distmat.shape[1], memory_budget_mb)
    blocks = (distmat[s : s + rows] for s in range(0, distmat.shape[0], rows))
    return evaluate_distmat_chunks(
        blocks,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank=max_rank,
        memory_budget_mb=memory_budget_mb / 2,
        show_progress=show_progress,
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
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    rerank: RerankParams | None = None,
    show_progress: bool = True,
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
        memory_budget_mb: working memory (MiB) for distance blocks and ranking; the features
            themselves (and the re-ranking neighbour structures) come on top.
        rerank: k-reciprocal re-ranking parameters, or None for plain distances.
        show_progress: progress bar or log lines.

    Returns:
        An :class:`EvalResult` with cmc [min(max_rank, G)], mAP, mINP and per-query values.

    Raises:
        ValueError: on shape mismatches, non-finite features or no valid query.
    """
    if qf.device != gf.device:
        raise ValueError(f"qf on {qf.device} but gf on {gf.device}")
    qf = _prepare_features(qf, feat_norm, "qf")
    gf = _prepare_features(gf, feat_norm, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"feature sizes differ: qf {qf.shape[1]}, gf {gf.shape[1]}")
    if rerank is not None:
        from utils.reranking import k_reciprocal_rerank_chunks

        blocks = k_reciprocal_rerank_chunks(
            qf,
            gf,
            k1=rerank.k1,
            k2=rerank.k2,
            lambda_value=rerank.lambda_value,
            memory_budget_mb=memory_budget_mb / 2,
            show_progress=show_progress,
        )
    else:
        blocks = distance_chunks(qf, gf, default_chunk_rows(gf.shape[0], memory_budget_mb))
    return evaluate_distmat_chunks(
        blocks,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank=max_rank,
        memory_budget_mb=memory_budget_mb / 2,
        show_progress=show_progress,
        desc="re-ranked evaluation" if rerank is not None else "evaluation",
    )
