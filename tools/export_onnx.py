"""Export a trained ReID model's image encoder (the evaluation feature) to ONNX.

Usage (from the repository root):
    python -m tools.export_onnx --config-file RUN/config.yaml --weights RUN/ViT-B-16_60.pth \
        --out model.onnx [--opset 17] [--batch dynamic|N] [--normalize|--no-normalize] \
        [--verify] [KEY VALUE ...]

The exported graph takes ``images`` float32 [B, 3, H, W] at ``INPUT.SIZE_TEST``, preprocessed as
the test transform does (RGB, bilinear resize, ``(x / 255 - PIXEL_MEAN) / PIXEL_STD``), and returns
``feats`` float32 [B, D + E]: the evaluator's feature (``processor.evaluate.encode_batch``:
``ReIDModel.encode_image`` in eval mode, averaged with the mirrored image's with
``TEST.FLIP_FEAT``), L2-normalised per row when normalisation is on (default: ``TEST.FEAT_NORM``,
as the evaluator compares features). With SIE
(``MODEL.SIE_CAMERA`` / ``MODEL.SIE_VIEW``) the graph also takes ``camids`` and/or ``viewids``
int64 [B] (0-based, the training dataset's numbering); with ``--no-sie-inputs`` it takes images
only and adds the ``TEST.SIE_FALLBACK`` vector (for deployments that do not know the camera).

The preprocessing and output description is written to ``OUT.json`` next to the model and, when
the ``onnx`` package is installed, into the model's ``metadata_props`` (values JSON-encoded).

Only torch is needed to export: the TorchScript-based exporter (``dynamo=False``) is used because
the dynamo exporter needs the extra ``onnxscript`` package. ``--verify`` runs the exported model
with onnxruntime (``pip install onnxruntime``) on random inputs of batch 1 and 3 and fails when its
output differs from the features of :class:`processor.extractor.FeatureExtractor` (the evaluator's,
with the export's normalisation) by more than ``--atol`` (relative to the feature scale).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from yacs.config import CfgNode

from configs.config import load_cfg
from model.loading import build_model_from_checkpoint
from model.reid_model import ReIDModel
from processor.evaluate import EvalSettings, encode_batch
from processor.extractor import FeatureExtractor, build_feature_extractor
from utils.checkpoint import write_json
from utils.cli import UsageError, add_num_views_argument, make_parser, parse_args, run_main
from utils.logger import setup_logger

__all__ = [
    "EncoderForExport",
    "export_metadata",
    "export_onnx",
    "main",
    "sidecar_path",
    "verify_onnx",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # LayerNormalization is a native op from 17; supported by current runtimes
DEFAULT_ATOL = 1e-4
INPUT_NAME = "images"
OUTPUT_NAME = "feats"
ORT_INSTALL = "pip install onnxruntime"


class EncoderForExport(nn.Module):
    """Wraps a ``ReIDModel`` so that ``forward`` is the evaluation feature, ready for export.

    Args:
        model: the ReID model (put in eval mode here: BNNecks use running statistics).
        normalize: L2-normalise each output row (``x / max(|x|, 1e-12)``, as the evaluator).
        flip_feat: average with the mirrored image's feature (``TEST.FLIP_FEAT``).
        sie_fallback: None: the SIE ids are graph inputs; else no id inputs, and the graph adds
            this fallback's SIE vector (one of ``SIE_FALLBACKS``; see ``ReIDModel.sie_vectors``).

    Attributes:
        sie_inputs: names of the id inputs after ``images``: ``()``, ``('camids',)``,
            ``('viewids',)`` or ``('camids', 'viewids')``, following the model's SIE flags.
    """

    def __init__(
        self,
        model: ReIDModel,
        normalize: bool,
        flip_feat: bool = False,
        sie_fallback: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.normalize = bool(normalize)
        # The evaluator's batch call in float32 (the graph runs in the precision it is given).
        self.settings = EvalSettings(
            feat_norm=self.normalize,
            max_rank=1,
            memory_mb=1,
            rerank=None,
            amp_dtype="fp32",
            flip_feat=bool(flip_feat),
            sie_fallback=sie_fallback or "none",
        )
        names = []
        if sie_fallback is None and model.cv_embed is not None and model.sie_camera:
            names.append("camids")
        if sie_fallback is None and model.cv_embed is not None and model.sie_view:
            names.append("viewids")
        self.sie_inputs: tuple[str, ...] = tuple(names)

    def forward(self, images: Tensor, *ids: Tensor) -> Tensor:
        """The evaluation feature.

        Args:
            images: float32 [B, 3, H, W], normalised as the test transform does.
            *ids: int64 [B] id tensors in the order of ``sie_inputs``.

        Returns:
            float32 [B, D + E], unit rows when ``normalize``.
        """
        if len(ids) != len(self.sie_inputs):
            raise ValueError(f"expected id inputs {self.sie_inputs}, got {len(ids)} tensors")
        named = dict(zip(self.sie_inputs, ids, strict=True))
        cams, views = named.get("camids"), named.get("viewids")
        feats = encode_batch(self.model, images, cams, views, self.settings)
        if self.normalize:
            feats = F.normalize(feats, dim=1)
        return feats


def sidecar_path(onnx_path: str | Path) -> Path:
    """Path of the JSON description written next to an exported model.

    Args:
        onnx_path: the ONNX file, e.g. ``model.onnx``.

    Returns:
        ``model.onnx.json``.
    """
    path = Path(onnx_path)
    return path.with_name(path.name + ".json")


def export_metadata(
    cfg: CfgNode,
    model: ReIDModel,
    *,
    normalize: bool,
    batch: int | None,
    opset: int,
    sie_inputs: Sequence[str],
    flip_feat: bool = False,
    sie_fallback: str | None = None,
) -> dict[str, Any]:
    """The description a deployment needs: preprocessing, inputs, output.

    Args:
        cfg: the configuration (INPUT.SIZE_TEST, INPUT.PIXEL_MEAN, INPUT.PIXEL_STD, MODEL.*).
        model: the exported model.
        normalize: whether the output rows are L2-normalised.
        batch: fixed batch size, or None for a dynamic batch axis.
        opset: ONNX opset version.
        sie_inputs: names of the int64 [B] id inputs.
        flip_feat: the graph averages each image's feature with its mirror image's.
        sie_fallback: the SIE fallback built into a graph without id inputs, or None.

    Returns:
        A JSON-serialisable dict.
    """
    size = [int(v) for v in cfg.INPUT.SIZE_TEST]
    return {
        "model_name": cfg.MODEL.NAME,
        "method": cfg.MODEL.METHOD,
        "input_name": INPUT_NAME,
        "input_size": size,
        "input_layout": "NCHW, RGB, float32",
        "resize": "bilinear (antialiased) to input_size",
        "pixel_scale": 1.0 / 255.0,
        "pixel_mean": [float(v) for v in cfg.INPUT.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg.INPUT.PIXEL_STD],
        "preprocess": "(rgb_uint8 / 255 - pixel_mean) / pixel_std",
        "batch": "dynamic" if batch is None else int(batch),
        "sie_inputs": list(sie_inputs),
        "sie_fallback": sie_fallback,
        "sie_camera": bool(model.sie_camera and model.cv_embed is not None),
        "sie_view": bool(model.sie_view and model.cv_embed is not None),
        "num_cameras": model.num_cameras,
        "num_views": model.num_views,
        "output_name": OUTPUT_NAME,
        "feature_dim": model.feat_dim,
        "feature_norm": bool(normalize),
        "neck_feat": model.neck_feat,
        "flip_feat": bool(flip_feat),
        "distance": "cosine (dot product of normalised rows)"
        if normalize
        else "euclidean, or cosine after L2 normalisation (TEST.FEAT_NORM)",
        "opset": int(opset),
        "torch_version": torch.__version__,
    }


def _example_inputs(
    wrapper: EncoderForExport, batch: int, seed: int = 0, size: Sequence[int] | None = None
) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    h, w = wrapper.model.image_encoder.image_size if size is None else size
    images = torch.randn(batch, 3, h, w, generator=gen)
    model = wrapper.model
    highs = {"camids": max(model.num_cameras, 1), "viewids": max(model.num_views, 1)}
    ids = [
        torch.randint(0, highs[name], (batch,), generator=gen, dtype=torch.int64)
        for name in wrapper.sie_inputs
    ]
    return (images, *ids)


def _write_onnx_metadata(path: Path, metadata: Mapping[str, Any]) -> bool:
    try:
        import onnx
    except ImportError:
        logger.info("onnx package not installed: metadata only in %s", sidecar_path(path))
        return False
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))
    return True


def export_onnx(
    model: ReIDModel,
    out: str | Path,
    metadata_cfg: CfgNode,
    *,
    normalize: bool,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    flip_feat: bool = False,
    sie_fallback: str | None = None,
) -> dict[str, Any]:
    """Export the evaluation feature of a model to ONNX, with its metadata.

    Args:
        model: the ReID model (eval mode is set here).
        out: destination ``.onnx`` path (its folder is created).
        metadata_cfg: the configuration, for the preprocessing metadata.
        normalize: L2-normalise the output rows.
        batch: fixed batch size, or None for a dynamic batch axis.
        opset: ONNX opset version.
        flip_feat: average each image's feature with its mirror image's (``TEST.FLIP_FEAT``).
        sie_fallback: None: SIE ids are graph inputs; else images only, with this SIE fallback.

    Returns:
        The metadata written to ``sidecar_path(out)`` (and to the model when onnx is installed).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = EncoderForExport(model, normalize, flip_feat, sie_fallback).eval()
    example = _example_inputs(wrapper, batch or 2)
    names = [INPUT_NAME, *wrapper.sie_inputs]
    dynamic_axes = None
    if batch is None:
        dynamic_axes = {name: {0: "batch"} for name in [*names, OUTPUT_NAME]}
    # nn.MultiheadAttention's fused inference kernel has no ONNX symbolic: trace the plain ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The size checks read H and W as Python ints: fixed by design (INPUT.SIZE_TEST).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript exporter is chosen on purpose (see the module docstring).
            warnings.filterwarnings("ignore", ".*TorchScript-based ONNX", DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(
                wrapper,
                example,
                str(out),
                input_names=names,
                output_names=[OUTPUT_NAME],
                opset_version=int(opset),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                dynamo=False,  # the TorchScript exporter needs no package beyond torch
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    metadata = export_metadata(
        metadata_cfg,
        model,
        normalize=normalize,
        batch=batch,
        opset=opset,
        sie_inputs=wrapper.sie_inputs,
        flip_feat=flip_feat,
        sie_fallback=sie_fallback if model.cv_embed is not None else None,
    )
    in_model = _write_onnx_metadata(out, metadata)
    side = sidecar_path(out)
    write_json(side, metadata)
    logger.info(
        "Exported %s (%d-d feature%s, inputs %s, batch %s) to %s; metadata in %s%s",
        metadata["model_name"],
        metadata["feature_dim"],
        ", L2-normalised" if normalize else "",
        names,
        metadata["batch"],
        out,
        side,
        " and the model's metadata_props" if in_model else "",
    )
    return metadata


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise UsageError(
            f"--verify needs onnxruntime, which is not installed: run `{ORT_INSTALL}`"
        ) from err
    return onnxruntime


def verify_onnx(
    extractor: FeatureExtractor,
    onnx_path: str | Path,
    *,
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
    sie_inputs: bool = True,
) -> dict[int, float]:
    """Run the exported model with onnxruntime and compare with the extractor's features.

    The reference is :class:`processor.extractor.FeatureExtractor` on the same preprocessed
    inputs: the evaluator's feature with the extractor's settings (its ``feat_norm`` should be
    the export's normalisation, its ``flip_feat`` the export's flip).

    Args:
        extractor: the feature extractor of the exported model (on the CPU).
        onnx_path: the ONNX file.
        batch_sizes: batch sizes to try (a fixed-batch export accepts only its own).
        seed: seed of the random images and ids.
        sie_inputs: the graph takes the SIE ids (else the extractor's fallback is the reference).

    Returns:
        ``{batch: max |onnx - torch| / max(1, max |torch|)}`` (absolute error for features of
        unit scale, relative for larger ones).

    Raises:
        utils.cli.UsageError: onnxruntime is not installed (the message gives the pip command).
    """
    ort = _require_onnxruntime()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    fallback = None if sie_inputs else extractor.settings.sie_fallback
    wrapper = EncoderForExport(extractor.model, extractor.settings.feat_norm, sie_fallback=fallback)
    names = [INPUT_NAME, *wrapper.sie_inputs]
    errors = {}
    for b in batch_sizes:
        inputs = _example_inputs(wrapper, int(b), seed + int(b), extractor.input_size)
        named = dict(zip(wrapper.sie_inputs, inputs[1:], strict=True))
        ref = extractor(inputs[0], named.get("camids"), named.get("viewids"))
        got = session.run(
            [OUTPUT_NAME], {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
        )[0]
        diff = (torch.from_numpy(got) - ref.cpu()).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        errors[int(b)] = diff / scale
        logger.info("verify batch %d: max abs difference %.3g (feature scale %.3g)", b, diff, scale)
    return errors


def _parse_batch(value: str) -> int | None:
    if value == "dynamic":
        return None
    try:
        batch = int(value)
    except ValueError:
        batch = 0
    if batch < 1:
        raise argparse.ArgumentTypeError(f"--batch must be 'dynamic' or a positive int: {value!r}")
    return batch


def _parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "Export a ReID model's image encoder (evaluation feature) to ONNX.",
        prog="python -m tools.export_onnx",
    )
    parser.add_argument("--weights", required=True, help="trained checkpoint (.pth)")
    parser.add_argument("--out", required=True, help="destination .onnx file")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument(
        "--batch",
        type=_parse_batch,
        default=None,
        help="'dynamic' (default) batch axis or a fixed batch size",
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise the output rows (default: TEST.FEAT_NORM)",
    )
    add_num_views_argument(parser)
    parser.add_argument(
        "--sie-inputs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SIE models: camids/viewids are graph inputs (default); --no-sie-inputs: images "
        "only, with the TEST.SIE_FALLBACK vector",
    )
    parser.add_argument(
        "--verify", action="store_true", help=f"check with onnxruntime ({ORT_INSTALL})"
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help="--verify tolerance on max |onnx - torch| / max(1, max |torch|)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the metadata (plus ``verify_max_diff`` with --verify).

    Logging is set up by the program entry (``python -m tools.export_onnx``), not here.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``); ``KEY VALUE``
            config overrides may come anywhere.

    Returns:
        The exported model's metadata.

    Raises:
        utils.cli.UsageError: --verify without onnxruntime (checked before exporting).
        FileNotFoundError: the weights file does not exist.
        model.loading.CheckpointMismatchError: the weights do not fit the config, or camera x
            view SIE without --num-views.
        SystemExit: --verify found a difference above --atol.
    """
    args, opts = parse_args(_parser(), argv)
    if args.verify:
        _require_onnxruntime()
    cfg = load_cfg(args.config_file or None, opts)
    model = build_model_from_checkpoint(cfg, args.weights, num_views=args.num_views)
    normalize = bool(cfg.TEST.FEAT_NORM) if args.normalize is None else bool(args.normalize)
    extractor = build_feature_extractor(cfg, model, torch.device("cpu"))
    extractor.settings = dataclasses.replace(extractor.settings, feat_norm=normalize)
    flip_feat = extractor.settings.flip_feat
    metadata = export_onnx(
        model,
        args.out,
        cfg,
        normalize=normalize,
        batch=args.batch,
        opset=args.opset,
        flip_feat=flip_feat,
        sie_fallback=None if args.sie_inputs else cfg.TEST.SIE_FALLBACK,
    )
    if args.verify:
        sizes = (1, 3) if args.batch is None else (args.batch,)
        errors = verify_onnx(extractor, args.out, batch_sizes=sizes, sie_inputs=args.sie_inputs)
        worst = max(errors.values())
        metadata["verify_max_diff"] = worst
        if worst > args.atol:
            raise SystemExit(
                f"ONNX output differs from PyTorch by {worst:.3g} (> --atol {args.atol:g}) "
                f"at batch sizes {errors}"
            )
        print(f"verified: max difference {worst:.3g} <= {args.atol:g} at batch sizes {sizes}")
    print(f"exported {args.out} ({metadata['feature_dim']}-d feature)")
    return metadata


if __name__ == "__main__":
    # Logging is configured only for the command line: callers of main() keep their own setup.
    setup_logger(None)
    run_main(main)
