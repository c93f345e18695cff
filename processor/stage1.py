"""Stage 1 of CLIP-ReID: learn the ID-specific prompt tokens against frozen CLIP features."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loss.build import stage1_loss
from processor.common import LoopSettings, StageControl, autocast, batch_images, format_terms
from utils.faults import fault_point
from utils.logger import PeriodMeter, append_metrics, progress
from utils.seed import epoch_seed, set_rng_state

logger = logging.getLogger(__name__)

STAGE1_MODES = ("instance", "average")


@dataclass(frozen=True)
class PromptSettings:
    """What a stage-1 step does (built by :func:`build_prompt_settings`).

    Attributes:
        batch: cached features (instance mode) or IDs (average mode) per step.
        mode: 'instance' (paper) or 'average' (per-ID mean features, supplementary Tab. 8).
        temperature: logit temperature of the contrastive losses.
    """

    batch: int
    mode: str
    temperature: float


def build_prompt_settings(cfg) -> PromptSettings:
    """Read ``SOLVER.STAGE1.{IMS_PER_BATCH, MODE}`` and ``MODEL.TEMPERATURE``."""
    return PromptSettings(
        batch=cfg.SOLVER.STAGE1.IMS_PER_BATCH,
        mode=cfg.SOLVER.STAGE1.MODE,
        temperature=cfg.MODEL.TEMPERATURE,
    )


@torch.no_grad()
def cache_image_features(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    amp_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected CLIP image features of the whole train set, computed once (no augmentation).

    Args:
        model: the ReID model (``encode_image_proj``: projected feature, no SIE, no BN).
        loader: the train set with test transforms.
        device: where the model runs.
        amp_dtype: autocast precision on CUDA.

    Returns:
        (feats float32 [N, E] on ``device``, pids int64 [N] on ``device``).
    """
    model.eval()
    feats, pids = [], []
    for batch in progress(loader, total=len(loader), desc="stage1 features"):
        with autocast(device, amp_dtype):
            out = model.encode_image_proj(batch_images(batch, model, device))
        feats.append(out.float())
        pids.append(batch["pids"].to(device))
    return torch.cat(feats), torch.cat(pids)


def _instance_step(
    model: torch.nn.Module,
    feats: torch.Tensor,
    pids: torch.Tensor,
    temperature: float,
    device: torch.device,
    amp_dtype: str,
) -> dict[str, torch.Tensor]:
    """Symmetric SupCon between cached image features and their IDs' prompt features.

    The text feature is a function of the ID alone, so it is computed once per unique ID of the
    batch and gathered per sample: the loss equals the official per-sample computation with
    fewer text-encoder passes.
    """
    unique, inverse = torch.unique(pids, return_inverse=True)
    with autocast(device, amp_dtype):
        text = model.encode_text(unique)
    return stage1_loss(feats, text.float()[inverse], pids, temperature)


def _average_step(
    model: torch.nn.Module,
    centroids: torch.Tensor,
    ids: torch.Tensor,
    temperature: float,
    device: torch.device,
    amp_dtype: str,
) -> dict[str, torch.Tensor]:
    """Per-ID average variant (paper supplementary Tab. 8).

    Text-to-image cross-entropy of the batch IDs' prompts over the mean image features of ALL
    IDs, plus image-to-text cross-entropy of the batch IDs' mean features over the batch prompts.
    """
    with autocast(device, amp_dtype):
        text = model.encode_text(ids).float()
    t2i = F.cross_entropy(text @ centroids.t() / temperature, ids)
    i2t = F.cross_entropy(
        centroids[ids] @ text.t() / temperature, torch.arange(len(ids), device=ids.device)
    )
    return {"i2t": i2t, "t2i": t2i}


