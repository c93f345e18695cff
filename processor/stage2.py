"""Stage 2: fine-tune the image encoder with the recipe's losses (every method runs this loop)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from processor.common import (
    LoopSettings,
    StageControl,
    autocast,
    batch_ids,
    batch_images,
    format_terms,
)
from processor.recipes.base import Recipe
from utils.dist import broadcast_buffers, get_world_size
from utils.faults import fault_point
from utils.logger import PeriodMeter, append_metrics, progress
from utils.seed import epoch_seed, seed_everything, set_rng_state

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


def epoch_batches(loader: DataLoader, seed: int, epoch: int, skip: int = 0):
    """Seed the loader for ``epoch`` (a resumed run replays it) and iterate its batches.

    Args:
        loader: the train loader (its sampler or batch sampler may have ``set_epoch``).
        seed: the epoch's seed (the loader's generator).
        epoch: the epoch number.
        skip: batches already trained on (a resumed epoch): not yielded, and not loaded when
            the batch sampler offers ``skip_next``.

    Returns:
        An iterator over the remaining batches.
    """
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(seed)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (getattr(loader, "sampler", None), batch_sampler):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    if skip and hasattr(batch_sampler, "skip_next"):
        batch_sampler.skip_next(skip)
        return iter(loader)
    return itertools.islice(iter(loader), skip, None)


def _log_period(meter: PeriodMeter, loop: LoopSettings, epoch: int, it: int, n: int, lr: float):
    means = meter.means()
    loss_mean = means.pop("loss", float("nan"))  # nan: every step of the period was skipped
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


def accumulate_gradients(
    recipe: Recipe,
    step: torch.nn.Module,
    batch: dict[str, Any],
    scaler: torch.amp.GradScaler,
    loop: LoopSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[tuple[Any, torch.Tensor]]]:
    """Forward and backward of a batch in ``loop.accum_steps`` equal consecutive micro-batches.

    Each micro-batch's loss is divided by the number of micro-batches, so the summed gradient
    is their mean: for per-sample mean losses (ID, image-to-text, PCL) that equals the gradient of
    the whole batch; the triplet loss mines, and BatchNorm normalises, within each micro-batch
    (a P x K batch splits into whole identities). Under DDP only the last micro-batch
    synchronises the gradients.

    Returns:
        (mean loss, mean loss terms, [(training output, pids)] of each micro-batch), detached.
    """
    device, n = recipe.device, loop.accum_steps
    images = batch_images(batch, recipe.model, device)
    pids, cams, views = batch_ids(batch, device)
    size = len(pids) // n
    if size * n != len(pids):
        raise ValueError(
            f"a batch of {len(pids)} images does not split into SOLVER.STAGE2.GRAD_ACCUM_STEPS "
            f"= {n} equal micro-batches"
        )
    loss, terms, parts = 0.0, {}, []
    for i in range(n):
        part = slice(i * size, (i + 1) * size)
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not hasattr(step, "no_sync") else step.no_sync()
        with sync:
            with autocast(device, loop.amp_dtype):
                text_pids = recipe.text_pids(pids[part])
                out, text_feats = step(images[part], cams[part], views[part], text_pids)
                part_terms = recipe.losses(out, pids[part], text_pids, text_feats)
            part_loss = sum(part_terms.values())
            scaler.scale(part_loss / n).backward()
        loss = loss + part_loss.detach() / n
        for k, v in part_terms.items():
            terms[k] = terms.get(k, 0.0) + v.detach() / n
        parts.append((out, pids[part]))
    return loss, terms, parts


def _train_step(
    recipe: Recipe,
    step: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loop: LoopSettings,
    control: StageControl,
    where: str,
) -> dict[str, float] | None:
    """One optimizer step on a batch; returns the logged values, or None for a skipped step."""
    optimizer.zero_grad(set_to_none=True)
    loss, terms, parts = accumulate_gradients(recipe, step, batch, scaler, loop)
    if not control.guard.step_is_finite(loss, terms, optimizer, scaler, where):
        optimizer.zero_grad(set_to_none=True)
        return None
    scaler.step(optimizer)
    scaler.update()
    fault_point("step")
    for out, pids in parts:
        recipe.end_step(out, pids)
    values = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
    accs = [recipe.accuracy(out, pids) for out, pids in parts]
    if accs[0] is not None:
        values["acc"] = sum(accs) / len(accs)
    return values


def _start_epoch(recipe: Recipe, loader: DataLoader, epoch: int, control: StageControl):
    """Begin an epoch: the recipe's epoch-start work, or its saved state in a resumed epoch.

    Returns:
        (loader, steps already done, epoch meter).
    """
    start = control.start
    meter = PeriodMeter()
    if epoch == start.epoch and start.iteration:
        replaced = recipe.load_state_dict(start.recipe or {})
        meter.load_state_dict(start.meter)
        set_rng_state(start.rng)
        return (loader if replaced is None else replaced), start.iteration, meter
    replaced = recipe.start_epoch(epoch)
    return (loader if replaced is None else replaced), 0, meter


def train_stage2(
    recipe: Recipe,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    loop: LoopSettings,
    control: StageControl | None = None,
) -> None:
    """Run the stage-2 epochs of a recipe, from ``control.start`` to ``loop.epochs``.

    Per batch: the model's training forward (plus the prompts of ``recipe.text_pids`` in
    one-stage training), the recipe's loss terms, one optimizer step (unless the step guard
    finds it non-finite), then ``recipe.end_step`` (e.g. PCL-CLIP's memory update). Each epoch
    starts with ``recipe.start_epoch`` (e.g. the memory rebuild, or new pseudo labels with their
    own loader) and ends with ``control.end_epoch`` (checkpoint, evaluation). After a stop
    request (SIGINT/SIGTERM) ``control.interrupt`` saves the state at the step's end.

    Args:
        recipe: the run's recipe (model, criterion and per-epoch/per-step work).
        loader: P x K train loader (its batch sampler has ``set_epoch``).
        optimizer: stage-2 optimizer (``recipe.build_optimizer``).
        scheduler: epoch scheduler, stepped at the start of each epoch (official order) with
            ``epoch - recipe.lr_epoch_offset``.
        scaler: gradient scaler.
        loop: the stage's loop settings.
        control: the run's checkpoints, evaluation, step guard and resume point (None: a plain
            run from epoch 1).

    In a process group (``torchrun``) the steps run through DistributedDataParallel: each rank
    computes its losses on its own share of the global batch and the gradients are averaged.
    """
    control = control if control is not None else StageControl()
    if control.start.epoch > loop.epochs:
        return
    model, device = recipe.model, recipe.device
    # In a process group the step runs through DDP; ``model`` itself stays unwrapped for the
    # text bank, evaluation and checkpoints.
    step = _wrap_ddp(model, device)
    recipe.start()
    t0 = time.perf_counter()
    for epoch in range(control.start.epoch, loop.epochs + 1):
        scheduler.step(epoch - recipe.lr_epoch_offset)
        # Everything random in an epoch derives from (seed, epoch): a resumed run replays it.
        seed = epoch_seed(loop.seed, 2, epoch)
        seed_everything(seed)
        loader, done, epoch_meter = _start_epoch(recipe, loader, epoch, control)
        step.train()
        meter = PeriodMeter()
        num_iters = len(loader)
        batches = epoch_batches(loader, seed, epoch, skip=done)
        desc = f"stage2 ep {epoch}"
        for it, batch in enumerate(progress(batches, total=num_iters - done, desc=desc), done):
            where = f"[stage2] ep {epoch} it {it + 1}"
            values = _train_step(recipe, step, batch, optimizer, scaler, loop, control, where)
            if values is not None:
                meter.update(values, images=len(batch["pids"]))
                epoch_meter.update(values, images=len(batch["pids"]))
            if (it + 1) % loop.log_period == 0 or it + 1 == num_iters:
                _log_period(meter, loop, epoch, it + 1, num_iters, optimizer.param_groups[0]["lr"])
                meter.reset()
            if control.guard.stop_signal:
                control.interrupt(epoch, it + 1, epoch_meter.state_dict())
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
        control.end_epoch(epoch)
    logger.info("[stage2] done in %.1fs", time.perf_counter() - t0)
