"""Train and test image transforms (torchvision transforms v2).

Both pipelines take a uint8 image tensor [3, H, W] (or a PIL image) and return a normalised
float32 tensor [3, H, W]. The geometric steps run on uint8 data, which is cheaper than on floats,
and give the same pixels as the official PIL pipeline up to resampling rounding: zero padding of a
uint8 image is the official black padding.

Resizing uses ``antialias=True``: the official code resized PIL images, and PIL always
antialiases (and its bicubic kernel is the one torch uses with antialiasing): the results agree
with PIL's to one grey level, where ``antialias=False`` differs by up to a hundred.

ToTensor + Normalize are fused into :class:`ToNormalizedFloat`: one pass that also turns the
channels-last layout the decoder and resize produce into a contiguous tensor, about twice as fast
as ``v2.ToDtype`` + ``v2.Normalize`` on that layout, with the same values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from yacs.config import CfgNode

# Random erasing as timm's RandomErasing(mode='pixel') used by the official code: area fraction
# U(0.02, 1/3), log-uniform aspect ratio in (0.3, 1/0.3), up to 10 placement tries, one box filled
# with per-pixel N(0, 1) noise in normalised space.
ERASE_SCALE = (0.02, 1.0 / 3.0)
ERASE_RATIO = (0.3, 1.0 / 0.3)

# INPUT.RE_MODE: 'pixel' (timm per-pixel noise, CLIP-ReID) or 'constant' (Zhong et al.'s random
# erasing filled with the INPUT.PIXEL_MEAN numbers, PCL-CLIP).
ERASE_MODES = ("pixel", "constant")
# INPUT.TEST_INTERPOLATION: the test resize (CLIP-ReID bilinear, PCL-CLIP bicubic).
TEST_INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


class ToNormalizedFloat:
    """uint8 image [3, H, W] (any memory layout) -> contiguous float32 ``(x / 255 - mean) / std``.

    The fused equivalent of ``ToTensor`` (or ``v2.ToDtype(float32, scale=True)``) followed by
    ``Normalize(mean, std)``.

    Args:
        mean: per-channel mean (3,), in [0, 1] units.
        std: per-channel std (3,).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean_t = torch.tensor([float(m) for m in mean]).view(-1, 1, 1)
        std_t = torch.tensor([float(s) for s in std]).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = mean_t / std_t

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Convert one image.

        Args:
            image: uint8 tensor [3, H, W].

        Returns:
            float32 tensor [3, H, W], contiguous.
        """
        x = image.as_subclass(torch.Tensor).to(torch.float32, memory_format=torch.contiguous_format)
        return x.mul_(self.scale).sub_(self.shift)

    def __repr__(self) -> str:
        """Name with the folded constants."""
        return f"{type(self).__name__}(scale={self.scale.flatten().tolist()}, shift=...)"


class ConstantRandomErasing:
    """Zhong et al.'s random erasing with a constant fill, as PCL-CLIP (and BoT) apply it.

    With probability ``p``: up to ``attempts`` times draw an area fraction ``U(area)`` of the
    image and an aspect ratio ``U(min_aspect, 1 / min_aspect)`` (uniform, not log-uniform), take
    ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``, and at the first box
    with ``h < H`` and ``w < W`` fill rows ``[top, top + h)`` and columns ``[left, left + w)``
    of channel c with ``fill[c]``, where ``top ~ U{0..H-h}`` and ``left ~ U{0..W-w}``.
    Applied after normalisation, the fill is the number itself in normalised space (PCL-CLIP
    passes ``INPUT.PIXEL_MEAN``, so 0.5 with its mean/std 0.5).

    The draws come from torch's default generator, in the order of the original code, so a
    sample seed fixes the result.

    Args:
        p: erasing probability.
        fill: per-channel fill value (3,), in the units of the input tensor.
        area: (min, max) fraction of the image area (0.02, 0.4 in the original).
        min_aspect: smallest aspect ratio h / w (0.3); the largest is its inverse.
        attempts: placement tries before giving up (100 in the original).
    """

    def __init__(
        self,
        p: float,
        fill: Sequence[float],
        area: tuple[float, float] = (0.02, 0.4),
        min_aspect: float = 0.3,
        attempts: int = 100,
    ) -> None:
        self.p = float(p)
        self.fill = torch.tensor([float(f) for f in fill]).view(-1, 1, 1)
        self.area = (float(area[0]), float(area[1]))
        self.aspect = (float(min_aspect), 1.0 / float(min_aspect))
        self.attempts = int(attempts)

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(()).item()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Erase one box of ``image`` in place (or none).

        Args:
            image: float tensor [C, H, W] (C = len(fill)).

        Returns:
            ``image``.
        """
        if self._uniform(0.0, 1.0) >= self.p:
            return image
        _, height, width = image.shape
        for _ in range(self.attempts):
            target = self._uniform(*self.area) * height * width
            aspect = self._uniform(*self.aspect)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                image[:, top : top + h, left : left + w] = self.fill.to(image.dtype)
                return image
        return image

    def __repr__(self) -> str:
        """Name with the settings."""
        return (
            f"{type(self).__name__}(p={self.p}, fill={self.fill.flatten().tolist()}, "
            f"area={self.area}, aspect={self.aspect}, attempts={self.attempts})"
        )


