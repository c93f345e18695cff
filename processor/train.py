"""Wiring of a training run: build everything, resume, run stage 1 then stage 2, evaluate, save."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.build import build_dataloaders
from loss.build import build_loss
from model.build import build_model
from processor.common import build_train_settings, make_grad_scaler
from processor.evaluate import build_eval_settings, evaluate_bundle, log_results
from processor.stage1 import train_stage1
from processor.stage2 import (
    build_cluster_settings,
    rebuild_cluster_memory,
    rebuild_memory_bank,
    train_stage2,
)
from solver.optimizer import build_optimizer
from solver.scheduler import build_scheduler
from utils.checkpoint import load_training_checkpoint as load_checkpoint
from utils.checkpoint import save_checkpoint
from utils.dist import all_gather_cat, barrier, broadcast_object, is_main_process
from utils.logger import append_metrics
from utils.seed import get_rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

LAST = "last.pth"


def _resume_path(cfg) -> str | None:
    resume = cfg.SOLVER.RESUME
    if not resume:
        return None
    path = os.path.join(cfg.OUTPUT_DIR, LAST) if resume == "auto" else resume
    if not os.path.isfile(path):
        if resume == "auto":
            logger.info("no checkpoint at %s: starting a fresh run", path)
            return None
        raise FileNotFoundError(f"SOLVER.RESUME = {resume!r}: no such checkpoint file")
    return path


def _check_resumed_config(saved: str, cfg) -> None:
    current = cfg.dump().splitlines()
    old = saved.splitlines()
    changed = sorted(set(current) ^ set(old))
    changed = [line for line in changed if "RESUME" not in line and "OUTPUT_DIR" not in line]
    if changed:
        logger.warning(
            "the configuration differs from the checkpoint's in %d line(s): %s",
            len(changed),
            "; ".join(line.strip() for line in changed[:10]),
        )


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _restore(ckpt: dict | None, stage: int, optimizer, scheduler, scaler) -> int:
    """Load the optimizer/scheduler/scaler/RNG state of ``stage`` from a checkpoint.

    Returns:
        The first epoch to run: 1 without a checkpoint of this stage, else the next epoch.
    """
    if ckpt is None or ckpt["stage"] != stage:
        return 1
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"] + 1


def _stage_state(
    model, optimizer, scheduler, scaler, stage: int, epoch: int, cfg, metrics: dict
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "stage": stage,
        "epoch": epoch,
        "config": cfg.dump(),
        "metrics": metrics,
        "rng": get_rng_state(),
    }


def _evaluate_on_main(model, data, eval_settings, device: torch.device) -> dict[str, float]:
    """Evaluate on rank 0 only (no collective inside) and hand the summary to every rank."""
    summary = evaluate_bundle(model, data, eval_settings, device) if is_main_process() else None
    return broadcast_object(summary)


def train(cfg, device: torch.device) -> dict[str, float]:
    """Train the configured method end to end and evaluate the final model.

    Under ``torchrun`` every rank runs this: stage 1 identically on every rank (same seed, same
    cached features, so the same prompts without communication), stage 2 data-parallel (see
    :func:`processor.stage2.train_stage2`); evaluation and checkpoints on rank 0, the others
    waiting at a barrier. A resume loads the checkpoint on every rank.

    Args:
        cfg: the frozen run configuration.
        device: where to train (this rank's device).

    Returns:
        The final evaluation summary (mAP, mINP, rank1, rank5, rank10, num_valid_queries).
    """
    seed_everything(cfg.SOLVER.SEED)
    data = build_dataloaders(cfg)
    model = build_model(cfg, data.num_classes, data.num_cameras, data.num_views).to(device)
    settings = build_train_settings(cfg)
    eval_settings = build_eval_settings(cfg)
    metrics: dict[str, Any] = {}

    ckpt = None
    path = _resume_path(cfg)
    if path is not None:
        ckpt = load_checkpoint(path)
        _check_resumed_config(ckpt.get("config", ""), cfg)
        model.load_state_dict(ckpt["model"])
        metrics = dict(ckpt.get("metrics", {}))
        logger.info("resuming from %s: stage %d, epoch %d done", path, ckpt["stage"], ckpt["epoch"])
    resumed_stage = ckpt["stage"] if ckpt else 0

    # ---------------------------------------------------------------- stage 1 (prompt tokens)
    two_stage = cfg.MODEL.METHOD == "clipreid"
    if two_stage and resumed_stage <= 1:
        model.set_trainable(1)
        optimizer = build_optimizer(cfg, _trainable(model), stage=1)
        scheduler = build_scheduler(cfg, optimizer, stage=1)
        scaler = make_grad_scaler(device, cfg.MODEL.AMP_DTYPE)
        start = _restore(ckpt, 1, optimizer, scheduler, scaler)

        def stage1_epoch_end(epoch: int) -> None:
            last = epoch == settings.stage1_epochs
            if last or epoch % settings.stage1_checkpoint_period == 0:
                state = _stage_state(model, optimizer, scheduler, scaler, 1, epoch, cfg, metrics)
                save_checkpoint(state, os.path.join(cfg.OUTPUT_DIR, LAST))
            if last:
                save_checkpoint(
                    model.state_dict(),
                    os.path.join(cfg.OUTPUT_DIR, f"{cfg.MODEL.NAME}_stage1_{epoch}.pth"),
                )
            barrier()  # ranks other than 0 wait for rank 0's files

        train_stage1(
            model,
            data.train_stage1,
            optimizer,
            scheduler,
            scaler,
            settings,
            device,
            start_epoch=start,
            on_epoch_end=stage1_epoch_end,
        )

    # ------------------------------------------------------- stage 2 (image encoder fine-tuning)
    # One-stage (paper Tab. 5): prompts and image encoder train together, prompts at stage-1 rates.
    # PCL-CLIP is a single stage too; it runs here (stage 2 in logs, metrics and checkpoints).
    model.set_trainable(0 if cfg.MODEL.METHOD == "clipreid_one_stage" else 2)
    prompt_named = [(n, p) for n, p in _trainable(model) if n.startswith("prompt_learner.")]
    optimizer = build_optimizer(
        cfg, [(n, p) for n, p in _trainable(model) if not n.startswith("prompt_learner.")], stage=2
    )
    if prompt_named:
        optimizer.add_param_group(
            {
                "params": [p for _, p in prompt_named],
                "param_names": [n for n, _ in prompt_named],
                "lr": cfg.SOLVER.STAGE1.BASE_LR,
                "weight_decay": cfg.SOLVER.STAGE1.WEIGHT_DECAY,
            }
        )
    scheduler = build_scheduler(cfg, optimizer, stage=2)
    scaler = make_grad_scaler(device, cfg.MODEL.AMP_DTYPE)
    criterion = build_loss(cfg, data.num_classes)
    start = _restore(ckpt, 2, optimizer, scheduler, scaler)
    pcl = cfg.MODEL.METHOD == "pcl"

    unsupervised = pcl and cfg.MODEL.PCL_UNSUPERVISED
    cluster = build_cluster_settings(cfg) if unsupervised else None

    def pcl_epoch_start(epoch: int) -> DataLoader | None:
        # The bank is rebuilt from the current weights every epoch, so a resume needs no state.
        if not unsupervised:
            centroids = rebuild_memory_bank(
                model, data.train_eval, criterion, device, eval_settings
            )
            append_metrics(
                cfg.OUTPUT_DIR,
                {"stage": 2, "epoch": epoch, "memory_bank": list(centroids.shape)},
            )
            return None
        # Unsupervised: re-cluster, then train on the clustered images with their pseudo labels.
        labels, centroids = rebuild_cluster_memory(
            model, data.train_eval, criterion, device, eval_settings, cluster
        )
        # Every rank clusters the same features; rank 0's labels make the split identical anyway.
        labels = broadcast_object(labels)
        keep = np.flatnonzero(labels >= 0)
        loader = data.set_train_labels(keep, labels[keep])
        append_metrics(
            cfg.OUTPUT_DIR,
            {
                "stage": 2,
                "epoch": epoch,
                "memory_bank": list(centroids.shape),
                "clusters": int(centroids.shape[0]),
                "outliers": int(len(labels) - keep.size),
                "clustered_images": int(keep.size),
            },
        )
        return loader

    def pcl_step_end(out, pids: torch.Tensor) -> None:
        # The memory moves with the whole global batch, so every rank's bank stays the same.
        embedding = all_gather_cat(out.embedding.detach())
        criterion.update_memory(out._replace(embedding=embedding), all_gather_cat(pids))

    def stage2_epoch_end(epoch: int) -> None:
        last = epoch == settings.stage2_epochs
        if last or epoch % settings.stage2_eval_period == 0:
            summary = _evaluate_on_main(model, data, eval_settings, device)
            log_results(summary, f"Validation Results - Epoch: {epoch}")
            metrics.update({"epoch": epoch, **summary})
            append_metrics(cfg.OUTPUT_DIR, {"stage": 2, "epoch": epoch, "eval": summary})
        if last or epoch % settings.stage2_checkpoint_period == 0:
            state = _stage_state(model, optimizer, scheduler, scaler, 2, epoch, cfg, metrics)
            save_checkpoint(state, os.path.join(cfg.OUTPUT_DIR, LAST))
        if last:
            # Weights only, official format: read by test_clipreid.py and the official loader.
            save_checkpoint(
                model.state_dict(), os.path.join(cfg.OUTPUT_DIR, f"{cfg.MODEL.NAME}_{epoch}.pth")
            )
        barrier()

    train_stage2(
        model,
        data.train_stage2,
        criterion,
        optimizer,
        scheduler,
        scaler,
        settings,
        device,
        start_epoch=start,
        on_epoch_end=stage2_epoch_end,
        on_epoch_start=pcl_epoch_start if pcl else None,
        on_step_end=pcl_step_end if pcl else None,
        # PCL-CLIP steps its scheduler at the end of an epoch: epoch k trains with the lr of k-1.
        lr_epoch_offset=1 if pcl else 0,
    )
    if start > settings.stage2_epochs and "mAP" not in metrics:
        summary = _evaluate_on_main(model, data, eval_settings, device)
        log_results(summary, "Validation Results - final")
        metrics.update(summary)
    return {k: metrics[k] for k in ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries")}
