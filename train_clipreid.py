"""Train a ReID model from a YAML config: CLIP-ReID (stage 1 then stage 2), one-stage or baseline.

Usage:
    python train_clipreid.py --config-file configs/person/vit_clipreid.yml \
        DATASETS.NAMES market1501 DATASETS.ROOT_DIR /data OUTPUT_DIR runs/market_vit
    python train_clipreid.py --config-file ... OUTPUT_DIR runs/x --resume  # from runs/x/last.pth
    python train_clipreid.py --config-file ... --resume runs/x/last.pth OUTPUT_DIR runs/y
    python train_clipreid.py --config-file ... OUTPUT_DIR runs/x --overwrite  # start runs/x over
    torchrun --nproc_per_node=4 train_clipreid.py --config-file ...   # data-parallel, 4 GPUs

A user error (config, dataset, checkpoint) prints its message and exits with status 2;
``--debug`` or ``CLIPREID_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

from processor.train import check_output_dir, train
from utils.cli import parse_and_setup, run_main
from utils.dist import cleanup, is_main_process

FLAGS = (
    ("--overwrite", "start over in an OUTPUT_DIR that holds a resumable run"),
    (
        "--accept-config-changes",
        "resume although keys that change the schedule, model or data differ from the "
        "checkpoint's config",
    ),
)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run training.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The final evaluation summary (mAP, mINP, rank1, rank5, rank10, num_valid_queries).
    """
    cfg, device, switches = parse_and_setup(
        argv,
        "Train CLIP-ReID / baseline ReID models.",
        "train_log.txt",
        resume_flag=True,
        flags=FLAGS,
        check=lambda cfg, switches: check_output_dir(cfg, switches["overwrite"]),
    )
    main_process = is_main_process()  # asked before cleanup() leaves the group
    try:
        summary = train(cfg, device, **switches)
    finally:
        cleanup()
    if main_process:
        print(
            f"final: mAP {100 * summary['mAP']:.1f}%  Rank-1 {100 * summary['rank1']:.1f}%  "
            f"mINP {100 * summary['mINP']:.1f}%  (run folder: {cfg.OUTPUT_DIR})"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
