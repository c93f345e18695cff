"""Train/test transforms: shapes, values by hand, PIL agreement, random-erasing statistics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing

from configs.defaults import get_cfg_defaults
from datasets.bases import ImageRecord
from datasets.image_dataset import ImageDataset, SampleKey
from datasets.transforms import build_test_transform, build_train_transform, build_transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def constant_image(h: int, w: int, rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8)[:, None, None].expand(3, h, w).contiguous()


def test_test_transform_on_a_constant_image_by_hand():
    rgb = (40, 120, 200)
    out = build_test_transform((32, 16), MEAN, STD)(constant_image(45, 19, rgb))
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32
    for c in range(3):
        expected = (rgb[c] / 255 - MEAN[c]) / STD[c]
        assert torch.allclose(out[c], torch.full((32, 16), expected), atol=1e-5)
    pil = Image.new("RGB", (19, 45), rgb)
    assert torch.allclose(build_test_transform((32, 16), MEAN, STD)(pil), out, atol=1e-6)


def test_train_transform_flip_without_resize_by_hand():
    h, w = 16, 8
    img = torch.arange(3 * h * w, dtype=torch.int64).reshape(3, h, w).mul(5).remainder(256)
    img = img.to(torch.uint8)
    tf = build_train_transform((h, w), 1.0, 0, (0.5,) * 3, (0.5,) * 3, 0.0)
    expected = (img.flip(-1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(tf(img), expected, atol=1e-6)


def test_pad_and_random_crop_offsets():
    h, w, pad = 12, 8, 3
    tf = build_train_transform((h, w), 0.0, pad, (0.0,) * 3, (1.0,) * 3, 0.0)
    shifts = set()
    for _ in range(300):
        out = tf(constant_image(h, w, (255, 255, 255)))[0]
        inside = out > 0.5  # image pixels are 1.0, zero padding 0.0
        assert torch.all((out == 0) | (out == 1))
        rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
        top, left = int(rows[0]), int(cols[0])
        bottom, right = h - 1 - int(rows[-1]), w - 1 - int(cols[-1])
        # the image part is one rectangle touching the borders opposite its shift
        assert inside[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
        assert min(top, bottom) == 0 and min(left, right) == 0
        assert max(top, bottom) <= pad and max(left, right) <= pad
        shifts.add((top - bottom, left - right))
    # every offset in -pad..pad along each axis occurs
    assert {dy for dy, _ in shifts} == set(range(-pad, pad + 1))
    assert {dx for _, dx in shifts} == set(range(-pad, pad + 1))


def erased_boxes(outputs: list[torch.Tensor], value: float) -> list[tuple[int, int] | None]:
    boxes = []
    for out in outputs:
        diff = (out - value).abs().amax(0) > 1e-6
        if not diff.any():
            boxes.append(None)
            continue
        rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
        bh, bw = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert diff.sum() == bh * bw  # one filled rectangle
        boxes.append((bh, bw))
    return boxes


def test_random_erasing_statistics_match_timm():
    h, w, n = 64, 32, 1500
    torch.manual_seed(0)
    tf = build_train_transform((h, w), 0.0, 0, (0.0,) * 3, (1.0,) * 3, 0.5)
    img = constant_image(h, w, (0, 0, 0))
    ours = [tf(img) for _ in range(n)]
    boxes = erased_boxes(ours, 0.0)
    erased = [b for b in boxes if b is not None]
    assert abs(len(erased) / n - 0.5) < 0.05  # 4.5 binomial standard deviations
    for bh, bw in erased:
        assert 0.02 * 0.75 <= bh * bw / (h * w) <= (1 / 3) * 1.25
        assert 0.3 * 0.7 <= bh / bw <= (1 / 0.3) * 1.4
    noise = torch.cat([o[o != 0] for o in ours])
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02

    random.seed(0)
    timm_re = RandomErasing(probability=0.5, mode="pixel", max_count=1, device="cpu")
    theirs = erased_boxes([timm_re(torch.zeros(3, h, w)) for _ in range(n)], 0.0)
    timm_erased = [b for b in theirs if b is not None]
    area = np.mean([bh * bw for bh, bw in erased]) / (h * w)
    timm_area = np.mean([bh * bw for bh, bw in timm_erased]) / (h * w)
    assert abs(len(timm_erased) / n - 0.5) < 0.05
    assert abs(area - timm_area) < 0.015  # both about E[U(0.02, 1/3)] less rejected boxes


@pytest.mark.parametrize("src", [(128, 64), (384, 192)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_matches_pil(src, mode):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    if mode == "bicubic":  # train resize, checked without the random steps
        tf = build_train_transform((256, 128), 0.0, 0, (0.0,) * 3, (1.0,) * 3, 0.0)
        pil_mode = Image.Resampling.BICUBIC
    else:
        tf = build_test_transform((256, 128), (0.0,) * 3, (1.0,) * 3)
        pil_mode = Image.Resampling.BILINEAR
    ours = tf(torch.from_numpy(arr).permute(2, 0, 1)) * 255
    pil = torch.from_numpy(np.array(Image.fromarray(arr).resize((128, 256), pil_mode)))
    diff = (ours.permute(1, 2, 0) - pil.float()).abs()
    assert float(diff.max()) <= 1.0 + 1e-3 and float(diff.mean()) < 0.01


def test_build_transforms_reads_the_config():
    cfg = get_cfg_defaults()
    cfg.INPUT.SIZE_TRAIN = [48, 24]
    cfg.INPUT.SIZE_TEST = [40, 20]
    train, test = build_transforms(cfg)
    img = constant_image(30, 10, (1, 2, 3))
    assert train(img).shape == (3, 48, 24) and test(img).shape == (3, 40, 20)


def test_sample_seed_fixes_the_augmentation_and_spares_the_global_rng(tmp_path):
    path = tmp_path / "x.png"
    arr = np.random.default_rng(1).integers(0, 256, (32, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    tf = build_train_transform((32, 16), 0.5, 4, MEAN, STD, 0.5)
    ds = ImageDataset([ImageRecord(str(path), 3, 1, 0)], tf)
    torch.manual_seed(123)
    a = ds[SampleKey(0, 77)]["image"]
    after = torch.rand(3)
    torch.manual_seed(123)
    b = ds[SampleKey(0, 77)]["image"]
    assert torch.equal(a, b) and torch.equal(torch.rand(3), after)
    outs = {tuple(ds[SampleKey(0, s)]["image"].flatten()[:64].tolist()) for s in range(12)}
    assert len(outs) > 1  # other seeds, other augmentations
    assert math.isfinite(float(a.sum()))
