"""build_dataloaders: the bundle, batch format, P x K batches, repeatability, VehicleID trials."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from configs.defaults import get_cfg_defaults
from datasets.build import build_dataloaders
from datasets.samplers import RandomIdentityBatchSampler, ShuffleBatchSampler


def synthetic_cfg(root: Path, workers: int = 0):
    cfg = get_cfg_defaults()
    cfg.DATASETS.NAMES = ["synthetic"]
    cfg.DATASETS.ROOT_DIR = str(root)
    s = cfg.DATASETS.SYNTHETIC
    s.NUM_IDS, s.NUM_CAMERAS, s.IMAGES_PER_ID_CAM, s.SIZE, s.SEED = 8, 2, 3, [32, 16], 0
    cfg.INPUT.SIZE_TRAIN = [32, 16]
    cfg.INPUT.SIZE_TEST = [32, 16]
    cfg.INPUT.PADDING = 2
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.DATALOADER.NUM_INSTANCE = 2
    cfg.SOLVER.STAGE1.IMS_PER_BATCH = 10
    cfg.SOLVER.STAGE2.IMS_PER_BATCH = 8
    cfg.TEST.IMS_PER_BATCH = 7
    return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_bundle_fields_and_batch_format(root):
    b = build_dataloaders(synthetic_cfg(root))
    # 8 ids: 4 train, 4 test; 2 cameras; 3 images per id and camera; 2 distractors
    assert (b.num_classes, b.num_cameras, b.num_views, b.num_query) == (4, 2, 1, 8)
    assert b.num_trials == 1 and b.val_for_trial(3) is b.val
    assert len(b.dataset.train) == 24 and len(b.datasets) == 1
    val_records = b.val.dataset.records
    assert val_records == b.dataset.query + b.dataset.gallery and len(val_records) == 8 + 16 + 2

    batch = next(iter(b.train_stage2))
    assert set(batch) == {"images", "pids", "camids", "viewids", "paths"}
    assert batch["images"].shape == (8, 3, 32, 16) and batch["images"].dtype == torch.float32
    for key in ("pids", "camids", "viewids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (8,)
    assert isinstance(batch["paths"], list) and len(batch["paths"]) == 8
    assert sorted(Counter(batch["pids"].tolist()).values()) == [2, 2, 2, 2]  # P = 4, K = 2
    records = {r.path: r for r in b.dataset.train}
    for path, pid, cam in zip(batch["paths"], batch["pids"], batch["camids"], strict=True):
        assert (records[path].pid, records[path].camid) == (int(pid), int(cam))

    # stage 1 and train_eval: all train images in order, un-augmented
    s1 = list(b.train_stage1)
    assert [len(x["paths"]) for x in s1] == [10, 10, 4]
    assert [p for x in s1 for p in x["paths"]] == [r.path for r in b.dataset.train]
    again = next(iter(b.train_eval))
    assert torch.equal(again["images"][:7], s1[0]["images"][:7])
    assert isinstance(b.train_stage2.batch_sampler, RandomIdentityBatchSampler)
    assert not b.train_stage2.pin_memory or torch.cuda.is_available()


def test_epochs_replay_independent_of_workers(root):
    runs = []
    for workers in (0, 2):
        b = build_dataloaders(synthetic_cfg(root, workers))
        assert b.train_stage2.persistent_workers == (workers > 0)
        assert not b.val.persistent_workers
        epochs = []
        for epoch in (1, 2, 1):
            b.set_epoch(epoch)
            epochs.append([(x["paths"], x["images"]) for x in b.train_stage2])
        runs.append(epochs)
    for epochs in runs:
        assert [p for p, _ in epochs[0]] != [p for p, _ in epochs[1]]  # epochs differ
    reference = runs[0][0]
    for got in (runs[0][2], runs[1][0], runs[1][2]):  # same epoch, any worker count: same data
        assert [p for p, _ in got] == [p for p, _ in reference]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(got, reference, strict=True))


def test_softmax_sampler_is_a_seeded_shuffle(root):
    cfg = synthetic_cfg(root)
    cfg.DATALOADER.SAMPLER = "softmax"
    b = build_dataloaders(cfg)
    sampler = b.train_stage2.batch_sampler
    assert isinstance(sampler, ShuffleBatchSampler)
    assert len(b.train_stage2) == 24 // 8
    assert sorted(i.index for batch in sampler for i in batch) == list(range(24))


def test_vehicleid_val_for_trial(tmp_path):
    d = tmp_path / "VehicleID_V1.0"
    (d / "image").mkdir(parents=True)
    (d / "train_test_split").mkdir()
    lines = []
    for pid in range(1, 5):
        for k in range(3):
            name = f"{pid:03d}{k}"
            Image.new("RGB", (8, 8), (pid * 40, k * 60, 0)).save(d / "image" / f"{name}.jpg")
            lines.append(f"{name} {pid}")
    (d / "train_test_split/train_list.txt").write_text("\n".join(lines[:6]) + "\n")
    (d / "train_test_split/test_list_800.txt").write_text("\n".join(lines[6:]) + "\n")
    cfg = get_cfg_defaults()
    cfg.DATASETS.NAMES = ["VehicleID"]
    cfg.DATASETS.ROOT_DIR = str(tmp_path)
    cfg.INPUT.SIZE_TRAIN = cfg.INPUT.SIZE_TEST = [16, 16]
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.NUM_INSTANCE = 2
    cfg.SOLVER.STAGE2.IMS_PER_BATCH = 4
    cfg.TEST.VEHICLEID_TRIALS = 6
    b = build_dataloaders(cfg)
    assert b.num_trials == 6 and b.num_query == 4 and b.num_cameras == 1
    galleries = []
    for t in range(6):
        loader = b.val_for_trial(t)
        recs = loader.dataset.records
        query, gallery = recs[: b.num_query], recs[b.num_query :]
        assert sorted(r.pid for r in gallery) == [3, 4] and len(query) == 4
        galleries.append(tuple(r.path for r in gallery))
    assert b.val_for_trial(0) is b.val
    assert len(set(galleries)) > 1
    again = build_dataloaders(cfg)
    assert [
        tuple(r.path for r in again.val_for_trial(t).dataset.records[4:]) for t in range(6)
    ] == (galleries)
    batch = next(iter(b.val_for_trial(2)))
    assert batch["camids"].tolist() == [0, 0, 0, 0, 1, 1]
