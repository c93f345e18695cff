"""Data-parallel training: two CPU processes (Gloo) launched as torchrun launches them."""

import json
import os
import socket
import subprocess
import sys

import torch

from configs.config import load_cfg
from datasets.build import build_datasets
from tests.conftest import tiny_run_opts as _opts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs train_clipreid.main in a launched process, then writes the rank's final in-memory weights
# to STATE_DIR/rank{RANK}.pt, so the test compares what each process actually holds. NO_BN=1
# replaces the BNNecks by identities: batch statistics are the one thing that makes a per-rank
# loss differ from the loss of the whole batch.
HELPER = """
import os, sys
import torch
import processor.train as train_mod
import train_clipreid

built = []
real_build = train_mod.build_model


def build(*args, **kwargs):
    model = real_build(*args, **kwargs)
    if os.environ.get("NO_BN") == "1":
        model.bottleneck = torch.nn.Identity()
        model.bottleneck_proj = torch.nn.Identity()
    built.append(model)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(init, os.path.join(os.environ["STATE_DIR"], f"init{os.environ['RANK']}.pt"))
    return model


train_mod.build_model = build
train_clipreid.main(sys.argv[1:])
rank = os.environ["RANK"]
state = {k: v.detach().clone() for k, v in built[0].state_dict().items()}
torch.save(state, os.path.join(os.environ["STATE_DIR"], f"rank{rank}.pt"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, nproc, argv, state_dir, no_bn=False):
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    os.makedirs(state_dir, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "OMP_NUM_THREADS": "1",
        "STATE_DIR": str(state_dir),
        "NO_BN": "1" if no_bn else "0",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(helper), *argv,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [
        torch.load(os.path.join(state_dir, f"rank{r}.pt"), weights_only=True) for r in range(nproc)
    ]


def _pregenerate(tmp_path):
    # The synthetic images are written once here, not by both ranks at the same time.
    build_datasets(load_cfg(None, _opts(tmp_path / "data", tmp_path / "unused")))


def _assert_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_two_ranks_train_both_stages_in_sync_and_only_rank0_writes(tmp_path):
    _pregenerate(tmp_path)
    out = tmp_path / "run"
    argv = _opts(tmp_path / "data", out, s1=1, s2=2)
    states = _launch(tmp_path, 2, argv, tmp_path / "states")
    # Different data on each rank: equal weights after training need averaged gradients.
    _assert_equal(states[0], states[1])
    _assert_equal(states[0], torch.load(out / "ViT-T-16-test_2.pth", weights_only=True))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    epochs = [(r["stage"], r["epoch"]) for r in records if "lr" in r]
    assert epochs == [(1, 1), (2, 1), (2, 2)]  # one record per epoch: rank 0 only
    assert len([r for r in records if "eval" in r]) == 1
    log = (out / "train_log.txt").read_text()
    assert log.count("[stage2] done") == 1 and log.count(f"saved {out / 'last.pth'}") == 3
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "config.yaml",
            "train_log.txt",
            "metrics.jsonl",
            "last.pth",
            "ViT-T-16-test_stage1_1.pth",
            "ViT-T-16-test_2.pth",
            "learning_curves.png",  # LOG.CURVES, drawn by rank 0 at the end
        ]
    )


def test_two_rank_steps_equal_single_process_steps_on_the_global_batch(tmp_path):
    """ID loss only on shuffled batches, no BatchNorm: the loss of a batch is a mean over its
    images, so averaging two half-batch gradients gives the full-batch gradient; the shared
    batch list gives rank r the images of half r of each single-process batch."""
    _pregenerate(tmp_path)
    extra = [
        "MODEL.METHOD", "baseline",
        "DATALOADER.SAMPLER", "softmax",
        "MODEL.ID_LOSS_WEIGHT", "1.0",
        "SOLVER.STAGE2.IMS_PER_BATCH", "8",
        # SGD: Adam divides by the gradient's magnitude and would blow up rounding noise in
        # gradients that are zero in exact arithmetic (the attention key bias).
        "SOLVER.STAGE2.OPTIMIZER_NAME", "SGD",
        "SOLVER.STAGE2.BASE_LR", "0.05",
    ]  # fmt: skip
    single = _launch(
        tmp_path,
        1,
        _opts(tmp_path / "data", tmp_path / "one", s2=1, extra=extra),
        tmp_path / "one_states",
        no_bn=True,
    )[0]
    two = _launch(
        tmp_path,
        2,
        _opts(tmp_path / "data", tmp_path / "two", s2=1, extra=extra),
        tmp_path / "two_states",
        no_bn=True,
    )
    _assert_equal(two[0], two[1])
    _assert_equal(two[0], single, atol=1e-5)
    # The tolerance is far below what the steps changed.
    init = torch.load(tmp_path / "one_states" / "init0.pt", weights_only=True)
    moved = max((single[k].float() - init[k].float()).abs().max().item() for k in single)
    assert moved > 1e-3
