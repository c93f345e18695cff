"""Attention maps of a trained ViT ReID model over input images (attention rollout).

Example (from the repository root)::

    python -m tools.attention --config-file RUN/config.yaml --weights RUN/ViT-B-16_60.pth \
        --images query_dir --max-images 8 --out attention.png

Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020):
in every block the attention weights are averaged over the heads, the identity is added for the
residual connection and the rows are renormalised, ``A_l = norm(mean_h W_l + I)``; the rollout is
the product through the blocks, ``R = A_L ... A_2 A_1``. Each row of ``R`` sums to 1; the CLS row
over the patch tokens, laid out on the token grid, is the map drawn over the image.

The weights are read without changing the model: forward hooks on each block's attention module
take its input (the ``ln_1`` output) and recompute ``softmax(q k^T / sqrt(d))`` from the module's
own ``in_proj`` weights, while the block runs as usual. The output PNG has the images (resized to
the model's input size, as the model sees them) in the top row and the maps over them below.
Models with the camera / viewpoint SIE take ``--camid`` / ``--viewid`` or the per-image
``--camid-pattern`` / ``--viewid-pattern`` as ``tools.search`` does (without them, the
``TEST.SIE_FALLBACK`` vector).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from datasets.image_dataset import read_image
from datasets.transforms import build_test_transform
from model.clip.vision import ViTReIDEncoder
from processor.extractor import warn_sie_fallback
from tools.search import (
    SearchError,
    add_model_arguments,
    build_search_model,
    check_sie_ids,
    command_ids,
    list_sources,
    setup_command,
)
from utils.checkpoint import atomic_write
from utils.cli import make_parser, parse_args, run_main
from utils.drawing import GAP
from utils.logger import setup_logger

logger = logging.getLogger(__name__)

# Colour map of the drawn attention and its weight over the image.
COLORMAP = "jet"
ALPHA = 0.5


def attention_weights(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """Self-attention weights of a ``nn.MultiheadAttention`` on its input, per head.

    Args:
        attn: the module (packed ``in_proj`` weights, as CLIP's blocks have).
        x: its query = key = value input, [B, T, D] if ``attn.batch_first`` else [T, B, D].

    Returns:
        float32 [B, H, T, T]: ``softmax(q k^T / sqrt(D / H))`` per head; each row sums to 1.
    """
    if not attn.batch_first:
        x = x.transpose(0, 1)
    b, t, d = x.shape
    h = attn.num_heads
    q, k, _ = F.linear(x.float(), attn.in_proj_weight.float(), attn.in_proj_bias.float()).chunk(
        3, dim=-1
    )
    q = q.reshape(b, t, h, d // h).transpose(1, 2)
    k = k.reshape(b, t, h, d // h).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)


@contextlib.contextmanager
def capture_attention(encoder: ViTReIDEncoder) -> Iterator[list[Tensor]]:
    """Collect the attention weights of every block of a ViT encoder while it runs.

    Forward hooks read each block's attention input; the model's computation is unchanged.

    Args:
        encoder: the ViT image encoder.

    Yields:
        A list that receives one [B, H, T, T] tensor per block and forward call, in block order.
    """
    maps: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        query = args[0] if args else kwargs["query"]
        maps.append(attention_weights(module, query.detach()))

    blocks = encoder.transformer.resblocks
    handles = [b.attn.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def attention_rollout(maps: Sequence[Tensor]) -> Tensor:
    """Attention rollout through the blocks (Abnar & Zuidema 2020).

    Args:
        maps: per block, first block first, attention weights [B, H, T, T] (rows sum to 1).

    Returns:
        float32 [B, T, T] ``R = A_L ... A_1`` with ``A_l = norm_rows(mean_heads(W_l) + I)``; row
        i is how much each input token flows into output token i (each row sums to 1).
    """
    rollout = None
    for weights in maps:
        a = weights.float().mean(dim=1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError("attention rollout needs at least one block's weights")
    return rollout


def cls_attention_maps(rollout: Tensor, grid: tuple[int, int]) -> Tensor:
    """The CLS token's rollout over the patch tokens, on the token grid.

    Args:
        rollout: [B, 1 + h * w, 1 + h * w].
        grid: (h, w), row-major as the patch tokens.

    Returns:
        [B, h, w] (the CLS row without its own column).
    """
    h, w = grid
    return rollout[:, 0, 1:].reshape(-1, h, w)


@torch.no_grad()
def image_attention(
    model: nn.Module,
    images: Tensor,
    camids: Tensor | None = None,
    viewids: Tensor | None = None,
    sie_fallback: str = "none",
) -> tuple[Tensor, list[Tensor]]:
    """Run the image encoder of a ReID model and return its rollout and per-block weights.

    Args:
        model: a ``ReIDModel`` with a ViT image encoder (in eval mode).
        images: [B, 3, H, W] (test transform).
        camids: camera ids [B] (camera SIE).
        viewids: viewpoint ids [B] (viewpoint SIE).
        sie_fallback: the SIE vector of missing ids (``ReIDModel.sie_vectors``).

    Returns:
        (rollout [B, T, T], per-block weights [B, H, T, T] first block first).

    Raises:
        SearchError: the model's image encoder is not a ViT.
    """
    encoder = model.image_encoder
    if not isinstance(encoder, ViTReIDEncoder):
        raise SearchError(
            "attention maps need a ViT image encoder (MODEL.NAME ViT-*); this model has "
            f"{type(encoder).__name__}"
        )
    with capture_attention(encoder) as maps:
        model.image_features(images, camids, viewids, sie_fallback=sie_fallback)
    return attention_rollout(maps), list(maps)


def draw_attention(image: Image.Image, heat: np.ndarray) -> Image.Image:
    """A heat map blended over an image.

    Args:
        image: RGB image (the tile).
        heat: float [h, w] attention on the token grid (any positive scale).

    Returns:
        RGB image of ``image``'s size: the map, min-max scaled, upsampled bilinearly, coloured
        with :data:`COLORMAP` and blended with weight :data:`ALPHA`.
    """
    from matplotlib import colormaps

    t = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    t = F.interpolate(t, size=(image.height, image.width), mode="bilinear", align_corners=False)
    t = t[0, 0]
    t = (t - t.min()) / (t.max() - t.min()).clamp_min(1e-12)
    rgb = (colormaps[COLORMAP](t.numpy())[..., :3] * 255).astype(np.uint8)
    return Image.blend(image, Image.fromarray(rgb), ALPHA)


def render_attention_grid(tiles: Sequence[Image.Image], heats: Sequence[np.ndarray]) -> Image.Image:
    """Images in the top row and their attention maps below, separated by ``GAP`` pixels.

    Args:
        tiles: N RGB images of one size (W x H).
        heats: N maps [h, w].

    Returns:
        RGB image of (GAP + N * (W + GAP)) x (GAP + 2 * (H + GAP)) pixels.
    """
    w, h = tiles[0].size
    out = Image.new("RGB", (GAP + len(tiles) * (w + GAP), GAP + 2 * (h + GAP)), (255, 255, 255))
    for i, (tile, heat) in enumerate(zip(tiles, heats, strict=True)):
        x = GAP + i * (w + GAP)
        out.paste(tile, (x, GAP))
        out.paste(draw_attention(tile, heat), (x, 2 * GAP + h))
    return out


def _parser():
    parser = make_parser(
        __doc__.split("\n\n")[0], prog="python -m tools.attention", config=None, overrides=True
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--images",
        required=True,
        action="append",
        help="image or folder (recursive); repeat the flag for several",
    )
    parser.add_argument("--max-images", type=int, default=8, help="first N images (sorted)")
    parser.add_argument("--out", required=True, metavar="PNG", help="PNG to write")
    parser.add_argument(
        "--tile-height", type=int, default=256, help="pixel height of each drawn image"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Draw the attention rollout of a trained model over images.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``); ``KEY VALUE`` config
            overrides may come anywhere.

    Returns:
        ``{"out": PNG path, "paths": images, "rollout": [N, T, T], "maps": [N, h, w]}``.

    Raises:
        SearchError: a missing file, an unusable option or a non-ViT model.
    """
    args, opts = parse_args(_parser(), argv)
    args.opts = opts
    setup_logger(None)
    if args.max_images < 1 or args.tile_height < 1:
        raise SearchError("--max-images and --tile-height must be positive")
    cfg, device, _ = setup_command(args)
    paths, names = list_sources(args.images, "--images")
    paths, names = paths[: args.max_images], names[: args.max_images]
    cams, views = command_ids(args, names)
    model = build_search_model(cfg, args.weights, args.num_views).to(device)
    check_sie_ids(cfg, model, cams, views)
    warn_sie_fallback(model, cams, views, cfg.TEST.SIE_FALLBACK)
    size = (int(cfg.INPUT.SIZE_TEST[0]), int(cfg.INPUT.SIZE_TEST[1]))
    transform = build_test_transform(size, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    raw = [read_image(p) for p in paths]
    images = torch.stack([transform(r) for r in raw]).to(device)
    n = len(paths)
    camids, viewids = (
        None if ids is None else torch.as_tensor(ids, dtype=torch.int64, device=device).expand(n)
        for ids in (cams, views)
    )
    rollout, _ = image_attention(model, images, camids, viewids, cfg.TEST.SIE_FALLBACK)
    maps = cls_attention_maps(rollout, model.image_encoder.grid).cpu()
    # Each image stretched to the model's input aspect, as the test transform does.
    tile = (max(1, round(args.tile_height * size[1] / size[0])), args.tile_height)
    tiles = [Image.fromarray(r.permute(1, 2, 0).numpy()).resize(tile, Image.BILINEAR) for r in raw]
    grid = render_attention_grid(tiles, [m.numpy() for m in maps])
    atomic_write(args.out, lambda tmp: grid.save(tmp, format="PNG"))
    logger.info("attention maps of %d images written to %s", n, args.out)
    print(args.out)
    return {"out": args.out, "paths": paths, "rollout": rollout.cpu(), "maps": maps}


if __name__ == "__main__":
    run_main(main)
