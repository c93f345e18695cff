"""Synthetic ReID data: procedurally drawn people or vehicles in the Market-1501 layout.

Identity is carried by several discrete attributes drawn from small palettes (so identities share
some of them): for people the colours of shirt, trousers, hair, skin and shoes, a shirt pattern
(plain, horizontal or vertical stripes, checks), sleeve and trouser length, body proportions and
an accessory (backpack, shoulder bag, hat); for vehicles the body colour and type, window tint,
wheel size and rim colour, a side stripe, a roof rack and the light colour. No two identities
share every attribute. Each camera has its own viewpoint (offset, scale, facing, vehicle
obliqueness), illumination (per-channel colour cast and brightness), blur, noise level and
background; every image adds pose and colour jitter. A random-weight network therefore scores
low, while a network trained on the train identities can learn the attributes.

Same arguments, same bytes: every random draw comes from a generator seeded by the seed and the
(identity, camera, image) indices, and images are written with fixed encoder settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.bases import ReIDDataset
from datasets.layouts import DatasetOptions, Layout, register_dataset
from datasets.market1501 import MARKET1501

logger = logging.getLogger(__name__)

# What the generator draws (DATASETS.SYNTHETIC.MODE).
SYNTHETIC_MODES = ("person", "vehicle")

MARKET_DIR = MARKET1501.dataset_dirs[0]
MARKER = "synthetic.json"
# Bumped whenever the drawing changes, so cached datasets of an older version are not reused.
GENERATOR_VERSION = 1
SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap antialiasing
JPEG_QUALITY = 90

PALETTE = np.array(
    [
        (200, 30, 30),  # red
        (30, 60, 170),  # blue
        (30, 130, 50),  # green
        (230, 200, 40),  # yellow
        (240, 240, 235),  # white
        (25, 25, 25),  # black
        (120, 120, 125),  # grey
        (130, 70, 30),  # brown
        (120, 40, 140),  # purple
        (240, 130, 30),  # orange
        (90, 170, 210),  # light blue
        (220, 130, 170),  # pink
    ],
    dtype=np.float64,
)
SKIN = np.array([(240, 200, 170), (210, 160, 120), (160, 110, 70), (100, 65, 40)], float)
HAIR = np.array([(20, 15, 10), (90, 55, 25), (200, 170, 90), (150, 150, 150), (160, 60, 20)], float)
TINT = np.array([(40, 50, 60), (150, 190, 210), (20, 20, 25)], float)
LIGHT = np.array([(250, 250, 220), (255, 190, 60)], float)


@dataclass(frozen=True)
class _Camera:
    """One camera's rendering settings (fractions of the image size)."""

    offset: float  # horizontal shift of the subject
    scale: float  # subject height (person) or length (vehicle)
    mirror: bool  # subject faces the other way
    squash: float  # horizontal squeeze: an oblique view of a vehicle
    gains: tuple[float, float, float]  # per-channel colour cast x brightness
    blur: float  # Gaussian blur radius in output pixels
    noise: float  # std of additive noise (0..255 scale)
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    horizon: float
    clutter: tuple[tuple[float, float, float, float, int, int, int], ...]


def _camera(seed: int, cam: int) -> _Camera:
    rng = np.random.default_rng([seed, 1, cam])
    cast = rng.uniform(0.82, 1.18, 3) * rng.uniform(0.8, 1.12)
    clutter = tuple(
        (
            *sorted(rng.uniform(0, 1, 2).tolist()),
            *sorted(rng.uniform(0, 0.7, 2).tolist()),
            *rng.integers(30, 230, 3).tolist(),
        )
        for _ in range(int(rng.integers(2, 5)))
    )
    return _Camera(
        offset=float(rng.uniform(-0.12, 0.12)),
        scale=float(rng.uniform(0.72, 0.95)),
        mirror=bool(rng.integers(2)),
        squash=float(rng.uniform(0.65, 1.0)),
        gains=tuple(cast.tolist()),
        blur=float(rng.uniform(0.0, 1.0)),
        noise=float(rng.uniform(2.0, 9.0)),
        sky=tuple(rng.integers(60, 230, 3).tolist()),
        ground=tuple(rng.integers(40, 200, 3).tolist()),
        horizon=float(rng.uniform(0.55, 0.8)),
        clutter=clutter,
    )