def _prompt_step(
    model: torch.nn.Module,
    feats: torch.Tensor,
    pids: torch.Tensor,
    prompt: PromptSettings,
    device: torch.device,
    amp_dtype: str,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """The units an epoch shuffles (images, or IDs in average mode) and the step over a batch.

    Returns:
        (units int64 [U] on ``device``, step: batch of units -> loss terms).
    """
    if prompt.mode == "average":
        num_classes = int(model.num_classes)
        centroids = torch.zeros(num_classes, feats.shape[1], device=device)
        centroids.index_add_(0, pids, feats)
        counts = torch.bincount(pids, minlength=num_classes).clamp_min(1).unsqueeze(1)
        centroids = centroids / counts
        units = torch.arange(num_classes, device=device)
        return units, lambda idx: _average_step(
            model, centroids, idx, prompt.temperature, device, amp_dtype
        )
    units = torch.arange(len(feats), device=device)
    return units, lambda idx: _instance_step(
        model, feats[idx], pids[idx], prompt.temperature, device, amp_dtype
    )


def train_stage1(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    loop: LoopSettings,
    prompt: PromptSettings,
    device: torch.device,
    control: StageControl | None = None,
) -> None:
    """Run the stage-1 epochs, from ``control.start`` to ``loop.epochs``.

    Args:
        model: the ReID model; only its prompt tokens must require grad.
        loader: train set with test transforms (features are cached once from it).
        optimizer: over the prompt tokens.
        scheduler: epoch scheduler, stepped at the start of each epoch (official order).
        scaler: gradient scaler (disabled off CUDA-fp16).
        loop: the stage's loop settings.
        prompt: what a step does.
        device: where training runs.
        control: the run's checkpoints, step guard and resume point (None: a plain run).
    """
    control = control if control is not None else StageControl()
    start = control.start
    if start.epoch > loop.epochs:
        return
    t0 = time.perf_counter()
    feats, pids = cache_image_features(model, loader, device, loop.amp_dtype)
    units, step = _prompt_step(model, feats, pids, prompt, device, loop.amp_dtype)
    logger.info(
        "[stage1] cached %d image features %s in %.1fs; mode %s",
        len(feats),
        tuple(feats.shape),
        time.perf_counter() - t0,
        prompt.mode,
    )
    model.train()
    for epoch in range(start.epoch, loop.epochs + 1):
        scheduler.step(epoch)
        gen = torch.Generator().manual_seed(epoch_seed(loop.seed, 1, epoch))
        order = units[torch.randperm(len(units), generator=gen).to(device)]
        # ceil division: the last batch holds the remainder and is never empty.
        num_iters = (len(order) + prompt.batch - 1) // prompt.batch
        meter, epoch_meter = PeriodMeter(), PeriodMeter()
        done = 0
        if epoch == start.epoch and start.iteration:
            done = start.iteration
            epoch_meter.load_state_dict(start.meter)
            set_rng_state(start.rng)
        for it in range(done, num_iters):
            idx = order[it * prompt.batch : (it + 1) * prompt.batch]
            optimizer.zero_grad(set_to_none=True)
            terms = step(idx)
            loss = sum(terms.values())
            scaler.scale(loss).backward()
            where = f"[stage1] ep {epoch} it {it + 1}"
            if control.guard.step_is_finite(loss, terms, optimizer, scaler, where):
                scaler.step(optimizer)
                scaler.update()
                fault_point("step")
                values = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
                meter.update(values, images=len(idx))
                epoch_meter.update(values, images=len(idx))
            if (it + 1) % loop.log_period == 0 or it + 1 == num_iters:
                _log_period(meter, loop, epoch, it + 1, num_iters, optimizer.param_groups[0]["lr"])
                meter.reset()
            if control.guard.stop_signal:
                control.interrupt(epoch, it + 1, epoch_meter.state_dict())
        append_metrics(
            loop.output_dir,
            {
                "stage": 1,
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                **epoch_meter.means(),
            },
        )
        control.end_epoch(epoch)
    logger.info("[stage1] done in %.1fs", time.perf_counter() - t0)


def _log_period(meter: PeriodMeter, loop: LoopSettings, epoch: int, it: int, n: int, lr: float):
    means = meter.means()
    logger.info(
        "[stage1] ep %d/%d it %d/%d loss %.3f %s lr %.2e %.0f feat/s",
        epoch,
        loop.epochs,
        it,
        n,
        means.pop("loss", float("nan")),  # nan: every step of the period was skipped
        format_terms(means),
        lr,
        meter.rate(),
    )
