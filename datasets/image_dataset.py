"""The torch side of the data: image decoding, the map-style ``ImageDataset`` and its collate.

Records (``datasets.bases.ImageRecord``) become samples here: :func:`read_image` decodes a file,
:class:`ImageDataset` applies a (seeded) transform and labels the image, :func:`collate_batch`
stacks samples into the batch dict every loop reads (``images``, ``pids``, ``camids``,
``viewids``, ``paths``).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2.functional import pil_to_tensor

from datasets.bases import CorruptImageError, ImageRecord

try:  # libjpeg-turbo decoders: ~2x faster than PIL on small JPEGs (deprecated in torchvision 0.29)
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # a torchvision without them: PIL reads every file
    decode_image = None

logger = logging.getLogger(__name__)


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
        reason = str(err) or type(err).__name__
        if not os.path.exists(path):
            reason = "no such file"
        elif first is not None:
            reason += f" (torchvision: {str(first).splitlines()[-1]})"
        raise CorruptImageError(
            f"cannot read image '{path}': {reason}. "
            "Set DATASETS.SKIP_CORRUPT True to skip unreadable images.",
            path=path,
            reason=reason,
        ) from err


class UnreadableImage(NamedTuple):
    """An image that :func:`read_image` cannot read.

    Attributes:
        path: the file.
        reason: the decoder's (or file system's) reason.
    """

    path: str
    reason: str


# A JPEG ends with the end-of-image marker; a file cut short (interrupted copy or download) does
# not. The marker may be followed by a few padding bytes, so the last bytes are searched.
_JPEG_EOI = b"\xff\xd9"
_JPEG_TAIL = 64


def _header_problem(path: str) -> str | None:
    """Cheap test of one file: PIL header parse and ``verify()`` (no pixel decoding), plus the
    JPEG end marker. Returns a reason when the file looks unreadable, else None."""
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()  # PNG: chunk CRCs through IEND; JPEG: markers only
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _JPEG_TAIL))
                if _JPEG_EOI not in f.read():
                    return "no JPEG end-of-image marker (truncated file?)"
    except Exception as err:  # any failure to parse the header means the file is suspect
        return str(err) or type(err).__name__
    return None


def check_images_readable(
    records: Iterable[ImageRecord], what: str, decode: bool = False
) -> list[UnreadableImage]:
    """Find the images that cannot be read, without decoding them all.

    Each file gets a cheap header check (PIL ``open`` + ``verify``, the JPEG end marker: about
    0.1 ms per small JPEG); a file that fails it is confirmed with :func:`read_image`, the
    decoder training uses, so a file is reported exactly when reading it would fail (a
    corruption inside the compressed data of a well-formed file is only found with
    ``decode=True``).

    Args:
        records: the images (a path listed twice is checked once).
        what: what they are, for the log line (e.g. ``'market1501 query/gallery'``).
        decode: decode every image fully with :func:`read_image` (2-3x slower on small JPEGs).

    Returns:
        The unreadable images, in record order.
    """
    paths = list(dict.fromkeys(r.path for r in records))
    start = time.perf_counter()
    bad = []
    for path in paths:
        if decode or _header_problem(path) is not None:
            try:
                read_image(path)
            except CorruptImageError as err:
                bad.append(UnreadableImage(path, err.reason))
    logger.info(
        "%s: %d image(s) checked in %.1f s (%s), %d unreadable",
        what,
        len(paths),
        time.perf_counter() - start,
        "full decode" if decode else "header check",
        len(bad),
    )
    return bad


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
            same identity) and count them in a warning, instead of raising. For training sets
            only: in a query/gallery set a replaced image would be evaluated as the one it
            replaces; there the unreadable images are left out of the records instead
            (``datasets.build.check_eval_images``).

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
                    "cannot read image '%s': %s; replaced by another image of the same identity "
                    "(%d unreadable image(s) skipped so far in this process)",
                    err.path,
                    err.reason,
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
