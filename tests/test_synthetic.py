"""Synthetic generator: determinism, Market-1501 layout and counts, CLI, the 'synthetic' name."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.layouts import DatasetOptions
from datasets.market1501 import MARKET1501
from datasets.synthetic import SYNTHETIC, generate_synthetic_reid
from tools.make_synthetic import main as make_synthetic_main

SMALL = {"num_ids": 8, "num_cameras": 3, "images_per_id_cam": 2, "size": (32, 16)}


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = generate_synthetic_reid(tmp_path / "a", seed=3, **SMALL)
    b = generate_synthetic_reid(tmp_path / "b", seed=3, **SMALL)
    c = generate_synthetic_reid(tmp_path / "c", seed=4, **SMALL)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


@pytest.mark.parametrize("mode,fmt", [("person", "jpg"), ("vehicle", "png")])
def test_layout_counts_and_market_parse(tmp_path, mode, fmt):
    n_ids, cams, per = 12, 3, 3
    folder = generate_synthetic_reid(
        tmp_path, n_ids, cams, per, size=(40, 24), mode=mode, seed=1, image_format=fmt
    )
    assert folder == tmp_path / "Market-1501-v15.09.15"
    pattern = re.compile(rf"^(-1|\d{{4}})_c([1-{cams}])s1_\d{{6}}_\d{{2}}\.{fmt}$")
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        assert all(pattern.match(n) for n in names(folder / split))
    first = Image.open(next((folder / "query").iterdir()))
    assert first.size == (24, 40) and first.mode == "RGB"

    layout = dataclasses.replace(MARKET1501, num_cameras=cams)
    ds = layout.load(tmp_path, DatasetOptions())
    n_train, n_test = n_ids // 2, n_ids - n_ids // 2
    distractors, junk = max(2, n_test // 4), max(2, n_test // 8)
    assert len(ds.train) == n_train * cams * per and ds.num_train_pids == n_train
    # one query per (test id, camera); the other images of that id and camera in the gallery
    assert len(ds.query) == n_test * cams
    assert sorted((r.pid, r.camid) for r in ds.query) == sorted(
        {(r.pid, r.camid) for r in ds.query}
    )
    assert len(ds.gallery) == n_test * cams * (per - 1) + distractors
    assert sum(r.pid == 0 for r in ds.gallery) == distractors
    junk_files = [n for n in names(folder / "bounding_box_test") if n.startswith("-1_")]
    assert len(junk_files) == junk  # on disk, dropped by the parser
    raw_train = {int(n[:4]) for n in names(folder / "bounding_box_train")}
    test_ids = {r.pid for r in ds.query}
    assert raw_train.isdisjoint(test_ids) and len(raw_train | test_ids) == n_ids
    assert {r.pid for r in ds.gallery} - {0} == test_ids


def test_identities_differ_and_images_vary(tmp_path):
    folder = generate_synthetic_reid(tmp_path, seed=0, **SMALL)
    train = sorted((folder / "bounding_box_train").iterdir())
    arrays = {p.name: np.asarray(Image.open(p), dtype=np.float32) for p in train}
    same_id_same_cam = [a for n, a in arrays.items() if n.startswith(train[0].name[:7])]
    assert len(same_id_same_cam) == 2
    assert np.abs(same_id_same_cam[0] - same_id_same_cam[1]).mean() > 1.0  # per-image jitter
    assert len({a.tobytes() for a in arrays.values()}) == len(arrays)


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="images_per_id_cam >= 2"):
        generate_synthetic_reid(tmp_path, 8, 2, 1)
    with pytest.raises(ValueError, match="mode"):
        generate_synthetic_reid(tmp_path, mode="bird")


def test_cli_writes_the_dataset(tmp_path, capsys):
    argv = ["--root", str(tmp_path), "--num-ids", "8", "--num-cameras", "2"]
    argv += ["--images-per-id-cam", "2", "--size", "32", "16", "--mode", "vehicle", "--seed", "5"]
    assert make_synthetic_main(argv) == 0
    out = capsys.readouterr().out
    assert "Market-1501-v15.09.15" in out and "train   |     4 |       16 |" in out
    direct = generate_synthetic_reid(
        tmp_path / "direct", 8, 2, 2, size=(32, 16), mode="vehicle", seed=5
    )
    assert tree_digest(direct) == tree_digest(tmp_path / "Market-1501-v15.09.15")


def test_synthetic_dataset_name_generates_once(tmp_path):
    options = DatasetOptions(synthetic={**SMALL, "seed": 2})
    ds = SYNTHETIC.load(tmp_path, options)
    assert ds.name == "synthetic" and ds.num_train_pids == 4 and ds.num_cameras == 3
    (made,) = (tmp_path / "synthetic").iterdir()
    stamp = {p: p.stat().st_mtime_ns for p in made.rglob("*")}
    again = SYNTHETIC.load(tmp_path, options)  # reused, not regenerated
    assert again.train == ds.train
    assert {p: p.stat().st_mtime_ns for p in made.rglob("*")} == stamp
    other = SYNTHETIC.load(tmp_path, DatasetOptions(synthetic={**SMALL, "seed": 9}))
    assert len(list((tmp_path / "synthetic").iterdir())) == 2 and other.train != ds.train
