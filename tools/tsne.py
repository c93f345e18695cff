"""t-SNE of a trained model's image features with its text features or identity centroids.

Examples (from the repository root)::

    python -m tools.tsne --config-file RUN/config.yaml --weights RUN/ViT-B-16_60.pth \
        --num-ids 10 --out tsne.png
    python -m tools.tsne --config-file RUN/config.yaml --weights RUN/ViT-B-16_60.pth \
        --pids 0 5 17 --anchors centroids --out tsne_centroids.png

The training images of N identities (``--pids`` chosen by their training label 0..C-1, or
``--num-ids`` drawn at random with ``--seed``) are encoded with the test transform, and their
features embedded in 2-D by scikit-learn's t-SNE together with one anchor per identity, as in
CLIP-ReID's Fig. 1:

* ``text``: the identity's learned text feature (``encode_text`` of its prompt), beside the image
  features ``f_proj`` in the shared image-text space (CLIP-ReID models);
* ``centroids``: the identity centroid of the evaluation features, normalised mean of the
  normalised features, as PCL-CLIP rebuilds its memory (any model).

Every row is L2-normalised first: the losses and the retrieval compare directions. ``auto`` picks
``text`` when the model has a text side, else ``centroids``. The dataset comes from the config
(``DATASETS.NAMES``, ``DATASETS.ROOT_DIR``); override them as ``KEY VALUE`` pairs if it moved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datasets.build import build_datasets
from datasets.image_dataset import ImageDataset, collate_batch
from datasets.transforms import build_transforms
from loss.pcl import pid_centroids
from processor.evaluate import EvalSettings, build_eval_settings, extract_features
from tools.search import SearchError, add_model_arguments, build_search_model, setup_command
from utils.checkpoint import atomic_write
from utils.cli import make_parser, parse_args, run_main
from utils.logger import setup_logger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

ANCHORS = ("auto", "text", "centroids")
# Images drawn per identity at most by default (the figure stays readable).
DEFAULT_MAX_PER_ID = 30


@dataclass(frozen=True)
class TsneInputs:
    """The rows embedded by t-SNE: image features, then one anchor per identity.

    Attributes:
        feats: float32 [N, D] L2-normalised image features.
        pids: int64 [N] training labels of the images.
        paths: N image files.
        anchors: float32 [n, D] L2-normalised text features or centroids.
        anchor_pids: int64 [n] their identities (sorted).
        kind: 'text' or 'centroids'.
    """

    feats: np.ndarray
    pids: np.ndarray
    paths: list[str]
    anchors: np.ndarray
    anchor_pids: np.ndarray
    kind: str

    def matrix(self) -> np.ndarray:
        """[N + n, D]: the image features then the anchors (the t-SNE input)."""
        return np.concatenate([self.feats, self.anchors], axis=0)


class _ProjEncoder(nn.Module):
    """A ReID model seen through ``encode_image`` = its projected feature ``f_proj`` (with SIE).

    The text features live in this space; wrapping the model lets the one inference path
    (:func:`processor.evaluate.extract_features`) extract it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_image(
        self, images: Tensor, camids: Tensor | None = None, viewids: Tensor | None = None
    ) -> Tensor:
        return self.model.image_features(images, camids, viewids).proj


def select_pids(
    available: Sequence[int], pids: Sequence[int] | None, num_ids: int, seed: int
) -> np.ndarray:
    """The identities to draw: the chosen ones, or ``num_ids`` at random.

    Args:
        available: training labels present in the train set.
        pids: chosen labels, or None.
        num_ids: how many to draw when ``pids`` is None.
        seed: seed of the draw.

    Returns:
        int64 sorted unique labels.

    Raises:
        SearchError: a chosen label is not a training label, or ``num_ids`` is out of range.
    """
    have = np.unique(np.asarray(available, dtype=np.int64))
    if pids:
        chosen = np.unique(np.asarray(pids, dtype=np.int64))
        missing = np.setdiff1d(chosen, have)
        if missing.size:
            raise SearchError(
                f"--pids {missing.tolist()} are not training labels (0..{int(have.max())})"
            )
        return chosen
    if not 1 <= num_ids <= have.size:
        raise SearchError(f"--num-ids must be in 1..{have.size} (training identities)")
    return np.sort(np.random.default_rng(seed).choice(have, size=num_ids, replace=False))


def tsne_inputs(
    model: nn.Module,
    loader: DataLoader,
    anchors: str,
    device: torch.device,
    settings: EvalSettings,
) -> TsneInputs:
    """Extract the image features of a loader's images and the anchors of their identities.

    Args:
        model: the ReID model (eval mode).
        loader: the chosen training images (test transform), batches with ``pids``.
        anchors: 'text' (image ``f_proj`` and text features) or 'centroids' (evaluation
            features and their identity centroids).
        device: where the model runs.
        settings: evaluation settings (precision of the extraction).

    Returns:
        The :class:`TsneInputs`.
    """
    encoder = _ProjEncoder(model) if anchors == "text" else model
    found = extract_features(encoder, loader, device, settings)
    feats = F.normalize(found.feats.float(), dim=1)
    pids = torch.as_tensor(found.pids, device=feats.device)
    uniq = torch.unique(pids)
    if anchors == "text":
        with torch.no_grad():
            anchor = F.normalize(model.encode_text(uniq.to(device)).float(), dim=1)
    else:
        # Labels 0..n-1 for the chosen identities (pid_centroids wants dense labels).
        anchor = pid_centroids(feats, torch.searchsorted(uniq, pids), len(uniq))
    return TsneInputs(
        feats.cpu().numpy(),
        found.pids.astype(np.int64),
        list(found.paths),
        anchor.cpu().numpy(),
        uniq.cpu().numpy().astype(np.int64),
        anchors,
    )


