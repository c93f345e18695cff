"""Tests of loss/: pure functions against formulas, brute-force loops, pytorch-metric-learning."""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from yacs.config import CfgNode as CN

from loss import (
    ReIDLoss,
    build_loss,
    cross_entropy_label_smooth,
    euclidean_dist,
    i2t_cross_entropy,
    i2t_logits,
    stage1_loss,
    supcon_loss,
    triplet_loss,
)

# PK batch (4 ids x 4), a batch with unequal positives and two singletons (ids 7 and 9), and a
# batch with a singleton only.
PK_PIDS = torch.arange(4).repeat_interleave(4)
UNEQUAL_PIDS = torch.tensor([3, 3, 5, 5, 5, 7, 1, 1, 1, 1, 1, 9])
SINGLETON_PIDS = torch.tensor([0, 0, 1, 2, 2, 2])


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------


def _ce_formula(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """Official definition: q = (1-eps) onehot + eps/C, loss = sum_c mean_b(-q log p)."""
    n, c = logits.shape
    onehot = torch.zeros(n, c, dtype=torch.float64)
    onehot[torch.arange(n), targets] = 1.0
    q = (1 - eps) * onehot + eps / c
    logp = torch.log_softmax(logits.double(), dim=1)
    return (-q * logp).mean(0).sum()


def _triplet_loop(feats: torch.Tensor, pids: torch.Tensor, margin: float, soft: bool) -> float:
    """Brute force in float64: per-anchor hardest positive/negative, mean over valid anchors."""
    x = feats.double()
    terms = []
    for i in range(len(pids)):
        pos = [
            torch.norm(x[i] - x[j]).item()
            for j in range(len(pids))
            if j != i and pids[j] == pids[i]
        ]
        neg = [torch.norm(x[i] - x[j]).item() for j in range(len(pids)) if pids[j] != pids[i]]
        if not pos or not neg:
            continue
        diff = max(pos) - min(neg)
        terms.append(math.log1p(math.exp(diff)) if soft else max(0.0, diff + margin))
    return sum(terms) / len(terms) if terms else 0.0


def _supcon_loop(
    anchors: torch.Tensor,
    contrast: torch.Tensor,
    a_pids: torch.Tensor,
    c_pids: torch.Tensor,
    temperature: float,
) -> float:
    """Brute force in float64 of -mean_i(mean over positives of log softmax_j(a_i . c_j / T))."""
    a, c = anchors.double(), contrast.double()
    terms = []
    for i in range(a.shape[0]):
        logits = [(a[i] @ c[j]).item() / temperature for j in range(c.shape[0])]
        log_z = math.log(sum(math.exp(v) for v in logits))
        pos = [logits[j] - log_z for j in range(c.shape[0]) if c_pids[j] == a_pids[i]]
        if pos:
            terms.append(-sum(pos) / len(pos))
    return sum(terms) / len(terms) if terms else 0.0


def _pml_triplet(feats: torch.Tensor, pids: torch.Tensor, margin: float) -> torch.Tensor:
    dist = pml_distances.LpDistance(normalize_embeddings=False)
    loss_fn = pml_losses.TripletMarginLoss(
        margin=margin, distance=dist, reducer=pml_reducers.MeanReducer()
    )
    miner = pml_miners.BatchHardMiner(distance=dist)
    return loss_fn(feats, pids, miner(feats, pids))


def _pml_supcon(
    anchors: torch.Tensor,
    contrast: torch.Tensor,
    a_pids: torch.Tensor,
    c_pids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    dist = pml_distances.DotProductSimilarity(normalize_embeddings=False)
    loss_fn = pml_losses.SupConLoss(temperature=temperature, distance=dist)
    # pytorch-metric-learning drops the diagonal when the two label tensors are the same
    # object; the official loss keeps it, hence the clone.
    return loss_fn(anchors, a_pids, ref_emb=contrast, ref_labels=c_pids.clone())


# ---------------------------------------------------------------------------------------------
# cross-entropy with label smoothing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
def test_label_smooth_matches_formula(eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g) * 3
    targets = torch.randint(0, 5, (7,), generator=g)
    got = cross_entropy_label_smooth(logits, targets, eps)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ce_formula(logits, targets, eps).item(), rel=1e-5)


def test_label_smooth_zero_is_plain_ce() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g)
    targets = torch.randint(0, 4, (6,), generator=g)
    plain = -torch.log_softmax(logits, 1)[torch.arange(6), targets].mean()
    assert cross_entropy_label_smooth(logits, targets, 0.0).item() == pytest.approx(plain.item())


def test_label_smooth_half_input_computed_in_fp32() -> None:
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(8, 6, generator=g) * 4).half()
    targets = torch.randint(0, 6, (8,), generator=g)
    got = cross_entropy_label_smooth(logits, targets, 0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ce_formula(logits.float(), targets, 0.1).item(), rel=1e-6)


