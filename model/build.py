"""``build_model``: the one place that turns config keys into a ``ReIDModel``."""

from __future__ import annotations

import logging

from yacs.config import CfgNode

from model.clip.arch import create_clip, get_arch
from model.clip.vision import resnet_grid, vit_grid
from model.prompt_learner import format_prompt_template
from model.reid_model import ReIDModel
from model.weights import create_pretrained_clip, uses_quick_gelu
from processor.recipes import get_recipe

__all__ = ["build_model", "check_model_cfg"]

logger = logging.getLogger(__name__)


def _sizes(cfg: CfgNode) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(INPUT.SIZE_TRAIN, INPUT.SIZE_TEST, MODEL.STRIDE_SIZE) as int pairs."""
    pair = lambda v: (int(v[0]), int(v[1]))  # noqa: E731
    return pair(cfg.INPUT.SIZE_TRAIN), pair(cfg.INPUT.SIZE_TEST), pair(cfg.MODEL.STRIDE_SIZE)


def check_model_cfg(cfg: CfgNode) -> None:
    """The model's cross-key rules, checked once when the config is validated.

    The token grid of INPUT.SIZE_TEST must equal INPUT.SIZE_TRAIN's (the positional embedding
    fits one grid), and the prompt template must format with MODEL.PROMPT_N_CTX tokens.

    Args:
        cfg: a merged configuration (MODEL.NAME must be a registered architecture).

    Raises:
        ValueError: naming the keys and the value to set.
    """
    m = cfg.MODEL
    arch = get_arch(m.NAME)
    size_train, size_test, stride = _sizes(cfg)
    if arch.kind == "vit":
        grid_train = vit_grid(size_train, arch.vision_patch_size, stride)
        grid_test = vit_grid(size_test, arch.vision_patch_size, stride)
    else:
        grid_train, grid_test = resnet_grid(size_train), resnet_grid(size_test)
    if grid_train != grid_test:
        raise ValueError(
            f"INPUT.SIZE_TEST {list(size_test)} gives a {grid_test[0]}x{grid_test[1]} grid but "
            f"INPUT.SIZE_TRAIN {list(size_train)} gives {grid_train[0]}x{grid_train[1]} with "
            f"MODEL.STRIDE_SIZE {list(stride)}; the positional embedding fits one grid only, so "
            f"set INPUT.SIZE_TEST to {list(size_train)}"
        )
    format_prompt_template(m.PROMPT_TEMPLATE, int(m.PROMPT_N_CTX), m.PROMPT_CLASS or "person")


def build_model(
    cfg: CfgNode,
    num_classes: int,
    num_cameras: int,
    num_views: int,
    *,
    load_pretrained: bool = True,
) -> ReIDModel:
    """Build the ReID model described by a config, with its pretrained CLIP weights.

    Reads MODEL.NAME, MODEL.METHOD, MODEL.STRIDE_SIZE, MODEL.SIE_CAMERA, MODEL.SIE_VIEW,
    MODEL.SIE_COE, MODEL.SIE_MODE, MODEL.PRETRAIN_PATH, MODEL.PRETRAIN_TAG,
    MODEL.PROMPT_TEMPLATE, MODEL.PROMPT_CLASS, MODEL.PROMPT_N_CTX, MODEL.FREEZE_PATCH_EMBED,
    MODEL.GRAD_CHECKPOINTING, MODEL.CHANNELS_LAST, INPUT.SIZE_TRAIN, INPUT.SIZE_TEST and
    TEST.NECK_FEAT. ``MODEL.METHOD 'pcl'`` builds the PCL-CLIP head (``head='pcl'``: one
    classifier on the 1280-d post-BN feature of ViT-B-16). The method's recipe
    (:mod:`processor.recipes`) says whether the model has the text side and which head it has.

    The speed keys change no value and no parameter name: activation checkpointing of the image
    encoder and channels-last image-encoder weights (feed images in
    ``model.input_memory_format``). MODEL.COMPILE is not applied here: the training entry calls
    ``model.compile_image_encoder()``, so tools that trace the model (ONNX export) get the eager
    model from the same config.

    Args:
        cfg: the (validated) config.
        num_classes: number C of training identities.
        num_cameras: number of training cameras (SIE table rows).
        num_views: number of training viewpoints (SIE table rows).
        load_pretrained: False skips the CLIP weights (random towers with the activation of
            MODEL.PRETRAIN_TAG), e.g. when a full ReID checkpoint is loaded right after.

    Returns:
        A ``ReIDModel`` on the CPU in training mode, all parameters trainable except the BNNeck
        biases (call ``set_trainable`` for a stage).

    Raises:
        ValueError: an invalid value (:func:`check_model_cfg`), or an unregistered MODEL.NAME or
            MODEL.METHOD (``UnknownNameError``); the message names the key.
    """
    check_model_cfg(cfg)  # also for configs built by hand, without ``load_cfg``
    m = cfg.MODEL
    arch = get_arch(m.NAME)
    recipe = get_recipe(m.METHOD)
    size_train, _, stride = _sizes(cfg)

    with_text = recipe.with_text
    class_word = m.PROMPT_CLASS
    if with_text and not class_word:
        logger.warning("MODEL.PROMPT_CLASS is empty; using 'person'")
        class_word = "person"
    template = format_prompt_template(m.PROMPT_TEMPLATE, int(m.PROMPT_N_CTX), class_word)

    if load_pretrained:
        clip_model = create_pretrained_clip(arch, m.PRETRAIN_TAG, m.PRETRAIN_PATH)
    else:
        clip_model = create_clip(arch, quick_gelu=uses_quick_gelu(arch, m.PRETRAIN_TAG or "none"))
    model = ReIDModel(
        clip_model,
        arch,
        num_classes,
        size_train,
        stride=stride,
        num_cameras=num_cameras,
        num_views=num_views,
        sie_camera=bool(m.SIE_CAMERA),
        sie_view=bool(m.SIE_VIEW),
        sie_coe=float(m.SIE_COE),
        sie_mode=m.SIE_MODE,
        neck_feat=cfg.TEST.NECK_FEAT,
        with_text=with_text,
        prompt_template=template,
        n_ctx=int(m.PROMPT_N_CTX),
        head=recipe.head,
        freeze_patch_embed=bool(m.FREEZE_PATCH_EMBED),
    )
    _apply_speed_options(model, bool(m.CHANNELS_LAST), bool(m.GRAD_CHECKPOINTING))
    _log_built(model, m.METHOD, size_train)
    return model


def _apply_speed_options(model: ReIDModel, channels_last: bool, grad_checkpointing: bool) -> None:
    """MODEL.CHANNELS_LAST and MODEL.GRAD_CHECKPOINTING (no value or parameter name changes)."""
    if channels_last:
        model.use_channels_last()
        logger.info("Image encoder weights channels-last: feed images in model.input_memory_format")
    if grad_checkpointing:
        model.image_encoder.set_grad_checkpointing(True)
        logger.info("Image encoder activation checkpointing on")


def _log_built(model: ReIDModel, method: str, size: tuple[int, int]) -> None:
    """One log line describing the built model."""
    enc = model.image_encoder
    logger.info(
        "Built %s (%s, %s head): %dx%d grid (%d tokens) for %dx%d input, eval feature %d-d, "
        "%d identities%s%s",
        model.arch.name,
        method,
        model.head,
        enc.grid[0],
        enc.grid[1],
        enc.num_tokens,
        size[0],
        size[1],
        model.feat_dim,
        model.num_classes,
        f", SIE {tuple(model.cv_embed.shape)} x {model.sie_coe}"
        if model.cv_embed is not None
        else "",
        ", patch embedding frozen" if model.freeze_patch_embed else "",
    )
