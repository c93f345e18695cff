"""Write a synthetic ReID dataset in the Market-1501 layout.

Example (from the repository root)::

    python -m tools.make_synthetic --root data/synthetic_demo --num-ids 64 --mode person

The result reads as ``DATASETS.NAMES "['market1501']" DATASETS.ROOT_DIR data/synthetic_demo``.
The 'synthetic' dataset name generates the same data on first use without this tool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from datasets.layouts import DatasetOptions
from datasets.market1501 import MARKET1501
from datasets.synthetic import generate_synthetic_reid
from utils.cli import make_parser, parse_args, run_main


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, generate the dataset and print where it went.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        Exit status 0.
    """
    p = make_parser(
        __doc__.split("\n\n")[0],
        prog="python -m tools.make_synthetic",
        config=None,
        overrides=False,
    )
    p.add_argument("--root", required=True, help="folder that receives Market-1501-v15.09.15/")
    p.add_argument("--num-ids", type=int, default=64, help="identities, half train, half test")
    p.add_argument("--num-cameras", type=int, default=4, help="cameras (2..9)")
    p.add_argument("--images-per-id-cam", type=int, default=3, help="images per id and camera")
    p.add_argument("--size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"))
    p.add_argument("--mode", choices=("person", "vehicle"), default="person")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", dest="image_format")
    p.add_argument("--num-distractors", type=int, default=None, help="pid-0 gallery images")
    p.add_argument("--num-junk", type=int, default=None, help="pid -1 gallery images")
    args, _ = parse_args(p, argv, overrides=False)
    folder = generate_synthetic_reid(
        args.root,
        num_ids=args.num_ids,
        num_cameras=args.num_cameras,
        images_per_id_cam=args.images_per_id_cam,
        size=args.size,
        mode=args.mode,
        seed=args.seed,
        image_format=args.image_format,
        num_distractors=args.num_distractors,
        num_junk=args.num_junk,
    )
    layout = dataclasses.replace(MARKET1501, num_cameras=args.num_cameras)
    print(folder)
    print(layout.load(args.root, DatasetOptions()).format_statistics())
    return 0


if __name__ == "__main__":
    run_main(main)
