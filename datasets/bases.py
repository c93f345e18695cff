"""Records, statistics, errors, parsing helpers and dataset combination shared by every dataset.

A dataset file (``market1501.py``, ``veri.py``, ...) declares a *layout* (``datasets/layouts.py``):
folder names, list file names and the file-name pattern. Layouts turn a root folder into a
:class:`ReIDDataset` of :class:`ImageRecord` lists with the helpers here, with the conventions of
the official CLIP-ReID parsers made explicit and order-independent:

- junk images (pid -1) are dropped from every split; distractors (pid 0) stay in the gallery;
- camera ids are 0-based (``c1`` in a file name is camid 0);
- train pids are relabelled 0..C-1 in sorted pid order; query/gallery keep their raw pids;
- files are sorted, and name patterns are matched on the file name, never on the whole path.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from utils.registry import UnknownNameError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "query", "gallery")
# Market-1501 / DukeMTMC / VeRi style names: "<pid>_c<camera>..." at the start of the file name.
PID_CAM_PATTERN = r"([-\d]+)_c(\d+)"
# Parsing warnings carry ``extra={ISSUE: <kind>}`` so that a checker (tools/check_dataset.py) can
# sort the warnings of a load by kind without reading their text.
ISSUE = "dataset_issue"
ISSUE_FILE_NAME = "file_name"  # an image skipped because its name does not fit the layout
ISSUE_NON_IMAGE = "non_image"  # a non-image file in an image folder, skipped
ISSUE_EVALUATION = "evaluation"  # an evaluation caveat (query without gallery match, ...)
# How many file names a warning or error lists before '...'.
MAX_LISTED = 10


class ImageRecord(NamedTuple):
    """One image of a split, in the official 4-tuple order.

    Attributes:
        path: absolute image path.
        pid: identity (train: relabelled 0..C-1; query/gallery: raw, 0 = distractor).
        camid: 0-based camera id.
        viewid: 0-based viewpoint id (0 for datasets without viewpoints).
    """

    path: str
    pid: int
    camid: int
    viewid: int


@dataclass(frozen=True)
class SplitStats:
    """Counts of one split.

    Attributes:
        num_ids: distinct pids (Market's distractor pid 0 counts as one, as officially printed).
        num_images: records.
        num_cameras: distinct camids.
        num_views: distinct viewids.
    """

    num_ids: int
    num_images: int
    num_cameras: int
    num_views: int


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder or list file is missing; the message shows the expected layout."""


class DatasetFormatError(ValueError):
    """A file name, list line or value does not follow the dataset's format."""


class CorruptImageError(RuntimeError):
    """An image file cannot be read or decoded; the message names the file.

    Args:
        message: the full message.
        path: the file ('' when the error is about several files).
        reason: why it cannot be read, in a few words.
    """

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


class UnknownDatasetError(UnknownNameError, ValueError):
    """A ``DATASETS.NAMES`` entry that no layout is registered under.

    A :class:`~utils.registry.UnknownNameError` (a ``KeyError``) and, as before the registry, a
    ``ValueError``; the message names the key, the closest and every valid name.
    """


def compute_stats(records: Sequence[ImageRecord]) -> SplitStats:
    """Count ids, images, cameras and views of a split.

    Args:
        records: the split.

    Returns:
        Its :class:`SplitStats`.
    """
    return SplitStats(
        num_ids=len({r.pid for r in records}),
        num_images=len(records),
        num_cameras=len({r.camid for r in records}),
        num_views=len({r.viewid for r in records}),
    )


class PublishedSplit(NamedTuple):
    """Published size of one split of a benchmark, counted as :func:`compute_stats` counts.

    Attributes:
        num_ids: identities (Market's distractor pid 0 counts as one; junk -1 is not counted).
        num_images: images, or None where no figure is published.
    """

    num_ids: int
    num_images: int | None


@dataclass
class ReIDDataset:
    """The parsed splits of one dataset (or of several combined for training).

    Attributes:
        name: dataset name (``'+'``-joined for a combination).
        train: training records, pids relabelled 0..C-1.
        query: query records.
        gallery: gallery records.
        num_views: size of the viewpoint vocabulary (VeRi: 8, plus one 'unknown' index when images
            without a label are kept); 1 for datasets without viewpoints.
        has_camera_ids: False when the camids are placeholders (VehicleID, custom data without
            camera tokens): query 0, gallery 1, train 0, so the same-camera filter removes nothing.
        root: the dataset folder that was read.
        test_pool: VehicleID only: every test record; query/gallery are one trial's split of it.
        trial_seed: VehicleID only: seed of the trial splits (``SOLVER.SEED``).
    """

    name: str
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    num_views: int = 1
    has_camera_ids: bool = True
    root: str = ""
    test_pool: list[ImageRecord] | None = field(default=None, repr=False)
    trial_seed: int = 0

    @property
    def num_train_pids(self) -> int:
        """Number of training identities C (train pids are 0..C-1)."""
        return len({r.pid for r in self.train})

    @property
    def num_cameras(self) -> int:
        """Size of the camera vocabulary: 1 + the largest camid of train (and test if real)."""
        splits = [self.train, self.query, self.gallery] if self.has_camera_ids else [self.train]
        return 1 + max((r.camid for s in splits for r in s), default=0)

    @property
    def has_trials(self) -> bool:
        """True when query/gallery are drawn per trial from ``test_pool`` (VehicleID)."""
        return self.test_pool is not None

    def for_trial(self, trial: int) -> ReIDDataset:
        """Return this dataset with the query/gallery split of one evaluation trial.

        Args:
            trial: trial index (0-based); trial 0 is the split built at load time.

        Returns:
            A copy with the trial's query and gallery (``self`` for datasets without trials).
        """
        if self.test_pool is None:
            return self
        query, gallery = split_one_gallery_per_id(self.test_pool, self.trial_seed, trial)
        return dataclasses.replace(self, query=query, gallery=gallery)

    def without_images(self, paths: Collection[str]) -> ReIDDataset:
        """This dataset with the query, gallery and test-pool records of ``paths`` left out.

        Args:
            paths: image paths to leave out of the evaluation (train records are kept).

        Returns:
            A copy; for a dataset with trials, trial 0 is drawn again from the reduced pool.
        """
        drop = set(paths)

        def keep(records: list[ImageRecord]) -> list[ImageRecord]:
            return [r for r in records if r.path not in drop]

        if self.test_pool is not None:
            pool = keep(self.test_pool)
            query, gallery = split_one_gallery_per_id(pool, self.trial_seed, 0)
            return dataclasses.replace(self, query=query, gallery=gallery, test_pool=pool)
        return dataclasses.replace(self, query=keep(self.query), gallery=keep(self.gallery))

    def statistics(self) -> dict[str, SplitStats]:
        """Per-split counts.

        Returns:
            ``{'train': SplitStats, 'query': ..., 'gallery': ...}``.
        """
        return {s: compute_stats(getattr(self, s)) for s in SPLITS}

    def format_statistics(self) -> str:
        """Render :meth:`statistics` as a small text table for the log.

        Returns:
            A multi-line string.
        """
        lines = [
            f"Dataset statistics: {self.name} ({self.root})",
            "  subset  | # ids | # images | # cameras | # views",
            "  --------+-------+----------+-----------+--------",
        ]
        for split, st in self.statistics().items():
            lines.append(
                f"  {split:<7} | {st.num_ids:5d} | {st.num_images:8d} | {st.num_cameras:9d} "
                f"| {st.num_views:7d}"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Parsing helpers
# ----------------------------------------------------------------------------------------------


def relabel_train(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Map train pids to 0..C-1 in ascending pid order.

    Args:
        records: train records with raw pids.

    Returns:
        The records with relabelled pids, same order.
    """
    records = list(records)
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [r._replace(pid=mapping[r.pid]) for r in records]


def list_images(folder: Path, dataset: str, skipped: list[Path] | None = None) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; other files are skipped.

    Args:
        folder: a directory.
        dataset: dataset name, for the warning.
        skipped: receives the skipped files when given (the caller reports them, e.g. once for
            many folders); otherwise they are counted in one warning (:func:`warn_skipped_files`).

    Returns:
        Sorted paths with an image extension (case-insensitive). Sub-folders are not listed.
    """
    images: list[Path] = []
    others: list[Path] = []
    for p in folder.iterdir():
        if p.is_file():
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    if skipped is not None:
        skipped.extend(others)
    else:
        warn_skipped_files(dataset, folder, others)
    return sorted(images)


def warn_skipped_files(dataset: str, folder: Path, files: Sequence[Path], why: str = "") -> None:
    """Log one warning counting the files skipped in ``folder`` (nothing if none).

    Args:
        dataset: dataset name.
        folder: the folder they were found in (examples are named relative to it).
        files: the skipped files.
        why: the reason; default: not an image extension.
    """
    if not files:
        return
    why = why or f"not images (extension not one of {' '.join(IMAGE_EXTENSIONS)})"
    names = sorted(
        str(p.relative_to(folder)) if p.is_relative_to(folder) else p.name for p in files
    )
    logger.warning(
        "%s: %d file(s) in %s skipped: %s; e.g. %s",
        dataset,
        len(names),
        folder,
        why,
        ", ".join(names[:3]),
        extra={ISSUE: ISSUE_NON_IMAGE},
    )


def parse_name_pattern_dir(
    folder: Path,
    pattern: re.Pattern[str],
    num_cameras: int,
    dataset: str,
    view_of: Callable[[str], int] | None = None,
) -> list[ImageRecord]:
    """Parse a folder of images named ``<pid>_c<camera>...`` (Market-1501 style).

    Args:
        folder: the split folder.
        pattern: regex with two groups (pid, 1-based camera), matched at the start of the file name.
        num_cameras: cameras are numbered 1..num_cameras in the names.
        dataset: dataset name, for messages.
        view_of: optional map from file name to viewid; default 0.

    Returns:
        Records sorted by path, junk (pid -1) dropped, camid 0-based, raw pids.

    Raises:
        DatasetFormatError: a camera number outside 1..num_cameras.
    """
    records: list[ImageRecord] = []
    unmatched: list[str] = []
    for path in list_images(folder, dataset):
        m = pattern.match(path.name)
        if m is None:
            unmatched.append(path.name)
            continue
        pid, cam = int(m.group(1)), int(m.group(2))
        if pid == -1:
            continue
        if not 1 <= cam <= num_cameras:
            raise DatasetFormatError(
                f"{dataset}: camera c{cam} in '{path}' is outside c1..c{num_cameras}"
            )
        view = view_of(path.name) if view_of is not None else 0
        records.append(ImageRecord(str(path), pid, cam - 1, view))
    if unmatched:
        logger.warning(
            "%s: %d image(s) in %s do not match the name pattern '%s' and were skipped, e.g. %s",
            dataset,
            len(unmatched),
            folder,
            pattern.pattern,
            ", ".join(unmatched[:3]),
            extra={ISSUE: ISSUE_FILE_NAME},
        )
    return records


def read_pid_list(list_file: Path, image_dir: Path, dataset: str) -> list[tuple[Path, int]]:
    """Read a ``<relative path> <pid>`` list file.

    Args:
        list_file: the list.
        image_dir: folder the relative paths start from.
        dataset: dataset name, for messages.

    Returns:
        ``(absolute path, pid)`` pairs in file order.

    Raises:
        DatasetFormatError: a line without two fields or with a non-integer pid.
    """
    out: list[tuple[Path, int]] = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or not is_int(parts[1]):
                raise DatasetFormatError(
                    f"{dataset}: {list_file}:{lineno}: expected '<path> <pid>', "
                    f"got {line.strip()!r}"
                )
            out.append((image_dir / parts[0], int(parts[1])))
    return out


def split_one_gallery_per_id(
    records: Sequence[ImageRecord], seed: int, trial: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """VehicleID protocol: one random gallery image per identity, the rest are queries.

    The draw depends only on (seed, trial) and the records, never on global random state.
    Queries get camid 0 and the gallery camid 1, so the same-camera filter removes nothing.

    Args:
        records: the test pool, sorted by path.
        seed: run seed (``SOLVER.SEED``).
        trial: trial index.

    Returns:
        (query, gallery), each in path order.
    """
    rng = np.random.default_rng([_u64(seed), _u64(trial)])
    by_pid: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_pid[r.pid].append(i)
    chosen = {by_pid[pid][int(rng.integers(len(by_pid[pid])))] for pid in sorted(by_pid)}
    query = [r._replace(camid=0) for i, r in enumerate(records) if i not in chosen]
    gallery = [r._replace(camid=1) for i, r in enumerate(records) if i in chosen]
    return query, gallery


def _u64(value: int) -> int:
    """Map any int to a non-negative seed word."""
    return int(value) % (2**64)


def is_int(text: str) -> bool:
    """Whether ``text`` parses as an integer.

    Args:
        text: a field of a list file.

    Returns:
        True for ``'12'``, ``'-1'``; False for ``'1.5'``, ``'cat'``, ``''``.
    """
    try:
        int(text)
    except ValueError:
        return False
    return True


def check_split_nonempty(dataset: str, split: str, records: list, where: Path | str) -> None:
    """Refuse an empty split.

    Args:
        dataset: dataset name, for the message.
        split: 'train', 'query', 'gallery' or 'test'.
        records: the split's records.
        where: the folder or file it was read from.

    Raises:
        DatasetFormatError: ``records`` is empty.
    """
    if not records:
        raise DatasetFormatError(f"{dataset}: the {split} split is empty (read from '{where}')")


def camera_offsets(datasets: Sequence[ReIDDataset]) -> list[int]:
    """Where each dataset's camera ids start in a combination (:func:`combine_datasets`).

    Args:
        datasets: parsed datasets, in ``DATASETS.NAMES`` order.

    Returns:
        ``offsets[i]``: the camera vocabulary sizes (1 + largest camid of any split) of the
        datasets before ``i``.
    """
    offsets, total = [], 0
    for ds in datasets:
        offsets.append(total)
        total += 1 + max(r.camid for s in (ds.train, ds.query, ds.gallery) for r in s)
    return offsets


def combine_datasets(datasets: Sequence[ReIDDataset]) -> ReIDDataset:
    """Train on several datasets: pid and camera ranges made disjoint; test on the first one.

    Dataset ``i``'s train pids are shifted by the number of train identities before it, its camids
    by the camera vocabulary sizes before it. Query and gallery (and VehicleID trials) come from
    the first dataset, unchanged.

    Args:
        datasets: parsed datasets, in ``DATASETS.NAMES`` order.

    Returns:
        One :class:`ReIDDataset` (the first one itself when there is only one).
    """
    if len(datasets) == 1:
        return datasets[0]
    train: list[ImageRecord] = []
    pid_offset = 0
    for ds, cam_offset in zip(datasets, camera_offsets(datasets), strict=True):
        train += [r._replace(pid=r.pid + pid_offset, camid=r.camid + cam_offset) for r in ds.train]
        pid_offset += ds.num_train_pids
    first = datasets[0]
    return dataclasses.replace(
        first,
        name="+".join(d.name for d in datasets),
        train=train,
        num_views=max(d.num_views for d in datasets),
    )
