"""ONNX export of the evaluation feature: onnxruntime output against PyTorch's ``encode_image``."""

import json
import sys

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from configs.config import save_cfg
from model.build import build_model
from model.loading import CheckpointMismatchError
from tests.clip_fixtures import make_cfg
from tests.conftest import PickleExploit
from tools import export_onnx
from utils.checkpoint import CheckpointFormatError
from utils.cli import UsageError

SIZE = [64, 32]
MEAN = [0.48, 0.46, 0.41]
STD = [0.27, 0.26, 0.28]
NUM_CLASSES, NUM_CAMERAS, NUM_VIEWS = 5, 3, 2


def _trained_run(tmp_path, name="ViT-T-16-test", seed=0, **overrides):
    """A random-init tiny model saved as weights, with its config file; returns (model, argv)."""
    cfg = make_cfg(
        name,
        INPUT__SIZE_TRAIN=SIZE,
        INPUT__SIZE_TEST=SIZE,
        INPUT__PIXEL_MEAN=MEAN,
        INPUT__PIXEL_STD=STD,
        MODEL__DEVICE="cpu",
        OUTPUT_DIR=str(tmp_path / "run"),
        **overrides,
    )
    torch.manual_seed(seed)
    model = build_model(cfg, NUM_CLASSES, NUM_CAMERAS, NUM_VIEWS, load_pretrained=False)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Trained-looking BNNecks (identity BNs would hide a wrong neck in the export).
        for bn in (model.bottleneck, model.bottleneck_proj):
            bn.running_mean.copy_(0.1 * torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
            bn.weight.copy_(1.0 + 0.1 * torch.randn(bn.num_features, generator=gen))
    model.eval()
    weights = tmp_path / "weights.pth"
    torch.save(model.state_dict(), weights)
    config = tmp_path / "config.yaml"
    save_cfg(cfg, str(config))
    argv = ["--config_file", str(config), "--weights", str(weights), "--out"]
    return model, argv


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _images(batch, seed):
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("name", "neck"),
    [("ViT-T-16-test", "before"), ("ViT-T-16-test", "after"), ("RN-T-test", "after")],
)
def test_onnx_matches_encode_image_for_dynamic_batch(tmp_path, name, neck):
    model, argv = _trained_run(tmp_path, name, TEST__NECK_FEAT=neck)
    out = tmp_path / "export" / "model.onnx"
    meta = export_onnx.main([*argv, str(out), "--no-normalize"])
    session = _session(out)
    assert [i.name for i in session.get_inputs()] == ["images"]
    width = None
    for batch in (1, 3):
        images = _images(batch, seed=batch)
        with torch.no_grad():
            ref = model.encode_image(images)
        got = torch.from_numpy(session.run(["feats"], {"images": images.numpy()})[0])
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
        width = ref.shape[1]

    side = json.loads(export_onnx.sidecar_path(out).read_text())
    assert side == meta
    assert side["input_size"] == SIZE
    assert side["pixel_mean"] == pytest.approx(MEAN)
    assert side["pixel_std"] == pytest.approx(STD)
    assert side["feature_dim"] == width
    assert side["feature_norm"] is False
    assert side["model_name"] == name and side["sie_inputs"] == []
    assert side["batch"] == "dynamic"
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props == side


def test_normalisation_follows_feat_norm_and_flag(tmp_path):
    model, argv = _trained_run(tmp_path, TEST__NECK_FEAT="after")  # TEST.FEAT_NORM True default
    out = tmp_path / "norm.onnx"
    meta = export_onnx.main([*argv, str(out)])
    assert meta["feature_norm"] is True
    images = _images(3, seed=7)
    got = torch.from_numpy(_session(out).run(["feats"], {"images": images.numpy()})[0])
    with torch.no_grad():
        raw = model.encode_image(images)
    norms = got.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, raw / raw.norm(dim=1, keepdim=True), rtol=0, atol=1e-5)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3), atol=1e-2)  # normalising mattered

    # --no-normalize overrides TEST.FEAT_NORM; TEST.FEAT_NORM False + --normalize the reverse.
    raw_out = tmp_path / "raw.onnx"
    export_onnx.main([*argv, str(raw_out), "--no-normalize"])
    got_raw = _session(raw_out).run(["feats"], {"images": images.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got_raw), raw, rtol=0, atol=1e-4)
    forced = tmp_path / "forced.onnx"
    meta = export_onnx.main([*argv, str(forced), "--normalize", "TEST.FEAT_NORM", "False"])
    assert meta["feature_norm"] is True
    got_forced = _session(forced).run(["feats"], {"images": images.numpy()})[0]
    torch.testing.assert_close(
        torch.from_numpy(got_forced), F.normalize(raw, dim=1), rtol=0, atol=1e-5
    )


