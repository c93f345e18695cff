"""build_dataloaders: the bundle, batch format, P x K batches, repeatability, VehicleID trials,
a user-registered dataset format."""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from configs.config import ConfigError, load_cfg
from configs.defaults import get_cfg_defaults
from datasets import (
    DATASETS,
    CorruptImageError,
    DatasetOptions,
    ImageRecord,
    Layout,
    ReIDDataset,
    get_layout,
    register_dataset,
)
from datasets.build import build_dataloaders, build_datasets
from datasets.samplers import (
    FixedLengthBatchSampler,
    RandomIdentityBatchSampler,
    ShuffleBatchSampler,
)
from datasets.synthetic import generate_synthetic_reid
from processor.evaluate import build_eval_settings, evaluate_bundle
from tests.conftest import MeanColour


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
    assert b.num_trials == 1 and b.dataset.for_trial(3) is b.dataset
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
            b.train_stage2.batch_sampler.set_epoch(epoch)
            epochs.append([(x["paths"], x["images"]) for x in b.train_stage2])
        runs.append(epochs)
    for epochs in runs:
        assert [p for p, _ in epochs[0]] != [p for p, _ in epochs[1]]  # epochs differ
    reference = runs[0][0]
    for got in (runs[0][2], runs[1][0], runs[1][2]):  # same epoch, any worker count: same data
        assert [p for p, _ in got] == [p for p, _ in reference]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(got, reference, strict=True))


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_started_without_fork_load_the_same_batches(root, method):
    # Python 3.14 starts workers with forkserver on Linux and macOS/Windows use spawn: the
    # datasets, transforms, samplers and worker seeding must pickle and not rely on fork.
    reference = build_dataloaders(synthetic_cfg(root, 0)).train_stage2
    reference.batch_sampler.set_epoch(1)
    expected = [(x["paths"], x["images"]) for x in reference]
    loader = build_dataloaders(synthetic_cfg(root, 2)).train_stage2
    loader.batch_sampler.set_epoch(1)
    other = DataLoader(
        loader.dataset,
        batch_sampler=loader.batch_sampler,
        num_workers=2,
        collate_fn=loader.collate_fn,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        multiprocessing_context=method,
    )
    got = [(x["paths"], x["images"]) for x in other]
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(got, expected, strict=True))


def test_softmax_sampler_is_a_seeded_shuffle(root):
    cfg = synthetic_cfg(root)
    cfg.DATALOADER.SAMPLER = "softmax"
    b = build_dataloaders(cfg)
    sampler = b.train_stage2.batch_sampler
    assert isinstance(sampler, ShuffleBatchSampler)
    assert len(b.train_stage2) == 24 // 8
    assert sorted(i.index for batch in sampler for i in batch) == list(range(24))


