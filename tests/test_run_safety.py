"""Runs that never lose or corrupt work: divergence, crashes, signals, resume checks.

The crash tests kill a real training process (forked from the test process, so no start-up cost)
with SIGKILL at chosen points (``utils.faults``: during a file write, after a step, at the start of
an evaluation), resume it until it finishes, and compare every final file and tensor with an
uninterrupted run.
"""

import json
import os
import signal

import pytest
import torch

import train_clipreid
from configs.config import load_cfg
from processor.common import NonFiniteLossError, StepGuard
from processor.recipes import RECIPES, CLIPReID, register_recipe
from processor.train import (
    EvaluationFailedError,
    ResumeConfigError,
    RunDirError,
    check_resume_config,
)
from tests.conftest import run_in_fork, tiny_run_opts
from utils.cli import run_main
from utils.logger import rewind_metrics

WEIGHTS = ("ViT-T-16-test_stage1_2.pth", "ViT-T-16-test_2.pth")
VOLATILE = ("time", "img_per_s")  # wall-clock fields of metrics.jsonl


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-stage run (2 + 2 epochs, a checkpoint every epoch)."""
    root = tmp_path_factory.mktemp("safety")
    out = root / "reference"
    assert run_in_fork(tiny_run_opts(root / "data", out)) == 0
    return root, out


def _assert_samerun_in_fork(out, ref):
    for name in WEIGHTS:
        a = torch.load(ref / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    assert _records(out) == _records(ref)
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize(
    "fault",
    [
        "write:2",  # the stage-1 epoch-1 checkpoint half written (write 1 is config.yaml)
        "write:4",  # the stage-1 weights file half written, its last.pth already in place
        "step:9",  # stage 2, after an optimizer step mid-epoch
        "eval:1",  # the final evaluation, after every file of the run was written
    ],
)
def test_sigkill_at_any_point_then_resume_gives_the_samerun_in_fork(reference, fault):
    root, ref = reference
    out = root / fault.replace(":", "_")
    argv = tiny_run_opts(root / "data", out)
    assert run_in_fork(argv, fault) == -signal.SIGKILL
    assert run_in_fork([*argv, "--resume"]) == 0
    _assert_samerun_in_fork(out, ref)


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_signal_saves_mid_epoch_and_resume_is_bit_identical(reference, sig, capsys):
    root, ref = reference
    out = root / f"signal_{sig}"
    argv = tiny_run_opts(root / "data", out)
    code = run_in_fork(argv, f"step:5:{sig}")  # stage 1 has 2 steps an epoch: this is stage 2
    assert code == 128 + getattr(signal, f"SIG{sig}")
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["stage"] == 2 and ckpt["partial"]["iteration"] >= 1
    assert run_in_fork([*argv, "--resume"]) == 0
    _assert_samerun_in_fork(out, ref)


@pytest.mark.parametrize(
    "fault",
    [
        "eval:1:INT",  # Ctrl-C during the final evaluation, after the last step
        "write:7:TERM",  # during the last weights file's write, just before that evaluation
    ],
)
def test_signal_after_the_last_step_stops_the_evaluation_at_once(reference, fault, capfd):
    root, ref = reference
    out = root / fault.replace(":", "_")
    argv = tiny_run_opts(root / "data", out)
    sig = getattr(signal, "SIG" + fault.rsplit(":", 1)[1])
    assert run_in_fork(argv, fault) == 128 + sig  # not a finished run that ignored the request
    err = capfd.readouterr().err
    assert f"stopped by {sig.name} during the evaluation 'Validation Results - " in err
    assert not any("eval" in r for r in _records(out))  # no evaluation was recorded
    assert run_in_fork([*argv, "--resume"]) == 0
    _assert_samerun_in_fork(out, ref)


def test_signal_during_an_evaluation_without_its_checkpoint_stops_at_the_next_step(reference):
    # Epoch 1 of stage 2 is evaluated but not checkpointed: stopping during its evaluation would
    # lose the epoch, so the run finishes the evaluation and stops after the next step.
    root, _ = reference
    extra = ("SOLVER.STAGE2.EVAL_PERIOD", "1", "SOLVER.STAGE2.CHECKPOINT_PERIOD", "2")
    ref = root / "sparse_ref"
    assert run_in_fork(tiny_run_opts(root / "data", ref, extra=extra)) == 0
    out = root / "sparse_int"
    argv = tiny_run_opts(root / "data", out, extra=extra)
    assert run_in_fork(argv, "eval:1:INT") == 128 + signal.SIGINT
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["stage"] == 2 and ckpt["partial"]["epoch"] == 2
    assert [r["epoch"] for r in _records(out) if "eval" in r] == [1]  # it finished
    assert run_in_fork([*argv, "--resume"]) == 0
    _assert_samerun_in_fork(out, ref)


def test_kill_between_checkpoint_and_weights_file_is_completed_on_resume(reference):
    """A finished run whose last weights file and evaluation were lost: --resume redoes both."""
    root, ref = reference
    out = root / "owed"
    argv = tiny_run_opts(root / "data", out)
    assert run_in_fork(argv, "write:7") == -signal.SIGKILL  # the stage-2 weights file, half written
    assert not (out / WEIGHTS[1]).exists() and list(out.glob("*.tmp"))
    assert run_in_fork([*argv, "--resume"]) == 0
    _assert_samerun_in_fork(out, ref)


# ------------------------------------------------------------------------------------------------
# Divergence.
class _NaNAt(CLIPReID):
    """CLIP-ReID whose stage-2 loss is NaN at the steps listed in ``bad`` (1-based, global)."""

    bad: tuple = ()
    steps = 0

    def losses(self, out, pids, text_pids, text_feats):
        terms = super().losses(out, pids, text_pids, text_feats)
        type(self).steps += 1
        if type(self).steps in self.bad:
            terms["id"] = terms["id"] * float("nan")
        return terms


@pytest.fixture
def nan_recipe():
    _NaNAt.steps = 0
    register_recipe("nan_at")(_NaNAt)
    yield _NaNAt
    RECIPES.remove("nan_at")


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, nan_recipe, capsys
):
    nan_recipe.bad = (4,)  # stage 2 has 3 steps an epoch: epoch 2, step 1
    out = tmp_path / "out"
    argv = tiny_run_opts(tmp_path / "data", out, s1=1, extra=["MODEL.METHOD", "nan_at"])
    with pytest.raises(SystemExit) as stop:
        run_main(train_clipreid.main, argv)
    assert stop.value.code == 1
    message = capsys.readouterr().err
    assert "[stage2] ep 2 it 1: non-finite loss" in message
    assert "id nan" in message and "tri " in message and "at lr 0.001" in message
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == (2, 1)
    assert all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "ViT-T-16-test_2.pth").exists()


def test_skip_policy_drops_nonfinite_steps_and_stops_after_too_many_in_a_row(
    tmp_path, nan_recipe, caplog
):
    nan_recipe.bad = (2, 5)
    extra = ["MODEL.METHOD", "nan_at", "SOLVER.NONFINITE", "skip"]
    summary = train_clipreid.main(tiny_run_opts(tmp_path / "data", tmp_path / "a", extra=extra))
    assert 0 <= summary["mAP"] <= 1
    assert "2 non-finite step(s) were skipped" in caplog.text
    sd = torch.load(tmp_path / "a" / "ViT-T-16-test_2.pth", weights_only=True)
    assert all(v.isfinite().all() for v in sd.values() if v.is_floating_point())

    nan_recipe.steps, nan_recipe.bad = 0, (1, 2, 3)
    extra += ["SOLVER.NONFINITE_MAX_SKIPS", "2"]
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        train_clipreid.main(tiny_run_opts(tmp_path / "data", tmp_path / "b", extra=extra))


def test_step_guard_checks_loss_and_gradients():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = StepGuard(policy="skip", max_skips=1)
    (param.sum() * 2).backward()
    assert guard.step_is_finite(param.sum(), {}, opt, scaler, "x") and guard.skipped == 0
    param.grad[1] = float("inf")  # finite loss, non-finite gradient: caught without a scaler
    assert not guard.step_is_finite(param.sum(), {}, opt, scaler, "x") and guard.skipped == 1
    with pytest.raises(NonFiniteLossError, match="2 non-finite steps in a row"):
        guard.step_is_finite(torch.tensor(float("nan")), {}, opt, scaler, "x")
    with pytest.raises(NonFiniteLossError, match=r"where: non-finite loss \(loss nan: a nan\)"):
        StepGuard().step_is_finite(
            torch.tensor(float("nan")), {"a": torch.tensor(float("nan"))}, opt, scaler, "where"
        )


# ------------------------------------------------------------------------------------------------
# What a new run or a resume refuses.
def test_rerun_into_a_resumable_output_dir_is_refused_unless_asked(tmp_path, capsys):
    out = tmp_path / "out"
    argv = tiny_run_opts(tmp_path / "data", out, s1=1, s2=1)
    train_clipreid.main(argv)
    config = (out / "config.yaml").read_text()
    with pytest.raises(SystemExit) as stop:
        run_main(train_clipreid.main, [*argv, "SOLVER.STAGE2.BASE_LR", "5e-4"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "holds a resumable run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "config.yaml").read_text() == config  # nothing was written
    train_clipreid.main([*argv, "--overwrite"])
    stages = [(r["stage"], r["epoch"]) for r in _records(out) if "loss" in r]
    assert stages == [(1, 1), (2, 1)]  # one run's records, not two


def test_resume_with_a_changed_schedule_lists_the_keys(tmp_path):
    out = tmp_path / "out"
    argv = tiny_run_opts(tmp_path / "data", out, s1=1, s2=1)
    train_clipreid.main(argv)
    changed = [*argv, "SOLVER.STAGE2.MAX_EPOCHS", "3", "TEST.IMS_PER_BATCH", "16", "--resume"]
    with pytest.raises(ResumeConfigError) as err:
        train_clipreid.main(changed)
    assert "SOLVER.STAGE2.MAX_EPOCHS: checkpoint 1 -> now 3" in str(err.value)
    assert "TEST.IMS_PER_BATCH" not in str(err.value)  # evaluation settings may change
    train_clipreid.main([*changed, "--accept-config-changes"])
    assert [r["epoch"] for r in _records(out) if r.get("stage") == 2 and "loss" in r] == [1, 2, 3]


def test_check_resume_config_by_hand():
    cfg = load_cfg(None, ["OUTPUT_DIR", "/a"])
    saved = load_cfg(None, ["OUTPUT_DIR", "/b", "SOLVER.SEED", "7", "DATALOADER.NUM_WORKERS", "2"])
    with pytest.raises(ResumeConfigError) as err:
        check_resume_config(saved.dump(), cfg, accept_changes=False)
    assert "in 1 key(s)" in str(err.value)  # SOLVER.SEED only: OUTPUT_DIR and workers are free
    assert "SOLVER.SEED: checkpoint 7 -> now 1234" in str(err.value)
    check_resume_config(saved.dump(), cfg, accept_changes=True)


def test_rewind_metrics_keeps_records_up_to_the_checkpoint(tmp_path):
    lines = [{"stage": 1, "epoch": 1}, {"stage": 1, "epoch": 2}, {"stage": 2, "epoch": 1}]
    lines += [{"stage": 2, "epoch": 2}, {"stage": 2, "epoch": 2, "eval": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rewind_metrics(str(tmp_path), (2, 1))
    assert _records(tmp_path) == lines[:3]
    rewind_metrics(str(tmp_path), None)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_run_dir_error_is_a_user_error():
    from utils.cli import is_user_error

    assert is_user_error(RunDirError("x")) and is_user_error(ResumeConfigError("x"))
    assert not is_user_error(NonFiniteLossError("x"))


class _BreakGallery(CLIPReID):
    """CLIP-ReID that truncates one gallery image when stage 2 starts (after the start checks)."""

    def start(self):
        super().start()
        path = self.data.val.dataset.records[-1].path
        with open(path, "r+b") as f:
            f.truncate(100)


def test_failed_evaluation_loses_no_training(tmp_path, caplog):
    register_recipe("break_gallery")(_BreakGallery)
    out = tmp_path / "out"
    extra = ["MODEL.METHOD", "break_gallery", "SOLVER.STAGE2.EVAL_PERIOD", "1"]
    try:
        with pytest.raises(EvaluationFailedError, match="weights are saved"):
            train_clipreid.main(tiny_run_opts(tmp_path / "data", out, s1=1, extra=extra))
    finally:
        RECIPES.remove("break_gallery")
    assert "the evaluation failed; training goes on" in caplog.text
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == (2, 2)  # stage 2 trained to the end after epoch 1
    assert (out / "ViT-T-16-test_2.pth").is_file()
    errors = [r for r in _records(out) if "eval_error" in r]
    assert [r["epoch"] for r in errors] == [1, 2] and "CorruptImageError" in errors[0]["eval_error"]
