"""Features of any images from a trained model: the Python API for trackers and search systems.

::

    from processor.extractor import FeatureExtractor

    extractor = FeatureExtractor.from_run("runs/market_vit", device="cuda")
    feats = extractor(["a.jpg", "b.jpg"])          # float32 [2, D] on the device, unit rows
    feats = extractor(crops, camids=[0, 3])        # numpy HWC uint8 RGB crops, SIE camera ids
    sims = feats @ feats.T                          # cosine similarity (TEST.FEAT_NORM)

The features are the evaluator's (``test_clipreid.py``): the evaluation loaders' test transform
(:func:`datasets.transforms.build_transforms`: resize to ``INPUT.SIZE_TEST``, normalise),
the same model call (:func:`processor.evaluate.encode_batch`: ``encode_image`` with
``TEST.NECK_FEAT``, autocast by ``MODEL.AMP_DTYPE`` on CUDA, ``TEST.FLIP_FEAT``) and the same
L2 normalisation (:func:`utils.distance.prepare_features`), in batches of ``TEST.IMS_PER_BATCH``.

The extractor lives in ``processor/`` next to the evaluator whose inference path it shares: it
needs the model (``model/``), the test transform (``datasets/``) and the evaluator's batch call,
and ``model/`` stays free of data and device handling.

SIE models (``MODEL.SIE_CAMERA`` / ``MODEL.SIE_VIEW``) use the camera/view ids when given; without
them the model adds the SIE fallback of ``TEST.SIE_FALLBACK`` (default 'mean': the mean SIE
vector; see ``ReIDModel.sie_vectors`` and the measured cost in the README).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from yacs.config import CfgNode

from configs.config import load_cfg
from datasets.image_dataset import read_image
from datasets.transforms import build_transforms
from model.loading import build_model_from_checkpoint
from model.reid_model import ReIDModel
from processor.evaluate import EvalSettings, build_eval_settings, encode_batch
from utils.checkpoint import write_text
from utils.dist import resolve_device
from utils.distance import prepare_features

__all__ = [
    "FeatureExtractor",
    "ImageInput",
    "build_feature_extractor",
    "preprocess_image",
    "run_weights",
    "warn_sie_fallback",
]

logger = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]  # noqa: UP007
# Images per worker below which decoding in the calling process is faster than starting workers.
_IMAGES_PER_WORKER = 64


def run_weights(run_dir: str | os.PathLike, cfg: CfgNode) -> Path:
    """The trained weights of a run folder: the final ``{MODEL.NAME}_{E}.pth``, else last.pth.

    Args:
        run_dir: the run's ``OUTPUT_DIR``.
        cfg: its configuration (MODEL.NAME, SOLVER.STAGE2.MAX_EPOCHS).

    Returns:
        The path of the file to load.

    Raises:
        FileNotFoundError: neither file exists; the message names both.
    """
    run = Path(run_dir)
    final = run / f"{cfg.MODEL.NAME}_{int(cfg.SOLVER.STAGE2.MAX_EPOCHS)}.pth"
    if final.is_file():
        return final
    last = run / "last.pth"
    if last.is_file():
        logger.warning(
            "%s not found (unfinished run?): using the latest checkpoint %s", final, last
        )
        return last
    raise FileNotFoundError(
        f"run folder '{run}' holds neither the final weights {final.name} nor last.pth; pass "
        "weights= explicitly"
    )


def preprocess_image(
    image: ImageInput, transform: Callable[[Any], torch.Tensor], input_size: tuple[int, int]
) -> torch.Tensor:
    """One image as the model input.

    Args:
        image: an image file path; a PIL image (converted to RGB); a uint8 numpy array
            [H, W, 3] (RGB) or [H, W] (grey); a uint8 tensor [3, H, W] (RGB); or a float tensor
            [3, H, W] already preprocessed (resized to ``input_size`` and normalised, e.g. by
            this function), used as it is.
        transform: the test transform (uint8 [3, h, w] or PIL image -> float32 [3, H, W]).
        input_size: (H, W) of the model input (``INPUT.SIZE_TEST``).

    Returns:
        float32 [3, H, W].

    Raises:
        datasets.bases.CorruptImageError: an image file cannot be read (names it).
        TypeError: an unsupported input type.
        ValueError: an unsupported dtype or shape (the message says what is accepted).
    """
    if isinstance(image, (str, os.PathLike)):
        return transform(read_image(os.fspath(image)))
    if isinstance(image, Image.Image):
        return transform(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"numpy images must be uint8 [H, W, 3] (RGB) or [H, W]; got {image.dtype} "
                f"{list(image.shape)}"
            )
        pixels = torch.from_numpy(np.ascontiguousarray(image))
        pixels = pixels[..., None].expand(-1, -1, 3) if pixels.ndim == 2 else pixels
        if pixels.shape[2] != 3:
            raise ValueError(f"numpy images must have 3 channels (RGB); got {list(image.shape)}")
        return transform(pixels.permute(2, 0, 1))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be [3, H, W]; got {list(image.shape)}")
        if image.dtype == torch.uint8:
            return transform(image.cpu())
        if not image.is_floating_point() or tuple(image.shape[1:]) != tuple(input_size):
            raise ValueError(
                f"a {image.dtype} tensor {list(image.shape)} is neither a uint8 image nor a "
                f"preprocessed float input [3, {input_size[0]}, {input_size[1]}] "
                "(INPUT.SIZE_TEST); pass uint8 RGB pixels for the test transform"
            )
        return image.float()
    raise TypeError(
        f"unsupported image type {type(image).__name__}: pass a path, a PIL image, a numpy "
        "array or a tensor"
    )


class _Images(Dataset):
    """Inputs -> preprocessed model inputs, for a loader (file decoding in workers)."""

    def __init__(
        self,
        items: Sequence[ImageInput],
        transform: Callable[[Any], torch.Tensor],
        input_size: tuple[int, int],
    ) -> None:
        self.items, self.transform, self.input_size = items, transform, input_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return preprocess_image(self.items[i], self.transform, self.input_size)


class FeatureExtractor:
    """Evaluation features of images, from image files, PIL images, arrays or tensors.

    Build it with :meth:`from_run` or :meth:`from_config` (or
    :func:`build_feature_extractor`); the constructor takes the parts.

    Args:
        model: the ReID model (moved to ``device`` and put in eval mode).
        transform: the test transform (uint8 [3, h, w] or PIL image -> float32 [3, H, W]).
        settings: evaluation settings (normalisation, precision, flip test, SIE fallback).
        device: where the model runs; the features are returned there.
        batch_size: images per model call.
        num_workers: loader workers that decode image files (0: in the calling process).
        input_size: (H, W) the transform resizes to (``INPUT.SIZE_TEST``); None: the model's.

    Attributes:
        model, transform, settings, device, batch_size, num_workers: as given.
        input_size: (H, W) of the model input.
    """

    def __init__(
        self,
        model: ReIDModel,
        transform,
        settings: EvalSettings,
        device: torch.device,
        batch_size: int = 64,
        num_workers: int = 0,
        input_size: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.transform = transform
        self.settings = settings
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        size = model.image_encoder.image_size if input_size is None else input_size
        self.input_size = (int(size[0]), int(size[1]))
        self._warned_fallback = False

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        cfg_or_path: CfgNode | str | os.PathLike,
        weights: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        overrides: Sequence[str] = (),
        num_views: int | None = None,
    ) -> FeatureExtractor:
        """Build from a configuration (or a YAML file, e.g. a run's config.yaml) and weights.

        Args:
            cfg_or_path: a configuration, or a YAML path read with ``configs.config.load_cfg``.
            weights: a checkpoint: weights-only ``.pth`` (official or this project's) or a
                training checkpoint (``last.pth``).
            device: 'cpu', 'cuda', 'cuda:N', a ``torch.device``, or None for ``MODEL.DEVICE``.
            overrides: ``[KEY, VALUE, ...]`` config overrides, e.g. ``['TEST.FLIP_FEAT',
                'True']``.
            num_views: training views, for camera x view SIE only (sizes the SIE table).

        Returns:
            The extractor.

        Raises:
            FileNotFoundError: the config or the weights file does not exist.
            configs.config.ConfigError: an invalid config or override.
            model.loading.CheckpointMismatchError: the weights do not fit the config.
        """
        if isinstance(cfg_or_path, CfgNode):
            cfg = _with_overrides(cfg_or_path, overrides)
        else:
            if not os.path.isfile(cfg_or_path):
                raise FileNotFoundError(f"config file '{cfg_or_path}' does not exist")
            cfg = load_cfg(str(cfg_or_path), list(overrides))
        model = build_model_from_checkpoint(cfg, weights, num_views=num_views, source="weights")
        return build_feature_extractor(cfg, model, device)

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        weights: str | os.PathLike | None = None,
        overrides: Sequence[str] = (),
        num_views: int | None = None,
    ) -> FeatureExtractor:
        """Build from a training run folder: its config.yaml and its final weights.

        Args:
            run_dir: the run's ``OUTPUT_DIR`` (holds config.yaml and the checkpoints).
            device: as :meth:`from_config`.
            weights: the checkpoint to load (a path, or a file name inside ``run_dir``); None
                picks :func:`run_weights` (the final ``{MODEL.NAME}_{E}.pth``, else last.pth).
            overrides: ``[KEY, VALUE, ...]`` config overrides.
            num_views: as :meth:`from_config`.

        Returns:
            The extractor.

        Raises:
            FileNotFoundError: no config.yaml or no weights in the folder.
        """
        run = Path(run_dir)
        config = run / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(
                f"'{run}' is not a run folder: no config.yaml (written by train_clipreid.py)"
            )
        cfg = load_cfg(str(config), list(overrides))
        if weights is None:
            weights = run_weights(run, cfg)
        elif not Path(weights).exists() and (run / weights).is_file():
            weights = run / weights
        logger.info("feature extractor from %s with weights %s", run, weights)
        return cls.from_config(cfg, weights, device=device, num_views=num_views)

    # ------------------------------------------------------------------------------------------
    @property
    def feat_dim(self) -> int:
        """Width D of the features."""
        return self.model.feat_dim

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image as the model input (:func:`preprocess_image` with this transform).

        Args:
            image: see :func:`preprocess_image`.

        Returns:
            float32 [3, H, W] at the model's input size.
        """
        return preprocess_image(image, self.transform, self.input_size)

    def _ids(self, ids, n: int, name: str, count: int, used: bool) -> torch.Tensor | None:
        if ids is None:
            return None
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if ids.numel() == 1 and n != 1:
            ids = ids.expand(n)
        if ids.numel() != n:
            raise ValueError(f"{ids.numel()} {name} for {n} images; give one per image (or one)")
        if used and n and (int(ids.min()) < 0 or int(ids.max()) >= count):
            raise ValueError(
                f"{name} must be in 0..{count - 1} (the rows of the model's SIE table); got "
                f"{ids.min().item()}..{ids.max().item()}"
            )
        return ids

    @torch.no_grad()
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        camids: int | Sequence[int] | torch.Tensor | None = None,
        viewids: int | Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Features of one image or a batch.

        Args:
            images: one image (see :meth:`preprocess`), a list of them (types may be mixed), or
                a batch: a uint8 numpy array [N, H, W, 3] or a tensor [N, 3, H, W] (uint8 pixels
                or preprocessed floats).
            camids: camera ids (0-based, as in training): one per image, one for all, or None.
                Used by camera SIE models only; without them the SIE fallback applies.
            viewids: viewpoint ids, likewise (viewpoint SIE).

        Returns:
            float32 [N, D] on the extractor's device ([1, D] for a single image): L2-normalised
            rows with ``TEST.FEAT_NORM`` (compare with a dot product), otherwise the raw features
            (which the evaluator compares by squared Euclidean distance).
        """
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            items: Sequence[ImageInput] = list(images)
        elif isinstance(images, (list, tuple)):
            items = images
        else:
            items = [images]
        n = len(items)
        model = self.model
        sie = model.cv_embed is not None
        cams = self._ids(camids, n, "camids", model.num_cameras, sie and model.sie_camera)
        views = self._ids(viewids, n, "viewids", model.num_views, sie and model.sie_view)
        if n == 0:
            return torch.empty(0, self.feat_dim, device=self.device)
        if sie:
            self._note_fallback(cams, views)
        was_training = model.training
        model.eval()
        feats, start = [], 0
        for batch in self._batches(items):
            stop = start + len(batch)
            batch_cams = None if cams is None else cams[start:stop].to(self.device)
            batch_views = None if views is None else views[start:stop].to(self.device)
            batch = batch.to(
                self.device,
                non_blocking=True,
                memory_format=getattr(model, "input_memory_format", torch.contiguous_format),
            )
            feats.append(encode_batch(model, batch, batch_cams, batch_views, self.settings))
            start = stop
        model.train(was_training)
        return prepare_features(torch.cat(feats), self.settings.feat_norm, "features")

    def _batches(self, items: Sequence[ImageInput]) -> Iterator[torch.Tensor]:
        """Preprocessed batches [b, 3, H, W]: image files decoded by loader workers when many."""
        paths_only = all(isinstance(x, (str, os.PathLike)) for x in items)
        workers = min(self.num_workers, len(items) // _IMAGES_PER_WORKER) if paths_only else 0
        if workers > 0:
            yield from DataLoader(
                _Images(items, self.transform, self.input_size),
                batch_size=self.batch_size,
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
            )
            return
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            yield torch.stack([self.preprocess(x).to(self.device) for x in chunk])

    def _note_fallback(self, cams, views) -> None:
        if not self._warned_fallback:
            self._warned_fallback = warn_sie_fallback(
                self.model, cams, views, self.settings.sie_fallback
            )


def warn_sie_fallback(model: ReIDModel, camids: Any, viewids: Any, fallback: str) -> bool:
    """Warn when an SIE model is called without ids it uses (they get the SIE fallback).

    Args:
        model: the ReID model.
        camids: the call's camera ids, or None.
        viewids: the call's viewpoint ids, or None.
        fallback: ``TEST.SIE_FALLBACK``.

    Returns:
        Whether it warned.
    """
    missing = model.missing_sie_ids(camids, viewids)
    if missing:
        logger.warning(
            "SIE model called without %s: using the SIE fallback %r (TEST.SIE_FALLBACK); "
            "pass the ids for the trained features",
            " and ".join(missing),
            fallback,
        )
    return bool(missing)


def _with_overrides(cfg: CfgNode, overrides: Sequence[str]) -> CfgNode:
    """``cfg`` with ``KEY VALUE`` overrides, loaded and validated as a YAML file would be."""
    if not overrides:
        return cfg
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        write_text(path, cfg.dump())
        return load_cfg(path, list(overrides))


def build_feature_extractor(
    cfg: CfgNode, model: ReIDModel, device: str | torch.device | None = None
) -> FeatureExtractor:
    """The evaluation-feature extractor of a config around a built model.

    Args:
        cfg: the run's configuration (INPUT.* of the test transform, TEST.IMS_PER_BATCH,
            TEST.FEAT_NORM, TEST.FLIP_FEAT, TEST.SIE_FALLBACK, MODEL.AMP_DTYPE, MODEL.DEVICE,
            DATALOADER.NUM_WORKERS).
        model: the ReID model with its trained weights (e.g. from
            ``model.loading.build_model_from_checkpoint``).
        device: 'cpu', 'cuda', 'cuda:N', a ``torch.device``, or None for ``MODEL.DEVICE``.

    Returns:
        The :class:`FeatureExtractor` (the model moved to ``device``).
    """
    if device is None or isinstance(device, str):
        device = resolve_device(cfg.MODEL.DEVICE if device is None else device)
    return FeatureExtractor(
        model,
        build_transforms(cfg)[1],  # the evaluation loaders' own test transform
        build_eval_settings(cfg),
        device,
        batch_size=int(cfg.TEST.IMS_PER_BATCH),
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        input_size=cfg.INPUT.SIZE_TEST,
    )
