"""Custom data without code: identity folders ('folder') or one CSV/TSV list ('csv').

'folder': ``DATASETS.ROOT_DIR/{train,query,gallery}/<identity>/<images>``; an optional camera
token ``c<N>`` / ``cam<N>`` in the file name (e.g. ``img_c2_0001.jpg``) gives the camera.
'csv': ``DATASETS.LIST_FILE`` with a header naming ``path, pid, split`` and optionally
``camid, viewid``; comma- or tab-separated.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from datasets.bases import (
    SPLITS,
    DatasetFormatError,
    DatasetLayoutError,
    ImageRecord,
    ReIDDataset,
    check_split_nonempty,
    is_int,
    list_images,
    relabel_train,
    warn_skipped_files,
)
from datasets.layouts import DatasetOptions, Layout, register_dataset

logger = logging.getLogger(__name__)


def _key_map(names: Iterable[str]) -> dict[str, int]:
    """Map identity names to ints: their value when all are integers, else their sorted rank."""
    names = sorted(set(names))
    if all(is_int(n) for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}


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
        check_split_nonempty(name, split, rows[split], where)
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
        check_split_nonempty(name, split, out[split], where)
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
            loose = [p for p in (folder / sub).iterdir() if p.is_file()]
            warn_skipped_files(self.name, folder / sub, loose, "outside the identity folders")
            skipped: list[Path] = []
            for id_dir in sorted(p for p in (folder / sub).iterdir() if p.is_dir()):
                for path in list_images(id_dir, self.name, skipped):
                    m = cam_re.search(path.stem)
                    cam = int(m.group(1)) if m else None
                    rows[split].append((str(path), id_dir.name, cam, 0))
            warn_skipped_files(self.name, folder / sub, skipped)
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
        raw = [(reader.line_num, row) for row in reader]  # line_num: blank lines are skipped
        base = self._path_base([row for _, row in raw], list_file, root)
        rows: dict[str, list[tuple[str, str, int | None, int]]] = {s: [] for s in SPLITS}
        for lineno, row in raw:
            self._check_fields(row, columns, list_file, lineno)
            row = {k: v.strip() for k, v in row.items()}
            if not is_int(row["pid"]):
                raise DatasetFormatError(
                    f"{self.name}: {list_file}:{lineno}: pid {row['pid']!r} is not an integer "
                    "(identity labels are integers; -1 marks junk images)"
                )
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

    def _check_fields(self, row: dict, columns: list[str], list_file: Path, lineno: int) -> None:
        """Refuse a line with fewer or more fields than the header names."""
        missing = [c for c in columns if row.get(c) is None]
        if missing:
            raise DatasetFormatError(
                f"{self.name}: {list_file}:{lineno}: missing column(s) {missing}: the line has "
                f"{len(columns) - len(missing)} field(s), the header names {columns}"
            )
        extra = row.get(None)
        if extra:
            raise DatasetFormatError(
                f"{self.name}: {list_file}:{lineno}: {len(extra)} field(s) more than the header "
                f"names ({columns}): {extra}"
            )

    def _int_field(self, row: dict, key: str, list_file: Path, lineno: int) -> int | None:
        value = row.get(key, "")
        if value == "":
            return None
        if not is_int(value) or int(value) < 0:
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


FOLDER = register_dataset(
    FolderLayout(
        name="folder",
        dataset_dirs=("",),
        split_dirs=SPLITS,
        camera_pattern=r"(?:^|[_\-])c(?:am)?(\d+)",
    )
)

CSV = register_dataset(
    CsvLayout(
        name="csv",
        dataset_dirs=("",),
        required_columns=("path", "pid", "split"),
        optional_columns=("camid", "viewid"),
        split_names=SPLITS,
    )
)
