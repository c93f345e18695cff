"""Distances and top-k between feature sets, in blocks sized by a memory budget.

The low-level layer under evaluation (``utils.metrics``), re-ranking (``utils.reranking``),
evaluation ranked lists (``processor.ranked_lists``) and search (``tools/search.py``):

* :func:`prepare_features`: checks and (optionally) L2-normalises features, in float32;
* :func:`distance_block` / :func:`distance_chunks`: squared Euclidean (or negated cosine
  similarity) distances of query rows against a gallery, one block of rows at a time;
* :data:`DEFAULT_MEMORY_BUDGET_MB` and :func:`chunk_rows`: the one default working-memory budget
  and the one rule that turns a budget into rows per block;
* :func:`block_topk` / :func:`chunked_topk`: the k smallest distances per row, exact, with the
  project's tie rule (equal distances ranked by ascending gallery index, like a stable sort).

The top-k sorts an int64 key per item, ``float order (high 32 bits) | gallery index (low 32
bits)``: keys are unique, so ``torch.topk`` (not stable itself) gives the stable order, and
the distance is decoded back from the key bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

# Working memory of one block (MiB) when the caller gives none: small next to any GPU or host.
DEFAULT_MEMORY_BUDGET_MB = 512
METRICS = ("euclidean", "cosine")

_MIB = 2**20
# Bytes per (row x gallery item) of a top-k pass: float32 distance copy, int32 bits, int64 key,
# and torch.topk's int64 work space.
_TOPK_BYTES_PER_PAIR = 28
# A key above every real key: marks left-out items and the padding of short lists.
_NO_ITEM = torch.iinfo(torch.int64).max
_LOW_32 = 2**32 - 1


def chunk_rows(memory_budget_mb: float, bytes_per_row: float, max_rows: int | None = None) -> int:
    """Rows per block that fit a working-memory budget.

    Args:
        memory_budget_mb: the budget, MiB.
        bytes_per_row: bytes one row of the block needs (e.g. bytes per pair x columns).
        max_rows: upper bound (the number of rows there are), or None.

    Returns:
        ``floor(budget / bytes_per_row)``, at least 1 and at most ``max_rows``.
    """
    rows = max(1, int(memory_budget_mb * _MIB // max(bytes_per_row, 1)))
    return rows if max_rows is None else max(1, min(rows, int(max_rows)))


def row_groups(costs: np.ndarray, max_cost: float) -> list[tuple[int, int]]:
    """Split rows into consecutive groups whose summed cost stays within ``max_cost``.

    Args:
        costs: float or int [R] cost of each row (e.g. bytes).
        max_cost: budget of one group; a row costing more forms a group on its own.

    Returns:
        ``(start, stop)`` pairs covering ``range(R)`` in order, each of at least one row.
    """
    cum = np.concatenate([[0], np.cumsum(costs, dtype=np.float64)])
    groups, start = [], 0
    while start < len(costs):
        stop = int(np.searchsorted(cum, cum[start] + max_cost, side="right")) - 1
        stop = min(max(stop, start + 1), len(costs))
        groups.append((start, stop))
        start = stop
    return groups


def prepare_features(feats: torch.Tensor, feat_norm: bool, name: str = "feats") -> torch.Tensor:
    """Features as float32, checked finite, optionally L2-normalised per row.

    Args:
        feats: float [N, D] (fp32/fp16/bf16), any device.
        feat_norm: divide each row by its norm (``x / max(|x|, 1e-12)``, as ``F.normalize``).
        name: the argument's name in error messages.

    Returns:
        float32 [N, D] on the same device (a new tensor unless ``feats`` is float32 and no
        normalisation is asked).

    Raises:
        ValueError: ``feats`` is not 2-D or holds NaN or infinite values.
    """
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


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")


def _metric_block(
    metric: str, q: torch.Tensor, g: torch.Tensor, qq, gg, out: torch.Tensor
) -> torch.Tensor:
    if metric == "cosine":
        # The negated similarity ranks like 1 - cos, and negation is exact: callers get the
        # similarity back bit for bit.
        return torch.mm(q, g.t(), out=out).neg_()
    return distance_block(q, g, qq, gg, out)


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


def distance_chunks(
    qf: torch.Tensor, gf: torch.Tensor, rows: int, metric: str = "euclidean"
) -> Iterator[torch.Tensor]:
    """Distances of the query rows against the gallery, one block of rows at a time.

    The yielded tensor is a reused buffer: consume it before asking for the next block.

    Args:
        qf: float32 [Q, D] query features.
        gf: float32 [G, D] gallery features (same device).
        rows: query rows per block (see :func:`chunk_rows`).
        metric: 'euclidean' (squared Euclidean distance) or 'cosine' (negated inner product:
            for L2-normalised features it orders like the cosine distance).

    Returns:
        An iterator of float32 [c, G] blocks covering the queries in order.
    """
    _check_metric(metric)
    rows = max(1, min(int(rows), qf.shape[0]))
    qq, gg = (qf * qf).sum(1), (gf * gf).sum(1)
    buf = torch.empty(rows, gf.shape[0], dtype=torch.float32, device=qf.device)
    for start in range(0, qf.shape[0], rows):
        stop = min(start + rows, qf.shape[0])
        yield _metric_block(metric, qf[start:stop], gf, qq[start:stop], gg, buf[: stop - start])


def float_order_key(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2^32) with the same order.

    ``-0.0`` and ``+0.0`` get the same key; NaN (of either sign) gets one key above ``+inf``,
    so it orders last, as numpy's sort does.

    Args:
        values: float32 tensor, any shape.

    Returns:
        int64 tensor of the same shape.
    """
    bits = (values + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    # Negative floats order backwards as integers: flip their magnitude bits.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    bits = torch.where(torch.isnan(values), 0x7FC00000, bits)
    return bits.to(torch.int64) + 2**31


def _topk_keys(
    block: torch.Tensor,
    k: int,
    col_offset: int = 0,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ``min(k, n)`` smallest keys ``order(distance) << 32 | column`` of each row, sorted."""
    n = block.shape[1]
    key = float_order_key(block).sub_(2**31).mul_(2**32)  # signed: fits int64 with the index
    key += torch.arange(col_offset, col_offset + n, device=block.device)
    if exclude is not None:
        key[exclude[0], exclude[1]] = _NO_ITEM
    return torch.topk(key, min(k, n), dim=1, largest=False, sorted=True).values


def _merge_keys(best: torch.Tensor | None, new: torch.Tensor, k: int) -> torch.Tensor:
    if best is None:
        return new
    keys = torch.cat([best, new], dim=1)
    return torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False, sorted=True).values


def _decode_keys(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances float32 [c, k], indices int64 [c, k]) of sorted keys; padding (inf, -1)."""
    empty = keys == _NO_ITEM
    index = keys & _LOW_32
    bits = torch.div(keys - index, 2**32, rounding_mode="floor")  # the signed order bits
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int32)
    values = bits.view(torch.float32).masked_fill(empty, float("inf"))
    index = index.masked_fill_(empty, -1)
    pad = k - keys.shape[1]
    if pad > 0:
        values = torch.nn.functional.pad(values, (0, pad), value=float("inf"))
        index = torch.nn.functional.pad(index, (0, pad), value=-1)
    return values, index


def block_topk(
    block: torch.Tensor,
    k: int,
    *,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest distances of each row of a block, ties by ascending column index.

    Args:
        block: float32 [c, G] distances (not modified; NaN ranks last).
        k: list length.
        exclude: optional (rows int64 [E], cols int64 [E]): items left out of their row's list
            (e.g. the query's same-identity same-camera gallery items).
        memory_budget_mb: working memory (MiB); rows are processed in groups that fit it.

    Returns:
        (distances float32 [c, k], indices int64 [c, k]), nearest first; a row with fewer than k
        items left is padded with (inf, -1).
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    c, n = block.shape
    rows = chunk_rows(memory_budget_mb, _TOPK_BYTES_PER_PAIR * n, c)
    out_values, out_index = [], []
    for start in range(0, c, rows):
        stop = min(start + rows, c)
        part = None
        if exclude is not None:
            inside = (exclude[0] >= start) & (exclude[0] < stop)
            part = (exclude[0][inside] - start, exclude[1][inside])
        values, index = _decode_keys(_topk_keys(block[start:stop], k, 0, part), k)
        out_values.append(values)
        out_index.append(index)
    return torch.cat(out_values), torch.cat(out_index)


def chunked_topk(
    qf: torch.Tensor,
    gf: torch.Tensor,
    k: int,
    *,
    metric: str = "euclidean",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    gallery_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest gallery items of every query, in memory-bounded blocks, exact.

    Each (query block x gallery chunk) distance block is reduced to its top-k keys and merged
    with the running top-k of the earlier chunks, so memory stays bounded by the budget whatever
    the gallery size; ties are ranked by ascending gallery index.

    Args:
        qf: float [Q, D] query features (float16 or float32; computed in float32).
        gf: float [G, D] gallery features (any device: each chunk is moved to ``qf``'s).
        k: list length; capped at G.
        metric: 'euclidean' (squared Euclidean distance) or 'cosine' (negated inner product;
            pass L2-normalised features).
        memory_budget_mb: working memory (MiB) of one block.
        gallery_chunk: gallery rows per chunk (converted to float32 one chunk at a time), or
            None for the whole gallery at once.

    Returns:
        (distances float32 [Q, k'], indices int64 [Q, k']) with k' = min(k, G), nearest first.
    """
    _check_metric(metric)
    num_g = gf.shape[0]
    k = min(int(k), num_g)
    if k < 1:
        raise ValueError(f"k must be positive and the gallery non-empty (k {k}, G {num_g})")
    cols = num_g if gallery_chunk is None else max(1, min(int(gallery_chunk), num_g))
    rows = chunk_rows(memory_budget_mb, (_TOPK_BYTES_PER_PAIR + 4) * cols, qf.shape[0])
    out_values, out_index = [], []
    for q0 in range(0, qf.shape[0], rows):
        q = qf[q0 : q0 + rows].float()
        qq = (q * q).sum(1)
        buf = torch.empty(q.shape[0] * cols, dtype=torch.float32, device=q.device)
        best = None
        for g0 in range(0, num_g, cols):
            g = gf[g0 : g0 + cols].to(q.device).float()
            out = buf[: q.shape[0] * g.shape[0]].view(q.shape[0], g.shape[0])
            dist = _metric_block(metric, q, g, qq, (g * g).sum(1), out)
            best = _merge_keys(best, _topk_keys(dist, k, g0), k)
        values, index = _decode_keys(best, k)
        out_values.append(values)
        out_index.append(index)
    return torch.cat(out_values), torch.cat(out_index)
