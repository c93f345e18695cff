"""Losses of CLIP-ReID and PCL-CLIP: pure functions and the config-built, named weighted terms."""

from .build import SAMPLERS, TEXT_LOSSES, ReIDLoss, build_loss, build_pcl_loss, stage1_loss
from .functional import (
    cross_entropy_label_smooth,
    euclidean_dist,
    i2t_cross_entropy,
    i2t_logits,
    supcon_loss,
    triplet_loss,
)
from .pcl import (
    MEMORY_UPDATES,
    PCLLoss,
    hard_centroid_update,
    pcl_loss,
    pid_centroids,
    sequential_centroid_update,
)

__all__ = [
    "MEMORY_UPDATES",
    "PCLLoss",
    "SAMPLERS",
    "TEXT_LOSSES",
    "ReIDLoss",
    "build_loss",
    "build_pcl_loss",
    "cross_entropy_label_smooth",
    "euclidean_dist",
    "hard_centroid_update",
    "i2t_cross_entropy",
    "i2t_logits",
    "pcl_loss",
    "pid_centroids",
    "sequential_centroid_update",
    "stage1_loss",
    "supcon_loss",
    "triplet_loss",
]
