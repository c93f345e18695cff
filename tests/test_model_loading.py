"""model.loading: official (with 'module.') and project checkpoints, and mismatch messages."""

from __future__ import annotations

import logging

import pytest
import torch

from model import (
    CheckpointMismatchError,
    build_model,
    extract_state_dict,
    get_arch,
    load_reid_checkpoint,
)
from tests.clip_fixtures import make_cfg, official_reid_layout, random_reid_checkpoint
from utils.checkpoint import CheckpointFormatError

ARCH = get_arch("ViT-T-16-test")
C = 6


def _model(seed: int = 0, num_classes: int = C, cams: int = 3, views: int = 1, **overrides):
    torch.manual_seed(seed)
    return build_model(make_cfg(**overrides), num_classes, cams, views)


@pytest.fixture(scope="module")
def official():
    """A random checkpoint in the official key layout, as DataParallel saves it."""
    layout = official_reid_layout(ARCH, C, num_tokens=129)
    return random_reid_checkpoint(layout, seed=4)


def _features(model, x):
    model.eval()
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(torch.tensor([0, 5]))


def test_model_layout_is_the_official_one(official):
    own = _model().state_dict()
    own.pop("prompt_learner.tokenized_prompts")  # derived from the template, not official
    assert {k: tuple(v.shape) for k, v in own.items()} == {
        k: tuple(v.shape) for k, v in official.items()
    }


def test_official_and_project_formats_give_same_features(tmp_path, official):
    path = tmp_path / "ViT-T-16-test_60.pth"
    torch.save({f"module.{k}": v for k, v in official.items()}, path)
    project = tmp_path / "last.pth"
    cfg = make_cfg()  # a training checkpoint carries its config as text
    state = {"model": official, "optimizer": {"state": {}}, "epoch": 3, "config": cfg.dump()}
    torch.save(state, project)
    # The config node itself is a Python object: refused unread (weights_only), naming the class.
    node = tmp_path / "node.pth"
    torch.save(dict(state, config=cfg), node)
    with pytest.raises(CheckpointFormatError, match=r"TEST.WEIGHT .*node\.pth.*CfgNode"):
        load_reid_checkpoint(_model(seed=1), node)

    a, b, ref = _model(seed=1), _model(seed=2), _model(seed=3)
    report = load_reid_checkpoint(a, path)
    load_reid_checkpoint(b, project)
    ref.load_state_dict(official, strict=False)
    assert report.skipped == [] and report.missing == ["prompt_learner.tokenized_prompts"]
    state = a.state_dict()
    for key, value in official.items():
        assert torch.equal(state[key], value), key
    x = torch.randn(2, 3, 256, 128)
    fa, fb, fr = _features(a, x), _features(b, x), _features(ref, x)
    for got, other in ((fa, fr), (fb, fr)):
        torch.testing.assert_close(got[0], other[0])
        torch.testing.assert_close(got[1], other[1])


def test_extract_state_dict_strips_wrappers():
    sd = {"module._orig_mod.classifier.weight": torch.zeros(1)}
    assert list(extract_state_dict({"model": sd})) == ["classifier.weight"]
    with pytest.raises(CheckpointFormatError, match="state dict"):
        extract_state_dict({"model": {"a": 1}})


def test_sie_checkpoint_without_sie_flags(official):
    ckpt = dict(official, cv_embed=torch.randn(3, 64))
    with pytest.raises(CheckpointMismatchError) as err:
        load_reid_checkpoint(_model(), ckpt)
    msg = str(err.value)
    assert "set MODEL.SIE_CAMERA True" in msg and "MODEL.SIE_COE" in msg
    with pytest.raises(CheckpointMismatchError, match="MODEL.SIE_CAMERA False"):
        load_reid_checkpoint(_model(MODEL__SIE_CAMERA=True), official)
    # With the flag set the same checkpoint loads.
    model = _model(MODEL__SIE_CAMERA=True)
    load_reid_checkpoint(model, ckpt)
    assert torch.equal(model.cv_embed.detach(), ckpt["cv_embed"])


