"""Ranked lists of evaluation results: the evaluator's top-k, AP, selection, pictures, e2e run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import test_clipreid
import train_clipreid
from processor.evaluate import EvalSettings, FeatureSet
from processor.ranked_lists import select_queries, write_ranked_lists
from tests.conftest import tiny_run_opts as _opts
from utils.drawing import GAP, LABEL_H
from utils.metrics import evaluate_features


def _problem(seed=0, num_q=12, num_g=40, dim=16, num_ids=6, num_cams=3):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = np.concatenate([np.arange(num_ids), rng.integers(0, num_ids, num_g - num_ids)])
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    centres = rng.normal(size=(num_ids, dim))
    qf = centres[q_pids] + 1.2 * rng.normal(size=(num_q, dim))
    gf = centres[g_pids] + 1.2 * rng.normal(size=(num_g, dim))
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def _brute_force(qf, gf, q_pids, g_pids, q_cams, g_cams, feat_norm=True):
    """Per query: kept gallery indices in rank order (stable) and the distances, float64."""
    if feat_norm:
        qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    dist = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
    out = []
    for qi in range(len(qf)):
        keep = ~((g_pids == q_pids[qi]) & (g_cams == q_cams[qi]))
        idx = np.flatnonzero(keep)
        order = idx[np.argsort(dist[qi, idx], kind="stable")]
        out.append((order, dist[qi, order]))
    return out


def _brute_ap(order, g_pids, pid):
    hits = (g_pids[order] == pid).astype(np.float64)
    if hits.sum() == 0:
        return float("nan"), -1
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum()), int(np.argmax(hits) + 1)


def _images(tmp_path, prefix, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"{prefix}_{i:03d}.png"
        Image.new("RGB", (8, 16), (i * 5 % 256, 100, 200)).save(p)
        paths.append(str(p))
    return paths


def _topk(qf, gf, q_pids, g_pids, q_cams, g_cams, k, feat_norm=True, **kwargs):
    """The evaluator's per-query top-k, as (indices, distances) lists cut at the list's end."""
    result = evaluate_features(
        torch.as_tensor(qf),
        torch.as_tensor(gf),
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        feat_norm=feat_norm,
        keep_topk=k,
        show_progress=False,
        **kwargs,
    )
    assert result.topk_indices.shape == result.topk_distances.shape == (len(qf), k)
    out = []
    for idx, dist in zip(result.topk_indices, result.topk_distances, strict=True):
        listed = idx >= 0
        assert listed.tolist() == sorted(listed.tolist(), reverse=True)  # padding at the end only
        assert np.isinf(dist[~listed]).all()
        out.append((idx[listed], dist[listed]))
    return out


@pytest.mark.parametrize("feat_norm", [True, False])
def test_topk_equals_brute_force_market_protocol(feat_norm):
    qf, gf, q_pids, g_pids, q_cams, g_cams = _problem()
    k = 7
    q, g = torch.tensor(qf, dtype=torch.float32), torch.tensor(gf, dtype=torch.float32)
    # A tiny budget forces one query row per chunk.
    got = _topk(q, g, q_pids, g_pids, q_cams, g_cams, k, feat_norm, memory_budget_mb=1e-4)
    want = _brute_force(qf, gf, q_pids, g_pids, q_cams, g_cams, feat_norm)
    assert len(got) == len(qf)
    for (gi, gd), (wi, wd) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gi, wi[:k])
        np.testing.assert_allclose(gd, wd[:k], rtol=1e-5, atol=1e-5)


def test_ties_ranked_by_gallery_index_and_short_lists():
    # Integer features without normalisation give exact float32 distances, so ties are exact.
    gf = np.array([[1, 0], [0, 1], [1, 0], [0, 0], [1, 0], [0, 1]], dtype=np.float32)
    qf = np.array([[1, 0], [0, 1]], dtype=np.float32)
    g_pids = np.array([0, 1, 2, 0, 3, 1])
    g_cams = np.array([0, 0, 1, 1, 0, 0])
    q_pids, q_cams = np.array([0, 1]), np.array([0, 0])
    got = _topk(qf, gf, q_pids, g_pids, q_cams, g_cams, 10, feat_norm=False)
    want = _brute_force(qf, gf, q_pids, g_pids, q_cams, g_cams, feat_norm=False)
    # Query 0 loses gallery item 0 (same pid and camera), query 1 loses items 1 and 5.
    np.testing.assert_array_equal(got[0][0], [2, 4, 3, 1, 5])
    np.testing.assert_array_equal(got[1][0], [3, 0, 2, 4])
    for (gi, _), (wi, _) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gi, wi)


def _sets(qf, gf, q_pids, g_pids, q_cams, g_cams, q_paths, g_paths):
    def one(feats, pids, cams, paths):
        feats = torch.tensor(feats, dtype=torch.float32)
        return FeatureSet(feats, pids, cams, np.zeros(len(pids), dtype=np.int64), paths)

    return one(qf, q_pids, q_cams, q_paths), one(gf, g_pids, g_cams, g_paths)


def _settings(**kwargs):
    base = dict(feat_norm=True, max_rank=50, memory_mb=64, rerank=None)
    base.update(amp_dtype="fp32")
    return EvalSettings(**{**base, **kwargs})


def test_written_lists_ap_selection_flags_and_pictures(tmp_path):
    qf, gf, q_pids, g_pids, q_cams, g_cams = _problem(seed=3)
    q_paths, g_paths = _images(tmp_path, "q", len(qf)), _images(tmp_path, "g", len(gf))
    query, gallery = _sets(qf, gf, q_pids, g_pids, q_cams, g_cams, q_paths, g_paths)
    k, n, tile = 5, 4, (32, 16)
    out_dir = tmp_path / "ranked"
    result = evaluate_features(
        query.feats,
        gallery.feats,
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        keep_topk=k,
        show_progress=False,
    )
    saved = write_ranked_lists(
        query,
        gallery,
        result,
        str(out_dir),
        _settings(),
        num_queries=n,
        select="worst",
        tile_size=tile,
    )
    assert json.loads((out_dir / "ranked_lists.json").read_text()) == saved
    assert saved["topk"] == k and saved["feat_norm"] is True and saved["re_ranking"] is False
    assert (saved["num_queries"], saved["num_gallery"]) == (len(qf), len(gf))
    want = _brute_force(qf, gf, q_pids, g_pids, q_cams, g_cams)
    brute = [_brute_ap(order, g_pids, q_pids[qi]) for qi, (order, _) in enumerate(want)]
    brute_ap = np.array([a for a, _ in brute])
    metrics_ap = evaluate_features(
        torch.tensor(qf), torch.tensor(gf), q_pids, g_pids, q_cams, g_cams, show_progress=False
    ).ap
    np.testing.assert_allclose(metrics_ap, brute_ap, rtol=1e-12, equal_nan=True)
    entries = saved["queries"]
    assert len(entries) == n
    chosen = [e["query_index"] for e in entries]
    valid = np.flatnonzero(~np.isnan(brute_ap))
    # 'worst': the n lowest APs, lowest first, and none of the others is lower.
    assert [e["ap"] for e in entries] == sorted(e["ap"] for e in entries)
    others = [brute_ap[i] for i in valid if i not in chosen]
    assert max(e["ap"] for e in entries) <= min(others)
    for e in entries:
        qi = e["query_index"]
        assert e["ap"] == pytest.approx(metrics_ap[qi], abs=1e-12)
        assert e["ap"] == pytest.approx(brute[qi][0], abs=1e-9)
        assert e["first_match_rank"] == brute[qi][1]
        assert e["path"] == q_paths[qi] and e["pid"] == q_pids[qi]
        order, dist = want[qi]
        assert [h["gallery_index"] for h in e["ranked"]] == order[:k].tolist()
        assert [h["path"] for h in e["ranked"]] == [g_paths[g] for g in order[:k]]
        assert [h["pid"] for h in e["ranked"]] == g_pids[order[:k]].tolist()
        np.testing.assert_allclose([h["distance"] for h in e["ranked"]], dist[:k], atol=1e-5)
        assert [h["match"] for h in e["ranked"]] == (g_pids[order[:k]] == q_pids[qi]).tolist()
        assert [h["rank"] for h in e["ranked"]] == list(range(1, k + 1))
        # The first true match in the list sits at the reported first-match rank.
        flags = [h["match"] for h in e["ranked"]]
        if True in flags:
            assert flags.index(True) + 1 == e["first_match_rank"]
        else:
            assert e["first_match_rank"] > k

    pngs = sorted(out_dir.glob("*.png"))
    assert sorted(e["image"] for e in entries) == [p.name for p in pngs]
    size = (GAP + (1 + k) * (tile[1] + GAP), GAP + tile[0] + LABEL_H)
    for e in entries:
        with Image.open(out_dir / e["image"]) as img:
            img = img.convert("RGB")
            assert img.size == size
            # The frame colour of each hit: green for a true match, red otherwise.
            for col, hit in enumerate(e["ranked"], start=1):
                r, g, _ = img.getpixel((GAP + col * (tile[1] + GAP), GAP + tile[0] // 2))
                assert (g > r) == hit["match"], (e["image"], col)


def test_writer_needs_the_evaluators_topk(tmp_path):
    qf, gf, q_pids, g_pids, q_cams, g_cams = _problem(seed=4)
    paths_q, paths_g = [f"q{i}.png" for i in range(len(qf))], [f"g{i}.png" for i in range(len(gf))]
    query, gallery = _sets(qf, gf, q_pids, g_pids, q_cams, g_cams, paths_q, paths_g)
    result = evaluate_features(
        query.feats, gallery.feats, q_pids, g_pids, q_cams, g_cams, show_progress=False
    )
    with pytest.raises(ValueError, match="keep_topk"):
        write_ranked_lists(query, gallery, result, str(tmp_path), _settings())
    assert not any(tmp_path.iterdir())


def test_select_modes():
    ap = np.array([0.5, np.nan, 0.1, 0.9, 0.1, 0.7])
    np.testing.assert_array_equal(select_queries(ap, 3, "worst"), [2, 4, 0])
    np.testing.assert_array_equal(select_queries(ap, 2, "best"), [3, 5])
    rand = select_queries(ap, 10, "random", seed=1)
    np.testing.assert_array_equal(rand, [0, 2, 3, 4, 5])  # all valid queries, capped
    with pytest.raises(ValueError, match="worst"):
        select_queries(ap, 1, "median")


def test_end_to_end_test_script_writes_ranked_lists(tmp_path):
    out = tmp_path / "run"
    train_clipreid.main(_opts(tmp_path / "data", out, s1=1, s2=1))
    test_out = tmp_path / "test"
    argv = [
        "--config_file", str(out / "config.yaml"),
        "TEST.WEIGHT", str(out / "ViT-T-16-test_1.pth"),
        "TEST.VISUALIZE", "3",
        "TEST.VISUALIZE_TOPK", "4",
        "OUTPUT_DIR", str(test_out),
    ]  # fmt: skip
    test_clipreid.main(argv)
    ranked = test_out / "ranked_lists"
    saved = json.loads((ranked / "ranked_lists.json").read_text())
    pngs = sorted(ranked.glob("*.png"))
    assert len(pngs) == 3 and len(saved["queries"]) == 3
    assert sorted(q["image"] for q in saved["queries"]) == [p.name for p in pngs]
    h, w = 64, 32  # INPUT.SIZE_TEST of _opts
    # The writer reports the evaluation's own results: same valid-query count, worst APs first.
    metrics = json.loads((test_out / "test_metrics.json").read_text())
    assert saved["num_valid_queries"] == metrics["num_valid_queries"]
    aps = [q["ap"] for q in saved["queries"]]
    assert aps == sorted(aps) and np.mean(aps) <= metrics["mAP"]
    for q in saved["queries"]:
        assert len(q["ranked"]) == 4
        with Image.open(ranked / q["image"]) as img:
            assert img.size == (GAP + 5 * (w + GAP), GAP + h + LABEL_H)