def build_train_transform(
    size: Sequence[int],
    flip_prob: float,
    padding: int,
    mean: Sequence[float],
    std: Sequence[float],
    erase_prob: float,
    erase_mode: str = "pixel",
) -> v2.Compose:
    """Resize (bicubic) -> flip -> zero pad -> random crop -> [0, 1] -> normalise -> erase.

    Args:
        size: output (H, W).
        flip_prob: horizontal flip probability.
        padding: zero padding on every side before the random crop.
        mean: per-channel mean (3,).
        std: per-channel std (3,).
        erase_prob: random-erasing probability.
        erase_mode: 'pixel' (timm's per-pixel noise boxes, CLIP-ReID) or 'constant'
            (:class:`ConstantRandomErasing` filled with ``mean``, PCL-CLIP).

    Returns:
        A transform: uint8 [3, h, w] or PIL image -> float32 [3, H, W].
    """
    size = [int(size[0]), int(size[1])]
    if erase_mode == "pixel":
        erase = v2.RandomErasing(p=erase_prob, scale=ERASE_SCALE, ratio=ERASE_RATIO, value="random")
    elif erase_mode == "constant":
        erase = ConstantRandomErasing(erase_prob, mean)
    else:
        raise ValueError(f"INPUT.RE_MODE = {erase_mode!r}; valid: {list(ERASE_MODES)}")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=flip_prob),
            v2.Pad(padding, fill=0),
            v2.RandomCrop(size),
            ToNormalizedFloat(mean, std),
            erase,
        ]
    )


def build_test_transform(
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
) -> v2.Compose:
    """Resize (bilinear as CLIP-ReID's test transform, or bicubic) -> [0, 1] -> normalise.

    Args:
        size: output (H, W).
        mean: per-channel mean (3,).
        std: per-channel std (3,).
        interpolation: 'bilinear' (CLIP-ReID) or 'bicubic' (PCL-CLIP).

    Returns:
        A deterministic transform: uint8 [3, h, w] or PIL image -> float32 [3, H, W].
    """
    size = [int(size[0]), int(size[1])]
    if interpolation not in TEST_INTERPOLATIONS:
        raise ValueError(
            f"INPUT.TEST_INTERPOLATION = {interpolation!r}; valid: {list(TEST_INTERPOLATIONS)}"
        )
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=TEST_INTERPOLATIONS[interpolation], antialias=True),
            ToNormalizedFloat(mean, std),
        ]
    )


def build_transforms(cfg: CfgNode) -> tuple[v2.Compose, v2.Compose]:
    """Build the train and test transforms from ``INPUT.*``.

    Args:
        cfg: configuration (INPUT.SIZE_TRAIN, SIZE_TEST, PROB, PADDING, PIXEL_MEAN, PIXEL_STD,
            RE_PROB, RE_MODE, TEST_INTERPOLATION).

    Returns:
        (train transform, test transform).
    """
    i = cfg.INPUT
    train = build_train_transform(
        i.SIZE_TRAIN, i.PROB, i.PADDING, i.PIXEL_MEAN, i.PIXEL_STD, i.RE_PROB, i.RE_MODE
    )
    test = build_test_transform(i.SIZE_TEST, i.PIXEL_MEAN, i.PIXEL_STD, i.TEST_INTERPOLATION)
    return train, test