def test_camera_sie_export_takes_camids(tmp_path):
    model, argv = _trained_run(tmp_path, MODEL__SIE_CAMERA=True, MODEL__SIE_COE=3.0)
    out = tmp_path / "sie.onnx"
    meta = export_onnx.main([*argv, str(out), "--no-normalize"])
    assert meta["sie_inputs"] == ["camids"] and meta["num_cameras"] == NUM_CAMERAS
    session = _session(out)
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["images", "camids"]
    assert inputs["camids"].type == "tensor(int64)"
    images = _images(3, seed=3)
    results = []
    for camids in (torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0])):
        with torch.no_grad():
            ref = model.encode_image(images, camids=camids)
        got = session.run(["feats"], {"images": images.numpy(), "camids": camids.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=0, atol=1e-4)
        results.append(torch.from_numpy(got))
    # Every row changed camera, so every row's feature must change.
    assert (results[0] - results[1]).abs().amax(dim=1).min() > 1e-3
    one = session.run(["feats"], {"images": images[:1].numpy(), "camids": [1]})[0]
    with torch.no_grad():
        ref = model.encode_image(images[:1], camids=torch.tensor([1]))
    torch.testing.assert_close(torch.from_numpy(one), ref, rtol=0, atol=1e-4)


def test_sie_export_without_id_inputs_adds_the_fallback(tmp_path):
    model, argv = _trained_run(tmp_path, MODEL__SIE_CAMERA=True, MODEL__SIE_COE=3.0)
    images = _images(3, seed=4)
    with torch.no_grad():
        mean = F.normalize(model.encode_image(images, sie_fallback="mean"), dim=1)
        plain = F.normalize(model.encode_image(images), dim=1)
    assert not torch.allclose(mean, plain, atol=1e-3)
    for fallback, ref in (("mean", mean), ("none", plain)):
        out = tmp_path / f"{fallback}.onnx"
        extra = ["--no-sie-inputs", "--verify", "TEST.SIE_FALLBACK", fallback]
        meta = export_onnx.main([*argv, str(out), *extra])
        assert meta["sie_inputs"] == [] and meta["sie_fallback"] == fallback
        assert meta["verify_max_diff"] <= 1e-4
        session = _session(out)
        assert [i.name for i in session.get_inputs()] == ["images"]
        got = torch.from_numpy(session.run(["feats"], {"images": images.numpy()})[0])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # A model without SIE: the flag changes nothing and no fallback is recorded.
    (tmp_path / "plain").mkdir()
    _, plain_argv = _trained_run(tmp_path / "plain")
    meta = export_onnx.main([*plain_argv, str(tmp_path / "p.onnx"), "--no-sie-inputs"])
    assert meta["sie_inputs"] == [] and meta["sie_fallback"] is None


def test_camera_view_sie_needs_num_views(tmp_path):
    model, argv = _trained_run(tmp_path, MODEL__SIE_CAMERA=True, MODEL__SIE_VIEW=True)
    out = tmp_path / "cv.onnx"
    with pytest.raises(CheckpointMismatchError, match="--num-views"):
        export_onnx.main([*argv, str(out)])
    meta = export_onnx.main([*argv, str(out), "--num_views", str(NUM_VIEWS), "--no-normalize"])
    assert meta["sie_inputs"] == ["camids", "viewids"]
    images = _images(3, seed=5)
    camids, viewids = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1])
    got = _session(out).run(
        ["feats"],
        {"images": images.numpy(), "camids": camids.numpy(), "viewids": viewids.numpy()},
    )[0]
    with torch.no_grad():
        ref = model.encode_image(images, camids, viewids)
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=0, atol=1e-4)


def test_flip_feat_export_equals_the_extractor(tmp_path):
    model, argv = _trained_run(tmp_path, TEST__FLIP_FEAT=True)
    out = tmp_path / "flip.onnx"
    meta = export_onnx.main([*argv, str(out), "--verify"])
    assert meta["flip_feat"] is True and meta["verify_max_diff"] <= 1e-4
    images = _images(3, seed=11)
    got = torch.from_numpy(_session(out).run(["feats"], {"images": images.numpy()})[0])
    with torch.no_grad():
        mean = (model.encode_image(images) + model.encode_image(images.flip(3))) / 2
        plain = model.encode_image(images)
    torch.testing.assert_close(got, F.normalize(mean, dim=1), rtol=0, atol=1e-5)
    assert not torch.allclose(got, F.normalize(plain, dim=1), atol=1e-3)


def test_verify_and_fixed_batch(tmp_path, capsys):
    _, argv = _trained_run(tmp_path)
    meta = export_onnx.main([*argv, str(tmp_path / "v.onnx"), "--verify"])
    assert 0 <= meta["verify_max_diff"] <= 1e-4
    assert "verified" in capsys.readouterr().out

    fixed = tmp_path / "fixed.onnx"
    meta = export_onnx.main([*argv, str(fixed), "--batch", "2", "--verify"])
    assert meta["batch"] == 2
    dims = onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, *SIZE]


def test_verify_fails_above_tolerance(tmp_path, monkeypatch):
    _, argv = _trained_run(tmp_path)
    real_export = export_onnx.export_onnx

    def export_wrong_feature(model, out, cfg, *, normalize, **kwargs):
        # An exported graph that disagrees with PyTorch: normalisation flipped.
        return real_export(model, out, cfg, normalize=not normalize, **kwargs)

    monkeypatch.setattr(export_onnx, "export_onnx", export_wrong_feature)
    with pytest.raises(SystemExit, match="differs from PyTorch"):
        export_onnx.main([*argv, str(tmp_path / "t.onnx"), "--verify", "--no-normalize"])


def test_errors_name_the_problem(tmp_path, monkeypatch):
    _, argv = _trained_run(tmp_path)
    missing = tmp_path / "nope.pth"
    bad = [*argv[:3], str(missing), "--out", str(tmp_path / "m.onnx")]
    with pytest.raises(FileNotFoundError, match="--weights .*nope.pth"):
        export_onnx.main(bad)
    # A crafted pickle as --weights is refused unread: the command in it never runs.
    marker = tmp_path / "pwned"
    torch.save({"model": PickleExploit(str(marker))}, missing)
    with pytest.raises(CheckpointFormatError, match=r"--weights .*nope\.pth.*not loaded"):
        export_onnx.main(bad)
    assert not marker.exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(UsageError, match="pip install onnxruntime"):
        export_onnx.main([*argv, str(tmp_path / "m.onnx"), "--verify"])
    assert not (tmp_path / "m.onnx").exists()  # checked before exporting
