"""Ranked lists of evaluation queries: per-query results (JSON) and pictures, to inspect failures.

Nothing is ranked or scored here: the evaluator (``processor.evaluate.evaluate_sets`` with
``keep_topk``) already computed each query's AP, first-match rank and top-k gallery list, with
the evaluation's own distances (re-ranked ones under ``TEST.RE_RANKING``), its removal of the
query's same-identity same-camera gallery items and its tie rule (ascending gallery index).
This module chooses queries by those APs and writes them out.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from processor.evaluate import EvalSettings, FeatureSet
from utils.drawing import MATCH_BORDER, MISMATCH_BORDER, render_ranking
from utils.metrics import EvalResult

logger = logging.getLogger(__name__)

SELECT_MODES = ("worst", "best", "random")
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


def write_ranked_lists(
    query: FeatureSet,
    gallery: FeatureSet,
    result: EvalResult,
    out_dir: str,
    settings: EvalSettings,
    *,
    num_queries: int = 20,
    select: str = "worst",
    seed: int = 0,
    tile_size: tuple[int, int] = (256, 128),
) -> dict[str, Any]:
    """Write the ranked lists of selected queries: one PNG each and ``ranked_lists.json``.

    Queries are chosen by the evaluator's per-query AP (:func:`select_queries`). Each PNG shows
    the query tile (blue frame) and its top-k gallery tiles framed green (true match) or red
    (false match), labelled with rank and distance.

    Args:
        query: the evaluated queries (pids, camids, paths are read).
        gallery: the evaluated gallery.
        result: the evaluation of ``query`` against ``gallery``, with top-k lists
            (``keep_topk`` > 0; k is their length).
        out_dir: folder for the PNGs and the JSON (created).
        settings: the evaluation settings (recorded in the JSON).
        num_queries: queries drawn (capped at the valid ones).
        select: 'worst', 'best' or 'random'.
        seed: seed of 'random'.
        tile_size: (H, W) of each tile in the PNGs.

    Returns:
        The ``ranked_lists.json`` content: settings and, per selected query, query_index, path,
        pid, camid, ap, first_match_rank, image (PNG name) and ``ranked`` (rank, gallery_index,
        path, pid, camid, distance, match).

    Raises:
        ValueError: the result holds no top-k lists or does not match the sets' sizes.
    """
    if result.topk_indices is None or result.topk_distances is None:
        raise ValueError("the evaluation result holds no top-k lists: evaluate with keep_topk > 0")
    if result.num_queries != len(query) or result.topk_indices.shape[0] != len(query):
        raise ValueError(
            f"the evaluation result covers {result.num_queries} queries, the query set has "
            f"{len(query)}"
        )
    chosen = select_queries(result.ap, num_queries, select, seed)
    os.makedirs(out_dir, exist_ok=True)
    entries = [
        _write_query(query, gallery, result, int(qi), order, out_dir, tile_size)
        for order, qi in enumerate(chosen)
    ]
    out = {
        "select": select,
        "topk": int(result.topk_indices.shape[1]),
        "feat_norm": bool(settings.feat_norm),
        "re_ranking": settings.rerank is not None,
        "num_queries": len(query),
        "num_gallery": len(gallery),
        "num_valid_queries": int(result.num_valid_queries),
        "queries": entries,
    }
    tmp = os.path.join(out_dir, "ranked_lists.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "ranked_lists.json"))
    logger.info("ranked lists of %d queries (%s AP) written to %s", len(entries), select, out_dir)
    return out


def _write_query(
    query: FeatureSet,
    gallery: FeatureSet,
    result: EvalResult,
    qi: int,
    order: int,
    out_dir: str,
    tile_size: tuple[int, int],
) -> dict[str, Any]:
    """Draw query ``qi`` (the ``order``-th chosen) and return its JSON entry."""
    listed = result.topk_indices[qi] >= 0  # a list shorter than k ends with -1 entries
    gidx = result.topk_indices[qi][listed].tolist()
    dist = result.topk_distances[qi][listed].tolist()
    pid = int(query.pids[qi])
    hits = [
        {
            "rank": r + 1,
            "gallery_index": int(g),
            "path": gallery.paths[g],
            "pid": int(gallery.pids[g]),
            "camid": int(gallery.camids[g]),
            "distance": float(d),
            "match": bool(gallery.pids[g] == pid),
        }
        for r, (g, d) in enumerate(zip(gidx, dist, strict=True))
    ]
    name = f"{order:03d}_q{qi}_{Path(query.paths[qi]).stem}.png"
    borders = [MATCH_BORDER if h["match"] else MISMATCH_BORDER for h in hits]
    image = render_ranking(
        query.paths[qi],
        hits,
        tile_size,
        "distance",
        borders=borders,
        query_label=f"AP {result.ap[qi]:.2f}",
        query_border=_QUERY_BORDER,
    )
    image.save(os.path.join(out_dir, name))
    return {
        "query_index": qi,
        "path": query.paths[qi],
        "pid": pid,
        "camid": int(query.camids[qi]),
        "ap": float(result.ap[qi]),
        "first_match_rank": int(result.first_match_rank[qi]),
        "image": name,
        "ranked": hits,
    }
