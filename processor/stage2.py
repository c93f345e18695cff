"""Stage 2: fine-tune the image encoder with the recipe's losses (every method runs this loop)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from processor.common import LoopSettings, autocast, batch_ids, format_terms
from processor.recipes.base import Recipe
from utils.dist import broadcast_buffers, get_world_size
from utils.logger import PeriodMeter, append_metrics, progress
from utils.seed import epoch_seed, seed_everything

logger = logging.getLogger(__name__)


class _TrainStep(torch.nn.Module):
    """One training forward: the image branch, plus the prompts of ``text_pids`` when given.

    Every parameter a step trains is used inside this ``forward``, so DistributedDataParallel
    (which wraps this module) sees and averages all of their gradients, prompts included.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        images: torch.Tensor,
        camids: torch.Tensor,
        viewids: torch.Tensor,
        text_pids: torch.Tensor | None = None,
    ) -> tuple[Any, torch.Tensor | None]:
        out = self.model(images, camids=camids, viewids=viewids)
        text = self.model.encode_text(text_pids) if text_pids is not None else None
        return out, text


def _wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module the training steps call: plain, or DistributedDataParallel in a process group.

    DDP broadcasts rank 0's parameters and buffers at construction (every rank starts equal),
    averages the gradients in ``backward`` and broadcasts rank 0's BatchNorm buffers at each
    forward; the statistics of a forward are those of the rank's own batch. Parameters a step
    leaves without a gradient are tolerated (``find_unused_parameters``).
    """
    step = _TrainStep(model)
    if get_world_size() == 1:
        return step
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        step,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )


def _seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Seed the loader's shuffling and sampler for ``epoch`` (a resumed run replays it)."""
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(seed)
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def _log_period(meter: PeriodMeter, loop: LoopSettings, epoch: int, it: int, n: int, lr: float):
    means = meter.means()
    loss_mean = means.pop("loss")
    acc = means.pop("acc", None)
    logger.info(
        "[stage2] ep %d/%d it %d/%d loss %.3f %s%s lr %.2e %.0f img/s",
        epoch,
        loop.epochs,
        it,
        n,
        loss_mean,
        format_terms(means),
        f" acc {acc:.3f}" if acc is not None else "",
        lr,
        meter.rate(),
    )


def _train_step(
    recipe: Recipe,
    step: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp_dtype: str,
) -> dict[str, float]:
    """One optimizer step on a batch; returns the logged values (loss, terms, accuracy)."""
    device = recipe.device
    images = batch["images"].to(device, non_blocking=True)
    pids, cams, views = batch_ids(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp_dtype):
        text_pids = recipe.text_pids(pids)
        out, text_feats = step(images, cams, views, text_pids)
        terms = recipe.losses(out, pids, text_pids, text_feats)
    loss = sum(terms.values())
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    recipe.end_step(out, pids)
    values = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
    acc = recipe.accuracy(out, pids)
    if acc is not None:
        values["acc"] = acc
    return values


def train_stage2(
    recipe: Recipe,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    loop: LoopSettings,
    start_epoch: int = 1,
    on_epoch_end: Callable[[int], None] | None = None,
) -> None:
    """Run stage-2 epochs ``start_epoch..loop.epochs`` of a recipe.

    Per batch: the model's training forward (plus the prompts of ``recipe.text_pids`` in
    one-stage training), the recipe's loss terms, one optimizer step, then ``recipe.end_step``
    (e.g. PCL-CLIP's memory update). Each epoch starts with ``recipe.start_epoch`` (e.g. the
    memory rebuild, or new pseudo labels with their own loader).

    Args:
        recipe: the run's recipe (model, criterion and per-epoch/per-step work).
        loader: P x K train loader (its sampler has ``set_epoch``).
        optimizer: stage-2 optimizer (``recipe.build_optimizer``).
        scheduler: epoch scheduler, stepped at the start of each epoch (official order) with
            ``epoch - recipe.lr_epoch_offset``.
        scaler: gradient scaler.
        loop: the stage's loop settings.
        start_epoch: first epoch to run (after a resume).
        on_epoch_end: called with the finished epoch (evaluation, checkpointing).

    In a process group (``torchrun``) the steps run through DistributedDataParallel: each rank
    computes its losses on its own share of the global batch and the gradients are averaged.
    """
    if start_epoch > loop.epochs:
        return
    model, device = recipe.model, recipe.device
    # In a process group the step runs through DDP; ``model`` itself stays unwrapped for the
    # text bank, evaluation and checkpoints.
    step = _wrap_ddp(model, device)
    recipe.start()
    t0 = time.perf_counter()
    for epoch in range(start_epoch, loop.epochs + 1):
        scheduler.step(epoch - recipe.lr_epoch_offset)
        # Everything random in an epoch derives from (seed, epoch): a resumed run replays it.
        seed = epoch_seed(loop.seed, 2, epoch)
        seed_everything(seed)
        replaced = recipe.start_epoch(epoch)
        loader = loader if replaced is None else replaced
        _seed_epoch(loader, seed, epoch)
        step.train()
        meter, epoch_meter = PeriodMeter(), PeriodMeter()
        num_iters = len(loader)
        for it, batch in enumerate(progress(loader, total=num_iters, desc=f"stage2 ep {epoch}")):
            values = _train_step(recipe, step, batch, optimizer, scaler, loop.amp_dtype)
            meter.update(values, images=len(batch["pids"]))
            epoch_meter.update(values, images=len(batch["pids"]))
            if (it + 1) % loop.log_period == 0 or it + 1 == num_iters:
                _log_period(meter, loop, epoch, it + 1, num_iters, optimizer.param_groups[0]["lr"])
                meter.reset()
        append_metrics(
            loop.output_dir,
            {
                "stage": 2,
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "img_per_s": epoch_meter.rate(),
                **epoch_meter.means(),
            },
        )
        # BatchNorm statistics are per rank during the epoch (plain DDP); rank 0's are kept, so
        # evaluation, checkpoints and every rank's next epoch see the same model.
        broadcast_buffers(model)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    logger.info("[stage2] done in %.1fs", time.perf_counter() - t0)