def test_iters_per_epoch_fixes_the_stage2_length_also_after_relabelling(root):
    cfg = synthetic_cfg(root)
    one_pass = build_dataloaders(cfg).train_stage2
    n_pass = len(one_pass)  # 4 ids x 6 images, P = 4, K = 2: 3 batches
    assert n_pass == 3
    cfg.DATALOADER.ITERS_PER_EPOCH = 7
    b = build_dataloaders(cfg)
    assert isinstance(b.train_stage2.batch_sampler, FixedLengthBatchSampler)
    b.train_stage2.batch_sampler.set_epoch(1)
    one_pass.batch_sampler.set_epoch(1)
    batches = [x["paths"] for x in b.train_stage2]
    assert len(b.train_stage2) == len(batches) == 7
    # The first pass is the plain loader's epoch; the sampler then restarts.
    assert batches[:n_pass] == [x["paths"] for x in one_pass]
    assert batches[n_pass : 2 * n_pass] != batches[:n_pass]
    # The relabelled loader of unsupervised training keeps the fixed length.
    loader = b.set_train_labels(list(range(16)), [i // 4 for i in range(16)])
    assert isinstance(loader.batch_sampler, FixedLengthBatchSampler)
    assert len(loader) == len(list(loader)) == 7
    with pytest.raises(ConfigError, match="ITERS_PER_EPOCH"):
        load_cfg(None, ["DATALOADER.ITERS_PER_EPOCH", "-1"])


def test_vehicleid_trials(tmp_path):
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
        split = b.dataset.for_trial(t)
        query, gallery = split.query, split.gallery
        assert sorted(r.pid for r in gallery) == [3, 4] and len(query) == 4
        galleries.append(tuple(r.path for r in gallery))
        assert [r.camid for r in query + gallery] == [0, 0, 0, 0, 1, 1]
    assert b.val.dataset.records == b.dataset.for_trial(0).query + b.dataset.for_trial(0).gallery
    assert len(set(galleries)) > 1
    again = build_dataloaders(cfg)
    assert [tuple(r.path for r in again.dataset.for_trial(t).gallery) for t in range(6)] == (
        galleries
    )
    batch = next(iter(b.val))
    assert batch["camids"].tolist() == [0, 0, 0, 0, 1, 1]


@dataclass(frozen=True)
class ToyLayout(Layout):
    """A user format the package does not know: ``<dir>/<split>/id<pid>-cam<camera>-<n>.png``."""

    def required(self, options: DatasetOptions) -> list[str]:
        return ["train", "query", "gallery"]

    def tree(self, options: DatasetOptions) -> list[tuple[int, str, str]]:
        return [(1, f"{s}/", "id<pid>-cam<camera>-<n>.png") for s in ("train", "query", "gallery")]

    def load(self, root, options: DatasetOptions) -> ReIDDataset:
        folder = self.find(root, options)
        splits = {}
        for split in ("train", "query", "gallery"):
            splits[split] = []
            for path in sorted((folder / split).iterdir()):
                pid, cam, _ = re.fullmatch(r"id(\d+)-cam(\d+)-(\d+)\.png", path.name).groups()
                splits[split].append(ImageRecord(str(path), int(pid), int(cam), 0))
        train = splits["train"]
        relabel = {p: i for i, p in enumerate(sorted({r.pid for r in train}))}
        train = [r._replace(pid=relabel[r.pid]) for r in train]
        return ReIDDataset(self.name, train, splits["query"], splits["gallery"], root=str(folder))


def test_user_registered_layout_loads_through_the_config(tmp_path, monkeypatch):
    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))  # registry restored afterwards
    d = tmp_path / "ToyData"
    names = {
        "train": [(7, 0, 0), (7, 1, 1), (9, 0, 2), (9, 1, 3), (12, 0, 4), (12, 1, 5)],
        "query": [(20, 0, 0), (21, 1, 1)],
        "gallery": [(20, 1, 2), (21, 0, 3), (22, 0, 4)],
    }
    for split, items in names.items():
        (d / split).mkdir(parents=True)
        for pid, cam, n in items:
            Image.new("RGB", (8, 16), (pid * 10, cam * 100, n)).save(
                d / split / f"id{pid}-cam{cam}-{n}.png"
            )
    opts = [
        "DATASETS.NAMES", "['toy']", "DATASETS.ROOT_DIR", str(tmp_path),
        "INPUT.SIZE_TRAIN", "[32, 16]", "INPUT.SIZE_TEST", "[32, 16]",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.NUM_INSTANCE", "2",
        "SOLVER.STAGE2.IMS_PER_BATCH", "4",
    ]  # fmt: skip
    # An unknown name is refused when the config is loaded, before any data is read.
    with pytest.raises(ConfigError, match="DATASETS.NAMES = 'toy'"):
        load_cfg(None, opts)

    layout = register_dataset(ToyLayout(name="toy", dataset_dirs=("ToyData",)))
    assert "toy" in DATASETS.names() and get_layout("toy") is layout
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(ToyLayout(name="toy", dataset_dirs=("Elsewhere",)))
    assert register_dataset(layout, overwrite=True) is layout

    cfg = load_cfg(None, opts)
    dataset, _ = build_datasets(cfg)
    # train pids 7, 9, 12 -> 0, 1, 2 (file names sort 'id12' first); camids as written
    expected = [(2, 0), (2, 1), (0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(r.pid, r.camid) for r in dataset.train] == expected
    b = build_dataloaders(cfg)
    assert (b.num_classes, b.num_cameras, b.num_query) == (3, 2, 2)
    assert [r.path for r in b.val.dataset.records] == [
        str(d / s / f"id{p}-cam{c}-{n}.png") for s in ("query", "gallery") for p, c, n in names[s]
    ]
    batch = next(iter(b.train_stage2))
    by_path = {r.path: r.pid for r in dataset.train}
    assert [by_path[p] for p in batch["paths"]] == batch["pids"].tolist()
    assert sorted(Counter(batch["pids"].tolist()).values()) == [2, 2]
    val = next(iter(b.val))
    assert val["pids"].tolist()[:5] == [20, 21, 20, 21, 22]


def test_unreadable_eval_images_fail_fast_or_are_left_out(tmp_path, caplog):
    broken, clean = tmp_path / "broken", tmp_path / "clean"
    folder = generate_synthetic_reid(broken, num_ids=8, num_cameras=2, size=(32, 16))
    shutil.copytree(broken, clean)
    bad_query = sorted((folder / "query").iterdir())[1]
    bad_gallery = next(
        p for p in sorted((folder / "bounding_box_test").iterdir()) if p.name[0] != "-"
    )
    bad_query.write_bytes(bad_query.read_bytes()[:300])  # truncated
    bad_gallery.write_bytes(b"\xff\xd8 garbage")
    for p in (bad_query, bad_gallery):  # the clean tree is the broken one without those files
        (clean / p.relative_to(broken)).unlink()

    def cfg_for(root, skip):
        opts = [
            "DATASETS.NAMES", "['market1501']", "DATASETS.ROOT_DIR", str(root),
            "DATASETS.SKIP_CORRUPT", str(skip), "INPUT.SIZE_TRAIN", "[32, 16]",
            "INPUT.SIZE_TEST", "[32, 16]", "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.STAGE2.IMS_PER_BATCH", "8", "MODEL.DEVICE", "cpu",
        ]  # fmt: skip
        return load_cfg(None, opts)

    with pytest.raises(CorruptImageError) as err:
        build_dataloaders(cfg_for(broken, False))
    msg = str(err.value)
    assert "2 query/gallery image(s) cannot be read" in msg
    assert str(bad_query) in msg and str(bad_gallery) in msg and "DATASETS.SKIP_CORRUPT" in msg

    with caplog.at_level(logging.WARNING, logger="datasets"):
        skipped = build_dataloaders(cfg_for(broken, True))
    reference = build_dataloaders(cfg_for(clean, False))
    full = build_datasets(cfg_for(broken, True))[0]
    # exactly the two unreadable images are gone: one query, one gallery
    assert skipped.num_query == len(full.query) - 1 == reference.num_query
    assert len(skipped.dataset.gallery) == len(full.gallery) - 1 == len(reference.dataset.gallery)
    val_paths = [r.path for r in skipped.val.dataset.records]
    assert str(bad_query) not in val_paths and str(bad_gallery) not in val_paths
    assert not skipped.val.dataset.skip_corrupt  # evaluation never substitutes an image
    assert f"left out of the evaluation: {bad_query}" in caplog.text
    assert f"left out of the evaluation: {bad_gallery}" in caplog.text
    assert "2 unreadable query/gallery image(s) left out of the evaluation" in caplog.text

    settings = build_eval_settings(cfg_for(clean, False))
    model, cpu = MeanColour(), torch.device("cpu")
    got = evaluate_bundle(model, skipped, settings, cpu)
    want = evaluate_bundle(model, reference, settings, cpu)
    assert got == pytest.approx(want, abs=1e-6) and got["mAP"] > 0
