"""tools/check_dataset.py: tiny trees in the real layouts, report content and exit codes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PIL import Image

from datasets import DATASETS, get_layout, register_dataset
from datasets.bases import PublishedSplit, SplitStats
from datasets.layouts import DatasetOptions
from tools.check_dataset import compare_published, main

TRAIN = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s2_000100_01.jpg"]
QUERY = ["0003_c1s1_000100_00.jpg", "0004_c2s1_000200_00.jpg"]
GALLERY = [
    "0000_c1s1_000001_00.jpg",  # distractor: kept, counts as one identity
    "-1_c2s1_000002_00.jpg",  # junk: dropped
    "0003_c2s1_000300_01.jpg",
    "0004_c1s1_000400_01.jpg",
]


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 16), (20 * i, 100, 50)).save(folder / name, quality=90)


def market_tree(root: Path) -> Path:
    d = root / "Market-1501-v15.09.15"
    write_images(d / "bounding_box_train", TRAIN)
    write_images(d / "query", QUERY)
    write_images(d / "bounding_box_test", GALLERY)
    return d


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# train 2 ids / 3 images / 3 cameras; query 2 / 2 / 2; gallery 0, 3, 4 (junk dropped): 3 / 3 / 2
TABLE = """\
  split   |  # ids | # images | # cameras | published ids / images
  train   |      2 |        3 |         3 | 751 / 12,936
  query   |      2 |        2 |         2 | 750 / 3,368
  gallery |      3 |        3 |         2 | 751 / 15,913"""


def test_good_tree_passes_with_subset_and_fails_against_the_published_figures(tmp_path, capsys):
    d = market_tree(tmp_path)
    code, out, err = run(capsys, "--name", "market1501", "--root", str(tmp_path), "--subset")
    assert code == 0 and err == ""
    assert out.startswith(f"Dataset market1501 (DATASETS.ROOT_DIR = {tmp_path})\n{TABLE}\n")
    assert f"  PASS  layout       read from {d}\n" in out
    assert "  PASS  file names   no image skipped for its name\n" in out
    assert "  PASS  images       8 readable (header check; --decode decodes every image)\n" in out
    assert "  WARN  statistics   differ from the published market1501 figures (--subset):\n" in out
    assert out.endswith("Result: all checks passed (1 warning(s))\n")

    code, out, _ = run(capsys, "--name", "market1501", "--root", str(tmp_path), "--decode")
    assert code == 1
    assert "  PASS  images       8 readable (full decode)\n" in out
    assert (
        "  FAIL  statistics   differ from the published market1501 figures:\n"
        "                     train: 2 ids / 3 images, published 751 / 12,936\n"
        "                     query: 2 ids / 2 images, published 750 / 3,368\n"
        "                     gallery: 3 ids / 3 images, published 751 / 15,913\n"
    ) in out
    assert out.endswith("Result: FAILED: market1501 statistics\n")


def test_full_copy_matching_the_published_figures_passes(tmp_path, capsys, monkeypatch):
    market_tree(tmp_path)
    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))  # registry restored afterwards
    figures = {
        "train": PublishedSplit(2, 3),
        "query": PublishedSplit(2, 2),
        "gallery": PublishedSplit(3, None),
    }
    market = dataclasses.replace(get_layout("market1501"), published=figures)
    register_dataset(market, overwrite=True)
    code, out, _ = run(capsys, "--name", "market1501", "--root", str(tmp_path))
    assert code == 0
    assert "  gallery |      3 |        3 |         2 | 3 / ?\n" in out
    assert "  PASS  statistics   match the published market1501 figures\n" in out
    assert out.endswith("Result: all checks passed\n")


def test_corrupt_image_fails_the_images_check(tmp_path, capsys):
    d = market_tree(tmp_path)
    bad = d / "query" / QUERY[1]
    bad.write_bytes(bad.read_bytes()[:-40])  # truncated: no end-of-image marker
    code, out, _ = run(capsys, "--name", "market1501", "--root", str(tmp_path), "--subset")
    assert code == 1
    assert (
        "  FAIL  images       1 of 8 unreadable (header check; --decode decodes every image):\n"
        in out
    )
    (line,) = [x for x in out.splitlines() if str(bad) in x]
    assert line.startswith(f"                     {bad}: ") and "truncated" in line.lower()
    assert out.endswith("Result: FAILED: market1501 images (1 warning(s))\n")


def test_wrong_file_name_fails_and_other_files_warn(tmp_path, capsys):
    d = market_tree(tmp_path)
    write_images(d / "query", ["img_0003.jpg"])
    (d / "bounding_box_train" / "notes.txt").write_text("not an image")
    code, out, _ = run(capsys, "--name", "market1501", "--root", str(tmp_path), "--subset")
    assert code == 1
    assert (
        f"  FAIL  file names   market1501: 1 image(s) in {d / 'query'} do not match the name "
        "pattern '([-\\d]+)_c(\\d+)' and were skipped, e.g. img_0003.jpg\n"
    ) in out
    assert (
        f"  WARN  other files  market1501: 1 file(s) in {d / 'bounding_box_train'} skipped" in out
    )
    assert "  query   |      2 |        2 |" in out  # the misnamed image is not counted
    assert out.endswith("Result: FAILED: market1501 file names (2 warning(s))\n")


def test_missing_layout_fails_with_the_expected_tree(tmp_path, capsys):
    code, out, _ = run(capsys, "--name", "dukemtmc", "--root", str(tmp_path))
    assert code == 1
    assert "  FAIL  layout       dukemtmc: no dataset folder under DATASETS.ROOT_DIR" in out
    assert "bounding_box_train/" in out and "split   |" not in out
    assert out.endswith("Result: FAILED: dukemtmc layout\n")


def test_vehicleid_test_pool_and_trial_gallery_are_counted(tmp_path, capsys):
    d = tmp_path / "VehicleID_V1.0"
    names = [f"{i:07d}" for i in range(1, 10)]
    write_images(d / "image", [f"{n}.jpg" for n in names])
    (d / "train_test_split").mkdir()
    (d / "train_test_split/train_list.txt").write_text("".join(f"{n} 5\n" for n in names[:3]))
    pids = [1, 1, 2, 2, 2, 3]
    lines = "".join(f"{n} {p}\n" for n, p in zip(names[3:], pids, strict=True))
    (d / "train_test_split/test_list_800.txt").write_text(lines)
    code, out, _ = run(capsys, "--name", "VehicleID", "--root", str(tmp_path), "--subset")
    assert code == 0
    # one gallery image per test id (3), the other 3 test images are queries
    assert "  query   |      2 |        3 |         1 | \n" in out
    assert "  gallery |      3 |        3 |         1 | 800 / 800\n" in out
    assert "  test    |      3 |        6 |         1 | 800 / ?\n" in out
    assert "  PASS  images       9 readable" in out
    assert "gallery: 3 ids / 3 images, published 800 / 800" in out


def test_usage_and_config_errors_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "--root", str(tmp_path))
    assert code == 2 and "give --config_file FILE or --name NAME" in err
    code, _, err = run(capsys, "--name", "market1502", "--root", str(tmp_path))
    assert code == 2 and "DATASETS.NAMES = 'market1502'" in err and "'market1501'" in err
    code, _, err = run(capsys, "--name", "market1501", "DATASETS.ROOTDIR", "x")
    assert code == 2 and "unknown key 'DATASETS.ROOTDIR'" in err
    code, _, err = run(capsys, "--name", "market1501", "DATASETS.ROOT_DIR", "x", "--decode")
    assert code == 2 and "flags go before the KEY VALUE overrides" in err
    code, _, err = run(capsys, "--config_file", str(tmp_path / "none.yml"))
    assert code == 2 and "none.yml" in err
    code, _, _ = run(capsys, "--name", "market1501", "--bogus")
    assert code == 2


def test_compare_published_by_hand():
    stats = {"train": SplitStats(751, 12_936, 6, 1), "query": SplitStats(750, 3_367, 6, 1)}
    figures = {"train": PublishedSplit(751, 12_936), "query": PublishedSplit(750, 3_368)}
    assert compare_published(stats, figures) == [
        "query: 750 ids / 3,367 images, published 750 / 3,368"
    ]
    assert compare_published(stats, {"train": PublishedSplit(751, None)}) == []
    assert compare_published(stats, {"train": PublishedSplit(750, None)}) == [
        "train: 751 ids / 12,936 images, published 750 / ?"
    ]


def test_published_figures_follow_the_options():
    opts = DatasetOptions()
    veri, labelled = get_layout("veri"), DatasetOptions(veri_drop_unlabeled=True)
    # the official loader drops 63 train, 1 query and 1 gallery image without a viewpoint label
    diff = {
        s: veri.published_stats(opts)[s].num_images - veri.published_stats(labelled)[s].num_images
        for s in ("train", "query", "gallery")
    }
    assert diff == {"train": 63, "query": 1, "gallery": 1}
    big = get_layout("VehicleID").published_stats(DatasetOptions(vehicleid_test_size=2400))
    assert big["test"] == PublishedSplit(2400, None) and big["gallery"] == PublishedSplit(
        2400, 2400
    )
    assert get_layout("occ_duke").published_stats(opts) != get_layout("dukemtmc").published_stats(
        opts
    )
    # layouts derived from Market's do not inherit its figures
    assert get_layout("synthetic").published_stats(opts) is None
    assert get_layout("folder").published_stats(opts) is None
