"""Pure loss functions of CLIP-ReID.

Equation numbers refer to the CLIP-ReID paper (Li, Sun and Li, AAAI 2023). Every function works on
the device of its inputs and computes in float32, with autocast switched off inside: the losses
run on unnormalised CLIP features whose raw dot products lose too much precision in fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cross_entropy_label_smooth",
    "euclidean_dist",
    "i2t_cross_entropy",
    "i2t_logits",
    "supcon_loss",
    "triplet_loss",
]


def _autocast_off(t: Tensor) -> torch.autocast:
    """Context manager disabling autocast on the device type of ``t`` (fp32 loss math)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def cross_entropy_label_smooth(logits: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """Cross-entropy with label smoothing, paper Eq. (3) (L_id).

    The target distribution is ``q = (1 - epsilon) * onehot(y) + epsilon / C`` and the loss is
    ``mean_b sum_c -q_bc * log_softmax(logits)_bc``. ``epsilon = 0`` gives plain cross-entropy.
    The smoothed target is never materialised on the host: torch's fused ``label_smoothing``
    has exactly this definition and runs on the logits' device.

    Args:
        logits: ``(N, C)`` class scores, any float dtype.
        targets: ``(N,)`` int64 class indices in ``[0, C)``.
        epsilon: smoothing weight in ``[0, 1)``.

    Returns:
        Scalar float32 tensor.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    with _autocast_off(logits):
        return F.cross_entropy(logits.float(), targets, label_smoothing=epsilon)


def euclidean_dist(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise Euclidean distances (not squared) as in the official triplet loss.

    ``d_ij = sqrt(clamp(|x_i|^2 + |y_j|^2 - 2 x_i . y_j, min=1e-12))``; the clamp keeps the
    square root differentiable for identical vectors (its gradient is then zero).

    Args:
        x: ``(N, D)`` features.
        y: ``(M, D)`` features.

    Returns:
        ``(N, M)`` float32 distances, at least 1e-6.
    """
    with _autocast_off(x):
        x = x.float()
        y = y.float()
        sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0)
        sq = torch.addmm(sq, x, y.t(), beta=1.0, alpha=-2.0)
        return sq.clamp(min=1e-12).sqrt()


