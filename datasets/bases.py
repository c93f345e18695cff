"""Records, statistics, parsing and image reading shared by every dataset.

A dataset file (``market1501.py``, ``veri.py``, ...) only declares a *layout*: folder names, list
file names and the file-name pattern. The layout classes here turn a layout and a root folder into
a :class:`ReIDDataset` of :class:`ImageRecord` lists, with the conventions of the official CLIP-ReID
parsers made explicit and order-independent:

- junk images (pid -1) are dropped from every split; distractors (pid 0) stay in the gallery;
- camera ids are 0-based (``c1`` in a file name is camid 0);
- train pids are relabelled 0..C-1 in sorted pid order; query/gallery keep their raw pids;
- files are sorted, and name patterns are matched on the file name, never on the whole path.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import logging
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2.functional import pil_to_tensor

try:  # libjpeg-turbo decoders: ~2x faster than PIL on small JPEGs (deprecated in torchvision 0.29)
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # a torchvision without them: PIL reads every file
    decode_image = None

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "query", "gallery")
# Market-1501 / DukeMTMC / VeRi style names: "<pid>_c<camera>..." at the start of the file name.
PID_CAM_PATTERN = r"([-\d]+)_c(\d+)"
# Index given to images whose viewpoint is unknown (VeRi without a keypoint label).
UNKNOWN_VIEW = -1


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
    """An image file cannot be read or decoded; the message names the file."""


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


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name.

    Args:
        folder: a directory.

    Returns:
        Sorted paths with an image extension (case-insensitive).
    """
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
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
    for path in list_images(folder):
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
            "%s: %d file(s) in %s do not match the name pattern '%s' and were skipped (e.g. %s)",
            dataset,
            len(unmatched),
            folder,
            pattern.pattern,
            unmatched[0],
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
            if len(parts) < 2 or not _is_int(parts[1]):
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


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _key_map(names: Iterable[str]) -> dict[str, int]:
    """Map identity names to ints: their value when all are integers, else their sorted rank."""
    names = sorted(set(names))
    if all(_is_int(n) for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}


def _render_tree(root_label: str, rows: Sequence[tuple[int, str, str]]) -> str:
    """Draw ``(depth, name, comment)`` rows (depth >= 1) as a tree under ``root_label``."""

    def is_last(i: int) -> bool:
        depth = rows[i][0]
        for d, _, _ in rows[i + 1 :]:
            if d <= depth:
                return d < depth
        return True

    width = max((4 * d + len(n) for d, n, _ in rows), default=0) + 2
    last_at: dict[int, bool] = {}
    out = [root_label]
    for i, (depth, name, comment) in enumerate(rows):
        last_at[depth] = is_last(i)
        prefix = "".join("    " if last_at.get(k, True) else "│   " for k in range(1, depth))
        text = prefix + ("└── " if last_at[depth] else "├── ") + name
        out.append(f"{text:<{width}} {comment}".rstrip())
    return "\n".join(out)


