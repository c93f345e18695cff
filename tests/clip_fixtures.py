"""Shared helpers for the model tests: configs, random OpenAI-format CLIP weights, archives.

The weights are built with open_clip's own ``CLIP`` class (not the project's code), perturbed
so that no LayerNorm/BatchNorm is the identity and no residual branch is zero, and saved in
OpenAI's key layout, as a plain state dict or as a TorchScript archive with OpenAI's three integer
entries.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import open_clip
import torch
from yacs.config import CfgNode

from configs.defaults import get_cfg_defaults
from model.clip.arch import CLIPArch

PERSON_IDS = [49406, 320, 1125, 539, 320, 343, 343, 343, 343, 2533, 269, 49407]
VEHICLE_IDS = [49406, 320, 1125, 539, 320, 343, 343, 343, 343, 5299, 269, 49407]
X_ID = 343


def make_cfg(name: str = "ViT-T-16-test", **overrides: object) -> CfgNode:
    """Default config with a random-init tiny model; ``overrides`` are 'MODEL__KEY'-style pairs.

    Args:
        name: MODEL.NAME.
        **overrides: e.g. ``MODEL__STRIDE_SIZE=[12, 12]`` sets ``cfg.MODEL.STRIDE_SIZE``.

    Returns:
        A mutable CfgNode.
    """
    cfg = get_cfg_defaults()
    cfg.MODEL.NAME = name
    cfg.MODEL.PRETRAIN_TAG = "none"
    cfg.MODEL.PROMPT_CLASS = "person"
    for key, value in overrides.items():
        node = cfg
        parts = key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return cfg


def reference_clip(arch: CLIPArch, quick_gelu: bool = True) -> torch.nn.Module:
    """open_clip's CLIP for a spec, built directly from open_clip's config dataclasses."""
    cfg = arch.open_clip_config()
    return open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=open_clip.CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=open_clip.CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=quick_gelu,
    )


def random_openai_state_dict(arch: CLIPArch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random CLIP weights in OpenAI's key layout (fp32, no integer entries).

    Args:
        arch: architecture spec (sizes only).
        seed: torch seed.

    Returns:
        ``{key: tensor}`` as open_clip/OpenAI name them.
    """
    torch.manual_seed(seed)
    state = reference_clip(arch).state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=gen)
        if key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.endswith("running_mean"):
            out[key] = 0.1 * noise
        elif value.dim() == 1 and key.endswith("weight"):  # LayerNorm / BatchNorm scales
            out[key] = 1.0 + 0.1 * noise
        else:
            out[key] = value + 0.05 * noise
    return out


def save_torchscript_archive(arch: CLIPArch, state_dict: dict, path: Path) -> Path:
    """Trace open_clip's CLIP with the given weights and save it like OpenAI's ``.pt`` files.

    The archive carries OpenAI's three integer buffers ``input_resolution``, ``context_length``
    and ``vocab_size``.
    """
    model = reference_clip(arch)
    model.load_state_dict(state_dict)
    # open_clip keeps two of the names as plain ints; OpenAI's archive holds them as buffers.
    del model.context_length, model.vocab_size
    # OpenAI's causal mask is a plain attribute, not part of the archive's state dict.
    mask = model._buffers.pop("attn_mask")
    model.attn_mask = mask
    model.register_buffer("input_resolution", torch.tensor(arch.vision_image_size))
    model.register_buffer("context_length", torch.tensor(arch.text_context_length))
    model.register_buffer("vocab_size", torch.tensor(arch.text_vocab_size))
    model.eval()
    image = torch.zeros(1, 3, arch.vision_image_size, arch.vision_image_size)
    text = open_clip.tokenize(["a photo"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and torch.jit deprecation warnings
        traced = torch.jit.trace(model, (image, text), check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def official_reid_layout(
    arch: CLIPArch,
    num_classes: int,
    num_tokens: int,
    sie_rows: int = 0,
    with_text: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official CLIP-ReID checkpoint (ViT models), written from the spec.

    Args:
        arch: a ViT spec.
        num_classes: identities C.
        num_tokens: image tokens including CLS (129 at 256x128 stride 16).
        sie_rows: rows of cv_embed (0: no SIE).
        with_text: include prompt learner and text encoder.

    Returns:
        The expected layout (BatchNorm ``num_batches_tracked`` as shape ()).
    """
    w, e, p = arch.vision_width, arch.embed_dim, arch.vision_patch_size
    tw, ctx = arch.text_width, arch.text_context_length
    out: dict[str, tuple[int, ...]] = {
        "image_encoder.class_embedding": (w,),
        "image_encoder.positional_embedding": (num_tokens, w),
        "image_encoder.proj": (w, e),
        "image_encoder.conv1.weight": (w, 3, p, p),
    }

    def blocks(prefix: str, width: int, layers: int) -> None:
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            out[b + "attn.in_proj_weight"] = (3 * width, width)
            out[b + "attn.in_proj_bias"] = (3 * width,)
            out[b + "attn.out_proj.weight"] = (width, width)
            out[b + "attn.out_proj.bias"] = (width,)
            for ln in ("ln_1", "ln_2"):
                out[b + f"{ln}.weight"] = (width,)
                out[b + f"{ln}.bias"] = (width,)
            out[b + "mlp.c_fc.weight"] = (4 * width, width)
            out[b + "mlp.c_fc.bias"] = (4 * width,)
            out[b + "mlp.c_proj.weight"] = (width, 4 * width)
            out[b + "mlp.c_proj.bias"] = (width,)

    for ln in ("ln_pre", "ln_post"):
        out[f"image_encoder.{ln}.weight"] = (w,)
        out[f"image_encoder.{ln}.bias"] = (w,)
    blocks("image_encoder.", w, arch.vision_layers)
    for name, dim in (("bottleneck", w), ("bottleneck_proj", e)):
        for item in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{item}"] = (dim,)
        out[f"{name}.num_batches_tracked"] = ()
    out["classifier.weight"] = (num_classes, w)
    out["classifier_proj.weight"] = (num_classes, e)
    if sie_rows:
        out["cv_embed"] = (sie_rows, w)
    if with_text:
        out["prompt_learner.cls_ctx"] = (num_classes, 4, tw)
        out["prompt_learner.token_prefix"] = (1, 5, tw)
        out["prompt_learner.token_suffix"] = (1, ctx - 9, tw)
        out["text_encoder.positional_embedding"] = (ctx, tw)
        out["text_encoder.text_projection"] = (tw, e)
        out["text_encoder.ln_final.weight"] = (tw,)
        out["text_encoder.ln_final.bias"] = (tw,)
        blocks("text_encoder.", tw, arch.text_layers)
    return out


def random_reid_checkpoint(
    layout: dict[str, tuple[int, ...]], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tensors for a checkpoint layout (positive running variances, integer counters)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=gen)
        elif len(shape) == 1 and key.endswith("weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[key] = 0.05 * torch.randn(shape, generator=gen)
    return out
