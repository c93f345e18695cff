"""Wiring of a training run: build everything, resume, run the recipe's stages, evaluate, save.

What is saved when (the guarantees the README states):

* every ``CHECKPOINT_PERIOD`` epochs and at the end of each stage: ``OUTPUT_DIR/last.pth`` (full
  state), then at the end of a stage its weights file, and only then the evaluation; a failed
  evaluation is reported and training goes on;
* on SIGINT/SIGTERM: ``last.pth`` at the end of the running step (resumable mid-epoch);
* never a checkpoint with non-finite weights;
* a resume redoes whatever a stage end still owed (its weights file, its evaluation), drops the
  ``metrics.jsonl`` records written after the checkpoint, and removes stale temporary files.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from typing import Any

import torch
import yaml

from datasets.build import build_dataloaders
from model.build import build_model
from processor.common import (
    LoopSettings,
    ResumePoint,
    StageControl,
    StepGuard,
    TrainingInterrupted,
    build_loop_settings,
    build_step_guard,
    make_grad_scaler,
    set_tf32,
)
from processor.evaluate import build_eval_settings, evaluate_bundle, log_results
from processor.recipes import Recipe, get_recipe
from processor.stage1 import train_stage1
from processor.stage2 import train_stage2
from solver.scheduler import build_scheduler
from utils.checkpoint import load_training_checkpoint, save_checkpoint
from utils.dist import barrier, broadcast_object, is_main_process
from utils.faults import fault_point
from utils.logger import append_metrics, rewind_metrics
from utils.metric_sinks import build_run_logging
from utils.seed import get_rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

LAST = "last.pth"
SUMMARY_KEYS = ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries")
# Keys a resumed run may change freely: where things are, how often to log/save/evaluate, how the
# evaluation is done and the loader's parallelism. Any other difference changes the schedule, the
# model or the data and needs --accept-config-changes.
RESUME_FREE_KEYS = (
    "OUTPUT_DIR",
    "SOLVER.RESUME",
    "MODEL.DEVICE",
    "DATASETS.ROOT_DIR",
    "DATALOADER.NUM_WORKERS",
    "SOLVER.NONFINITE",
    "SOLVER.NONFINITE_MAX_SKIPS",
    "SOLVER.STAGE1.LOG_PERIOD",
    "SOLVER.STAGE1.CHECKPOINT_PERIOD",
    "SOLVER.STAGE2.LOG_PERIOD",
    "SOLVER.STAGE2.CHECKPOINT_PERIOD",
    "SOLVER.STAGE2.EVAL_PERIOD",
    "TEST.",
)


class RunDirError(ValueError):
    """OUTPUT_DIR holds a run that this command would overwrite; the message says what to do."""


class ResumeConfigError(ValueError):
    """The resumed run's config differs from the checkpoint's in keys that change the run."""


class EvaluationFailedError(RuntimeError):
    """Training finished and was saved, but its final evaluation failed."""


def _flat(node: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(saved: str, cfg, accept_changes: bool) -> None:
    """Compare the checkpoint's config with the current one before resuming.

    Args:
        saved: the checkpoint's ``config`` (a YAML dump).
        cfg: the current config.
        accept_changes: continue despite differences (they are logged as warnings).

    Raises:
        ResumeConfigError: keys outside :data:`RESUME_FREE_KEYS` differ, listed with the
            checkpoint's and the new value.
    """
    old, new = _flat(yaml.safe_load(saved) or {}), _flat(yaml.safe_load(cfg.dump()))
    changed = [
        f"{key}: checkpoint {old.get(key)!r} -> now {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not key.startswith(RESUME_FREE_KEYS)
    ]
    if not changed:
        return
    listing = "\n  ".join(changed)
    if not accept_changes:
        raise ResumeConfigError(
            f"the config differs from the checkpoint's in {len(changed)} key(s) that change the "
            f"schedule, the model or the data:\n  {listing}\nResume with the checkpoint's values "
            "(OUTPUT_DIR/config.yaml), or add --accept-config-changes to continue with the new ones"
        )
    logger.warning("resuming with %d changed key(s) (accepted):\n  %s", len(changed), listing)


def check_output_dir(cfg, overwrite: bool) -> None:
    """Refuse to start a fresh run over a resumable one (called before anything is written).

    Args:
        cfg: the run configuration (``OUTPUT_DIR``, ``SOLVER.RESUME``).
        overwrite: the user asked to start over.

    Raises:
        RunDirError: ``OUTPUT_DIR/last.pth`` exists, no resume is asked and no overwrite.
    """
    last = os.path.join(cfg.OUTPUT_DIR, LAST)
    if cfg.SOLVER.RESUME or overwrite or not os.path.isfile(last):
        return
    raise RunDirError(
        f"OUTPUT_DIR {cfg.OUTPUT_DIR!r} holds a resumable run ({LAST}). Add --resume to continue "
        "it, choose another OUTPUT_DIR, or add --overwrite to start over (its "
        f"{LAST} and metrics.jsonl are replaced)"
    )


class _Run:
    """What a run owns besides the loops: resume state, checkpoints, evaluation, metrics.

    Args:
        cfg: the frozen run configuration.
        recipe: the run's recipe (its model and data).
        guard: the step guard (non-finite policy, signals).
        accept_changes: resume despite config differences.
        overwrite: start over in an OUTPUT_DIR that holds a resumable run.
    """

    def __init__(
        self, cfg, recipe: Recipe, guard: StepGuard, accept_changes: bool, overwrite: bool
    ) -> None:
        self.cfg = cfg
        self.recipe = recipe
        self.guard = guard
        self.output_dir = cfg.OUTPUT_DIR
        self.model_name = cfg.MODEL.NAME
        self.eval_settings = build_eval_settings(cfg)
        self.metrics: dict[str, Any] = {}
        self.eval_error: str | None = None
        self.ckpt = self._open(cfg.SOLVER.RESUME, accept_changes, overwrite)

    # ------------------------------------------------------------------------------ start-up
    def _open(self, resume: str, accept_changes: bool, overwrite: bool) -> dict | None:
        """Load the resume checkpoint, or make sure a fresh run overwrites nothing by accident."""
        last = os.path.join(self.output_dir, LAST)
        if is_main_process():
            for stale in glob.glob(os.path.join(glob.escape(self.output_dir), "*.tmp")):
                os.remove(stale)  # left by a process killed while writing
        if not resume:
            check_output_dir(self.cfg, overwrite)
            if is_main_process():
                if os.path.isfile(last):  # --overwrite: the old run must not be resumed later
                    os.remove(last)
                rewind_metrics(self.output_dir, None)
            return None
        path = last if resume == "auto" else resume
        if not os.path.isfile(path):
            if resume == "auto":
                logger.info("no checkpoint at %s: starting a fresh run", path)
                if is_main_process():
                    rewind_metrics(self.output_dir, None)
                return None
            raise FileNotFoundError(f"SOLVER.RESUME = {resume!r}: no such checkpoint file")
        ckpt = load_training_checkpoint(path)
        check_resume_config(ckpt.get("config", ""), self.cfg, accept_changes)
        self.recipe.model.load_state_dict(ckpt["model"])
        self.metrics = dict(ckpt.get("metrics", {}))
        partial = ckpt.get("partial")
        at = (ckpt["stage"], partial["epoch"] if partial else ckpt["epoch"])
        if is_main_process():
            rewind_metrics(self.output_dir, at)
        logger.info(
            "resuming from %s: stage %d, epoch %d done%s",
            path,
            ckpt["stage"],
            ckpt["epoch"],
            f", {partial['iteration']} steps of epoch {partial['epoch']}" if partial else "",
        )
        return ckpt

    @property
    def resumed_stage(self) -> int:
        """The stage of the resume checkpoint (0 for a fresh run)."""
        return self.ckpt["stage"] if self.ckpt else 0

    def restore(self, stage: int, optimizer, scheduler, scaler) -> ResumePoint:
        """Load the optimizer/scheduler/scaler/RNG state of ``stage`` from the resume checkpoint.

        Returns:
            Where the stage starts: epoch 1 without a checkpoint of this stage; else the next
            epoch, or the interrupted epoch with its finished steps.
        """
        if self.ckpt is None or self.ckpt["stage"] != stage:
            return ResumePoint()
        optimizer.load_state_dict(self.ckpt["optimizer"])
        scheduler.load_state_dict(self.ckpt["scheduler"])
        scaler.load_state_dict(self.ckpt["scaler"])
        set_rng_state(self.ckpt["rng"])
        partial = self.ckpt.get("partial")
        if partial:
            return ResumePoint(
                partial["epoch"],
                partial["iteration"],
                partial["meter"],
                partial.get("recipe"),
                self.ckpt["rng"],
            )
        return ResumePoint(self.ckpt["epoch"] + 1)

    # ------------------------------------------------------------------------------ saving
    def state(self, loop: LoopSettings, optimizer, scheduler, scaler, epoch: int) -> dict:
        """The full training state after ``epoch`` of ``loop.stage``."""
        return {
            "model": self.recipe.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "stage": loop.stage,
            "epoch": epoch,
            "config": self.cfg.dump(),
            "metrics": self.metrics,
            "rng": get_rng_state(),
        }

    def save_state(self, state: dict) -> None:
        """Write ``last.pth``; a model with non-finite weights is refused (the old file stays)."""
        bad = [
            k for k, v in state["model"].items() if v.is_floating_point() and not v.isfinite().all()
        ]
        if bad:
            raise RuntimeError(
                f"refusing to save {LAST}: the weights hold NaN or Inf ({', '.join(bad[:5])}); "
                "the previous checkpoint is kept"
            )
        save_checkpoint(state, os.path.join(self.output_dir, LAST))

    def weights_path(self, stage: int, epoch: int) -> str:
        """The weights-only file written at the end of a stage (official format)."""
        suffix = "_stage1" if stage == 1 else ""
        return os.path.join(self.output_dir, f"{self.model_name}{suffix}_{epoch}.pth")

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, header: str, saved: bool = True) -> dict[str, float] | None:
        """Evaluate on rank 0 (no collective inside); every rank gets the summary, or None.

        An evaluation error (an unreadable image, a full disk ...) is logged with its cause and
        recorded; training goes on, and the run reports it at the end.

        Args:
            header: the results' heading in the log.
            saved: the state the evaluation belongs to is on disk (a checkpoint of its epoch, or
                the finished run): a SIGINT/SIGTERM then stops the evaluation at once, on every
                rank; else the run goes on to its next step, which saves and stops.

        Raises:
            TrainingInterrupted: stopped during the evaluation (``saved`` only).
        """
        summary, error, stop = None, None, None
        fault_point("eval")
        if is_main_process():
            what = (
                f"the evaluation '{header}'; its checkpoint is saved in {self.output_dir!r}: "
                "resume with the same command plus --resume to evaluate again"
            )
            guard = self.guard
            try:
                with guard.stopping_at_once(what) if saved else contextlib.nullcontext():
                    r = self.recipe
                    summary = evaluate_bundle(r.model, r.data, self.eval_settings, r.device)
            except TrainingInterrupted as err:
                stop = (str(err), err.exit_code)
            except Exception as err:  # noqa: BLE001 - reported, the training state is safe
                if saved and guard.stop_signal:  # the stop, turned into another error on its way
                    stop_err = guard.stop_exception(what)
                    stop = (str(stop_err), stop_err.exit_code)
                else:
                    error = f"{type(err).__name__}: {err}"
                    logger.exception("%s: the evaluation failed; training goes on", header)
        # Every rank learns the outcome, so that all stop together.
        summary, error, stop = broadcast_object((summary, error, stop))
        if stop is not None:
            raise TrainingInterrupted(*stop)
        self.eval_error = error  # the latest evaluation's outcome
        if error is not None:
            return None
        log_results(summary, header)
        return summary

    def record_eval(self, stage: int, epoch: int, header: str, saved: bool = True) -> None:
        """Evaluate (see :meth:`evaluate`) and append the result or failure to ``metrics.jsonl``."""
        summary = self.evaluate(header, saved)
        if summary is None:
            append_metrics(
                self.output_dir, {"stage": stage, "epoch": epoch, "eval_error": self.eval_error}
            )
            return
        self.metrics.update({"epoch": epoch, **summary})
        append_metrics(self.output_dir, {"stage": stage, "epoch": epoch, "eval": summary})

    def evaluated(self, stage: int, epoch: int) -> bool:
        """Whether ``metrics.jsonl`` records an evaluation of (stage, epoch)."""
        path = os.path.join(self.output_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        return any(
            (r.get("stage"), r.get("epoch")) == (stage, epoch) and "eval" in r for r in records
        )

    def settle(self, loop: LoopSettings) -> None:
        """Do what the end of the checkpoint's epoch still owes (a kill between saves)."""
        if self.ckpt is None or self.ckpt["stage"] != loop.stage or self.ckpt.get("partial"):
            return
        epoch = self.ckpt["epoch"]
        last = epoch == loop.epochs
        path = self.weights_path(loop.stage, epoch)
        if last and is_main_process() and not os.path.isfile(path):
            logger.info("writing the stage-end weights the interrupted run still owed")
            save_checkpoint(self.recipe.model.state_dict(), path)
        if _eval_due(loop, epoch) and not self.evaluated(loop.stage, epoch):
            self.record_eval(loop.stage, epoch, f"Validation Results - Epoch: {epoch}")
        barrier()


