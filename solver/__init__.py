"""Optimizers and per-epoch learning-rate schedules of the two training stages."""

from .optimizer import OPTIMIZERS, build_optimizer, stage2_param_groups
from .scheduler import WARMUP_METHODS, WarmupCosineLR, WarmupMultiStepLR, build_scheduler

__all__ = [
    "OPTIMIZERS",
    "WARMUP_METHODS",
    "WarmupCosineLR",
    "WarmupMultiStepLR",
    "build_optimizer",
    "build_scheduler",
    "stage2_param_groups",
]
