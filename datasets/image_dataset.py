"""The torch side of the data: image decoding, the map-style ``ImageDataset`` and its collate.

Records (``datasets.bases.ImageRecord``) become samples here: :func:`read_image` decodes a file,
:class:`ImageDataset` applies a (seeded) transform and labels the image, :func:`collate_batch`
stacks samples into the batch dict every loop reads (``images``, ``pids``, ``camids``,
``viewids``, ``paths``).
"""

from __future__ import annotations

import logging
import os
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