def _person_attributes(rng: np.random.Generator) -> dict[str, Any]:
    shirt = int(rng.integers(len(PALETTE)))
    return {
        "skin": int(rng.integers(len(SKIN))),
        "hair": int(rng.integers(len(HAIR))),
        "shirt": shirt,
        "pattern": int(rng.integers(4)),  # plain, h-stripes, v-stripes, checks
        "pattern_color": int((shirt + rng.integers(1, len(PALETTE))) % len(PALETTE)),
        "long_sleeves": bool(rng.integers(2)),
        "trousers": int(rng.integers(len(PALETTE))),
        "shorts": bool(rng.random() < 0.3),
        "shoes": int(rng.choice([5, 4, 7])),
        "height": int(rng.integers(3)),
        "width": int(rng.integers(3)),
        "accessory": int(rng.integers(4)),  # none, backpack, shoulder bag, hat
        "accessory_color": int(rng.integers(len(PALETTE))),
    }


def _vehicle_attributes(rng: np.random.Generator) -> dict[str, Any]:
    body = int(rng.integers(len(PALETTE)))
    return {
        "body": body,
        "type": int(rng.integers(5)),  # sedan, hatchback, SUV, van, pickup
        "tint": int(rng.integers(len(TINT))),
        "wheel": int(rng.integers(2)),
        "rim": int(rng.choice([4, 6, 5])),
        "stripe": int(rng.integers(3)),  # none, one, two
        "stripe_color": int((body + rng.integers(1, len(PALETTE))) % len(PALETTE)),
        "rack": bool(rng.random() < 0.35),
        "light": int(rng.integers(len(LIGHT))),
    }


def _signature(attrs: dict[str, Any]) -> tuple:
    """The attributes that define an identity (accessory colour matters only with one)."""
    items = dict(attrs)
    if items.get("accessory") == 0:
        items.pop("accessory_color")
    if items.get("pattern") == 0:
        items.pop("pattern_color")
    if items.get("stripe") == 0:
        items.pop("stripe_color")
    return tuple(sorted(items.items()))


