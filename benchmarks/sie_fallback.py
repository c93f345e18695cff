"""What a camera-SIE model loses without camera ids: true ids vs the SIE fallbacks, measured.

Trains small camera-SIE models (``MODEL.SIE_CAMERA True``) with the demo recipe
(``configs/demo/clipreid_tiny.yml``, by default as the one-stage baseline) on the synthetic
person data (each synthetic camera has its own viewpoint, colour cast, blur and background), and,
as the reference, the same recipe without SIE. Each SIE model's test set is then evaluated
three ways:

* true ids: the camera ids of the images, as ``test_clipreid.py`` does;
* mean: no ids, ``TEST.SIE_FALLBACK 'mean'`` (the mean SIE vector; the default);
* none: no ids, ``TEST.SIE_FALLBACK 'none'`` (no SIE vector, as the official code without ids).

Usage (from the repository root; about 4 minutes per run on a 2-core CPU, two runs per seed)::

    python -m benchmarks.sie_fallback --root /tmp/sie_fallback --seeds 0 1 2

The runs are tiny (a test-size ViT from random weights), so the absolute numbers say little about
real models; the differences between the columns are the measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

import train_clipreid
from configs.config import load_cfg
from datasets.build import build_dataloaders
from model.loading import build_model_from_checkpoint
from processor.evaluate import (
    build_eval_settings,
    evaluate_trials,
    extract_features,
    summarize_trials,
)
from processor.extractor import run_weights
from utils.cli import make_parser, parse_args, run_main

logger = logging.getLogger(__name__)

# The recipe: the demo's tiny random-init ViT on the synthetic person data (128 x 64 pixels,
# 32 training identities, 4 cameras, 120 epochs).
DEMO_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs",
    "demo",
    "clipreid_tiny.yml",
)
# (column, pass the camera ids, fallback for missing ids)
WAYS = (("true ids", True, "none"), ("mean", False, "mean"), ("none", False, "none"))


def run_opts(root: str, out: str, seed: int, method: str, sie: bool, sie_coe: float) -> list[str]:
    """Overrides of one run of the demo recipe (``DEMO_CONFIG``) on the CPU.

    Args:
        root: DATASETS.ROOT_DIR (the synthetic set is generated there once).
        out: OUTPUT_DIR.
        seed: SOLVER.SEED.
        method: MODEL.METHOD ('baseline': one stage; 'clipreid': the demo's two stages).
        sie: MODEL.SIE_CAMERA.
        sie_coe: MODEL.SIE_COE.

    Returns:
        The flat ``[KEY, VALUE, ...]`` list (after ``--config-file DEMO_CONFIG``).
    """
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.METHOD", method,
        "MODEL.SIE_CAMERA", str(sie),
        "MODEL.SIE_COE", str(sie_coe),
        "DATASETS.ROOT_DIR", root,
        "SOLVER.SEED", str(seed),
        "SOLVER.STAGE2.EVAL_PERIOD", "1000",
        "OUTPUT_DIR", out,
    ]  # fmt: skip


def evaluate_ways(run_dir: str) -> dict[str, dict[str, float]]:
    """Evaluate a trained run's test set with the camera ids and with each fallback.

    Args:
        run_dir: the run folder (config.yaml, final weights).

    Returns:
        ``{column: summary}`` for the columns of :data:`WAYS`.
    """
    cfg = load_cfg(os.path.join(run_dir, "config.yaml"))
    model = build_model_from_checkpoint(cfg, run_weights(run_dir, cfg))
    data = build_dataloaders(cfg)
    settings = build_eval_settings(cfg)
    out = {}
    for column, pass_ids, fallback in WAYS:
        way = dataclasses.replace(settings, sie_fallback=fallback)
        feats = extract_features(model, data.val, torch.device("cpu"), way, pass_ids=pass_ids)
        out[column] = summarize_trials(evaluate_trials(feats, data, way))
    return out


def _parser() -> argparse.ArgumentParser:
    parser = make_parser(
        __doc__.split("\n\n")[0],
        prog="python -m benchmarks.sie_fallback",
        config=None,
        overrides=False,
    )
    parser.add_argument("--root", default="/tmp/sie_fallback", help="data and run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument(
        "--method", default="baseline", help="MODEL.METHOD ('clipreid': the demo's two stages)"
    )
    parser.add_argument("--sie-coe", type=float, default=3.0, help="MODEL.SIE_COE")
    parser.add_argument("--json", default="", help="also write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Train, evaluate every way, print the table (percent, mean over the seeds last)."""
    args, _ = parse_args(_parser(), argv, overrides=False)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data = os.path.join(args.root, "data")
    rows = []
    for seed in args.seeds:
        row: dict = {"seed": seed}
        for sie in (True, False):
            out = os.path.join(args.root, f"{'sie' if sie else 'plain'}_s{seed}")
            opts = run_opts(data, out, seed, args.method, sie, args.sie_coe)
            train_clipreid.main(["--config-file", DEMO_CONFIG, *opts])
            ways = evaluate_ways(out)
            if sie:
                row.update(ways)
            else:
                row["no-SIE model"] = ways["true ids"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = [w[0] for w in WAYS] + ["no-SIE model"]
    print(f"{'seed':>6} " + " ".join(f"{c + ' mAP/R1':>22}" for c in columns))
    for row in rows:
        cells = [f"{100 * row[c]['mAP']:10.1f} /{100 * row[c]['rank1']:6.1f}" for c in columns]
        print(f"{row['seed']:>6} " + " ".join(f"{c:>22}" for c in cells))
    means = [
        f"{100 * np.mean([r[c]['mAP'] for r in rows]):10.1f} /"
        f"{100 * np.mean([r[c]['rank1'] for r in rows]):6.1f}"
        for c in columns
    ]
    print(f"{'mean':>6} " + " ".join(f"{c:>22}" for c in means))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    run_main(main)
