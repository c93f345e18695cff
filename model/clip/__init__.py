"""CLIP towers (open_clip, OpenAI parameter names) with the CLIP-ReID changes."""

from model.clip.arch import CLIPArch, FeatureDims, create_clip, get_arch, list_archs, register_arch
from model.clip.text import TextEncoder
from model.clip.tokenizer import tokenize, word_token_id
from model.clip.vision import (
    ResNetReIDEncoder,
    VisionFeatures,
    ViTReIDEncoder,
    resize_pos_embed,
    resnet_grid,
    vit_grid,
)

__all__ = [
    "CLIPArch",
    "FeatureDims",
    "ResNetReIDEncoder",
    "TextEncoder",
    "ViTReIDEncoder",
    "VisionFeatures",
    "create_clip",
    "get_arch",
    "list_archs",
    "register_arch",
    "resize_pos_embed",
    "resnet_grid",
    "tokenize",
    "vit_grid",
    "word_token_id",
]
