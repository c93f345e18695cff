"""Gallery search at scale: exact ranking vs faiss IVF / HNSW, recall@10 and queries per second.

A synthetic gallery with neighbourhood structure stands in for a model's features: identities
(clusters of about 20 images) around random centres, each image varying along a few directions of
its identity (pose, light: a low-dimensional manifold, as real features are; the directions come
from a pool of random bases, so that no few directions dominate the whole gallery) plus small
isotropic noise; L2-normalised. Queries are gallery images perturbed by noise, so
each has a true neighbourhood (its source first, then look-alikes of its identity). Without such
structure every neighbour is about as far as any other and recall@10 measures nothing.

Compared, all on the same queries with ``--threads`` threads:

* exact: ``tools.search.rank_gallery`` (the search tool's exact ranking: chunked matrix
  products and top-k, float32), which also gives the true top-10;
* ivf: ``utils.ann`` IVF-Flat (``sqrt(N)`` cells by default), for each ``--nprobe``;
* hnsw: ``utils.ann`` HNSW-Flat (``--hnsw-m``, ``--ef-construction``), for each ``--ef-search``.

recall@10 is the share of the exact top-10 found in the approximate top-10, averaged over the
queries; queries/s is the best of ``--repeats`` timed passes over all queries (one batch call).

Usage (from the repository root):
    python -m benchmarks.search_scale --num-gallery 1000000 --kinds ivf
    python -m benchmarks.search_scale --num-gallery 200000 --kinds ivf hnsw
    python -m benchmarks.search_scale --small
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from tools.search import rank_gallery
from utils.ann import ANN_KINDS, AnnParams, ann_search, build_ann, default_nlist, import_faiss
from utils.cli import make_parser, parse_args, run_main
from utils.logger import setup_logger

logger = logging.getLogger(__name__)

# Rows generated at once (bounds the temporary memory of the generator).
GEN_CHUNK = 65536


def make_gallery(
    num_gallery: int,
    num_queries: int,
    dim: int,
    per_id: int = 20,
    latent: int = 8,
    bases: int = 64,
    centre_rank: int = 64,
    spread: float = 0.15,
    noise: float = 0.01,
    query_noise: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A clustered, L2-normalised synthetic gallery and queries perturbed from it.

    Args:
        num_gallery: N gallery rows.
        num_queries: Q queries.
        dim: feature size D.
        per_id: mean images per identity (N / per_id identity centres).
        latent: directions of within-identity variation.
        bases: random bases of those directions; identity i uses basis ``i % bases``.
        centre_rank: identity centres lie in a random subspace of this dimension (features of
            trained models have a low effective rank); 0 draws them in all D dimensions.
        spread: scale of the within-identity variation.
        noise: per-coordinate isotropic noise of each image.
        query_noise: per-coordinate noise added to a gallery image to make a query.
        seed: generator seed.

    Returns:
        (gallery float32 [N, D], queries float32 [Q, D]: unit rows; gallery identities int [N],
        query identities int [Q]).
    """
    rng = np.random.default_rng(seed)
    num_ids = max(1, num_gallery // per_id)
    if centre_rank:
        span = np.linalg.qr(rng.standard_normal((dim, centre_rank)))[0].T.astype(np.float32)
        u = rng.standard_normal((num_ids, centre_rank), dtype=np.float32)
        centres = (u / math.sqrt(centre_rank)) @ span
    else:
        centres = rng.standard_normal((num_ids, dim), dtype=np.float32) / math.sqrt(dim)
    basis = rng.standard_normal((bases, latent, dim), dtype=np.float32) / math.sqrt(dim)
    gallery = np.empty((num_gallery, dim), dtype=np.float32)
    gallery_ids = np.empty(num_gallery, dtype=np.int64)
    for start in range(0, num_gallery, GEN_CHUNK):
        n = min(GEN_CHUNK, num_gallery - start)
        ids = rng.integers(num_ids, size=n)
        gallery_ids[start : start + n] = ids
        z = rng.standard_normal((n, latent), dtype=np.float32)
        x = centres[ids]
        for b in range(bases):
            rows = np.flatnonzero(ids % bases == b)
            x[rows] += spread * (z[rows] @ basis[b])
        x += noise * rng.standard_normal((n, dim), dtype=np.float32)
        gallery[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    rows = rng.choice(num_gallery, size=num_queries, replace=False)
    q = gallery[rows] + query_noise * rng.standard_normal((num_queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return gallery, q, gallery_ids, gallery_ids[rows]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k present in its found top-k.

    Args:
        found: int [Q, k] approximate results (-1 for none).
        truth: int [Q, k] exact results.

    Returns:
        recall@k in [0, 1].
    """
    k = truth.shape[1]
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / k


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(args) -> list[dict]:
    """Build the gallery, time exact search and each approximate setting; log a table.

    Args:
        args: parsed arguments.

    Returns:
        One row per method and setting: method, setting, build_s, qps, speedup, recall10.
    """
    torch.set_num_threads(args.threads)
    import_faiss().omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    g, q, g_ids, q_ids = make_gallery(
        args.num_gallery, args.num_queries, args.dim, centre_rank=args.centre_rank, seed=args.seed
    )
    logger.info(
        "gallery %d x %d, %d queries generated in %.1f s",
        *g.shape,
        len(q),
        time.perf_counter() - t0,
    )
    gt, qt = torch.from_numpy(g), torch.from_numpy(q)
    k = 10
    secs, (_, exact) = _best_time(lambda: rank_gallery(qt, gt, k, "cosine"), args.repeats)
    truth = exact.numpy()
    exact_qps = len(q) / secs
    logger.info(
        "exact: %.0f q/s; %.2f of the exact top-10 are images of the query's identity",
        exact_qps,
        (g_ids[truth] == q_ids[:, None]).sum(1).mean(),
    )
    rows = [
        {"method": "exact", "setting": "", "build_s": 0.0, "qps": exact_qps, "speedup": 1.0,
         "recall10": recall_at_k(truth, truth)}
    ]  # fmt: skip
    for kind in args.kinds:
        params = AnnParams(
            hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, nlist=args.nlist
        )
        t0 = time.perf_counter()
        index = build_ann(g, kind, "cosine", params)
        build_s = time.perf_counter() - t0
        if kind == "ivf":
            settings = [("nprobe", v) for v in args.nprobe]
        else:
            settings = [("ef_search", v) for v in args.ef_search]
        for name, value in settings:
            if name == "nprobe":
                index.nprobe = value
            else:
                index.hnsw.efSearch = value
            secs, (_, found) = _best_time(lambda i=index: ann_search(i, qt, k), args.repeats)
            qps = len(q) / secs
            rows.append(
                {"method": kind, "setting": f"{name}={value}", "build_s": build_s, "qps": qps,
                 "speedup": qps / exact_qps, "recall10": recall_at_k(found.numpy(), truth)}
            )  # fmt: skip
            logger.info("%s %s: %.0f q/s, recall@10 %.4f", kind, rows[-1]["setting"], qps,
                        rows[-1]["recall10"])  # fmt: skip
    return rows


def format_table(rows: Sequence[dict], n: int, dim: int, num_queries: int, nlist: int) -> str:
    """Markdown table of :func:`run`'s rows.

    Args:
        rows: the rows.
        n: gallery size.
        dim: feature size.
        num_queries: queries timed.
        nlist: IVF cells used.

    Returns:
        The table, one line per row, preceded by a header line naming the sizes.
    """
    lines = [
        f"gallery {n:,} x {dim}, {num_queries:,} queries, top-10; IVF cells {nlist}",
        "",
        "| method | setting | build (s) | queries/s | speed-up vs exact | recall@10 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['build_s']:.1f} | {r['qps']:,.0f} | "
            f"{r['speedup']:.1f}x | {r['recall10']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark and print the table.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The table rows.
    """
    parser = make_parser(
        __doc__.split("\n\n")[0], prog="python -m benchmarks.search_scale", config=None,
        overrides=False,
    )  # fmt: skip
    parser.add_argument("--num-gallery", type=int, default=1_000_000, help="gallery size N")
    parser.add_argument("--num-queries", type=int, default=1000, help="queries Q")
    parser.add_argument("--dim", type=int, default=512, help="feature size D")
    parser.add_argument(
        "--centre-rank",
        type=int,
        default=64,
        help="dimension of the subspace of the identity centres (0: all D, the hardest case)",
    )
    parser.add_argument("--kinds", nargs="+", choices=ANN_KINDS, default=list(ANN_KINDS))
    parser.add_argument("--nlist", type=int, default=0, help="IVF cells (0: sqrt(N))")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    parser.add_argument("--ef-construction", type=int, default=80, help="HNSW build candidates")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (best kept)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--small", action="store_true", help="quick check: 20,000 x 128")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args, _ = parse_args(parser, argv, overrides=False)
    if args.small:
        args.num_gallery, args.dim, args.num_queries = 20_000, 128, 200
    setup_logger(None)
    rows = run(args)
    nlist = args.nlist or default_nlist(args.num_gallery)
    print(format_table(rows, args.num_gallery, args.dim, args.num_queries, nlist))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    run_main(main)
