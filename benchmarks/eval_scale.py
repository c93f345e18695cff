"""Evaluation and re-ranking at dataset scale: time and peak memory, ours vs a dense reference.

Synthetic features with identity and camera structure stand in for a model's output (per-identity
centres, per-camera offsets, noise; query identities shared with the gallery; distractor
identities that only appear in the gallery). Each variant runs in its own subprocess so that peak
memory (the process's resident-set high-water mark) is measured separately:

* floor: the query x gallery distance products alone, in the same blocks as ours (normalise +
  matrix products, nothing kept): the time no exact evaluator can beat;
* ours: ``utils.metrics.evaluate_features`` (chunked, exact);
* dense: the official approach, a dense Q x G distance matrix then ``eval_func`` (full argsort
  and match matrix); when it would not fit in memory it runs on a subset of the queries and the
  full-set time is extrapolated linearly (reported as such);
* ours_rerank: ``evaluate_features(..., rerank=RerankParams(k1, k2, lambda))``, sparse;
* dense_rerank: a dense numpy rendering of the official re-ranking algorithm ((Q+G)^2 arrays,
  float16 V), then ``eval_func``; skipped when it would not fit;
* interleaved: floor and ours alternately in one process, best of each: on a shared machine this
  ratio is steadier than that of two separate processes run at different times;
* ours_roc: ours plus the verification ROC (``TEST.ROC``: TPR at FPR 1e-4 / 1e-3 / 1e-2).

Usage (from the repository root):
    python -m benchmarks.eval_scale --sizes market msmt17
    python -m benchmarks.eval_scale --small
    python -m benchmarks.eval_scale --sizes market --variants floor ours dense --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from utils.cli import make_parser, parse_args, run_main
from utils.distance import (
    DEFAULT_MEMORY_BUDGET_MB,
    distance_chunks,
    squared_euclidean_distance,
)
from utils.metrics import block_rows, eval_func, evaluate_features
from utils.reranking import RerankParams
from utils.roc import ROC_FPRS, tpr_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (queries, gallery, identities in query and gallery, gallery-only distractor ids, cameras)
SIZES = {
    "small": (600, 3000, 150, 300, 6),
    "market": (3368, 15913, 750, 2000, 6),
    "msmt17": (11659, 82161, 3060, 8000, 15),
}
VARIANTS = ("floor", "ours", "dense", "ours_rerank", "dense_rerank", "interleaved", "ours_roc")
DENSE_BYTES_PER_PAIR = 25  # float32 distances, int64 argsort, int64 gathered pids, int32 matches
# Dense re-ranking: float32 distances (two alive), argsort int64 then int32, float16 V and V_qe.
DENSE_RERANK_BYTES_PER_PAIR = 4 + 4 + 8 + 4 + 2 + 2


def make_features(name: str, dim: int, seed: int = 0):
    """Synthetic query/gallery features with identity and camera structure.

    Identity centres are grouped in look-alike families (hard negatives); each image adds a
    camera offset and Gaussian noise of an image-dependent strength (easy and hard images). With
    the constants below the plain-distance mAP is about 0.8 - 0.9, like a trained ReID model.

    Args:
        name: a key of SIZES.
        dim: feature size.
        seed: generator seed.

    Returns:
        (qf float32 [Q, D], gf float32 [G, D], q_pids, g_pids, q_camids, g_camids).
    """
    num_q, num_g, num_ids, num_distractor_ids, num_cams = SIZES[name]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    total_ids = num_ids + num_distractor_ids
    num_families = max(1, total_ids // 10)
    families = F.normalize(torch.randn(num_families, dim, generator=gen), dim=1)
    family_of = torch.randint(0, num_families, (total_ids,), generator=gen)
    own = F.normalize(torch.randn(total_ids, dim, generator=gen), dim=1)
    centres = F.normalize(1.3 * families[family_of] + own, dim=1)
    cam_offsets = F.normalize(torch.randn(num_cams, dim, generator=gen), dim=1)
    q_pids = rng.integers(0, num_ids, num_q)
    # About 15% of the gallery are distractor identities that no query shares.
    is_distractor = rng.random(num_g) < 0.15
    g_pids = np.where(
        is_distractor,
        rng.integers(num_ids, total_ids, num_g),
        rng.integers(0, num_ids, num_g),
    )
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)

    def fill(pids, camids):
        out = torch.empty(len(pids), dim)
        for start in range(0, len(pids), 4096):  # in blocks: no full-size noise temporary
            p = torch.from_numpy(pids[start : start + 4096])
            c = torch.from_numpy(camids[start : start + 4096])
            strength = torch.exp(0.45 * torch.randn(len(p), 1, generator=gen))
            noise = torch.randn(len(p), dim, generator=gen) * (strength / dim**0.5)
            out[start : start + len(p)] = centres[p] + 0.45 * cam_offsets[c] + noise
        return out

    return fill(q_pids, q_camids), fill(g_pids, g_camids), q_pids, g_pids, q_camids, g_camids


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc), so the baseline is not inflated by
    the feature generator's temporaries."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux), so the peak covers the measured work."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _available_mb() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def dense_rerank_reference(qf: np.ndarray, gf: np.ndarray, k1: int, k2: int, lam: float):
    """Dense k-reciprocal re-ranking laid out like the official utility ((Q+G)^2 arrays).

    Args:
        qf: float32 [Q, D] query features.
        gf: float32 [G, D] gallery features.
        k1: k-reciprocal neighbourhood size.
        k2: local query expansion size.
        lam: weight of the original distance.

    Returns:
        float32 [Q, G] re-ranked distances.
    """
    num_q = len(qf)
    x = torch.from_numpy(np.concatenate([qf, gf]))
    sq = (x * x).sum(1)
    dist = (sq[:, None] + sq[None, :]).addmm_(x, x.t(), alpha=-2.0).numpy()
    del x
    n = dist.shape[0]
    original = np.transpose(dist / np.max(dist, axis=0))
    del dist
    weights = np.zeros_like(original, dtype=np.float16)
    ranking = np.argsort(original).astype(np.int32)
    half = int(np.around(k1 / 2))
    for i in range(n):
        fwd = ranking[i, : k1 + 1]
        core = fwd[np.where(ranking[fwd, : k1 + 1] == i)[0]]
        expanded = core
        for cand in core:
            cand_fwd = ranking[cand, : half + 1]
            cand_core = cand_fwd[np.where(ranking[cand_fwd, : half + 1] == cand)[0]]
            if len(np.intersect1d(cand_core, core)) > 2 / 3 * len(cand_core):
                expanded = np.append(expanded, cand_core)
        expanded = np.unique(expanded)
        w = np.exp(-original[i, expanded])
        weights[i, expanded] = w / np.sum(w)
    original = original[:num_q]
    if k2 != 1:
        expanded_weights = np.zeros_like(weights, dtype=np.float16)
        for i in range(n):
            expanded_weights[i] = np.mean(weights[ranking[i, :k2], :], axis=0)
        weights = expanded_weights
        del expanded_weights
    del ranking
    columns = [np.where(weights[:, j] != 0)[0] for j in range(n)]
    jaccard = np.zeros_like(original, dtype=np.float16)
    for i in range(num_q):
        shared = np.zeros((1, n), dtype=np.float16)
        nonzero = np.where(weights[i] != 0)[0]
        for k in nonzero:
            rows = columns[k]
            shared[0, rows] += np.minimum(weights[i, k], weights[rows, k])
        jaccard[i] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lam) + original * lam
    return final[:, num_q:]


def _run_once(variant, qf, gf, q_pids, g_pids, q_camids, g_camids, memory_mb, rerank) -> dict:
    """The timed work of one variant; returns its metrics."""
    if variant == "floor":
        q, g = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
        checksum = 0.0
        for block in distance_chunks(q, g, block_rows(len(g), memory_mb)):
            checksum += float(block[0, 0])  # touch each block
        return {"checksum": checksum}
    if variant in ("ours", "ours_rerank", "ours_roc"):
        result = evaluate_features(
            qf,
            gf,
            q_pids,
            g_pids,
            q_camids,
            g_camids,
            memory_budget_mb=memory_mb,
            rerank=rerank if variant == "ours_rerank" else None,
            roc_fprs=ROC_FPRS if variant == "ours_roc" else (),
        )
        return {
            "mAP": result.mAP,
            "rank1": result.rank(1),
            "mINP": result.mINP,
            **tpr_summary(result.tpr_at_fpr),
        }
    if variant == "dense":
        q, g = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
        distmat = squared_euclidean_distance(q, g).numpy()
        cmc, m_ap = eval_func(distmat, q_pids, g_pids, q_camids, g_camids)
        return {"mAP": m_ap, "rank1": float(cmc[0])}
    if variant == "dense_rerank":
        q, g = F.normalize(qf, dim=1).numpy(), F.normalize(gf, dim=1).numpy()
        distmat = dense_rerank_reference(q, g, rerank.k1, rerank.k2, rerank.lambda_value)
        cmc, m_ap = eval_func(distmat, q_pids, g_pids, q_camids, g_camids)
        return {"mAP": m_ap, "rank1": float(cmc[0])}
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def run_variant(
    variant: str,
    name: str,
    dim: int,
    memory_mb: float,
    rerank: RerankParams,
    dense_queries: int | None,
    repeat: int = 3,
) -> dict:
    """Run one variant in this process; returns time, memory and metrics.

    floor, ours and dense are timed ``repeat`` times (best reported); re-ranking once.
    """
    qf, gf, q_pids, g_pids, q_camids, g_camids = make_features(name, dim)
    if dense_queries is not None:
        qf, q_pids, q_camids = qf[:dense_queries], q_pids[:dense_queries], q_camids[:dense_queries]
    gc.collect()
    _release_free_memory()
    base_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    out: dict = {"variant": variant, "size": name, "queries": len(qf), "gallery": len(gf)}
    # The 1-minute load average: other processes on the machine slow every variant down.
    out["load_before"] = os.getloadavg()[0]
    if variant == "interleaved":
        pair: dict[str, list[float]] = {"floor": [], "ours": []}
        for _ in range(repeat):
            for name_ in pair:
                start = time.perf_counter()
                _run_once(name_, qf, gf, q_pids, g_pids, q_camids, g_camids, memory_mb, rerank)
                pair[name_].append(time.perf_counter() - start)
                gc.collect()
        out["floor_s"], out["ours_s"] = min(pair["floor"]), min(pair["ours"])
        out["ratio"] = out["ours_s"] / out["floor_s"]
        out["time_s"], out["times_s"] = out["ours_s"], pair
        out["load_after"] = os.getloadavg()[0]
        out["peak_mb"] = out["base_mb"] = 0.0  # not a memory measurement
        return out
    times = []
    for _ in range(repeat if variant in ("floor", "ours", "dense", "ours_roc") else 1):
        start = time.perf_counter()
        out.update(
            _run_once(variant, qf, gf, q_pids, g_pids, q_camids, g_camids, memory_mb, rerank)
        )
        times.append(time.perf_counter() - start)
        gc.collect()
    # Best of the repeats (as timeit does): the machine is shared, slower runs measure others.
    out["time_s"], out["times_s"] = min(times), times
    out["load_after"] = os.getloadavg()[0]
    peak_kb = _status_kb("VmHWM") if reset else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_mb"] = peak_kb / 1024
    out["base_mb"] = (base_kb or 0) / 1024
    out["threads"] = torch.get_num_threads()
    return out


def _dense_plan(
    variant: str, name: str, dense_fraction: float | None
) -> tuple[bool, int | None, str]:
    """Whether a dense variant fits in memory; else a query subset (or a skip) and why."""
    num_q, num_g = SIZES[name][:2]
    available = _available_mb()
    if variant == "dense":
        need = num_q * num_g * DENSE_BYTES_PER_PAIR / 2**20
        if dense_fraction is None and need < 0.7 * available:
            return True, None, ""
        fraction = dense_fraction or 0.7 * available / need / 2
        subset = max(1, int(num_q * min(fraction, 1.0)))
        return (
            True,
            subset,
            (
                f"dense needs about {need / 1024:.1f} GB, {available / 1024:.1f} GB available: "
                f"timed on {subset} of {num_q} queries and extrapolated"
            ),
        )
    n = num_q + num_g
    need = n * n * DENSE_RERANK_BYTES_PER_PAIR / 2**20
    if need < 0.7 * available:
        return True, None, ""
    return (
        False,
        None,
        (
            f"dense re-ranking needs about {need / 1024:.0f} GB ((Q+G)^2 arrays), "
            f"{available / 1024:.1f} GB available: skipped"
        ),
    )


def _parser() -> argparse.ArgumentParser:
    parser = make_parser(
        __doc__.split("\n\n")[0],
        prog="python -m benchmarks.eval_scale",
        config=None,
        overrides=False,
    )
    parser.add_argument("--sizes", nargs="+", default=["market"], choices=sorted(SIZES))
    parser.add_argument("--small", action="store_true", help="quick run on the small size only")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dim", type=int, default=1280, help="feature size (CLIP-ReID ViT: 1280)")
    parser.add_argument(
        "--memory-mb",
        type=float,
        default=float(DEFAULT_MEMORY_BUDGET_MB),
        help="evaluator budget (MiB)",
    )
    parser.add_argument("--k1", type=int, default=50, help="re-ranking k1 (official processor)")
    parser.add_argument("--k2", type=int, default=15, help="re-ranking k2 (official processor)")
    parser.add_argument("--lambda-value", type=float, default=0.3)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--dense-fraction",
        type=float,
        default=None,
        help="run the dense reference on this fraction of the queries",
    )
    parser.add_argument("--json", default="", help="append the results to this JSON file")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dense-queries", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _run_in_subprocess(args: argparse.Namespace, variant: str, name: str) -> dict:
    """Run one variant in a worker process (its own peak memory); returns its result."""
    cmd = [sys.executable, "-m", "benchmarks.eval_scale", "--worker", variant, "--sizes", name]
    for flag in ("dim", "memory_mb", "k1", "k2", "lambda_value", "threads", "repeat"):
        cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    note = ""
    if variant.startswith("dense"):
        fits, subset, note = _dense_plan(variant, name, args.dense_fraction)
        if not fits:
            print(f"[{name}] {variant}: {note}", flush=True)
            return {"variant": variant, "size": name, "skipped": note}
        if subset is not None:
            cmd += ["--dense-queries", str(subset)]
    print(f"[{name}] {variant} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        print(f"[{name}] {variant} failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"variant": variant, "size": name, "failed": tail}
    out = json.loads(lines[-1][len("RESULT ") :])
    if note:
        out["note"] = note
        out["measured_time_s"] = out["time_s"]
        out["time_s"] = out["time_s"] * SIZES[name][0] / out["queries"]
        out["extrapolated"] = True
    print(f"[{name}] {variant}: {json.dumps(out)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the requested sizes and variants, print a table, optionally write JSON."""
    args, _ = parse_args(_parser(), argv, overrides=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    rerank = RerankParams(args.k1, args.k2, args.lambda_value)
    if args.worker:
        out = run_variant(
            args.worker,
            args.sizes[0],
            args.dim,
            args.memory_mb,
            rerank,
            args.dense_queries,
            args.repeat,
        )
        print("RESULT " + json.dumps(out))
        return [out]
    sizes = ["small"] if args.small else args.sizes
    results = [_run_in_subprocess(args, v, name) for name in sizes for v in args.variants]
    print_table(results)
    if args.json:
        previous = []
        if os.path.exists(args.json):
            with open(args.json, encoding="utf-8") as f:
                previous = json.load(f)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(previous + results, f, indent=1)
    return results


def _pct(result: dict, key: str) -> str:
    return f"{100 * result[key]:.2f}" if key in result else "-"


def print_table(results: list[dict]) -> None:
    """Side-by-side summary, then the ratios the targets are about."""
    header = (
        f"{'size':8} {'variant':13} {'time s':>9} {'peak GB':>8} {'base GB':>8} "
        f"{'mAP':>7} {'R1':>7} {'mINP':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "time_s" not in r:
            print(f"{r['size']:8} {r['variant']:13} {r.get('skipped') or 'failed'}")
            continue
        if r["variant"] == "interleaved":
            print(
                f"{r['size']:8} {r['variant']:13} floor {r['floor_s']:.2f} s, "
                f"ours {r['ours_s']:.2f} s (best of each, same process)"
            )
            continue
        time_s = f"{r['time_s']:.1f}" + ("*" if r.get("extrapolated") else "")
        print(
            f"{r['size']:8} {r['variant']:13} {time_s:>9} {r['peak_mb'] / 1024:8.2f} "
            f"{r['base_mb'] / 1024:8.2f} {_pct(r, 'mAP'):>7} {_pct(r, 'rank1'):>7} "
            f"{_pct(r, 'mINP'):>7}"
        )
    print("peak: whole-process resident-set high-water mark during the work;")
    print("base: resident set before it (interpreter, torch, features)")
    if any(r.get("extrapolated") for r in results):
        print("* extrapolated from a query subset; its peak memory is that of the subset")
    by_key = {(r["size"], r["variant"]): r for r in results if "time_s" in r}
    for name in dict.fromkeys(r["size"] for r in results):
        ours, floor = by_key.get((name, "ours")), by_key.get((name, "floor"))
        dense = by_key.get((name, "dense"))
        if ours and floor:
            print(f"[{name}] ours / floor time: {ours['time_s'] / floor['time_s']:.2f}")
        if ours and dense:
            print(f"[{name}] dense / ours time: {dense['time_s'] / ours['time_s']:.1f}")
        inter = by_key.get((name, "interleaved"))
        if inter:
            print(
                f"[{name}] interleaved in one process: floor {inter['floor_s']:.2f} s, "
                f"ours {inter['ours_s']:.2f} s, ours / floor {inter['ratio']:.2f}"
            )
        rr, drr = by_key.get((name, "ours_rerank")), by_key.get((name, "dense_rerank"))
        if rr and drr:
            print(f"[{name}] dense / ours re-ranking time: {drr['time_s'] / rr['time_s']:.1f}")


if __name__ == "__main__":
    run_main(main)
