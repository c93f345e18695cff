"""Evaluate a checkpoint (this project's or an official CLIP-ReID one) on a dataset's query/gallery.

Usage:
    python test_clipreid.py --config-file configs/person/vit_clipreid.yml \
        TEST.WEIGHT runs/market_vit/ViT-B-16_60.pth DATASETS.ROOT_DIR /data

Prints "mAP: x.x%" and "Rank-1/5/10: x.x%" lines as the official script does and writes the
full-precision results to OUTPUT_DIR/test_metrics.json. With several test sets
(``DATASETS.TEST_NAMES``) each is evaluated on its own: the lines are printed per set and the file
holds the first set's numbers plus ``test_sets: {name: numbers}``. With ``TEST.VISUALIZE N`` it
also draws the ranked lists (top ``TEST.VISUALIZE_TOPK``) of the N lowest-AP queries into
OUTPUT_DIR/ranked_lists/ (one sub-folder per set when there are several; VehicleID: the first
gallery draw only). A user error prints its message and exits with status 2 (``--debug`` or
``CLIPREID_DEBUG=1``: with the traceback).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from configs.config import ConfigError
from datasets.build import build_dataloaders
from model.build import build_model
from model.loading import load_reid_checkpoint
from processor.evaluate import (
    build_eval_settings,
    evaluate_test_sets,
    log_results,
    summarize_test_sets,
)
from processor.ranked_lists import write_ranked_lists
from utils.checkpoint import write_json
from utils.cli import parse_and_setup, run_main

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Evaluate ``TEST.WEIGHT``.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The summary written to OUTPUT_DIR/test_metrics.json.

    Raises:
        configs.config.ConfigError: TEST.WEIGHT unset.
    """
    cfg, device, _ = parse_and_setup(
        argv, "Evaluate a ReID checkpoint.", "test_log.txt", config_name="test_config.yaml"
    )
    if not cfg.TEST.WEIGHT:
        raise ConfigError(
            "set TEST.WEIGHT to the checkpoint to evaluate (e.g. TEST.WEIGHT run/x.pth)"
        )
    data = build_dataloaders(cfg)
    model = build_model(
        cfg, data.num_classes, data.num_cameras, data.num_views, load_pretrained=False
    )
    load_reid_checkpoint(model, cfg.TEST.WEIGHT, for_training=False)
    model.to(device)
    settings = build_eval_settings(cfg)
    # The ranked lists reuse the evaluation's per-query results (AP, top-k): no second pass.
    keep_topk = cfg.TEST.VISUALIZE_TOPK if cfg.TEST.VISUALIZE > 0 else 0
    evaluated = evaluate_test_sets(model, data, settings, device, keep_topk=keep_topk)
    summary = summarize_test_sets(evaluated)
    log_results(summary, f"Test results of {cfg.TEST.WEIGHT}")
    write_json(
        os.path.join(cfg.OUTPUT_DIR, "test_metrics.json"), {"weight": cfg.TEST.WEIGHT, **summary}
    )
    several = len(evaluated) > 1
    if cfg.TEST.VISUALIZE > 0:
        for test, features, results in evaluated:
            sub = [test.name] if several else []
            out = os.path.join(cfg.OUTPUT_DIR, "ranked_lists", *sub)
            _write_ranked_lists(cfg, test, features, results[0], settings, out)
    for name, numbers in summary.get("test_sets", {"": summary}).items():
        prefix = f"{name} " if several else ""
        print(f"{prefix}mAP: {100 * numbers['mAP']:.1f}%")
        print(f"{prefix}mINP: {100 * numbers['mINP']:.1f}%")
        for k in (1, 5, 10):
            print(f"{prefix}Rank-{k}: {100 * numbers[f'rank{k}']:.1f}%")
    return summary


def _write_ranked_lists(cfg, data, features, result, settings, out_dir: str) -> None:
    """Draw the lowest-AP queries of the standard query/gallery split (trial 0 for VehicleID)."""
    if int(getattr(data, "num_trials", 1)) > 1:
        logger.info("ranked lists: VehicleID trial 0 (the first gallery draw) only")
    if cfg.TEST.RE_RANKING:
        logger.info("ranked lists show the re-ranked distances the metrics were computed on")
    write_ranked_lists(
        features.query(data.num_query),
        features.gallery(data.num_query),
        result,
        out_dir,
        settings,
        num_queries=cfg.TEST.VISUALIZE,
        select="worst",
        tile_size=tuple(cfg.INPUT.SIZE_TEST),
    )


if __name__ == "__main__":
    run_main(main)
