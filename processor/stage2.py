"""Stage 2 of CLIP-ReID (also one-stage, baseline and PCL-CLIP): fine-tune the image encoder."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.build import METHODS_WITH_TEXT
from processor.common import TrainSettings, autocast, format_terms, sie_labels
from processor.evaluate import EvalSettings, extract_features
from utils.dist import broadcast_buffers, get_world_size
from utils.logger import PeriodMeter, append_metrics, progress
from utils.reranking import jaccard_distance_sparse
from utils.seed import epoch_seed, seed_everything

logger = logging.getLogger(__name__)


class _TrainStep(torch.nn.Module):
    """One training forward: the image branch, plus the batch IDs' prompts in one-stage runs.

    Every parameter a step trains is used inside this ``forward``, so DistributedDataParallel
    (which wraps this module) sees and averages all of their gradients, prompts included.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        images: torch.Tensor,
        camids: torch.Tensor | None,
        viewids: torch.Tensor | None,
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


def rebuild_memory_bank(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: torch.nn.Module,
    device: torch.device,
    settings: EvalSettings,
) -> torch.Tensor:
    """Rebuild PCL-CLIP's centroid memory from the whole training set (start of every epoch).

    The features are the model's eval feature (post-BN for the PCL head, eval-mode BN) of every
    training image with test transforms, extracted by the one inference path
    (:func:`processor.evaluate.extract_features`); the criterion turns them into per-ID centroids.

    Args:
        model: the ReID model with the PCL head.
        loader: the train set with test transforms, in order (``DataBundle.train_eval``).
        criterion: the :class:`loss.pcl.PCLLoss` (``build_memory``).
        device: where the model runs.
        settings: evaluation settings (SIE flags, precision).

    Returns:
        The new float32 centroids [C, D] on ``device``.
    """
    t0 = time.perf_counter()
    features = extract_features(model, loader, device, settings)
    feats, pids = features.feats, features.pids
    centroids = criterion.build_memory(feats, torch.as_tensor(pids, device=feats.device))
    logger.info(
        "[stage2] memory bank %s from %d images in %.1fs",
        tuple(centroids.shape),
        feats.shape[0],
        time.perf_counter() - t0,
    )
    return centroids


@dataclass(frozen=True)
class ClusterSettings:
    """Pseudo-label clustering of unsupervised PCL-CLIP (ClusterContrast recipe).

    Attributes:
        eps: DBSCAN radius on the Jaccard distance, in (0, 1).
        min_samples: DBSCAN core-point threshold (the point itself included).
        k1: k-reciprocal neighbourhood size of the Jaccard distance.
        k2: local query expansion size of the Jaccard distance.
    """

    eps: float = 0.6
    min_samples: int = 4
    k1: int = 30
    k2: int = 6


def build_cluster_settings(cfg: Any) -> ClusterSettings:
    """Read the clustering settings of unsupervised PCL-CLIP.

    Args:
        cfg: configuration (``MODEL.CLUSTER_{EPS, MIN_SAMPLES, K1, K2}``).

    Returns:
        The :class:`ClusterSettings`.
    """
    m = cfg.MODEL
    return ClusterSettings(
        eps=float(m.CLUSTER_EPS),
        min_samples=int(m.CLUSTER_MIN_SAMPLES),
        k1=int(m.CLUSTER_K1),
        k2=int(m.CLUSTER_K2),
    )


def cluster_pseudo_labels(feats: torch.Tensor, settings: ClusterSettings) -> np.ndarray:
    """DBSCAN pseudo labels on the k-reciprocal Jaccard distance of L2-normalised features.

    The Jaccard distance is computed sparsely (:func:`utils.reranking.jaccard_distance_sparse`,
    pairs within ``eps`` only) and handed to scikit-learn's DBSCAN as a precomputed radius graph,
    so no N x N matrix is built. Outliers keep label -1; clusters are numbered 0..K-1 in the
    order of DBSCAN's labels.

    Args:
        feats: float [N, D] features (normalised here).
        settings: the clustering settings.

    Returns:
        int64 numpy [N] labels in ``{-1, 0, ..., K-1}``.
    """
    from scipy.sparse import csr_matrix
    from sklearn.cluster import DBSCAN

    n = feats.shape[0]
    x = F.normalize(feats.detach().float(), dim=1)
    rows, cols, dists = jaccard_distance_sparse(x, settings.k1, settings.k2, settings.eps)
    graph = csr_matrix(
        (dists.cpu().double().numpy(), (rows.cpu().numpy(), cols.cpu().numpy())), shape=(n, n)
    )
    raw = DBSCAN(eps=settings.eps, min_samples=settings.min_samples, metric="precomputed")
    raw = raw.fit_predict(graph)
    labels = np.full(n, -1, dtype=np.int64)
    kept = raw >= 0
    labels[kept] = np.unique(raw[kept], return_inverse=True)[1]
    return labels


