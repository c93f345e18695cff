"""Person / vehicle search with a trained ReID model: index a gallery folder, then rank it.

Examples (from the repository root)::

    python -m tools.search index --config-file RUN/config.yaml --weights RUN/ViT-B-16_60.pth \
        --gallery gallery_dir --out gallery_index.pt
    python -m tools.search query --index gallery_index.pt --config-file RUN/config.yaml \
        --weights RUN/ViT-B-16_60.pth --query query_dir --topk 10 --out results --visualize

Both commands accept ``KEY VALUE`` config overrides anywhere, as ``test_clipreid.py`` does.
Features are those of evaluation (:class:`processor.extractor.FeatureExtractor`): the test
transform (``INPUT.SIZE_TEST``, mean, std), the model's ``encode_image`` (``TEST.NECK_FEAT``,
``TEST.FLIP_FEAT``) and, with ``TEST.FEAT_NORM``, L2 normalisation;
gallery images are ranked by cosine similarity, which orders them as the evaluator's squared
Euclidean distance on normalised features does (``|q - g|^2 = 2 - 2 cos``). Without
``TEST.FEAT_NORM`` they are ranked by squared Euclidean distance on the raw features.

Large galleries: with the optional faiss package (``pip install faiss-cpu``) ``index --ann ivf``
(or ``hnsw``) also stores an approximate nearest-neighbour index (:mod:`utils.ann`), built by
default (``--ann auto``) from ``ANN_AUTO_MIN`` gallery images on; ``query --ann auto`` uses a
stored one and ranks exactly otherwise, ``--ann exact`` always ranks exactly, ``--ann ivf|hnsw``
uses the stored index of that kind or builds one for the command. ``--nprobe`` / ``--ef-search``
trade speed for recall (``docs/benchmarks.md``: recall@10 and queries/s against exact search).

An index records the settings it was built with (model, eval-relevant config keys, a hash of the
weights); ``query`` refuses an index whose settings differ from its own. ``index --append`` adds
the folder's images an existing index does not hold yet (same settings, checked).

Camera ids of arbitrary folders are unknown. For a model with SIE (``MODEL.SIE_CAMERA`` /
``MODEL.SIE_VIEW``) pass ``--camid N`` / ``--viewid N`` (one 0-based id for every image of the
command, e.g. the query camera's id) or ``--camid-pattern REGEX`` / ``--viewid-pattern REGEX``
(one id per image: the number the first group finds in its path below the folder given, minus
``--camid-base`` / ``--viewid-base``); an id not given gets the SIE fallback
``TEST.SIE_FALLBACK`` ('mean': the mean of the rows it could select; 'none': no SIE vector), with
a warning. An index built with the fallback records it, and a query that uses the fallback too
must use the same one.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode

from configs.config import load_cfg
from datasets.bases import IMAGE_EXTENSIONS, CorruptImageError
from model.loading import build_model_from_checkpoint
from model.reid_model import ReIDModel
from processor.extractor import build_feature_extractor
from utils.ann import (
    ANN_KINDS,
    AnnParams,
    MissingDependencyError,
    ann_search,
    build_ann,
    deserialize_ann,
    faiss_available,
    serialize_ann,
    set_search_params,
)
from utils.checkpoint import read_checkpoint, save_checkpoint, sha256_file, write_json
from utils.cli import (
    OVERRIDES_HELP,
    UsageError,
    add_config_argument,
    add_num_views_argument,
    make_parser,
    parse_args,
    run_main,
)
from utils.dist import resolve_device
from utils.distance import DEFAULT_MEMORY_BUDGET_MB, chunked_topk
from utils.drawing import GAP, LABEL_H, render_ranking  # noqa: F401 (layout re-exported)
from utils.logger import progress, setup_logger

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
# Config keys that change the features: an index and a query must agree on every one.
FEATURE_KEYS = (
    "MODEL.NAME",
    "MODEL.METHOD",
    "MODEL.STRIDE_SIZE",
    "MODEL.SIE_CAMERA",
    "MODEL.SIE_VIEW",
    "MODEL.SIE_COE",
    "MODEL.SIE_MODE",
    "INPUT.SIZE_TEST",
    "INPUT.PIXEL_MEAN",
    "INPUT.PIXEL_STD",
    "TEST.NECK_FEAT",
    "TEST.FEAT_NORM",
    "TEST.FLIP_FEAT",
)
# Gallery rows scored at once: an fp16 index is widened to float32 one chunk at a time.
GALLERY_CHUNK = 8192
# 'index --ann auto' builds an approximate index from this many gallery images on (with faiss):
# below it exact ranking takes well under a second per query batch on a CPU.
ANN_AUTO_MIN = 100_000
# The kind 'index --ann auto' builds: HNSW keeps recall@10 >= 0.99 at >= 10x exact speed even on
# galleries without low-rank structure, where IVF needs many probes (docs/benchmarks.md); its
# build (minutes at 1M on 2 cores) is small beside extracting the features of 1M images.
ANN_AUTO_KIND = "hnsw"


class SearchError(UsageError):
    """A search input (folder, image, index, option) is unusable; the message names it."""


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def list_image_files(path: str, what: str) -> list[str]:
    """Image files of a file or folder (folders searched recursively), sorted, absolute.

    Args:
        path: an image file or a folder.
        what: the argument's name for error messages (e.g. '--gallery').

    Returns:
        Absolute paths of the images (extensions of ``datasets.bases.IMAGE_EXTENSIONS``).

    Raises:
        SearchError: the path does not exist, is not an image, or the folder holds no image.
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise SearchError(f"{what} {path!r} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [str(p.resolve())]
    if not p.is_dir():
        raise SearchError(f"{what} {path!r} does not exist")
    files = sorted(
        str(f.resolve())
        for f in p.rglob("*")
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
    )
    if not files:
        raise SearchError(
            f"{what} folder {path!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}, searched "
            "recursively)"
        )
    return files


def uses_sie_fallback(cfg: CfgNode, camid: Ids, viewid: Ids) -> bool:
    """Whether a command's features hold the SIE fallback (its model's SIE lacks an id)."""
    return bool(cfg.MODEL.SIE_CAMERA and camid is None or cfg.MODEL.SIE_VIEW and viewid is None)


def list_sources(sources: Sequence[str], what: str) -> tuple[list[str], list[str]]:
    """The images of several files or folders, and each one's name below its folder.

    Args:
        sources: image files or folders (searched recursively).
        what: the argument's name for error messages (e.g. '--query').

    Returns:
        (absolute paths, names): a name is the path below the folder given (a file given itself:
        its file name); ``--camid-pattern`` / ``--viewid-pattern`` are matched on it.

    Raises:
        SearchError: see :func:`list_image_files`.
    """
    paths: list[str] = []
    names: list[str] = []
    for source in sources:
        found = list_image_files(source, what)
        root = Path(source).expanduser().resolve()
        paths += found
        names += [root.name if root.is_file() else os.path.relpath(f, root) for f in found]
    return paths, names


def feature_settings(cfg: CfgNode, weights_sha256: str, sie_fallback: bool) -> dict[str, Any]:
    """The settings that determine the features: ``FEATURE_KEYS`` and the weights.

    Args:
        cfg: the configuration.
        weights_sha256: hash of the weights file.
        sie_fallback: the features hold the SIE fallback (:func:`uses_sie_fallback`): then
            ``TEST.SIE_FALLBACK`` is recorded too.

    Returns:
        ``{key: value}`` (lists for list values) plus ``'weights_sha256'``.
    """
    out: dict[str, Any] = {}
    keys = FEATURE_KEYS + (("TEST.SIE_FALLBACK",) if sie_fallback else ())
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = list(node) if isinstance(node, (list, tuple)) else node
    out["weights_sha256"] = weights_sha256
    return out


def build_search_model(cfg: CfgNode, weights: str, num_views: int | None = None) -> ReIDModel:
    """Build the model of a config and load its trained weights, in eval mode on the CPU.

    The identity count and SIE table size are taken from the checkpoint (they only size layers
    that evaluation does not use, or the SIE table whose rows the ids index).

    Args:
        cfg: the configuration the weights were trained with.
        weights: checkpoint path (state dict or a dict with a 'model' entry).
        num_views: training views (``--num-views``), for the camera x view SIE only.

    Returns:
        The ``ReIDModel``.

    Raises:
        SearchError: missing weights.
    """
    try:
        return build_model_from_checkpoint(cfg, weights, num_views=num_views)
    except FileNotFoundError as err:
        raise SearchError(str(err)) from err


Ids = int | list[int] | None  # one id for every image, one per image, or none


def ids_from_names(names: Sequence[str], pattern: str, base: int, flag: str) -> list[int]:
    """One id per image: the number a regular expression's first group finds in its name.

    Args:
        names: the images' names below the folders given (:func:`list_sources`), so that a
            number in the folders above cannot match.
        pattern: the expression (``re.search`` in each name), e.g. ``'_c(\\d+)s'`` or
            ``'^cam(\\d+)/'`` for one folder per camera.
        base: subtracted from each number (1 for 1-based camera names such as Market-1501's).
        flag: the option, for messages.

    Returns:
        ``int(group 1) - base`` per name.

    Raises:
        SearchError: an invalid expression, one without a group, or a name it finds no number in.
    """
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise SearchError(f"{flag} {pattern!r} is not a regular expression: {err}") from err
    if rx.groups < 1:
        raise SearchError(
            f"{flag} {pattern!r} has no group: put the id's digits in parentheses, e.g. '_c(\\d+)s'"
        )
    ids = []
    for name in names:
        m = rx.search(name)
        if m is None or not (m.group(1) or "").isdecimal():
            raise SearchError(f"{flag} {pattern!r} finds no number in {name!r}")
        ids.append(int(m.group(1)) - base)
    return ids


def command_ids(args: argparse.Namespace, names: Sequence[str]) -> tuple[Ids, Ids]:
    """The camera and viewpoint ids of a command's images (see :func:`add_model_arguments`).

    Args:
        args: the parsed ``--camid`` / ``--viewid``, ``--camid-pattern`` / ``--viewid-pattern``
            and ``--camid-base`` / ``--viewid-base``.
        names: the images' names below their folders (:func:`list_sources`).

    Returns:
        (camera ids, viewpoint ids): each one int for all images, a list of one per image, or
        None (not given: the SIE fallback applies).

    Raises:
        SearchError: an id given both ways, a base without its pattern, or a pattern that does
            not fit (see :func:`ids_from_names`).
    """
    out: list[Ids] = []
    for kind in ("camid", "viewid"):
        value, pattern = getattr(args, kind), getattr(args, f"{kind}_pattern")
        base = getattr(args, f"{kind}_base")
        if pattern is None:
            if base:
                raise SearchError(f"--{kind}-base applies to --{kind}-pattern only; remove it")
            out.append(value)
        elif value is not None:
            raise SearchError(f"--{kind} and --{kind}-pattern are both given; use one")
        else:
            out.append(ids_from_names(names, pattern, base, f"--{kind}-pattern"))
    return out[0], out[1]


def check_sie_ids(cfg: CfgNode, model: ReIDModel, camid: Ids, viewid: Ids) -> None:
    """Check the camera / viewpoint ids of a command (:func:`command_ids`) against the SIE.

    Args:
        cfg: the configuration (``MODEL.SIE_CAMERA``, ``MODEL.SIE_VIEW``).
        model: the model (its SIE table sizes).
        camid: camera ids or None.
        viewid: viewpoint ids or None.

    Raises:
        SearchError: an id is out of range or given without its SIE, or the camera x viewpoint
            SIE has only one of its ids under the 'none' fallback.
    """
    if (
        cfg.MODEL.SIE_CAMERA
        and cfg.MODEL.SIE_VIEW
        and (camid is None) != (viewid is None)
        and cfg.TEST.SIE_FALLBACK == "none"
    ):
        raise SearchError(
            "the camera x viewpoint SIE needs both --camid and --viewid under TEST.SIE_FALLBACK "
            "none; pass both, neither, or the override TEST.SIE_FALLBACK mean"
        )
    for enabled, value, flag, key, count in (
        (cfg.MODEL.SIE_CAMERA, camid, "--camid", "MODEL.SIE_CAMERA", model.num_cameras),
        (cfg.MODEL.SIE_VIEW, viewid, "--viewid", "MODEL.SIE_VIEW", model.num_views),
    ):
        if value is None:
            continue
        if not enabled:
            used = f"{flag}-pattern" if isinstance(value, list) else flag
            raise SearchError(f"{used} is only used with {key} True; remove it")
        if isinstance(value, int) and not 0 <= value < count:
            raise SearchError(f"{flag} {value} is outside 0..{count - 1} (the SIE table's rows)")
        if isinstance(value, list) and value and not 0 <= min(value) <= max(value) < count:
            raise SearchError(
                f"{flag}-pattern gives ids {min(value)}..{max(value)} (after {flag}-base), "
                f"outside 0..{count - 1} (the SIE table's rows)"
            )


def compute_features(
    model: ReIDModel,
    cfg: CfgNode,
    paths: Sequence[str],
    device: torch.device,
    camid: Ids = None,
    viewid: Ids = None,
) -> torch.Tensor:
    """Evaluation features of image files: :class:`processor.extractor.FeatureExtractor`'s.

    Args:
        model: the ReID model (moved to ``device``).
        cfg: configuration (INPUT.SIZE_TEST/PIXEL_MEAN/PIXEL_STD, TEST.IMS_PER_BATCH,
            TEST.FEAT_NORM, TEST.FLIP_FEAT, DATALOADER.NUM_WORKERS and the SIE/precision keys).
        paths: N image files.
        device: where the model runs.
        camid: camera id of every image, or one per image (camera SIE only).
        viewid: viewpoint id(s), likewise (viewpoint SIE only).

    Returns:
        float32 [N, D] on the CPU, L2-normalised per row when ``TEST.FEAT_NORM``.

    Raises:
        SearchError: an image cannot be read (the message names it), or wrong SIE ids.
    """
    check_sie_ids(cfg, model, camid, viewid)
    extractor = build_feature_extractor(cfg, model, device)
    try:
        feats = extractor(list(paths), camids=camid, viewids=viewid)
    except CorruptImageError as err:
        raise SearchError(str(err).split(" Set DATASETS")[0]) from err
    return feats.cpu()


# ----------------------------------------------------------------------------------------------
# Ranking
# ----------------------------------------------------------------------------------------------


def rank_gallery(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    topk: int,
    metric: str = "cosine",
    gallery_chunk: int = GALLERY_CHUNK,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items per query, scored in memory-bounded blocks.

    The shared chunked top-k (:func:`utils.distance.chunked_topk`): each (query block x gallery
    chunk) is one matrix product, reduced to its top-k and merged with the earlier chunks', so
    memory stays bounded whatever the gallery size; equal scores rank by gallery index.

    Args:
        query_feats: [Q, D] (float16 or float32; scored in float32).
        gallery_feats: [N, D].
        topk: k; capped at N.
        metric: 'cosine' (features already L2-normalised: score = q . g, higher first) or
            'euclidean' (score = -|q - g|^2, i.e. smaller distance first).
        gallery_chunk: gallery rows scored at once.
        memory_budget_mb: working memory (MiB) of one block; sets the query rows per block.

    Returns:
        (scores float32 [Q, k], indices int64 [Q, k]), best first: cosine similarities, or
        negated squared Euclidean distances.
    """
    # Both distances are negated scores ('cosine': -q.g), so negation gives the scores exactly.
    dist, index = chunked_topk(
        query_feats,
        gallery_feats,
        topk,
        metric=metric,
        memory_budget_mb=memory_budget_mb,
        gallery_chunk=gallery_chunk,
    )
    return dist.neg_(), index


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def setup_command(args: argparse.Namespace) -> tuple[CfgNode, torch.device, str]:
    """The config, device and weights hash of a command that runs a trained model.

    Args:
        args: parsed arguments with ``config_file``, ``weights`` and ``opts`` (overrides).

    Returns:
        (config with the overrides, device of ``MODEL.DEVICE``, SHA-256 of the weights file).

    Raises:
        SearchError: the config or weights file does not exist.
    """
    if not os.path.isfile(args.config_file):
        raise SearchError(f"--config-file {args.config_file!r} does not exist")
    cfg = load_cfg(args.config_file, list(args.opts))
    device = resolve_device(cfg.MODEL.DEVICE)
    if not os.path.isfile(args.weights):
        raise SearchError(f"--weights {args.weights!r} does not exist")
    return cfg, device, sha256_file(args.weights)


def build_index(args: argparse.Namespace) -> dict[str, Any]:
    """``index``: extract the gallery features and save the index atomically.

    With ``--append`` and an existing ``--out``, only the folder's images the index does not
    hold yet are extracted and added (the index's model and feature settings must be the
    command's; images gone from the folder stay in it). The index keeps its precision and its
    kind of approximate index (rebuilt over all images) unless ``--dtype`` / ``--ann`` say
    otherwise; a differing ``--dtype`` is refused (the old features cannot be made exact).
    Without ``--out`` on disk, ``--append`` builds a new index.

    Args:
        args: parsed ``index`` arguments (config_file, weights, gallery, out, dtype, ann, append,
            the SIE ids, opts).

    Returns:
        The saved index: features [N, D] (float32 or float16), paths, settings, config,
        weights, model_name, feat_dim, metric, camid, viewid (as given: one id, a list of one
        per image, or None), version, and with an approximate index 'ann' ({'kind', 'params',
        'data': the serialised faiss index}).
    """
    cfg, device, sha = setup_command(args)
    old = load_index(args.out, "--out") if args.append and os.path.isfile(args.out) else None
    paths, names = list_sources([args.gallery], "--gallery")
    if old is not None:
        known = set(old["paths"])
        kept = [i for i, p in enumerate(paths) if p not in known]
        paths, names = [paths[i] for i in kept], [names[i] for i in kept]
    camid, viewid = command_ids(args, names)
    settings = feature_settings(cfg, sha, uses_sie_fallback(cfg, camid, viewid))
    dtype_name = args.dtype or "float32"
    ann = args.ann or "auto"
    total = len(paths)
    if old is not None:
        check_index(old, settings, args.out, "append")
        dtype_name = str(old["features"].dtype).removeprefix("torch.")
        if args.dtype not in (None, dtype_name):
            raise SearchError(
                f"--out {args.out!r} holds {dtype_name} features: --dtype {args.dtype} does not "
                "apply to --append (rebuild the index without --append to change it)"
            )
        if args.ann is None:
            ann = old["ann"]["kind"] if "ann" in old else "none"
        total += len(old["paths"])
        if not paths:
            logger.info("%s holds every image of %s already: unchanged", args.out, args.gallery)
            return old
    kind = _index_ann_kind(ann, total)
    if kind is not None and not faiss_available():  # before the extraction, not after
        raise SearchError(f"--ann {kind} needs faiss (pip install faiss-cpu); or use --ann none")
    logger.info("indexing %d gallery images of %s on %s", len(paths), args.gallery, device)
    model = build_search_model(cfg, args.weights, args.num_views).to(device)
    feats = compute_features(model, cfg, paths, device, camid, viewid)
    index = {
        "version": INDEX_VERSION,
        "features": feats.to(getattr(torch, dtype_name)),
        "paths": paths,
        "settings": settings,
        "config": cfg.dump(),
        "weights": os.path.abspath(args.weights),
        "model_name": cfg.MODEL.NAME,
        "feat_dim": int(feats.shape[1]),
        "metric": "cosine" if cfg.TEST.FEAT_NORM else "euclidean",
        "camid": camid,
        "viewid": viewid,
    }
    if old is not None:
        index = _appended(old, index)
    if kind is not None:
        params = AnnParams()
        built = _faiss_call(build_ann, index["features"], kind, index["metric"], params)
        index["ann"] = {"kind": kind, "params": params.as_dict(), "data": serialize_ann(built)}
    save_checkpoint(index, args.out)
    n, dim = index["features"].shape
    logger.info("index of %d x %d features written to %s", n, dim, args.out)
    return index


def _appended(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """An index holding ``old``'s images then ``new``'s (same model, settings and precision)."""

    def per_image(ids: Ids, n: int) -> list[int | None]:
        return list(ids) if isinstance(ids, list) else [ids] * n

    n_old, n_new = len(old["paths"]), len(new["paths"])
    out = {**new, "features": torch.cat([old["features"], new["features"]])}
    out["paths"] = old["paths"] + new["paths"]
    out["settings"] = {**new["settings"], **old["settings"]}  # the fallback, if either used it
    for key in ("camid", "viewid"):
        ids = per_image(old[key], n_old) + per_image(new[key], n_new)
        out[key] = ids[0] if len(set(ids)) == 1 else ids  # one id (or None) for all stays one
    return out


def _faiss_call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except MissingDependencyError as err:
        raise SearchError(f"{err}; or use --ann exact (auto without faiss)") from err


def _index_ann_kind(ann: str, n: int) -> str | None:
    """The ANN index 'index --ann' builds for ``n`` images, or None."""
    if ann == "auto":
        if n < ANN_AUTO_MIN:
            return None
        if not faiss_available():
            logger.info(
                "%d gallery images: install faiss (pip install faiss-cpu) for approximate "
                "search; exact ranking is used",
                n,
            )
            return None
        return ANN_AUTO_KIND
    return None if ann == "none" else ann


def search_gallery(
    index: dict[str, Any],
    query_feats: torch.Tensor,
    topk: int,
    ann: str = "auto",
    ef_search: int | None = None,
    nprobe: int | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Rank an index's gallery for queries, exactly or with an approximate (faiss) index.

    Args:
        index: a loaded index (features, metric, optional stored 'ann').
        query_feats: [Q, D] query features.
        topk: items per query.
        ann: 'auto' (the stored ANN index if any, else exact), 'exact', 'hnsw' or 'ivf' (the
            stored index of that kind, else one built now).
        ef_search: HNSW candidates per query (None: as built).
        nprobe: IVF cells scanned per query (None: as built).
        device: where exact ranking runs (default CPU).

    Returns:
        (scores float32 [Q, k], gallery indices int64 [Q, k] (-1 where an approximate search
        found fewer than k), the method used: 'exact', 'hnsw' or 'ivf').

    Raises:
        SearchError: an approximate method without faiss installed.
    """
    stored = index.get("ann")
    kind = ann if ann != "auto" else (stored["kind"] if stored else "exact")
    if kind == "exact":
        device = device or torch.device("cpu")
        gf = index["features"].to(device)
        scores, idx = rank_gallery(query_feats.to(device), gf, topk, index["metric"])
        return scores.cpu(), idx.cpu(), kind
    if stored is not None and stored["kind"] == kind:
        faiss_index = _faiss_call(deserialize_ann, stored["data"], ef_search, nprobe)
    else:
        params = AnnParams()
        faiss_index = _faiss_call(build_ann, index["features"], kind, index["metric"], params)
        set_search_params(faiss_index, ef_search, nprobe)
    scores, idx = ann_search(faiss_index, query_feats, topk)
    return scores, idx, kind


def load_index(path: str, flag: str = "--index") -> dict[str, Any]:
    """Read an index written by ``index``.

    Args:
        path: the index file.
        flag: the option that named it, for messages.

    Returns:
        The index dict.

    Raises:
        SearchError: the file is missing or is not a search index.
        utils.checkpoint.CheckpointFormatError: the file is not readable as plain data.
    """
    if not os.path.isfile(path):
        raise SearchError(f"{flag} {path!r} does not exist (build it with the 'index' command)")
    index = read_checkpoint(path, flag, "a search index written by the 'index' command")
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        raise SearchError(f"{flag} {path!r} is not a search index of version {INDEX_VERSION}")
    return index


def check_index(
    index: dict[str, Any], settings: dict[str, Any], path: str, command: str = "query"
) -> None:
    """Refuse an index whose feature settings differ from a command's.

    Args:
        index: the loaded index.
        settings: :func:`feature_settings` of the command.
        path: the index path (for the message).
        command: what the command is, for the message ('query', 'append').

    ``TEST.SIE_FALLBACK`` is compared only when both sides used the fallback (with its ids an
    image's feature is the same whatever the fallback).

    Raises:
        SearchError: naming every differing key with both values.
    """
    built = index["settings"]
    diffs = [
        f"{key}: index {built.get(key)!r}, {command} {value!r}"
        for key, value in settings.items()
        if built.get(key) != value and (key in built or key != "TEST.SIE_FALLBACK")
    ]
    if diffs:
        raise SearchError(
            f"index {path!r} was built with another model or config than this {command} "
            f"(index weights {index.get('weights')!r}); its features are not comparable. "
            "Differences:\n- " + "\n- ".join(diffs) + "\nRebuild the index or pass the "
            "--config-file, --weights and overrides it was built with."
        )


def run_query(args: argparse.Namespace) -> dict[str, Any]:
    """``query``: rank the indexed gallery for each query image; write results.json (+ PNGs).

    Args:
        args: parsed ``query`` arguments (index, config_file, weights, query, topk, out,
            visualize, tile_size, ann, nprobe, ef_search, camid, viewid, opts).

    Returns:
        The results.json content: metric, search (the method used), topk, index, and per
        query its ranked hits
        (rank, path, similarity, distance, gallery_index).
    """
    index = load_index(args.index)
    cfg, device, sha = setup_command(args)
    if args.topk < 1:
        raise SearchError(f"--topk must be positive, got {args.topk}")
    paths, names = list_sources(args.query, "--query")
    camid, viewid = command_ids(args, names)
    fallback = uses_sie_fallback(cfg, camid, viewid)
    check_index(index, feature_settings(cfg, sha, fallback), args.index)
    model = build_search_model(cfg, args.weights, args.num_views).to(device)
    qf = compute_features(model, cfg, paths, device, camid, viewid)
    metric = index["metric"]
    scores, idx, method = search_gallery(
        index, qf, args.topk, args.ann, args.ef_search, args.nprobe, device
    )
    os.makedirs(args.out, exist_ok=True)
    gallery = index["paths"]
    results = []
    for qi, qpath in enumerate(progress(paths, total=len(paths), desc="queries")):
        hits = []
        for r, (s, g) in enumerate(zip(scores[qi].tolist(), idx[qi].tolist(), strict=True)):
            if g < 0:  # an approximate search found fewer than k items
                break
            if metric == "cosine":
                sim, dist = s, 2.0 - 2.0 * s
            else:
                sim, dist = None, -s
            hits.append(
                {"rank": r + 1, "path": gallery[g], "gallery_index": g, "similarity": sim,
                 "distance": dist}
            )  # fmt: skip
        entry: dict[str, Any] = {"query": qpath, "results": hits}
        if args.visualize:
            name = f"{qi:04d}_{Path(qpath).stem}.png"
            key = "similarity" if metric == "cosine" else "distance"
            render_ranking(qpath, hits, tuple(args.tile_size), key).save(
                os.path.join(args.out, name)
            )
            entry["visualization"] = name
        results.append(entry)
    out = {
        "index": os.path.abspath(args.index),
        "weights": os.path.abspath(args.weights),
        "metric": metric,
        "search": method,
        "topk": min(args.topk, len(gallery)),
        "num_gallery": len(gallery),
        "queries": results,
    }
    write_json(os.path.join(args.out, "results.json"), out)
    logger.info("ranked %d queries; results in %s", len(paths), args.out)
    return out


def add_model_arguments(parser: argparse.ArgumentParser, sie: bool = True) -> None:
    """The arguments of a command that runs a trained model (see :func:`setup_command`).

    Args:
        parser: the command's parser.
        sie: also the SIE ids of the images (folders carry none): ``--camid`` / ``--viewid``
            (one for all), ``--camid-pattern`` / ``--viewid-pattern`` with ``--camid-base`` /
            ``--viewid-base`` (one per image, from its path; see :func:`command_ids`).
    """
    add_config_argument(parser, required=True)
    parser.add_argument("--weights", required=True, help="trained checkpoint (.pth)")
    add_num_views_argument(parser)
    if sie:
        for kind, what in (("camid", "camera"), ("viewid", "viewpoint")):
            parser.add_argument(
                f"--{kind}",
                type=int,
                default=None,
                help=f"{what} id of every image ({what} SIE; default: the SIE fallback)",
            )
            parser.add_argument(
                f"--{kind}-pattern",
                default=None,
                metavar="REGEX",
                help=f"{what} id of each image: the number REGEX's first group finds in its path "
                f"below the folder given, minus --{kind}-base",
            )
            parser.add_argument(
                f"--{kind}-base",
                type=int,
                default=0,
                help=f"subtracted from the numbers --{kind}-pattern finds (1 for 1-based names)",
            )


def _parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.split("\n\n")[0], prog="python -m tools.search", config=None)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_model_arguments(common)

    p = sub.add_parser(
        "index", parents=[common], help="build a gallery feature index", epilog=OVERRIDES_HELP
    )
    p.add_argument("--gallery", required=True, help="folder of gallery images (recursive)")
    p.add_argument("--out", required=True, help="index file to write (e.g. gallery_index.pt)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default=None,
        help="stored feature precision (default float32; --append: the index's); float16 "
        "halves the file, ranks are scored in float32",
    )
    p.add_argument(
        "--ann",
        choices=("auto", "none", *ANN_KINDS),
        default=None,
        help="also store an approximate index (needs faiss); auto (default; --append: the "
        f"index's kind): {ANN_AUTO_KIND} from {ANN_AUTO_MIN} images on when faiss is installed",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add the folder's images that --out does not hold yet to it (same model and "
        "settings; the others are not extracted again; without --out: a new index)",
    )
    q = sub.add_parser(
        "query",
        parents=[common],
        help="rank the indexed gallery for queries",
        epilog=OVERRIDES_HELP,
    )
    q.add_argument("--index", required=True, help="index written by the 'index' command")
    q.add_argument(
        "--query",
        required=True,
        action="append",
        help="query image or folder (recursive); repeat the flag for several",
    )
    q.add_argument("--topk", type=int, default=10, help="gallery images kept per query")
    q.add_argument("--out", required=True, help="folder for results.json and the PNGs")
    q.add_argument("--visualize", action="store_true", help="one PNG per query (query + top-k)")
    q.add_argument(
        "--ann",
        choices=("auto", "exact", *ANN_KINDS),
        default="auto",
        help="ranking: auto (the index's approximate index if stored, else exact), exact, or "
        "an approximate index (stored, or built for this command; needs faiss)",
    )
    q.add_argument("--nprobe", type=int, default=None, help="IVF cells scanned per query")
    q.add_argument(
        "--ef-search", type=int, default=None, help="HNSW candidates per query (default: as built)"
    )
    q.add_argument(
        "--tile-size",
        type=int,
        nargs=2,
        default=(256, 128),
        metavar=("H", "W"),
        help="size of each image tile in the PNGs",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``index`` or ``query``.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``); ``KEY VALUE``
            config overrides may come anywhere.

    Returns:
        The saved index (``index``) or the results.json content (``query``).

    Raises:
        SearchError: a bad folder, image, index or option (the message names it); see also
            :func:`utils.cli.run_main` for the other user errors.
    """
    args, opts = parse_args(_parser(), argv)
    args.opts = opts
    setup_logger(args.out if args.command == "query" else None, 0, "search_log.txt")
    return build_index(args) if args.command == "index" else run_query(args)


if __name__ == "__main__":
    run_main(main)
