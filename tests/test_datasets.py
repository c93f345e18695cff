"""Dataset parsing: tiny trees in every real layout, expected records worked out by hand."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs.defaults import get_cfg_defaults
from datasets.bases import (
    ISSUE,
    ISSUE_NON_IMAGE,
    CorruptImageError,
    DatasetFormatError,
    DatasetLayoutError,
    ImageRecord,
    SplitStats,
)
from datasets.build import build_datasets, get_layout
from datasets.custom import CSV, FOLDER
from datasets.dukemtmc import DUKEMTMC, OCC_DUKE
from datasets.image_dataset import ImageDataset, check_images_readable, read_image
from datasets.layouts import DatasetOptions
from datasets.market1501 import MARKET1501
from datasets.msmt17 import MSMT17
from datasets.vehicleid import VEHICLEID
from datasets.veri import VERI

OPTS = DatasetOptions()


def touch(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def rec(path: Path, pid: int, camid: int, viewid: int = 0) -> ImageRecord:
    return ImageRecord(str(path), pid, camid, viewid)


def make_market(root: Path) -> Path:
    d = root / "Market-1501-v15.09.15"
    touch(
        d / "bounding_box_train",
        [
            "0010_c6s4_002000_02.jpg",
            "0002_c1s1_000451_03.jpg",
            "0007_c3s2_000100_01.jpg",
            "0002_c2s1_000551_01.jpg",
            "Thumbs.db",
        ],
    )
    touch(d / "query", ["0004_c5s1_000200_00.jpg", "0003_c1s1_000100_00.jpg"])
    touch(
        d / "bounding_box_test",
        [
            "0000_c1s1_000001_00.jpg",
            "-1_c2s1_000002_00.jpg",
            "0003_c2s1_000300_01.jpg",
            "0004_c1s1_000400_01.jpg",
            "0005_c4s1_000500_01.jpg",
        ],
    )
    return d


def test_market_records_junk_distractors_and_relabel(tmp_path):
    # The parent folder itself looks like "<pid>_c<cam>": only the file name may be matched.
    root = tmp_path / "0099_c3_data"
    d = make_market(root)
    ds = MARKET1501.load(root, OPTS)
    tr, q, g = d / "bounding_box_train", d / "query", d / "bounding_box_test"
    # train pids {2, 7, 10} -> 0, 1, 2 in sorted order; camera cN -> camid N-1.
    assert ds.train == [
        rec(tr / "0002_c1s1_000451_03.jpg", 0, 0),
        rec(tr / "0002_c2s1_000551_01.jpg", 0, 1),
        rec(tr / "0007_c3s2_000100_01.jpg", 1, 2),
        rec(tr / "0010_c6s4_002000_02.jpg", 2, 5),
    ]
    assert ds.query == [
        rec(q / "0003_c1s1_000100_00.jpg", 3, 0),
        rec(q / "0004_c5s1_000200_00.jpg", 4, 4),
    ]
    # junk (-1) dropped, distractor (0) kept, raw pids.
    assert ds.gallery == [
        rec(g / "0000_c1s1_000001_00.jpg", 0, 0),
        rec(g / "0003_c2s1_000300_01.jpg", 3, 1),
        rec(g / "0004_c1s1_000400_01.jpg", 4, 0),
        rec(g / "0005_c4s1_000500_01.jpg", 5, 3),
    ]
    assert ds.statistics() == {
        "train": SplitStats(3, 4, 4, 1),
        "query": SplitStats(2, 2, 2, 1),
        "gallery": SplitStats(4, 4, 3, 1),
    }
    assert ds.num_train_pids == 3 and ds.num_cameras == 6 and ds.num_views == 1


def test_msmt17_list_layout_merges_val(tmp_path):
    d = tmp_path / "MSMT17_V1"
    (d / "train").mkdir(parents=True)
    (d / "test").mkdir()
    (d / "list_train.txt").write_text(
        "0001/0001_000_14_0303noon_0001_0.jpg 1\n0000/0000_000_01_0303morning_0015_0.jpg 0\n"
    )
    (d / "list_val.txt").write_text("0000/0000_001_05_0303afternoon_0002_1.jpg 0\n")
    (d / "list_query.txt").write_text("0000/0000_003_02_0113morning_0001_0.jpg 0\n")
    (d / "list_gallery.txt").write_text(
        "0001/0001_000_07_0113noon_0003_0.jpg 1\n0000/0000_004_15_0113noon_0002_0.jpg 0\n"
    )
    ds = MSMT17.load(tmp_path, OPTS)
    assert ds.name == "msmt17"
    assert ds.train == [
        rec(d / "train/0000/0000_000_01_0303morning_0015_0.jpg", 0, 0),
        rec(d / "train/0000/0000_001_05_0303afternoon_0002_1.jpg", 0, 4),
        rec(d / "train/0001/0001_000_14_0303noon_0001_0.jpg", 1, 13),
    ]
    assert ds.query == [rec(d / "test/0000/0000_003_02_0113morning_0001_0.jpg", 0, 1)]
    assert ds.gallery == [
        rec(d / "test/0000/0000_004_15_0113noon_0002_0.jpg", 0, 14),
        rec(d / "test/0001/0001_000_07_0113noon_0003_0.jpg", 1, 6),
    ]


def test_msmt17_folder_layout(tmp_path):
    d = tmp_path / "MSMT17"
    touch(d / "bounding_box_train", ["0005_c15_0001.jpg", "0003_c2_0002.jpg"])
    touch(d / "query", ["0100_c1_0001.jpg"])
    touch(d / "bounding_box_test", ["0100_c9_0003.jpg"])
    ds = MSMT17.load(tmp_path, OPTS)
    assert ds.train == [
        rec(d / "bounding_box_train/0003_c2_0002.jpg", 0, 1),
        rec(d / "bounding_box_train/0005_c15_0001.jpg", 1, 14),
    ]
    assert ds.query == [rec(d / "query/0100_c1_0001.jpg", 100, 0)]
    assert ds.gallery == [rec(d / "bounding_box_test/0100_c9_0003.jpg", 100, 8)]


def test_msmt17_missing_shows_both_layouts(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        MSMT17.load(tmp_path, OPTS)
    msg = str(err.value)
    assert "list_train.txt" in msg and "bounding_box_train" in msg and "DATASETS.ROOT_DIR" in msg


@pytest.mark.parametrize(
    "layout,folder",
    [
        (DUKEMTMC, "dukemtmcreid/DukeMTMC-reID"),
        (DUKEMTMC, "DukeMTMC-reID"),
        (OCC_DUKE, "dukemtmcreid/Occluded_Duke"),
        (OCC_DUKE, "Occluded_Duke"),
    ],
)
def test_duke_and_occluded_duke(tmp_path, layout, folder):
    d = tmp_path / folder
    touch(d / "bounding_box_train", ["0012_c8_f0000123.jpg", "0001_c2_f0046182.jpg"])
    touch(d / "query", ["0005_c1_f0000001.jpg"])
    touch(d / "bounding_box_test", ["0005_c7_f0000002.jpg"])
    ds = layout.load(tmp_path, OPTS)
    assert ds.name == layout.name
    assert ds.train == [
        rec(d / "bounding_box_train/0001_c2_f0046182.jpg", 0, 1),
        rec(d / "bounding_box_train/0012_c8_f0000123.jpg", 1, 7),
    ]
    assert ds.query == [rec(d / "query/0005_c1_f0000001.jpg", 5, 0)]
    assert ds.gallery == [rec(d / "bounding_box_test/0005_c7_f0000002.jpg", 5, 6)]


def test_camera_out_of_range_names_the_file(tmp_path):
    d = tmp_path / "DukeMTMC-reID"
    touch(d / "bounding_box_train", ["0001_c9_f0000001.jpg"])
    touch(d / "query", ["0005_c1_f0000001.jpg"])
    touch(d / "bounding_box_test", ["0005_c2_f0000002.jpg"])
    with pytest.raises(DatasetFormatError, match=r"c9 in .*0001_c9_f0000001\.jpg.*c1\.\.c8"):
        DUKEMTMC.load(tmp_path, OPTS)


def make_veri(root: Path, keypoints: Path | None) -> Path:
    d = root / "VeRi"
    touch(
        d / "image_train",
        ["0001_c001_00016450_0.jpg", "0003_c020_00020000_1.jpg", "0001_c002_00016460_0.jpg"],
    )
    touch(d / "image_query", ["0002_c003_00010000_0.jpg"])
    touch(d / "image_test", ["0002_c004_00010100_0.jpg", "0002_c005_00010200_0.jpg"])
    if keypoints is not None:
        keypoints.mkdir(parents=True, exist_ok=True)
        kp = " ".join(["-1"] * 40)
        (keypoints / "keypoint_train.txt").write_text(
            f"VeRi/image_train/0001_c001_00016450_0.jpg {kp} 3\n"
            f"VeRi/image_train/0003_c020_00020000_1.jpg {kp} 7\n"
        )
        (keypoints / "keypoint_test.txt").write_text(
            f"VeRi/image_test/0002_c003_00010000_0.jpg {kp} 5\n"
            f"VeRi/image_test/0002_c004_00010100_0.jpg {kp} 0\n"
        )
    return d


def test_veri_keeps_unlabelled_views_as_index_8(tmp_path, monkeypatch):
    d = make_veri(tmp_path, tmp_path / "VeRi")
    # Keypoint files in the working directory must never be read.
    cwd = tmp_path / "cwd"
    make_veri(cwd, cwd)
    (cwd / "keypoint_train.txt").write_text("x/0001_c002_00016460_0.jpg 1\n")
    monkeypatch.chdir(cwd)
    ds = VERI.load(tmp_path, OPTS)
    tr = d / "image_train"
    assert ds.train == [
        rec(tr / "0001_c001_00016450_0.jpg", 0, 0, 3),
        rec(tr / "0001_c002_00016460_0.jpg", 0, 1, 8),
        rec(tr / "0003_c020_00020000_1.jpg", 1, 19, 7),
    ]
    assert ds.query == [rec(d / "image_query/0002_c003_00010000_0.jpg", 2, 2, 5)]
    assert ds.gallery == [
        rec(d / "image_test/0002_c004_00010100_0.jpg", 2, 3, 0),
        rec(d / "image_test/0002_c005_00010200_0.jpg", 2, 4, 8),
    ]
    assert ds.num_views == 9


@pytest.mark.parametrize(
    "opts", [DatasetOptions(veri_drop_unlabeled=True), DatasetOptions(require_views=True)]
)
def test_veri_drop_unlabelled(tmp_path, opts):
    d = make_veri(tmp_path, tmp_path / "VeRi")
    ds = VERI.load(tmp_path, opts)
    assert [Path(r.path).name for r in ds.train] == [
        "0001_c001_00016450_0.jpg",
        "0003_c020_00020000_1.jpg",
    ]
    assert ds.gallery == [rec(d / "image_test/0002_c004_00010100_0.jpg", 2, 3, 0)]
    assert ds.num_views == 8


def test_veri_keypoint_dir_option_and_missing_files(tmp_path):
    make_veri(tmp_path, tmp_path / "labels")
    ds = VERI.load(tmp_path, DatasetOptions(veri_keypoint_dir=str(tmp_path / "labels")))
    assert [r.viewid for r in ds.train] == [3, 8, 7]
    # Without the files every view is unknown, or the drop switch explains what is missing.
    no_kp = VERI.load(tmp_path, OPTS)
    assert {r.viewid for s in (no_kp.train, no_kp.query, no_kp.gallery) for r in s} == {8}
    with pytest.raises(DatasetLayoutError, match="keypoint_train.txt.*VERI_DROP_UNLABELED"):
        VERI.load(tmp_path, DatasetOptions(veri_drop_unlabeled=True))


def make_vehicleid(root: Path) -> Path:
    d = root / "VehicleID_V1.0"
    (d / "image").mkdir(parents=True)
    s = d / "train_test_split"
    s.mkdir()
    (s / "train_list.txt").write_text("0000010 9\n0000001 5\n0000002 5\n")
    pool = "0000100 20\n0000101 20\n0000102 20\n0000200 30\n0000201 30\n"
    (s / "test_list_800.txt").write_text(pool)
    (s / "test_list_1600.txt").write_text(pool + "0000300 40\n0000301 40\n")
    return d


def test_vehicleid_train_and_trial_protocol(tmp_path):
    d = make_vehicleid(tmp_path)
    ds = VEHICLEID.load(tmp_path, DatasetOptions(seed=7))
    img = d / "image"
    assert ds.train == [
        rec(img / "0000001.jpg", 0, 0),
        rec(img / "0000002.jpg", 0, 0),
        rec(img / "0000010.jpg", 1, 0),
    ]
    assert not ds.has_camera_ids and ds.has_trials
    splits = []
    for t in range(8):
        trial = ds.for_trial(t)
        # one gallery image per identity, camid 1; every other test image a query, camid 0
        assert sorted(r.pid for r in trial.gallery) == [20, 30]
        assert {r.camid for r in trial.gallery} == {1} and {r.camid for r in trial.query} == {0}
        assert sorted(r.path for r in trial.query + trial.gallery) == sorted(
            str(img / f"{n}.jpg") for n in ("0000100", "0000101", "0000102", "0000200", "0000201")
        )
        splits.append(tuple(r.path for r in trial.gallery))
    assert ds.for_trial(0).gallery == ds.gallery  # trial 0 is the load-time split
    assert len(set(splits)) > 1  # trials draw different galleries
    again = VEHICLEID.load(tmp_path, DatasetOptions(seed=7))
    assert [again.for_trial(t).gallery for t in range(8)] == [
        ds.for_trial(t).gallery for t in range(8)
    ]
    big = VEHICLEID.load(tmp_path, DatasetOptions(vehicleid_test_size=1600))
    assert sorted({r.pid for r in big.gallery}) == [20, 30, 40]
    with pytest.raises(DatasetFormatError, match="800, 1600, 2400"):
        VEHICLEID.load(tmp_path, DatasetOptions(vehicleid_test_size=999))


def test_folder_dataset_with_camera_tokens(tmp_path):
    root = tmp_path / "0001_c9_custom"  # a parent folder with a camera-like token
    touch(root / "train/alice", ["a_c1_001.jpg", "a_c3_002.jpg"])
    touch(root / "train/bob", ["b_c2_001.png"])
    touch(root / "query/carol", ["x_c1.jpg"])
    touch(root / "gallery/carol", ["y_c2.jpg"])
    touch(root / "gallery/dave", ["z_c3.jpg"])
    ds = FOLDER.load(root, OPTS)
    assert ds.train == [
        rec(root / "train/alice/a_c1_001.jpg", 0, 0),
        rec(root / "train/alice/a_c3_002.jpg", 0, 2),
        rec(root / "train/bob/b_c2_001.png", 1, 1),
    ]
    assert ds.query == [rec(root / "query/carol/x_c1.jpg", 0, 0)]
    assert ds.gallery == [
        rec(root / "gallery/carol/y_c2.jpg", 0, 1),
        rec(root / "gallery/dave/z_c3.jpg", 1, 2),
    ]
    assert ds.has_camera_ids


def test_folder_dataset_without_cameras_numeric_ids(tmp_path):
    touch(tmp_path / "train/0007", ["a.jpg", "b.jpg"])
    touch(tmp_path / "train/0003", ["c.jpg"])
    touch(tmp_path / "query/0011", ["q.jpg"])
    touch(tmp_path / "gallery/0011", ["g.jpg"])
    touch(tmp_path / "gallery/0000", ["distractor.jpg"])
    touch(tmp_path / "gallery/-1", ["junk.jpg"])
    ds = FOLDER.load(tmp_path, OPTS)
    assert [(Path(r.path).name, r.pid, r.camid) for r in ds.train] == [
        ("c.jpg", 0, 0),
        ("a.jpg", 1, 0),
        ("b.jpg", 1, 0),
    ]
    # Without camera ids: query camid 0, gallery camid 1, so the same-camera filter keeps all.
    assert [(r.pid, r.camid) for r in ds.query] == [(11, 0)]
    assert [(Path(r.path).name, r.pid, r.camid) for r in ds.gallery] == [
        ("distractor.jpg", 0, 1),
        ("g.jpg", 11, 1),
    ]
    assert not ds.has_camera_ids and ds.num_cameras == 1


def test_folder_dataset_mixed_camera_tokens_is_an_error(tmp_path):
    touch(tmp_path / "train/a", ["x_c1.jpg", "y.jpg"])
    touch(tmp_path / "query/b", ["q_c1.jpg"])
    touch(tmp_path / "gallery/b", ["g_c2.jpg"])
    with pytest.raises(DatasetFormatError, match="y.jpg"):
        FOLDER.load(tmp_path, OPTS)


def test_csv_dataset_paths_relative_to_the_list(tmp_path):
    lists = tmp_path / "lists"
    touch(lists / "imgs", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    (lists / "data.csv").write_text(
        "path,pid,camid,viewid,split\n"
        "imgs/b.jpg,7,5,1,train\n"
        "imgs/a.jpg,3,2,0,train\n"
        f"{lists / 'imgs/c.jpg'},40,2,0,query\n"
        "imgs/d.jpg,40,9,1,Gallery\n"
    )
    cfg_list = str(lists / "data.csv")
    ds = CSV.load(tmp_path / "elsewhere", DatasetOptions(list_file=cfg_list))
    # camids {2, 5, 9} -> 0, 1, 2; train pids {3, 7} -> 0, 1
    assert ds.train == [rec(lists / "imgs/a.jpg", 0, 0, 0), rec(lists / "imgs/b.jpg", 1, 1, 1)]
    assert ds.query == [rec(lists / "imgs/c.jpg", 40, 0, 0)]
    assert ds.gallery == [rec(lists / "imgs/d.jpg", 40, 2, 1)]
    assert ds.num_views == 2


def test_tsv_dataset_paths_relative_to_root_dir(tmp_path):
    touch(tmp_path / "images", ["a.jpg", "q.jpg", "g.jpg"])
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/list.tsv").write_text(
        "split\tpath\tpid\ntrain\timages/a.jpg\t3\nquery\timages/q.jpg\t8\n"
        "gallery\timages/g.jpg\t8\n"
    )
    ds = CSV.load(tmp_path, DatasetOptions(list_file="meta/list.tsv"))  # relative to ROOT_DIR
    assert ds.train == [rec(tmp_path / "images/a.jpg", 0, 0)]
    assert ds.query == [rec(tmp_path / "images/q.jpg", 8, 0)]
    assert ds.gallery == [rec(tmp_path / "images/g.jpg", 8, 1)]
    (tmp_path / "meta/bad.csv").write_text("file,pid,split\nimages/a.jpg,1,train\n")
    with pytest.raises(DatasetFormatError, match=r"lacks column\(s\) \['path'\].*found"):
        CSV.load(tmp_path, DatasetOptions(list_file="meta/bad.csv"))


def base_cfg(root: Path, names: list[str]):
    cfg = get_cfg_defaults()
    cfg.DATASETS.NAMES = names
    cfg.DATASETS.ROOT_DIR = str(root)
    return cfg


def test_combined_datasets_disjoint_pids_and_cameras(tmp_path, caplog, capsys):
    make_market(tmp_path)
    d = tmp_path / "DukeMTMC-reID"
    touch(d / "bounding_box_train", ["0012_c8_f0000123.jpg", "0001_c2_f0046182.jpg"])
    touch(d / "query", ["0005_c1_f0000001.jpg"])
    touch(d / "bounding_box_test", ["0005_c7_f0000002.jpg"])
    with caplog.at_level(logging.INFO, logger="datasets"):
        ds, parts = build_datasets(base_cfg(tmp_path, ["market1501", "dukemtmc"]))
    market, duke = parts
    # Market: 3 train ids, cameras up to c6 -> Duke pids start at 3, camids at 6.
    assert ds.train[:4] == market.train
    assert [(r.pid, r.camid) for r in ds.train[4:]] == [(3, 6 + 1), (4, 6 + 7)]
    assert ds.query == market.query and ds.gallery == market.gallery
    assert ds.num_train_pids == 5 and ds.num_cameras == 14
    # statistics are logged, not printed
    assert "Dataset statistics: market1501" in caplog.text
    assert "Dataset statistics: dukemtmc" in caplog.text
    assert capsys.readouterr().out == ""


def test_missing_root_shows_layout_and_key(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        build_datasets(base_cfg(tmp_path / "nowhere", ["market1501"]))
    msg = str(err.value)
    assert "DATASETS.ROOT_DIR" in msg and "does not exist" in msg
    assert "└── Market-1501-v15.09.15/" in msg
    for sub in ("bounding_box_train/", "query/", "bounding_box_test/"):
        assert sub in msg


def test_missing_split_folder_is_named(tmp_path):
    touch(tmp_path / "Market-1501-v15.09.15/bounding_box_train", ["0002_c1s1_000451_03.jpg"])
    with pytest.raises(DatasetLayoutError, match=r"lacks 'query', 'bounding_box_test'"):
        MARKET1501.load(tmp_path, OPTS)


def test_unknown_name_lists_valid_names_and_closest():
    with pytest.raises(ValueError) as err:
        get_layout("Market1501x")
    msg = str(err.value)
    assert isinstance(err.value, KeyError)  # the registry's UnknownNameError, also a ValueError
    assert "DATASETS.NAMES = 'Market1501x'" in msg and "did you mean 'market1501'" in msg
    assert all(n in msg for n in ("msmt17", "occ_duke", "VehicleID", "folder", "csv", "synthetic"))
    with pytest.raises(ValueError, match="'VehicleID'"):
        get_layout("vehicleid")


def test_empty_split_and_query_without_gallery_match(tmp_path, caplog):
    d = make_market(tmp_path)
    for f in (d / "query").iterdir():
        f.unlink()
    with pytest.raises(DatasetFormatError, match="query split is empty"):
        MARKET1501.load(tmp_path, OPTS)
    touch(d / "query", ["0003_c1s1_000100_00.jpg", "0042_c1s1_000100_00.jpg", "0042_c2s1_1.jpg"])
    with caplog.at_level(logging.WARNING, logger="datasets"):
        build_datasets(base_cfg(tmp_path, ["market1501"]))
    assert "1 query identities (2 images) never appear in the gallery" in caplog.text
    # gallery camera c4 (camid 3) never occurs in training (c1, c2, c3, c6); the queries are c1, c2
    assert "camera ids [3] of query/gallery never occur in training" in caplog.text


def write_image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), colour).save(path)


def test_corrupt_image_named_or_skipped(tmp_path, caplog):
    good_a, bad, good_b = tmp_path / "a.png", tmp_path / "bad.jpg", tmp_path / "b.png"
    write_image(good_a, (10, 20, 30))
    write_image(good_b, (200, 100, 0))
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    records = [rec(good_a, 5, 0), rec(bad, 7, 1), rec(good_b, 7, 0)]
    with pytest.raises(CorruptImageError, match=r"bad\.jpg.*DATASETS\.SKIP_CORRUPT"):
        ImageDataset(records)[1]
    with pytest.raises(CorruptImageError, match="missing.jpg"):
        ImageDataset([rec(tmp_path / "missing.jpg", 1, 0)])[0]
    ds = ImageDataset(records, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        sample = ds[1]
        ds[1]  # a known-bad file is not retried
    # replaced by the other image of the same identity
    assert sample["path"] == str(good_b) and sample["pid"] == 7
    assert torch.equal(sample["image"][:, 0, 0], torch.tensor([200, 100, 0], dtype=torch.uint8))
    assert ds.num_skipped == 1
    assert "1 unreadable image(s) skipped" in caplog.text and "bad.jpg" in caplog.text
    assert os.path.exists(bad)
    # formats torchvision does not decode go through PIL
    bmp = tmp_path / "c.bmp"
    write_image(bmp, (1, 2, 3))
    image = ImageDataset([rec(bmp, 1, 0)])[0]["image"]
    assert image.shape == (3, 16, 8) and image[:, 5, 5].tolist() == [1, 2, 3]


def test_csv_non_integer_ids_are_rejected_with_file_and_line(tmp_path):
    touch(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    lst = tmp_path / "data.csv"
    # the blank line 3 is skipped by the CSV reader; line numbers still count it
    lst.write_text("path,pid,camid,split\nimgs/a.jpg,7,0,train\n\nimgs/b.jpg,1O,1,query\n")
    with pytest.raises(DatasetFormatError, match=r"data\.csv:4: pid '1O' is not an integer"):
        CSV.load(tmp_path, DatasetOptions(list_file=str(lst)))
    lst.write_text("path,pid,camid,split\nimgs/a.jpg,7,0,train\nimgs/b.jpg,8,c2,query\n")
    with pytest.raises(DatasetFormatError, match=r"data\.csv:3: camid 'c2' is not a non-neg"):
        CSV.load(tmp_path, DatasetOptions(list_file=str(lst)))


def test_csv_missing_or_extra_column_names_the_file_and_columns(tmp_path):
    touch(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    lst = tmp_path / "data.csv"
    lst.write_text("path,pid,split\nimgs/a.jpg,7,train\nimgs/b.jpg,8\nimgs/c.jpg,8,gallery\n")
    with pytest.raises(DatasetFormatError) as err:
        CSV.load(tmp_path, DatasetOptions(list_file=str(lst)))
    msg = str(err.value)
    assert f"{lst}:3: missing column(s) ['split']" in msg
    assert "the line has 2 field(s), the header names ['path', 'pid', 'split']" in msg
    assert "not one of" not in msg  # not reported as a bad split value
    lst.write_text("path,pid,split\nimgs/a.jpg,7,train,5\n")
    with pytest.raises(DatasetFormatError, match=r"data\.csv:2: 1 field\(s\) more than the header"):
        CSV.load(tmp_path, DatasetOptions(list_file=str(lst)))


def issue_records(caplog, kind: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, ISSUE, None) == kind]


def test_non_image_files_are_counted_in_one_warning_per_folder(tmp_path, caplog):
    touch(tmp_path / "train/alice", ["a_c1.jpg", "notes.txt", ".DS_Store"])
    touch(tmp_path / "train/bob", ["b_c2.jpg", "b_c2.jpg.part"])
    touch(tmp_path / "train", ["README.md"])
    touch(tmp_path / "query/carol", ["q_c1.jpg"])
    touch(tmp_path / "gallery/carol", ["g_c2.jpg"])
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ds = FOLDER.load(tmp_path, OPTS)
    assert len(ds.train) == 2
    messages = [r.getMessage() for r in issue_records(caplog, ISSUE_NON_IMAGE)]
    assert messages == [
        f"folder: 1 file(s) in {tmp_path / 'train'} skipped: outside the identity folders; "
        "e.g. README.md",
        f"folder: 3 file(s) in {tmp_path / 'train'} skipped: not images (extension not one of "
        ".jpg .jpeg .png .bmp .webp .tif .tiff); e.g. alice/.DS_Store, alice/notes.txt, "
        "bob/b_c2.jpg.part",
    ]
    caplog.clear()
    make_market(tmp_path / "m")  # Thumbs.db in bounding_box_train
    with caplog.at_level(logging.WARNING, logger="datasets"):
        MARKET1501.load(tmp_path / "m", OPTS)
    (record,) = issue_records(caplog, ISSUE_NON_IMAGE)
    assert "market1501: 1 file(s) in" in record.getMessage()
    assert record.getMessage().endswith(
        "bounding_box_train skipped: not images (extension not "
        "one of .jpg .jpeg .png .bmp .webp .tif .tiff); e.g. Thumbs.db"
    )


def test_check_images_readable_matches_full_decoding(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)
    good = tmp_path / "good.jpg"
    Image.fromarray(pixels).save(good, quality=90)
    data = good.read_bytes()
    files = {
        "good.jpg": data,
        "padded.jpg": data + b"\0" * 20,  # bytes after the end marker: decoders accept it
        "half.jpg": data[: len(data) // 2],
        "no_end_marker.jpg": data[:-2],
        "garbage.jpg": b"\xff\xd8 definitely not a jpeg",
        "text.png": b"hello",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    Image.fromarray(pixels).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
    names = [*files, "good.png", "half.png", "missing.jpg"]
    records = [rec(tmp_path / n, i, 0) for i, n in enumerate(names)]
    records.append(records[2])  # a path listed twice is reported once

    expected = []  # brute force: the files the training decoder refuses
    for name in names:
        try:
            read_image(str(tmp_path / name))
        except CorruptImageError:
            expected.append(str(tmp_path / name))
    assert [Path(p).name for p in expected] == [
        "half.jpg", "no_end_marker.jpg", "garbage.jpg", "text.png", "half.png", "missing.jpg"
    ]  # fmt: skip
    bad = check_images_readable(records, "test")
    assert [b.path for b in bad] == expected
    assert [b.path for b in check_images_readable(records, "test", decode=True)] == expected
    assert dict(bad)[str(tmp_path / "missing.jpg")] == "no such file"
    assert all(b.reason for b in bad)
