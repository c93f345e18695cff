"""The one inference path: feature extraction and ReID evaluation, used by training and testing."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from processor.common import autocast, batch_ids, batch_images
from utils.logger import progress
from utils.metrics import EvalResult, evaluate_features
from utils.reranking import RerankParams
from utils.roc import ROC_FPRS, tpr_summary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSet:
    """Features of a set of images and their labels, row i describing image i.

    Attributes:
        feats: float32 [N, D] features (on the device they were extracted on).
        pids: int64 numpy [N] identities.
        camids: int64 numpy [N] cameras.
        viewids: int64 numpy [N] viewpoints.
        paths: N image files.
    """

    feats: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray
    viewids: np.ndarray
    paths: list[str]

    def __post_init__(self) -> None:
        n = self.feats.shape[0]
        sizes = {"pids": len(self.pids), "camids": len(self.camids)}
        sizes.update(viewids=len(self.viewids), paths=len(self.paths))
        wrong = {name: size for name, size in sizes.items() if size != n}
        if wrong:
            raise ValueError(f"FeatureSet of {n} features but {wrong} labels")

    def __len__(self) -> int:
        return self.feats.shape[0]

    def subset(self, idx: np.ndarray | slice) -> FeatureSet:
        """The rows ``idx`` (an index array or a slice), in that order.

        Args:
            idx: int [n] row indices or a slice.

        Returns:
            A new :class:`FeatureSet` (features indexed on their device).
        """
        if isinstance(idx, slice):
            rows = range(len(self))[idx]
            feats, paths = self.feats[idx], self.paths[idx]
        else:
            rows = np.asarray(idx, dtype=np.int64)
            feats = self.feats[torch.as_tensor(rows, device=self.feats.device)]
            paths = [self.paths[i] for i in rows]
        take = np.asarray(rows, dtype=np.int64)
        return FeatureSet(feats, self.pids[take], self.camids[take], self.viewids[take], paths)

    def query(self, num_query: int) -> FeatureSet:
        """The first ``num_query`` rows: the query set of an evaluation loader."""
        return self.subset(slice(0, num_query))

    def gallery(self, num_query: int) -> FeatureSet:
        """The rows after the first ``num_query``: the gallery set of an evaluation loader."""
        return self.subset(slice(num_query, None))


@dataclass(frozen=True)
class EvalSettings:
    """How features are extracted and scored (built from the config by ``build_eval_settings``).

    Attributes:
        feat_norm: L2-normalise the features before the distances (``TEST.FEAT_NORM``).
        max_rank: CMC length (``TEST.MAX_RANK``).
        memory_mb: working-memory budget of the evaluation (``TEST.EVAL_MEMORY_MB``).
        rerank: k-reciprocal re-ranking parameters, or None (``TEST.RE_RANKING``).
        amp_dtype: autocast precision on CUDA (``MODEL.AMP_DTYPE``).
        flip_feat: average each image's feature with its horizontal mirror's
            (``TEST.FLIP_FEAT``).
        sie_fallback: SIE vector of images without usable camera/view ids, 'mean' or 'none'
            (``TEST.SIE_FALLBACK``; see ``ReIDModel.sie_vectors``).
        roc: also report TPR at the false-positive rates ``utils.roc.ROC_FPRS`` of the
            verification ROC (``TEST.ROC``).
    """

    feat_norm: bool
    max_rank: int
    memory_mb: int
    rerank: RerankParams | None
    amp_dtype: str
    flip_feat: bool = False
    sie_fallback: str = "mean"
    roc: bool = False


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
            float16=cfg.TEST.RE_RANKING_FLOAT16,
        )
    return EvalSettings(
        feat_norm=cfg.TEST.FEAT_NORM,
        max_rank=cfg.TEST.MAX_RANK,
        memory_mb=cfg.TEST.EVAL_MEMORY_MB,
        rerank=rerank,
        amp_dtype=cfg.MODEL.AMP_DTYPE,
        flip_feat=bool(cfg.TEST.FLIP_FEAT),
        sie_fallback=cfg.TEST.SIE_FALLBACK,
        roc=bool(cfg.TEST.ROC),
    )


def encode_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    camids: torch.Tensor | None,
    viewids: torch.Tensor | None,
    settings: EvalSettings,
) -> torch.Tensor:
    """The evaluation feature of one batch: the one model call of every inference path.

    Runs ``model.encode_image`` under autocast (``settings.amp_dtype``, CUDA only). With
    ``settings.flip_feat`` the feature is the mean of the image's and its horizontal mirror's
    features, before any normalisation (as fast-reid's flip test). Missing ids (``None``) get the
    model's SIE fallback ``settings.sie_fallback`` (passed to the model only when it is not
    'none', so any object with ``encode_image(images, camids, viewids)`` works without SIE).

    Args:
        model: the ReID model in eval mode (``encode_image``).
        images: float [B, 3, H, W] on the model's device.
        camids: int64 [B] camera ids, or None when unknown.
        viewids: int64 [B] view ids, or None when unknown.
        settings: evaluation settings (precision, flip, SIE fallback).

    Returns:
        float32 [B, D] features, not normalised.
    """
    kwargs = {}
    if settings.sie_fallback != "none" and (camids is None or viewids is None):
        kwargs["sie_fallback"] = settings.sie_fallback
    with autocast(images.device, settings.amp_dtype):
        feats = model.encode_image(images, camids=camids, viewids=viewids, **kwargs).float()
        if settings.flip_feat:
            mirrored = model.encode_image(images.flip(3), camids=camids, viewids=viewids, **kwargs)
            feats = (feats + mirrored.float()) / 2
    return feats


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    settings: EvalSettings,
    *,
    pass_ids: bool = True,
) -> FeatureSet:
    """Run the model in eval mode over a loader (:func:`encode_batch` per batch).

    Args:
        model: the ReID model (``encode_image``).
        loader: yields dict batches (images, pids, camids, viewids, paths).
        device: where the model runs.
        settings: evaluation settings (precision, flip, SIE fallback).
        pass_ids: give the batches' camera/view ids to the model (SIE); False when they are not
            the ids the model was trained with (a test set of another dataset): the model then
            uses ``settings.sie_fallback``. The returned set keeps the loader's ids either way.

    Returns:
        A :class:`FeatureSet` in loader order, features float32 [N, D] on ``device``.
    """
    was_training = model.training
    model.eval()
    feats, pids, camids, viewids, paths = [], [], [], [], []
    for batch in progress(
        loader, total=len(loader), desc="features", unit="batches", log_lines=True
    ):
        images = batch_images(batch, model, device)
        _, cams, views = batch_ids(batch, device) if pass_ids else (None, None, None)
        feats.append(encode_batch(model, images, cams, views, settings))
        pids.append(batch["pids"].numpy())
        camids.append(batch["camids"].numpy())
        viewids.append(batch["viewids"].numpy())
        paths.extend(batch["paths"])
    model.train(was_training)
    return FeatureSet(
        torch.cat(feats),
        np.concatenate(pids).astype(np.int64),
        np.concatenate(camids).astype(np.int64),
        np.concatenate(viewids).astype(np.int64),
        paths,
    )


def summarize(result: EvalResult) -> dict[str, float]:
    """Flatten an evaluation result into the numbers reported everywhere.

    Args:
        result: an :class:`EvalResult`.

    Returns:
        mAP, mINP, rank1, rank5, rank10 (fractions in [0, 1]) and num_valid_queries; with the
        ROC (``TEST.ROC``) also ``tpr@fpr1e-4``, ``tpr@fpr1e-3`` and ``tpr@fpr1e-2``.
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
        **tpr_summary(getattr(result, "tpr_at_fpr", None)),
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


