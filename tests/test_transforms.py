"""Train/test transforms: shapes, values by hand, PIL agreement, random-erasing statistics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data.random_erasing import RandomErasing

from configs.defaults import get_cfg_defaults
from datasets.bases import ImageRecord
from datasets.image_dataset import ImageDataset, SampleKey
from datasets.transforms import (
    ConstantRandomErasing,
    build_test_transform,
    build_train_transform,
    build_transforms,
)

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


# ------------------------------------------------------------------------------------------------
# PCL-CLIP's switches: bicubic test resize, constant-fill (Zhong) random erasing
# ------------------------------------------------------------------------------------------------
def test_test_interpolation_equals_torchvision_functional_resize():
    arr = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 150, 70), dtype=np.uint8))
    outs = {}
    for mode, tv_mode in (("bicubic", TF.InterpolationMode.BICUBIC), ("bilinear", None)):
        tv_mode = tv_mode or TF.InterpolationMode.BILINEAR
        ours = build_test_transform((64, 32), MEAN, STD, interpolation=mode)(arr)
        resized = TF.resize(arr, [64, 32], interpolation=tv_mode, antialias=True)
        expected = TF.normalize(resized.float() / 255.0, MEAN, STD)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        outs[mode] = ours
    assert (outs["bicubic"] - outs["bilinear"]).abs().max() > 0.05
    with pytest.raises(ValueError, match="TEST_INTERPOLATION"):
        build_test_transform((64, 32), MEAN, STD, interpolation="nearest")


class _TorchRandom:
    """python's ``random`` API (uniform, inclusive randint) drawing from torch's generator."""

    @staticmethod
    def uniform(a, b):
        return a + (b - a) * torch.rand(()).item()

    @staticmethod
    def randint(a, b):
        return int(torch.randint(a, b + 1, ()).item())


def zhong_random_erasing(img, rnd, probability=0.5, sl=0.02, sh=0.4, r1=0.3, mean=(0.5,) * 3):
    """Zhong et al.'s RandomErasing.__call__ as published (BoT, PCL-CLIP), ``rnd`` for random."""
    if rnd.uniform(0, 1) >= probability:
        return img
    for _attempt in range(100):
        area = img.size()[1] * img.size()[2]
        target_area = rnd.uniform(sl, sh) * area
        aspect_ratio = rnd.uniform(r1, 1 / r1)
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < img.size()[2] and h < img.size()[1]:
            x1 = rnd.randint(0, img.size()[1] - h)
            y1 = rnd.randint(0, img.size()[2] - w)
            img[0, x1 : x1 + h, y1 : y1 + w] = mean[0]
            img[1, x1 : x1 + h, y1 : y1 + w] = mean[1]
            img[2, x1 : x1 + h, y1 : y1 + w] = mean[2]
            return img
    return img


def test_constant_erasing_equals_the_original_under_a_fixed_seed():
    fill = (0.5, 0.25, -0.75)
    ours_tf = ConstantRandomErasing(0.5, fill)
    erased = 0
    # 20 x 9: small enough that many boxes are rejected, so the retry loop is exercised.
    for seed in range(300):
        img = torch.randn(3, 20, 9, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        ours = ours_tf(img.clone())
        torch.manual_seed(seed)
        theirs = zhong_random_erasing(img.clone(), _TorchRandom(), mean=fill)
        assert torch.equal(ours, theirs), seed
        erased += not torch.equal(ours, img)
    assert 120 < erased < 180


def test_constant_erasing_statistics_match_the_original_with_python_random():
    h, w, n = 64, 32, 2000

    def boxes_of(fn):
        out = []
        for _ in range(n):
            img = fn(torch.zeros(3, h, w))
            out.append(erased_boxes([img], 0.0)[0])
        return [b for b in out if b is not None]

    torch.manual_seed(0)
    ours = boxes_of(ConstantRandomErasing(0.5, (1.0, 1.0, 1.0)))
    random.seed(0)
    theirs = boxes_of(lambda x: zhong_random_erasing(x, random, mean=(1.0, 1.0, 1.0)))
    for boxes in (ours, theirs):
        assert abs(len(boxes) / n - 0.5) < 0.05
        for bh, bw in boxes:
            assert 0.02 * 0.75 <= bh * bw / (h * w) <= 0.4 * 1.25
    area = [np.mean([bh * bw for bh, bw in b]) / (h * w) for b in (ours, theirs)]
    aspect = [np.mean([bh / bw for bh, bw in b]) for b in (ours, theirs)]
    assert abs(area[0] - area[1]) < 0.015 and abs(aspect[0] - aspect[1]) < 0.12
    # Uniform aspect ratios: mean h / w well above the log-uniform (timm) one of 'pixel' mode.
    torch.manual_seed(0)
    pixel = build_train_transform((h, w), 0.0, 0, (0.0,) * 3, (1.0,) * 3, 1.0)
    timm_like = erased_boxes([pixel(constant_image(h, w, (0, 0, 0))) for _ in range(n)], 0.0)
    timm_aspect = np.mean([bh / bw for bh, bw in (b for b in timm_like if b is not None)])
    assert aspect[0] > timm_aspect + 0.2


def test_train_transform_constant_mode_fills_the_pixel_mean():
    mean = (0.1, 0.2, 0.3)
    tf = build_train_transform((40, 20), 0.0, 0, mean, (1.0,) * 3, 1.0, erase_mode="constant")
    assert isinstance(tf.transforms[-1], ConstantRandomErasing)
    torch.manual_seed(1)
    out = tf(constant_image(40, 20, (0, 0, 0)))
    # Black normalises to -mean; the box holds +mean (the numbers, in normalised space).
    box = out[0] != -0.1
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert int(box.sum()) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) > 0
    for c, m in enumerate(mean):
        torch.testing.assert_close(out[c][box], torch.full((int(box.sum()),), m))
    with pytest.raises(ValueError, match="RE_MODE"):
        build_train_transform((40, 20), 0.0, 0, mean, (1.0,) * 3, 1.0, erase_mode="zero")


def test_build_transforms_reads_the_pcl_switches():
    cfg = get_cfg_defaults()
    cfg.INPUT.SIZE_TEST = [40, 20]
    cfg.INPUT.RE_MODE, cfg.INPUT.TEST_INTERPOLATION = "constant", "bicubic"
    train, test = build_transforms(cfg)
    assert isinstance(train.transforms[-1], ConstantRandomErasing)
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 50, 30), dtype=np.uint8))
    bicubic = build_test_transform((40, 20), cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD, "bicubic")
    assert torch.equal(test(img), bicubic(img))
