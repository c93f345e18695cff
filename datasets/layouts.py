"""Dataset layouts: where a dataset's folders and list files live and how they are read.

A layout is a frozen dataclass that a dataset file (``market1501.py``, ...) instantiates with its
folder names and file-name pattern, and registers under its ``DATASETS.NAMES`` entry with
:func:`register_dataset`. The generic formats live here (:class:`NamePatternLayout` for
``<pid>_c<camera>...`` folders, :class:`PidListLayout` for ``<path> <pid>`` lists,
:class:`LayoutChoice` for a dataset shipped in several layouts); a format that only one dataset
uses lives in that dataset's file (VeRi, VehicleID, folder/CSV custom data).

A user adds a format without editing the package::

    @dataclass(frozen=True)
    class MyLayout(Layout):
        def required(self, options): ...
        def tree(self, options): ...
        def load(self, root, options): ...

    register_dataset(MyLayout(name="mine", dataset_dirs=("Mine",)))
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets.bases import (
    PID_CAM_PATTERN,
    SPLITS,
    DatasetFormatError,
    DatasetLayoutError,
    ImageRecord,
    PublishedSplit,
    ReIDDataset,
    UnknownDatasetError,
    check_split_nonempty,
    parse_name_pattern_dir,
    read_pid_list,
    relabel_train,
)
from utils.registry import Registry


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
        published: published split sizes of a full copy of a benchmark, keyed by split name, as
            :func:`~datasets.bases.compute_stats` counts them (None: not a benchmark). Keyword
            only, so subclasses may add fields without defaults.
        object_class: the class word of the prompts ('person' or 'vehicle'); keyword only.
    """

    name: str
    dataset_dirs: tuple[str, ...]
    published: Mapping[str, PublishedSplit] | None = field(
        default=None, compare=False, kw_only=True
    )
    object_class: str = field(default="person", kw_only=True)

    def class_word(self, options: DatasetOptions) -> str:
        """The word for the objects in this dataset's prompts (``MODEL.PROMPT_CLASS`` default).

        Args:
            options: dataset settings.

        Returns:
            'person' or 'vehicle'.
        """
        return self.object_class

    def published_stats(self, options: DatasetOptions) -> Mapping[str, PublishedSplit] | None:
        """The published split sizes a full copy read with ``options`` should have.

        Args:
            options: dataset settings (VeRi's unlabelled-view drop and VehicleID's test size
                change the figures).

        Returns:
            ``{split: PublishedSplit}`` (splits 'train', 'query', 'gallery' and, for datasets with
            trials, 'test'), or None for a dataset without published figures.
        """
        return self.published

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
            check_split_nonempty(self.name, split, splits[split], folder / sub)
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
            check_split_nonempty(self.name, split, recs, folder)
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


# ``DATASETS.NAMES`` vocabulary: every dataset file registers its layout when imported.
DATASETS: Registry[Layout] = Registry("DATASETS.NAMES", "dataset")


def register_dataset(layout: Layout, overwrite: bool = False) -> Layout:
    """Make a layout loadable by its name in ``DATASETS.NAMES``.

    Args:
        layout: the layout; registered under ``layout.name``.
        overwrite: replace a layout registered under the same name (otherwise an error).

    Returns:
        ``layout`` (so a dataset file can write ``MINE = register_dataset(MyLayout(...))``).

    Raises:
        TypeError: ``layout`` is not a :class:`Layout`.
        ValueError: the name is taken and ``overwrite`` is False.
    """
    if not isinstance(layout, Layout):
        raise TypeError(
            f"register_dataset expects a datasets.layouts.Layout, got {type(layout).__name__}"
        )
    return DATASETS.register(layout.name, layout, overwrite=overwrite)


def get_layout(name: str) -> Layout:
    """Look up a dataset layout by its ``DATASETS.NAMES`` entry.

    Args:
        name: dataset name (case-sensitive, as the official names).

    Returns:
        The layout.

    Raises:
        UnknownDatasetError: an unknown name (a ``KeyError`` and a ``ValueError``); the message
            names ``DATASETS.NAMES``, the closest valid name and every valid name.
    """
    if name in DATASETS:
        return DATASETS.get(name)
    raise UnknownDatasetError(DATASETS.unknown_message(name))