def _eval_due(loop: LoopSettings, epoch: int) -> bool:
    return bool(loop.eval_period) and (epoch == loop.epochs or epoch % loop.eval_period == 0)


class _Control(StageControl):
    """One stage's link to its run: epoch-end saves and evaluation, interruption."""

    def __init__(self, run: _Run, loop: LoopSettings, optimizer, scheduler, scaler, start):
        super().__init__(guard=run.guard, start=start)
        self.run, self.loop = run, loop
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler

    def end_epoch(self, epoch: int) -> None:
        """Checkpoint and write the stage's weights first, then evaluate."""
        run, loop = self.run, self.loop
        last = epoch == loop.epochs
        saved = last or epoch % loop.checkpoint_period == 0
        if saved and is_main_process():
            run.save_state(run.state(loop, self.optimizer, self.scheduler, self.scaler, epoch))
        if last and is_main_process():
            # Weights only, official format: read by test_clipreid.py and the official loader.
            save_checkpoint(run.recipe.model.state_dict(), run.weights_path(loop.stage, epoch))
        barrier()  # ranks other than 0 wait for rank 0's files
        if _eval_due(loop, epoch):
            run.record_eval(loop.stage, epoch, f"Validation Results - Epoch: {epoch}", saved)

    def interrupt(self, epoch: int, iteration: int, meter_state: dict) -> None:
        """Save a resumable mid-epoch checkpoint and stop with :class:`TrainingInterrupted`."""
        run, loop = self.run, self.loop
        state = run.state(loop, self.optimizer, self.scheduler, self.scaler, epoch - 1)
        state["partial"] = {
            "epoch": epoch,
            "iteration": iteration,
            "meter": meter_state,
            "recipe": run.recipe.state_dict(),
        }
        if is_main_process():
            run.save_state(state)
        barrier()
        signum = run.guard.stop_signal
        raise TrainingInterrupted(
            f"stopped by signal {signum} after step {iteration} of stage {loop.stage} epoch "
            f"{epoch}; the state is saved in {os.path.join(run.output_dir, LAST)}. Resume with "
            "the same command plus --resume",
            128 + signum,
        )


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
    run.settle(loop)
    control = _Control(run, loop, optimizer, scheduler, scaler, start)
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
            control=control,
        )
    else:
        train_stage2(
            recipe, recipe.data.train_stage2, optimizer, scheduler, scaler, loop, control=control
        )


