"""VeRi-776: folder names, file-name pattern and viewpoint files.

Names look like ``0001_c001_00016450_0.jpg``: pid 1, camera 1 (camid 0), 20 cameras. Viewpoints
(0..7) come from ``keypoint_train.txt`` / ``keypoint_test.txt`` (last number of each line), read
from the VeRi folder or ``DATASETS.VERI_KEYPOINT_DIR``. Images without a label keep view index 8
('unknown') unless ``DATASETS.VERI_DROP_UNLABELED`` or ``MODEL.SIE_VIEW`` drops them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets.bases import (
    PID_CAM_PATTERN,
    SPLITS,
    DatasetFormatError,
    DatasetLayoutError,
    PublishedSplit,
    ReIDDataset,
    check_split_nonempty,
    is_int,
    relabel_train,
)
from datasets.layouts import DatasetOptions, NamePatternLayout, register_dataset

logger = logging.getLogger(__name__)

# Index given to images whose viewpoint is unknown (VeRi without a keypoint label).
UNKNOWN_VIEW = -1


def read_veri_views(files: Sequence[Path], num_views: int) -> dict[str, int]:
    """Read VeRi keypoint files: ``<path> <40 keypoint numbers> <view>`` per line.

    Args:
        files: keypoint files (train first: its labels win on a duplicate name).
        num_views: valid views are 0..num_views-1.

    Returns:
        ``{file name: view}``.

    Raises:
        DatasetFormatError: a malformed line or a view out of range.
    """
    views: dict[str, int] = {}
    for file in files:
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2 or not is_int(parts[-1]):
                    raise DatasetFormatError(f"{file}:{lineno}: no viewpoint label at the end")
                view = int(parts[-1])
                if not 0 <= view < num_views:
                    raise DatasetFormatError(
                        f"{file}:{lineno}: viewpoint {view} is outside 0..{num_views - 1}"
                    )
                views.setdefault(os.path.basename(parts[0]), view)
    return views


@dataclass(frozen=True)
class VeRiLayout(NamePatternLayout):
    """VeRi-776: Market-style folders plus viewpoint labels from keypoint files.

    Images without a viewpoint label are kept with the extra view index ``num_labelled_views``
    ('unknown', so ``num_views`` becomes 9), unless ``veri_drop_unlabeled`` or ``require_views``
    asks for the official behaviour of dropping them.

    Attributes:
        keypoint_files: the label files, looked up in ``veri_keypoint_dir`` or the VeRi folder.
        num_labelled_views: labelled views are 0..num_labelled_views-1.
    """

    keypoint_files: tuple[str, ...] = ("keypoint_train.txt", "keypoint_test.txt")
    num_labelled_views: int = 8
    published_labelled: Mapping[str, PublishedSplit] | None = field(default=None, compare=False)

    def published_stats(self, options: DatasetOptions) -> Mapping[str, PublishedSplit] | None:
        if options.veri_drop_unlabeled or options.require_views:
            return self.published_labelled
        return self.published

    def tree(self, options: DatasetOptions) -> list[tuple[int, str, str]]:
        rows = super().tree(options)
        note = "optional viewpoint labels"
        if options.veri_keypoint_dir:
            note += f" (read from DATASETS.VERI_KEYPOINT_DIR = {options.veri_keypoint_dir})"
        return rows + [(1, n, note) for n in self.keypoint_files]

    def load(self, root: str | os.PathLike, options: DatasetOptions) -> ReIDDataset:
        folder = self.find(root, options)
        kp_dir = (
            Path(options.veri_keypoint_dir).expanduser() if options.veri_keypoint_dir else folder
        )
        files = [kp_dir / n for n in self.keypoint_files if (kp_dir / n).is_file()]
        drop = options.veri_drop_unlabeled or options.require_views
        if not files:
            msg = (
                f"{self.name}: no viewpoint files ({', '.join(self.keypoint_files)}) in '{kp_dir}'"
            )
            if drop:
                why = "MODEL.SIE_VIEW" if options.require_views else "DATASETS.VERI_DROP_UNLABELED"
                raise DatasetLayoutError(
                    f"{msg}, but {why} needs viewpoint labels. Put the files there or set "
                    "DATASETS.VERI_KEYPOINT_DIR.\nExpected layout:\n"
                    + self.layout_text(root, options)
                )
            logger.warning("%s: every view is 'unknown' (index %d)", msg, self.num_labelled_views)
        views = read_veri_views(files, self.num_labelled_views)
        s = self._parse(folder, lambda name: views.get(name, UNKNOWN_VIEW))
        unknown = {k: sum(r.viewid == UNKNOWN_VIEW for r in v) for k, v in s.items()}
        counts = ", ".join(f"{n} {k}" for k, n in unknown.items())
        if drop:
            s = {k: [r for r in v if r.viewid != UNKNOWN_VIEW] for k, v in s.items()}
            if any(unknown.values()):
                logger.info("%s: dropped images without a viewpoint label: %s", self.name, counts)
            for split in SPLITS:
                check_split_nonempty(self.name, split, s[split], folder)
            num_views = self.num_labelled_views
        else:
            unk = self.num_labelled_views
            s = {
                k: [r._replace(viewid=unk) if r.viewid == UNKNOWN_VIEW else r for r in v]
                for k, v in s.items()
            }
            num_views = self.num_labelled_views + (1 if any(unknown.values()) else 0)
            if any(unknown.values()):
                logger.info(
                    "%s: images without a viewpoint label kept with view index %d: %s",
                    self.name,
                    unk,
                    counts,
                )
        return ReIDDataset(
            self.name,
            relabel_train(s["train"]),
            s["query"],
            s["gallery"],
            num_views=num_views,
            root=str(folder),
        )


# The standard protocol (every image kept), and the official code's counts, which drop the
# images without a viewpoint label (63 train, 1 query, 1 gallery).
PUBLISHED_STATS = {
    "train": PublishedSplit(576, 37_778),
    "query": PublishedSplit(200, 1_678),
    "gallery": PublishedSplit(200, 11_579),
}
PUBLISHED_STATS_LABELLED = {
    "train": PublishedSplit(576, 37_715),
    "query": PublishedSplit(200, 1_677),
    "gallery": PublishedSplit(200, 11_578),
}

VERI = register_dataset(
    VeRiLayout(
        name="veri",
        dataset_dirs=("VeRi", "VeRi-776", "VeRi776"),
        train_dir="image_train",
        query_dir="image_query",
        gallery_dir="image_test",
        object_class="vehicle",
        pattern=PID_CAM_PATTERN,
        num_cameras=20,
        example_name="0001_c001_00016450_0.jpg",
        keypoint_files=("keypoint_train.txt", "keypoint_test.txt"),
        num_labelled_views=8,
        published=PUBLISHED_STATS,
        published_labelled=PUBLISHED_STATS_LABELLED,
    )
)
