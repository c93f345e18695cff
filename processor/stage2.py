"""Stage 2 of CLIP-ReID (and the one-stage and baseline variants): fine-tune the image encoder."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from processor.common import TrainSettings, autocast, format_terms, sie_labels
from utils.logger import PeriodMeter, append_metrics, progress
from utils.seed import epoch_seed, seed_everything

logger = logging.getLogger(__name__)


@torch.no_grad()
def compute_text_bank(
    model: torch.nn.Module, num_classes: int, batch: int, device: torch.device, amp_dtype: str
) -> torch.Tensor:
    """Text features of every training ID, computed once (the text side is frozen in stage 2).

    Args:
        model: the ReID model (``encode_text``).
        num_classes: number of training IDs C.
        batch: IDs per text-encoder pass.
        device: where the model runs.
        amp_dtype: autocast precision on CUDA.

    Returns:
        float32 [C, E] on ``device``.
    """
    chunks = []
    for start in range(0, num_classes, batch):
        ids = torch.arange(start, min(start + batch, num_classes), device=device)
        with autocast(device, amp_dtype):
            chunks.append(model.encode_text(ids).float())
    return torch.cat(chunks)


def train_stage2(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: Callable[..., dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    settings: TrainSettings,
    device: torch.device,
    start_epoch: int = 1,
    on_epoch_end: Callable[[int], None] | None = None,
) -> None:
    """Run stage-2 epochs ``start_epoch..MAX_EPOCHS``.

    Per P x K batch: ID cross-entropy on both heads, triplet on the three features, and the
    configured text losses (``i2tce`` against the cached text bank by default). In the one-stage
    variant the prompts train too, so the batch IDs' text features are computed with gradients.

    Args:
        model: the ReID model with stage-2 parameters trainable.
        loader: P x K train loader (its sampler has ``set_epoch``).
        criterion: built loss; returns named weighted terms.
        optimizer: stage-2 optimizer.
        scheduler: epoch scheduler, stepped at the start of each epoch (official order).
        scaler: gradient scaler.
        settings: training settings.
        device: where training runs.
        start_epoch: first epoch to run (after a resume).
        on_epoch_end: called with the finished epoch (evaluation, checkpointing).
    """
    if start_epoch > settings.stage2_epochs:
        return
    one_stage = settings.method == "clipreid_one_stage"
    uses_text = bool(settings.text_losses) and settings.method != "baseline"
    bank = None
    if uses_text and not one_stage:
        bank = compute_text_bank(model, int(model.num_classes), 256, device, settings.amp_dtype)
        logger.info("[stage2] text bank of %d IDs %s", bank.shape[0], tuple(bank.shape))
    t0 = time.perf_counter()
    for epoch in range(start_epoch, settings.stage2_epochs + 1):
        scheduler.step(epoch)
        # Everything random in an epoch derives from (seed, epoch): a resumed run replays it.
        seed = epoch_seed(settings.seed, 2, epoch)
        seed_everything(seed)
        if getattr(loader, "generator", None) is not None:
            loader.generator.manual_seed(seed)
        for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        model.train()
        meter, epoch_meter = PeriodMeter(), PeriodMeter()
        num_iters = len(loader)
        for it, batch in enumerate(progress(loader, total=num_iters, desc=f"stage2 ep {epoch}")):
            images = batch["images"].to(device, non_blocking=True)
            pids = batch["pids"].to(device, non_blocking=True)
            cams, views = sie_labels(batch, device, settings.use_camids, settings.use_viewids)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, settings.amp_dtype):
                out = model(images, camids=cams, viewids=views)
                text_feats = text_pids = None
                if uses_text and one_stage:
                    text_pids = torch.unique(pids)
                    text_feats = model.encode_text(text_pids)
                elif uses_text:
                    text_pids = pids
                    text_feats = bank[pids]
                terms = criterion(
                    out,
                    pids,
                    text_bank=bank,
                    batch_text_feats=text_feats,
                    batch_text_pids=text_pids,
                )
            loss = sum(terms.values())
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                logits = out.proj.float() @ bank.t() if bank is not None else out.cls_scores[0]
                acc = (logits.argmax(1) == pids).float().mean().item()
            values = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "acc": acc}
            meter.update(values, images=len(pids))
            epoch_meter.update(values, images=len(pids))
            if (it + 1) % settings.stage2_log_period == 0 or it + 1 == num_iters:
                means = meter.means()
                loss_mean, acc_mean = means.pop("loss"), means.pop("acc")
                logger.info(
                    "[stage2] ep %d/%d it %d/%d loss %.3f %s acc %.3f lr %.2e %.0f img/s",
                    epoch,
                    settings.stage2_epochs,
                    it + 1,
                    num_iters,
                    loss_mean,
                    format_terms(means),
                    acc_mean,
                    optimizer.param_groups[0]["lr"],
                    meter.rate(),
                )
                meter.reset()
        append_metrics(
            settings.output_dir,
            {
                "stage": 2,
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "img_per_s": epoch_meter.rate(),
                **epoch_meter.means(),
            },
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    logger.info("[stage2] done in %.1fs", time.perf_counter() - t0)
