"""End-to-end training on tiny synthetic data: train -> test parity, resume, parameter freezing."""

import json
import os

import pytest
import torch

import test_clipreid
import train_clipreid
from configs.config import load_cfg
from datasets.build import build_dataloaders
from model.build import build_model
from processor.common import build_loop_settings, make_grad_scaler
from processor.recipes import get_recipe
from processor.stage1 import train_stage1
from processor.stage2 import train_stage2
from solver.scheduler import build_scheduler
from tests.conftest import last_eval as _last_eval
from tests.conftest import run_in_fork
from tests.conftest import tiny_run_opts as _opts
from tests.official_configs import (
    OFFICIAL_FILES,
    STYLE_FILES,
    official_config,
    write_official_style,
)

CPU = torch.device("cpu")


def test_train_then_test_reproduces_logged_metrics(tmp_path):
    out = tmp_path / "run"
    summary = train_clipreid.main(_opts(tmp_path / "data", out))
    logged = _last_eval(out)
    assert logged["mAP"] == pytest.approx(summary["mAP"], abs=1e-9)
    weights = out / "ViT-T-16-test_2.pth"
    assert weights.is_file() and (out / "config.yaml").is_file()
    test_out = tmp_path / "test"
    argv = ["--config_file", str(out / "config.yaml"), "TEST.WEIGHT", str(weights)]
    result = test_clipreid.main(argv + ["OUTPUT_DIR", str(test_out)])
    saved = json.loads((test_out / "test_metrics.json").read_text())
    for key in ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries"):
        assert saved[key] == pytest.approx(logged[key], abs=1e-6), key
        assert result[key] == saved[key]


