"""utils.checkpoint: atomic writes, the safe checkpoint reader, training-checkpoint checks."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from PIL import Image

from model import build_model
from model.loading import build_model_from_checkpoint, load_reid_checkpoint
from solver.optimizer import build_optimizer
from solver.scheduler import build_scheduler
from tests.clip_fixtures import make_cfg
from tests.conftest import PickleExploit
from utils.checkpoint import (
    TRAINING_KEYS,
    CheckpointFormatError,
    atomic_write,
    load_training_checkpoint,
    read_checkpoint,
    save_checkpoint,
    strip_wrapper_prefixes,
    write_json,
    write_text,
)
from utils.seed import get_rng_state, set_rng_state


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------
def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"a": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    # The old content is intact and no temporary file is left behind.
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]
    write_text(path, "é\n")
    assert path.read_bytes() == "é\n".encode()


def test_save_checkpoint_crash_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save({"epoch": "partial"}, f)
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    assert read_checkpoint(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pth"]


def test_strip_wrapper_prefixes():
    sd = {"module._orig_mod.a": 1, "_orig_mod.module.b": 2, "c": 3, "x.module.d": 4}
    assert strip_wrapper_prefixes(sd) == {"a": 1, "b": 2, "c": 3, "x.module.d": 4}


# ------------------------------------------------------------------------------------------------
# Safe reading
# ------------------------------------------------------------------------------------------------
def _crafted_files(tmp_path):
    marker = tmp_path / "pwned"
    as_torch = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": PickleExploit(str(marker))}, as_torch)
    files = [as_torch]
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # plain pickles, as torch's legacy format
        files.append(tmp_path / f"evil_raw{protocol}.pth")
        files[-1].write_bytes(pickle.dumps({"state_dict": PickleExploit(str(marker))}, protocol))
    return marker, files


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker, files = _crafted_files(tmp_path)
    cfg = make_cfg()
    for i, path in enumerate(files):
        # The class is named when the pickle names it (GLOBAL); FRAME-ed pickles stop earlier.
        named = r"\(posix.system\).* not loaded" if i < 2 else r"Python objects, which are not"
        with pytest.raises(CheckpointFormatError, match=rf"TEST.WEIGHT .*evil.*{named}"):
            read_checkpoint(path, "TEST.WEIGHT")
        with pytest.raises(CheckpointFormatError, match=r"TEST.WEIGHT .*evil"):
            load_reid_checkpoint(build_model(cfg, 3, 1, 1), str(path))
        with pytest.raises(CheckpointFormatError, match=r"--weights .*evil"):
            build_model_from_checkpoint(cfg, str(path))
        with pytest.raises(CheckpointFormatError, match=r"SOLVER.RESUME"):
            load_training_checkpoint(path)
    assert not marker.exists()
    # The file really is an exploit: an unrestricted load runs the command.
    torch.load(files[0], weights_only=False)
    assert marker.exists()


def test_wrong_files_give_one_message_naming_the_path(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    config = tmp_path / "config.yml"
    config.write_text("MODEL:\n  NAME: 'ViT-B-16'\n")
    image = tmp_path / "query.png"
    Image.new("RGB", (8, 8)).save(image)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    cases = {
        truncated: "truncated or damaged",
        config: "a text file \\(a YAML config\\?\\)",
        image: "a PNG image",
        empty: "an empty file",
    }
    for path, kind in cases.items():
        with pytest.raises(CheckpointFormatError, match=kind) as err:
            read_checkpoint(path, "TEST.WEIGHT")
        msg = str(err.value)
        assert f"TEST.WEIGHT {str(path)!r}" in msg and "torch.save" in msg, msg
        assert "\n" not in msg and "Traceback" not in msg
    with pytest.raises(FileNotFoundError, match=r"--weights '.*missing.pth' does not exist"):
        read_checkpoint(tmp_path / "missing.pth", "--weights")


# ------------------------------------------------------------------------------------------------
# Training checkpoints
# ------------------------------------------------------------------------------------------------
def _training_state(cfg):
    """A training checkpoint as processor.train writes it: after a real optimizer step."""
    torch.manual_seed(0)
    model = build_model(cfg, 4, 1, 1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, named, stage=2)
    scheduler = build_scheduler(cfg, optimizer, stage=2)
    model.train()(torch.randn(2, 3, 256, 128)).cls_scores[0].sum().backward()
    optimizer.step()
    scheduler.step(1)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "stage": 2,
        "epoch": 1,
        "config": cfg.dump(),
        "metrics": {"epoch": 1, "mAP": 0.5, "rank1": 0.75, "num_valid_queries": 10},
        "rng": get_rng_state(),
    }


def test_our_training_checkpoint_loads_with_weights_only(tmp_path):
    cfg = make_cfg()
    state = _training_state(cfg)
    path = tmp_path / "last.pth"
    save_checkpoint(state, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no exception: plain data
    assert set(raw) == set(state)
    ckpt = load_training_checkpoint(path)
    assert ckpt["config"] == cfg.dump() and ckpt["metrics"] == state["metrics"]
    assert ckpt["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for key, value in state["model"].items():
        assert torch.equal(ckpt["model"][key], value), key
    # The RNG state restores: the same draws as right after it was captured.
    set_rng_state(state["rng"])
    expected = torch.rand(3)
    set_rng_state(ckpt["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_training_checkpoint_checks(tmp_path):
    cfg = make_cfg()
    state = _training_state(cfg)
    weights_only = tmp_path / "ViT-T-16-test_60.pth"
    save_checkpoint(state["model"], weights_only)
    with pytest.raises(CheckpointFormatError, match="not a training checkpoint") as err:
        load_training_checkpoint(weights_only, "--resume")
    msg = str(err.value)
    assert "--resume" in msg and "last.pth" in msg and all(k in msg for k in TRAINING_KEYS)
    diverged = dict(state, model=dict(state["model"]))
    diverged["model"]["bottleneck.weight"] = torch.full_like(state["model"]["bottleneck.weight"], 1)
    diverged["model"]["bottleneck.weight"][3] = float("nan")
    save_checkpoint(diverged, tmp_path / "nan.pth")
    with pytest.raises(CheckpointFormatError, match=r"NaN or Inf \(bottleneck.weight\)"):
        load_training_checkpoint(tmp_path / "nan.pth")
    save_checkpoint(dict(state, stage=3), tmp_path / "stage.pth")
    with pytest.raises(CheckpointFormatError, match="stage 3"):
        load_training_checkpoint(tmp_path / "stage.pth")
