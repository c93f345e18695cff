"""Loading CLIP-ReID checkpoints (official and this project's) into a ``ReIDModel``.

Accepted inputs: a path or an already loaded object; a plain state dict (the official
``torch.save(model.state_dict())`` files, with or without DataParallel's 'module.' prefixes), or
a dict with a 'model' entry (this project's training checkpoints) or a 'state_dict' entry.

Every mismatch is checked before anything is copied, and the error says which config keys to set:
SIE tables without SIE flags (and the reverse), positional embeddings built for another grid
(with the MODEL.STRIDE_SIZE / INPUT.SIZE_TRAIN values that give the checkpoint's token count),
another number of identities (classifiers and prompt tokens are skipped for evaluation, an error
when resuming training), a text side missing from a baseline checkpoint (fine for the baseline
and for evaluation), or another architecture (MODEL.NAME).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from yacs.config import CfgNode

from model.build import build_model
from model.clip.arch import get_arch, list_archs
from model.clip.vision import resnet_grid, vit_grid
from model.reid_model import TEXT_PREFIXES, ReIDModel
from utils.checkpoint import CheckpointFormatError, read_checkpoint, strip_wrapper_prefixes

__all__ = [
    "CheckpointLoadReport",
    "CheckpointMismatchError",
    "build_model_from_checkpoint",
    "extract_state_dict",
    "load_reid_checkpoint",
]

logger = logging.getLogger(__name__)

_CLASS_KEYS = ("classifier.weight", "classifier_proj.weight")
# Sizes tried when suggesting an INPUT.SIZE_TRAIN that gives a checkpoint's token count.
_COMMON_SIZES = (
    (256, 128),
    (384, 128),
    (256, 256),
    (224, 224),
    (384, 192),
    (320, 160),
    (288, 144),
    (384, 384),
    (320, 320),
)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model built from the config; the message says what to set."""


