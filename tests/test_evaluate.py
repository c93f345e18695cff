"""The inference path: feature extraction and VehicleID trial averaging against brute force."""

import numpy as np
import pytest
import torch
from PIL import Image

from configs.config import load_cfg
from datasets.build import build_dataloaders
from datasets.image_dataset import ImageDataset, collate_batch, read_image
from processor.evaluate import (
    FeatureSet,
    build_eval_settings,
    evaluate_bundle,
    evaluate_trials,
    extract_features,
    summarize,
    summarize_trials,
)
from tests.conftest import MeanColour
from utils.metrics import eval_func, evaluate_features


def _vehicleid(root, num_ids=6, per_id=4):
    d = root / "VehicleID_V1.0"
    (d / "image").mkdir(parents=True)
    (d / "train_test_split").mkdir()
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for split, offset in (("train", 0), ("test", 100)):
        for pid in range(num_ids):
            colour = rng.integers(0, 255, size=3)
            for k in range(per_id):
                name = f"{offset + pid:03d}{k:04d}"
                noise = rng.integers(-40, 40, size=(16, 16, 3))
                pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / "image" / f"{name}.jpg", quality=95)
                lines[split].append(f"{name} {offset + pid}")
    (d / "train_test_split" / "train_list.txt").write_text("\n".join(lines["train"]) + "\n")
    (d / "train_test_split" / "test_list_800.txt").write_text("\n".join(lines["test"]) + "\n")


def _vehicleid_cfg(tmp_path):
    return load_cfg(
        None,
        [
            "DATASETS.NAMES", "VehicleID", "DATASETS.ROOT_DIR", str(tmp_path),
            "INPUT.SIZE_TRAIN", "[32, 32]", "INPUT.SIZE_TEST", "[32, 32]",
            "DATALOADER.NUM_WORKERS", "0", "TEST.VEHICLEID_TRIALS", "3",
            "SOLVER.STAGE2.IMS_PER_BATCH", "8", "MODEL.DEVICE", "cpu",
        ],
    )  # fmt: skip


class LeftWeighted(MeanColour):
    """A stand-in whose feature changes when the image is mirrored: pixels weighted by column."""

    def encode_image(self, images, camids=None, viewids=None):
        ramp = torch.linspace(0.0, 1.0, images.shape[3])
        return (images * ramp).mean(dim=(2, 3)) @ self.proj


def test_flip_feature_is_the_mean_of_the_image_and_its_mirror(tmp_path):
    _vehicleid(tmp_path)
    cfg = _vehicleid_cfg(tmp_path)
    cfg.defrost()
    cfg.TEST.FLIP_FEAT = True
    data = build_dataloaders(cfg)
    model = LeftWeighted()
    settings = build_eval_settings(cfg)
    assert settings.flip_feat
    got = extract_features(model, data.val, torch.device("cpu"), settings)
    # Brute force: mirror the decoded pixels, then the test transform, one image at a time.
    transform = data.val.dataset.transform
    want = []
    for path in got.paths:
        pixels = read_image(path)
        plain = model.encode_image(transform(pixels)[None])
        mirrored = model.encode_image(transform(pixels.flip(2))[None])
        want.append((plain + mirrored) / 2)
    torch.testing.assert_close(got.feats, torch.cat(want).detach(), atol=1e-5, rtol=0)
    without = extract_features(
        model, data.val, torch.device("cpu"), build_eval_settings(_vehicleid_cfg(tmp_path))
    )
    assert not torch.allclose(without.feats, got.feats, atol=1e-3)


class NotCalled(torch.nn.Module):
    def encode_image(self, images, camids=None, viewids=None):
        raise AssertionError("the features passed in must be reused, not extracted again")


