"""tools/search.py: index features vs. direct evaluation features, ranking vs. brute force."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from configs.config import load_cfg, save_cfg
from datasets.image_dataset import read_image
from datasets.synthetic import generate_synthetic_reid
from datasets.transforms import build_test_transform
from model.build import build_model
from model.loading import CheckpointMismatchError
from tests.conftest import PickleExploit
from tools import search
from utils.checkpoint import CheckpointFormatError, sha256_file

H, W = 64, 32


def _opts(out, extra=()):
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.NAME", "ViT-T-16-test",
        "MODEL.PRETRAIN_TAG", "none",
        "INPUT.SIZE_TRAIN", f"[{H}, {W}]",
        "INPUT.SIZE_TEST", f"[{H}, {W}]",
        "DATALOADER.NUM_WORKERS", "0",
        "TEST.IMS_PER_BATCH", "5",
        "OUTPUT_DIR", str(out),
        *extra,
    ]  # fmt: skip


def _make_run(folder, seed, extra=(), views=1):
    """A config.yaml and random-init weights of a tiny model; returns (config, weights, model)."""
    cfg = load_cfg(None, _opts(folder, extra))
    torch.manual_seed(seed)
    model = build_model(cfg, 6, 3, views, load_pretrained=False)
    # Non-trivial BNNeck statistics, so TEST.NECK_FEAT 'after' gives other features.
    with torch.no_grad():
        for bn in (model.bottleneck, model.bottleneck_proj):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    config, weights = folder / "config.yaml", folder / "weights.pth"
    save_cfg(cfg, str(config))
    torch.save(model.state_dict(), weights)
    return str(config), str(weights), model.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    market = generate_synthetic_reid(
        root / "data", num_ids=6, num_cameras=2, images_per_id_cam=2, size=(H, W)
    )
    gallery = root / "gallery"
    shutil.copytree(market / "bounding_box_test", gallery / "cam_a")
    queries = sorted((market / "query").glob("*.jpg"))
    # One query is also a gallery image (in a nested folder: the listing is recursive).
    (gallery / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(queries[0], gallery / "nested" / "deeper" / "same.jpg")
    (gallery / "notes.txt").write_text("not an image")
    config, weights, model = _make_run(root, seed=0)
    index = root / "index.pt"
    base = ["--config_file", config, "--weights", weights]
    search.main(["index", *base, "--gallery", str(gallery), "--out", str(index)])
    return {
        "root": root,
        "gallery": gallery,
        "queries": queries,
        "query_dir": market / "query",
        "config": config,
        "weights": weights,
        "model": model,
        "index": index,
        "base": base,
    }


def _direct_features(model, paths):
    """Evaluation features computed without the tool: read, test transform, encode, normalise."""
    cfg = load_cfg(None, _opts("unused"))
    tf = build_test_transform(cfg.INPUT.SIZE_TEST, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    images = torch.stack([tf(read_image(str(p))) for p in paths])
    with torch.no_grad():
        feats = model.encode_image(images).double()
    return (feats / feats.norm(dim=1, keepdim=True)).numpy()


def test_index_features_equal_direct_evaluation_features(env):
    index = torch.load(env["index"], weights_only=True)
    expected_paths = sorted(
        str(p.resolve()) for p in env["gallery"].rglob("*") if p.suffix == ".jpg"
    )
    assert index["paths"] == expected_paths
    assert any(p.endswith("same.jpg") for p in index["paths"])
    direct = _direct_features(env["model"], index["paths"])
    assert index["features"].dtype == torch.float32
    np.testing.assert_allclose(index["features"].numpy(), direct, atol=1e-5, rtol=0)
    assert index["feat_dim"] == env["model"].feat_dim == direct.shape[1]
    assert index["model_name"] == "ViT-T-16-test"
    assert index["weights"] == env["weights"]
    assert index["settings"]["weights_sha256"] == sha256_file(env["weights"])
    assert "ViT-T-16-test" in index["config"]


def test_float16_index_is_close(env, tmp_path):
    out = tmp_path / "half.pt"
    args = ["index", *env["base"], "--gallery", str(env["gallery"]), "--out", str(out)]
    search.main([*args[:-2], "--dtype", "float16", *args[-2:]])
    half = torch.load(out, weights_only=True)["features"]
    full = torch.load(env["index"], weights_only=True)["features"]
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, atol=2e-3, rtol=0)


def test_query_matches_brute_force_and_writes_results(env, tmp_path):
    out = tmp_path / "results"
    k = 7
    tile = (48, 24)
    argv = ["query", "--index", str(env["index"]), *env["base"], "--query", str(env["query_dir"])]
    argv += ["--topk", str(k), "--out", str(out), "--visualize", "--tile-size", *map(str, tile)]
    result = search.main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["metric"] == "cosine" and saved["topk"] == k

    index = torch.load(env["index"], weights_only=True)
    gallery = index["paths"]
    assert saved["num_gallery"] == len(gallery)
    qpaths = [str(p.resolve()) for p in env["queries"]]
    assert [q["query"] for q in saved["queries"]] == qpaths
    qf = _direct_features(env["model"], qpaths)
    gf = _direct_features(env["model"], gallery)
    sims = qf @ gf.T
    for qi, entry in enumerate(saved["queries"]):
        order = np.argsort(-sims[qi], kind="stable")[:k]
        hits = entry["results"]
        assert [h["rank"] for h in hits] == list(range(1, k + 1))
        assert [h["path"] for h in hits] == [gallery[g] for g in order]
        assert [h["gallery_index"] for h in hits] == order.tolist()
        np.testing.assert_allclose([h["similarity"] for h in hits], sims[qi, order], atol=1e-5)
        # Squared Euclidean distance of unit vectors, as the evaluator computes it.
        dist = ((qf[qi] - gf[order]) ** 2).sum(1)
        np.testing.assert_allclose([h["distance"] for h in hits], dist, atol=1e-5)

    # The query that is also in the gallery finds itself first.
    first = saved["queries"][0]["results"][0]
    assert first["path"].endswith("same.jpg")
    assert first["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert first["distance"] == pytest.approx(0.0, abs=1e-5)

    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(qpaths)
    assert sorted(q["visualization"] for q in saved["queries"]) == [p.name for p in pngs]
    size = (search.GAP + (1 + k) * (tile[1] + search.GAP), search.GAP + tile[0] + search.LABEL_H)
    for png in pngs:
        with Image.open(png) as img:
            assert img.size == size


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_ranking_equals_brute_force(metric):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(11, 9, generator=gen, dtype=torch.float64).float()
    g = torch.randn(23, 9, generator=gen, dtype=torch.float64).float()
    if metric == "cosine":
        q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    k = 6
    # Gallery chunks of 4 and a budget of one query row per block.
    scores, idx = search.rank_gallery(q, g, k, metric, gallery_chunk=4, memory_budget_mb=1e-6)
    qn, gn = q.double().numpy(), g.double().numpy()
    if metric == "cosine":
        ref = qn @ gn.T
    else:
        ref = -((qn[:, None, :] - gn[None]) ** 2).sum(-1)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    assert idx.tolist() == order.tolist()
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(ref, order, 1), atol=1e-5)
    # k larger than the gallery keeps every item.
    _, all_idx = search.rank_gallery(q, g, 100, metric, gallery_chunk=5)
    assert all_idx.shape == (11, 23)


def test_query_refuses_an_index_of_another_config_or_weights(env, tmp_path):
    argv = ["query", "--index", str(env["index"]), *env["base"], "--query", str(env["queries"][0])]
    argv += ["--out", str(tmp_path / "r")]
    with pytest.raises(search.SearchError, match=r"TEST.NECK_FEAT: index 'before', query 'after'"):
        search.main([*argv, "TEST.NECK_FEAT", "after"])
    _, other_weights, _ = _make_run(tmp_path, seed=1)
    argv[argv.index(env["weights"])] = other_weights
    with pytest.raises(search.SearchError, match="weights_sha256"):
        search.main(argv)
    assert not (tmp_path / "r" / "results.json").exists()


def test_errors_name_the_folder_image_or_index(env, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    base = ["index", *env["base"], "--out", str(tmp_path / "i.pt")]
    with pytest.raises(search.SearchError, match=r"--gallery folder .*empty.* holds no image"):
        search.main([*base, "--gallery", str(empty)])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(search.SearchError, match=r"broken\.jpg"):
        search.main([*base, "--gallery", str(bad)])
    assert not (tmp_path / "i.pt").exists()
    missing = ["query", "--index", str(tmp_path / "none.pt"), *env["base"]]
    with pytest.raises(search.SearchError, match=r"--index .*none\.pt.* does not exist"):
        search.main([*missing, "--query", str(env["queries"][0]), "--out", str(tmp_path / "r")])


def _sie_image(tmp_path):
    img = tmp_path / "g" / "a.png"
    img.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)).save(img)
    return img


def _reference(model, config, img, **ids):
    cfg = load_cfg(config)
    tf = build_test_transform(cfg.INPUT.SIZE_TEST, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    with torch.no_grad():
        ref = model.encode_image(tf(read_image(str(img)))[None], **ids)
    return torch.nn.functional.normalize(ref, dim=1)


def test_camera_sie_takes_a_camera_id_or_the_fallback(tmp_path, caplog):
    config, weights, model = _make_run(tmp_path, seed=2, extra=("MODEL.SIE_CAMERA", "True"))
    img = _sie_image(tmp_path)
    base = ["index", "--config-file", config, "--weights", weights, "--gallery", str(img.parent)]
    with_id, without = tmp_path / "cam2.pt", tmp_path / "mean.pt"
    search.main([*base, "--camid", "2", "--out", str(with_id)])
    feats = torch.load(with_id, weights_only=True)["features"]
    torch.testing.assert_close(feats, _reference(model, config, img, camids=torch.tensor([2])))
    assert not torch.allclose(feats, _reference(model, config, img), atol=1e-3)
    # No camera id: the mean of the SIE rows (TEST.SIE_FALLBACK's default), with a warning.
    with caplog.at_level("WARNING"):
        search.main([*base, "--out", str(without)])
    assert "TEST.SIE_FALLBACK" in caplog.text
    index = torch.load(without, weights_only=True)
    assert index["settings"]["TEST.SIE_FALLBACK"] == "mean"
    mean = _reference(model, config, img, sie_fallback="mean")
    torch.testing.assert_close(index["features"], mean)
    rows = model.cv_embed.detach()
    manual = model.sie_coe * rows.mean(0)  # the mean vector, by hand
    torch.testing.assert_close(model.mean_sie_vector().detach(), manual)
    # A query must use the fallback its index was built with; ids are range-checked.
    query = ["query", "--index", str(without), "--config-file", config, "--weights", weights]
    query += ["--query", str(img), "--out", str(tmp_path / "r")]
    with pytest.raises(search.SearchError, match=r"TEST.SIE_FALLBACK: index 'mean', query 'none'"):
        search.main([*query, "TEST.SIE_FALLBACK", "none"])
    result = search.main(query)
    assert result["queries"][0]["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    # With the ids, the fallback plays no part: not recorded, not compared.
    assert "TEST.SIE_FALLBACK" not in torch.load(with_id, weights_only=True)["settings"]
    search.main([*query, "--camid", "1", "TEST.SIE_FALLBACK", "none"])
    query[2] = str(with_id)
    search.main([*query, "TEST.SIE_FALLBACK", "none"])
    with pytest.raises(search.SearchError, match=r"--camid 3 is outside 0\.\.2"):
        search.main([*base, "--camid", "3", "--out", str(tmp_path / "x.pt")])
    # Appending an image without its id to an index built with ids: per-image ids, and the
    # fallback recorded from then on.
    shutil.copy(img, img.parent / "b.png")
    grown = search.main([*base, "--append", "--out", str(with_id)])
    assert grown["paths"] == [str(img), str(img.parent / "b.png")]
    assert grown["camid"] == [2, None] and grown["settings"]["TEST.SIE_FALLBACK"] == "mean"
    torch.testing.assert_close(grown["features"][1:], mean)


def test_camera_ids_per_image_from_the_file_names(tmp_path):
    config, weights, model = _make_run(tmp_path, seed=4, extra=("MODEL.SIE_CAMERA", "True"))
    folder = tmp_path / "c7" / "g"  # a number in the folders above must not match
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = ["0001_c1s1_000001_00.png", "0002_c3s2_000101_00.png"]  # Market-1501: 1-based
    for name in names:
        Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(folder / name)
    base = ["index", "--config-file", config, "--weights", weights, "--gallery", str(folder)]
    out = tmp_path / "i.pt"
    pattern = ["--camid-pattern", r"_c(\d+)s", "--camid-base", "1"]
    index = search.main([*base, *pattern, "--out", str(out)])
    assert index["paths"] == [str(folder / n) for n in names] and index["camid"] == [0, 2]
    assert "TEST.SIE_FALLBACK" not in index["settings"]  # every image has its id
    for i, name in enumerate(names):
        ref = _reference(model, config, folder / name, camids=torch.tensor([index["camid"][i]]))
        torch.testing.assert_close(index["features"][i : i + 1], ref)
    with pytest.raises(
        search.SearchError, match=r"--camid-pattern gives ids 1\.\.3 .*--camid-base.* 0\.\.2"
    ):
        search.main([*base, "--camid-pattern", r"_c(\d+)s", "--out", str(out)])  # 1-based
    with pytest.raises(search.SearchError, match=r"finds no number in .*0001_c1s1"):
        search.main([*base, "--camid-pattern", r"cam(\d+)", "--out", str(out)])
    with pytest.raises(search.SearchError, match="has no group"):
        search.main([*base, "--camid-pattern", r"_c\d+s", "--out", str(out)])
    with pytest.raises(search.SearchError, match="--camid and --camid-pattern are both given"):
        search.main([*base, *pattern, "--camid", "0", "--out", str(out)])
    with pytest.raises(search.SearchError, match="--camid-base applies to --camid-pattern only"):
        search.main([*base, "--camid", "0", "--camid-base", "1", "--out", str(out)])
    # A query reads its ids the same way: each image finds itself (similarity 1) only with its
    # own camera's SIE vector.
    query = ["query", "--index", str(out), "--config-file", config, "--weights", weights]
    query += ["--query", str(folder), "--out", str(tmp_path / "r"), "--topk", "1"]
    found = search.main([*query, *pattern])["queries"]
    assert [q["results"][0]["path"] for q in found] == index["paths"]
    assert all(q["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5) for q in found)
    other = search.main([*query, "--camid", "1"])["queries"]
    assert all(q["results"][0]["similarity"] < 0.9999 for q in other)


def test_camera_view_sie_ids_and_fallback(tmp_path):
    extra = ("MODEL.SIE_CAMERA", "True", "MODEL.SIE_VIEW", "True")
    config, weights, model = _make_run(tmp_path, seed=3, extra=extra, views=2)
    with torch.no_grad():  # camera 1's two rows (cam * 2 + view) alike: their mean is either
        model.cv_embed[3] = model.cv_embed[2]
    torch.save(model.state_dict(), weights)
    img = _sie_image(tmp_path)
    base = ["index", "--config-file", config, "--weights", weights, "--gallery", str(img.parent)]
    out = tmp_path / "i.pt"
    with pytest.raises(CheckpointMismatchError, match="pass --num-views"):
        search.main([*base, "--out", str(out)])
    base += ["--num-views", "2"]
    search.main([*base, "--camid", "1", "--viewid", "1", "--out", str(out)])
    ids = {"camids": torch.tensor([1]), "viewids": torch.tensor([1])}
    feats = torch.load(out, weights_only=True)["features"]
    torch.testing.assert_close(feats, _reference(model, config, img, **ids))
    # Only the camera: its rows averaged over the views ('mean'), refused under 'none'.
    search.main([*base, "--camid", "1", "--out", str(out)])
    feats = torch.load(out, weights_only=True)["features"]
    ref = _reference(model, config, img, camids=torch.tensor([1]), viewids=torch.tensor([0]))
    torch.testing.assert_close(feats, ref)
    other = _reference(model, config, img, camids=torch.tensor([0]), viewids=torch.tensor([0]))
    assert not torch.allclose(feats, other, atol=1e-3)
    with pytest.raises(search.SearchError, match="needs both --camid and --viewid"):
        search.main([*base, "--camid", "1", "--out", str(out), "TEST.SIE_FALLBACK", "none"])
    # Both ids per image from the file names (camera 1-based, view 0-based).
    named = tmp_path / "named"
    named.mkdir()
    shutil.copy(img, named / "c2_v1.png")
    shutil.copy(img, named / "c3_v0.png")
    both = ["--camid-pattern", r"c(\d)_", "--camid-base", "1", "--viewid-pattern", r"_v(\d)"]
    gallery_at = base.index("--gallery") + 1
    named_base = [*base[:gallery_at], str(named), *base[gallery_at + 1 :]]
    index = search.main([*named_base, *both, "--out", str(out)])
    assert (index["camid"], index["viewid"]) == ([1, 2], [1, 0])
    for i, (c, v) in enumerate(((1, 1), (2, 0))):
        ids = {"camids": torch.tensor([c]), "viewids": torch.tensor([v])}
        ref = _reference(model, config, img, **ids)
        torch.testing.assert_close(index["features"][i : i + 1], ref)


def test_crafted_weights_or_index_are_refused_unread(env, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": PickleExploit(str(marker))}, evil)
    argv = ["index", "--config-file", env["config"], "--weights", str(evil)]
    argv += ["--gallery", str(env["gallery"]), "--out", str(tmp_path / "i.pt")]
    with pytest.raises(CheckpointFormatError, match=r"--weights .*evil\.pth.*not loaded"):
        search.main(argv)
    query = ["query", "--index", str(evil), *env["base"], "--query", str(env["queries"][0])]
    with pytest.raises(CheckpointFormatError, match=r"--index .*evil\.pth.*not loaded"):
        search.main([*query, "--out", str(tmp_path / "r")])
    assert not marker.exists()
    yml = tmp_path / "notes.yml"
    yml.write_text("TEST:\n  NECK_FEAT: after\n")
    query[2] = str(yml)
    with pytest.raises(CheckpointFormatError, match=r"--index .*notes\.yml' is a text file"):
        search.main([*query, "--out", str(tmp_path / "r")])


def test_overrides_anywhere_and_underscore_flags(env, tmp_path):
    # An override between the flags (not only last) reaches the config; --tile_size == --tile-size.
    argv = ["query", "TEST.NECK_FEAT", "after", "--index", str(env["index"]), *env["base"]]
    argv += ["--query", str(env["queries"][0]), "--tile_size", "8", "4", "--out", str(tmp_path)]
    with pytest.raises(search.SearchError, match=r"TEST.NECK_FEAT: index 'before', query 'after'"):
        search.main(argv)


# ----------------------------------------------------------------------------------------------
# Approximate search (faiss)
def _query_paths(result):
    return [[h["path"] for h in q["results"]] for q in result["queries"]]


def test_stored_ivf_and_built_hnsw_rank_as_exact_search(env, tmp_path):
    ivf = tmp_path / "ivf.pt"
    search.main(["index", *env["base"], "--gallery", str(env["gallery"]), "--ann", "ivf",
                 "--out", str(ivf)])  # fmt: skip
    stored = torch.load(ivf, weights_only=True)["ann"]
    assert stored["kind"] == "ivf" and stored["data"].dtype == torch.uint8
    base = [*env["base"], "--query", str(env["query_dir"]), "--topk", "5"]
    exact = search.main(["query", "--index", str(env["index"]), *base, "--ann", "exact",
                         "--out", str(tmp_path / "e")])  # fmt: skip
    assert exact["search"] == "exact"
    # Under 39 images: one IVF cell (N // 39 < 1), so the stored index scans everything.
    auto = search.main(["query", "--index", str(ivf), *base, "--out", str(tmp_path / "a")])
    assert auto["search"] == "ivf"
    assert _query_paths(auto) == _query_paths(exact)
    for a, e in zip(auto["queries"], exact["queries"], strict=True):
        sims = [h["similarity"] for h in a["results"]]
        np.testing.assert_allclose(sims, [h["similarity"] for h in e["results"]], atol=1e-5)
    # HNSW not stored in the plain index: built for the command; on so few items it finds all.
    hnsw = search.main(["query", "--index", str(env["index"]), *base, "--ann", "hnsw",
                        "--ef-search", "64", "--out", str(tmp_path / "h")])  # fmt: skip
    assert hnsw["search"] == "hnsw" and _query_paths(hnsw) == _query_paths(exact)


def test_append_extracts_only_the_new_images(env, tmp_path, monkeypatch):
    from utils.ann import deserialize_ann

    gallery, later = tmp_path / "g", tmp_path / "later"
    shutil.copytree(env["gallery"] / "cam_a", gallery)
    later.mkdir()
    for f in sorted(gallery.glob("*.jpg"))[-3:]:
        shutil.move(f, later / f.name)
    out = tmp_path / "i.pt"
    base = ["index", *env["base"], "--gallery", str(gallery), "--out", str(out)]
    first = search.main([*base, "--ann", "hnsw", "--dtype", "float16"])
    for f in later.iterdir():
        shutil.move(f, gallery / f.name)
    extracted = []
    real = search.compute_features
    monkeypatch.setattr(
        search,
        "compute_features",
        lambda m, c, paths, *a: extracted.append(len(paths)) or real(m, c, paths, *a),
    )
    appended = search.main([*base, "--append"])
    assert extracted == [3]  # the old images are not extracted again
    n_old = len(first["paths"])
    assert appended["paths"][:n_old] == first["paths"]
    assert sorted(appended["paths"]) == sorted(str(p) for p in gallery.glob("*.jpg"))
    assert torch.equal(appended["features"][:n_old], first["features"])  # untouched, float16 kept
    full = search.main(
        ["index", *env["base"], "--gallery", str(gallery), "--out", str(tmp_path / "f.pt")]
    )
    rows = {p: f for p, f in zip(full["paths"], full["features"], strict=True)}
    fresh = torch.stack([rows[p] for p in appended["paths"]]).half()
    torch.testing.assert_close(appended["features"].float(), fresh.float(), atol=1e-3, rtol=0)
    assert appended["ann"]["kind"] == "hnsw"
    assert deserialize_ann(appended["ann"]["data"], None, None).ntotal == len(appended["paths"])
    # A new image is found in the appended index; nothing new: nothing extracted or written.
    new_image = appended["paths"][-1]
    query = ["query", "--index", str(out), *env["base"], "--query", new_image, "--ann", "exact"]
    hits = search.main([*query, "--out", str(tmp_path / "r")])["queries"][0]["results"]
    assert hits[0]["path"] == new_image
    stamp, calls = out.stat().st_mtime_ns, len(extracted)
    search.main([*base, "--append"])
    assert len(extracted) == calls and out.stat().st_mtime_ns == stamp
    with pytest.raises(search.SearchError, match=r"TEST.NECK_FEAT: index 'before', append 'after'"):
        search.main([*base, "--append", "TEST.NECK_FEAT", "after"])
    # The precision cannot change on append; the kind of approximate index can.
    shutil.copy(new_image, gallery / "extra.jpg")
    with pytest.raises(search.SearchError, match="holds float16 features: --dtype float32"):
        search.main([*base, "--append", "--dtype", "float32"])
    grown = search.main([*base, "--append", "--ann", "none"])
    assert "ann" not in grown and len(grown["paths"]) == len(appended["paths"]) + 1
    # Without an index at --out, --append builds one.
    fresh = search.main([*base[:-1], str(tmp_path / "new.pt"), "--append"])
    assert sorted(fresh["paths"]) == sorted(grown["paths"])


def test_ann_auto_threshold_and_missing_faiss(env, tmp_path, monkeypatch):
    out = tmp_path / "i.pt"
    argv = ["index", *env["base"], "--gallery", str(env["gallery"]), "--out", str(out)]
    search.main(argv)  # below ANN_AUTO_MIN images: no approximate index
    assert "ann" not in torch.load(out, weights_only=True)
    monkeypatch.setattr(search, "ANN_AUTO_MIN", 10)
    search.main(argv)
    assert torch.load(out, weights_only=True)["ann"]["kind"] == search.ANN_AUTO_KIND
    # Without faiss: auto quietly stays exact, an explicit kind names the install command.
    monkeypatch.setitem(sys.modules, "faiss", None)
    search.main(argv)
    assert "ann" not in torch.load(out, weights_only=True)
    with pytest.raises(search.SearchError, match=r"pip install faiss-cpu.*--ann none"):
        search.main([*argv, "--ann", "hnsw"])
    query = ["query", "--index", str(env["index"]), *env["base"], "--query", str(env["queries"][0])]
    with pytest.raises(search.SearchError, match=r"pip install faiss-cpu"):
        search.main([*query, "--ann", "ivf", "--out", str(tmp_path / "r")])
