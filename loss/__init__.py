"""Losses of CLIP-ReID: pure functions and the config-built, named weighted terms."""

from .build import SAMPLERS, TEXT_LOSSES, ReIDLoss, build_loss, stage1_loss
from .functional import (
    cross_entropy_label_smooth,
    euclidean_dist,
    i2t_cross_entropy,
    i2t_logits,
    supcon_loss,
    triplet_loss,
)

__all__ = [
    "SAMPLERS",
    "TEXT_LOSSES",
    "ReIDLoss",
    "build_loss",
    "cross_entropy_label_smooth",
    "euclidean_dist",
    "i2t_cross_entropy",
    "i2t_logits",
    "stage1_loss",
    "supcon_loss",
    "triplet_loss",
]