def _colour(table: np.ndarray, i: int, rng: np.random.Generator, jitter: float = 12.0) -> tuple:
    c = table[i] + rng.normal(0.0, jitter, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _draw_background(draw: ImageDraw.ImageDraw, w: int, h: int, cam: _Camera, rng) -> None:
    """Camera scenery (colours, horizon, fixed clutter) with per-image changes and clutter."""
    hy = int(h * (cam.horizon + rng.uniform(-0.08, 0.08)))
    sky = np.clip(np.asarray(cam.sky) + rng.normal(0, 25, 3), 0, 255).astype(int)
    ground = np.clip(np.asarray(cam.ground) + rng.normal(0, 25, 3), 0, 255).astype(int)
    draw.rectangle([0, 0, w, hy], fill=tuple(sky.tolist()))
    draw.rectangle([0, hy, w, h], fill=tuple(ground.tolist()))
    shift = rng.uniform(-0.25, 0.25)
    shapes = [c for c in cam.clutter if rng.random() < 0.7]
    for _ in range(int(rng.integers(0, 3))):  # passers-by, parked things: per-image clutter
        x0, y0 = rng.uniform(0, 1), rng.uniform(0, 0.9)
        x1, y1 = x0 + rng.uniform(0.05, 0.3), y0 + rng.uniform(0.05, 0.4)
        shapes.append((x0, x1, y0, y1, *rng.integers(20, 235, 3).tolist()))
    for x0, x1, y0, y1, r, g, b in shapes:
        box = [int((x0 + shift) * w), int(y0 * h), int((x1 + shift) * w), int(y1 * h) + 1]
        draw.rectangle(box, fill=(int(r), int(g), int(b)))


def _box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """A rectangle with ordered corners (mirrored drawings swap them)."""
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


def _pattern(draw, box, kind: int, colour: tuple, step: float) -> None:
    x0, y0, x1, y1 = box
    s = max(2, int(step))
    if kind == 1:
        for y in range(int(y0), int(y1), 2 * s):
            draw.rectangle([x0, y, x1, min(y + s - 1, y1)], fill=colour)
    elif kind == 2:
        for x in range(int(x0), int(x1), 2 * s):
            draw.rectangle([x, y0, min(x + s - 1, x1), y1], fill=colour)
    elif kind == 3:
        for j, y in enumerate(range(int(y0), int(y1), s)):
            for i, x in enumerate(range(int(x0), int(x1), s)):
                if (i + j) % 2 == 0:
                    draw.rectangle([x, y, min(x + s - 1, x1), min(y + s - 1, y1)], fill=colour)


def _draw_person(draw, w: int, h: int, a: dict, cam: _Camera, rng) -> None:
    height = h * cam.scale * (0.9, 0.96, 1.02)[a["height"]] * rng.uniform(0.97, 1.03)
    feet = h * rng.uniform(0.95, 0.98)
    top = feet - height
    cx = w * (0.5 + cam.offset + rng.uniform(-0.04, 0.04))
    side = -1 if cam.mirror else 1
    skin, hair = _colour(SKIN, a["skin"], rng, 6), _colour(HAIR, a["hair"], rng, 6)
    shirt = _colour(PALETTE, a["shirt"], rng)
    trousers = _colour(PALETTE, a["trousers"], rng)
    acc = _colour(PALETTE, a["accessory_color"], rng)
    r = height * 0.075
    tw = height * (0.19, 0.23, 0.27)[a["width"]] * rng.uniform(0.96, 1.04)
    t0 = top + 2 * r + height * 0.01
    t1 = t0 + height * 0.33
    if a["accessory"] == 1:  # backpack: a block behind the torso, sticking out on its back side
        draw.rectangle(_box(cx - side * tw * 0.85, t0 + 2, cx, t1 - tw * 0.2), fill=acc)
    # legs
    spread = tw * rng.uniform(0.0, 0.25)
    lw = tw * 0.42
    knee = t1 + (feet - t1) * 0.5
    for sgn in (-1, 1):
        x0 = cx + sgn * spread / 2 - lw / 2 + sgn * tw * 0.13
        box = _box(x0, t1, x0 + lw, feet - r * 0.4)
        draw.rectangle(box, fill=trousers)
        if a["shorts"]:
            draw.rectangle([box[0] + 1, knee, box[2] - 1, box[3]], fill=skin)
        draw.ellipse(
            _box(box[0] - side, feet - r * 0.7, box[2] + side * r * 0.4, feet),
            fill=_colour(PALETTE, a["shoes"], rng, 6),
        )
    # torso with its pattern
    torso = [cx - tw / 2, t0, cx + tw / 2, t1]
    draw.rounded_rectangle(torso, radius=tw * 0.15, fill=shirt)
    _pattern(draw, torso, a["pattern"], _colour(PALETTE, a["pattern_color"], rng), tw / 6)
    # arms
    arm_w = tw * 0.2
    for sgn in (-1, 1):
        swing = rng.uniform(-0.12, 0.12) * height
        x_sh = cx + sgn * (tw / 2 + arm_w / 2)
        elbow = (x_sh + swing * 0.3, t0 + (t1 - t0) * 0.55)
        hand = (x_sh + swing * 0.6, t1 + height * 0.03)
        lower = shirt if a["long_sleeves"] else skin
        draw.line([(x_sh, t0 + arm_w / 2), elbow], fill=shirt, width=max(2, int(arm_w)))
        draw.line([elbow, hand], fill=lower, width=max(2, int(arm_w * 0.9)))
    if a["accessory"] == 2:  # shoulder bag: strap across the torso, bag at the hip
        draw.line(
            [(cx - side * tw / 2, t0), (cx + side * tw / 2, t1 - 2)],
            fill=acc,
            width=max(2, int(tw * 0.08)),
        )
        bx = cx + side * tw * 0.55
        draw.rectangle(
            _box(bx - tw * 0.22, t1 - tw * 0.35, bx + tw * 0.22, t1 + tw * 0.1), fill=acc
        )
    elif a["accessory"] == 1:  # backpack straps
        for dx in (-0.25, 0.25):
            x = cx + dx * tw
            draw.line([(x, t0), (x, t1 - tw * 0.3)], fill=acc, width=max(2, int(tw * 0.07)))
    # head, hair, hat
    hc = (cx + side * r * 0.1, top + r)
    draw.ellipse([hc[0] - r * 0.85, hc[1] - r, hc[0] + r * 0.85, hc[1] + r], fill=skin)
    draw.chord(
        [hc[0] - r * 0.9, hc[1] - r * 1.05, hc[0] + r * 0.9, hc[1] + r * 0.5], 180, 360, hair
    )
    if a["accessory"] == 3:
        draw.rectangle([hc[0] - r, hc[1] - r * 1.5, hc[0] + r, hc[1] - r * 0.5], fill=acc)
        draw.rectangle(
            [hc[0] - r * 1.4, hc[1] - r * 0.65, hc[0] + r * 1.4, hc[1] - r * 0.4], fill=acc
        )


# Vehicle types: (length factor, body height / length, cabin start, cabin end, cabin height).
VEHICLE_TYPES = (
    (0.92, 0.22, 0.28, 0.72, 0.75),  # sedan
    (0.80, 0.25, 0.30, 0.95, 0.80),  # hatchback
    (0.90, 0.30, 0.20, 0.92, 0.85),  # SUV
    (0.98, 0.38, 0.08, 0.98, 0.75),  # van
    (0.98, 0.26, 0.12, 0.45, 0.90),  # pickup
)


def _draw_vehicle(draw, w: int, h: int, a: dict, cam: _Camera, rng) -> None:
    lf, hf, c0, c1, ch = VEHICLE_TYPES[a["type"]]
    length = w * cam.scale * lf * cam.squash * rng.uniform(0.96, 1.04)
    body_h = w * cam.scale * lf * hf * rng.uniform(0.97, 1.03)
    ground = h * rng.uniform(0.8, 0.86)
    wheel_r = body_h * (0.33, 0.42)[a["wheel"]]
    x0 = w * (0.5 + cam.offset * 0.5 + rng.uniform(-0.03, 0.03)) - length / 2
    by1 = ground - wheel_r * 0.6
    by0 = by1 - body_h

    def fx(f: float) -> float:  # position along the vehicle; the front is at f = 1
        return x0 + length * (1.0 - f if cam.mirror else f)

    body = _colour(PALETTE, a["body"], rng)
    tint = _colour(TINT, a["tint"], rng, 6)
    cab_top = by0 - body_h * ch
    cab = [(fx(c0), by0), (fx(c0 + 0.08), cab_top), (fx(c1 - 0.12), cab_top), (fx(c1), by0)]
    draw.polygon(cab, fill=body)
    win = [
        (fx(c0 + 0.05), by0 - 1),
        (fx(c0 + 0.1), cab_top + body_h * 0.12),
        (fx(c1 - 0.13), cab_top + body_h * 0.12),
        (fx(c1 - 0.04), by0 - 1),
    ]
    draw.polygon(win, fill=tint)
    mid = (c0 + c1) / 2
    draw.line([(fx(mid), cab_top), (fx(mid), by0)], fill=body, width=max(2, int(length * 0.02)))
    if a["rack"]:
        box = _box(fx(c0 + 0.1), cab_top - body_h * 0.12, fx(c1 - 0.14), cab_top - body_h * 0.04)
        draw.rectangle(box, fill=(30, 30, 30))
    draw.rounded_rectangle(_box(fx(0), by0, fx(1), by1), radius=body_h * 0.25, fill=body)
    stripe = _colour(PALETTE, a["stripe_color"], rng)
    for k in range(a["stripe"]):
        y = by0 + body_h * (0.35 + 0.22 * k)
        draw.rectangle(_box(fx(0.03), y, fx(0.97), y + body_h * 0.1), fill=stripe)
    light = _colour(LIGHT, a["light"], rng, 4)
    draw.rectangle(_box(fx(0.97), by0 + body_h * 0.15, fx(1.0), by0 + body_h * 0.4), fill=light)
    draw.rectangle(
        _box(fx(0.0), by0 + body_h * 0.15, fx(0.025), by0 + body_h * 0.35), fill=(200, 20, 20)
    )
    rim = _colour(PALETTE, a["rim"], rng, 6)
    for f in (0.18, 0.8):
        cx = fx(f)
        draw.ellipse([cx - wheel_r, ground - 2 * wheel_r, cx + wheel_r, ground], fill=(15, 15, 15))
        rr = wheel_r * 0.5
        draw.ellipse([cx - rr, ground - wheel_r - rr, cx + rr, ground - wheel_r + rr], fill=rim)


def _render(
    size: tuple[int, int], mode: str, attrs: dict | None, cam: _Camera, rng: np.random.Generator
) -> Image.Image:
    """Draw one image; ``attrs`` None draws the background only (junk images)."""
    h, w = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, w, h, cam, rng)
    if attrs is not None:
        (_draw_person if mode == "person" else _draw_vehicle)(draw, w, h, attrs, cam, rng)
    radius = (cam.blur + rng.uniform(0.0, 0.3)) * SUPERSAMPLE
    if radius > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    img = img.resize((size[1], size[0]), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    gains = np.asarray(cam.gains, np.float32) * rng.uniform(0.92, 1.08)
    arr = arr * gains + rng.normal(0.0, cam.noise, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def _unique_attributes(
    rng: np.random.Generator, mode: str, count: int, taken: set[tuple]
) -> list[dict[str, Any]]:
    draw = _person_attributes if mode == "person" else _vehicle_attributes
    out = []
    for _ in range(count):
        for _attempt in range(1000):
            attrs = draw(rng)
            if _signature(attrs) not in taken:
                break
        else:
            raise ValueError(f"cannot draw {count} distinct {mode} identities; use fewer")
        taken.add(_signature(attrs))
        out.append(attrs)
    return out


def _check_generator_args(
    mode: str,
    image_format: str,
    num_ids: int,
    num_cameras: int,
    images_per_id_cam: int,
    size: Sequence[int],
) -> tuple[int, int]:
    """Validate the arguments of :func:`generate_synthetic_reid`; returns ``size`` as ints."""
    if mode not in SYNTHETIC_MODES:
        raise ValueError(f"mode must be one of {SYNTHETIC_MODES}, got {mode!r}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if not 4 <= num_ids <= 9999 or num_cameras < 2 or num_cameras > 9 or images_per_id_cam < 2:
        raise ValueError(
            "need 4 <= num_ids <= 9999, 2 <= num_cameras <= 9 and images_per_id_cam >= 2; got "
            f"{num_ids}, {num_cameras}, {images_per_id_cam}"
        )
    hw = (int(size[0]), int(size[1]))
    if min(hw) < 16:
        raise ValueError(f"size {hw} is too small: use at least 16 x 16")
    return hw


def _save_market_image(
    img: Image.Image, folder: Path, pid: int, cam: int, frame: int, k: int, ext: str
) -> None:
    """Save under a Market-1501 name ``0002_c1s1_000451_03.jpg`` (junk: ``-1_c1s1_...``)."""
    prefix = f"{pid:04d}" if pid >= 0 else str(pid)
    path = folder / f"{prefix}_c{cam + 1}s1_{frame:06d}_{k:02d}.{ext}"
    if ext == "jpg":
        img.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False)
    else:
        img.save(path, format="PNG", compress_level=6, optimize=False)


def generate_synthetic_reid(
    root: str | os.PathLike,
    num_ids: int = 64,
    num_cameras: int = 4,
    images_per_id_cam: int = 3,
    size: Sequence[int] = (128, 64),
    mode: str = "person",
    seed: int = 0,
    image_format: str = "jpg",
    num_distractors: int | None = None,
    num_junk: int | None = None,
) -> Path:
    """Write a synthetic ReID dataset in the Market-1501 layout.

    Identities 1..num_ids are shuffled; the first half (rounded down) is the training set, the
    rest the test set (so train pids are not contiguous). Every identity appears in every camera,
    ``images_per_id_cam`` times. For each test identity and camera one image goes to ``query``
    and the others to ``bounding_box_test``, which also gets distractors (pid 0, identities not
    in the dataset) and junk images (pid -1, background only). File names follow Market-1501:
    ``0002_c1s1_000451_03.jpg``.

    Args:
        root: folder that receives ``Market-1501-v15.09.15/``.
        num_ids: identities in total (train + test), at least 4.
        num_cameras: cameras, at least 2 (a query needs a match in another camera).
        images_per_id_cam: images per identity and camera, at least 2 (one query, one gallery).
        size: image (H, W).
        mode: 'person' or 'vehicle'.
        seed: generator seed; same arguments and seed give the same bytes.
        image_format: 'jpg' (quality 90) or 'png'.
        num_distractors: pid-0 gallery images; default max(2, test ids // 4).
        num_junk: pid -1 gallery images; default max(2, test ids // 8).

    Returns:
        The dataset folder ``root/Market-1501-v15.09.15``.

    Raises:
        ValueError: an argument out of range.
    """
    size = _check_generator_args(mode, image_format, num_ids, num_cameras, images_per_id_cam, size)
    rng = np.random.default_rng([seed, 0])
    pids = (rng.permutation(num_ids) + 1).tolist()
    train_pids = sorted(pids[: num_ids // 2])
    test_pids = sorted(pids[num_ids // 2 :])
    taken: set[tuple] = set()
    attrs = dict(zip(sorted(pids), _unique_attributes(rng, mode, num_ids, taken), strict=True))
    n_test = len(test_pids)
    num_distractors = max(2, n_test // 4) if num_distractors is None else num_distractors
    num_junk = max(2, n_test // 8) if num_junk is None else num_junk
    distractors = _unique_attributes(rng, mode, num_distractors, taken)
    cams = [_camera(seed, c) for c in range(num_cameras)]

    folder = Path(root) / MARKET_DIR
    dirs = {s: folder / s for s in ("bounding_box_train", "query", "bounding_box_test")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    def save(img: Image.Image, split: str, pid: int, cam: int, frame: int, k: int) -> None:
        _save_market_image(img, dirs[split], pid, cam, frame, k, image_format)

    for pid in sorted(pids):
        for c, cam in enumerate(cams):
            query_k = int(np.random.default_rng([seed, 2, pid, c]).integers(images_per_id_cam))
            for k in range(images_per_id_cam):
                img = _render(
                    size, mode, attrs[pid], cam, np.random.default_rng([seed, 3, pid, c, k])
                )
                split = "bounding_box_train"
                if pid in test_pids:
                    split = "query" if k == query_k else "bounding_box_test"
                save(img, split, pid, c, 1 + (pid * 97 + c * 1009 + k * 31) % 999_983, k)
    for i, a in enumerate(distractors):
        c = i % num_cameras
        img = _render(size, mode, a, cams[c], np.random.default_rng([seed, 4, i]))
        save(img, "bounding_box_test", 0, c, 500_000 + i, 0)
    for i in range(num_junk):
        c = i % num_cameras
        img = _render(size, mode, None, cams[c], np.random.default_rng([seed, 5, i]))
        save(img, "bounding_box_test", -1, c, 600_000 + i, 0)
    counts = (len(train_pids), n_test, num_cameras, images_per_id_cam, num_distractors, num_junk)
    logger.info(
        "synthetic %s data: %d train ids, %d test ids, %d cameras, %d images per id and camera, "
        "%d distractors, %d junk -> %s",
        mode,
        *counts,
        folder,
    )
    return folder


@dataclass(frozen=True)
class SyntheticLayout(Layout):
    """The 'synthetic' dataset: generated on first use under ``ROOT_DIR/<folder>/<tag>``.

    The tag names every generator argument, so different settings never share a folder.
    Generation goes to a temporary folder renamed into place, so concurrent processes are safe.

    Attributes:
        folder: sub-folder of ``DATASETS.ROOT_DIR`` holding the generated datasets.
    """

    folder: str = "synthetic"

    def class_word(self, options: DatasetOptions) -> str:
        return str(options.synthetic.get("mode", self.object_class))

    def required(self, options: DatasetOptions) -> list[str]:
        return []

    def tree(self, options: DatasetOptions) -> list[tuple[int, str, str]]:
        return [(1, self.folder + "/", "generated on first use from DATASETS.SYNTHETIC")]

    def params(self, options: DatasetOptions) -> dict[str, Any]:
        """Generator arguments: the defaults of :func:`generate_synthetic_reid`, overridden.

        Args:
            options: dataset settings (``options.synthetic``).

        Returns:
            Keyword arguments for :func:`generate_synthetic_reid` (without ``root``).
        """
        params = {
            "num_ids": 64,
            "num_cameras": 4,
            "images_per_id_cam": 3,
            "size": [128, 64],
            "mode": "person",
            "seed": 0,
        }
        params.update(options.synthetic)
        params["size"] = [int(v) for v in params["size"]]
        return params

    def load(self, root: str | os.PathLike, options: DatasetOptions) -> ReIDDataset:
        params = self.params(options)
        size = params["size"]
        tag = (
            f"{params['mode']}_n{params['num_ids']}_c{params['num_cameras']}_"
            f"k{params['images_per_id_cam']}_{size[0]}x{size[1]}_s{params['seed']}"
            f"_v{GENERATOR_VERSION}"
        )
        base = Path(root).expanduser() / self.folder / tag
        ensure_generated(base, params)
        market = dataclasses.replace(
            MARKET1501,
            name=self.name,
            dataset_dirs=(MARKET_DIR,),
            num_cameras=int(params["num_cameras"]),
            published=None,
        )
        return market.load(base, options)


def ensure_generated(base: Path, params: dict[str, Any]) -> None:
    """Generate the synthetic dataset into ``base`` unless it is already there.

    Args:
        base: target folder (receives ``Market-1501-v15.09.15/`` and a parameter file).
        params: keyword arguments of :func:`generate_synthetic_reid`.

    Raises:
        FileExistsError: ``base`` exists but was not written by this generator.
    """
    marker = base / MARKER
    expected = {**params, "version": GENERATOR_VERSION}
    if marker.is_file():
        if json.loads(marker.read_text()) == expected:
            return
        raise FileExistsError(f"'{base}' holds synthetic data of other settings; delete it")
    if base.exists():
        raise FileExistsError(f"'{base}' exists but is not a synthetic dataset; delete it")
    base.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{base.name}.", dir=base.parent))
    try:
        generate_synthetic_reid(tmp, **params)
        (tmp / MARKER).write_text(json.dumps(expected, sort_keys=True))
        try:
            os.rename(tmp, base)
        except OSError:
            if not (base / MARKER).is_file():  # not another process that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


SYNTHETIC = register_dataset(
    SyntheticLayout(name="synthetic", dataset_dirs=("synthetic",), folder="synthetic")
)