def train(
    cfg, device: torch.device, *, accept_config_changes: bool = False, overwrite: bool = False
) -> dict[str, float]:
    """Train the configured method end to end and evaluate the final model.

    Under ``torchrun`` every rank runs this: stage 1 identically on every rank (same seed, same
    cached features, so the same prompts without communication), stage 2 data-parallel (see
    :func:`processor.stage2.train_stage2`); evaluation and checkpoints on rank 0, the others
    waiting at a barrier. A resume loads the checkpoint on every rank.

    Args:
        cfg: the frozen run configuration.
        device: where to train (this rank's device).
        accept_config_changes: resume although keys that change the run differ from the
            checkpoint's config.
        overwrite: start a fresh run in an OUTPUT_DIR that holds a resumable one.

    Returns:
        The final evaluation summary (mAP, mINP, rank1, rank5, rank10, num_valid_queries).

    Raises:
        RunDirError: OUTPUT_DIR holds a resumable run and neither resume nor overwrite is asked.
        ResumeConfigError: the resumed config changes the run (see :func:`check_resume_config`).
        NonFiniteLossError: the loss or gradients became non-finite (``SOLVER.NONFINITE``).
        TrainingInterrupted: SIGINT/SIGTERM; a resumable checkpoint was saved.
        EvaluationFailedError: training finished and was saved but the final evaluation failed.
    """
    seed_everything(cfg.SOLVER.SEED)
    data = build_dataloaders(cfg)
    model = build_model(cfg, data.num_classes, data.num_cameras, data.num_views).to(device)
    if cfg.MODEL.COMPILE:
        model.compile_image_encoder()
    set_tf32(device, cfg.MODEL.TF32)
    recipe = get_recipe(cfg.MODEL.METHOD)(cfg, model, data, device)
    guard = build_step_guard(cfg)
    run = _Run(cfg, recipe, guard, accept_config_changes, overwrite)
    # TensorBoard (LOG.TENSORBOARD) gets every metrics.jsonl record; the learning curves
    # (LOG.CURVES) are drawn when the run ends, also when it fails.
    with guard.catching_signals(), build_run_logging(cfg):
        for stage in recipe.stages:
            if stage >= run.resumed_stage:
                run_stage(cfg, recipe, run, stage, device)
        if "mAP" not in run.metrics and run.eval_error is None:
            summary = run.evaluate("Validation Results - final")
            if summary is not None:
                run.metrics.update(summary)
    if run.eval_error is not None:
        raise EvaluationFailedError(
            f"training finished and its weights are saved in {run.output_dir!r}, but the "
            f"evaluation failed: {run.eval_error}. Fix the cause and evaluate the weights with "
            "test_clipreid.py (TEST.WEIGHT)"
        )
    if guard.skipped:
        logger.warning("%d non-finite step(s) were skipped in this run", guard.skipped)
    return {k: run.metrics[k] for k in SUMMARY_KEYS}