@dataclass
class DatasetOptions:
    """Dataset settings that are not part of a layout (plain values read from the config).

    Attributes:
        seed: run seed; VehicleID trial splits depend on it (``SOLVER.SEED``).
        vehicleid_test_size: 800, 1600 or 2400 (``DATASETS.VEHICLEID_TEST_SIZE``).
        veri_drop_unlabeled: drop VeRi images without a viewpoint label, as the official code
            (``DATASETS.VERI_DROP_UNLABELED``).
        veri_keypoint_dir: folder holding VeRi's keypoint files; '' = the VeRi folder itself.
        require_views: viewpoint labels are used by the model (``MODEL.SIE_VIEW``).
        list_file: the 'csv' dataset's list (``DATASETS.LIST_FILE``).
        synthetic: keyword arguments of the synthetic generator (``DATASETS.SYNTHETIC``).
    """

    seed: int = 0
    vehicleid_test_size: int = 800
    veri_drop_unlabeled: bool = False
    veri_keypoint_dir: str = ""
    require_views: bool = False
    list_file: str = ""
    synthetic: Mapping[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Base of the dataset layouts: where the dataset folder lives and what must be inside it.

    Attributes:
        name: the ``DATASETS.NAMES`` entry.
        dataset_dirs: candidate folders under ``DATASETS.ROOT_DIR``; the first is the canonical one
            shown in error messages ('' = ROOT_DIR itself).
    """

    name: str
    dataset_dirs: tuple[str, ...]

    def required(self, options: DatasetOptions) -> list[str]:
        """Paths that must exist inside the dataset folder.

        Args:
            options: dataset settings.

        Returns:
            Paths relative to the dataset folder.
        """
        raise NotImplementedError

    def tree(self, options: DatasetOptions) -> list[tuple[int, str, str]]:
        """The expected layout inside the dataset folder, for error messages.

        Args:
            options: dataset settings.

        Returns:
            Rows ``(depth, name, comment)``, depth 1 = directly inside the dataset folder.
        """
        raise NotImplementedError

    def load(self, root: str | os.PathLike, options: DatasetOptions) -> ReIDDataset:
        """Parse the dataset under ``root`` (``DATASETS.ROOT_DIR``).

        Args:
            root: the folder that holds the dataset folder.
            options: dataset settings.

        Returns:
            The parsed :class:`ReIDDataset`.
        """
        raise NotImplementedError

    def layout_text(self, root: str | os.PathLike, options: DatasetOptions) -> str:
        """The expected layout as a small tree diagram.

        Args:
            root: ``DATASETS.ROOT_DIR``.
            options: dataset settings (the VehicleID test size changes the tree).

        Returns:
            A multi-line string.
        """
        top = self.dataset_dirs[0]
        rows = self.tree(options)
        if top:
            parts = top.split("/")
            head = [(i + 1, p + "/", "") for i, p in enumerate(parts)]
            rows = head + [(d + len(parts), n, c) for d, n, c in rows]
        return _render_tree(f"{root}/  <- DATASETS.ROOT_DIR", rows)

    def find(self, root: str | os.PathLike, options: DatasetOptions) -> Path:
        """Locate the dataset folder under ``root``.

        Args:
            root: ``DATASETS.ROOT_DIR``.
            options: dataset settings.

        Returns:
            The first candidate folder that holds every required path.

        Raises:
            DatasetLayoutError: with the expected layout and the key to set.
        """
        root = Path(root).expanduser()
        required = self.required(options)
        best: tuple[Path, list[str]] | None = None
        for cand in self.dataset_dirs:
            folder = root / cand if cand else root
            if not folder.is_dir():
                continue
            missing = [r for r in required if not (folder / r).exists()]
            if not missing:
                return folder
            if best is None:
                best = (folder, missing)
        raise DatasetLayoutError(self._missing_message(root, options, best))

    def _missing_message(
        self, root: Path, options: DatasetOptions, best: tuple[Path, list[str]] | None
    ) -> str:
        if not root.is_dir():
            what = f"DATASETS.ROOT_DIR = '{root}' does not exist"
        elif best is None:
            looked = ", ".join(repr(d) for d in self.dataset_dirs if d)
            what = f"no dataset folder under DATASETS.ROOT_DIR = '{root}' (looked for {looked})"
        else:
            folder, missing = best
            what = f"'{folder}' lacks " + ", ".join(repr(m) for m in missing)
        hint = "Set DATASETS.ROOT_DIR to the folder shown at the top"
        if best is not None:
            hint = "Complete the dataset folder as shown, or point DATASETS.ROOT_DIR elsewhere"
        return f"{self.name}: {what}.\nExpected layout:\n{self.layout_text(root, options)}\n{hint}."


def _check_split_nonempty(dataset: str, split: str, records: list, where: Path | str) -> None:
    if not records:
        raise DatasetFormatError(f"{dataset}: the {split} split is empty (read from '{where}')")


@dataclass(frozen=True)
class NamePatternLayout(Layout):
    """Three split folders of images named ``<pid>_c<camera>...`` (Market-1501, Duke, ...).

    Attributes:
        train_dir: training folder name.
        query_dir: query folder name.
        gallery_dir: gallery folder name.
        pattern: regex matched at the start of each file name; groups (pid, 1-based camera).
        num_cameras: cameras are ``c1``..``c<num_cameras>``.
        example_name: a file name shown in the layout diagram.
    """

    train_dir: str = "bounding_box_train"
    query_dir: str = "query"
    gallery_dir: str = "bounding_box_test"
    pattern: str = PID_CAM_PATTERN
    num_cameras: int = 6
    example_name: str = "0002_c1s1_000451_03.jpg"

    def required(self, options: DatasetOptions) -> list[str]:
        return [self.train_dir, self.query_dir, self.gallery_dir]

    def tree(self, options: DatasetOptions) -> list[tuple[int, str, str]]:
        return [
            (1, self.train_dir + "/", f"{self.example_name}, ... (<pid>_c<camera>...)"),
            (1, self.query_dir + "/", ""),
            (1, self.gallery_dir + "/", "pid 0 = distractor, -1 = junk (dropped)"),
        ]

    def _parse(
        self, folder: Path, view_of: Callable[[str], int] | None = None
    ) -> dict[str, list[ImageRecord]]:
        pattern = re.compile(self.pattern)
        splits = {}
        for split, sub in zip(
            SPLITS, (self.train_dir, self.query_dir, self.gallery_dir), strict=True
        ):
            splits[split] = parse_name_pattern_dir(
                folder / sub, pattern, self.num_cameras, self.name, view_of
            )
            _check_split_nonempty(self.name, split, splits[split], folder / sub)
        return splits

    def load(self, root: str | os.PathLike, options: DatasetOptions) -> ReIDDataset:
        folder = self.find(root, options)
        s = self._parse(folder)
        return ReIDDataset(
            self.name, relabel_train(s["train"]), s["query"], s["gallery"], root=str(folder)
        )


@dataclass(frozen=True)
class PidListLayout(Layout):
    """Image folders plus ``<path> <pid>`` list files (MSMT17 V1).

    Attributes:
        train_image_dir: folder the train/val list paths start from.
        test_image_dir: folder the query/gallery list paths start from.
        train_lists: list files merged into the training split (MSMT17: train + val).
        query_list: query list file.
        gallery_list: gallery list file.
        camera_field: index of the ``_``-separated file-name field holding the 1-based camera.
        num_cameras: number of cameras.
    """

    train_image_dir: str = "train"
    test_image_dir: str = "test"
    train_lists: tuple[str, ...] = ("list_train.txt", "list_val.txt")
    query_list: str = "list_query.txt"
    gallery_list: str = "list_gallery.txt"
    camera_field: int = 2
    num_cameras: int = 15

    def required(self, options: DatasetOptions) -> list[str]:
        return [
            self.train_image_dir,
            self.test_image_dir,
            *self.train_lists,
            self.query_list,
            self.gallery_list,
        ]

    def tree(self, options: DatasetOptions) -> list[tuple[int, str, str]]:
        rows = [
            (1, self.train_image_dir + "/", "0000/0000_000_01_0303morning_0015_0.jpg, ..."),
            (1, self.test_image_dir + "/", ""),
        ]
        rows += [(1, n, "lines '<path> <pid>'") for n in self.train_lists]
        rows += [(1, self.query_list, ""), (1, self.gallery_list, "")]
        return rows

    def _read(self, folder: Path, list_name: str, image_dir: str) -> list[ImageRecord]:
        records = []
        for path, pid in read_pid_list(folder / list_name, folder / image_dir, self.name):
            fields = path.name.split("_")
            if len(fields) <= self.camera_field or not fields[self.camera_field].isdigit():
                raise DatasetFormatError(
                    f"{self.name}: cannot read the camera (field {self.camera_field} of the '_'-"
                    f"separated file name) of '{path}' listed in {list_name}"
                )
            cam = int(fields[self.camera_field])
            if not 1 <= cam <= self.num_cameras:
                raise DatasetFormatError(
                    f"{self.name}: camera {cam} of '{path}' is outside 1..{self.num_cameras}"
                )
            records.append(ImageRecord(str(path), pid, cam - 1, 0))
        return sorted(records)

    def load(self, root: str | os.PathLike, options: DatasetOptions) -> ReIDDataset:
        folder = self.find(root, options)
        train = sorted(
            r for n in self.train_lists for r in self._read(folder, n, self.train_image_dir)
        )
        query = self._read(folder, self.query_list, self.test_image_dir)
        gallery = self._read(folder, self.gallery_list, self.test_image_dir)
        for split, recs in zip(SPLITS, (train, query, gallery), strict=True):
            _check_split_nonempty(self.name, split, recs, folder)
        return ReIDDataset(self.name, relabel_train(train), query, gallery, root=str(folder))


@dataclass(frozen=True)
class LayoutChoice(Layout):
    """A dataset distributed in several layouts (MSMT17: list files or Market-style folders).

    Attributes:
        layouts: the alternatives, tried in order.
    """

    layouts: tuple[Layout, ...] = ()

    def find(self, root: str | os.PathLike, options: DatasetOptions) -> Path:
        return self._pick(root, options)[1]

    def _pick(self, root: str | os.PathLike, options: DatasetOptions) -> tuple[Layout, Path]:
        messages = []
        for layout in self.layouts:
            try:
                return layout, layout.find(root, options)
            except DatasetLayoutError as err:
                reason = str(err).split("\n", 1)[0].removeprefix(f"{layout.name}: ").rstrip(".")
                if reason not in messages:
                    messages.append(reason)
        trees = "\n".join(
            f"Layout {i + 1}:\n{lay.layout_text(root, options)}"
            for i, lay in enumerate(self.layouts)
        )
        raise DatasetLayoutError(
            f"{self.name}: none of its layouts was found ({'; '.join(messages)}).\n{trees}\n"
            "Set DATASETS.ROOT_DIR to the folder shown at the top."
        )

    def layout_text(self, root: str | os.PathLike, options: DatasetOptions) -> str:
        return "\n".join(lay.layout_text(root, options) for lay in self.layouts)

    def load(self, root: str | os.PathLike, options: DatasetOptions) -> ReIDDataset:
        layout = self._pick(root, options)[0]
        return dataclasses.replace(layout.load(root, options), name=self.name)


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
                if len(parts) < 2 or not _is_int(parts[-1]):
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
                _check_split_nonempty(self.name, split, s[split], folder)
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


@dataclass(frozen=True)
class VehicleIDLayout(Layout):
    """VehicleID: one image folder and ``<name> <pid>`` split lists.

    Attributes:
        image_dir: image folder.
        split_dir: folder of the lists.
        train_list: training list name.
        test_list: test list name with a ``{size}`` field.
        test_sizes: valid test sizes.
        image_ext: extension added to list names that have none.
    """

    image_dir: str = "image"
    split_dir: str = "train_test_split"
    train_list: str = "train_list.txt"
    test_list: str = "test_list_{size}.txt"
    test_sizes: tuple[int, ...] = (800, 1600, 2400)
    image_ext: str = ".jpg"

    def _test_list(self, options: DatasetOptions) -> str:
        if options.vehicleid_test_size not in self.test_sizes:
            raise DatasetFormatError(
                f"{self.name}: DATASETS.VEHICLEID_TEST_SIZE = {options.vehicleid_test_size} is not "
                f"one of {list(self.test_sizes)}"
            )
        return self.test_list.format(size=options.vehicleid_test_size)

    def required(self, options: DatasetOptions) -> list[str]:
        return [
            self.image_dir,
            f"{self.split_dir}/{self.train_list}",
            f"{self.split_dir}/{self._test_list(options)}",
        ]

    def tree(self, options: DatasetOptions) -> list[tuple[int, str, str]]:
        return [
            (1, self.image_dir + "/", "0000001.jpg, ..."),
            (1, self.split_dir + "/", ""),
            (2, self.train_list, "lines '<image name> <pid>'"),
            (2, self._test_list(options), "DATASETS.VEHICLEID_TEST_SIZE"),
        ]

    def _read(self, folder: Path, list_name: str) -> list[ImageRecord]:
        records = []
        for path, pid in read_pid_list(
            folder / self.split_dir / list_name, folder / self.image_dir, self.name
        ):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                path = path.with_name(path.name + self.image_ext)
            records.append(ImageRecord(str(path), pid, 0, 0))
        return sorted(records)

    def load(self, root: str | os.PathLike, options: DatasetOptions) -> ReIDDataset:
        folder = self.find(root, options)
        train = self._read(folder, self.train_list)
        pool = self._read(folder, self._test_list(options))
        _check_split_nonempty(self.name, "train", train, folder / self.split_dir)
        _check_split_nonempty(self.name, "test", pool, folder / self.split_dir)
        query, gallery = split_one_gallery_per_id(pool, options.seed, 0)
        return ReIDDataset(
            self.name,
            relabel_train(train),
            query,
            gallery,
            has_camera_ids=False,
            root=str(folder),
            test_pool=pool,
            trial_seed=options.seed,
        )


def _remap_sorted(values: Iterable[int]) -> dict[int, int]:
    return {v: i for i, v in enumerate(sorted(set(values)))}


def _finish_custom(
    name: str,
    root: str,
    rows: dict[str, list[tuple[str, str, int | None, int]]],
    where: str,
) -> ReIDDataset:
    """Turn ``{split: [(path, identity name, camera number or None, view)]}`` into a dataset.

    Identity names become ints (their value when all are integers, else their sorted rank; train
    is then relabelled); camera numbers are mapped to 0..n-1 in sorted order; without camera
    numbers, query gets camid 0 and gallery camid 1 so the same-camera filter removes nothing.
    """
    for split in SPLITS:
        _check_split_nonempty(name, split, rows[split], where)
    all_rows = [r for s in SPLITS for r in rows[s]]
    with_cam = [r for r in all_rows if r[2] is not None]
    if with_cam and len(with_cam) != len(all_rows):
        example = next(r[0] for r in all_rows if r[2] is None)
        raise DatasetFormatError(
            f"{name}: {len(with_cam)} of {len(all_rows)} images have a camera id but '{example}' "
            "has none; give every image a camera id or none at all"
        )
    has_cams = bool(with_cam)
    cam_map = _remap_sorted(r[2] for r in with_cam)
    view_map = _remap_sorted(r[3] for r in all_rows)
    train_ids = _key_map(r[1] for r in rows["train"])
    test_ids = _key_map(r[1] for s in ("query", "gallery") for r in rows[s])
    placeholder_cam = {"train": 0, "query": 0, "gallery": 1}
    out: dict[str, list[ImageRecord]] = {}
    for split in SPLITS:
        ids = train_ids if split == "train" else test_ids
        recs = []
        for path, ident, cam, view in rows[split]:
            pid = ids[ident]
            if pid == -1:
                continue
            camid = cam_map[cam] if has_cams else placeholder_cam[split]
            recs.append(ImageRecord(path, pid, camid, view_map[view]))
        out[split] = sorted(recs)
        _check_split_nonempty(name, split, out[split], where)
    if not has_cams:
        logger.info(
            "%s: no camera ids; query images get camid 0 and gallery images camid 1, so the "
            "evaluation's same-camera filter removes nothing (as for VehicleID)",
            name,
        )
    return ReIDDataset(
        name,
        relabel_train(out["train"]),
        out["query"],
        out["gallery"],
        num_views=len(view_map),
        has_camera_ids=has_cams,
        root=root,
    )


@dataclass(frozen=True)
class FolderLayout(Layout):
    """Custom data as ``<split>/<identity>/<images>`` folders.

    Attributes:
        split_dirs: folder names of train, query and gallery.
        camera_pattern: regex finding the camera number in a file name (optional token).
    """

    split_dirs: tuple[str, str, str] = ("train", "query", "gallery")
    camera_pattern: str = r"(?:^|[_\-])c(?:am)?(\d+)"

    def required(self, options: DatasetOptions) -> list[str]:
        return list(self.split_dirs)

    def tree(self, options: DatasetOptions) -> list[tuple[int, str, str]]:
        rows: list[tuple[int, str, str]] = []
        for sub in self.split_dirs:
            rows += [(1, sub + "/", ""), (2, "<identity>/", "one folder per identity")]
            rows.append((3, "<name>[_c<camera>].jpg", "camera token optional"))
        return rows

    def load(self, root: str | os.PathLike, options: DatasetOptions) -> ReIDDataset:
        folder = self.find(root, options)
        cam_re = re.compile(self.camera_pattern)
        rows: dict[str, list[tuple[str, str, int | None, int]]] = {}
        for split, sub in zip(SPLITS, self.split_dirs, strict=True):
            rows[split] = []
            for id_dir in sorted(p for p in (folder / sub).iterdir() if p.is_dir()):
                for path in list_images(id_dir):
                    m = cam_re.search(path.stem)
                    cam = int(m.group(1)) if m else None
                    rows[split].append((str(path), id_dir.name, cam, 0))
        return _finish_custom(self.name, rows=rows, root=str(folder), where=str(folder))


@dataclass(frozen=True)
class CsvLayout(Layout):
    """Custom data as one CSV/TSV list (``DATASETS.LIST_FILE``) with a header row.

    Relative image paths are resolved against the list file's folder, or against
    ``DATASETS.ROOT_DIR`` when the first one is not found there. A relative ``LIST_FILE`` is
    itself read from ``DATASETS.ROOT_DIR``.

    Attributes:
        required_columns: columns that must be present.
        optional_columns: columns that may be present.
        split_names: accepted values of the split column.
    """

    required_columns: tuple[str, ...] = ("path", "pid", "split")
    optional_columns: tuple[str, ...] = ("camid", "viewid")
    split_names: tuple[str, ...] = SPLITS

    def _list_file(self, root: Path, options: DatasetOptions) -> Path:
        if not options.list_file:
            raise DatasetLayoutError(
                f"{self.name}: DATASETS.LIST_FILE is empty; set it to a CSV/TSV file with the "
                f"header {','.join(self.required_columns + self.optional_columns)}"
            )
        path = Path(options.list_file).expanduser()
        return path if path.is_absolute() else root / path

    def required(self, options: DatasetOptions) -> list[str]:
        return []

    def tree(self, options: DatasetOptions) -> list[tuple[int, str, str]]:
        return [
            (1, options.list_file or "<DATASETS.LIST_FILE>", "path,pid,camid,viewid,split"),
            (1, "<images ...>", "relative paths start at the list's folder or ROOT_DIR"),
        ]

    def load(self, root: str | os.PathLike, options: DatasetOptions) -> ReIDDataset:
        root = Path(root).expanduser()
        list_file = self._list_file(root, options)
        if not list_file.is_file():
            raise DatasetLayoutError(
                f"{self.name}: list file '{list_file}' not found (DATASETS.LIST_FILE = "
                f"'{options.list_file}'; relative names are read from DATASETS.ROOT_DIR = "
                f"'{root}').\nExpected layout:\n{self.layout_text(root, options)}"
            )
        with open(list_file, encoding="utf-8", newline="") as f:
            text = f.read()
        header = text.split("\n", 1)[0]
        delimiter = "\t" if "\t" in header or list_file.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        missing = [c for c in self.required_columns if c not in columns]
        if missing:
            raise DatasetFormatError(
                f"{self.name}: {list_file} lacks column(s) {missing}; found {columns}. The header "
                f"must name {list(self.required_columns)} and optionally "
                f"{list(self.optional_columns)}"
            )
        reader.fieldnames = columns
        raw = list(reader)
        base = self._path_base(raw, list_file, root)
        rows: dict[str, list[tuple[str, str, int | None, int]]] = {s: [] for s in SPLITS}
        for lineno, row in enumerate(raw, 2):
            row = {k: (v or "").strip() for k, v in row.items() if k}
            split = row["split"].lower()
            if split not in self.split_names:
                raise DatasetFormatError(
                    f"{self.name}: {list_file}:{lineno}: split {row['split']!r} is not one of "
                    f"{list(self.split_names)}"
                )
            cam = self._int_field(row, "camid", list_file, lineno)
            view = self._int_field(row, "viewid", list_file, lineno)
            if not row["path"]:
                raise DatasetFormatError(f"{self.name}: {list_file}:{lineno}: empty path")
            path = Path(row["path"]).expanduser()
            path = path if path.is_absolute() else base / path
            rows[split].append((str(path), row["pid"], cam, 0 if view is None else view))
        return _finish_custom(self.name, rows=rows, root=str(base), where=str(list_file))

    def _int_field(self, row: dict, key: str, list_file: Path, lineno: int) -> int | None:
        value = row.get(key, "")
        if value == "":
            return None
        if not _is_int(value) or int(value) < 0:
            raise DatasetFormatError(
                f"{self.name}: {list_file}:{lineno}: {key} {value!r} is not a non-negative integer"
            )
        return int(value)

    def _path_base(self, raw: list[dict], list_file: Path, root: Path) -> Path:
        paths = [(r.get("path") or "").strip() for r in raw]
        rel = next((p for p in paths if p and not Path(p).is_absolute()), None)
        if rel is None or (list_file.parent / rel).exists():
            return list_file.parent
        if (root / rel).exists():
            return root
        raise DatasetLayoutError(
            f"{self.name}: the relative image path {rel!r} from {list_file} exists neither in the "
            f"list's folder '{list_file.parent}' nor in DATASETS.ROOT_DIR = '{root}'"
        )


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
    pid_offset = cam_offset = 0
    for ds in datasets:
        train += [r._replace(pid=r.pid + pid_offset, camid=r.camid + cam_offset) for r in ds.train]
        pid_offset += ds.num_train_pids
        cam_offset += 1 + max(r.camid for s in (ds.train, ds.query, ds.gallery) for r in s)
    first = datasets[0]
    return dataclasses.replace(
        first,
        name="+".join(d.name for d in datasets),
        train=train,
        num_views=max(d.num_views for d in datasets),
    )


# ----------------------------------------------------------------------------------------------
# Image reading
# ----------------------------------------------------------------------------------------------


def read_image(path: str) -> torch.Tensor:
    """Read an image file as RGB.

    JPEG/PNG go through torchvision's decoders when available; other formats (and files those
    reject) through PIL. Truncated files are errors, not silently padded.

    Args:
        path: image file.

    Returns:
        uint8 tensor [3, H, W].

    Raises:
        CorruptImageError: the file is missing or cannot be decoded; the message names it.
    """
    first: Exception | None = None
    if decode_image is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_image(read_file(path), mode=ImageReadMode.RGB)
        except RuntimeError as err:
            first = err
    try:
        with Image.open(path) as img:
            return pil_to_tensor(img.convert("RGB"))
    except Exception as err:  # any decoder failure means the file is unusable
        reason = "no such file" if not os.path.exists(path) else (str(err) or type(err).__name__)
        if first is not None:
            reason += f" (torchvision: {str(first).splitlines()[-1]})"
        raise CorruptImageError(
            f"cannot read image '{path}': {reason}. "
            "Set DATASETS.SKIP_CORRUPT True to skip unreadable images."
        ) from err


class SampleKey(NamedTuple):
    """A dataset index with the seed of its random augmentation (yielded by the train samplers).

    Attributes:
        index: record index.
        seed: seed of the transform's random draws for this sample.
    """

    index: int
    seed: int


def _seeded_call(
    fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int
) -> torch.Tensor:
    """Run ``fn`` with torch's CPU generator seeded by ``seed``.

    ``torch.default_generator`` is seeded directly: ``torch.manual_seed`` also visits every
    accelerator backend and costs ~100x more. Outside a loader worker the generator's state is
    restored afterwards, so the training process's random stream is left untouched.
    """
    gen = torch.default_generator
    if get_worker_info() is not None:  # a worker's generator is private to it
        gen.manual_seed(seed)
        return fn(image)
    state = gen.get_state()
    try:
        gen.manual_seed(seed)
        return fn(image)
    finally:
        gen.set_state(state)


class ImageDataset(Dataset):
    """Records -> samples: reads, transforms and labels one image.

    Args:
        records: the split.
        transform: maps a uint8 image [3, H, W] to a float tensor [3, H', W'].
        skip_corrupt: replace unreadable images by another image of the same split (first of the
            same identity) and count them in a warning, instead of raising.

    An index may be an int or a :class:`SampleKey`; with a key, the transform's random draws come
    from a generator seeded by ``key.seed``, so augmentations do not depend on the number of
    workers or on what ran before (a resumed run replays them).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.num_skipped = 0
        self._bad: set[int] = set()
        self._by_pid: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(self.records):
            self._by_pid[r.pid].append(i)

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    def __getitem__(self, key: int | SampleKey | tuple[int, int]) -> dict[str, Any]:
        """Load one sample.

        Args:
            key: record index, or ``(index, seed)``.

        Returns:
            ``{'image': float [3, H, W], 'pid': int, 'camid': int, 'viewid': int, 'path': str}``.
        """
        index, seed = (key[0], key[1]) if isinstance(key, tuple) else (int(key), None)
        index, image = self._load(index)
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                image = _seeded_call(self.transform, image, seed)
        r = self.records[index]
        return {
            "image": image.as_subclass(torch.Tensor),
            "pid": r.pid,
            "camid": r.camid,
            "viewid": r.viewid,
            "path": r.path,
        }

    def _load(self, index: int) -> tuple[int, torch.Tensor]:
        if not self.skip_corrupt:
            return index, read_image(self.records[index].path)
        for cand in self._candidates(index):
            if cand in self._bad:
                continue
            try:
                return cand, read_image(self.records[cand].path)
            except CorruptImageError as err:
                self._bad.add(cand)
                self.num_skipped += 1
                logger.warning(
                    "%s; skipped (%d unreadable image(s) skipped so far in this process)",
                    str(err).split(" Set DATASETS")[0],
                    self.num_skipped,
                )
        raise CorruptImageError(f"no readable image left in a split of {len(self)} images")

    def _candidates(self, index: int) -> Iterable[int]:
        """The index itself, then its identity's other images, then every other image."""
        same = self._by_pid[self.records[index].pid]
        pos = same.index(index)
        yield from same[pos:] + same[:pos]
        n = len(self.records)
        yield from ((index + k) % n for k in range(1, n))


def collate_batch(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples of :class:`ImageDataset` into one batch.

    Args:
        samples: B sample dicts.

    Returns:
        ``{'images': float [B, 3, H, W], 'pids': int64 [B], 'camids': int64 [B],
        'viewids': int64 [B], 'paths': list[str]}``.
    """
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "pids": torch.tensor([s["pid"] for s in samples], dtype=torch.int64),
        "camids": torch.tensor([s["camid"] for s in samples], dtype=torch.int64),
        "viewids": torch.tensor([s["viewid"] for s in samples], dtype=torch.int64),
        "paths": [s["path"] for s in samples],
    }


def closest_name(name: str, valid: Sequence[str]) -> str | None:
    """The valid name closest to ``name`` (case-insensitive), or None.

    Args:
        name: what was asked for.
        valid: the accepted names.

    Returns:
        The closest accepted name.
    """
    lower = {v.lower(): v for v in valid}
    near = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.3)
    return lower[near[0]] if near else None
