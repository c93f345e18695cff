"""Exact ranks of each query's true matches in blocks of distances, without sorting the rows.

The engine of the chunked evaluator (:func:`utils.metrics.evaluate_distmat_chunks`), with the
Market-1501 protocol: a query's gallery items of the same pid AND camid are removed, the other
same-pid items are its true matches, and equal distances rank by ascending gallery index.

How it avoids sorting: for each query, let ``t`` be the distance of its farthest true match.
Only gallery items with distance <= t can be ranked before a true match, so only those are
gathered. The query's few true matches are sorted by (distance, gallery index), and each gathered
item is placed among them by a binary search (``torch.searchsorted`` on an integer key that
orders like the float distance, exact ties settled by gallery index). A histogram of these
positions, summed, gives the number of kept items ranked before each true match, i.e. its rank.
For a useful model the gathered items are a tiny fraction of the gallery, so the cost is
dominated by the distance product itself; for a poor one it stays within a small factor of a
sort.
"""

from __future__ import annotations

import torch

from utils.distance import float_order_key, row_groups

# Bytes per gathered (candidate) item while ranking: row/column indices, key, bucket (+margin).
_SELECTED_BYTES = 72


class GalleryIndex:
    """Gallery items grouped by pid, to look up each query's same-pid items without a Q x G mask.

    Args:
        g_pids: int64 [G] gallery identities.
        g_camids: int64 [G] gallery cameras (same device).
    """

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

    def matches(
        self, q_pids: torch.Tensor, q_camids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each query's same-pid gallery items, split into true matches and removed items.

        Args:
            q_pids: int64 [c].
            q_camids: int64 [c].

        Returns:
            (gidx int64 [c, M] same-pid gallery indices, ascending per row; positive bool
            [c, M]: other camera, a true match; removed bool [c, M]: same camera, left out).
        """
        gidx, gmask = self.lookup(q_pids)
        positive = gmask & (self.g_camids[gidx] != q_camids[:, None])
        return gidx, positive, gmask & ~positive


class MatchRanker:
    """Per-query AP, INP and first-match rank from blocks of distances.

    Args:
        g_pids: int64 [G] gallery identities.
        g_camids: int64 [G] gallery cameras (same device; the blocks must be on it too).
        memory_budget_mb: working memory (MiB) for the items gathered from one block.
    """

    def __init__(
        self,
        g_pids: torch.Tensor,
        g_camids: torch.Tensor,
        memory_budget_mb: float,
    ) -> None:
        self.gallery = GalleryIndex(g_pids, g_camids)
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
        self, dist: torch.Tensor, gidx: torch.Tensor, positive: torch.Tensor, removed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rank the true matches of one block of queries.

        Args:
            dist: float32 [c, G] distances (read only).
            gidx, positive, removed: :meth:`GalleryIndex.matches` of the block's queries.

        Returns:
            (ap float64 [c], inp float64 [c], first-match rank int64 [c]); NaN / NaN / -1 for
            queries without a true match.
        """
        c, width = gidx.shape
        device = dist.device
        if width == 0:
            ap = torch.full((c,), float("nan"), dtype=torch.float64, device=device)
            return ap, ap.clone(), torch.full((c,), -1, dtype=torch.int64, device=device)
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
        pos_key = float_order_key(pos_dist).masked_fill_(~positive, 2**32)
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
            groups = row_groups(counts, max_items)
        for start, stop in groups:
            self._count_preceding(dist, words, start, stop, seq, seq_cols, width, hist)
        # preceding[r, k]: kept items ranked before the k-th true match (0-based) of row r.
        preceding = torch.cumsum(hist.view(c, width + 1)[:, :width], dim=1)
        return _scores(preceding, positive.sum(1))

    def _count_preceding(self, dist, words, start, stop, seq, seq_cols, width, hist) -> None:
        """Add the selected items of rows [start, stop) to the histogram of preceded matches."""
        # The padded (contiguous) mask scans faster; its padding columns are always False.
        rows, cols = torch.nonzero(words[start:stop], as_tuple=True)
        if rows.numel() == 0:
            return
        rows += start
        key = (rows << 33) + float_order_key(dist[rows, cols])
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


def _scores(
    preceding: torch.Tensor, num_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AP, INP and first-match rank from the items ranked before each true match.

    Args:
        preceding: int64 [c, M]; preceding[r, k] = kept items ranked before the k-th true match
            (0-based) of row r (only k < num_pos[r] is read).
        num_pos: int64 [c] true matches per row.

    Returns:
        (ap float64 [c], inp float64 [c], first-match rank int64 [c]); NaN / NaN / -1 for rows
        without a true match.
    """
    width = preceding.shape[1]
    hit_rank = (preceding + 1).to(torch.float64)
    k = torch.arange(1, width + 1, device=preceding.device, dtype=torch.float64)
    is_hit = k[None, :] <= num_pos[:, None]
    precision_sum = torch.where(is_hit, k[None, :] / hit_rank, 0.0).sum(1)
    valid = num_pos > 0
    npos = num_pos.clamp(min=1)
    last_rank = hit_rank.gather(1, (npos - 1)[:, None]).view(-1)
    nan = torch.full_like(precision_sum, float("nan"))
    ap = torch.where(valid, precision_sum / npos, nan)
    inp = torch.where(valid, npos / last_rank, nan)
    first = torch.where(valid, hit_rank[:, 0].to(torch.int64), -1)
    return ap, inp, first
