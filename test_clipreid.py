"""Evaluate a checkpoint (this project's or an official CLIP-ReID one) on a dataset's query/gallery.

Usage:
    python test_clipreid.py --config_file configs/person/vit_clipreid.yml \
        TEST.WEIGHT runs/market_vit/ViT-B-16_60.pth DATASETS.ROOT_DIR /data

Prints "mAP: x.x%" and "Rank-1/5/10: x.x%" lines as the official script does and writes the
full-precision results to OUTPUT_DIR/test_metrics.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

from datasets.build import build_dataloaders
from model.build import build_model
from model.checkpoint import load_reid_checkpoint
from processor.evaluate import build_eval_settings, evaluate_bundle, log_results
from utils.cli import parse_and_setup

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Evaluate ``TEST.WEIGHT``; returns the summary written to test_metrics.json."""
    cfg, device = parse_and_setup(
        argv, "Evaluate a ReID checkpoint.", "test_log.txt", config_name="test_config.yaml"
    )
    if not cfg.TEST.WEIGHT:
        raise SystemExit(
            "set TEST.WEIGHT to the checkpoint to evaluate (e.g. TEST.WEIGHT run/x.pth)"
        )
    data = build_dataloaders(cfg)
    model = build_model(
        cfg, data.num_classes, data.num_cameras, data.num_views, load_pretrained=False
    )
    load_reid_checkpoint(model, cfg.TEST.WEIGHT, for_training=False)
    model.to(device)
    summary = evaluate_bundle(model, data, build_eval_settings(cfg), device)
    log_results(summary, f"Test results of {cfg.TEST.WEIGHT}")
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(cfg.OUTPUT_DIR, "test_metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"weight": cfg.TEST.WEIGHT, **summary}, f, indent=2)
    print(f"mAP: {100 * summary['mAP']:.1f}%")
    print(f"mINP: {100 * summary['mINP']:.1f}%")
    for k in (1, 5, 10):
        print(f"Rank-{k}: {100 * summary[f'rank{k}']:.1f}%")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
