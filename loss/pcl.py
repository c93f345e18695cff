"""Prototypical contrastive learning (PCL) of PCL-CLIP: centroid memory, loss and update.

Li and Gong, "Prototypical Contrastive Learning-based CLIP Fine-tuning for Object
Re-identification" (arXiv 2310.17218), supervised setting. Every identity has one L2-normalised
centroid of the 1280-d post-BN feature (ViT-B/16), rebuilt from the whole training set at the
start of every epoch (:func:`pid_centroids`) and moved towards the hardest instance of its
identity after every step (:func:`hard_centroid_update`; :func:`sequential_centroid_update`, the
ClusterContrast update by every instance in turn, is the alternative of ``MODEL.MEMORY_UPDATE``).
The loss is a cosine-softmax over all
centroids (:func:`pcl_loss`); every other identity's centroid is a negative.

The official code updates the centroids inside the backward pass of a custom autograd function;
here the same update runs after the step under ``no_grad`` (it reads only the detached forward
features, so the result is the same).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import cross_entropy_label_smooth

logger = logging.getLogger(__name__)

__all__ = [
    "MEMORY_UPDATES",
    "PCLLoss",
    "hard_centroid_update",
    "pcl_loss",
    "pid_centroids",
    "sequential_centroid_update",
]


def _check_feats_pids(feats: Tensor, pids: Tensor, what: str) -> None:
    if feats.dim() != 2 or pids.shape != feats.shape[:1]:
        raise ValueError(
            f"expected {what} (N, D) and pids (N,), got {tuple(feats.shape)} and "
            f"{tuple(pids.shape)}"
        )


def pid_centroids(feats: Tensor, pids: Tensor, num_classes: int) -> Tensor:
    """Identity centroids of the memory bank (PCL-CLIP, memory initialisation).

    ``c_k = normalize(mean_{i: pid_i = k} normalize(feats_i))``: every feature is L2-normalised,
    averaged per identity, and the mean is L2-normalised again.

    Args:
        feats: ``(N, D)`` features of the whole training set (eval-mode model), any float dtype.
        pids: ``(N,)`` int64 identity labels in ``[0, num_classes)``.
        num_classes: number C of identities; each must occur at least once.

    Returns:
        ``(C, D)`` float32 unit-norm centroids on the device of ``feats``.

    Raises:
        ValueError: shape mismatch, a label out of range, or an identity without any feature.
    """
    _check_feats_pids(feats, pids, "feats")
    pids = pids.to(feats.device).long()
    if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= num_classes):
        raise ValueError(f"pids must lie in [0, {num_classes}), got [{pids.min()}, {pids.max()}]")
    x = F.normalize(feats.float(), dim=1)
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, pids, x)
    counts = torch.bincount(pids, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{empty.numel()} identities have no feature (e.g. pid {int(empty[0])}): the memory "
            "bank needs every training identity"
        )
    return F.normalize(sums / counts.unsqueeze(1).to(x.dtype), dim=1)


def pcl_loss(feats: Tensor, centroids: Tensor, pids: Tensor, temperature: float) -> Tensor:
    """Prototypical contrastive loss L_pcl of PCL-CLIP (supervised setting of the paper).

    ``logits = normalize(feats) @ centroids.T / temperature`` and the loss is the plain
    cross-entropy of the logits with the ground-truth identity:
    ``mean_i -log(exp(x_i . c_{y_i} / t) / sum_k exp(x_i . c_k / t))``. The centroids are used
    as given (they are unit-norm by construction) and receive no gradient. Computed in float32
    with autocast off.

    Args:
        feats: ``(B, D)`` batch features (the train-mode post-BN feature), any float dtype.
        centroids: ``(C, D)`` unit-norm identity centroids.
        pids: ``(B,)`` int64 labels in ``[0, C)``.
        temperature: divides the cosine logits (0.05 in PCL-CLIP).

    Returns:
        Scalar float32 tensor.
    """
    _check_feats_pids(feats, pids, "feats")
    if centroids.dim() != 2 or centroids.shape[1] != feats.shape[1]:
        raise ValueError(f"centroids must be (C, {feats.shape[1]}), got {tuple(centroids.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with torch.autocast(device_type=feats.device.type, enabled=False):
        x = F.normalize(feats.float(), dim=1)
        logits = x @ centroids.detach().float().t() / temperature
        return F.cross_entropy(logits, pids)


@torch.no_grad()
def hard_centroid_update(centroids: Tensor, feats: Tensor, pids: Tensor, momentum: float) -> Tensor:
    """Hard-instance momentum update of the centroids of the identities in a batch.

    For every identity k of the batch: among its instances, ``x_hard`` is the normalised feature
    with the LOWEST cosine to the current centroid ``c_k`` (the first one on ties), and
    ``c_k <- normalize(momentum * c_k + (1 - momentum) * x_hard)``. Identities absent from the
    batch keep their centroid. Each identity touches only its own row, so the result does not
    depend on the order of the identities.

    Args:
        centroids: ``(C, D)`` unit-norm centroids (not modified).
        feats: ``(B, D)`` batch features (normalised here), any float dtype.
        pids: ``(B,)`` int64 labels in ``[0, C)``.
        momentum: weight m of the old centroid, in [0, 1] (0.2 in PCL-CLIP).

    Returns:
        ``(C, D)`` float32 updated centroids (a new tensor).
    """
    _check_feats_pids(feats, pids, "feats")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    c = centroids.float()
    x = F.normalize(feats.float(), dim=1)
    pids = pids.to(c.device).long()
    sims = (x * c[pids]).sum(dim=1)  # cosine of each instance to its own centroid [B]
    ids, inverse = torch.unique(pids, return_inverse=True)
    n, u = sims.shape[0], ids.shape[0]
    lowest = torch.full((u,), float("inf"), dtype=sims.dtype, device=sims.device)
    lowest = lowest.scatter_reduce(0, inverse, sims, reduce="amin")
    # First batch index reaching the minimum of its identity: the argmin of a python loop.
    index = torch.arange(n, device=sims.device)
    candidates = torch.where(sims == lowest[inverse], index, torch.full_like(index, n))
    first = torch.full((u,), n, dtype=index.dtype, device=index.device)
    first = first.scatter_reduce(0, inverse, candidates, reduce="amin")
    out = c.clone()
    out[ids] = F.normalize(momentum * c[ids] + (1.0 - momentum) * x[first], dim=1)
    return out


@torch.no_grad()
def sequential_centroid_update(
    centroids: Tensor, feats: Tensor, pids: Tensor, momentum: float
) -> Tensor:
    """Every-instance momentum update, one instance after the other (ClusterContrast's ``CM``).

    For every instance i of the batch, in batch order:
    ``c_{y_i} <- normalize(momentum * c_{y_i} + (1 - momentum) * normalize(x_i))``, so an
    identity with several instances is moved by each of them in turn. This is the update of the
    unofficial PCL-CLIP USL reproduction (and ClusterContrast) without ``--use-hard``; the
    official PCL-CLIP code carries it unused. Identities are independent, so the loop runs over
    the occurrence rank (K steps for K instances per identity), not over the batch.

    Args:
        centroids: ``(C, D)`` unit-norm centroids (not modified).
        feats: ``(B, D)`` batch features (normalised here), any float dtype.
        pids: ``(B,)`` int64 labels in ``[0, C)``.
        momentum: weight m of the old centroid, in [0, 1] (0.1 in the USL reproduction).

    Returns:
        ``(C, D)`` float32 updated centroids (a new tensor).
    """
    _check_feats_pids(feats, pids, "feats")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    out = centroids.float().clone()
    x = F.normalize(feats.float(), dim=1)
    pids = pids.to(out.device).long()
    if pids.numel() == 0:
        return out
    # Occurrence rank of each instance within its identity, in batch order.
    order = torch.argsort(pids, stable=True)
    sorted_pids = pids[order]
    counts = torch.bincount(sorted_pids)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(pids)
    rank[order] = torch.arange(len(pids), device=pids.device) - starts[sorted_pids]
    for r in range(int(rank.max()) + 1):
        step = (rank == r).nonzero().flatten()
        ids = pids[step]
        out[ids] = F.normalize(momentum * out[ids] + (1.0 - momentum) * x[step], dim=1)
    return out


# MODEL.MEMORY_UPDATE: how the centroids move after a step.
MEMORY_UPDATES = {"hard": hard_centroid_update, "all": sequential_centroid_update}


class PCLLoss(nn.Module):
    """PCL-CLIP objective with its centroid memory, as named weighted terms.

    Terms (each already multiplied by its weight; the caller sums them and logs each):

    - ``'pcl'``: ``pcl_weight * pcl_loss(out.embedding, centroids, pids, temperature)``;
    - ``'id'``: ``id_weight * CE_ls(out.cls_scores[0], pids)`` (the one classifier of the PCL
      head), skipped when ``id_weight`` is 0.

    The memory is a buffer (never seen by the optimizer): :meth:`build_memory` fills it at the
    start of an epoch and :meth:`update_memory` moves it after every step.

    Args:
        pcl_weight: weight of the PCL term (``MODEL.PCL_LOSS_WEIGHT``).
        id_weight: weight of the ID term (``MODEL.ID_LOSS_WEIGHT``); 0 drops it.
        temperature: PCL temperature (``MODEL.PCL_TEMPERATURE``).
        momentum: centroid momentum (``MODEL.MEMORY_MOMENTUM``).
        label_smooth_eps: label smoothing of the ID term (0 for plain CE).
        num_classes: number C of training identities.
        update: centroid update after a step (``MODEL.MEMORY_UPDATE``): 'hard' (the hardest
            instance of each identity, PCL-CLIP) or 'all' (every instance in turn, ClusterContrast).
    """

    def __init__(
        self,
        pcl_weight: float,
        id_weight: float,
        temperature: float,
        momentum: float,
        label_smooth_eps: float,
        num_classes: int,
        update: str = "hard",
    ) -> None:
        super().__init__()
        if pcl_weight < 0 or id_weight < 0 or pcl_weight + id_weight <= 0:
            raise ValueError(
                f"PCL_LOSS_WEIGHT {pcl_weight} and ID_LOSS_WEIGHT {id_weight} must be >= 0 and "
                "not both 0"
            )
        if temperature <= 0:
            raise ValueError(f"MODEL.PCL_TEMPERATURE must be positive, got {temperature}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MODEL.MEMORY_MOMENTUM must be in [0, 1], got {momentum}")
        if not 0.0 <= label_smooth_eps < 1.0:
            raise ValueError(f"label_smooth_eps must be in [0, 1), got {label_smooth_eps}")
        if update not in MEMORY_UPDATES:
            raise ValueError(f"MODEL.MEMORY_UPDATE = {update!r}; valid: {list(MEMORY_UPDATES)}")
        self.pcl_weight = float(pcl_weight)
        self.id_weight = float(id_weight)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.label_smooth_eps = float(label_smooth_eps)
        self.num_classes = int(num_classes)
        self.update = update
        self.register_buffer("centroids", torch.empty(0, 0), persistent=False)

    def extra_repr(self) -> str:
        """One-line summary for the loss log."""
        return (
            f"pcl_weight={self.pcl_weight}, id_weight={self.id_weight}, "
            f"temperature={self.temperature}, momentum={self.momentum}, "
            f"label_smooth_eps={self.label_smooth_eps}, num_classes={self.num_classes}, "
            f"update={self.update}"
        )

    @torch.no_grad()
    def build_memory(self, feats: Tensor, pids: Tensor, num_classes: int | None = None) -> Tensor:
        """Replace the memory with the identity centroids of the training-set features.

        Args:
            feats: ``(N, D)`` features of every training image (eval-mode model).
            pids: ``(N,)`` int64 labels in ``[0, C)``.
            num_classes: a new number of classes C (unsupervised training: the clusters of the
                epoch, whose count changes every epoch); None keeps the current one.

        Returns:
            The new ``(C, D)`` float32 centroids (also stored in ``self.centroids``).
        """
        if num_classes is not None:
            if self.id_weight > 0:
                raise ValueError("the ID term has a fixed classifier: num_classes cannot change")
            self.num_classes = int(num_classes)
        self.centroids = pid_centroids(feats, pids, self.num_classes)
        return self.centroids

    @torch.no_grad()
    def update_memory(self, out: Any, pids: Tensor) -> None:
        """Momentum update after a training step (:data:`MEMORY_UPDATES` ``[update]``).

        Args:
            out: the model's training output (``embedding`` ``(B, D)``).
            pids: ``(B,)`` int64 labels.
        """
        self._check_memory(out)
        update = MEMORY_UPDATES[self.update]
        self.centroids = update(self.centroids, out.embedding.detach(), pids, self.momentum)

    def _check_memory(self, out: Any) -> None:
        if getattr(out, "embedding", None) is None:
            raise ValueError("the PCL loss needs the PCL head's output (MODEL.METHOD 'pcl')")
        if self.centroids.numel() == 0:
            raise RuntimeError("the PCL memory bank is empty: call build_memory first")

    def forward(self, out: Any, pids: Tensor) -> dict[str, Tensor]:
        """Compute the weighted loss terms of one batch.

        Args:
            out: training output of the PCL head: ``embedding`` ``(B, D)`` post-BN feature and
                ``cls_scores`` ``[(B, C)]``.
            pids: ``(B,)`` int64 labels.

        Returns:
            ``{'pcl': ..., 'id': ...}`` scalar float32 tensors (a term with weight 0 is left
            out).
        """
        self._check_memory(out)
        losses: dict[str, Tensor] = {}
        if self.pcl_weight > 0:
            pcl = pcl_loss(out.embedding, self.centroids, pids, self.temperature)
            losses["pcl"] = self.pcl_weight * pcl
        if self.id_weight > 0:
            scores = out.cls_scores[0]
            if scores.shape[1] != self.num_classes:
                raise ValueError(
                    f"cls_scores has {scores.shape[1]} classes, expected {self.num_classes}"
                )
            ce = cross_entropy_label_smooth(scores, pids, self.label_smooth_eps)
            losses["id"] = self.id_weight * ce
        return losses
