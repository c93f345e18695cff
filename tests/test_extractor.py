"""processor.extractor.FeatureExtractor: the evaluator's features from any image input."""

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train_clipreid
from configs.config import load_cfg
from datasets.build import build_dataloaders
from datasets.image_dataset import read_image
from model.loading import build_model_from_checkpoint
from processor.evaluate import build_eval_settings, extract_features
from processor.extractor import FeatureExtractor, run_weights
from tests.conftest import tiny_run_opts
from utils.distance import prepare_features

CPU = torch.device("cpu")
# Features of the same image from two paths (batch sizes, input kinds) agree to this.
ATOL = 1e-6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained camera-SIE baseline run, its evaluation data and the evaluator's features."""
    root = tmp_path_factory.mktemp("extractor")
    out = root / "run"
    extra = ["MODEL.METHOD", "baseline", "MODEL.SIE_CAMERA", "True", "TEST.IMS_PER_BATCH", "7"]
    train_clipreid.main(tiny_run_opts(root / "data", out, s1=0, s2=1, extra=extra))
    cfg = load_cfg(str(out / "config.yaml"))
    data = build_dataloaders(cfg)
    model = build_model_from_checkpoint(cfg, out / "ViT-T-16-test_1.pth")
    settings = build_eval_settings(cfg)
    features = extract_features(model, data.val, CPU, settings)
    return {
        "out": out,
        "cfg": cfg,
        "data": data,
        "model": model,
        "features": features,
        "normalised": prepare_features(features.feats, True),
    }


def test_features_equal_the_evaluators_for_every_input_kind(run):
    extractor = FeatureExtractor.from_run(run["out"], device="cpu")
    assert extractor.batch_size == 7 and extractor.input_size == (64, 32)
    feats, want = run["features"], run["normalised"]
    paths, camids = feats.paths, feats.camids
    assert len(paths) > 2 * extractor.batch_size  # several batches

    got = extractor(paths, camids=camids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(paths)))

    pixels = [read_image(p) for p in paths[:9]]  # uint8 [3, H, W], as the loader decodes them
    hwc = [p.permute(1, 2, 0).numpy() for p in pixels]
    cams, ref = camids[:9], want[:9]
    inputs = {
        "PIL": [Image.fromarray(a) for a in hwc],
        "numpy HWC uint8": hwc,
        "numpy batch NHWC": np.stack(hwc),
        "CHW uint8 tensor": pixels,
        "tensor batch NCHW": torch.stack(pixels),
        "preprocessed float": [run["data"].val.dataset[i]["image"] for i in range(9)],
        "mixed list": [paths[0], Image.fromarray(hwc[1]), hwc[2], pixels[3], *paths[4:9]],
    }
    for kind, images in inputs.items():
        torch.testing.assert_close(extractor(images, camids=cams), ref, atol=ATOL, rtol=0, msg=kind)
    one = extractor(paths[4], camids=int(camids[4]))
    assert one.shape == (1, want.shape[1])
    torch.testing.assert_close(one, want[4:5], atol=ATOL, rtol=0)
    grey = extractor(hwc[0][:, :, 0])  # [H, W] uint8: the grey channel repeated
    grey_rgb = extractor(np.repeat(hwc[0][:, :, :1], 3, axis=2))
    torch.testing.assert_close(grey, grey_rgb, atol=ATOL, rtol=0)


def test_sie_fallback_without_camera_ids(run, caplog):
    feats, model = run["features"], run["model"]
    paths = feats.paths[:6]
    x = torch.stack([run["data"].val.dataset[i]["image"] for i in range(6)])
    with torch.no_grad():
        mean_vec = model.mean_sie_vector()
        by_hand = model._eval_feature(model.image_encoder(x, mean_vec.expand(6, -1)))
        no_sie = model._eval_feature(model.image_encoder(x))
    extractor = FeatureExtractor.from_run(run["out"], device="cpu")
    with caplog.at_level(logging.WARNING, logger="processor.extractor"):
        got = extractor(paths)
        extractor(paths)
    warned = [r for r in caplog.records if "SIE fallback 'mean'" in r.getMessage()]
    assert len(warned) == 1  # once per extractor
    torch.testing.assert_close(got, prepare_features(by_hand, True), atol=ATOL, rtol=0)
    none = FeatureExtractor.from_run(run["out"], overrides=["TEST.SIE_FALLBACK", "none"])
    torch.testing.assert_close(none(paths), prepare_features(no_sie, True), atol=ATOL, rtol=0)
    # The ids change the features (the fallback is not the trained input) and are checked.
    assert not torch.allclose(got, run["normalised"][:6], atol=1e-4)
    with pytest.raises(ValueError, match=r"camids must be in 0\.\.1"):
        extractor(paths, camids=2)
    with pytest.raises(ValueError, match="3 camids for 6 images"):
        extractor(paths, camids=[0, 1, 0])


def test_from_run_picks_the_final_weights_then_last(run, tmp_path):
    cfg = run["cfg"]
    assert run_weights(run["out"], cfg) == run["out"] / "ViT-T-16-test_1.pth"
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.yaml", "last.pth"):
        shutil.copy(run["out"] / name, partial / name)
    assert run_weights(partial, cfg) == partial / "last.pth"
    # last.pth (a training checkpoint) holds the final model too: same features.
    paths, camids = run["features"].paths, run["features"].camids
    got = FeatureExtractor.from_run(partial, device="cpu")(paths, camids=camids)
    torch.testing.assert_close(got, run["normalised"], atol=ATOL, rtol=0)
    (partial / "last.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither the final weights ViT-T-16-test_1\.pth"):
        FeatureExtractor.from_run(partial)
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        FeatureExtractor.from_run(tmp_path)
    # from_config with a loaded config and overrides; weights named relative to the run.
    direct = FeatureExtractor.from_config(
        cfg, run["out"] / "ViT-T-16-test_1.pth", device="cpu", overrides=["TEST.IMS_PER_BATCH", "4"]
    )
    assert direct.batch_size == 4 and cfg.TEST.IMS_PER_BATCH == 7
    named = FeatureExtractor.from_run(run["out"], weights="last.pth")
    torch.testing.assert_close(
        direct(paths[:5], camids=camids[:5]), named(paths[:5], camids=camids[:5]), atol=ATOL, rtol=0
    )


def test_raw_features_without_feat_norm_and_input_errors(run):
    extractor = FeatureExtractor.from_run(run["out"], overrides=["TEST.FEAT_NORM", "False"])
    paths, feats = run["features"].paths[:4], run["features"]
    raw = extractor(paths, camids=feats.camids[:4])
    torch.testing.assert_close(raw, feats.feats[:4], atol=1e-5, rtol=0)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match=r"numpy images must be uint8"):
        extractor(np.zeros((64, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"preprocessed float input \[3, 64, 32\]"):
        extractor(torch.zeros(3, 60, 30))
    with pytest.raises(TypeError, match="unsupported image type int"):
        extractor([3])
    assert extractor([]).shape == (0, extractor.feat_dim)