def evaluate_trials(
    features: FeatureSet, data, settings: EvalSettings, *, keep_topk: int = 0
) -> list[EvalResult]:
    """Evaluate the query/gallery split of each trial (one, except VehicleID's gallery draws).

    Features are extracted once: every trial re-splits the same test images (one random gallery
    image per identity), so only the ranking is repeated per trial.

    Args:
        features: :func:`extract_features` of ``data.val`` (queries first, then the gallery).
        data: the ``DataBundle`` of ``datasets.build.build_dataloaders`` (``num_query``,
            ``num_trials``, ``dataset.for_trial``).
        settings: evaluation settings.
        keep_topk: keep each query's top-k gallery list in the results (ranked lists).

    Returns:
        One :class:`EvalResult` per trial; the first is the standard (loader) split.
    """
    num_trials = max(1, int(getattr(data, "num_trials", 1)))
    row = {path: i for i, path in enumerate(features.paths)}
    results = []
    for trial in range(num_trials):
        if trial == 0:
            query, gallery = features.query(data.num_query), features.gallery(data.num_query)
        else:
            split = data.dataset.for_trial(trial)
            # The trial's own camera ids: the VehicleID split sets them (query 0, gallery 1).
            query = dataclasses.replace(
                features.subset([row[r.path] for r in split.query]),
                camids=np.array([r.camid for r in split.query], dtype=np.int64),
            )
            gallery = dataclasses.replace(
                features.subset([row[r.path] for r in split.gallery]),
                camids=np.array([r.camid for r in split.gallery], dtype=np.int64),
            )
        results.append(evaluate_sets(query, gallery, settings, keep_topk=keep_topk))
        if num_trials > 1:
            s = summarize(results[-1])
            logger.info(
                "trial %d/%d: mAP %.1f%% R1 %.1f%% R5 %.1f%%",
                trial + 1,
                num_trials,
                100 * s["mAP"],
                100 * s["rank1"],
                100 * s["rank5"],
            )
    return results


