"""The official CLIP-ReID YAML files (optional, named by an environment variable) and look-alikes.

The twelve YAML files of the official repository (Syliz517/CLIP-ReID, ``configs/``) are not part
of this one. Tests that check those exact files read them from the folder named by
``$CLIPREID_OFFICIAL_CONFIGS`` (CI's ``.ci/run`` sets it) and are skipped with that reason when
it is unset, so the suite passes in a fresh clone.

:func:`write_official_style` writes small files with every trait of the official ones that the
config loader must handle, so those traits are tested everywhere: legacy string booleans
('on'/'off', 'yes'/'no'), keys the official code defines but never reads (PRETRAIN_CHOICE,
IF_WITH_CENTER, TEST.EVAL), an empty ``DATASETS:`` block whose entries are commented out, the
flat ``SOLVER:`` block of the baseline recipes, ``1e-6`` (a string to YAML 1.1), integers where
floats are expected, ``KEY : value`` spacing and trailing comments.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

OFFICIAL_CONFIGS_ENV = "CLIPREID_OFFICIAL_CONFIGS"
# The official repository's configs/ folder, as shipped.
OFFICIAL_FILES = (
    "VehicleID/cnn_base.yml",
    "VehicleID/cnn_clipreid.yml",
    "VehicleID/vit_base.yml",
    "VehicleID/vit_clipreid.yml",
    "person/cnn_base.yml",
    "person/cnn_clipreid.yml",
    "person/vit_base.yml",
    "person/vit_clipreid.yml",
    "veri/cnn_base.yml",
    "veri/cnn_prom.yml",
    "veri/vit_base.yml",
    "veri/vit_prom.yml",
)
SKIP_REASON = f"set {OFFICIAL_CONFIGS_ENV} to the official CLIP-ReID configs/ folder"


def official_configs_dir() -> str:
    """The folder of the official YAML files; skips the calling test when the variable is unset.

    Returns:
        The folder (it must exist when the variable is set: a wrong path fails, it does not skip).
    """
    folder = os.environ.get(OFFICIAL_CONFIGS_ENV, "")
    if not folder:
        pytest.skip(SKIP_REASON)
    assert os.path.isdir(folder), f"{OFFICIAL_CONFIGS_ENV}={folder!r} is not a folder"
    return folder


def official_config(rel: str) -> str:
    """Path of one official YAML file (see :func:`official_configs_dir`).

    Args:
        rel: e.g. 'person/vit_clipreid.yml'.

    Returns:
        The path.
    """
    return os.path.join(official_configs_dir(), rel)


# A CLIP-ReID recipe (two solver stages), person, as the official files write it.
_CLIPREID = """\
MODEL:
  PRETRAIN_CHOICE: 'imagenet'
  METRIC_LOSS_TYPE: 'triplet'
  IF_LABELSMOOTH: 'on'
  IF_WITH_CENTER: 'no'
  NAME: 'ViT-B-16'
  STRIDE_SIZE: [16, 16]
  ID_LOSS_WEIGHT : 0.25
  TRIPLET_LOSS_WEIGHT : 1.0
  I2T_LOSS_WEIGHT : 1.0
  # SIE_CAMERA: True
  # SIE_COE : 1.0

INPUT:
  SIZE_TRAIN: [256, 128]
  SIZE_TEST: [256, 128]
  PROB: 0.5 # random horizontal flip
  PIXEL_MEAN: [0.5, 0.5, 0.5]
  PIXEL_STD: [0.5, 0.5, 0.5]

DATALOADER:
  SAMPLER: 'softmax_triplet'
  NUM_INSTANCE: 4

SOLVER:
  STAGE1:
    IMS_PER_BATCH: 64
    OPTIMIZER_NAME: "Adam"
    BASE_LR: 0.00035
    LR_MIN: 1e-6
    WEIGHT_DECAY:  1e-4
    MAX_EPOCHS: 120
    WARMUP_EPOCHS: 5

  STAGE2:
    IMS_PER_BATCH: 64
    BASE_LR: 0.000005
    WARMUP_ITERS: 10
    WARMUP_FACTOR: 0.1
    LARGE_FC_LR: False
    MAX_EPOCHS: 60
    BIAS_LR_FACTOR: 2

    STEPS: [30, 50]
    GAMMA: 0.1

TEST:
  EVAL: True
  IMS_PER_BATCH: 64
  WEIGHT: ''
  NECK_FEAT: 'before'
  FEAT_NORM: 'yes'

DATASETS:
#   NAMES: ('market1501')
#   ROOT_DIR: ('')
# OUTPUT_DIR: ''

# CUDA_VISIBLE_DEVICES=0 python train_clipreid.py --config_file configs/person/vit_clipreid.yml
"""

# A baseline recipe: one flat SOLVER block, 'off' label smoothing, a vehicle image size.
_BASELINE = """\
MODEL:
  PRETRAIN_CHOICE: 'imagenet'
  METRIC_LOSS_TYPE: 'triplet'
  IF_LABELSMOOTH: 'off'
  IF_WITH_CENTER: 'no'
  NAME: 'RN50'
  ID_LOSS_WEIGHT : 1.0
  TRIPLET_LOSS_WEIGHT : 1.0

INPUT:
  SIZE_TRAIN: [256, 256]
  SIZE_TEST: [256, 256]
  PIXEL_MEAN: [0.485, 0.456, 0.406]
  PIXEL_STD: [0.229, 0.224, 0.225]

SOLVER:
  IMS_PER_BATCH: 64
  OPTIMIZER_NAME: "Adam"
  BASE_LR: 0.00035
  WARMUP_ITERS: 10
  WARMUP_FACTOR: 0.01
  WEIGHT_DECAY:  0.0005
  MAX_EPOCHS: 120
  EVAL_PERIOD: 120
  BIAS_LR_FACTOR: 2

  STEPS: [40, 70]
  GAMMA: 0.1

TEST:
  EVAL: True
  NECK_FEAT: 'before'
  FEAT_NORM: 'yes'

DATASETS:
#   NAMES: ('veri')
#   ROOT_DIR: ('')
"""

STYLE_FILES = {"person/vit_clipreid.yml": _CLIPREID, "veri/cnn_base.yml": _BASELINE}


def write_official_style(folder: str | Path) -> dict[str, str]:
    """Write the official-style files below ``folder``.

    Args:
        folder: where to write (``folder/person/vit_clipreid.yml``, ``folder/veri/cnn_base.yml``).

    Returns:
        ``{relative name: path}``.
    """
    out = {}
    for rel, text in STYLE_FILES.items():
        path = Path(folder) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out[rel] = str(path)
    return out