@pytest.mark.parametrize("fault", ["write:3", "write:6"], ids=["in-stage1", "in-stage2"])
def test_kill_and_resume_gives_the_same_weights(tmp_path, fault):
    """SIGKILL while a checkpoint is written (stage 1 / stage 2 epoch 2), then --resume."""
    data = tmp_path / "data"
    full = tmp_path / "full"
    assert run_in_fork(_opts(data, full, s1=2, s2=2)) == 0
    killed = tmp_path / "killed"
    assert run_in_fork(_opts(data, killed, s1=2, s2=2), fault) == -9
    assert run_in_fork([*_opts(data, killed, s1=2, s2=2), "SOLVER.RESUME", "auto"]) == 0

    a = torch.load(full / "ViT-T-16-test_2.pth", weights_only=True)
    b = torch.load(killed / "ViT-T-16-test_2.pth", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _setup(tmp_path, extra=()):
    cfg = load_cfg(None, _opts(tmp_path / "data", tmp_path / "out", s1=1, s2=1, extra=extra))
    data = build_dataloaders(cfg)
    model = build_model(cfg, data.num_classes, data.num_cameras, data.num_views)
    return cfg, data, model, get_recipe(cfg.MODEL.METHOD)(cfg, model, data, CPU)


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_one_stage1_epoch_changes_only_the_prompt_tokens(tmp_path):
    cfg, data, model, recipe = _setup(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = recipe.build_optimizer(cfg, stage=1)
    train_stage1(
        model, data.train_stage1, opt, build_scheduler(cfg, opt, stage=1),
        make_grad_scaler(CPU, "fp32"), build_loop_settings(cfg, 1), recipe.prompt, CPU,
    )  # fmt: skip
    assert _changed(before, model.state_dict()) == {"prompt_learner.cls_ctx"}
    assert all(p.grad is None for n, p in model.named_parameters() if "text_encoder" in n)


def test_one_stage2_epoch_leaves_the_text_side_unchanged(tmp_path):
    cfg, data, model, recipe = _setup(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = recipe.build_optimizer(cfg, stage=2)
    train_stage2(
        recipe, data.train_stage2, opt, build_scheduler(cfg, opt, stage=2),
        make_grad_scaler(CPU, "fp32"), build_loop_settings(cfg, 2),
    )  # fmt: skip
    changed = _changed(before, model.state_dict())
    assert not {k for k in changed if k.startswith(("text_encoder.", "prompt_learner."))}
    assert any(k.startswith("image_encoder.") for k in changed)
    assert {"classifier.weight", "classifier_proj.weight"} <= changed


def test_baseline_and_one_stage_variants_train(tmp_path):
    """Smoke test of the two variants, plus what distinguishes them from two-stage CLIP-ReID."""
    base = train_clipreid.main(
        _opts(tmp_path / "data", tmp_path / "base", s2=1, extra=["MODEL.METHOD", "baseline"])
    )
    sd = torch.load(tmp_path / "base" / "ViT-T-16-test_1.pth", weights_only=True)
    assert not any(k.startswith(("text_encoder.", "prompt_learner.")) for k in sd)
    assert 0.0 <= base["mAP"] <= 1.0
    one = tmp_path / "one"
    variant = ["MODEL.METHOD", "clipreid_one_stage", "SOLVER.STAGE2.TEXT_LOSSES", "['i2t', 't2i']"]
    train_clipreid.main(_opts(tmp_path / "data", one, s2=1, extra=variant))
    assert not (one / "ViT-T-16-test_stage1_2.pth").exists()
    records = [json.loads(line) for line in open(one / "metrics.jsonl")]
    stage2 = [r for r in records if r.get("stage") == 2 and "loss" in r]
    assert stage2 and {"i2t", "t2i", "id", "tri"} <= set(stage2[0])


def _check_runs_unchanged(tmp_path, path, rel):
    name = "RN-T-test" if os.path.basename(rel).startswith("cnn") else "ViT-T-16-test"
    out = tmp_path / "out"
    opts = _opts(tmp_path / "data", out, s1=1, s2=1)
    opts[opts.index("MODEL.NAME") + 1] = name
    summary = train_clipreid.main(["--config_file", path, *opts])
    cfg = load_cfg(str(out / "config.yaml"))
    assert cfg.MODEL.METHOD == ("baseline" if "base" in rel else "clipreid")
    assert (out / f"{name}_1.pth").is_file() and 0.0 <= summary["mAP"] <= 1.0


@pytest.mark.parametrize("official", OFFICIAL_FILES)
def test_official_yaml_runs_unchanged(tmp_path, official):
    """An official YAML as shipped (empty DATASETS block; flat SOLVER for the baseline) trains.

    Only the size of the run changes: a tiny model of the same family on tiny synthetic data.
    """
    _check_runs_unchanged(tmp_path, official_config(official), official)


@pytest.mark.parametrize("rel", sorted(STYLE_FILES))
def test_official_style_yaml_runs_unchanged(tmp_path, rel):
    """The same with the official-style look-alikes (no official files needed)."""
    _check_runs_unchanged(tmp_path, write_official_style(tmp_path / "configs")[rel], rel)


def test_gradient_accumulation_is_the_mean_of_the_micro_batch_gradients(tmp_path):
    """GRAD_ACCUM_STEPS 2: the accumulated gradient and terms are the mean over the two halves."""
    from processor.stage2 import _TrainStep, accumulate_gradients

    extra = ["SOLVER.STAGE2.GRAD_ACCUM_STEPS", "2", "DATALOADER.NUM_INSTANCE", "2"]
    cfg, data, model, recipe = _setup(tmp_path, extra=extra)
    recipe.build_optimizer(cfg, stage=2)
    recipe.start()
    step, scaler = _TrainStep(model).train(), make_grad_scaler(CPU, "fp32")
    batch = next(iter(data.train_stage2))
    params = [p for p in model.parameters() if p.requires_grad]
    start = {k: v.clone() for k, v in model.state_dict().items()}

    loss, terms, parts = accumulate_gradients(
        recipe, step, batch, scaler, build_loop_settings(cfg, 2)
    )
    accumulated = [p.grad.clone() for p in params]
    assert [len(pids) for _, pids in parts] == [4, 4]

    model.load_state_dict(start)  # BN running statistics back to the same start
    one = build_loop_settings(load_cfg(None, _opts(tmp_path / "data", tmp_path / "o")), 2)
    grads, halves = [], []
    for half in (slice(0, 4), slice(4, 8)):
        model.zero_grad(set_to_none=True)
        part = {k: v[half] for k, v in batch.items() if k != "paths"}
        halves.append(accumulate_gradients(recipe, step, part, scaler, one))
        grads.append([p.grad.clone() for p in params])
    for acc, g1, g2 in zip(accumulated, *grads, strict=True):
        torch.testing.assert_close(acc, (g1 + g2) / 2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, (halves[0][0] + halves[1][0]) / 2)
    for key in terms:
        torch.testing.assert_close(terms[key], (halves[0][1][key] + halves[1][1][key]) / 2)
    with pytest.raises(Exception, match="GRAD_ACCUM_STEPS = 4 micro-batches of whole identities"):
        load_cfg(None, _opts(tmp_path / "d", tmp_path / "x", extra=[extra[0], "4"]))
