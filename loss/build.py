"""Build the training losses (CLIP-ReID, baseline, PCL-CLIP) from a config: named weighted terms."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional import cross_entropy_label_smooth, i2t_cross_entropy, supcon_loss, triplet_loss
from .pcl import PCLLoss

logger = logging.getLogger(__name__)

__all__ = ["SAMPLERS", "TEXT_LOSSES", "ReIDLoss", "build_loss", "build_pcl_loss", "stage1_loss"]

# Stage-2 text losses: 'i2tce' is the paper's L_i2tce (the default); 'i2t' / 't2i' are the
# in-batch contrastive alternatives of the paper's Tab. 6 ablation.
TEXT_LOSSES = ("i2tce", "i2t", "t2i")

# Sampler name -> whether the triplet term is on: random batches ('softmax') do not guarantee
# positives, so the triplet loss is only used with the PK sampler.
SAMPLERS = {"softmax_triplet": True, "softmax": False}


def stage1_loss(
    img_feats: Tensor, text_feats: Tensor, pids: Tensor, temperature: float = 1.0
) -> dict[str, Tensor]:
    """Symmetric image-text contrastive loss of the first stage, paper Eq. (6).

    One text feature per sample (the prompt of that sample's pid), so both sides share ``pids``.

    Args:
        img_feats: ``(B, E)`` cached image features.
        text_feats: ``(B, E)`` text features of the samples' pids.
        pids: ``(B,)`` int64 labels.
        temperature: logit temperature (1.0 in CLIP-ReID).

    Returns:
        ``{'i2t': supcon(img -> text), 't2i': supcon(text -> img)}``, scalar float32 tensors
        (unweighted; the stage-1 objective is their sum).
    """
    return {
        "i2t": supcon_loss(img_feats, text_feats, pids, pids, temperature),
        "t2i": supcon_loss(text_feats, img_feats, pids, pids, temperature),
    }


class ReIDLoss(nn.Module):
    """Second-stage (and baseline) objective as a dict of weighted terms, paper Eq. (8).

    Terms (each already multiplied by its weight; the caller sums the values and logs each):

    - ``'id'``: ``id_weight * sum_k CE_ls(out.cls_scores[k], pids)``.
    - ``'tri'``: ``triplet_weight * sum_k triplet(out.feats[k], pids)``, when ``use_triplet``.
    - ``'i2tce'``: ``i2t_weight * CE_ls(out.proj @ text_bank.T, pids)``, when ``'i2tce'`` is in
      ``text_losses`` and ``text_bank`` is given.
    - ``'i2t'`` / ``'t2i'``: ``i2t_weight * supcon`` between ``out.proj`` and the batch's text
      features in each direction, when enabled in ``text_losses`` and ``batch_text_feats`` is
      given.

    A configured text term whose text input is missing is skipped with a one-time warning (the
    baseline and the first evaluation calls pass no text).

    Args:
        id_weight: weight of the ID (classification) term.
        triplet_weight: weight of the triplet term.
        i2t_weight: weight of each image-text term.
        label_smooth_eps: label smoothing of every cross-entropy (0 for plain CE).
        margin: triplet margin.
        soft_margin: soft-margin triplet instead of the hinge.
        use_triplet: whether the triplet term exists.
        text_losses: subset of :data:`TEXT_LOSSES`; empty for the baseline.
        temperature: temperature of the in-batch ``'i2t'`` / ``'t2i'`` terms.
        num_classes: if given, the class dimension of the logits and of ``text_bank`` is checked.
    """

    def __init__(
        self,
        id_weight: float,
        triplet_weight: float,
        i2t_weight: float,
        label_smooth_eps: float,
        margin: float,
        soft_margin: bool,
        use_triplet: bool,
        text_losses: Sequence[str] = ("i2tce",),
        temperature: float = 1.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        unknown = [name for name in text_losses if name not in TEXT_LOSSES]
        if unknown:
            raise ValueError(f"unknown text loss(es) {unknown}; valid names: {list(TEXT_LOSSES)}")
        if not 0.0 <= label_smooth_eps < 1.0:
            raise ValueError(f"label_smooth_eps must be in [0, 1), got {label_smooth_eps}")
        self.id_weight = float(id_weight)
        self.triplet_weight = float(triplet_weight)
        self.i2t_weight = float(i2t_weight)
        self.label_smooth_eps = float(label_smooth_eps)
        self.margin = float(margin)
        self.soft_margin = bool(soft_margin)
        self.use_triplet = bool(use_triplet)
        self.text_losses = tuple(dict.fromkeys(text_losses))
        self.temperature = float(temperature)
        self.num_classes = num_classes
        self._warned_missing: set[str] = set()

    def extra_repr(self) -> str:
        """One-line summary for the model/loss log."""
        return (
            f"id_weight={self.id_weight}, triplet_weight={self.triplet_weight}, "
            f"i2t_weight={self.i2t_weight}, label_smooth_eps={self.label_smooth_eps}, "
            f"margin={'soft' if self.soft_margin else self.margin}, "
            f"use_triplet={self.use_triplet}, text_losses={list(self.text_losses)}, "
            f"temperature={self.temperature}"
        )

    def _warn_missing(self, term: str, arg: str) -> None:
        if term not in self._warned_missing:
            self._warned_missing.add(term)
            logger.warning("text loss %r is enabled but %s was not given: term skipped", term, arg)

    def _check_classes(self, name: str, size: int) -> None:
        if self.num_classes is not None and size != self.num_classes:
            raise ValueError(f"{name} has {size} classes, expected {self.num_classes}")

    def forward(
        self,
        out: Any,
        pids: Tensor,
        text_bank: Tensor | None = None,
        batch_text_feats: Tensor | None = None,
        batch_text_pids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the weighted loss terms of one batch.

        Args:
            out: training output of the model with attributes ``cls_scores`` (list of
                ``(B, C)`` logits), ``feats`` (list of ``(B, D_k)`` pre-BN features) and
                ``proj`` (``(B, E)`` projected image feature).
            pids: ``(B,)`` int64 labels.
            text_bank: ``(C, E)`` text features of every identity (for ``'i2tce'``).
            batch_text_feats: ``(M, E)`` text features for the in-batch ``'i2t'`` / ``'t2i'``
                terms.
            batch_text_pids: ``(M,)`` labels of ``batch_text_feats``; defaults to ``pids``.

        Returns:
            Dict of scalar float32 tensors, keys among ``'id', 'tri', 'i2tce', 'i2t', 't2i'``.
        """
        if not out.cls_scores or (self.use_triplet and not out.feats):
            raise ValueError("the model output needs non-empty cls_scores (and feats for triplet)")
        losses: dict[str, Tensor] = {}
        id_terms = []
        for scores in out.cls_scores:
            self._check_classes("cls_scores", scores.shape[1])
            id_terms.append(cross_entropy_label_smooth(scores, pids, self.label_smooth_eps))
        losses["id"] = self.id_weight * torch.stack(id_terms).sum()

        if self.use_triplet:
            tri = [triplet_loss(f, pids, self.margin, self.soft_margin) for f in out.feats]
            losses["tri"] = self.triplet_weight * torch.stack(tri).sum()

        if "i2tce" in self.text_losses:
            if text_bank is None:
                self._warn_missing("i2tce", "text_bank")
            else:
                self._check_classes("text_bank", text_bank.shape[0])
                ce = i2t_cross_entropy(out.proj, text_bank, pids, self.label_smooth_eps)
                losses["i2tce"] = self.i2t_weight * ce

        text_pids = pids if batch_text_pids is None else batch_text_pids
        for term in ("i2t", "t2i"):
            if term not in self.text_losses:
                continue
            if batch_text_feats is None:
                self._warn_missing(term, "batch_text_feats")
                continue
            if term == "i2t":
                con = supcon_loss(out.proj, batch_text_feats, pids, text_pids, self.temperature)
            else:
                con = supcon_loss(batch_text_feats, out.proj, text_pids, pids, self.temperature)
            losses[term] = self.i2t_weight * con
        return losses


def _check_bools(cfg: Any, keys: Sequence[str]) -> None:
    for key in keys:
        # bool('off') is True: a legacy string here would silently flip the setting.
        if not isinstance(cfg.MODEL[key], bool):
            raise TypeError(
                f"MODEL.{key} must be a bool, got {cfg.MODEL[key]!r} (legacy 'on'/'off' "
                "strings are converted when the config is loaded)"
            )


def build_pcl_loss(cfg: Any, num_classes: int) -> PCLLoss:
    """Build the PCL-CLIP objective (``MODEL.METHOD 'pcl'``) from the config.

    Reads ``MODEL.{PCL_LOSS_WEIGHT, ID_LOSS_WEIGHT, PCL_TEMPERATURE, MEMORY_MOMENTUM,
    MEMORY_UPDATE, IF_LABELSMOOTH, LABEL_SMOOTH_EPS}``. No triplet and no text term.

    Args:
        cfg: yacs config.
        num_classes: number of training identities (rows of the memory bank).

    Returns:
        The :class:`PCLLoss` (its memory is filled by ``build_memory`` each epoch).
    """
    _check_bools(cfg, ("IF_LABELSMOOTH",))
    eps = float(cfg.MODEL.LABEL_SMOOTH_EPS) if cfg.MODEL.IF_LABELSMOOTH else 0.0
    loss = PCLLoss(
        pcl_weight=float(cfg.MODEL.PCL_LOSS_WEIGHT),
        id_weight=float(cfg.MODEL.ID_LOSS_WEIGHT),
        temperature=float(cfg.MODEL.PCL_TEMPERATURE),
        momentum=float(cfg.MODEL.MEMORY_MOMENTUM),
        label_smooth_eps=eps,
        num_classes=num_classes,
        update=str(cfg.MODEL.MEMORY_UPDATE),
    )
    logger.info("loss: %s", loss.extra_repr())
    return loss


def build_loss(cfg: Any, num_classes: int, with_text: bool = True) -> ReIDLoss:
    """Build the second-stage / baseline loss of CLIP-ReID.

    Reads ``MODEL.{IF_LABELSMOOTH, LABEL_SMOOTH_EPS, ID_LOSS_WEIGHT, TRIPLET_LOSS_WEIGHT,
    I2T_LOSS_WEIGHT, NO_MARGIN, TEMPERATURE}``, ``SOLVER.MARGIN``, ``DATALOADER.SAMPLER`` and
    ``SOLVER.STAGE2.TEXT_LOSSES`` (the text terms, when the model has the text side). PCL-CLIP
    is built by :func:`build_pcl_loss`. The official center loss is left out: it was built but
    never added to the objective.

    Args:
        cfg: yacs config.
        num_classes: number of training identities (checked against the logits).
        with_text: False builds no text term (the baseline has no text side).

    Returns:
        The :class:`ReIDLoss`.
    """
    sampler = cfg.DATALOADER.SAMPLER
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown DATALOADER.SAMPLER {sampler!r}; valid names: {list(SAMPLERS)}")
    _check_bools(cfg, ("IF_LABELSMOOTH", "NO_MARGIN"))
    eps = float(cfg.MODEL.LABEL_SMOOTH_EPS) if cfg.MODEL.IF_LABELSMOOTH else 0.0
    loss = ReIDLoss(
        id_weight=cfg.MODEL.ID_LOSS_WEIGHT,
        triplet_weight=cfg.MODEL.TRIPLET_LOSS_WEIGHT,
        i2t_weight=cfg.MODEL.I2T_LOSS_WEIGHT,
        label_smooth_eps=eps,
        margin=cfg.SOLVER.MARGIN,
        soft_margin=cfg.MODEL.NO_MARGIN,
        use_triplet=SAMPLERS[sampler],
        text_losses=list(cfg.SOLVER.STAGE2.TEXT_LOSSES) if with_text else [],
        temperature=cfg.MODEL.TEMPERATURE,
        num_classes=num_classes,
    )
    logger.info("loss: %s", loss.extra_repr())
    return loss