def test_label_smooth_rejects_bad_epsilon() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        cross_entropy_label_smooth(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0)


# ---------------------------------------------------------------------------------------------
# triplet
# ---------------------------------------------------------------------------------------------


def test_euclidean_dist_matches_cdist() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 7, generator=g), torch.randn(4, 7, generator=g)
    torch.testing.assert_close(euclidean_dist(x, y), torch.cdist(x, y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "pids", [PK_PIDS, UNEQUAL_PIDS, SINGLETON_PIDS], ids=["pk", "unequal", "single"]
)
@pytest.mark.parametrize("margin", [0.3, 5.0])
def test_triplet_matches_pml(pids: torch.Tensor, margin: float) -> None:
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(len(pids), 16, generator=g) * 2
    got = triplet_loss(feats, pids, margin)
    want = _pml_triplet(feats, pids, margin)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "pids", [PK_PIDS, UNEQUAL_PIDS, SINGLETON_PIDS], ids=["pk", "unequal", "single"]
)
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_matches_loop(pids: torch.Tensor, soft: bool) -> None:
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(len(pids), 8, generator=g)
    got = triplet_loss(feats, pids, 0.3, soft_margin=soft)
    assert got.item() == pytest.approx(_triplet_loop(feats, pids, 0.3, soft), rel=1e-5)


def test_triplet_large_margin_counts_every_valid_anchor() -> None:
    # With a huge margin every valid anchor's hinge is active: the loss is exactly the mean of
    # (d_ap - d_an + m) over anchors that have a positive and a negative (singletons excluded).
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(len(UNEQUAL_PIDS), 4, generator=g)
    got = triplet_loss(feats, UNEQUAL_PIDS, 100.0)
    want = _triplet_loop(feats, UNEQUAL_PIDS, 100.0, soft=False)
    n_valid = sum(int((UNEQUAL_PIDS == p).sum()) > 1 for p in UNEQUAL_PIDS)
    assert n_valid == 10
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    "pids", [torch.arange(5), torch.zeros(5, dtype=torch.long)], ids=["distinct", "one-id"]
)
def test_triplet_without_valid_anchor_is_zero_with_graph(pids: torch.Tensor) -> None:
    feats = torch.randn(5, 3, requires_grad=True)
    loss = triplet_loss(feats, pids, 0.3)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_triplet_gradient_finite_with_duplicate_features() -> None:
    # Identical features hit the clamp inside the square root; the gradient must stay finite.
    base = torch.randn(4, 6)
    feats = torch.cat([base, base[:2]]).requires_grad_()
    pids = torch.tensor([0, 0, 1, 1, 0, 1])
    triplet_loss(feats, pids, 0.3).backward()
    assert torch.isfinite(feats.grad).all()
    assert feats.grad.abs().sum() > 0


def test_triplet_gradient_matches_pml() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(UNEQUAL_PIDS), 8, generator=g)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    triplet_loss(a, UNEQUAL_PIDS, 0.3).backward()
    _pml_triplet(b, UNEQUAL_PIDS, 0.3).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# supervised contrastive
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.07])
def test_supcon_matches_pml_both_directions(temperature: float) -> None:
    g = torch.Generator().manual_seed(8)
    img = torch.randn(len(PK_PIDS), 12, generator=g)
    txt = torch.randn(len(PK_PIDS), 12, generator=g)
    for a, c in ((img, txt), (txt, img)):
        got = supcon_loss(a, c, PK_PIDS, PK_PIDS, temperature)
        want = _pml_supcon(a, c, PK_PIDS, PK_PIDS, temperature)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_supcon_unequal_sets_and_anchors_without_positive() -> None:
    # 12 anchors against 7 contrast features; anchors with pid 7 or 9 have no positive.
    g = torch.Generator().manual_seed(9)
    anchors = torch.randn(len(UNEQUAL_PIDS), 10, generator=g)
    contrast_pids = torch.tensor([1, 3, 5, 5, 1, 2, 3])
    contrast = torch.randn(len(contrast_pids), 10, generator=g)
    got = supcon_loss(anchors, contrast, UNEQUAL_PIDS, contrast_pids, 1.0)
    want_loop = _supcon_loop(anchors, contrast, UNEQUAL_PIDS, contrast_pids, 1.0)
    want_pml = _pml_supcon(anchors, contrast, UNEQUAL_PIDS, contrast_pids, 1.0)
    assert got.item() == pytest.approx(want_loop, rel=1e-5)
    assert got.item() == pytest.approx(want_pml.item(), rel=1e-5)