@dataclass
class CheckpointLoadReport:
    """What ``load_reid_checkpoint`` did.

    Attributes:
        loaded: model keys copied from the checkpoint.
        skipped: checkpoint keys not copied (with the reason logged).
        missing: model keys the checkpoint lacks (left at their current values).
    """

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def extract_state_dict(checkpoint: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model state dict inside a checkpoint object, without wrapper prefixes.

    Args:
        checkpoint: a state dict, or a dict with a 'model' or 'state_dict' entry.
        source: the option or key that named the checkpoint, for the message.

    Returns:
        ``{key: tensor}`` with 'module.' / '_orig_mod.' prefixes removed.

    Raises:
        CheckpointFormatError: no state dict can be found.
    """
    obj = checkpoint
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointFormatError(
            f"{source} is not a ReID checkpoint: expected a state dict of tensors or a dict with "
            "a 'model' entry"
        )
    return strip_wrapper_prefixes(obj)


def _fmt(shape: torch.Size | tuple) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _guess_arch(sd: dict[str, Tensor]) -> str | None:
    """Registered architecture whose image-encoder widths match the checkpoint."""
    conv = sd.get("image_encoder.conv1.weight")
    proj = sd.get("bottleneck_proj.weight")
    if conv is None or proj is None:
        return None
    for name in list_archs():
        arch = get_arch(name)
        width = arch.vision_width if arch.kind == "vit" else arch.vision_width // 2
        resnet = "image_encoder.attnpool.positional_embedding" in sd
        if (
            (arch.kind == "resnet") == resnet
            and conv.shape[0] == width
            and proj.shape[0] == arch.embed_dim
        ):
            return name
    return None


def _vit_suggestions(model: ReIDModel, tokens: int) -> list[str]:
    enc = model.image_encoder
    patches, patch = tokens - 1, enc.patch_size
    out: list[str] = []
    size = list(enc.image_size)
    strides = [enc.stride[0], 16, 12, 14, 10, 8, *range(patch, 3, -1)]
    for s in dict.fromkeys(strides):
        g = vit_grid(enc.image_size, patch, (s, s))
        if g[0] * g[1] == patches:
            out.append(f"MODEL.STRIDE_SIZE [{s}, {s}] with INPUT.SIZE_TRAIN/SIZE_TEST {size}")
    for hw in _COMMON_SIZES:
        for s in dict.fromkeys([enc.stride[0], 16, 12]):
            g = vit_grid(hw, patch, (s, s))
            if g[0] * g[1] == patches and list(hw) != size:
                out.append(
                    f"INPUT.SIZE_TRAIN and INPUT.SIZE_TEST {list(hw)} with "
                    f"MODEL.STRIDE_SIZE [{s}, {s}]"
                )
    return out[:4]


def _pos_embed_error(model: ReIDModel, key: str, ckpt_shape: torch.Size) -> str:
    enc = model.image_encoder
    tokens, own = ckpt_shape[0], enc.num_tokens
    built = f"{enc.grid[0]}x{enc.grid[1]} grid from INPUT.SIZE_TRAIN {list(enc.image_size)}"
    if hasattr(enc, "patch_size"):
        built += f" and MODEL.STRIDE_SIZE {list(enc.stride)}"
        hints = _vit_suggestions(model, tokens)
    else:
        hints = [
            f"INPUT.SIZE_TRAIN and INPUT.SIZE_TEST {list(hw)}"
            for hw in _COMMON_SIZES
            if 1 + resnet_grid(hw)[0] * resnet_grid(hw)[1] == tokens
        ][:4]
    msg = (
        f"{key}: the checkpoint has {tokens} tokens ({tokens - 1} + 1), the model {own} ({built})."
    )
    if hints:
        msg += f" Settings that give {tokens} tokens: " + "; or ".join(hints) + "."
    else:
        msg += " Set INPUT.SIZE_TRAIN / INPUT.SIZE_TEST and MODEL.STRIDE_SIZE as trained."
    return msg


def _sie_hint(model: ReIDModel, rows: int) -> str:
    options = []
    if rows == model.num_cameras:
        options.append("MODEL.SIE_CAMERA True")
    if rows == model.num_views and model.num_views > 1:
        options.append("MODEL.SIE_VIEW True")
    if rows == model.num_cameras * model.num_views and model.num_views > 1:
        options.append("MODEL.SIE_CAMERA True and MODEL.SIE_VIEW True")
    which = " or ".join(options) if options else "MODEL.SIE_CAMERA True and/or MODEL.SIE_VIEW True"
    return (
        f"the checkpoint has an SIE table cv_embed with {rows} rows but the model was built "
        f"without SIE: set {which} (and MODEL.SIE_COE as trained; the official SIE+OLP "
        f"models use 1.0)"
    )


@dataclass
class _Plan:
    """What the checks found: errors, warnings, and checkpoint keys not to copy."""

    for_training: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skip: set[str] = field(default_factory=set)

    def mismatch(
        self, msg: str, *, training: str = "", evaluation: str, skip: Iterable[str] = ()
    ) -> None:
        """A difference that blocks resuming training but not evaluation, which skips ``skip``.

        Args:
            msg: what differs.
            training: appended to ``msg`` in the error when resuming training.
            evaluation: appended to ``msg`` in the warning when evaluating.
            skip: checkpoint keys that evaluation does without.
        """
        if self.for_training:
            self.errors.append(msg + training)
        else:
            self.warnings.append(msg + evaluation)
            self.skip.update(skip)


def _check_family(model: ReIDModel, sd: dict[str, Tensor], own: dict[str, Tensor]) -> None:
    """Architecture and head first: every other difference is noise when these differ."""
    ck_resnet = "image_encoder.attnpool.positional_embedding" in sd
    own_resnet = "image_encoder.attnpool.positional_embedding" in own
    conv = sd.get("image_encoder.conv1.weight")
    if ck_resnet != own_resnet or (
        conv is not None and conv.shape != own["image_encoder.conv1.weight"].shape
    ):
        guess = _guess_arch(sd)
        hint = f" set MODEL.NAME {guess!r}" if guess else " set MODEL.NAME as trained"
        raise CheckpointMismatchError(
            f"The checkpoint is another architecture than MODEL.NAME {model.arch.name!r}:{hint}"
        )
    # PCL-CLIP has one classifier on the concatenated feature, CLIP-ReID two.
    ck_pcl = "classifier.weight" in sd and "classifier_proj.weight" not in sd
    own_pcl = "classifier_proj.weight" not in own
    if "classifier.weight" in sd and ck_pcl != own_pcl:
        kind, method = ("PCL-CLIP", "'pcl'") if ck_pcl else ("CLIP-ReID", "'clipreid'")
        raise CheckpointMismatchError(
            f"The checkpoint has the {kind} head: set MODEL.METHOD {method} as trained"
        )


def _check_sie(
    plan: _Plan, model: ReIDModel, sd: dict[str, Tensor], own: dict[str, Tensor]
) -> None:
    if "cv_embed" in sd and "cv_embed" not in own:
        plan.errors.append(_sie_hint(model, sd["cv_embed"].shape[0]))
        plan.skip.add("cv_embed")
    elif "cv_embed" in own and "cv_embed" not in sd:
        plan.errors.append(
            "the model has an SIE table (cv_embed) but the checkpoint has none: set "
            "MODEL.SIE_CAMERA False and MODEL.SIE_VIEW False"
        )
    elif "cv_embed" in sd and sd["cv_embed"].shape != own["cv_embed"].shape:
        plan.errors.append(
            f"cv_embed: checkpoint {_fmt(sd['cv_embed'].shape)}, model "
            f"{_fmt(own['cv_embed'].shape)}: MODEL.SIE_CAMERA / MODEL.SIE_VIEW or the "
            f"dataset's camera/view counts differ from training"
        )
        plan.skip.add("cv_embed")


def _check_text_side(
    plan: _Plan, model: ReIDModel, sd: dict[str, Tensor], own: dict[str, Tensor]
) -> None:
    ck_text = [k for k in sd if k.startswith(TEXT_PREFIXES)]
    if not model.has_text:
        if ck_text:
            logger.info(
                "Ignoring %d text-side keys: the baseline model has no text side", len(ck_text)
            )
        plan.skip.update(ck_text)
    elif not ck_text:
        plan.mismatch(
            "the checkpoint has no prompt learner / text encoder (a baseline checkpoint?)",
            training=": set MODEL.METHOD 'baseline' to resume it",
            evaluation="; the text side keeps its current weights (evaluation does not use it)",
        )
    else:
        _check_prompt(plan, sd, own, [k for k in ck_text if k.startswith("prompt_learner.")])


def _check_prompt(
    plan: _Plan, sd: dict[str, Tensor], own: dict[str, Tensor], prompt_keys: list[str]
) -> None:
    """Prompt tokens: count (MODEL.PROMPT_N_CTX), template and class word (token ids)."""
    found = []
    ctx, own_ctx = sd.get("prompt_learner.cls_ctx"), own["prompt_learner.cls_ctx"]
    if ctx is not None and ctx.shape[1:] != own_ctx.shape[1:]:
        found.append(
            f"prompt_learner.cls_ctx: checkpoint {_fmt(ctx.shape)}, model "
            f"{_fmt(own_ctx.shape)}: set MODEL.PROMPT_N_CTX {ctx.shape[1]}"
        )
    for key in ("prompt_learner.token_prefix", "prompt_learner.token_suffix"):
        if key in sd and sd[key].shape != own[key].shape:
            found.append(
                f"{key}: checkpoint {_fmt(sd[key].shape)}, model {_fmt(own[key].shape)}: "
                f"the prompt differs; set MODEL.PROMPT_TEMPLATE / MODEL.PROMPT_CLASS / "
                f"MODEL.PROMPT_N_CTX as trained"
            )
    ids, own_ids = (
        sd.get("prompt_learner.tokenized_prompts"),
        own["prompt_learner.tokenized_prompts"],
    )
    if ids is not None and (
        ids.shape != own_ids.shape or not torch.equal(ids.cpu(), own_ids.cpu())
    ):
        found.append(
            "the checkpoint's prompt tokens differ from MODEL.PROMPT_TEMPLATE / "
            "MODEL.PROMPT_CLASS; set them as trained"
        )
    # Resuming reports every difference; evaluation skips the prompt learner at the first.
    for msg in found if plan.for_training else found[:1]:
        plan.mismatch(
            msg,
            evaluation="; prompt learner skipped (evaluation does not use it)",
            skip=prompt_keys,
        )


def _check_identities(plan: _Plan, sd: dict[str, Tensor], own: dict[str, Tensor]) -> None:
    """Classifiers and per-identity prompt tokens sized for another number of identities."""
    for key in (*_CLASS_KEYS, "prompt_learner.cls_ctx"):
        if key not in sd or key not in own or key in plan.skip:
            continue
        if sd[key].shape[0] != own[key].shape[0] and sd[key].shape[1:] == own[key].shape[1:]:
            plan.mismatch(
                f"{key}: the checkpoint was trained with {sd[key].shape[0]} identities, the "
                f"model has {own[key].shape[0]}",
                training="; resuming training needs the same training identities",
                evaluation="; skipped (evaluation does not use it)",
                skip=[key],
            )


def _check_token_grid(
    plan: _Plan, model: ReIDModel, sd: dict[str, Tensor], own: dict[str, Tensor]
) -> None:
    for key in (
        "image_encoder.positional_embedding",
        "image_encoder.attnpool.positional_embedding",
    ):
        if key in sd and key in own and sd[key].shape != own[key].shape:
            plan.errors.append(_pos_embed_error(model, key, sd[key].shape))
            plan.skip.add(key)


def _check_remaining(
    plan: _Plan, model: ReIDModel, sd: dict[str, Tensor], own: dict[str, Tensor]
) -> None:
    """Every key not handled above must be present on both sides with the same shape."""
    skip = plan.skip
    optional_missing = {"prompt_learner.tokenized_prompts"}
    if model.has_text and not any(k.startswith(TEXT_PREFIXES) for k in sd):
        if not plan.for_training:
            optional_missing.update(k for k in own if k.startswith(TEXT_PREFIXES))
    unexpected = [k for k in sd if k not in own and k not in skip]
    missing = [k for k in own if k not in sd and k not in optional_missing and k not in skip]
    shapes = [k for k in sd if k in own and k not in skip and sd[k].shape != own[k].shape]
    if unexpected:
        plan.errors.append(f"unexpected keys in the checkpoint: {', '.join(unexpected[:8])}")
    if missing:
        plan.errors.append(f"keys missing from the checkpoint: {', '.join(missing[:8])}")
    if shapes:
        plan.errors.append(
            "shape mismatches (is MODEL.NAME as trained?): "
            + "; ".join(f"{k} {_fmt(sd[k].shape)} vs {_fmt(own[k].shape)}" for k in shapes[:5])
        )


def load_reid_checkpoint(
    model: ReIDModel,
    checkpoint: str | Path | Mapping,
    *,
    for_training: bool = False,
    source: str = "TEST.WEIGHT",
) -> CheckpointLoadReport:
    """Load CLIP-ReID weights into a model built from the config.

    Every difference is checked before anything is copied (see the module docstring).

    Args:
        model: the target ``ReIDModel``.
        checkpoint: a file path, or a loaded object (state dict, or dict with a 'model' entry).
        for_training: resuming training: classifiers and prompt tokens must match (same
            identities) and the text side must be present for the CLIP-ReID method.
        source: the option or key that named the file, for the messages.

    Returns:
        A ``CheckpointLoadReport``.

    Raises:
        CheckpointMismatchError: the checkpoint does not fit; the message names the config keys.
        FileNotFoundError: the path does not exist.
        utils.checkpoint.CheckpointFormatError: the file is not a loadable checkpoint.
    """
    obj = read_checkpoint(checkpoint, source) if isinstance(checkpoint, (str, Path)) else checkpoint
    sd = extract_state_dict(obj, source)
    own = model.state_dict()
    _check_family(model, sd, own)
    plan = _Plan(for_training)
    _check_sie(plan, model, sd, own)
    _check_text_side(plan, model, sd, own)
    _check_identities(plan, sd, own)
    _check_token_grid(plan, model, sd, own)
    _check_remaining(plan, model, sd, own)
    if plan.errors:
        raise CheckpointMismatchError(
            "The checkpoint does not fit the model built from the config:\n- "
            + "\n- ".join(plan.errors)
        )
    for msg in plan.warnings:
        logger.warning(msg)
    to_load = {k: v for k, v in sd.items() if k in own and k not in plan.skip}
    model.load_state_dict(to_load, strict=False)
    report = CheckpointLoadReport(
        loaded=sorted(to_load),
        skipped=sorted(k for k in sd if k not in to_load),
        missing=sorted(k for k in own if k not in to_load),
    )
    logger.info(
        "Loaded %d checkpoint tensors (%d skipped, %d model keys not in the checkpoint)",
        len(report.loaded),
        len(report.skipped),
        len(report.missing),
    )
    return report


def _model_counts(
    cfg: CfgNode, sd: Mapping[str, Tensor], num_views: int | None
) -> tuple[int, int, int]:
    """(identities, cameras, views) for ``build_model``, read from the checkpoint's shapes."""
    classifier = sd.get("classifier.weight")
    num_classes = int(classifier.shape[0]) if classifier is not None else 1
    table = sd.get("cv_embed")
    rows = int(table.shape[0]) if table is not None else 0
    cam, view = bool(cfg.MODEL.SIE_CAMERA), bool(cfg.MODEL.SIE_VIEW)
    if not rows:
        # No table: any positive count; the checkpoint loader reports an SIE mismatch by name.
        return num_classes, 1, 1
    if cam and view:
        if not num_views:
            raise CheckpointMismatchError(
                f"camera x view SIE: the checkpoint's table has {rows} = cameras x views rows; "
                "pass --num-views with the training dataset's number of views"
            )
        if rows % num_views:
            raise CheckpointMismatchError(
                f"--num-views {num_views} does not divide the {rows} rows of the SIE table"
            )
        return num_classes, rows // num_views, num_views
    if view:
        return num_classes, 1, rows
    # Camera SIE, or no SIE flags (then the loader's hint suggests MODEL.SIE_CAMERA).
    return num_classes, rows, num_views or 1


def build_model_from_checkpoint(
    cfg: CfgNode,
    weights: str | Path | Mapping,
    *,
    num_views: int | None = None,
    source: str = "--weights",
) -> ReIDModel:
    """Build the model a config describes and load trained weights, without any dataset.

    The numbers of identities, cameras and views are read from the checkpoint's classifier and
    SIE table (camera x view SIE needs ``num_views`` to split the table's rows).

    Args:
        cfg: the run's configuration (MODEL.*, INPUT.*, TEST.NECK_FEAT).
        weights: checkpoint path or loaded checkpoint (state dict or dict with 'model').
        num_views: training views, for camera x view SIE only.
        source: the option that named ``weights``, for the messages.

    Returns:
        The ``ReIDModel`` on the CPU in eval mode.

    Raises:
        FileNotFoundError: the weights file does not exist.
        utils.checkpoint.CheckpointFormatError: the file is not a loadable checkpoint.
        CheckpointMismatchError: the checkpoint does not fit the config (names the keys to set),
            or camera x view SIE without a usable ``num_views``.
    """
    obj = read_checkpoint(weights, source) if isinstance(weights, (str, Path)) else weights
    sd = extract_state_dict(obj, source)
    num_classes, num_cameras, views = _model_counts(cfg, sd, num_views)
    model = build_model(cfg, num_classes, num_cameras, views, load_pretrained=False)
    load_reid_checkpoint(model, obj, for_training=False, source=source)
    return model.eval()
