"""Draw a run's learning curves (loss terms, learning rate, mAP / Rank-1) from its metrics.jsonl.

Example (from the repository root)::

    python -m tools.plot_curves runs/market_vit --out curves.png

Without ``--out`` the PNG is ``RUN_DIR/learning_curves.png``, the file a run draws itself at its
end (``LOG.CURVES``). One row per training stage; a resumed run's repeated epochs count once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from utils.cli import UsageError, make_parser, parse_args, run_main
from utils.learning_curves import plot_learning_curves

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> str:
    """Draw the curves of one run.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The PNG path written.

    Raises:
        FileNotFoundError: the run folder has no metrics.jsonl.
        UsageError: metrics.jsonl holds no per-epoch record or a corrupt line.
    """
    parser = make_parser(
        __doc__.split("\n\n")[0], prog="python -m tools.plot_curves", config=None, overrides=False
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (OUTPUT_DIR) or its jsonl")
    parser.add_argument("--out", default=None, metavar="PNG", help="PNG to write")
    args, _ = parse_args(parser, argv, overrides=False)
    try:
        path = plot_learning_curves(args.run_dir, args.out)
    except ValueError as err:
        raise UsageError(f"{args.run_dir}: {err}") from err
    print(path)
    return path


if __name__ == "__main__":
    run_main(main)
