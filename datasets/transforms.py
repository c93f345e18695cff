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

from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from yacs.config import CfgNode

# Random erasing as timm's RandomErasing(mode='pixel') used by the official code: area fraction
# U(0.02, 1/3), log-uniform aspect ratio in (0.3, 1/0.3), up to 10 placement tries, one box filled
# with per-pixel N(0, 1) noise in normalised space.
ERASE_SCALE = (0.02, 1.0 / 3.0)
ERASE_RATIO = (0.3, 1.0 / 0.3)


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


def build_train_transform(
    size: Sequence[int],
    flip_prob: float,
    padding: int,
    mean: Sequence[float],
    std: Sequence[float],
    erase_prob: float,
) -> v2.Compose:
    """Resize (bicubic) -> flip -> zero pad -> random crop -> [0, 1] -> normalise -> erase.

    Args:
        size: output (H, W).
        flip_prob: horizontal flip probability.
        padding: zero padding on every side before the random crop.
        mean: per-channel mean (3,).
        std: per-channel std (3,).
        erase_prob: random-erasing probability.

    Returns:
        A transform: uint8 [3, h, w] or PIL image -> float32 [3, H, W].
    """
    size = [int(size[0]), int(size[1])]
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=flip_prob),
            v2.Pad(padding, fill=0),
            v2.RandomCrop(size),
            ToNormalizedFloat(mean, std),
            v2.RandomErasing(p=erase_prob, scale=ERASE_SCALE, ratio=ERASE_RATIO, value="random"),
        ]
    )


def build_test_transform(
    size: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """Resize (bilinear, as the official test transform) -> [0, 1] -> normalise.

    Args:
        size: output (H, W).
        mean: per-channel mean (3,).
        std: per-channel std (3,).

    Returns:
        A deterministic transform: uint8 [3, h, w] or PIL image -> float32 [3, H, W].
    """
    size = [int(size[0]), int(size[1])]
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            ToNormalizedFloat(mean, std),
        ]
    )


def build_transforms(cfg: CfgNode) -> tuple[v2.Compose, v2.Compose]:
    """Build the train and test transforms from ``INPUT.*``.

    Args:
        cfg: configuration (INPUT.SIZE_TRAIN, SIZE_TEST, PROB, PADDING, PIXEL_MEAN, PIXEL_STD,
            RE_PROB).

    Returns:
        (train transform, test transform).
    """
    i = cfg.INPUT
    train = build_train_transform(
        i.SIZE_TRAIN, i.PROB, i.PADDING, i.PIXEL_MEAN, i.PIXEL_STD, i.RE_PROB
    )
    return train, build_test_transform(i.SIZE_TEST, i.PIXEL_MEAN, i.PIXEL_STD)
