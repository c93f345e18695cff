"""The one inference path: feature extraction and ReID evaluation, used by training and testing."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from processor.common import autocast, batch_ids
from utils.logger import progress
from utils.metrics import EvalResult, evaluate_features
from utils.reranking import RerankParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """How features are extracted and scored (built from the config by ``build_eval_settings``)."""

    feat_norm: bool
    max_rank: int
    memory_mb: int
    rerank: RerankParams | None
    amp_dtype: str


def build_eval_settings(cfg) -> EvalSettings:
    """Collect the evaluation settings from a configuration.

    Args:
        cfg: the run configuration (TEST.* and MODEL.AMP_DTYPE).

    Returns:
        A frozen :class:`EvalSettings`.
    """
    rerank = None
    if cfg.TEST.RE_RANKING:
        rerank = RerankParams(
            k1=cfg.TEST.RE_RANKING_K1,
            k2=cfg.TEST.RE_RANKING_K2,
            lambda_value=cfg.TEST.RE_RANKING_LAMBDA,
        )
    return EvalSettings(
        feat_norm=cfg.TEST.FEAT_NORM,
        max_rank=cfg.TEST.MAX_RANK,
        memory_mb=cfg.TEST.EVAL_MEMORY_MB,
        rerank=rerank,
        amp_dtype=cfg.MODEL.AMP_DTYPE,
    )


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    settings: EvalSettings,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]:
    """Run the model in eval mode over a loader.

    Args:
        model: the ReID model (``encode_image``).
        loader: yields dict batches (images, pids, camids, viewids, paths).
        device: where the model runs.
        settings: evaluation settings (precision).

    Returns:
        (feats float32 [N, D] on ``device``, pids int64 [N], camids int64 [N], paths).
    """
    was_training = model.training
    model.eval()
    feats, pids, camids, paths = [], [], [], []
    for batch in progress(loader, total=len(loader), desc="features"):
        images = batch["images"].to(device, non_blocking=True)
        _, cams, views = batch_ids(batch, device)
        with autocast(device, settings.amp_dtype):
            out = model.encode_image(images, camids=cams, viewids=views)
        feats.append(out.float())
        pids.append(batch["pids"].numpy())
        camids.append(batch["camids"].numpy())
        paths.extend(batch["paths"])
    model.train(was_training)
    return torch.cat(feats), np.concatenate(pids), np.concatenate(camids), paths


def summarize(result: EvalResult) -> dict[str, float]:
    """Flatten an evaluation result into the numbers reported everywhere.

    Args:
        result: an :class:`EvalResult`.

    Returns:
        mAP, mINP, rank1, rank5, rank10 (fractions in [0, 1]) and num_valid_queries.
    """
    cmc = np.asarray(result.cmc)

    def rank(k: int) -> float:
        return float(cmc[min(k, len(cmc)) - 1])

    return {
        "mAP": float(result.mAP),
        "mINP": float(result.mINP),
        "rank1": rank(1),
        "rank5": rank(5),
        "rank10": rank(10),
        "num_valid_queries": int(result.num_valid_queries),
    }


def log_results(summary: dict[str, float], header: str) -> None:
    """Log mAP / mINP / CMC lines as the official code prints them (one decimal, percent).

    Args:
        summary: output of :func:`summarize`.
        header: first line, e.g. 'Validation Results - Epoch: 60'.
    """
    logger.info(header)
    logger.info("mAP: %.1f%%  mINP: %.1f%%", 100 * summary["mAP"], 100 * summary["mINP"])
    for k in (1, 5, 10):
        logger.info("CMC curve, Rank-%-3d:%.1f%%", k, 100 * summary[f"rank{k}"])


def evaluate_bundle(
    model: torch.nn.Module,
    data,
    settings: EvalSettings,
    device: torch.device,
    features: tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]] | None = None,
) -> dict[str, float]:
    """Evaluate on a data bundle's query/gallery; VehicleID averages its gallery-draw trials.

    Features are extracted once: every trial re-splits the same test images (one random gallery
    image per identity), so only the ranking is repeated per trial.

    Args:
        model: the ReID model.
        data: the ``DataBundle`` of ``datasets.build.build_dataloaders``.
        settings: evaluation settings.
        device: where the model runs.
        features: the output of :func:`extract_features` on ``data.val`` when the caller has
            already extracted it (to reuse the features afterwards); None extracts them here.

    Returns:
        :func:`summarize` of the single evaluation, or the mean over trials (with ``num_trials``).
    """
    if features is None:
        features = extract_features(model, data.val, device, settings)
    feats, pids, camids, paths = features
    num_trials = max(1, int(getattr(data, "num_trials", 1)))
    row = {path: i for i, path in enumerate(paths)}
    summaries = []
    for trial in range(num_trials):
        if trial == 0:
            q_idx = np.arange(data.num_query)
            g_idx = np.arange(data.num_query, len(paths))
            q_cam, g_cam = camids[q_idx], camids[g_idx]
        else:
            split = data.dataset.for_trial(trial)
            q_idx = np.array([row[r.path] for r in split.query])
            g_idx = np.array([row[r.path] for r in split.gallery])
            q_cam = np.array([r.camid for r in split.query])
            g_cam = np.array([r.camid for r in split.gallery])
        result = evaluate_features(
            feats[torch.as_tensor(q_idx, device=feats.device)],
            feats[torch.as_tensor(g_idx, device=feats.device)],
            pids[q_idx],
            pids[g_idx],
            q_cam,
            g_cam,
            max_rank=settings.max_rank,
            feat_norm=settings.feat_norm,
            memory_budget_mb=settings.memory_mb,
            rerank=settings.rerank,
        )
        summaries.append(summarize(result))
        if num_trials > 1:
            logger.info(
                "trial %d/%d: mAP %.1f%% R1 %.1f%% R5 %.1f%%",
                trial + 1,
                num_trials,
                100 * summaries[-1]["mAP"],
                100 * summaries[-1]["rank1"],
                100 * summaries[-1]["rank5"],
            )
    if num_trials == 1:
        return summaries[0]
    mean = {k: float(np.mean([s[k] for s in summaries])) for k in summaries[0]}
    mean["num_valid_queries"] = int(round(mean["num_valid_queries"]))
    mean["num_trials"] = num_trials
    return mean
