"""Helpers shared by the training stages and evaluation: settings, precision, batches, logging."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class LoopSettings:
    """How one training stage loops (built from the config by :func:`build_loop_settings`).

    Attributes:
        stage: 1 (prompt learning) or 2 (image-encoder fine-tuning).
        epochs: ``SOLVER.STAGEn.MAX_EPOCHS``.
        log_period: iterations between log lines.
        checkpoint_period: epochs between full-state checkpoints.
        eval_period: epochs between evaluations (stage 2; 0 in stage 1: no evaluation).
        seed: ``SOLVER.SEED`` (every epoch's randomness derives from it).
        amp_dtype: ``MODEL.AMP_DTYPE`` (autocast precision on CUDA).
        output_dir: where ``metrics.jsonl`` is appended.
    """

    stage: int
    epochs: int
    log_period: int
    checkpoint_period: int
    eval_period: int
    seed: int
    amp_dtype: str
    output_dir: str


def build_loop_settings(cfg, stage: int) -> LoopSettings:
    """Collect the loop settings of a training stage.

    Args:
        cfg: the run configuration (``SOLVER.STAGEn.*``, ``SOLVER.SEED``, ``MODEL.AMP_DTYPE``,
            ``OUTPUT_DIR``).
        stage: 1 or 2.

    Returns:
        A frozen :class:`LoopSettings`.
    """
    s = cfg.SOLVER.STAGE1 if stage == 1 else cfg.SOLVER.STAGE2
    return LoopSettings(
        stage=stage,
        epochs=s.MAX_EPOCHS,
        log_period=s.LOG_PERIOD,
        checkpoint_period=s.CHECKPOINT_PERIOD,
        eval_period=s.EVAL_PERIOD if stage == 2 else 0,
        seed=cfg.SOLVER.SEED,
        amp_dtype=cfg.MODEL.AMP_DTYPE,
        output_dir=cfg.OUTPUT_DIR,
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
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp_dtype])


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


def batch_ids(
    batch: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pids, camera ids and view ids of a loader batch on ``device``.

    Camera and view ids are always passed to the model, which uses them only when it was built
    with the SIE embedding.

    Args:
        batch: a loader batch (dict with 'pids', 'camids' and 'viewids' int64 [B]).
        device: target device.

    Returns:
        (pids [B], camids [B], viewids [B]).
    """
    return tuple(batch[k].to(device, non_blocking=True) for k in ("pids", "camids", "viewids"))


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
