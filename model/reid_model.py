"""The ReID model: one class for CLIP-ReID (two-stage and one-stage), the baseline and PCL-CLIP.

Layout (state-dict names follow the official CLIP-ReID checkpoints, so they load directly):

* ``image_encoder``: the CLIP vision tower with the ReID changes (OpenAI ``visual.*`` names);
* ``cv_embed``: SIE table [N, D_v] (only when SIE is enabled);
* ``bottleneck`` / ``bottleneck_proj``: BNNecks on ``f`` and ``f_proj`` (weight 1, bias 0, bias
  frozen);
* ``classifier`` / ``classifier_proj``: bias-free identity classifiers (init N(0, 0.001^2));
  the PCL-CLIP head (``head='pcl'``) has one ``classifier`` on the concatenated post-BN feature
  [D + E] and no ``classifier_proj``;
* ``prompt_learner`` (``cls_ctx``, ``token_prefix``, ``token_suffix``) and ``text_encoder``
  (CLIP text tower): only in the CLIP-ReID model, ``None`` in the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.clip.arch import CLIPArch, FeatureDims
from model.clip.text import TextEncoder
from model.clip.vision import ResNetReIDEncoder, VisionFeatures, ViTReIDEncoder
from model.prompt_learner import PromptLearner

__all__ = [
    "HEADS",
    "NECK_FEATS",
    "SIE_FALLBACKS",
    "TRAINABLE_PARTS",
    "PATCH_EMBED_PREFIX",
    "ReIDModel",
    "ReIDTrainOutput",
    "TEXT_PREFIXES",
]

NECK_FEATS = ("before", "after")
# 'clipreid': a classifier per BNNeck (CLIP-ReID, baseline); 'pcl': one classifier on the
# concatenated BNNeck outputs (PCL-CLIP, Li & Gong 2023).
HEADS = ("clipreid", "pcl")
# What ``ReIDModel.set_trainable`` can select: stage 1, stage 2, one-stage training.
TRAINABLE_PARTS = ("prompts", "image", "image+prompts")
# State-dict prefix of the ViT patch embedding (frozen by ``freeze_patch_embed``).
PATCH_EMBED_PREFIX = "image_encoder.conv1."
# State-dict prefixes of the text side (absent from the baseline model).
TEXT_PREFIXES = ("prompt_learner.", "text_encoder.")
# What an SIE model adds for an image whose camera / viewpoint id is not given: 'none' adds
# nothing (the official behaviour when ids are not passed); 'mean' adds the mean of the SIE rows
# the missing id could select (the expected SIE vector under a uniform prior on the ids).
SIE_FALLBACKS = ("none", "mean")


class ReIDTrainOutput(NamedTuple):
    """Training-mode output of ``ReIDModel.forward``.

    Attributes:
        cls_scores: [classifier(BN(f)), classifier_proj(BN(f_proj))], each [B, C]; with the PCL
            head one entry, [classifier(cat(BN(f), BN(f_proj)))] [B, C].
        feats: [f_last, f, f_proj] before the BNNecks ([B, D_last], [B, D], [B, E]); the triplet
            loss is applied to each.
        proj: f_proj [B, E], for the image-to-text loss against the text features.
        embedding: PCL head only: cat(BN(f), BN(f_proj)) [B, D + E] (train-mode BN), the input
            of the PCL loss; ``None`` with the CLIP-ReID head.
    """

    cls_scores: list[Tensor]
    feats: list[Tensor]
    proj: Tensor
    embedding: Tensor | None = None


def _bnneck(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)  # BNNeck: a frozen zero shift keeps the features centred
    return bn


def _classifier(dim: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(fc.weight, std=0.001)
    return fc


def _build_image_encoder(
    arch: CLIPArch,
    visual: nn.Module,
    image_size: tuple[int, int],
    stride: tuple[int, int],
    sie_mode: str,
) -> nn.Module:
    if arch.kind == "vit":
        return ViTReIDEncoder(visual, image_size, stride, sie_mode=sie_mode)
    if stride != (16, 16):
        raise ValueError(
            f"MODEL.STRIDE_SIZE {list(stride)} applies to ViT patch embeddings only; "
            f"{arch.name} has a fixed total stride of 16. Set MODEL.STRIDE_SIZE [16, 16]."
        )
    return ResNetReIDEncoder(visual, image_size, last_stride=1, sie_mode=sie_mode)


class ReIDModel(nn.Module):
    """ReID model (image encoder, BNNecks, classifiers, optional SIE and text side).

    The constructor adopts the towers of an ``open_clip.CLIP`` whose weights are already loaded
    (``model.build.build_model`` loads them), resizes the positional embeddings to the ReID grid
    and embeds the prompt template with the CLIP token embedding; the token embedding and
    ``logit_scale`` are not kept (as in the official model).

    Args:
        clip_model: ``open_clip.CLIP`` of architecture ``arch``, pretrained or random.
        arch: architecture spec (picks the ViT or ResNet image encoder).
        num_classes: number C of training identities.
        image_size: input (H, W) that fixes the token grid (``INPUT.SIZE_TRAIN``).
        stride: ViT patch-embedding stride (``MODEL.STRIDE_SIZE``); must be (16, 16) for ResNets.
        num_cameras: number of cameras (rows of the camera SIE table).
        num_views: number of viewpoints (rows of the view SIE table).
        sie_camera: enable the camera SIE (``MODEL.SIE_CAMERA``).
        sie_view: enable the viewpoint SIE (``MODEL.SIE_VIEW``).
        sie_coe: SIE scale (``MODEL.SIE_COE``).
        sie_mode: ``'cls'`` (CLS / pool-query token only) or ``'all'`` tokens.
        neck_feat: eval feature before (``'before'``) or after (``'after'``) the BNNecks; the
            PCL head needs ``'after'``.
        with_text: build the prompt learner and text encoder (False: baseline and PCL-CLIP).
        prompt_template: prompt text with ``n_ctx`` consecutive 'X' placeholders.
        n_ctx: number M of learnable tokens per identity.
        head: ``'clipreid'`` (one classifier per BNNeck) or ``'pcl'`` (PCL-CLIP: one classifier
            on the concatenated post-BN feature [D + E], which is also the eval feature).
        freeze_patch_embed: keep the ViT patch embedding (``conv1``) frozen in every stage
            (``MODEL.FREEZE_PATCH_EMBED``; ViT only).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        arch: CLIPArch,
        num_classes: int,
        image_size: Sequence[int],
        *,
        stride: Sequence[int] = (16, 16),
        num_cameras: int = 0,
        num_views: int = 0,
        sie_camera: bool = False,
        sie_view: bool = False,
        sie_coe: float = 3.0,
        sie_mode: str = "cls",
        neck_feat: str = "before",
        with_text: bool = True,
        prompt_template: str = "A photo of a X X X X person.",
        n_ctx: int = 4,
        head: str = "clipreid",
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if neck_feat not in NECK_FEATS:
            raise ValueError(f"TEST.NECK_FEAT must be one of {NECK_FEATS}, got {neck_feat!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "pcl" and neck_feat != "after":
            raise ValueError(
                "the PCL head evaluates the post-BN feature (its memory bank is built from it): "
                "set TEST.NECK_FEAT 'after'"
            )
        if freeze_patch_embed and arch.kind != "vit":
            raise ValueError(
                f"MODEL.FREEZE_PATCH_EMBED freezes a ViT patch embedding; {arch.name} has none. "
                "Set it False."
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        self.neck_feat = neck_feat
        self.head = head
        self.freeze_patch_embed = bool(freeze_patch_embed)
        size = (int(image_size[0]), int(image_size[1]))
        stride_pair = (int(stride[0]), int(stride[1]))
        self.image_encoder = _build_image_encoder(
            arch, clip_model.visual, size, stride_pair, sie_mode
        )
        dims = self.image_encoder.dims

        # SIE table layout and index follow the official code (camera x view: cam * V + view).
        self.sie_camera, self.sie_view = bool(sie_camera), bool(sie_view)
        self.num_cameras, self.num_views = int(num_cameras), int(num_views)
        self.sie_coe = float(sie_coe)
        self.cv_embed = _sie_table(
            self.sie_camera, self.sie_view, self.num_cameras, self.num_views, self.image_encoder
        )

        device = _module_device(self.image_encoder)
        self.bottleneck = _bnneck(dims.final).to(device)
        self.bottleneck_proj = _bnneck(dims.proj).to(device)
        if head == "pcl":
            self.classifier = _classifier(dims.final + dims.proj, num_classes).to(device)
            self.classifier_proj = None
        else:
            self.classifier = _classifier(dims.final, num_classes).to(device)
            self.classifier_proj = _classifier(dims.proj, num_classes).to(device)
        if self.freeze_patch_embed:
            self.image_encoder.conv1.requires_grad_(False)

        if with_text:
            self.prompt_learner = PromptLearner(
                num_classes,
                prompt_template,
                n_ctx,
                clip_model.token_embedding,
                context_length=arch.text_context_length,
            )
            self.text_encoder = TextEncoder.from_open_clip(clip_model)
        else:
            self.prompt_learner = None
            self.text_encoder = None

    # ------------------------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        """Whether the prompt learner and text encoder exist (False for the baseline)."""
        return self.text_encoder is not None

    @property
    def feature_dims(self) -> FeatureDims:
        """Widths of (f_last, f, f_proj)."""
        return self.image_encoder.dims

    @property
    def feat_dim(self) -> int:
        """Width of the evaluation feature (1280 for ViT-B-16, 3072 for RN50)."""
        dims = self.image_encoder.dims
        return dims.final + dims.proj

    def sie_vectors(
        self,
        camids: Tensor | None = None,
        viewids: Tensor | None = None,
        fallback: str = "none",
    ) -> Tensor | None:
        """Scaled SIE vectors for a batch; what a missing id gets is set by ``fallback``.

        With both ids of the model's SIE given (or the one it uses), the vector of the table row
        they index (camera x view: ``cam * V + view``, as the official code). For a missing id:

        * ``fallback='none'``: no SIE vector (``None``), as the official code without ids;
          camera x view SIE with only one of the two ids is an error.
        * ``fallback='mean'``: the mean of the rows the missing id could select: all rows
          (camera or view SIE, or neither id of camera x view SIE), or the rows of the given
          camera (view) averaged over the views (cameras).

        Args:
            camids: camera ids, int64 [B] (0-based), or ``None``.
            viewids: viewpoint ids, int64 [B] (0-based), or ``None``.
            fallback: one of :data:`SIE_FALLBACKS`.

        Returns:
            ``SIE_COE * row`` [B, D_v]; [1, D_v] (one vector for the whole batch) when the fallback
            replaces every id; ``None`` without SIE or with the 'none' fallback for missing ids.

        Raises:
            ValueError: an unknown ``fallback``, or camera x view SIE with only one id tensor and
                the 'none' fallback.
        """
        if fallback not in SIE_FALLBACKS:
            raise ValueError(f"SIE fallback must be one of {SIE_FALLBACKS}, got {fallback!r}")
        if self.cv_embed is None:
            return None
        table = self.cv_embed
        if self.sie_camera and self.sie_view:
            grid = table.view(self.num_cameras, self.num_views, -1)  # [C, V, D_v]
            if camids is not None and viewids is not None:
                rows = table[(camids * self.num_views + viewids).to(table.device)]
            elif fallback == "none":
                if camids is None and viewids is None:
                    return None
                raise ValueError("Camera x view SIE needs both camids and viewids")
            elif camids is not None:
                rows = grid.mean(1)[camids.to(table.device)]
            elif viewids is not None:
                rows = grid.mean(0)[viewids.to(table.device)]
            else:
                rows = table.mean(0, keepdim=True)
        else:
            ids = camids if self.sie_camera else viewids
            if ids is not None:
                rows = table[ids.to(table.device)]
            elif fallback == "none":
                return None
            else:
                rows = table.mean(0, keepdim=True)
        return self.sie_coe * rows

    def missing_sie_ids(
        self, camids: Tensor | int | None, viewids: Tensor | int | None
    ) -> list[str]:
        """The ids this model's SIE uses that a call leaves out (they get the SIE fallback).

        Args:
            camids: the call's camera ids, or None.
            viewids: the call's viewpoint ids, or None.

        Returns:
            A sub-list of ``['camids', 'viewids']``.
        """
        return [
            name
            for name, used, ids in (
                ("camids", self.sie_camera, camids),
                ("viewids", self.sie_view, viewids),
            )
            if used and ids is None
        ]

    def mean_sie_vector(self) -> Tensor | None:
        """The SIE vector of an image without any id under the 'mean' fallback.

        Returns:
            ``SIE_COE * mean(cv_embed rows)`` [D_v], or ``None`` without SIE.
        """
        sie = self.sie_vectors(fallback="mean")
        return None if sie is None else sie[0]

    def image_features(
        self,
        images: Tensor,
        camids: Tensor | None = None,
        viewids: Tensor | None = None,
        *,
        sie_fallback: str = "none",
    ) -> VisionFeatures:
        """The three pre-BN image features.

        Args:
            images: [B, 3, H, W].
            camids: optional camera ids [B] (used when the camera SIE is enabled).
            viewids: optional view ids [B] (used when the view SIE is enabled).
            sie_fallback: the SIE vector of missing ids (see :meth:`sie_vectors`).

        Returns:
            ``VisionFeatures(last, final, proj)``.
        """
        sie = self.sie_vectors(camids, viewids, sie_fallback)
        if sie is not None and sie.shape[0] != images.shape[0]:
            sie = sie.expand(images.shape[0], -1)  # one fallback vector for the whole batch
        return self.image_encoder(images, sie)

    def _neck(self, feats: VisionFeatures) -> Tensor:
        """cat(BN(f), BN(f_proj)) [B, D + E] (train- or eval-mode BN, as the module is)."""
        return torch.cat([self.bottleneck(feats.final), self.bottleneck_proj(feats.proj)], dim=1)

    def _eval_feature(self, feats: VisionFeatures) -> Tensor:
        if self.neck_feat == "after":
            return self._neck(feats)
        return torch.cat([feats.final, feats.proj], dim=1)

    def encode_image(
        self,
        images: Tensor,
        camids: Tensor | None = None,
        viewids: Tensor | None = None,
        *,
        sie_fallback: str = "none",
    ) -> Tensor:
        """Evaluation feature: cat(f, f_proj) (``neck_feat='before'``) or their BNNeck outputs.

        The PCL head always uses the BNNeck outputs (its memory bank holds this feature).

        Call in eval mode (BNNecks use running statistics); the evaluator normalises the whole
        vector.

        Args:
            images: [B, 3, H, W].
            camids: optional camera ids [B] (SIE).
            viewids: optional view ids [B] (SIE).
            sie_fallback: the SIE vector of missing ids, 'none' or 'mean' (see
                :meth:`sie_vectors`).

        Returns:
            [B, D + E] (1280 for ViT-B-16, 3072 for RN50).
        """
        feats = self.image_features(images, camids, viewids, sie_fallback=sie_fallback)
        return self._eval_feature(feats)

    def encode_image_proj(self, images: Tensor) -> Tensor:
        """Projected CLIP feature f_proj without SIE or BNNeck (stage-1 feature caching).

        Args:
            images: [B, 3, H, W].

        Returns:
            [B, E].
        """
        return self.image_encoder(images).proj

    def encode_text(self, pids: Tensor) -> Tensor:
        """Text features of identities from their learnable prompts.

        The text transformer runs over the prompt's positions up to its end-of-text token only
        (12 of 77 for 'A photo of a X X X X person.'), which gives the full-context features.

        Args:
            pids: identity labels, int64 [n].

        Returns:
            [n, E] unnormalised text features (comparable with f_proj).

        Raises:
            RuntimeError: the model is the baseline (no text side).
        """
        if self.prompt_learner is None or self.text_encoder is None:
            raise RuntimeError(
                "This model has no prompt learner or text encoder (MODEL.METHOD 'baseline'); "
                "build it with MODEL.METHOD 'clipreid' to encode text"
            )
        # Only the positions up to EOT: the causal mask makes the rest irrelevant to its feature.
        prompts = self.prompt_learner(pids, length=self.prompt_learner.prompt_length)
        return self.text_encoder(prompts, self.prompt_learner.prompt_length - 1)

    # ------------------------------------------------------------------------------------------
    # Speed options of the image encoder (MODEL.CHANNELS_LAST, MODEL.COMPILE); none of them
    # changes a parameter name, so checkpoints keep the official layout.
    _input_memory_format: torch.memory_format = torch.contiguous_format

    @property
    def input_memory_format(self) -> torch.memory_format:
        """Memory format the image batch should be given in (``images.to(memory_format=...)``).

        ``torch.channels_last`` after :meth:`use_channels_last`, else ``torch.contiguous_format``.
        """
        return self._input_memory_format

    def use_channels_last(self) -> None:
        """Store the image encoder's 4-d weights channels-last (NHWC).

        cuDNN runs NHWC convolutions on tensor cores without layout transposes, which helps the
        convolution-heavy RN50 under fp16/bf16; the values are unchanged. Feed the images in
        :attr:`input_memory_format` to avoid a conversion at the first convolution.
        """
        self.image_encoder.to(memory_format=torch.channels_last)
        self._input_memory_format = torch.channels_last

    def compile_image_encoder(self, **compile_kwargs: object) -> None:
        """``torch.compile`` the image encoder's forward, in place.

        ``nn.Module.compile`` keeps the module (and so every state-dict key: no ``_orig_mod.``
        prefix); the compilation happens lazily, at the first forward on its device. The
        training entry calls this for ``MODEL.COMPILE``; a compiled model cannot be traced
        (``torch.jit.trace``, the ONNX exporter), so ``build_model`` leaves the model eager.

        Args:
            **compile_kwargs: passed to ``torch.compile`` (e.g. ``backend``, ``mode``).
        """
        self.image_encoder.compile(**compile_kwargs)

    def forward(
        self, images: Tensor, camids: Tensor | None = None, viewids: Tensor | None = None
    ) -> ReIDTrainOutput | Tensor:
        """Training: logits and features for the losses; evaluation: the eval feature.

        Args:
            images: [B, 3, H, W].
            camids: optional camera ids [B] (SIE).
            viewids: optional view ids [B] (SIE).

        Returns:
            In training mode a ``ReIDTrainOutput``; in eval mode the eval feature [B, D + E].
        """
        feats = self.image_features(images, camids, viewids)
        if not self.training:
            return self._eval_feature(feats)
        pre_bn = [feats.last, feats.final, feats.proj]
        if self.head == "pcl":
            embedding = self._neck(feats)
            return ReIDTrainOutput([self.classifier(embedding)], pre_bn, feats.proj, embedding)
        scores = [
            self.classifier(self.bottleneck(feats.final)),
            self.classifier_proj(self.bottleneck_proj(feats.proj)),
        ]
        return ReIDTrainOutput(scores, pre_bn, feats.proj)

    # ------------------------------------------------------------------------------------------
    def set_trainable(self, part: str) -> list[str]:
        """Set ``requires_grad`` for what a training stage trains.

        * ``'prompts'`` (CLIP-ReID stage 1): only the prompt tokens ``prompt_learner.cls_ctx``
          (text encoder and image side frozen, so no gradient is accumulated in the text tower).
        * ``'image'`` (stage 2, baseline, PCL-CLIP): everything except the prompt learner and the
          text encoder; the BNNeck biases stay frozen.
        * ``'image+prompts'`` (one-stage training, paper Tab. 5): ``'image'`` plus the prompt
          tokens.

        With ``freeze_patch_embed`` the ViT patch embedding stays frozen in ``'image'`` and
        ``'image+prompts'``.

        Args:
            part: one of :data:`TRAINABLE_PARTS`.

        Returns:
            Names of the trainable parameters.

        Raises:
            ValueError: unknown part, or a part with prompts on a model without the text side.
        """
        if part not in TRAINABLE_PARTS:
            raise ValueError(f"part must be one of {TRAINABLE_PARTS}, got {part!r}")
        with_prompts = part != "image"
        if with_prompts and not self.has_text:
            raise ValueError(f"{part!r} needs the text side; this model has none")
        frozen_bias = {"bottleneck.bias", "bottleneck_proj.bias"}
        names = []
        for name, param in self.named_parameters():
            train = with_prompts and name == "prompt_learner.cls_ctx"
            if part != "prompts":
                image = not name.startswith(TEXT_PREFIXES) and name not in frozen_bias
                image = image and not (
                    self.freeze_patch_embed and name.startswith(PATCH_EMBED_PREFIX)
                )
                train = train or image
            param.requires_grad_(train)
            if train:
                names.append(name)
        return names


def _sie_table(
    camera: bool, view: bool, num_cameras: int, num_views: int, encoder: nn.Module
) -> nn.Parameter | None:
    """The SIE table [rows, width] (camera x view, camera or view rows), or None without SIE.

    Raises:
        ValueError: SIE enabled but the dataset reports no camera/view.
    """
    rows = {(True, True): num_cameras * num_views, (True, False): num_cameras}.get(
        (camera, view), num_views if view else 0
    )
    if (camera or view) and rows < 1:
        raise ValueError(
            f"SIE is enabled (MODEL.SIE_CAMERA {camera}, MODEL.SIE_VIEW {view}) but the "
            f"dataset reports {num_cameras} cameras and {num_views} views"
        )
    if not rows:
        return None
    table = torch.empty(rows, encoder.width, device=_module_device(encoder))
    return nn.Parameter(nn.init.trunc_normal_(table, std=0.02, a=-2.0, b=2.0))


def _module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (where new heads are created).

    Args:
        module: any module with at least one parameter.

    Returns:
        Its device.
    """
    return next(module.parameters()).device
