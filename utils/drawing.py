"""Tile rendering of ranked lists: a query tile followed by its ranked gallery tiles, labelled.

Shared by ``tools/search.py`` (search results) and ``processor/ranked_lists.py`` (evaluation
ranked lists, where each gallery tile is framed green for a true match and red otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

# Layout (pixels): tiles separated by GAP, a LABEL_H text band below each.
GAP = 8
LABEL_H = 28
QUERY_BORDER = (40, 160, 40)  # green frame marks the query tile in search results
MATCH_BORDER = (30, 170, 30)  # true match (same identity, other camera)
MISMATCH_BORDER = (210, 30, 30)  # false match
# Frame width of a hit's border: wide enough to read at a glance on a 128-pixel tile.
HIT_BORDER_WIDTH = 4


def load_tile(path: str, size: tuple[int, int]) -> Image.Image:
    """An image resized into an (H, W) tile, aspect ratio kept, centred on grey.

    Args:
        path: the image file.
        size: (H, W) of the tile.

    Returns:
        An RGB image of W x H pixels.
    """
    h, w = size
    tile = Image.new("RGB", (w, h), (128, 128, 128))
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = min(w / img.width, h / img.height)
        new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(new, Image.BILINEAR)
    tile.paste(img, ((w - new[0]) // 2, (h - new[1]) // 2))
    return tile


def ranking_image_size(num_hits: int, tile_size: tuple[int, int]) -> tuple[int, int]:
    """Pixel size of :func:`render_ranking`'s image.

    Args:
        num_hits: ranked gallery tiles drawn after the query tile.
        tile_size: (H, W) of each tile.

    Returns:
        (width, height) = (GAP + (1 + k) * (W + GAP), GAP + H + LABEL_H).
    """
    h, w = int(tile_size[0]), int(tile_size[1])
    return GAP + (1 + num_hits) * (w + GAP), GAP + h + LABEL_H


def render_ranking(
    query_path: str,
    hits: Sequence[dict[str, Any]],
    tile_size: tuple[int, int],
    score_key: str = "similarity",
    borders: Sequence[tuple[int, int, int] | None] | None = None,
    query_label: str = "query",
    query_border: tuple[int, int, int] = QUERY_BORDER,
) -> Image.Image:
    """Draw a query and its ranked gallery images in one row, with ranks and scores.

    Layout: 1 + k tiles of (H, W) = ``tile_size``, ``GAP`` pixels apart and around, each over a
    ``LABEL_H`` text band (see :func:`ranking_image_size`).

    Args:
        query_path: the query image.
        hits: k ranked results (``rank``, ``path`` and ``score_key`` entries).
        tile_size: (H, W) of each tile.
        score_key: which score to print ('similarity' or 'distance').
        borders: optional RGB frame colour per hit (None entries: no frame); None draws no
            frame around any hit.
        query_label: text under the query tile.
        query_border: RGB frame colour of the query tile.

    Returns:
        The RGB image.
    """
    if borders is not None and len(borders) != len(hits):
        raise ValueError(f"{len(borders)} border colours for {len(hits)} hits")
    h, w = int(tile_size[0]), int(tile_size[1])
    canvas = Image.new("RGB", ranking_image_size(len(hits), tile_size), "white")
    draw = ImageDraw.Draw(canvas)
    labels = [(query_label, query_path)] + [
        (f"#{hit['rank']}  {hit[score_key]:.3f}", hit["path"]) for hit in hits
    ]
    for col, (label, path) in enumerate(labels):
        x = GAP + col * (w + GAP)
        canvas.paste(load_tile(path, (h, w)), (x, GAP))
        if col == 0:
            draw.rectangle([x, GAP, x + w - 1, GAP + h - 1], outline=query_border, width=2)
        elif borders is not None and borders[col - 1] is not None:
            draw.rectangle(
                [x, GAP, x + w - 1, GAP + h - 1], outline=borders[col - 1], width=HIT_BORDER_WIDTH
            )
        draw.text((x + 2, GAP + h + 4), label, fill=(0, 0, 0))
    return canvas
