"""CLIP architecture specs: the few numbers that tell ViT-B-16, RN50 and the test variants apart.

An architecture is chosen once, by name, when the model is built; nothing in a ``forward`` asks
which architecture it runs. The towers themselves are open_clip's (OpenAI parameter names); a spec
only says how to size them and which ReID image encoder wraps the vision tower.

Tiny ``*-test`` variants follow timm's habit of registered test models: they keep the real token
vocabulary (49,408) and context length (77), so the real BPE tokenizer and prompt template work,
and the real patch size (16) or ResNet stride structure, so token grids and feature-map sizes are
the real ones, but they are narrow and shallow enough to build in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import open_clip
from torch import nn

from utils.registry import Registry

__all__ = [
    "CLIPArch",
    "FeatureDims",
    "create_clip",
    "get_arch",
    "list_archs",
    "register_arch",
]


class FeatureDims(NamedTuple):
    """Widths of the three image features of the ReID model.

    Attributes:
        last: width of ``f_last`` (ViT: CLS after the second-to-last block; ResNet: pooled layer3).
        final: width of ``f`` (ViT: CLS after ln_post; ResNet: pooled layer4).
        proj: width of ``f_proj`` (the CLIP embedding, shared with the text features).
    """

    last: int
    final: int
    proj: int


@dataclass(frozen=True)
class CLIPArch:
    """Size of a CLIP model (both towers) in OpenAI's terms.

    Attributes:
        name: registry name, e.g. ``'ViT-B-16'``.
        embed_dim: joint image-text embedding width E.
        vision_layers: ViT depth (int) or ResNet blocks per stage (tuple of 4).
        vision_width: ViT width, or ResNet stem width (64 for RN50).
        vision_patch_size: ViT patch size; ``None`` for ResNets.
        vision_head_width: width per attention head (heads = width // head_width for ViT,
            width * 32 // head_width for the ResNet attention pool).
        vision_image_size: pre-training input size; the checkpoint's square position grid.
        text_context_length: text positions (77 for every OpenAI model).
        text_vocab_size: BPE vocabulary size (49,408).
        text_width: text transformer width.
        text_heads: text attention heads.
        text_layers: text transformer depth.
        open_clip_name: open_clip model name under which pretrained tags are listed, or ``None``
            for architectures without published weights (the test variants).
    """

    name: str
    embed_dim: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    vision_head_width: int = 64
    vision_image_size: int = 224
    text_context_length: int = 77
    text_vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    open_clip_name: str | None = None

    @property
    def kind(self) -> Literal["vit", "resnet"]:
        """``'resnet'`` for ModifiedResNet vision towers, ``'vit'`` otherwise."""
        return "resnet" if isinstance(self.vision_layers, tuple) else "vit"

    def feature_dims(self) -> FeatureDims:
        """Widths of ``f_last``, ``f`` and ``f_proj`` computed from the spec.

        Returns:
            ``FeatureDims``; e.g. (768, 768, 512) for ViT-B-16 and (1024, 2048, 1024) for RN50.
        """
        if self.kind == "vit":
            return FeatureDims(self.vision_width, self.vision_width, self.embed_dim)
        # ResNet: layer3 has 4 * (4 * width) channels, layer4 8 * (4 * width) (bottleneck x4).
        return FeatureDims(self.vision_width * 16, self.vision_width * 32, self.embed_dim)

    def open_clip_config(self) -> dict:
        """open_clip model config (the JSON layout of ``open_clip/model_configs``).

        Returns:
            ``{'embed_dim': ..., 'vision_cfg': {...}, 'text_cfg': {...}}``; QuickGELU is not part
            of it because it depends on the weights, not on the architecture.
        """
        layers = list(self.vision_layers) if self.kind == "resnet" else self.vision_layers
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.vision_image_size,
                "layers": layers,
                "width": self.vision_width,
                "head_width": self.vision_head_width,
                "patch_size": self.vision_patch_size,
            },
            "text_cfg": {
                "context_length": self.text_context_length,
                "vocab_size": self.text_vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


ARCHS: Registry[CLIPArch] = Registry("MODEL.NAME", "architecture")


def register_arch(arch: CLIPArch) -> CLIPArch:
    """Add an architecture to the registry (a later registration under the same name wins).

    A registered name is a valid ``MODEL.NAME`` in every config loaded afterwards.

    Args:
        arch: the spec to register.

    Returns:
        The same spec, so the call can be used as an expression.
    """
    return ARCHS.register(arch.name, arch, overwrite=True)


def list_archs() -> list[str]:
    """Names of the registered architectures, in registration order."""
    return ARCHS.names()


def get_arch(name: str) -> CLIPArch:
    """Look up a registered architecture.

    Args:
        name: registry name (``MODEL.NAME``).

    Returns:
        The ``CLIPArch`` spec.

    Raises:
        UnknownNameError: unknown name (also a ``ValueError``); the message lists the valid
            names and the closest one.
    """
    return ARCHS.get(name)


def create_clip(arch: CLIPArch, quick_gelu: bool = True) -> nn.Module:
    """Build open_clip's CLIP model (both towers, random init) for an architecture.

    The towers are built at the pre-training size (square grid of ``vision_image_size``), so a
    pretrained state dict loads without any resizing; the ReID changes (grid, stride, last stride)
    are applied afterwards by the ReID image encoders.

    Args:
        arch: architecture spec.
        quick_gelu: use x * sigmoid(1.702 x) in the transformer MLPs (OpenAI weights need it).

    Returns:
        An ``open_clip.CLIP`` in fp32 on the default device, in training mode.
    """
    cfg = arch.open_clip_config()
    return open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=cfg["vision_cfg"],
        text_cfg=cfg["text_cfg"],
        quick_gelu=quick_gelu,
    )


# The paper's two backbones (OpenAI CLIP sizes).
register_arch(
    CLIPArch(
        name="ViT-B-16",
        embed_dim=512,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=16,
        open_clip_name="ViT-B-16",
    )
)
register_arch(
    CLIPArch(
        name="RN50",
        embed_dim=1024,
        vision_layers=(3, 4, 6, 3),
        vision_width=64,
        vision_patch_size=None,
        open_clip_name="RN50",
    )
)
# Tiny test/demo variants: real vocabulary, context, patch size and stride structure.
register_arch(
    CLIPArch(
        name="ViT-T-16-test",
        embed_dim=32,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=16,
        vision_head_width=32,
        text_width=64,
        text_heads=2,
        text_layers=2,
    )
)
register_arch(
    CLIPArch(
        name="RN-T-test",
        embed_dim=32,
        vision_layers=(1, 1, 1, 1),
        vision_width=8,
        vision_patch_size=None,
        text_width=64,
        text_heads=2,
        text_layers=2,
    )
)