def test_supcon_matches_loop_with_large_logits() -> None:
    # Raw dot products of unnormalised features are large: the row-max shift must keep it exact.
    g = torch.Generator().manual_seed(10)
    a = torch.randn(6, 16, generator=g) * 6
    c = torch.randn(6, 16, generator=g) * 6
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    got = supcon_loss(a, c, pids, pids, 1.0)
    a64, c64 = a.double(), c.double()
    logp = torch.log_softmax(a64 @ c64.t(), dim=1)
    mask = (pids[:, None] == pids[None, :]).double()
    want = -((mask * logp).sum(1) / mask.sum(1)).mean()
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_supcon_fp16_and_autocast_compute_in_fp32() -> None:
    g = torch.Generator().manual_seed(11)
    a = torch.randn(8, 32, generator=g) * 3
    c = torch.randn(8, 32, generator=g) * 3
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ah, ch = a.half(), c.half()
    got = supcon_loss(ah, ch, pids, pids, 1.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(
        _supcon_loop(ah.float(), ch.float(), pids, pids, 1.0), rel=1e-5
    )
    # Under autocast the matmul would run in bf16; the loss must not follow it.
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got_ac = supcon_loss(a, c, pids, pids, 1.0)
    assert got_ac.dtype == torch.float32
    assert got_ac.item() == pytest.approx(_supcon_loop(a, c, pids, pids, 1.0), rel=1e-5)


def test_supcon_without_any_positive_is_zero_with_graph() -> None:
    a = torch.randn(3, 4, requires_grad=True)
    c = torch.randn(2, 4)
    loss = supcon_loss(a, c, torch.tensor([0, 1, 2]), torch.tensor([5, 6]), 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_stage1_loss_is_both_directions() -> None:
    g = torch.Generator().manual_seed(12)
    img = torch.randn(len(PK_PIDS), 8, generator=g)
    txt = torch.randn(len(PK_PIDS), 8, generator=g)
    out = stage1_loss(img, txt, PK_PIDS, 1.0)
    assert set(out) == {"i2t", "t2i"}
    assert out["i2t"].item() == pytest.approx(
        _pml_supcon(img, txt, PK_PIDS, PK_PIDS, 1.0).item(), rel=1e-5
    )
    assert out["t2i"].item() == pytest.approx(
        _pml_supcon(txt, img, PK_PIDS, PK_PIDS, 1.0).item(), rel=1e-5
    )


# ---------------------------------------------------------------------------------------------
# image-to-text cross-entropy
# ---------------------------------------------------------------------------------------------


def test_i2t_cross_entropy_formula() -> None:
    g = torch.Generator().manual_seed(13)
    proj = torch.randn(6, 8, generator=g)
    bank = torch.randn(5, 8, generator=g)
    pids = torch.tensor([0, 4, 4, 2, 1, 3])
    torch.testing.assert_close(i2t_logits(proj, bank), proj @ bank.t())
    got = i2t_cross_entropy(proj, bank, pids, 0.1)
    assert got.item() == pytest.approx(_ce_formula(proj @ bank.t(), pids, 0.1).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# built loss
# ---------------------------------------------------------------------------------------------


class _Out(NamedTuple):
    """Stand-in for the model's training output (same attribute names)."""

    cls_scores: list[torch.Tensor]
    feats: list[torch.Tensor]
    proj: torch.Tensor


C, B, E = 4, len(PK_PIDS), 8


def _cfg(**overrides: object) -> CN:
    cfg = CN()
    cfg.MODEL = CN()
    cfg.MODEL.METHOD = "clipreid"
    cfg.MODEL.IF_LABELSMOOTH = True
    cfg.MODEL.LABEL_SMOOTH_EPS = 0.1
    cfg.MODEL.ID_LOSS_WEIGHT = 0.25
    cfg.MODEL.TRIPLET_LOSS_WEIGHT = 0.7
    cfg.MODEL.I2T_LOSS_WEIGHT = 1.5
    cfg.MODEL.NO_MARGIN = False
    cfg.MODEL.TEMPERATURE = 1.0
    cfg.SOLVER = CN()
    cfg.SOLVER.MARGIN = 0.3
    cfg.SOLVER.STAGE2 = CN()
    cfg.SOLVER.STAGE2.TEXT_LOSSES = ["i2tce"]
    cfg.DATALOADER = CN()
    cfg.DATALOADER.SAMPLER = "softmax_triplet"
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def _out(seed: int = 0, requires_grad: bool = False) -> _Out:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, d, generator=g).requires_grad_(requires_grad) for d in (16, 16, E)]
    return _Out(
        cls_scores=[torch.randn(B, C, generator=g).requires_grad_(requires_grad) for _ in range(2)],
        feats=feats,
        proj=feats[2],
    )


def test_build_loss_default_terms_and_weights() -> None:
    out = _out()
    bank = torch.randn(C, E)
    losses = build_loss(_cfg(), C)(out, PK_PIDS, text_bank=bank)
    assert set(losses) == {"id", "tri", "i2tce"}
    id_ref = sum(cross_entropy_label_smooth(s, PK_PIDS, 0.1) for s in out.cls_scores)
    tri_ref = sum(triplet_loss(f, PK_PIDS, 0.3) for f in out.feats)
    i2t_ref = i2t_cross_entropy(out.proj, bank, PK_PIDS, 0.1)
    assert losses["id"].item() == pytest.approx(0.25 * id_ref.item(), rel=1e-6)
    assert losses["tri"].item() == pytest.approx(0.7 * tri_ref.item(), rel=1e-6)
    assert losses["i2tce"].item() == pytest.approx(1.5 * i2t_ref.item(), rel=1e-6)


def test_build_loss_without_smoothing_is_plain_ce() -> None:
    out = _out(1)
    bank = torch.randn(C, E)
    losses = build_loss(_cfg(MODEL__IF_LABELSMOOTH=False), C)(out, PK_PIDS, text_bank=bank)
    plain = sum(F.cross_entropy(s, PK_PIDS) for s in out.cls_scores)
    assert losses["id"].item() == pytest.approx(0.25 * plain.item(), rel=1e-6)
    plain_i2t = F.cross_entropy(out.proj @ bank.t(), PK_PIDS)
    assert losses["i2tce"].item() == pytest.approx(1.5 * plain_i2t.item(), rel=1e-5)


def test_build_loss_softmax_sampler_has_no_triplet() -> None:
    losses = build_loss(_cfg(DATALOADER__SAMPLER="softmax"), C)(_out(), PK_PIDS, torch.randn(C, E))
    assert set(losses) == {"id", "i2tce"}


def test_build_loss_baseline_has_no_text_term() -> None:
    losses = build_loss(_cfg(SOLVER__STAGE2__TEXT_LOSSES=[]), C)(_out(), PK_PIDS, torch.randn(C, E))
    assert set(losses) == {"id", "tri"}


def test_build_loss_soft_margin() -> None:
    out = _out(2)
    losses = build_loss(_cfg(MODEL__NO_MARGIN=True), C)(out, PK_PIDS)
    want = sum(_triplet_loop(f, PK_PIDS, 0.3, soft=True) for f in out.feats)
    assert losses["tri"].item() == pytest.approx(0.7 * want, rel=1e-5)


def test_build_loss_missing_text_bank_skips_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    loss_fn = build_loss(_cfg(), C)
    with caplog.at_level(logging.WARNING, logger="loss.build"):
        losses = loss_fn(_out(), PK_PIDS)
        loss_fn(_out(), PK_PIDS)
    assert set(losses) == {"id", "tri"}
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("i2tce" in r.getMessage() for r in warned) == 1


def test_build_loss_in_batch_contrastive_terms() -> None:
    out = _out(3)
    text_pids = torch.tensor([0, 1, 2, 3, 0, 1])
    text = torch.randn(len(text_pids), E)
    cfg = _cfg(SOLVER__STAGE2__TEXT_LOSSES=["i2t", "t2i"], MODEL__TEMPERATURE=0.5)
    losses = build_loss(cfg, C)(out, PK_PIDS, batch_text_feats=text, batch_text_pids=text_pids)
    assert set(losses) == {"id", "tri", "i2t", "t2i"}
    i2t = _supcon_loop(out.proj, text, PK_PIDS, text_pids, 0.5)
    t2i = _supcon_loop(text, out.proj, text_pids, PK_PIDS, 0.5)
    assert losses["i2t"].item() == pytest.approx(1.5 * i2t, rel=1e-5)
    assert losses["t2i"].item() == pytest.approx(1.5 * t2i, rel=1e-5)


def test_built_loss_backward_reaches_every_input() -> None:
    out = _out(4, requires_grad=True)
    losses = build_loss(_cfg(), C)(out, PK_PIDS, text_bank=torch.randn(C, E))
    sum(losses.values()).backward()
    for t in [*out.cls_scores, *out.feats]:
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_build_loss_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="softmax_triplet"):
        build_loss(_cfg(DATALOADER__SAMPLER="triplet"), C)
    with pytest.raises(ValueError, match="i2tce"):
        build_loss(_cfg(SOLVER__STAGE2__TEXT_LOSSES=["pcl"]), C)
    with pytest.raises(TypeError, match="IF_LABELSMOOTH"):
        build_loss(_cfg(MODEL__IF_LABELSMOOTH="off"), C)


def test_built_loss_checks_num_classes() -> None:
    loss_fn = ReIDLoss(1.0, 1.0, 1.0, 0.1, 0.3, False, True, ("i2tce",), 1.0, num_classes=C + 1)
    with pytest.raises(ValueError, match="classes"):
        loss_fn(_out(), PK_PIDS)
