"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), exact and sparse.

The definitions are those of the official CLIP-ReID utility (itself the authors' code):

* original distance: squared Euclidean over the concatenated query + gallery features (N = Q + G
  rows), each column divided by its maximum over all N rows, then transposed, so that row i is
  scaled by max_k d(k, i);
* R(i, k1): the k-reciprocal set, j among the k1 + 1 nearest of i with i among the k1 + 1 nearest
  of j (both lists include the item itself);
* expansion: for each candidate c in R(i, k1), R(c, round(k1 / 2)) is added when more than 2/3 of
  it lies in R(i, k1) (round halves to even, as numpy);
* V[i, j] = exp(-original(i, j)) over the expanded set, normalised to sum 1 per row;
* local query expansion (k2 > 1): V[i] is replaced by the mean of V over the k2 nearest rows of i;
* Jaccard distance 1 - s / (2 - s) with s = sum_k min(V[i, k], V[j, k]); since every row of V sums
  to 1, sum_k max = 2 - s and this is exactly 1 - sum min / sum max;
* final = (1 - lambda) * Jaccard + lambda * original, on the query x gallery block.

Instead of dense N x N arrays (35 GB each for MSMT17), the neighbour lists are top-k lists and V is
a sparse matrix, so memory grows with N x k. One N x N pass of matrix products (in row blocks)
gives the neighbour lists and the column maxima; the Jaccard distances are built one query chunk
at a time through an inverted (column) index of the gallery rows of V, and each chunk goes
straight to the chunked evaluator.

Differences from the official code: V and the Jaccard distance are kept in float32 (the official
code stores them in float16, so values agree to about 1e-3; ``float16=True`` reproduces its
float16 storage and arithmetic, for comparing with published re-ranked numbers); the neighbour
lists are read from the rows of the (symmetric) distance matrix; items at exactly equal distance
at the edge of a neighbour list are cut in an unspecified order, as with the official (unstable)
argsort.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from utils.distance import DEFAULT_MEMORY_BUDGET_MB, chunk_rows, distance_block, row_groups
from utils.logger import Progress

logger = logging.getLogger(__name__)

# Bytes per item of the index arithmetic (indices, keys, permutation, values) in sparse passes.
_ITEM_BYTES = 48
# Neighbour-list conventions of the clustering Jaccard distance (MODEL.CLUSTER_JACCARD):
# 'clustercontrast': the k1 nearest items, the item itself included (ClusterContrast's
# compute_jaccard_distance, which the USL recipes run); 'reranking': k1 + 1 (Zhong et al.'s
# re-ranking code, as the evaluation's re-ranking).
JACCARD_CONVENTIONS = ("clustercontrast", "reranking")
# Neighbours stored per row, as a multiple of k1 + 1: the distances of the k-reciprocal
# expansion are then read from the neighbour pass, not recomputed (about 99% of them for 2x).
_STORED_NEIGHBOURS = 2


@dataclass(frozen=True)
class RerankParams:
    """k-reciprocal re-ranking parameters.

    No defaults: the values live in one place, the config (``TEST.RE_RANKING_K1/K2/LAMBDA``:
    50, 15, 0.3, the official training processor's), and ``build_eval_settings`` builds this
    from it; code outside the config names its values. (The official ``re_ranking`` function
    keeps its paper defaults 20, 6, 0.3 for compatibility.)

    Attributes:
        k1: size of the k-reciprocal neighbourhood.
        k2: neighbours averaged by local query expansion (1 disables it).
        lambda_value: weight of the original distance in the final distance.
        float16: store V and compute the Jaccard distance in float16 as the official code
            (``TEST.RE_RANKING_FLOAT16``); False keeps float32.
    """

    k1: int
    k2: int
    lambda_value: float
    float16: bool = False

    def __post_init__(self) -> None:
        _check_params(self.k1, self.k2, self.lambda_value)


def _check_params(k1: int, k2: int, lambda_value: float) -> None:
    if int(k1) != k1 or k1 < 1:
        raise ValueError(f"k1 must be a positive integer, got {k1}")
    if int(k2) != k2 or k2 < 1:
        raise ValueError(f"k2 must be a positive integer, got {k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")


@dataclass
class _SparseRows:
    """A row-compressed sparse matrix: row i holds cols/vals[ptr[i]:ptr[i + 1]]."""

    ptr: torch.Tensor  # int64 [R + 1]
    cols: torch.Tensor  # int64 [nnz]
    vals: torch.Tensor  # float32 [nnz]

    def row_lengths(self) -> torch.Tensor:
        return self.ptr[1:] - self.ptr[:-1]


def _ptr_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


class _Workspace:
    """Reusable flat buffers: large fresh allocations cost page faults on every pass (on a CPU
    this made gathers several times slower than copying into an existing buffer)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D view of ``numel`` items of the named buffer (contents undefined)."""
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self.buffers[name] = buf
        return buf[:numel]


def _concat_ranges(
    starts: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Concatenation of the index ranges [starts[e], starts[e] + lengths[e]) (int64 [sum L]).

    Built as a cumulative sum of steps (1 inside a range, a jump at each range start), which
    costs two passes over the output instead of a per-item segment lookup.

    Args:
        starts: int64 [E] range starts.
        lengths: int64 [E] range lengths (zeros allowed).
        out: optional int64 buffer of exactly sum(lengths) items.
    """
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    total = int(lengths.sum())
    steps = out if out is not None else torch.empty(total, dtype=torch.int64, device=starts.device)
    steps.fill_(1)
    if total == 0:
        return steps
    jumps = starts.clone()
    jumps[1:] -= starts[:-1] + lengths[:-1] - 1
    steps[torch.cumsum(lengths, 0) - lengths] = jumps
    return steps.cumsum_(0)


def _segment_ids(lengths: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[p] = index of the segment holding item p, for consecutive segments of ``lengths``."""
    out.zero_()
    ends = torch.cumsum(lengths, 0)
    inner = ends[:-1][ends[:-1] < len(out)]
    # +1 at each segment end, so the running sum counts the segments already passed.
    out.index_add_(0, inner, torch.ones_like(inner))
    return out.cumsum_(0)


def _neighbours(
    x: torch.Tensor, sq: torch.Tensor, k: int, budget_mb: float, show_progress: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k nearest rows of every row (self included), their distances, and the column maxima.

    Returns:
        (indices int64 [N, k], distances float32 [N, k], column maxima float32 [N]).
    """
    n = x.shape[0]
    rows = chunk_rows(budget_mb, n * 4 * 3, n)  # block + top-k and max temporaries
    knn = torch.empty(n, k, dtype=torch.int64, device=x.device)
    knn_dist = torch.empty(n, k, dtype=torch.float32, device=x.device)
    colmax = torch.full((n,), float("-inf"), device=x.device)
    buf = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    bar = Progress(n, "re-ranking: neighbour lists", "rows", enabled=show_progress, log=logger)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        dist = distance_block(x[start:stop], x, sq[start:stop], sq, buf[: stop - start])
        torch.maximum(colmax, dist.amax(0), out=colmax)
        top = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        knn[start:stop], knn_dist[start:stop] = top.indices, top.values
        bar.update(stop - start)
    bar.close()
    return knn, knn_dist, colmax


def _reciprocal(nn: torch.Tensor, budget_mb: float) -> torch.Tensor:
    """flags[i, a] = i is among the neighbours of nn[i, a] (bool [N, K])."""
    n, k = nn.shape
    flags = torch.empty(n, k, dtype=torch.bool, device=nn.device)
    rows = chunk_rows(budget_mb, k * k * 9 + 1)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        own = torch.arange(start, stop, device=nn.device)
        flags[start:stop] = (nn[nn[start:stop]] == own[:, None, None]).any(2)
    return flags


def _pair_distances(
    x: torch.Tensor,
    sq: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    known: torch.Tensor,
    budget_mb: float,
) -> torch.Tensor:
    """Squared Euclidean distance of each pair (rows[p], cols[p]).

    ``known`` holds the distances already computed by the neighbour pass (NaN elsewhere); only the
    missing pairs (a few percent: expansion items outside the stored neighbour lists) are
    recomputed, as single dot products.
    """
    out = known.clone()
    missing = torch.nonzero(torch.isnan(out), as_tuple=True)[0]
    step = chunk_rows(budget_mb, x.shape[1] * 4 * 3 + 64)
    for start in range(0, len(missing), step):
        idx = missing[start : start + step]
        r, c = rows[idx], cols[idx]
        dots = (x.index_select(0, r) * x.index_select(0, c)).sum(1)
        out[idx] = (sq[r] + sq[c]) - 2.0 * dots
    return out


def _expanded_weights(
    x: torch.Tensor,
    sq: torch.Tensor,
    colmax: torch.Tensor,
    knn: torch.Tensor,
    knn_dist: torch.Tensor,
    k_full: int,
    k_half: int,
    budget_mb: float,
    show_progress: bool,
) -> _SparseRows:
    """Rows of V: exp(-original distance) over the expanded k-reciprocal sets, summing to 1.

    Args:
        x: float32 [N, D] features; sq: their squared norms [N]; colmax: [N] column maxima.
        knn: int64 [N, K] neighbour lists (K >= k_full >= k_half); knn_dist: their distances.
        k_full: k1 + 1 (list length of R(i, k1)); k_half: round(k1 / 2) + 1.
        budget_mb: working-memory budget (MiB).
        show_progress: progress output.
    """
    n, stored = knn.shape
    nn_full, nn_half = knn[:, :k_full], knn[:, :k_half]
    recip_full, recip_half = _reciprocal(nn_full, budget_mb), _reciprocal(nn_half, budget_mb)
    # Per row: membership mask, distance cache and stamps over all N columns, candidate sets.
    per_row = 9 * n + k_full * k_half * 24 + (k_full + k_full * k_half) * _ITEM_BYTES
    rows = chunk_rows(budget_mb, per_row, n)
    member = torch.zeros(rows, n, dtype=torch.bool, device=x.device)
    cache = torch.full((rows, n), float("nan"), device=x.device)
    stamp = torch.empty(rows, n, dtype=torch.int32, device=x.device)
    lengths, all_cols, all_vals = [], [], []
    bar = Progress(n, "re-ranking: k-reciprocal sets", "rows", enabled=show_progress, log=logger)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        c = stop - start
        fwd, is_recip = nn_full[start:stop], recip_full[start:stop]
        local = torch.arange(c, device=x.device)[:, None].expand(c, k_full)
        core_rows, core_cols = local[is_recip], fwd[is_recip]  # R(i, k1)
        member[core_rows, core_cols] = True
        cand_sets, cand_flags = nn_half[fwd], recip_half[fwd]  # [c, k_full, k_half]
        local3 = local[:, :, None].expand_as(cand_sets)
        overlap = (member[local3, cand_sets] & cand_flags).sum(2)
        size = cand_flags.sum(2)
        member[core_rows, core_cols] = False  # reset the reused mask for the next block
        # "more than 2/3 of R(c, k1/2) inside R(i, k1)", in integers to avoid rounding.
        accept = is_recip & (3 * overlap > 2 * size)
        add = accept[:, :, None] & cand_flags
        # The expanded set: R(i, k1) and the accepted sets, listed row by row, duplicates
        # dropped by stamping each (row, column) cell with the position that wrote it last.
        cand_all = torch.cat([fwd, cand_sets.reshape(c, -1)], dim=1)
        valid = torch.cat([is_recip, add.reshape(c, -1)], dim=1)
        r = torch.arange(c, device=x.device)[:, None].expand_as(cand_all)[valid]
        col = cand_all[valid]
        del cand_all, valid
        position = torch.arange(len(r), dtype=torch.int32, device=x.device)
        stamp[r, col] = position
        first = stamp[r, col] == position
        r, col = r[first], col[first]
        # Distances already known from the neighbour pass, through a dense per-block cache.
        nb_rows = torch.arange(c, device=x.device)[:, None].expand(c, stored)
        cache[nb_rows, knn[start:stop]] = knn_dist[start:stop]
        known = cache[r, col]
        cache[nb_rows, knn[start:stop]] = float("nan")
        grow = r + start
        dist = _pair_distances(x, sq, grow, col, known, budget_mb)
        # original(i, j) = d(j, i) / max_k d(k, i); d is symmetric, so d(i, j) is used.
        weight = torch.exp(-dist / colmax[grow])
        row_sum = torch.zeros(c, dtype=torch.float32, device=x.device).index_add_(0, r, weight)
        lengths.append(torch.bincount(r, minlength=c))
        all_cols.append(col)
        all_vals.append(weight / row_sum[r])
        bar.update(c)
    bar.close()
    return _SparseRows(
        _ptr_from_lengths(torch.cat(lengths)), torch.cat(all_cols), torch.cat(all_vals)
    )


def _round_to_half(v: _SparseRows) -> _SparseRows:
    """V with its values rounded to float16 (the official code's storage), kept as float32."""
    return _SparseRows(v.ptr, v.cols, v.vals.half().float())


def _sort_row_entries(v: _SparseRows, n: int) -> _SparseRows:
    """V with each row's entries in increasing column order (the official summation order)."""
    lengths = v.row_lengths()
    rows = torch.repeat_interleave(
        torch.arange(len(lengths), device=v.cols.device), lengths, output_size=len(v.cols)
    )
    order = torch.argsort(rows * n + v.cols)
    return _SparseRows(v.ptr, v.cols[order], v.vals[order])


def _half_sums_in_order(segments: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """Per-segment sums accumulated in float16, item by item in the given order.

    The official code adds the terms of each Jaccard sum one at a time to a float16 array
    (every partial sum rounded to float16); this does the same for all segments at once, one
    step per position inside the segments.

    Args:
        segments: int64 [P] segment of each item, in [0, size).
        values: float [P] items, in summation order within each segment.
        size: number of segments.

    Returns:
        float16 [size] sums (0 for empty segments).
    """
    order = torch.argsort(segments, stable=True)
    seg, vals = segments[order], values[order].half()
    counts = torch.bincount(seg, minlength=size)
    position = torch.arange(len(seg), device=seg.device) - (torch.cumsum(counts, 0) - counts)[seg]
    by_position = torch.argsort(position, stable=True)
    steps = torch.bincount(position).tolist() if len(position) else []
    acc = torch.zeros(size, dtype=torch.float16, device=values.device)
    start = 0
    for count in steps:
        idx = by_position[start : start + count]
        target = seg[idx]
        acc[target] = acc[target] + vals[idx]
        start += count
    return acc


def _query_expansion(v: _SparseRows, nn_qe: torch.Tensor, budget_mb: float) -> _SparseRows:
    """Replace each row of V by the mean of the rows of its k2 nearest neighbours."""
    n, k2 = nn_qe.shape
    row_len = v.row_lengths()
    gathered = row_len[nn_qe].sum(1)  # entries summed into each output row
    lengths, all_cols, all_vals = [], [], []
    costs = (gathered * _ITEM_BYTES).cpu().numpy()
    for start, stop in row_groups(costs, budget_mb * 2**20):
        c = stop - start
        nbrs = nn_qe[start:stop].reshape(-1)
        src = _concat_ranges(v.ptr[nbrs], row_len[nbrs])
        local = torch.repeat_interleave(
            torch.arange(c, device=src.device), gathered[start:stop], output_size=len(src)
        )
        key = local * n + v.cols.index_select(0, src)
        key, perm = torch.sort(key)
        key, inverse = torch.unique_consecutive(key, return_inverse=True)
        sums = torch.zeros(len(key), dtype=torch.float32, device=key.device)
        sums.index_add_(0, inverse, v.vals.index_select(0, src.index_select(0, perm)))
        local = torch.div(key, n, rounding_mode="floor")
        lengths.append(torch.bincount(local, minlength=c))
        all_cols.append(key - local * n)
        all_vals.append(sums / k2)
    return _SparseRows(
        _ptr_from_lengths(torch.cat(lengths)), torch.cat(all_cols), torch.cat(all_vals)
    )


def _gallery_columns(v: _SparseRows, num_q: int, n: int) -> _SparseRows:
    """Column index of the gallery rows of V: column k lists (gallery j, V[Q + j, k])."""
    first = int(v.ptr[num_q])
    cols, vals = v.cols[first:], v.vals[first:]
    g_len = v.row_lengths()[num_q:]
    g_rows = torch.repeat_interleave(
        torch.arange(len(g_len), device=cols.device), g_len, output_size=len(cols)
    )
    order = torch.argsort(cols, stable=True)
    counts = torch.bincount(cols, minlength=n)
    return _SparseRows(_ptr_from_lengths(counts), g_rows[order], vals[order])


def k_reciprocal_rerank_chunks(
    qf: torch.Tensor,
    gf: torch.Tensor,
    k1: int,
    k2: int,
    lambda_value: float,
    *,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    show_progress: bool = True,
    float16: bool = False,
) -> Iterator[torch.Tensor]:
    """Re-ranked query x gallery distances, one query chunk at a time (sparse and exact).

    The features are used as given (the evaluator normalises them first when asked, as the
    official code). Work runs on the features' device; memory grows with (Q + G) x k.

    Args:
        qf: float [Q, D] query features.
        gf: float [G, D] gallery features (same device).
        k1: k-reciprocal neighbourhood size.
        k2: local query expansion size (1 disables it).
        lambda_value: weight of the original distance.
        memory_budget_mb: working-memory budget (MiB) of each pass, on top of the features and
            the sparse neighbour structures.
        show_progress: progress bar or log lines for the long passes.
        float16: the official code's float16 storage: V rounded to float16 (before and after
            the query expansion), the shared mass summed in float16 in the official order and
            the Jaccard distance computed in float16; the final sum with the original distance
            is float32, as there.

    Returns:
        An iterator of float32 [c_i, G] blocks of final distances covering the queries in order.
        Each block is a reused buffer: consume (or copy) it before asking for the next one.
    """
    _check_params(k1, k2, lambda_value)
    if qf.device != gf.device:
        raise ValueError(f"qf on {qf.device} but gf on {gf.device}")
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"features must be [Q, D] and [G, D], got {qf.shape} and {gf.shape}")
    if qf.shape[0] == 0 or gf.shape[0] == 0:
        raise ValueError("empty query or gallery set")
    return _rerank_blocks(
        qf, gf, int(k1), int(k2), float(lambda_value), memory_budget_mb, show_progress, float16
    )


def _shared_mass_blocks(
    v: _SparseRows,
    columns: _SparseRows,
    num_q: int,
    num_g: int,
    budget_mb: float,
    work: _Workspace,
    half: bool = False,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Shared mass s(i, j) = sum_k min(V[i, k], V[Q + j, k]) of every query row i and gallery j.

    With ``half``, each sum is accumulated in float16 in increasing column order, as the official
    code does (V's rows must then list their columns in increasing order).

    Yields:
        (start, stop, acc): query rows [start, stop) and float32 [stop - start, G] sums (float16
        with ``half``), a reused workspace buffer (consume it before asking for the next block).
    """
    col_len = columns.row_lengths()
    # Per query entry (row i, column k, value a): the gallery entries of column k are paired with
    # it, each adding min(a, b) to the shared mass of (i, gallery row).
    q_entries = int(v.ptr[num_q])
    entry_cols, entry_vals = v.cols[:q_entries], v.vals[:q_entries]
    entry_pairs = col_len[entry_cols]
    pair_ptr = _ptr_from_lengths(entry_pairs)[v.ptr[: num_q + 1]]  # pairs before each row
    pairs_per_row = pair_ptr[1:] - pair_ptr[:-1]
    cost = (pairs_per_row * _ITEM_BYTES + num_g * 16).cpu().numpy()
    for start, stop in row_groups(cost, budget_mb * 2**20):
        c = stop - start
        a, b = int(v.ptr[start]), int(v.ptr[stop])
        lengths = entry_pairs[a:b]
        total = int(pair_ptr[stop] - pair_ptr[start])
        index = work.get("index", total, torch.int64)
        shared = work.get("shared", total, torch.float32)
        other = work.get("other", total, torch.float32)
        # min(a, b) for every pair: a repeated over its column's gallery entries, b gathered.
        torch.index_select(entry_vals[a:b], 0, _segment_ids(lengths, index), out=shared)
        _concat_ranges(columns.ptr[entry_cols[a:b]], lengths, out=index)
        torch.index_select(columns.vals, 0, index, out=other)
        torch.minimum(shared, other, out=shared)
        gallery_rows = work.get("gallery_rows", total, torch.int64)
        torch.index_select(columns.cols, 0, index, out=gallery_rows)
        if half:
            local = torch.repeat_interleave(
                torch.arange(c, device=index.device), pairs_per_row[start:stop], output_size=total
            )
            yield start, stop, _half_sums_in_order(local * num_g + gallery_rows, shared, c * num_g)
            continue
        acc = work.get("acc", c * num_g, torch.float32).view(c, num_g).zero_()
        bounds = (pair_ptr[start : stop + 1] - pair_ptr[start]).tolist()
        for r in range(c):  # one accumulation per query row: no per-pair row index needed
            p0, p1 = bounds[r], bounds[r + 1]
            acc[r].index_add_(0, gallery_rows[p0:p1], shared[p0:p1])
        yield start, stop, acc


def _rerank_blocks(qf, gf, k1, k2, lambda_value, memory_budget_mb, show_progress, float16):
    num_q, num_g = qf.shape[0], gf.shape[0]
    x = torch.cat([qf.detach().float(), gf.detach().float()])
    n = x.shape[0]
    sq = (x * x).sum(1)
    k_full = min(k1 + 1, n)
    k_half = min(round(k1 / 2) + 1, n)  # round() halves to even, like numpy's around
    k_qe = min(k2, n)
    stored = min(n, max(_STORED_NEIGHBOURS * k_full, k_qe))
    knn, knn_dist, colmax = _neighbours(x, sq, stored, memory_budget_mb, show_progress)
    v = _expanded_weights(
        x, sq, colmax, knn, knn_dist, k_full, k_half, memory_budget_mb, show_progress
    )
    del knn_dist
    if float16:
        v = _round_to_half(v)
    if k2 != 1:
        v = _query_expansion(v, knn[:, :k_qe].contiguous(), memory_budget_mb)
        if float16:
            v = _round_to_half(v)
    elif float16:
        v = _sort_row_entries(v, n)  # the query expansion sorts them otherwise
    del knn
    columns = _gallery_columns(v, num_q, n)
    xq, xg, sq_q, sq_g = x[:num_q], x[num_q:], sq[:num_q], sq[num_q:]
    work = _Workspace(x.device)
    blocks = _shared_mass_blocks(v, columns, num_q, num_g, memory_budget_mb, work, float16)
    for start, stop, acc in blocks:
        c = stop - start
        if float16:
            final = _half_weighted_jaccard(acc.view(c, num_g), lambda_value)
            acc = work.get("acc", c * num_g, torch.float32).view(c, num_g)
        else:
            # Jaccard distance 1 - s / (2 - s), weighted by 1 - lambda.
            final = work.get("final", c * num_g, torch.float32).view(c, num_g)
            torch.neg(acc, out=final).add_(2.0)
            torch.div(acc, final, out=final)
            final.neg_().add_(1.0).mul_(1.0 - lambda_value)
        # Plus the weighted original distance (into the consumed shared-mass buffer).
        orig = distance_block(xq[start:stop], xg, sq_q[start:stop], sq_g, acc)
        final.add_(orig.div_(colmax[start:stop, None]), alpha=lambda_value)
        yield final


def _half_weighted_jaccard(s: torch.Tensor, lambda_value: float) -> torch.Tensor:
    """``(1 - lambda) * (1 - s / (2 - s))`` with the official code's float16 steps.

    Each operation on the float16 shared masses ``s`` rounds to float16, and the weight
    ``1 - lambda`` is itself a float16 number, as numpy computes with a float16 array.

    Returns:
        float32 tensor of the float16 results.
    """
    weight = torch.tensor(1.0 - lambda_value, dtype=torch.float16, device=s.device)
    return ((1.0 - s / (2.0 - s)) * weight).float()


def re_ranking(
    probFea: torch.Tensor | np.ndarray,  # noqa: N803 (official argument names)
    galFea: torch.Tensor | np.ndarray,  # noqa: N803
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    float16: bool = False,
) -> np.ndarray:
    """k-reciprocal re-ranking with the official signature: a drop-in for the official utility.

    Computed by the sparse algorithm of :func:`k_reciprocal_rerank_chunks`; only the returned
    query x gallery matrix is dense. For large sets, feed the chunks to
    :func:`utils.metrics.evaluate_distmat_chunks` (or call ``evaluate_features(..., rerank=...)``)
    instead of building this matrix.

    Args:
        probFea: float [Q, D] query features (torch on any device, or numpy), used as given.
        galFea: float [G, D] gallery features.
        k1: k-reciprocal neighbourhood size.
        k2: local query expansion size.
        lambda_value: weight of the original distance.
        float16: the official float16 storage (see :func:`k_reciprocal_rerank_chunks`).

    Returns:
        float32 numpy [Q, G] re-ranked distances.
    """
    qf, gf = torch.as_tensor(probFea), torch.as_tensor(galFea)
    blocks = k_reciprocal_rerank_chunks(
        qf, gf, k1, k2, lambda_value, show_progress=False, float16=float16
    )
    return np.concatenate([block.cpu().numpy().copy() for block in blocks], axis=0)


def jaccard_distance_sparse(
    feats: torch.Tensor,
    k1: int = 30,
    k2: int = 6,
    max_distance: float = 0.6,
    *,
    convention: str = "clustercontrast",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-reciprocal Jaccard distance between all items of one set, kept only where it is small.

    The clustering variant used by unsupervised ReID (ClusterContrast lineage): the same
    k-reciprocal sets, expansion, local query expansion and Jaccard distance as the re-ranking
    above, over the N items of ``feats`` (no query/gallery split), except that
    ``V[i, j] = exp(-d(i, j))`` uses the plain squared Euclidean distance d (no division by the
    column maximum). With L2-normalised features d = 2 - 2 cos, as in the clustering recipes.

    Neighbour lists (``convention``): ClusterContrast searches the k1 nearest items (the item
    itself included) and cuts every list from those, so R(i, k1) is drawn from k1 items, the
    half-size sets from ``min(round(k1 / 2) + 1, k1)`` and the query expansion from
    ``min(k2, k1)``; the re-ranking convention draws R(i, k1) from k1 + 1 items. ClusterContrast
    with k1 thus equals the re-ranking convention with k1 - 1 whenever ``round(k1 / 2)`` agrees
    (k1 = 21 and 20 do, 30 and 29 do not).

    Only pairs with a distance of at most ``max_distance`` (< 1) are returned; every other pair
    shares no V mass or lies farther, so nothing N x N is ever stored.

    Args:
        feats: float [N, D] features (normalise them first for the cosine form), any device.
        k1: k-reciprocal neighbourhood size (30 in ClusterContrast).
        k2: local query expansion size (6; 1 disables it).
        max_distance: largest Jaccard distance kept, in (0, 1) (the DBSCAN eps).
        convention: 'clustercontrast' (k1 nearest, self included) or 'reranking' (k1 + 1).
        memory_budget_mb: working-memory budget (MiB) of each pass.
        show_progress: progress bar or log lines for the long passes.

    Returns:
        (rows int64 [E], cols int64 [E], dists float32 [E]) on the features' device: every pair
        (i, j) with Jaccard distance <= ``max_distance``, both orders and the diagonal (distance
        0) included, sorted by row then column.
    """
    _check_params(k1, k2, 0.0)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"feats must be a non-empty [N, D] tensor, got {tuple(feats.shape)}")
    if not 0.0 < max_distance < 1.0:
        raise ValueError(f"max_distance must be in (0, 1), got {max_distance}")
    if convention not in JACCARD_CONVENTIONS:
        raise ValueError(f"convention {convention!r}; valid: {list(JACCARD_CONVENTIONS)}")
    x = feats.detach().float()
    n = x.shape[0]
    sq = (x * x).sum(1)
    # ClusterContrast cuts every list from its k1-nearest search; re-ranking ranks all N items.
    searched = int(k1) if convention == "clustercontrast" else n
    k_full = min(int(k1) + 1, searched, n)
    k_half = min(round(k1 / 2) + 1, searched, n)  # round() halves to even, like numpy's around
    k_qe = min(int(k2), searched, n)
    stored = min(n, max(_STORED_NEIGHBOURS * k_full, k_qe))
    knn, knn_dist, _ = _neighbours(x, sq, stored, memory_budget_mb, show_progress)
    # A unit "column maximum" turns the re-ranking weights into the unscaled exp(-d).
    unit = torch.ones(n, dtype=torch.float32, device=x.device)
    v = _expanded_weights(
        x, sq, unit, knn, knn_dist, k_full, k_half, memory_budget_mb, show_progress
    )
    del knn_dist
    if k2 != 1:
        v = _query_expansion(v, knn[:, :k_qe].contiguous(), memory_budget_mb)
    del knn
    columns = _gallery_columns(v, 0, n)
    work = _Workspace(x.device)
    all_rows, all_cols, all_dists = [], [], []
    for start, _, acc in _shared_mass_blocks(v, columns, n, n, memory_budget_mb, work):
        # Jaccard distance 1 - s / (2 - s) <= t  <=>  s >= 2 (1 - t) / (2 - t): test s first.
        keep = acc >= 2.0 * (1.0 - max_distance) / (2.0 - max_distance) - 1e-6
        r, c = torch.nonzero(keep, as_tuple=True)
        s = acc[r, c]
        dist = (1.0 - s / (2.0 - s)).clamp_(min=0.0)
        ok = dist <= max_distance
        all_rows.append(r[ok] + start)
        all_cols.append(c[ok])
        all_dists.append(dist[ok])
    return torch.cat(all_rows), torch.cat(all_cols), torch.cat(all_dists)
