"""Ranked lists of evaluation queries: per-query results (JSON) and pictures, to inspect failures.

The ranking follows the evaluator exactly (``utils.metrics.evaluate_features``): squared
Euclidean distances of (optionally L2-normalised) features, computed by the same chunked
routine, gallery items of the query's identity AND camera removed, ties ranked by ascending
gallery index. Re-ranking is not applied.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.distance import distance_chunks
from utils.metrics import ArrayLike, evaluate_features
from utils.visualize import MATCH_BORDER, MISMATCH_BORDER, render_ranking

logger = logging.getLogger(__name__)

SELECT_MODES = ("worst", "best", "random")
# Bytes per (selected query x gallery) pair while ranking: distance, sorted copy, sort index,
# removal mask.
_RANK_BYTES_PER_PAIR = 4 + 4 + 8 + 1
# A neutral blue frames the query tile: green and red mean true and false matches here.
_QUERY_BORDER = (40, 90, 200)


def select_queries(ap: np.ndarray, num_queries: int, select: str, seed: int = 0) -> np.ndarray:
    """Choose queries to draw by their per-query AP; queries without a true match are skipped.

    Args:
        ap: float [Q] per-query AP (NaN for queries without a true match).
        num_queries: how many to choose (capped at the number of valid queries).
        select: 'worst' (lowest AP first), 'best' (highest first) or 'random'.
        seed: random seed of 'random'.

    Returns:
        int64 [n] query indices, in drawing order (ties in AP by ascending query index;
        'random': ascending query index).
    """
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {list(SELECT_MODES)}, got {select!r}")
    ap = np.asarray(ap, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(ap))
    n = max(0, min(int(num_queries), len(valid)))
    if select == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(valid, size=n, replace=False)).astype(np.int64)
    key = ap[valid] if select == "worst" else -ap[valid]
    return valid[np.argsort(key, kind="stable")[:n]].astype(np.int64)


def rank_topk(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    topk: int,
    memory_budget_mb: float = 256,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k gallery items per query under the Market protocol, in memory-bounded chunks.

    Args:
        qf: float32 [Q, D] query features (already normalised if wanted).
        gf: float32 [G, D] gallery features, same device.
        q_pids: int [Q] query identities.
        g_pids: int [G] gallery identities.
        q_camids: int [Q] query cameras.
        g_camids: int [G] gallery cameras.
        topk: k.
        memory_budget_mb: working memory of one chunk (MiB).

    Returns:
        Per query: (gallery indices int64 [k'], distances float32 [k']), nearest first, with
        k' = min(k, items left after removing the query's same-identity same-camera items).
    """
    device = qf.device
    gp = torch.as_tensor(np.asarray(g_pids, dtype=np.int64), device=device)
    gc = torch.as_tensor(np.asarray(g_camids, dtype=np.int64), device=device)
    qp = torch.as_tensor(np.asarray(q_pids, dtype=np.int64), device=device)
    qc = torch.as_tensor(np.asarray(q_camids, dtype=np.int64), device=device)
    rows = max(1, int(memory_budget_mb * 2**20 // (_RANK_BYTES_PER_PAIR * max(gf.shape[0], 1))))
    out: list[tuple[np.ndarray, np.ndarray]] = []
    start = 0
    for block in distance_chunks(qf, gf, rows):
        stop = start + block.shape[0]
        removed = (gp[None, :] == qp[start:stop, None]) & (gc[None, :] == qc[start:stop, None])
        # Removed items go last; a stable sort ranks equal distances by gallery index, as the
        # evaluator does.
        dist = block.masked_fill(removed, float("inf"))
        values, order = torch.sort(dist, dim=1, stable=True)
        kept = (~removed).sum(1)
        for r in range(block.shape[0]):
            k = min(int(topk), int(kept[r]))
            out.append((order[r, :k].cpu().numpy(), values[r, :k].cpu().numpy()))
        start = stop
    return out


def write_ranked_lists(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    q_paths: list[str],
    g_paths: list[str],
    out_dir: str,
    *,
    topk: int = 10,
    num_queries: int = 20,
    select: str = "worst",
    feat_norm: bool = True,
    seed: int = 0,
    tile_size: tuple[int, int] = (256, 128),
    memory_budget_mb: float = 256,
) -> dict[str, Any]:
    """Write the ranked lists of selected queries: one PNG each and ``ranked_lists.json``.

    Queries are chosen by their per-query AP (:func:`select_queries`), computed by
    ``utils.metrics.evaluate_features`` with the same settings. Each PNG shows the query tile
    (blue frame) and its top-k gallery tiles framed green (true match) or red (false match),
    labelled with rank and distance.

    Args:
        qf: float [Q, D] query features.
        gf: float [G, D] gallery features (same device).
        q_pids: int [Q] query identities.
        g_pids: int [G] gallery identities.
        q_camids: int [Q] query cameras.
        g_camids: int [G] gallery cameras.
        q_paths: Q query image files.
        g_paths: G gallery image files.
        out_dir: folder for the PNGs and the JSON (created).
        topk: gallery items per query.
        num_queries: queries drawn (capped at the valid ones).
        select: 'worst', 'best' or 'random'.
        feat_norm: L2-normalise the features first (``TEST.FEAT_NORM``).
        seed: seed of 'random'.
        tile_size: (H, W) of each tile in the PNGs.
        memory_budget_mb: working memory of one distance chunk (MiB).

    Returns:
        The ``ranked_lists.json`` content: settings and, per selected query, query_index, path,
        pid, camid, ap, first_match_rank, image (PNG name) and ``ranked`` (rank, gallery_index,
        path, pid, camid, distance, match).
    """
    if topk < 1:
        raise ValueError(f"topk must be positive, got {topk}")
    if len(q_paths) != qf.shape[0] or len(g_paths) != gf.shape[0]:
        raise ValueError(
            f"{len(q_paths)} query paths for {qf.shape[0]} features, "
            f"{len(g_paths)} gallery paths for {gf.shape[0]}"
        )
    result = evaluate_features(
        qf,
        gf,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank=1,
        feat_norm=feat_norm,
        memory_budget_mb=memory_budget_mb,
        show_progress=False,
    )
    chosen = select_queries(result.ap, num_queries, select, seed)
    q_pids_np, g_pids_np = np.asarray(q_pids).astype(np.int64), np.asarray(g_pids).astype(np.int64)
    q_cams_np = np.asarray(q_camids).astype(np.int64)
    g_cams_np = np.asarray(g_camids).astype(np.int64)
    qf, gf = qf.detach().float(), gf.detach().float()
    if feat_norm:
        # Same arithmetic as the evaluator (x / max(|x|, eps)), so the distances are identical.
        qf = torch.nn.functional.normalize(qf, dim=1)
        gf = torch.nn.functional.normalize(gf, dim=1)
    sel = torch.as_tensor(chosen, device=qf.device)
    ranked = rank_topk(
        qf[sel],
        gf,
        q_pids_np[chosen],
        g_pids_np,
        q_cams_np[chosen],
        g_cams_np,
        topk,
        memory_budget_mb,
    )
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    for order, (qi, (gidx, dist)) in enumerate(zip(chosen.tolist(), ranked, strict=True)):
        hits = [
            {
                "rank": r + 1,
                "gallery_index": int(g),
                "path": g_paths[g],
                "pid": int(g_pids_np[g]),
                "camid": int(g_cams_np[g]),
                "distance": float(d),
                "match": bool(g_pids_np[g] == q_pids_np[qi]),
            }
            for r, (g, d) in enumerate(zip(gidx.tolist(), dist.tolist(), strict=True))
        ]
        name = f"{order:03d}_q{qi}_{Path(q_paths[qi]).stem}.png"
        borders = [MATCH_BORDER if h["match"] else MISMATCH_BORDER for h in hits]
        image = render_ranking(
            q_paths[qi],
            hits,
            tile_size,
            "distance",
            borders=borders,
            query_label=f"AP {result.ap[qi]:.2f}",
            query_border=_QUERY_BORDER,
        )
        image.save(os.path.join(out_dir, name))
        entries.append(
            {
                "query_index": qi,
                "path": q_paths[qi],
                "pid": int(q_pids_np[qi]),
                "camid": int(q_cams_np[qi]),
                "ap": float(result.ap[qi]),
                "first_match_rank": int(result.first_match_rank[qi]),
                "image": name,
                "ranked": hits,
            }
        )
    out = {
        "select": select,
        "topk": int(topk),
        "feat_norm": bool(feat_norm),
        "num_queries": int(qf.shape[0]),
        "num_gallery": int(gf.shape[0]),
        "num_valid_queries": int(result.num_valid_queries),
        "queries": entries,
    }
    tmp = os.path.join(out_dir, "ranked_lists.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "ranked_lists.json"))
    logger.info("ranked lists of %d queries (%s AP) written to %s", len(entries), select, out_dir)
    return out
