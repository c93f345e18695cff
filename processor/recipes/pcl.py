"""PCL-CLIP: prompt-free fine-tuning with a prototypical contrastive loss over a centroid memory.

Supervised (``MODEL.METHOD 'pcl'``): the memory holds every identity's centroid, rebuilt from the
current weights at the start of each epoch and moved after every step. Unsupervised
(``MODEL.PCL_UNSUPERVISED True``): each epoch clusters the training set (DBSCAN on the
k-reciprocal Jaccard distance), trains on the clustered images with their pseudo labels, and the
memory holds the cluster centroids.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from loss.build import build_pcl_loss
from processor.evaluate import build_eval_settings
from processor.memory import (
    build_cluster_settings,
    cluster_eps,
    rebuild_cluster_memory,
    rebuild_memory_bank,
)
from processor.recipes.base import Recipe, register_recipe
from utils.dist import all_gather_cat, broadcast_object
from utils.logger import append_metrics

logger = logging.getLogger(__name__)


@register_recipe("pcl")
class PCLCLIP(Recipe):
    """PCL-CLIP (supervised, or unsupervised with ``MODEL.PCL_UNSUPERVISED``).

    The scheduler steps at the END of each epoch in PCL-CLIP, so epoch ``k`` trains with the lr
    of ``k - 1`` (``lr_epoch_offset``). The memory is rebuilt from the current weights every
    epoch, so a resumed run needs no memory state.
    """

    head = "pcl"
    lr_epoch_offset = 1
    neck_feat = "after"  # the memory bank and the eval feature are the post-BN feature

    @classmethod
    def check_cfg(cls, cfg: CfgNode) -> None:
        if cfg.TEST.NECK_FEAT != "after":
            raise ValueError(
                "MODEL.METHOD 'pcl' evaluates (and builds its memory bank from) the post-BN "
                "feature: set TEST.NECK_FEAT 'after'"
            )
        if cfg.MODEL.PCL_UNSUPERVISED:
            _check_unsupervised(cfg)

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, data: Any, device: torch.device):
        super().__init__(cfg, model, data, device)
        self.output_dir = cfg.OUTPUT_DIR
        self.eval_settings = build_eval_settings(cfg)
        self.cluster = build_cluster_settings(cfg) if cfg.MODEL.PCL_UNSUPERVISED else None
        self.labels: np.ndarray | None = None  # the epoch's pseudo labels (unsupervised)

    def build_criterion(self, cfg: CfgNode, num_classes: int) -> torch.nn.Module:
        return build_pcl_loss(cfg, num_classes)

    def start_epoch(self, epoch: int) -> DataLoader | None:
        if self.cluster is None:
            centroids = rebuild_memory_bank(
                self.model, self.data.train_eval, self.criterion, self.device, self.eval_settings
            )
            append_metrics(
                self.output_dir, {"stage": 2, "epoch": epoch, "memory_bank": list(centroids.shape)}
            )
            return None
        # Unsupervised: re-cluster, then train on the clustered images with their pseudo labels.
        labels, centroids, num_clusters = rebuild_cluster_memory(
            self.model,
            self.data.train_eval,
            self.criterion,
            self.device,
            self.eval_settings,
            self.cluster,
        )
        # Every rank clusters the same features; rank 0's labels make the split identical anyway.
        labels = broadcast_object(labels)
        self.labels = labels
        keep = np.flatnonzero(labels >= 0)
        loader = self.data.set_train_labels(keep, labels[keep])
        append_metrics(
            self.output_dir,
            {
                "stage": 2,
                "epoch": epoch,
                "memory_bank": list(centroids.shape),
                "clusters": num_clusters,
                "outliers": int(len(labels) - keep.size),
                "clustered_images": int(keep.size),
            },
        )
        return loader

    def state_dict(self) -> dict[str, Any]:
        # Mid-epoch the memory has moved since the epoch's rebuild; USL also needs its labels.
        state = {"centroids": self.criterion.centroids.detach().cpu().clone()}
        if self.labels is not None:
            state["labels"] = torch.from_numpy(self.labels)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> DataLoader | None:
        self.criterion.centroids = state["centroids"].to(self.device)
        if "labels" not in state:
            return None
        self.labels = state["labels"].numpy()
        keep = np.flatnonzero(self.labels >= 0)
        return self.data.set_train_labels(keep, self.labels[keep])

    @torch.no_grad()
    def accuracy(self, out: Any, pids: torch.Tensor) -> float | None:
        # Unsupervised: the classifier is never trained (no ID loss), its accuracy means nothing.
        return None if self.cluster is not None else super().accuracy(out, pids)

    def end_step(self, out: Any, pids: torch.Tensor) -> None:
        # The memory moves with the whole global batch, so every rank's bank stays the same.
        embedding = all_gather_cat(out.embedding.detach())
        self.criterion.update_memory(out._replace(embedding=embedding), all_gather_cat(pids))


def _check_unsupervised(cfg: CfgNode) -> None:
    """Cross-key rules of unsupervised PCL-CLIP (``MODEL.PCL_UNSUPERVISED``)."""
    m = cfg.MODEL
    if m.ID_LOSS_WEIGHT != 0:
        # Pseudo labels change number and meaning every epoch: no fixed classifier to train.
        raise ValueError(
            f"MODEL.ID_LOSS_WEIGHT = {m.ID_LOSS_WEIGHT}: unsupervised PCL-CLIP has no fixed "
            "classes, set MODEL.ID_LOSS_WEIGHT 0 (the loss is the PCL term only)"
        )
    if m.PCL_LOSS_WEIGHT <= 0:
        raise ValueError(f"MODEL.PCL_LOSS_WEIGHT = {m.PCL_LOSS_WEIGHT} must be > 0 in USL")
    cluster_eps(m.CLUSTER_EPS, cfg.DATASETS.NAMES)  # 0: the dataset's value, if it has one
