"""ReID image encoders around open_clip's vision towers.

The towers' submodules (and therefore the OpenAI parameter names) are adopted unchanged; the
forward passes are the project's, because open_clip's cannot take the CLIP-ReID changes:

* ViT: a rectangular token grid ``((H - P) // S_h + 1) x ((W - P) // S_w + 1)`` with the
  pre-training positional embedding resized bilinearly (align_corners False, no antialias, as the
  official code; open_clip and timm use bicubic + antialias); overlapping patches through the
  patch-embedding stride; SIE added to the CLS token (or to every token) before the positional
  embedding; three outputs: the CLS token after the second-to-last block (no ln_post), the final
  CLS token after ln_post, and its projection.
* ModifiedResNet: last stage with stride 1 (the anti-aliasing average pools become identities, so
  no parameter is renamed) and the attention-pool positional embedding resized bilinearly to
  ``h * w + 1``; outputs: average-pooled layer3, average-pooled layer4 and the attention-pooled
  (projected) mean token.

Both encoders check that the input gives the grid their positional embedding was built for and
otherwise raise an error naming the config keys to change.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.clip.arch import FeatureDims

__all__ = [
    "ResNetReIDEncoder",
    "VisionFeatures",
    "ViTReIDEncoder",
    "resize_pos_embed",
    "resnet_grid",
    "vit_grid",
]

SIE_MODES = ("cls", "all")


class VisionFeatures(NamedTuple):
    """The three image features of the ReID model (all before any BNNeck).

    Attributes:
        last: ``f_last`` [B, D_last]: ViT CLS after the second-to-last block; ResNet pooled layer3.
        final: ``f`` [B, D]: ViT CLS after ln_post; ResNet pooled layer4.
        proj: ``f_proj`` [B, E]: the CLIP image embedding at this grid (ViT: ``f @ proj``;
            ResNet: attention-pooled mean token).
    """

    last: Tensor
    final: Tensor
    proj: Tensor


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{what} must be an int or a pair (H, W), got {value!r}")
    return pair  # type: ignore[return-value]


def vit_grid(image_size: Sequence[int], patch_size: int, stride: Sequence[int]) -> tuple[int, int]:
    """Token grid of a ViT patch embedding (kernel ``patch_size``, no padding).

    Args:
        image_size: input (H, W).
        patch_size: patch (kernel) size P.
        stride: patch-embedding stride (S_h, S_w); smaller than P gives overlapping patches.

    Returns:
        ``((H - P) // S_h + 1, (W - P) // S_w + 1)``, e.g. (16, 8) for 256x128 at stride 16 and
        (21, 10) at stride 12.
    """
    (h, w), (sh, sw) = _pair(image_size, "image size"), _pair(stride, "stride")
    if h < patch_size or w < patch_size:
        raise ValueError(f"Image size {h}x{w} is smaller than the patch size {patch_size}")
    return (h - patch_size) // sh + 1, (w - patch_size) // sw + 1


def resnet_grid(image_size: Sequence[int], last_stride: int = 1) -> tuple[int, int]:
    """Feature-map size of OpenAI's ModifiedResNet for an input size.

    The stem's first 3x3 convolution has stride 2 and padding 1, then a 2x2 average pool;
    layer2 and layer3 halve again (anti-aliasing average pools, floor), layer4 divides by
    ``last_stride``.

    Args:
        image_size: input (H, W).
        last_stride: stride of layer4 (1 for ReID, 2 in CLIP).

    Returns:
        (h, w) of the layer3/layer4 maps with ``last_stride`` 1, e.g. (16, 8) for 256x128.
    """

    def one(n: int) -> int:
        n = (n - 1) // 2 + 1  # conv1: kernel 3, stride 2, padding 1
        n = n // 2 // 2 // 2  # stem avg-pool, layer2, layer3
        return n // last_stride

    h, w = _pair(image_size, "image size")
    return one(h), one(w)


def resize_pos_embed(pos_embed: Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> Tensor:
    """Resize a positional embedding with one leading (CLS / mean-token) row to a new grid.

    The grid rows are reshaped to a (1, D, h, w) image, resized with bilinear interpolation
    (align_corners False, no antialias, as the official CLIP-ReID code) and flattened back in
    row-major order; the leading row is kept unchanged.

    Args:
        pos_embed: [1 + h_src * w_src, D].
        src_grid: (h_src, w_src) of the rows after the leading one.
        dst_grid: (h_dst, w_dst).

    Returns:
        [1 + h_dst * w_dst, D], same dtype and device; the input itself when the grids are equal.
    """
    (sh, sw), (dh, dw) = tuple(src_grid), tuple(dst_grid)
    if pos_embed.shape[0] != 1 + sh * sw:
        raise ValueError(
            f"Positional embedding has {pos_embed.shape[0]} rows, expected 1 + {sh}*{sw}"
        )
    if (sh, sw) == (dh, dw):
        return pos_embed
    lead, grid = pos_embed[:1], pos_embed[1:]
    grid = grid.reshape(1, sh, sw, -1).permute(0, 3, 1, 2)
    if grid.dtype in (torch.float16, torch.bfloat16):
        grid = grid.float()  # interpolate in fp32 for half-precision checkpoints
    grid = F.interpolate(grid, size=(dh, dw), mode="bilinear", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(dh * dw, -1).to(pos_embed.dtype)
    return torch.cat([lead, grid], dim=0)


def _square_grid(rows: int, what: str) -> tuple[int, int]:
    side = math.isqrt(rows - 1)
    if side * side != rows - 1:
        raise ValueError(f"{what} has {rows} rows, which is not 1 + a square grid")
    return side, side


def _grid_error(
    kind: str,
    got_size: tuple[int, int],
    got_grid: tuple[int, int],
    built_size: tuple[int, int],
    built_grid: tuple[int, int],
    stride_note: str,
    rebuild_keys: str,
) -> ValueError:
    return ValueError(
        f"Input images are {got_size[0]}x{got_size[1]}, which gives a "
        f"{got_grid[0]}x{got_grid[1]} {kind} grid{stride_note}, but the positional embedding was "
        f"built for {built_grid[0]}x{built_grid[1]} (input {built_size[0]}x{built_size[1]}). "
        f"Set INPUT.SIZE_TRAIN and INPUT.SIZE_TEST to [{built_size[0]}, {built_size[1]}] (or any "
        f"size that gives the same grid), or rebuild the model with {rebuild_keys} matching "
        f"the images."
    )


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm layers leave their running statistics unchanged (a recomputation).

    Momentum 0 makes the running update ``running * 1 + batch * 0`` (exactly the old value) while
    the layer computes and saves the same tensors as in the first forward, which checkpointing
    requires; the batch counter is put back afterwards.
    """
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


def _recompute_context(
    module: nn.Module,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``checkpoint`` contexts: a plain forward, then a recomputation that leaves BN stats alone."""
    return contextlib.nullcontext(), _running_stats_frozen(module)


class ViTReIDEncoder(nn.Module):
    """CLIP ViT with the CLIP-ReID changes (token grid, overlapping stride, SIE, three outputs).

    Adopts ``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
    ``transformer`` (``.resblocks``), ``ln_post`` and ``proj`` from an open_clip
    ``VisionTransformer``, so the state-dict keys are OpenAI's ``visual.*`` keys.

    Args:
        visual: open_clip ``VisionTransformer`` holding (pretrained) weights at its square
            pre-training grid; its modules are taken over, not copied.
        image_size: input (H, W) the model is built for (``INPUT.SIZE_TRAIN``).
        stride: patch-embedding stride (S_h, S_w) (``MODEL.STRIDE_SIZE``); rectangular strides
            are allowed (the official code applies only ``STRIDE_SIZE[0]`` to the convolution).
        sie_mode: ``'cls'`` adds the SIE vector to the CLS token only (the paper's SIE-cls);
            ``'all'`` adds it to every token (paper Tab. 7, SIE-all; TransReID's choice).
    """

    def __init__(
        self,
        visual: nn.Module,
        image_size: Sequence[int],
        stride: Sequence[int] = (16, 16),
        sie_mode: str = "cls",
    ) -> None:
        super().__init__()
        if sie_mode not in SIE_MODES:
            raise ValueError(f"MODEL.SIE_MODE must be one of {SIE_MODES}, got {sie_mode!r}")
        conv = visual.conv1
        self.patch_size = int(conv.kernel_size[0])
        self.stride = _pair(stride, "MODEL.STRIDE_SIZE")
        self.image_size = _pair(image_size, "INPUT.SIZE_TRAIN")
        self.grid = vit_grid(self.image_size, self.patch_size, self.stride)
        self.sie_all = sie_mode == "all"

        # Same weight Parameter, new stride: overlapping patches when the stride < patch size.
        self.conv1 = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=self.stride,
            bias=False,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.conv1.weight = conv.weight
        self.class_embedding = visual.class_embedding
        src = visual.positional_embedding.data
        pos = resize_pos_embed(
            src, _square_grid(src.shape[0], "visual.positional_embedding"), self.grid
        )
        self.positional_embedding = nn.Parameter(pos.clone())
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        # open_clip >= 3 runs its blocks batch-first; older releases sequence-first.
        self._seq_first = not getattr(self.transformer, "batch_first", True)
        self.grad_checkpointing = False

    @property
    def width(self) -> int:
        """Token width D (768 for ViT-B-16)."""
        return self.class_embedding.shape[0]

    @property
    def dims(self) -> FeatureDims:
        """Widths of (f_last, f, f_proj)."""
        return FeatureDims(self.width, self.width, self.proj.shape[1])

    @property
    def num_tokens(self) -> int:
        """Number of tokens including CLS (129 at 256x128 with stride 16, 211 with stride 12)."""
        return 1 + self.grid[0] * self.grid[1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, ~30% more time).

        Args:
            enable: switch on or off.
        """
        self.grad_checkpointing = enable

    def _check_size(self, images: Tensor) -> None:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        grid = vit_grid(size, self.patch_size, self.stride)
        if grid != self.grid:
            note = f" (patch {self.patch_size}, stride {self.stride[0]}x{self.stride[1]})"
            keys = "INPUT.SIZE_TRAIN / MODEL.STRIDE_SIZE"
            raise _grid_error("token", size, grid, self.image_size, self.grid, note, keys)

    def embed(self, images: Tensor, sie: Tensor | None = None) -> Tensor:
        """Patch embedding, CLS token, SIE, positional embedding and ln_pre.

        Args:
            images: [B, 3, H, W]; H, W must give the grid the model was built for.
            sie: optional side-information vectors [B, D] (already scaled by SIE_COE), added to
                the CLS token (``sie_mode='cls'``) or to every token (``'all'``) before the
                positional embedding.

        Returns:
            Tokens [B, 1 + h * w, D] (batch-first), CLS first.
        """
        self._check_size(images)
        x = self.conv1(images)  # [B, D, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, D], row-major like the positional rows
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        if sie is not None and not self.sie_all:
            cls = cls + sie.to(x.dtype).unsqueeze(1)
        x = torch.cat([cls, x], dim=1)
        if sie is not None and self.sie_all:
            x = x + sie.to(x.dtype).unsqueeze(1)
        x = x + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def _block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, images: Tensor, sie: Tensor | None = None) -> VisionFeatures:
        """Encode images into the three ReID features.

        Args:
            images: [B, 3, H, W].
            sie: optional [B, D] SIE vectors (see ``embed``).

        Returns:
            ``VisionFeatures(last [B, D], final [B, D], proj [B, E])``.
        """
        x = self.embed(images, sie)
        if self._seq_first:
            x = x.transpose(0, 1)
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x = self._block(block, x)
        last = x[0] if self._seq_first else x[:, 0]
        x = self._block(blocks[-1], x)
        cls = x[0] if self._seq_first else x[:, 0]
        # ln_post is per token, so applying it to the CLS token alone gives the official value.
        final = self.ln_post(cls)
        return VisionFeatures(last, final, final @ self.proj)


class ResNetReIDEncoder(nn.Module):
    """OpenAI ModifiedResNet with last stride 1 and a resized attention-pool embedding.

    Adopts the stem (``conv1..3``, ``bn1..3``), ``layer1..4`` and ``attnpool`` from an open_clip
    ``ModifiedResNet``; parameter names stay OpenAI's.

    SIE for ResNets (the official code allocates the table but never uses it): the vector is added
    to the attention pool's query token (the spatial mean) before the positional embedding,
    mirroring the ViT's CLS token (``sie_mode='cls'``), or to every pooled token (``'all'``).

    Args:
        visual: open_clip ``ModifiedResNet`` at its pre-training size (its modules are taken
            over and layer4's stride is changed in place).
        image_size: input (H, W) the model is built for (``INPUT.SIZE_TRAIN``).
        last_stride: stride of layer4; 1 for ReID (16x8 maps at 256x128), 2 reproduces CLIP.
        sie_mode: ``'cls'`` or ``'all'`` (see above).
    """

    def __init__(
        self,
        visual: nn.Module,
        image_size: Sequence[int],
        last_stride: int = 1,
        sie_mode: str = "cls",
    ) -> None:
        super().__init__()
        if sie_mode not in SIE_MODES:
            raise ValueError(f"MODEL.SIE_MODE must be one of {SIE_MODES}, got {sie_mode!r}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.image_size = _pair(image_size, "INPUT.SIZE_TRAIN")
        self.last_stride = last_stride
        self.grid = resnet_grid(self.image_size, last_stride)
        if min(self.grid) < 1:
            raise ValueError(f"INPUT.SIZE_TRAIN {list(self.image_size)} is too small for a ResNet")
        self.sie_all = sie_mode == "all"
        for name in ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3"):
            setattr(self, name, getattr(visual, name))
        self.avgpool = visual.avgpool
        self.layer1, self.layer2 = visual.layer1, visual.layer2
        self.layer3, self.layer4 = visual.layer3, visual.layer4
        if last_stride == 1:
            # The stride lives in parameter-free average pools (anti-aliasing): replacing them by
            # identities gives stride 1 without renaming or reshaping any parameter.
            first = self.layer4[0]
            first.avgpool = nn.Identity()
            if first.downsample is not None:
                first.downsample._modules["-1"] = nn.Identity()
            first.stride = 1
        self.attnpool = visual.attnpool
        src = self.attnpool.positional_embedding.data
        pos = resize_pos_embed(
            src, _square_grid(src.shape[0], "visual.attnpool.positional_embedding"), self.grid
        )
        self.attnpool.positional_embedding = nn.Parameter(pos.clone())
        self.grad_checkpointing = False

    @property
    def width(self) -> int:
        """Attention-pool input width (2048 for RN50); the SIE width."""
        return self.attnpool.positional_embedding.shape[1]

    @property
    def dims(self) -> FeatureDims:
        """Widths of (f_last, f, f_proj)."""
        return FeatureDims(self.width // 2, self.width, self.attnpool.c_proj.out_features)

    @property
    def num_tokens(self) -> int:
        """Attention-pool positions: h * w + 1 (129 at 256x128)."""
        return 1 + self.grid[0] * self.grid[1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block's activations in the backward pass (less memory).

        BatchNorm running statistics are updated once per forward, as without checkpointing:
        the recomputation normalises with the same batch statistics but leaves them unchanged
        (it would otherwise apply the momentum update twice per step).

        Args:
            enable: switch on or off.
        """
        self.grad_checkpointing = enable

    def _stage(self, layer: nn.Sequential, x: Tensor) -> Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return layer(x)
        for block in layer:
            context = functools.partial(_recompute_context, block)
            x = checkpoint(block, x, use_reentrant=False, context_fn=context)
        return x

    def feature_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Run the stem and the four stages.

        Args:
            images: [B, 3, H, W]; H, W must give the grid the model was built for.

        Returns:
            (layer3 map [B, 16w, h, w], layer4 map [B, 32w, h, w]) with w the stem width.
        """
        size = (int(images.shape[-2]), int(images.shape[-1]))
        grid = resnet_grid(size, self.last_stride)
        if grid != self.grid:
            raise _grid_error(
                "feature-map", size, grid, self.image_size, self.grid, "", "INPUT.SIZE_TRAIN"
            )
        x = self.act1(self.bn1(self.conv1(images)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self._stage(self.layer2, self._stage(self.layer1, x))
        x3 = self._stage(self.layer3, x)
        return x3, self._stage(self.layer4, x3)

    def attention_pool(self, x4: Tensor, sie: Tensor | None = None) -> Tensor:
        """CLIP's QKV attention pool, returning only the query (mean) token.

        Attention outputs are independent per query, so querying with the mean token alone gives
        the same value as the official pool's token 0.

        Args:
            x4: layer4 map [B, C, h, w].
            sie: optional [B, C] SIE vectors (see the class docstring).

        Returns:
            [B, E] projected embedding.
        """
        pool = self.attnpool
        x = x4.flatten(2).permute(2, 0, 1)  # [h*w, B, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # [1 + h*w, B, C]
        if sie is not None:
            sie = sie.to(x.dtype).unsqueeze(0)
            x = x + sie if self.sie_all else torch.cat([x[:1] + sie, x[1:]], dim=0)
        x = x + pool.positional_embedding.unsqueeze(1).to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x[:1],
            key=x,
            value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return out[0]

    def forward(self, images: Tensor, sie: Tensor | None = None) -> VisionFeatures:
        """Encode images into the three ReID features.

        Args:
            images: [B, 3, H, W].
            sie: optional [B, C] SIE vectors.

        Returns:
            ``VisionFeatures(last [B, C/2] (pooled layer3), final [B, C] (pooled layer4),
            proj [B, E])``.
        """
        x3, x4 = self.feature_maps(images)
        last = x3.mean(dim=(2, 3))
        final = x4.mean(dim=(2, 3))
        return VisionFeatures(last, final, self.attention_pool(x4, sie))