def triplet_loss(feats: Tensor, pids: Tensor, margin: float, soft_margin: bool = False) -> Tensor:
    """Batch-hard triplet loss, paper Eq. (4) (L_tri).

    For every anchor, ``d_ap`` is its largest Euclidean distance to another sample of the same
    pid and ``d_an`` its smallest distance to a sample of a different pid (features are not
    normalised). The loss is ``mean_a max(0, d_ap - d_an + margin)``, or with ``soft_margin``
    ``mean_a softplus(d_ap - d_an)`` (``margin`` is then ignored).

    Mining uses masks, so the number of positives may differ between anchors. Anchors that have
    no positive (a pid seen once in the batch) or no negative (a batch of one pid) carry no
    triplet and are excluded from the mean; under PK sampling with K >= 2 every anchor is valid
    and this equals the official mean over the batch. With no valid anchor the result is a zero
    that stays connected to ``feats`` (backward works and gives zero gradients).

    Args:
        feats: ``(N, D)`` features, any float dtype.
        pids: ``(N,)`` integer identity labels.
        margin: margin of the hinge (0.3 in the official configs).
        soft_margin: use the soft-margin form instead of the hinge.

    Returns:
        Scalar float32 tensor.
    """
    if feats.dim() != 2 or pids.shape != feats.shape[:1]:
        raise ValueError(
            f"expected feats (N, D) and pids (N,), got {tuple(feats.shape)} and {tuple(pids.shape)}"
        )
    n = feats.shape[0]
    dist = euclidean_dist(feats, feats)
    same = pids.unsqueeze(0) == pids.unsqueeze(1)
    eye = torch.eye(n, dtype=torch.bool, device=feats.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    # Filling with -inf / +inf makes an anchor without positives or negatives end up with
    # d_ap - d_an = -inf, whose hinge and softplus are exactly 0 with zero gradient (never NaN).
    dist_ap = torch.where(pos_mask, dist, -inf).amax(dim=1)
    dist_an = torch.where(neg_mask, dist, inf).amin(dim=1)
    diff = dist_ap - dist_an
    per_anchor = F.softplus(diff) if soft_margin else F.relu(diff + margin)
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    per_anchor = torch.where(valid, per_anchor, torch.zeros_like(per_anchor))
    # Dividing by a clamped count (instead of boolean indexing) avoids a host sync.
    return per_anchor.sum() / valid.sum().clamp(min=1)


def supcon_loss(
    anchors: Tensor,
    contrast: Tensor,
    anchor_pids: Tensor,
    contrast_pids: Tensor,
    temperature: float,
) -> Tensor:
    """Supervised contrastive loss of the first stage, paper Eqs. (1), (5) (L_i2t, L_t2i).

    As the official ``SupConLoss``: ``logits = anchors @ contrast.T / temperature`` on raw
    (unnormalised) features, a log-softmax over the contrast set, positives ``j`` of anchor ``i``
    where ``contrast_pids[j] == anchor_pids[i]`` (the sample itself included when both sets
    coincide), and ``loss = -mean_i (sum_j mask_ij * logprob_ij / sum_j mask_ij)``. The
    log-softmax is computed with the (detached) row maximum subtracted, which is the official
    stabilisation; the result does not depend on the shift. Anchors without any positive in the
    contrast set are excluded from the mean (zero-with-graph if none has one). Computed in
    float32 whatever the input dtype (the official code runs it in fp16).

    Args:
        anchors: ``(N, D)`` anchor features (images for i2t, texts for t2i).
        contrast: ``(M, D)`` features of the other modality.
        anchor_pids: ``(N,)`` integer labels of the anchors.
        contrast_pids: ``(M,)`` integer labels of the contrast features.
        temperature: divides the logits (1.0 in CLIP-ReID).

    Returns:
        Scalar float32 tensor.
    """
    if anchors.dim() != 2 or contrast.dim() != 2 or anchors.shape[1] != contrast.shape[1]:
        raise ValueError(
            f"expected anchors (N, D) and contrast (M, D), got {tuple(anchors.shape)} and "
            f"{tuple(contrast.shape)}"
        )
    if anchor_pids.shape != anchors.shape[:1] or contrast_pids.shape != contrast.shape[:1]:
        raise ValueError("anchor_pids / contrast_pids must be (N,) / (M,)")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with _autocast_off(anchors):
        logits = anchors.float() @ contrast.float().t() / temperature
        logits = logits - logits.amax(dim=1, keepdim=True).detach()
        log_prob = torch.log_softmax(logits, dim=1)
    mask = (anchor_pids.unsqueeze(1) == contrast_pids.unsqueeze(0)).to(log_prob.dtype)
    num_pos = mask.sum(dim=1)
    mean_log_prob_pos = (mask * log_prob).sum(dim=1) / num_pos.clamp(min=1)
    valid = num_pos > 0
    per_anchor = torch.where(valid, -mean_log_prob_pos, torch.zeros_like(mean_log_prob_pos))
    return per_anchor.sum() / valid.sum().clamp(min=1)


def i2t_cross_entropy(img_feats: Tensor, text_bank: Tensor, pids: Tensor, epsilon: float) -> Tensor:
    """Image-to-text cross-entropy of the second stage, paper Eq. (7) (L_i2tce).

    ``logits = img_feats @ text_bank.T`` (raw dot products of the unnormalised projected image
    features with the text features of every identity, no logit scale), followed by the
    label-smoothed cross-entropy of :func:`cross_entropy_label_smooth`.

    Args:
        img_feats: ``(B, E)`` projected image features (pre-BN).
        text_bank: ``(C, E)`` text features of all C identities, row ``k`` for pid ``k``.
        pids: ``(B,)`` int64 labels in ``[0, C)``.
        epsilon: label smoothing weight (0 for plain cross-entropy).

    Returns:
        Scalar float32 tensor.
    """
    return cross_entropy_label_smooth(i2t_logits(img_feats, text_bank), pids, epsilon)


def i2t_logits(img_feats: Tensor, text_bank: Tensor) -> Tensor:
    """Image-to-text logits of the second stage (also what the i2t accuracy is measured on).

    Args:
        img_feats: ``(B, E)`` projected image features.
        text_bank: ``(C, E)`` text features of all identities.

    Returns:
        ``(B, C)`` float32 logits ``img_feats @ text_bank.T``.
    """
    if img_feats.dim() != 2 or text_bank.dim() != 2 or img_feats.shape[1] != text_bank.shape[1]:
        raise ValueError(
            f"expected img_feats (B, E) and text_bank (C, E), got {tuple(img_feats.shape)} and "
            f"{tuple(text_bank.shape)}"
        )
    with _autocast_off(img_feats):
        return img_feats.float() @ text_bank.float().t()