def test_token_count_mismatch_names_stride_values():
    olp = _model(MODEL__STRIDE_SIZE=[12, 12]).state_dict()
    assert olp["image_encoder.positional_embedding"].shape[0] == 211
    with pytest.raises(CheckpointMismatchError) as err:
        load_reid_checkpoint(_model(), olp)
    msg = str(err.value)
    assert "211" in msg and "129" in msg and "MODEL.STRIDE_SIZE [12, 12]" in msg
    with pytest.raises(CheckpointMismatchError, match=r"MODEL.STRIDE_SIZE \[16, 16\]"):
        load_reid_checkpoint(_model(MODEL__STRIDE_SIZE=[12, 12]), _model().state_dict())
    tall = _model(INPUT__SIZE_TRAIN=[384, 128], INPUT__SIZE_TEST=[384, 128]).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"INPUT.SIZE_TRAIN and INPUT.SIZE_TEST \["):
        load_reid_checkpoint(_model(), tall)


def test_class_count_mismatch_skips_classifiers_for_eval(official, caplog):
    other = _model(num_classes=9, seed=5)
    with caplog.at_level(logging.WARNING, logger="model.loading"):
        report = load_reid_checkpoint(other, official)
    assert "identities" in caplog.text
    assert set(report.skipped) == {
        "classifier.weight",
        "classifier_proj.weight",
        "prompt_learner.cls_ctx",
    }
    assert other.classifier.weight.shape == (9, 64)
    ref = _model(seed=6)
    ref.load_state_dict(official, strict=False)
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        torch.testing.assert_close(other.eval().encode_image(x), ref.eval().encode_image(x))
    with pytest.raises(CheckpointMismatchError, match="resuming training"):
        load_reid_checkpoint(_model(num_classes=9), official, for_training=True)


def test_baseline_and_text_side(official, caplog):
    baseline_ckpt = {
        k: v for k, v in official.items() if not k.startswith(("prompt_learner.", "text_encoder."))
    }
    # A baseline checkpoint in a baseline model: fine.
    load_reid_checkpoint(_model(MODEL__METHOD="baseline"), baseline_ckpt)
    # A CLIP-ReID checkpoint in a baseline model: the text side is ignored.
    report = load_reid_checkpoint(_model(MODEL__METHOD="baseline"), official)
    assert "text_encoder.ln_final.weight" in report.skipped
    # A baseline checkpoint in a CLIP-ReID model: fine for evaluation, not for training.
    with caplog.at_level(logging.WARNING, logger="model.loading"):
        load_reid_checkpoint(_model(), baseline_ckpt)
    assert "baseline" in caplog.text
    with pytest.raises(CheckpointMismatchError, match="MODEL.METHOD 'baseline'"):
        load_reid_checkpoint(_model(), baseline_ckpt, for_training=True)


def test_other_architecture_and_unknown_keys(official):
    rn = _model(MODEL__NAME="RN-T-test").state_dict()
    with pytest.raises(CheckpointMismatchError, match="MODEL.NAME 'RN-T-test'"):
        load_reid_checkpoint(_model(), rn)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys.*foo.bar"):
        load_reid_checkpoint(_model(), dict(official, **{"foo.bar": torch.zeros(1)}))
    partial = {k: v for k, v in official.items() if k != "image_encoder.ln_post.weight"}
    with pytest.raises(CheckpointMismatchError, match="missing.*image_encoder.ln_post.weight"):
        load_reid_checkpoint(_model(), partial)


def test_prompt_template_mismatch_is_detected_from_token_ids():
    vehicle = _model(MODEL__PROMPT_CLASS="vehicle").state_dict()
    with pytest.raises(CheckpointMismatchError, match="MODEL.PROMPT_CLASS"):
        load_reid_checkpoint(_model(), vehicle, for_training=True)
    report = load_reid_checkpoint(_model(), vehicle)
    assert "prompt_learner.cls_ctx" in report.skipped
