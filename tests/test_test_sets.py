"""DATASETS.TEST_NAMES: several test sets in one run, each as if evaluated alone."""

import json

import numpy as np
import pytest

import test_clipreid
import train_clipreid
from configs.config import ConfigError, load_cfg
from datasets.build import build_dataloaders
from datasets.synthetic import generate_synthetic_reid
from processor.extractor import FeatureExtractor
from tests.conftest import last_eval, tiny_run_opts
from utils.metrics import eval_func

KEYS = ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries")


def _second_set(root):
    """A second, distinct synthetic person set (another seed, 3 cameras) as 'market1501'."""
    generate_synthetic_reid(root, num_ids=10, num_cameras=3, images_per_id_cam=2, size=(64, 32),
                            seed=7)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny camera-SIE model trained on 'synthetic', evaluated on it and on 'market1501'."""
    root = tmp_path_factory.mktemp("test_sets")
    data = root / "data"
    _second_set(data)
    out = root / "run"
    extra = ["MODEL.METHOD", "baseline", "MODEL.SIE_CAMERA", "True"]
    extra += ["DATASETS.TEST_NAMES", "['synthetic', 'market1501']"]
    train_clipreid.main(tiny_run_opts(data, out, s1=0, s2=1, extra=extra))
    return {"root": root, "data": data, "run": out, "weights": out / "ViT-T-16-test_1.pth"}


def _test(trained, name, *overrides):
    out = trained["root"] / name
    argv = ["--config_file", str(trained["run"] / "config.yaml"), "TEST.WEIGHT"]
    argv += [str(trained["weights"]), "OUTPUT_DIR", str(out), *overrides]
    test_clipreid.main(argv)
    return json.loads((out / "test_metrics.json").read_text())


def test_each_set_equals_its_evaluation_alone(trained, capsys):
    logged = last_eval(trained["run"])  # the training loop's evaluation of both sets
    assert set(logged["test_sets"]) == {"synthetic", "market1501"}
    both = _test(trained, "both", "TEST.VISUALIZE", "2")
    printed = capsys.readouterr().out
    assert "synthetic mAP:" in printed and "market1501 Rank-1:" in printed
    assert set(both["test_sets"]) == {"synthetic", "market1501"}
    for key in KEYS:  # the top-level numbers are the first set's
        assert both[key] == both["test_sets"]["synthetic"][key]
    alone = {
        "synthetic": _test(trained, "alone_syn", "DATASETS.TEST_NAMES", "[]"),
        "market1501": _test(trained, "alone_mkt", "DATASETS.TEST_NAMES", "['market1501']"),
    }
    for name, single in alone.items():
        assert "test_sets" not in single
        for key in KEYS:
            assert both["test_sets"][name][key] == pytest.approx(single[key], abs=1e-9), key
            assert logged["test_sets"][name][key] == pytest.approx(single[key], abs=1e-6), key
    # The two sets are distinct data: different query counts and results.
    assert both["test_sets"]["synthetic"] != both["test_sets"]["market1501"]
    for name in ("synthetic", "market1501"):
        assert len(list((trained["root"] / "both" / "ranked_lists" / name).glob("*.png"))) == 2


def test_cross_domain_set_is_evaluated_with_the_sie_fallback(trained):
    """Brute force: the extractor's fallback features (no camera ids), dense distances."""
    cfg = load_cfg(str(trained["run"] / "config.yaml"))
    data = build_dataloaders(cfg)
    market = data.tests[1]
    assert market.name == "market1501" and not market.ids_known and data.tests[0].ids_known
    extractor = FeatureExtractor.from_config(cfg, trained["weights"], device="cpu")
    ds = market.dataset
    records = ds.query + ds.gallery
    feats = extractor([r.path for r in records]).double().numpy()
    q = len(ds.query)
    dist = ((feats[:q, None] - feats[None, q:]) ** 2).sum(-1)
    pids = np.array([r.pid for r in records])
    cams = np.array([r.camid for r in records])
    cmc, m_ap = eval_func(dist, pids[:q], pids[q:], cams[:q], cams[q:])
    alone = _test(trained, "alone_mkt2", "DATASETS.TEST_NAMES", "['market1501']")
    assert alone["mAP"] == pytest.approx(m_ap, abs=1e-5)
    assert alone["rank1"] == pytest.approx(float(cmc[0]), abs=1e-6)
    # The ids of another dataset's cameras do not index the trained SIE table (3 vs 2 cameras).
    with pytest.raises(ValueError, match=r"camids must be in 0\.\.1"):
        extractor([r.path for r in records], camids=[r.camid for r in records])


def test_a_second_training_dataset_keeps_its_training_camera_ids(tmp_path):
    data = tmp_path / "data"
    _second_set(data)
    opts = tiny_run_opts(data, tmp_path / "out", extra=[
        "DATASETS.NAMES", "['synthetic', 'market1501']",
        "DATASETS.TEST_NAMES", "['market1501', 'synthetic']",
    ])  # fmt: skip
    bundle = build_dataloaders(load_cfg(None, opts))
    market, synthetic = bundle.tests
    original = bundle.datasets[1]
    # 'synthetic' has 2 cameras: the second dataset's cameras are numbered from 2 in training.
    assert [r.camid + 2 for r in original.query] == [r.camid for r in market.dataset.query]
    assert [r.path for r in original.gallery] == [r.path for r in market.dataset.gallery]
    assert market.ids_known and synthetic.ids_known
    assert max(r.camid for r in market.dataset.gallery) < bundle.num_cameras == 5
    assert synthetic.dataset is bundle.dataset  # the first of NAMES: the combined set's split
    assert bundle.val is market.val and bundle.num_query == market.num_query == len(original.query)
    batch = next(iter(market.val))
    assert int(batch["camids"].min()) >= 2


def test_test_names_are_checked():
    with pytest.raises(ConfigError, match=r"DATASETS.TEST_NAMES = 'markt1501'.*'market1501'"):
        load_cfg(None, ["DATASETS.TEST_NAMES", "['markt1501']"])
    with pytest.raises(ConfigError, match=r"lists \['veri'\] more than once"):
        load_cfg(None, ["DATASETS.TEST_NAMES", "['veri', 'market1501', 'veri']"])
    assert load_cfg(None, ["DATASETS.TEST_NAMES", "veri"]).DATASETS.TEST_NAMES == ["veri"]