def test_vehicleid_trials_average_matches_brute_force(tmp_path):
    _vehicleid(tmp_path)
    cfg = _vehicleid_cfg(tmp_path)
    data = build_dataloaders(cfg)
    assert data.num_trials == 3
    model = MeanColour()
    summary = evaluate_bundle(model, data, build_eval_settings(cfg), torch.device("cpu"))

    expected = []
    for trial in range(3):
        split = data.dataset.for_trial(trial)
        trial_set = ImageDataset(split.query + split.gallery, data.val.dataset.transform)
        loader = torch.utils.data.DataLoader(trial_set, batch_size=8, collate_fn=collate_batch)
        feats, pids, cams = [], [], []
        for batch in loader:
            feats.append(model.encode_image(batch["images"]).detach())
            pids.append(batch["pids"].numpy())
            cams.append(batch["camids"].numpy())
        f = torch.nn.functional.normalize(torch.cat(feats), dim=1).numpy().astype(np.float64)
        p, c = np.concatenate(pids), np.concatenate(cams)
        q = data.num_query
        dist = ((f[:q, None, :] - f[None, q:, :]) ** 2).sum(-1)
        cmc, m_ap = eval_func(dist, p[:q], p[q:], c[:q], c[q:], max_rank=50)
        expected.append((m_ap, cmc[0], cmc[min(5, len(cmc)) - 1]))
    splits = {tuple(sorted(r.path for r in data.dataset.for_trial(t).gallery)) for t in range(3)}
    assert len(splits) > 1, "trials must draw different galleries"
    assert summary["num_trials"] == 3
    assert summary["mAP"] == pytest.approx(np.mean([e[0] for e in expected]), abs=1e-5)
    assert summary["rank1"] == pytest.approx(np.mean([e[1] for e in expected]), abs=1e-5)
    assert summary["rank5"] == pytest.approx(np.mean([e[2] for e in expected]), abs=1e-5)


def test_extract_features_returns_a_named_set_in_loader_order(tmp_path):
    _vehicleid(tmp_path)
    cfg = _vehicleid_cfg(tmp_path)
    data = build_dataloaders(cfg)
    model = MeanColour()
    settings = build_eval_settings(cfg)
    features = extract_features(model, data.val, torch.device("cpu"), settings)
    batches = list(data.val)
    images = torch.cat([b["images"] for b in batches])
    torch.testing.assert_close(features.feats, model.encode_image(images), rtol=0, atol=1e-6)
    for name in ("pids", "camids", "viewids"):
        want = np.concatenate([b[name].numpy() for b in batches])
        np.testing.assert_array_equal(getattr(features, name), want)
        assert getattr(features, name).dtype == np.int64
    assert features.paths == [p for b in batches for p in b["paths"]]
    assert len(features) == len(images)

    # Trial results: the summary is their mean, and a caller's features are reused.
    results = evaluate_trials(features, data, settings, keep_topk=3)
    assert len(results) == 3
    assert results[0].topk_indices.shape == (data.num_query, 3)
    summary = summarize_trials(results)
    assert summary["mAP"] == pytest.approx(np.mean([r.mAP for r in results]), abs=1e-12)
    assert summary["num_trials"] == 3
    assert evaluate_bundle(NotCalled(), data, settings, torch.device("cpu"), features) == summary
    # Trial 0 is the loader's split: queries first, then the gallery, camids as loaded.
    q, g = features.query(data.num_query), features.gallery(data.num_query)
    direct = evaluate_features(
        q.feats, g.feats, q.pids, g.pids, q.camids, g.camids, show_progress=False
    )
    np.testing.assert_array_equal(results[0].ap, direct.ap)
    np.testing.assert_array_equal(results[0].first_match_rank, direct.first_match_rank)


def test_feature_set_subsets():
    feats = torch.arange(12.0).view(6, 2)
    fs = FeatureSet(
        feats,
        np.arange(6) + 10,
        np.arange(6) % 2,
        np.zeros(6, dtype=np.int64),
        [f"img{i}.jpg" for i in range(6)],
    )
    sub = fs.subset(np.array([4, 1]))
    assert torch.equal(sub.feats, feats[[4, 1]])
    assert sub.pids.tolist() == [14, 11] and sub.camids.tolist() == [0, 1]
    assert sub.paths == ["img4.jpg", "img1.jpg"]
    q, g = fs.query(2), fs.gallery(2)
    assert torch.equal(q.feats, feats[:2]) and q.paths == ["img0.jpg", "img1.jpg"]
    assert torch.equal(g.feats, feats[2:]) and g.pids.tolist() == [12, 13, 14, 15]
    assert len(q) + len(g) == len(fs)
    with pytest.raises(ValueError, match="paths"):
        FeatureSet(feats, fs.pids, fs.camids, fs.viewids, fs.paths[:5])


def test_summarize_reads_the_cmc_curve():
    class R:
        cmc = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0])
        mAP, mINP, num_valid_queries = 0.4, 0.2, 7

    s = summarize(R())
    assert (s["rank1"], s["rank5"], s["rank10"]) == (0.5, 0.9, 0.99)
    assert s["num_valid_queries"] == 7