def evaluate_sets(
    query: FeatureSet, gallery: FeatureSet, settings: EvalSettings, *, keep_topk: int = 0
) -> EvalResult:
    """Evaluate one query set against one gallery with the configured settings.

    Args:
        query: the queries.
        gallery: the gallery (features on the same device).
        settings: evaluation settings (normalisation, CMC length, budget, re-ranking).
        keep_topk: keep each query's top-k gallery list in the result.

    Returns:
        The :class:`EvalResult`.
    """
    return evaluate_features(
        query.feats,
        gallery.feats,
        query.pids,
        gallery.pids,
        query.camids,
        gallery.camids,
        max_rank=settings.max_rank,
        feat_norm=settings.feat_norm,
        keep_topk=keep_topk,
        memory_budget_mb=settings.memory_mb,
        rerank=settings.rerank,
        roc_fprs=ROC_FPRS if settings.roc else (),
    )


def summarize_trials(results: list[EvalResult]) -> dict[str, float]:
    """The summary of one evaluation, or the mean over trials.

    Args:
        results: :func:`evaluate_trials` output.

    Returns:
        :func:`summarize` of the single result, or the mean of each number over the trials
        (``num_valid_queries`` rounded) with ``num_trials``.
    """
    summaries = [summarize(r) for r in results]
    if len(summaries) == 1:
        return summaries[0]
    mean = {k: float(np.mean([s[k] for s in summaries])) for k in summaries[0]}
    mean["num_valid_queries"] = int(round(mean["num_valid_queries"]))
    mean["num_trials"] = len(summaries)
    return mean


def evaluate_test_sets(
    model: torch.nn.Module,
    data,
    settings: EvalSettings,
    device: torch.device,
    features: FeatureSet | None = None,
    *,
    keep_topk: int = 0,
) -> list[tuple[object, FeatureSet, list[EvalResult]]]:
    """Evaluate every test set of a bundle (``DATASETS.TEST_NAMES``), each on its own.

    Args:
        model: the ReID model.
        data: the ``DataBundle`` (its ``tests``; a bundle-like object without ``tests`` is
            evaluated as its single set).
        settings: evaluation settings.
        device: where the model runs.
        features: :func:`extract_features` of the first set when the caller has them.
        keep_topk: per-query top-k lists to keep (ranked lists).

    Returns:
        One ``(test set, its features, its per-trial results)`` per test set, in order.
    """
    out = []
    for i, test in enumerate(getattr(data, "tests", None) or [data]):
        feats = features if i == 0 and features is not None else None
        if feats is None:
            pass_ids = bool(getattr(test, "ids_known", True))
            feats = extract_features(model, test.val, device, settings, pass_ids=pass_ids)
        out.append((test, feats, evaluate_trials(feats, test, settings, keep_topk=keep_topk)))
    return out


def summarize_test_sets(
    evaluated: list[tuple[object, FeatureSet, list[EvalResult]]],
) -> dict[str, float]:
    """The summary of the first test set, with every set's under ``'test_sets'`` when several.

    Args:
        evaluated: :func:`evaluate_test_sets` output.

    Returns:
        :func:`summarize_trials` of the first set; with more than one set also
        ``'test_sets': {name: summary}`` for all of them (the first included). Each further set
        is logged in one line.
    """
    first = summarize_trials(evaluated[0][2])
    if len(evaluated) == 1:
        return first
    summaries = {test.name: summarize_trials(results) for test, _, results in evaluated}
    for name, s in summaries.items():
        logger.info(
            "test set %s: mAP %.1f%%  R1 %.1f%%  R5 %.1f%%  mINP %.1f%%",
            name,
            100 * s["mAP"],
            100 * s["rank1"],
            100 * s["rank5"],
            100 * s["mINP"],
        )
    return {**first, "test_sets": summaries}


def evaluate_bundle(
    model: torch.nn.Module,
    data,
    settings: EvalSettings,
    device: torch.device,
    features: FeatureSet | None = None,
) -> dict[str, float]:
    """Evaluate on a data bundle's test sets; VehicleID averages its gallery-draw trials.

    Args:
        model: the ReID model.
        data: the ``DataBundle`` of ``datasets.build.build_dataloaders``.
        settings: evaluation settings.
        device: where the model runs.
        features: :func:`extract_features` of ``data.val`` (the first test set) when the caller
            has already extracted them (to reuse them afterwards); None extracts them here.

    Returns:
        :func:`summarize` of the first test set's evaluation, or the mean over trials (with
        ``num_trials``); with several test sets (``DATASETS.TEST_NAMES``) also ``'test_sets'``:
        ``{name: summary}`` of each (see :func:`summarize_test_sets`).
    """
    return summarize_test_sets(evaluate_test_sets(model, data, settings, device, features))
