"""Verification ROC of a query-gallery evaluation: exact TPR at fixed FPRs, in bounded memory.

Every query-gallery pair is a verification trial: a *positive* when both images show the same
identity, a *negative* otherwise; a pair is accepted when its distance is at most a threshold.
Same-identity pairs from the same camera are left out, as the ranking protocol removes them
(fast-reid's ROC drops them the same way); different-identity same-camera pairs are negatives.

TPR at FPR f is the largest true-positive rate among the ROC points whose false-positive rate is
at most f (no interpolation): with N negatives, at most m = floor(f N) of them may be accepted,
so the threshold must stay below the (m + 1)-th smallest negative distance t, and

    TPR(f) = #{positive pairs with distance < t} / #positive pairs.

This is exactly ``max(tpr[fpr <= f])`` of ``sklearn.metrics.roc_curve(labels, -distances)``.
fast-reid's ``TPR@FPR`` is another quantity: it labels same-identity pairs 0 and the others 1 and
scores by distance, so its "TPR" is the share of different-identity pairs rejected and its "FPR"
the share of same-identity pairs rejected, read at the ROC point nearest to f.

Memory: the positives are few (a query's true matches) and are kept; of the negatives only the
k = floor(f_max N) + 1 smallest are needed. Rows are taken in groups within the memory budget;
each group is compared with a bound (the k-th smallest of the negatives kept so far) and only the
smaller values are kept, selected in row groups of bounded size; when more than 2 k are kept
they are cut back to the k smallest (an in-place selection on the CPU, ``torch.topk`` on a GPU),
which tightens the bound. Memory: the budget, plus the kept values (at most 8 k bytes plus one
selection; k at f = 1e-2: 0.54 M at Market-1501 size, 9.6 M at MSMT17 size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from utils.distance import chunk_rows, row_groups

__all__ = ["ROC_FPRS", "TprAtFpr", "count_negative_pairs", "tpr_key", "tpr_summary"]

# The false-positive rates reported (fast-reid's): 1 in 10,000, 1,000 and 100 negative pairs.
ROC_FPRS = (1e-4, 1e-3, 1e-2)
# Bytes per selected value: float32 value and the int64 (row, column) of boolean indexing.
_SELECTED_BYTES = 20
# Mask entries counted at once.
_COUNT_CHUNK = 2**22


def tpr_key(fpr: float) -> str:
    """The summary key of a TPR at a false-positive rate, e.g. ``'tpr@fpr1e-4'``.

    Args:
        fpr: the false-positive rate.

    Returns:
        The key.
    """
    mantissa, exponent = f"{fpr:.0e}".split("e")
    return f"tpr@fpr{mantissa}e{int(exponent)}"


def tpr_summary(tpr_at_fpr: dict[float, float] | None) -> dict[str, float]:
    """TPRs under their summary keys.

    Args:
        tpr_at_fpr: ``{fpr: tpr}``, or None when the ROC was not computed.

    Returns:
        ``{'tpr@fpr1e-4': ..., ...}``; empty for None.
    """
    return {tpr_key(f): float(t) for f, t in (tpr_at_fpr or {}).items()}


def count_negative_pairs(q_pids: np.ndarray, g_pids: np.ndarray) -> int:
    """Number of query-gallery pairs of different identities.

    Args:
        q_pids: int [Q] query identities.
        g_pids: int [G] gallery identities.

    Returns:
        Q x G minus the same-identity pairs.
    """
    uniq, counts = np.unique(g_pids, return_counts=True)
    slot = np.clip(np.searchsorted(uniq, q_pids), 0, max(len(uniq) - 1, 0))
    same = np.where(uniq[slot] == q_pids, counts[slot], 0) if len(uniq) else 0
    return int(len(q_pids) * len(g_pids) - np.sum(same))


def _allowed_negatives(fpr: float, num_neg: int) -> int:
    """The largest m with m / num_neg <= fpr, in the floating-point arithmetic of an ROC curve."""
    m = min(num_neg, max(0, math.floor(fpr * num_neg)))
    while m < num_neg and (m + 1) / num_neg <= fpr:
        m += 1
    while m > 0 and m / num_neg > fpr:
        m -= 1
    return m


def _row_counts(mask: torch.Tensor) -> np.ndarray:
    """True values per row of a bool matrix, summed a few rows at a time.

    A whole-matrix sum makes a temporary several times the mask's size.

    Args:
        mask: bool [R, C].

    Returns:
        int64 numpy [R].
    """
    rows = max(1, _COUNT_CHUNK // max(mask.shape[1], 1))
    counts = [mask[i : i + rows].sum(1) for i in range(0, mask.shape[0], rows)]
    return torch.cat(counts).cpu().numpy() if counts else np.zeros(0, dtype=np.int64)


class TprAtFpr:
    """Accumulates the distance blocks of an evaluation; gives TPR at each false-positive rate.

    Args:
        fprs: the false-positive rates, each in (0, 1).
        num_negatives: the number N of negative pairs of the whole evaluation
            (:func:`count_negative_pairs`).
        num_gallery: G, the width of the blocks.
        memory_budget_mb: working memory (MiB) of one group of rows.
    """

    def __init__(
        self,
        fprs: Sequence[float],
        num_negatives: int,
        num_gallery: int,
        memory_budget_mb: float,
    ) -> None:
        bad = [f for f in fprs if not 0.0 < float(f) < 1.0]
        if bad or not fprs:
            raise ValueError(f"false-positive rates must be in (0, 1), got {list(fprs)}")
        self.fprs = tuple(float(f) for f in fprs)
        self.num_neg = int(num_negatives)
        self.allowed = {f: _allowed_negatives(f, self.num_neg) for f in self.fprs}
        # The (m + 1)-th smallest negative distance of every rate: keep that many, at most N.
        self.k = min(self.num_neg, max(self.allowed.values()) + 1)
        # Half the budget for a group's bool mask, half for the values selected at once.
        self.rows = chunk_rows(memory_budget_mb / 2, max(num_gallery, 1))
        self.max_selected = max(1, int(memory_budget_mb / 2 * 2**20 // _SELECTED_BYTES))
        self.kept: list[torch.Tensor] = []  # negative distances below the bound (>= the k smallest)
        self.num_kept = 0
        self.bound = math.inf  # the k-th smallest of a subset of the negatives seen
        self.positives: list[torch.Tensor] = []
        self.mask_buf: torch.Tensor | None = None

    def _mask(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A reused bool buffer of ``shape`` (one group's rows)."""
        buf = self.mask_buf
        if buf is None or buf.shape[0] < shape[0] or buf.device != device:
            buf = self.mask_buf = torch.empty(shape, dtype=torch.bool, device=device)
        return buf[: shape[0]]

    def add(
        self,
        block: torch.Tensor,
        gidx: torch.Tensor,
        positive: torch.Tensor,
        removed: torch.Tensor,
    ) -> None:
        """Take one block of query rows.

        Args:
            block: float32 [c, G] distances (read only).
            gidx: int64 [c, M] each row's same-identity gallery indices
                (``utils.match_ranks.GalleryIndex.matches``).
            positive: bool [c, M] the other-camera ones (positive pairs).
            removed: bool [c, M] the same-camera ones (left out).
        """
        self.positives.append(block.gather(1, gidx)[positive])
        if self.k == 0:
            return
        same = positive | removed
        for start in range(0, block.shape[0], self.rows):
            stop = min(start + self.rows, block.shape[0])
            part = block[start:stop]
            # Values at the bound cannot lower the k-th smallest (k kept values are <= it); NaN
            # compares False: never accepted, like an infinite distance.
            keep = self._mask(part.shape, part.device)
            mask_bound = self.bound
            torch.lt(part, mask_bound, out=keep)
            r, s = torch.nonzero(same[start:stop], as_tuple=True)
            keep[r, gidx[start:stop][r, s]] = False  # same-identity pairs are no negatives
            # Select in row groups of bounded size. Without a bound yet every negative is
            # selected: a few k at a time, so that the first cut comes early and is cheap.
            counts = _row_counts(keep)
            limit = self.max_selected
            if mask_bound == math.inf:
                limit = min(limit, max(4 * self.k, 2**20))
            for a, b in row_groups(counts, limit):
                if self.bound < mask_bound:  # a cut tightened the bound since the mask
                    keep[a:b] &= part[a:b] < self.bound
                values = part[a:b][keep[a:b]]
                self.kept.append(values)
                self.num_kept += values.numel()
                if self.num_kept > 2 * self.k:
                    self._cut()

    def _cut(self) -> None:
        """Keep only the k smallest kept values; the bound becomes the k-th smallest."""
        pool = self.kept[0] if len(self.kept) == 1 else torch.cat(self.kept)
        if pool.device.type == "cpu":
            # In place (introselect): no copy of the pool, unlike torch.topk.
            pool.numpy().partition(self.k - 1)
            pool = pool[: self.k].clone()
            self.bound = float(pool[self.k - 1])
        else:
            pool = torch.topk(pool, self.k, largest=False, sorted=False).values
            self.bound = float(pool.max())
        self.kept, self.num_kept = [pool], pool.numel()

    def result(self) -> dict[float, float]:
        """TPR at each false-positive rate.

        Returns:
            ``{fpr: tpr}``; NaN when there are no positive or no negative pairs.
        """
        positives = torch.cat(self.positives) if self.positives else torch.empty(0)
        if positives.numel() == 0 or self.num_neg == 0:
            return {f: math.nan for f in self.fprs}
        kept = torch.cat(self.kept) if self.kept else positives.new_empty(0)
        ordered = torch.sort(kept.to(positives.device)).values
        out = {}
        for f, m in self.allowed.items():
            threshold = ordered[m] if m < ordered.numel() else math.inf
            out[f] = float((positives < threshold).sum()) / positives.numel()
        return out