def rebuild_cluster_memory(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: torch.nn.Module,
    device: torch.device,
    settings: EvalSettings,
    cluster: ClusterSettings,
) -> tuple[np.ndarray, torch.Tensor]:
    """Cluster the training set and put the cluster centroids in the memory (unsupervised PCL).

    The features are those of :func:`rebuild_memory_bank` (eval mode, test transforms, in
    order); the loader's ground-truth pids are discarded. Outliers get no centroid.

    Args:
        model: the ReID model with the PCL head.
        loader: the train set with test transforms, in order (``DataBundle.train_eval``).
        criterion: the :class:`loss.pcl.PCLLoss` (``build_memory``).
        device: where the model runs.
        settings: evaluation settings (SIE flags, precision).
        cluster: the clustering settings.

    Returns:
        (pseudo labels int64 numpy [N] with -1 for outliers, float32 centroids [K, D]).

    Raises:
        RuntimeError: DBSCAN formed no cluster.
    """
    t0 = time.perf_counter()
    feats = extract_features(model, loader, device, settings).feats
    labels = cluster_pseudo_labels(feats, cluster)
    keep = np.flatnonzero(labels >= 0)
    if keep.size == 0:
        raise RuntimeError(
            f"DBSCAN formed no cluster from {len(labels)} images (eps {cluster.eps}, min_samples "
            f"{cluster.min_samples}): raise MODEL.CLUSTER_EPS or lower MODEL.CLUSTER_MIN_SAMPLES"
        )
    num_clusters = int(labels.max()) + 1
    index = torch.as_tensor(keep, device=feats.device)
    pids = torch.as_tensor(labels[keep], device=feats.device)
    centroids = criterion.build_memory(feats[index], pids, num_classes=num_clusters)
    logger.info(
        "[stage2] %d clusters, %d outliers of %d images; memory bank %s in %.1fs",
        num_clusters,
        len(labels) - keep.size,
        len(labels),
        tuple(centroids.shape),
        time.perf_counter() - t0,
    )
    return labels, centroids


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
    on_epoch_start: Callable[[int], torch.utils.data.DataLoader | None] | None = None,
    on_step_end: Callable[[Any, torch.Tensor], None] | None = None,
    lr_epoch_offset: int = 0,
) -> None:
    """Run stage-2 epochs ``start_epoch..MAX_EPOCHS``.

    Per P x K batch: ID cross-entropy on both heads, triplet on the three features, and the
    configured text losses (``i2tce`` against the cached text bank by default). In the one-stage
    variant the prompts train too, so the batch IDs' text features are computed with gradients.
    PCL-CLIP runs through the same loop: its criterion takes ``(out, pids)`` only, the memory bank
    is rebuilt by ``on_epoch_start`` and moved by ``on_step_end``.

    Args:
        model: the ReID model with stage-2 parameters trainable.
        loader: P x K train loader (its sampler has ``set_epoch``).
        criterion: built loss; returns named weighted terms.
        optimizer: stage-2 optimizer.
        scheduler: epoch scheduler, stepped at the start of each epoch (official order) with
            ``epoch - lr_epoch_offset``.
        scaler: gradient scaler.
        settings: training settings.
        device: where training runs.
        start_epoch: first epoch to run (after a resume).
        on_epoch_end: called with the finished epoch (evaluation, checkpointing).
        on_epoch_start: called with the epoch after its seeding, before its first batch (e.g.
            rebuilding a memory bank from the current weights); a loader it returns replaces
            ``loader`` from this epoch on (unsupervised training: new pseudo labels).
        on_step_end: called with (training output, pids [B]) after every optimizer step (e.g.
            a memory-bank update).
        lr_epoch_offset: 1 gives epoch ``k`` the lr of ``k - 1``, as loops that step the
            scheduler at the END of each epoch do (PCL-CLIP); 0 is CLIP-ReID's order.

    In a process group (``torchrun``) the steps run through DistributedDataParallel: each rank
    computes its losses on its own share of the global batch and the gradients are averaged.
    """
    if start_epoch > settings.stage2_epochs:
        return
    one_stage = settings.method == "clipreid_one_stage"
    # In a process group the step runs through DDP; ``model`` itself stays unwrapped for the
    # text bank, evaluation and checkpoints.
    step = _wrap_ddp(model, device)
    uses_text = bool(settings.text_losses) and settings.method in METHODS_WITH_TEXT
    bank = None
    if uses_text and not one_stage:
        bank = compute_text_bank(model, int(model.num_classes), 256, device, settings.amp_dtype)
        logger.info("[stage2] text bank of %d IDs %s", bank.shape[0], tuple(bank.shape))
    t0 = time.perf_counter()
    for epoch in range(start_epoch, settings.stage2_epochs + 1):
        scheduler.step(epoch - lr_epoch_offset)
        # Everything random in an epoch derives from (seed, epoch): a resumed run replays it.
        seed = epoch_seed(settings.seed, 2, epoch)
        seed_everything(seed)
        if on_epoch_start is not None:
            replaced = on_epoch_start(epoch)
            loader = loader if replaced is None else replaced
        if getattr(loader, "generator", None) is not None:
            loader.generator.manual_seed(seed)
        for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        step.train()
        meter, epoch_meter = PeriodMeter(), PeriodMeter()
        num_iters = len(loader)
        for it, batch in enumerate(progress(loader, total=num_iters, desc=f"stage2 ep {epoch}")):
            images = batch["images"].to(device, non_blocking=True)
            pids = batch["pids"].to(device, non_blocking=True)
            cams, views = sie_labels(batch, device, settings.use_camids, settings.use_viewids)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, settings.amp_dtype):
                text_pids = torch.unique(pids) if uses_text and one_stage else None
                out, text_feats = step(images, cams, views, text_pids)
                if uses_text:
                    if not one_stage:
                        text_pids, text_feats = pids, bank[pids]
                    text = {
                        "text_bank": bank,
                        "batch_text_feats": text_feats,
                        "batch_text_pids": text_pids,
                    }
                    terms = criterion(out, pids, **text)
                else:
                    terms = criterion(out, pids)
            loss = sum(terms.values())
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if on_step_end is not None:
                on_step_end(out, pids)
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
        # BatchNorm statistics are per rank during the epoch (plain DDP); rank 0's are kept, so
        # evaluation, checkpoints and every rank's next epoch see the same model.
        broadcast_buffers(model)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    logger.info("[stage2] done in %.1fs", time.perf_counter() - t0)
