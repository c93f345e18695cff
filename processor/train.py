"""Wiring of a training run: build everything, resume, run the recipe's stages, evaluate, save."""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

import torch

from datasets.build import build_dataloaders
from model.build import build_model
from processor.common import LoopSettings, build_loop_settings, make_grad_scaler
from processor.evaluate import build_eval_settings, evaluate_bundle, log_results
from processor.recipes import Recipe, get_recipe
from processor.stage1 import train_stage1
from processor.stage2 import train_stage2
from solver.scheduler import build_scheduler
from utils.checkpoint import load_training_checkpoint, save_checkpoint
from utils.dist import barrier, broadcast_object, is_main_process
from utils.logger import append_metrics
from utils.seed import get_rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

LAST = "last.pth"
SUMMARY_KEYS = ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries")


def _resume_path(resume: str, output_dir: str) -> str | None:
    if not resume:
        return None
    path = os.path.join(output_dir, LAST) if resume == "auto" else resume
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


class _Run:
    """What a run owns besides the loops: the resume checkpoint, checkpoints, evaluation, metrics.

    Args:
        cfg: the frozen run configuration.
        recipe: the run's recipe (its model and data).
    """

    def __init__(self, cfg, recipe: Recipe) -> None:
        self.cfg = cfg
        self.recipe = recipe
        self.output_dir = cfg.OUTPUT_DIR
        self.model_name = cfg.MODEL.NAME
        self.eval_settings = build_eval_settings(cfg)
        self.metrics: dict[str, Any] = {}
        self.ckpt: dict[str, Any] | None = None
        path = _resume_path(cfg.SOLVER.RESUME, self.output_dir)
        if path is not None:
            self.ckpt = load_training_checkpoint(path)
            _check_resumed_config(self.ckpt.get("config", ""), cfg)
            recipe.model.load_state_dict(self.ckpt["model"])
            self.metrics = dict(self.ckpt.get("metrics", {}))
            logger.info(
                "resuming from %s: stage %d, epoch %d done",
                path,
                self.ckpt["stage"],
                self.ckpt["epoch"],
            )

    @property
    def resumed_stage(self) -> int:
        """The stage of the resume checkpoint (0 for a fresh run)."""
        return self.ckpt["stage"] if self.ckpt else 0

    def restore(self, stage: int, optimizer, scheduler, scaler) -> int:
        """Load the optimizer/scheduler/scaler/RNG state of ``stage`` from the resume checkpoint.

        Returns:
            The first epoch to run: 1 without a checkpoint of this stage, else the next epoch.
        """
        if self.ckpt is None or self.ckpt["stage"] != stage:
            return 1
        optimizer.load_state_dict(self.ckpt["optimizer"])
        scheduler.load_state_dict(self.ckpt["scheduler"])
        scaler.load_state_dict(self.ckpt["scaler"])
        set_rng_state(self.ckpt["rng"])
        return self.ckpt["epoch"] + 1

    def evaluate(self, header: str) -> dict[str, float]:
        """Evaluate on rank 0 only (no collective inside) and hand the summary to every rank."""
        r = self.recipe
        summary = (
            evaluate_bundle(r.model, r.data, self.eval_settings, r.device)
            if is_main_process()
            else None
        )
        summary = broadcast_object(summary)
        log_results(summary, header)
        return summary

    def end_epoch(self, loop: LoopSettings, optimizer, scheduler, scaler, epoch: int) -> None:
        """Evaluate, checkpoint and write the stage's weights as the loop settings say."""
        last = epoch == loop.epochs
        if loop.eval_period and (last or epoch % loop.eval_period == 0):
            summary = self.evaluate(f"Validation Results - Epoch: {epoch}")
            self.metrics.update({"epoch": epoch, **summary})
            append_metrics(self.output_dir, {"stage": loop.stage, "epoch": epoch, "eval": summary})
        model = self.recipe.model
        if last or epoch % loop.checkpoint_period == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "stage": loop.stage,
                "epoch": epoch,
                "config": self.cfg.dump(),
                "metrics": self.metrics,
                "rng": get_rng_state(),
            }
            save_checkpoint(state, os.path.join(self.output_dir, LAST))
        if last:
            # Weights only, official format: read by test_clipreid.py and the official loader.
            suffix = "_stage1" if loop.stage == 1 else ""
            save_checkpoint(
                model.state_dict(),
                os.path.join(self.output_dir, f"{self.model_name}{suffix}_{epoch}.pth"),
            )
        barrier()  # ranks other than 0 wait for rank 0's files


def run_stage(cfg, recipe: Recipe, run: _Run, stage: int, device: torch.device) -> None:
    """Build one stage's optimizer, scheduler and scaler, restore them on resume, and train it.

    Args:
        cfg: the frozen run configuration (the solver keys of the stage).
        recipe: the run's recipe.
        run: the run (resume state, checkpoints, evaluation).
        stage: 1 (prompt learning) or 2 (image-encoder fine-tuning).
        device: where training runs.
    """
    loop = build_loop_settings(cfg, stage)
    optimizer = recipe.build_optimizer(cfg, stage)
    scheduler = build_scheduler(cfg, optimizer, stage=stage)
    scaler = make_grad_scaler(device, loop.amp_dtype)
    start = run.restore(stage, optimizer, scheduler, scaler)
    on_epoch_end = partial(run.end_epoch, loop, optimizer, scheduler, scaler)
    if stage == 1:
        train_stage1(
            recipe.model,
            recipe.data.train_stage1,
            optimizer,
            scheduler,
            scaler,
            loop,
            recipe.prompt,
            device,
            start_epoch=start,
            on_epoch_end=on_epoch_end,
        )
    else:
        train_stage2(
            recipe,
            recipe.data.train_stage2,
            optimizer,
            scheduler,
            scaler,
            loop,
            start_epoch=start,
            on_epoch_end=on_epoch_end,
        )


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
    recipe = get_recipe(cfg.MODEL.METHOD)(cfg, model, data, device)
    run = _Run(cfg, recipe)
    for stage in recipe.stages:
        if stage >= run.resumed_stage:
            run_stage(cfg, recipe, run, stage, device)
    if "mAP" not in run.metrics:
        run.metrics.update(run.evaluate("Validation Results - final"))
    return {k: run.metrics[k] for k in SUMMARY_KEYS}
