"""Helpers shared by the training stages and evaluation: settings, precision, batches, logging."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class TrainSettings:
    """Plain values the training loops need (built from the config by ``build_train_settings``)."""

    output_dir: str
    model_name: str
    method: str
    seed: int
    amp_dtype: str
    use_camids: bool
    use_viewids: bool
    temperature: float
    stage1_epochs: int
    stage1_batch: int
    stage1_mode: str
    stage1_log_period: int
    stage1_checkpoint_period: int
    stage2_epochs: int
    stage2_log_period: int
    stage2_checkpoint_period: int
    stage2_eval_period: int
    text_losses: tuple[str, ...]


def build_train_settings(cfg) -> TrainSettings:
    """Collect the training-loop settings from a configuration.

    Args:
        cfg: the run configuration.

    Returns:
        A frozen :class:`TrainSettings`.
    """
    s1, s2 = cfg.SOLVER.STAGE1, cfg.SOLVER.STAGE2
    return TrainSettings(
        output_dir=cfg.OUTPUT_DIR,
        model_name=cfg.MODEL.NAME,
        method=cfg.MODEL.METHOD,
        seed=cfg.SOLVER.SEED,
        amp_dtype=cfg.MODEL.AMP_DTYPE,
        use_camids=cfg.MODEL.SIE_CAMERA,
        use_viewids=cfg.MODEL.SIE_VIEW,
        temperature=cfg.MODEL.TEMPERATURE,
        stage1_epochs=s1.MAX_EPOCHS,
        stage1_batch=s1.IMS_PER_BATCH,
        stage1_mode=s1.MODE,
        stage1_log_period=s1.LOG_PERIOD,
        stage1_checkpoint_period=s1.CHECKPOINT_PERIOD,
        stage2_epochs=s2.MAX_EPOCHS,
        stage2_log_period=s2.LOG_PERIOD,
        stage2_checkpoint_period=s2.CHECKPOINT_PERIOD,
        stage2_eval_period=s2.EVAL_PERIOD,
        text_losses=tuple(s2.TEXT_LOSSES) if cfg.MODEL.METHOD != "baseline" else (),
    )


def autocast(device: torch.device, amp_dtype: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context: on CUDA with fp16/bf16, a no-op elsewhere (CPU runs fp32).

    Args:
        device: where the computation runs.
        amp_dtype: 'fp16', 'bf16' or 'fp32'.

    Returns:
        A context manager.
    """
    if device.type != "cuda" or amp_dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp_dtype])


def make_grad_scaler(device: torch.device, amp_dtype: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 autocast on CUDA (bf16 and fp32 need none).

    Args:
        device: where training runs.
        amp_dtype: 'fp16', 'bf16' or 'fp32'.

    Returns:
        A ``torch.amp.GradScaler``.
    """
    enabled = device.type == "cuda" and amp_dtype == "fp16"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def sie_labels(
    batch: dict[str, Any], device: torch.device, use_camids: bool, use_viewids: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Camera and view ids for the SIE embedding, or None when the model was built without it.

    Args:
        batch: a loader batch (dict with 'camids' and 'viewids' int64 [B]).
        device: target device.
        use_camids: MODEL.SIE_CAMERA.
        use_viewids: MODEL.SIE_VIEW.

    Returns:
        (camids [B] or None, viewids [B] or None).
    """
    cams = batch["camids"].to(device, non_blocking=True) if use_camids else None
    views = batch["viewids"].to(device, non_blocking=True) if use_viewids else None
    return cams, views


def format_terms(terms: dict[str, float]) -> str:
    """Format loss terms as ``(id .80 tri .31 i2tce .12)``.

    Args:
        terms: name -> value.

    Returns:
        The parenthesised string ('' when empty).
    """
    if not terms:
        return ""
    return "(" + " ".join(f"{k} {v:.3f}" for k, v in terms.items()) + ")"