def embed_tsne(x: np.ndarray, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """2-D t-SNE embedding (scikit-learn, PCA initialisation, fixed seed).

    Args:
        x: [M, D] rows.
        seed: ``random_state``.
        perplexity: default ``min(30, (M - 1) / 3)`` (it must stay below M).

    Returns:
        float [M, 2].
    """
    from sklearn.manifold import TSNE

    m = x.shape[0]
    perplexity = perplexity or max(1.0, min(30.0, (m - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(x.astype(np.float32))


def tsne_figure(inputs: TsneInputs, coords: np.ndarray, title: str = "") -> Figure:
    """Scatter of the embedded rows: dots per image and a star per anchor, one colour per ID.

    Args:
        inputs: the rows' labels (``coords`` row i is ``inputs.matrix()`` row i).
        coords: [N + n, 2].
        title: figure title.

    Returns:
        A matplotlib ``Figure``; axis collection 2k holds the images of the k-th identity, 2k + 1
        its anchor.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    n_img = len(inputs.feats)
    img_xy, anchor_xy = coords[:n_img], coords[n_img:]
    fig = Figure(figsize=(6.4, 5.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["tab20" if len(inputs.anchor_pids) > 10 else "tab10"]
    anchor_label = "text feature" if inputs.kind == "text" else "identity centroid"
    for k, pid in enumerate(inputs.anchor_pids.tolist()):
        colour = cmap(k % cmap.N)
        rows = inputs.pids == pid
        ax.scatter(*img_xy[rows].T, s=14, color=colour, alpha=0.75, label=f"ID {pid}")
        ax.scatter(*anchor_xy[k : k + 1].T, s=220, marker="*", color=colour, edgecolors="black")
    ax.scatter([], [], s=120, marker="*", color="white", edgecolors="black", label=anchor_label)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best", ncol=2 if len(inputs.anchor_pids) > 8 else 1)
    ax.set_title(title or f"t-SNE of image features (dots) and {anchor_label}s (stars)", fontsize=9)
    return fig


def _parser():
    parser = make_parser(__doc__.split("\n\n")[0], prog="python -m tools.tsne", config=None)
    add_model_arguments(parser, sie=False)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-ids", type=int, default=10, help="identities drawn at random")
    group.add_argument(
        "--pids", type=int, nargs="+", default=None, help="chosen training labels (0..C-1)"
    )
    parser.add_argument("--anchors", choices=ANCHORS, default="auto", help="see the description")
    parser.add_argument(
        "--max-per-id", type=int, default=DEFAULT_MAX_PER_ID, help="images per identity at most"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws and of t-SNE")
    parser.add_argument("--perplexity", type=float, default=None, help="t-SNE perplexity")
    parser.add_argument("--out", required=True, metavar="PNG", help="PNG to write")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Embed and draw the features of N identities.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``); ``KEY VALUE`` config
            overrides may come anywhere.

    Returns:
        ``{"out": PNG path, "inputs": TsneInputs, "coords": [N + n, 2]}``.

    Raises:
        SearchError: an unusable option, or text anchors for a model without a text side.
    """
    args, opts = parse_args(_parser(), argv)
    args.opts = opts
    setup_logger(None)
    if args.max_per_id < 1:
        raise SearchError("--max-per-id must be positive")
    cfg, device, _ = setup_command(args)
    model = build_search_model(cfg, args.weights, args.num_views).to(device)
    anchors = args.anchors
    if anchors == "auto":
        anchors = "text" if model.has_text else "centroids"
    if anchors == "text" and not model.has_text:
        raise SearchError(
            f"--anchors text needs a model with learned text features; MODEL.METHOD "
            f"{cfg.MODEL.METHOD!r} has none: use --anchors centroids"
        )
    dataset, _ = build_datasets(cfg)
    train = list(dataset.train)
    pids = select_pids([r.pid for r in train], args.pids, args.num_ids, args.seed)
    rng = np.random.default_rng(args.seed)
    records = []
    for pid in pids.tolist():
        mine = [r for r in train if r.pid == pid]
        if len(mine) > args.max_per_id:
            keep = np.sort(rng.choice(len(mine), size=args.max_per_id, replace=False))
            mine = [mine[i] for i in keep]
        records += mine
    _, test_tf = build_transforms(cfg)
    loader = DataLoader(
        ImageDataset(records, test_tf, skip_corrupt=False),
        batch_size=int(cfg.TEST.IMS_PER_BATCH),
        shuffle=False,
        num_workers=min(int(cfg.DATALOADER.NUM_WORKERS), max(1, len(records) // 64)),
        collate_fn=collate_batch,
    )
    inputs = tsne_inputs(model, loader, anchors, device, build_eval_settings(cfg))
    coords = embed_tsne(inputs.matrix(), args.seed, args.perplexity)
    fig = tsne_figure(inputs, coords)
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, format="png"))
    logger.info(
        "t-SNE of %d images of %d identities with %s written to %s",
        len(records),
        len(pids),
        anchors,
        args.out,
    )
    print(args.out)
    return {"out": args.out, "inputs": inputs, "coords": coords}


if __name__ == "__main__":
    run_main(main)
