"""Helpers shared by the training stages and evaluation: settings, precision, batches, logging."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message says where and with what lr."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a resumable checkpoint was written.

    Attributes:
        exit_code: the conventional status of the signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StepGuard:
    """Checks every step's loss and gradients, and carries a stop request from a signal.

    Attributes:
        policy: 'stop' raises :class:`NonFiniteLossError` at the first non-finite step; 'skip'
            drops the step (no optimizer update) and stops after ``max_skips`` in a row.
        max_skips: consecutive skipped steps tolerated with 'skip'.
        skipped: steps skipped so far in this run.
        in_a_row: consecutive skipped steps up to the last one.
        stop_signal: the signal number received (0: none); the loops stop at the next step end,
            work that writes nothing (an evaluation, see :meth:`stopping_at_once`) at once.
    """

    policy: str = "stop"
    max_skips: int = 10
    skipped: int = 0
    in_a_row: int = 0
    stop_signal: int = 0
    _previous: dict[int, Any] = field(default_factory=dict, repr=False)
    _at_once: str = field(default="", repr=False)

    def step_is_finite(
        self,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        where: str,
    ) -> bool:
        """Whether the step (loss, then gradients after ``backward``) may be applied.

        Call after ``backward``. With the fp16 scaler enabled, non-finite gradients are the
        scaler's normal business (it skips the step and lowers the scale): only the loss is
        checked then.

        Args:
            loss: the summed loss of the step.
            terms: its named terms (for the message).
            optimizer: the stage's optimizer (its gradients and lr).
            scaler: the stage's gradient scaler.
            where: '[stageN] ep E it I', for the message.

        Returns:
            True to apply the step, False to skip it (policy 'skip').

        Raises:
            NonFiniteLossError: policy 'stop', or more than ``max_skips`` skips in a row.
        """
        what = None
        if not torch.isfinite(loss.detach()):
            what = "loss"
        elif not scaler.is_enabled() and not _grads_finite(optimizer):
            what = "gradient"
        if what is None:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        values = " ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
        lr = optimizer.param_groups[0]["lr"]
        message = f"{where}: non-finite {what} (loss {loss.item():.4g}: {values}) at lr {lr:.3g}"
        if self.policy == "stop" or self.in_a_row > self.max_skips:
            reason = (
                "SOLVER.NONFINITE 'stop'"
                if self.policy == "stop"
                else f"{self.in_a_row} non-finite steps in a row (SOLVER.NONFINITE_MAX_SKIPS "
                f"{self.max_skips})"
            )
            raise NonFiniteLossError(
                f"{message}. Training stopped ({reason}); the last checkpoint holds the last "
                "finite weights. Lower the learning rate, check the data, or resume with "
                "SOLVER.NONFINITE 'skip' to drop such steps."
            )
        logger.warning(
            "%s: step skipped (%d in a row, %d in all)", message, self.in_a_row, self.skipped
        )
        return False

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[None]:
        """Within the block, SIGINT and SIGTERM request a stop instead of killing the process.

        A second signal of the same kind restores the default behaviour (an impatient Ctrl-C
        still stops at once). Outside the main thread signals cannot be caught: no-op there.
        """
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request_stop)
        except ValueError:  # not the main thread
            self._previous.clear()
        try:
            yield
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

    @contextlib.contextmanager
    def stopping_at_once(self, what: str) -> Iterator[None]:
        """Within the block, a stop request raises :class:`TrainingInterrupted` at once.

        For work that writes nothing the run needs, such as an evaluation whose checkpoint is on
        disk: waiting for the next step would let it run to its end (or, after the last step,
        ignore the request). A request that came before the block (during a checkpoint write)
        stops at its start; one that code in the block swallowed stops at its end.

        Args:
            what: the work and where its run stands, for the message (e.g. "the evaluation
                'Validation Results - Epoch: 60'; its checkpoint is saved in OUT: ...").

        Raises:
            TrainingInterrupted: a SIGINT/SIGTERM came before or during the block.
        """
        self._at_once = what
        try:
            if self.stop_signal:
                raise self.stop_exception(what)
            yield
            if self.stop_signal:
                raise self.stop_exception(what)
        finally:
            self._at_once = ""

    def stop_exception(self, what: str) -> TrainingInterrupted:
        """The :class:`TrainingInterrupted` of the received signal during ``what``."""
        signum = self.stop_signal
        return TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} during {what}", 128 + signum
        )

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self.stop_signal == signum:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.stop_signal = signum
        if self._at_once:
            raise self.stop_exception(self._at_once)
        logger.warning(
            "%s received: saving a resumable checkpoint at the end of this step "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient of the optimizer's parameters is finite (one reduction)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)  # one fused kernel per device and dtype
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


@dataclass
class ResumePoint:
    """Where a stage starts: its first epoch and, after an interruption, the steps already done.

    Attributes:
        epoch: the first epoch to run.
        iteration: steps of ``epoch`` already done (0: start the epoch from its beginning).
        meter: the epoch meter's state at the interruption.
        recipe: the recipe's mid-epoch state (``Recipe.state_dict``).
        rng: the random state at the interruption (restored before the remaining steps).
    """

    epoch: int = 1
    iteration: int = 0
    meter: dict | None = None
    recipe: dict | None = None
    rng: dict | None = None


class StageControl:
    """What a training loop asks of its run at step and epoch ends.

    The base class runs a stage plainly (epoch 1 on, no checkpoints, stop at the first
    non-finite step); :mod:`processor.train` subclasses it with checkpoints and evaluation.

    Args:
        guard: the step guard (non-finite policy, signal stop requests).
        start: where the stage starts.
    """

    def __init__(self, guard: StepGuard | None = None, start: ResumePoint | None = None):
        self.guard = guard if guard is not None else StepGuard()
        self.start = start if start is not None else ResumePoint()

    def end_epoch(self, epoch: int) -> None:
        """Called after each finished epoch."""

    def interrupt(self, epoch: int, iteration: int, meter_state: dict) -> None:
        """Called at a step end after a stop request; must raise (the base saves nothing)."""
        raise TrainingInterrupted(
            f"stopped by signal {self.guard.stop_signal} at epoch {epoch} step {iteration}",
            128 + self.guard.stop_signal,
        )


def build_step_guard(cfg) -> StepGuard:
    """Read ``SOLVER.NONFINITE`` and ``SOLVER.NONFINITE_MAX_SKIPS``."""
    return StepGuard(policy=cfg.SOLVER.NONFINITE, max_skips=cfg.SOLVER.NONFINITE_MAX_SKIPS)


@dataclass(frozen=True)
class LoopSettings:
    """How one training stage loops (built from the config by :func:`build_loop_settings`).

    Attributes:
        stage: 1 (prompt learning) or 2 (image-encoder fine-tuning).
        epochs: ``SOLVER.STAGEn.MAX_EPOCHS``.
        log_period: iterations between log lines.
        checkpoint_period: epochs between full-state checkpoints.
        eval_period: epochs between evaluations (stage 2; 0 in stage 1: no evaluation).
        accum_steps: micro-batches per optimizer step (stage 2; 1 in stage 1).
        seed: ``SOLVER.SEED`` (every epoch's randomness derives from it).
        amp_dtype: ``MODEL.AMP_DTYPE`` (autocast precision on CUDA).
        output_dir: where ``metrics.jsonl`` is appended.
    """

    stage: int
    epochs: int
    log_period: int
    checkpoint_period: int
    eval_period: int
    accum_steps: int
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
        accum_steps=s.GRAD_ACCUM_STEPS if stage == 2 else 1,
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


def set_tf32(device: torch.device, enabled: bool) -> None:
    """Allow TF32 matmuls and convolutions for fp32 work on CUDA (``MODEL.TF32``).

    Args:
        device: where training runs (no effect off CUDA).
        enabled: the key's value.
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    logger.info("TF32 %s for fp32 matmuls and convolutions", "on" if enabled else "off")


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


def batch_images(
    batch: dict[str, Any], model: torch.nn.Module, device: torch.device
) -> torch.Tensor:
    """A loader batch's images on ``device`` in the memory format the model wants.

    Args:
        batch: a loader batch (dict with 'images' float [B, 3, H, W]).
        model: the model the images go to (``input_memory_format``: channels-last for
            ``MODEL.CHANNELS_LAST``; contiguous when the model has none).
        device: target device.

    Returns:
        The images [B, 3, H, W].
    """
    fmt = getattr(model, "input_memory_format", torch.contiguous_format)
    return batch["images"].to(device, non_blocking=True, memory_format=fmt)


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
