"""VehicleID: image folder and split lists.

``train_test_split/train_list.txt`` and ``test_list_{800,1600,2400}.txt`` hold lines
``<image name> <pid>`` (the name without ``.jpg``). Each evaluation trial puts one random image per
test identity in the gallery and the rest in the query (seeded by ``SOLVER.SEED`` and the trial).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from datasets.bases import (
    IMAGE_EXTENSIONS,
    DatasetFormatError,
    ImageRecord,
    PublishedSplit,
    ReIDDataset,
    check_split_nonempty,
    read_pid_list,
    relabel_train,
    split_one_gallery_per_id,
)
from datasets.layouts import DatasetOptions, Layout, register_dataset


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
    published_test_ids: Mapping[int, int] | None = field(default=None, compare=False)

    def published_stats(self, options: DatasetOptions) -> Mapping[str, PublishedSplit] | None:
        ids = (self.published_test_ids or {}).get(options.vehicleid_test_size)
        if self.published is None or ids is None:
            return self.published
        test = {"test": PublishedSplit(ids, None), "gallery": PublishedSplit(ids, ids)}
        return {**self.published, **test}

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
        check_split_nonempty(self.name, "train", train, folder / self.split_dir)
        check_split_nonempty(self.name, "test", pool, folder / self.split_dir)
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


# Train split of a full copy; each test list names test-size identities, and a trial's gallery
# holds one image of each.
PUBLISHED_STATS = {"train": PublishedSplit(13_164, 113_346)}
PUBLISHED_TEST_IDS = {800: 800, 1600: 1_600, 2400: 2_400}

VEHICLEID = register_dataset(
    VehicleIDLayout(
        name="VehicleID",
        dataset_dirs=("VehicleID_V1.0", "VehicleID"),
        image_dir="image",
        split_dir="train_test_split",
        train_list="train_list.txt",
        test_list="test_list_{size}.txt",
        test_sizes=(800, 1600, 2400),
        image_ext=".jpg",
        published=PUBLISHED_STATS,
        published_test_ids=PUBLISHED_TEST_IDS,
        object_class="vehicle",
    )
)
