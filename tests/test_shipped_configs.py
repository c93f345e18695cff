"""Shipped configs: they load, carry the paper's hyperparameters and match the official YAMLs."""

import ast
import glob
import os

import pytest
import yaml

from configs.config import _flatten, _to_dict, load_cfg
from configs.defaults import LEGACY_KEYS
from tests.conftest import ROOT
from tests.official_configs import (
    OFFICIAL_FILES,
    STYLE_FILES,
    official_config,
    write_official_style,
)
from tools.paper_tables import TABLES

CONFIG_DIR = os.path.join(ROOT, "configs")
SHIPPED = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yml"), recursive=True))
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Our table config -> (official file, its dataset, the command-line flags of the official README
# recipe that turn the plain CLIP-ReID file into the row's variant).
SIE_OLP = ["MODEL.SIE_CAMERA", "True", "MODEL.SIE_COE", "1.0", "MODEL.STRIDE_SIZE", "[12, 12]"]
COUNTERPARTS = {
    "person/cnn_base.yml": ("person/cnn_base.yml", "market1501", []),
    "person/cnn_clipreid.yml": ("person/cnn_clipreid.yml", "market1501", []),
    "person/vit_base.yml": ("person/vit_base.yml", "market1501", []),
    "person/vit_clipreid.yml": ("person/vit_clipreid.yml", "market1501", []),
    "person/vit_clipreid_sie_olp.yml": ("person/vit_clipreid.yml", "market1501", SIE_OLP),
    "veri/cnn_base.yml": ("veri/cnn_base.yml", "veri", []),
    "veri/cnn_clipreid.yml": ("veri/cnn_prom.yml", "veri", []),
    "veri/vit_base.yml": ("veri/vit_base.yml", "veri", []),
    "veri/vit_clipreid.yml": ("veri/vit_prom.yml", "veri", []),
    "veri/vit_clipreid_sie_olp.yml": (
        "veri/vit_prom.yml",
        "veri",
        [*SIE_OLP, "MODEL.SIE_VIEW", "True"],
    ),
    "vehicleid/cnn_base.yml": ("VehicleID/cnn_base.yml", "VehicleID", []),
    "vehicleid/cnn_clipreid.yml": ("VehicleID/cnn_clipreid.yml", "VehicleID", []),
    "vehicleid/vit_base.yml": ("VehicleID/vit_base.yml", "VehicleID", []),
    "vehicleid/vit_clipreid.yml": ("VehicleID/vit_clipreid.yml", "VehicleID", []),
    "vehicleid/vit_clipreid_olp.yml": (
        "VehicleID/vit_clipreid.yml",
        "VehicleID",
        ["MODEL.STRIDE_SIZE", "[12, 12]"],
    ),
}
# Configs of other methods than CLIP-ReID (no official CLIP-ReID file).
OTHER_METHODS = {
    "person/vit_pcl.yml",
    "person/vit_pcl_noid.yml",
    "person/vit_pcl_usl.yml",
    "veri/vit_pcl.yml",
    "veri/vit_pcl_noid.yml",
}
# Configs without a row in tools/paper_tables.yaml (the PCL-CLIP USL numbers are unverified).
UNTABULATED = {"person/vit_pcl_usl.yml"}
# How often weights are saved changes nothing in training; ours save more often than the
# official files (which save only at the end).
BOOKKEEPING = {"SOLVER.STAGE1.CHECKPOINT_PERIOD", "SOLVER.STAGE2.CHECKPOINT_PERIOD", "OUTPUT_DIR"}


def _cfg_path(rel: str) -> str:
    return os.path.join(CONFIG_DIR, rel)


def _norm(value):
    """Official spellings to plain values: 'on'/'yes' -> True, '1e-6' -> 1e-6, ints -> floats."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("on", "yes", "true"):
            return True
        if low in ("off", "no", "false"):
            return False
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def _ours_flat(cfg) -> dict:
    return _flatten(_to_dict(cfg))


def test_configs_are_found():
    # The twelve official files: tests/test_config.py::test_official_yamls_are_present.
    assert len(SHIPPED) >= 26  # 15 table configs, 11 ablations, demo


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_every_shipped_yaml_loads_and_validates(path):
    cfg = load_cfg(path)
    assert cfg.is_frozen()
    # What the file sets (after _BASE_) must be what the loaded config holds.
    with open(path) as f:
        raw = yaml.safe_load(f)
    for key, value in _flatten({k: v for k, v in raw.items() if k != "_BASE_"}).items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert _norm(node) == _norm(value), key


def _check_loads_with_and_without_dataset(path, folder):
    # With the empty DATASETS block as shipped, and with the dataset on the command line.
    assert load_cfg(path).DATASETS.NAMES == ["market1501"]
    dataset = {"person": "msmt17", "veri": "veri", "VehicleID": "VehicleID"}[folder]
    cfg = load_cfg(path, ["DATASETS.NAMES", dataset, "DATASETS.ROOT_DIR", "elsewhere"])
    assert list(cfg.DATASETS.NAMES) == [dataset] and cfg.DATASETS.ROOT_DIR == "elsewhere"


@pytest.mark.parametrize("rel", OFFICIAL_FILES)
def test_every_official_yaml_loads(rel):
    _check_loads_with_and_without_dataset(official_config(rel), rel.split("/")[0])


@pytest.mark.parametrize("rel", sorted(STYLE_FILES))
def test_every_official_style_yaml_loads(rel, tmp_path):
    _check_loads_with_and_without_dataset(write_official_style(tmp_path)[rel], rel.split("/")[0])


def test_every_table_config_has_an_official_counterpart():
    table = set()
    for sub in ("person", "veri", "vehicleid"):
        table |= {f"{sub}/{os.path.basename(p)}" for p in glob.glob(_cfg_path(f"{sub}/*.yml"))}
    assert table - OTHER_METHODS == set(COUNTERPARTS)


@pytest.mark.parametrize("ours", sorted(COUNTERPARTS))
def test_table_config_matches_official_yaml_key_by_key(ours):
    official, dataset, extra = COUNTERPARTS[ours]
    with open(official_config(official)) as f:
        raw = {k: v for k, v in yaml.safe_load(f).items() if v is not None}
    flat_solver = "STAGE2" not in raw["SOLVER"]
    mine = _ours_flat(load_cfg(_cfg_path(ours), ["DATASETS.NAMES", dataset]))
    expected = _flatten(raw)
    expected.update({extra[i]: ast.literal_eval(extra[i + 1]) for i in range(0, len(extra), 2)})
    compared = 0
    for key, value in expected.items():
        parts = key.split(".")
        if flat_solver and parts[0] == "SOLVER" and len(parts) == 2:
            key = f"SOLVER.STAGE2.{parts[1]}"  # the baseline recipe has a single stage
        if key in LEGACY_KEYS:
            assert key not in mine, f"{key} is ignored on load, so ours must not define it"
            continue
        if key in BOOKKEEPING:
            continue
        assert key in mine, f"{ours}: the official key {key} has no counterpart"
        want, got = _norm(value), _norm(mine[key])
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-9), f"{ours}: {key}"
        else:
            assert got == want, f"{ours}: {key}"
        compared += 1
    assert compared >= 30


@pytest.mark.parametrize("ours", sorted(COUNTERPARTS))
def test_table_config_resolves_like_the_official_run(ours):
    """Stronger: ours and the official file (plus README flags) resolve to the same config."""
    official, dataset, extra = COUNTERPARTS[ours]
    mine = _ours_flat(load_cfg(_cfg_path(ours), ["DATASETS.NAMES", dataset]))
    theirs = _ours_flat(load_cfg(official_config(official), ["DATASETS.NAMES", dataset, *extra]))
    differ = {k for k in mine if mine[k] != theirs[k]} - BOOKKEEPING
    if mine["MODEL.METHOD"] == "baseline":
        # A baseline has no stage 1: our baseline files inherit unused stage-1 values.
        differ = {k for k in differ if not k.startswith("SOLVER.STAGE1.")}
    assert differ == set()


# Hand-written from the paper and the official recipes (not read from any file).
VIT = dict(
    name="ViT-B-16",
    mean=[0.5] * 3,
    std=[0.5] * 3,
    s2_lr=5e-6,
    s2_wd=1e-4,
    warm=0.1,
    steps=[30, 50],
    s2_epochs=60,
)
CNN = dict(
    name="RN50",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    s2_lr=3.5e-4,
    s2_wd=5e-4,
    warm=0.01,
    steps=[40, 70],
    s2_epochs=120,
)
PAPER = {
    # config: (backbone, method, (id, tri, i2t) weights, image size, stage-1 epochs, overrides)
    "person/cnn_base.yml": (CNN, "baseline", (1.0, 1.0), [256, 128], None, {}),
    "person/cnn_clipreid.yml": (CNN, "clipreid", (1.0, 1.0, 1.0), [256, 128], 60, {}),
    "person/vit_base.yml": (VIT, "baseline", (1.0, 1.0), [256, 128], None, {}),
    "person/vit_clipreid.yml": (VIT, "clipreid", (0.25, 1.0, 1.0), [256, 128], 120, {}),
    "person/vit_clipreid_sie_olp.yml": (
        VIT,
        "clipreid",
        (0.25, 1.0, 1.0),
        [256, 128],
        120,
        {"sie": (True, False, 1.0), "stride": [12, 12]},
    ),
    "veri/cnn_base.yml": (CNN, "baseline", (1.0, 1.0), [256, 256], None, {}),
    "veri/cnn_clipreid.yml": (CNN, "clipreid", (1.0, 1.0, 1.0), [256, 256], 60, {}),
    "veri/vit_base.yml": (VIT, "baseline", (1.0, 1.0), [256, 256], None, {}),
    "veri/vit_clipreid.yml": (VIT, "clipreid", (0.25, 1.0, 1.0), [256, 256], 60, {}),
    "veri/vit_clipreid_sie_olp.yml": (
        VIT,
        "clipreid",
        (0.25, 1.0, 1.0),
        [256, 256],
        60,
        {"sie": (True, True, 1.0), "stride": [12, 12]},
    ),
    "vehicleid/cnn_base.yml": (CNN, "baseline", (1.0, 1.0), [256, 256], None, {"ls": False}),
    "vehicleid/cnn_clipreid.yml": (
        CNN,
        "clipreid",
        (1.0, 1.0, 1.0),
        [256, 256],
        60,
        {"ls": False, "s1_batch": 256},
    ),
    "vehicleid/vit_base.yml": (
        VIT,
        "baseline",
        (1.0, 1.0),
        [256, 256],
        None,
        {"ls": False, "s2_lr": 5e-5},
    ),
    "vehicleid/vit_clipreid.yml": (
        VIT,
        "clipreid",
        (0.25, 1.0, 1.0),
        [256, 256],
        60,
        {"s1_batch": 256, "s2_lr": 5e-5},
    ),
    "vehicleid/vit_clipreid_olp.yml": (
        VIT,
        "clipreid",
        (0.25, 1.0, 1.0),
        [256, 256],
        60,
        {"s1_batch": 256, "s2_lr": 5e-5, "stride": [12, 12]},
    ),
}


@pytest.mark.parametrize("rel", sorted(PAPER))
def test_table_config_carries_the_paper_hyperparameters(rel):
    spec, method, weights, size, s1_epochs, extra = PAPER[rel]
    cfg = load_cfg(_cfg_path(rel))
    s1, s2 = cfg.SOLVER.STAGE1, cfg.SOLVER.STAGE2
    assert cfg.MODEL.NAME == spec["name"] and cfg.MODEL.METHOD == method
    # Batch 64 = P 16 identities x K 4 images.
    assert s2.IMS_PER_BATCH == 64 and cfg.DATALOADER.NUM_INSTANCE == 4
    assert s2.IMS_PER_BATCH // cfg.DATALOADER.NUM_INSTANCE == 16
    assert cfg.DATALOADER.SAMPLER == "softmax_triplet"
    assert list(cfg.INPUT.SIZE_TRAIN) == size and list(cfg.INPUT.SIZE_TEST) == size
    assert list(cfg.INPUT.PIXEL_MEAN) == spec["mean"] and list(cfg.INPUT.PIXEL_STD) == spec["std"]
    assert cfg.MODEL.ID_LOSS_WEIGHT == weights[0] and cfg.MODEL.TRIPLET_LOSS_WEIGHT == weights[1]
    if method == "clipreid":
        assert cfg.MODEL.I2T_LOSS_WEIGHT == weights[2]
        assert list(s2.TEXT_LOSSES) == ["i2tce"]
        assert s1.MAX_EPOCHS == s1_epochs and s1.IMS_PER_BATCH == extra.get("s1_batch", 64)
        assert s1.BASE_LR == pytest.approx(3.5e-4) and s1.WEIGHT_DECAY == pytest.approx(1e-4)
        assert s1.WARMUP_EPOCHS == 5 and s1.WARMUP_LR_INIT == pytest.approx(1e-5)
        assert s1.LR_MIN == pytest.approx(1e-6) and s1.MODE == "instance"
        assert cfg.MODEL.PROMPT_N_CTX == 4
    assert s2.OPTIMIZER_NAME == "Adam"
    assert s2.BASE_LR == pytest.approx(extra.get("s2_lr", spec["s2_lr"]))
    assert s2.WEIGHT_DECAY == pytest.approx(spec["s2_wd"])
    assert s2.WEIGHT_DECAY_BIAS == pytest.approx(spec["s2_wd"])
    assert s2.BIAS_LR_FACTOR == 2.0 and not s2.LARGE_FC_LR
    assert s2.WARMUP_METHOD == "linear" and s2.WARMUP_ITERS == 10
    assert s2.WARMUP_FACTOR == pytest.approx(spec["warm"])
    assert list(s2.STEPS) == spec["steps"] and s2.GAMMA == pytest.approx(0.1)
    assert s2.MAX_EPOCHS == spec["s2_epochs"] and s2.EVAL_PERIOD == spec["s2_epochs"]
    assert cfg.SOLVER.MARGIN == pytest.approx(0.3)
    assert cfg.MODEL.IF_LABELSMOOTH is extra.get("ls", True)
    assert list(cfg.MODEL.STRIDE_SIZE) == extra.get("stride", [16, 16])
    sie = extra.get("sie", (False, False, None))
    assert (cfg.MODEL.SIE_CAMERA, cfg.MODEL.SIE_VIEW) == sie[:2]
    if sie[2] is not None:
        assert cfg.MODEL.SIE_COE == 1.0 and cfg.MODEL.SIE_MODE == "cls"
    assert cfg.TEST.NECK_FEAT == "before" and cfg.TEST.FEAT_NORM is True
    assert cfg.TEST.RE_RANKING is False
    if rel.startswith("vehicleid/"):
        assert list(cfg.DATASETS.NAMES) == ["VehicleID"]
        assert cfg.DATASETS.VEHICLEID_TEST_SIZE == 800 and cfg.TEST.VEHICLEID_TRIALS == 10
        assert cfg.MODEL.PROMPT_CLASS == "vehicle"
    if rel.startswith("veri/"):
        assert list(cfg.DATASETS.NAMES) == ["veri"] and cfg.MODEL.PROMPT_CLASS == "vehicle"
        assert cfg.DATASETS.VERI_DROP_UNLABELED is False


# Each ablation = its table config plus exactly these changes (and its own OUTPUT_DIR).
ABLATIONS = {
    "cnn_one_stage.yml": (
        "person/cnn_clipreid.yml",
        {"MODEL.METHOD": "clipreid_one_stage", "SOLVER.STAGE2.TEXT_LOSSES": ["i2t", "t2i"]},
    ),
    "vit_one_stage.yml": (
        "person/vit_clipreid.yml",
        {"MODEL.METHOD": "clipreid_one_stage", "SOLVER.STAGE2.TEXT_LOSSES": ["i2t", "t2i"]},
    ),
    "vit_s2_i2t.yml": ("person/vit_clipreid.yml", {"SOLVER.STAGE2.TEXT_LOSSES": ["i2t"]}),
    "vit_s2_i2t_t2i.yml": (
        "person/vit_clipreid.yml",
        {"SOLVER.STAGE2.TEXT_LOSSES": ["i2t", "t2i"]},
    ),
    "vit_s2_i2tce_t2i.yml": (
        "person/vit_clipreid.yml",
        {"SOLVER.STAGE2.TEXT_LOSSES": ["i2tce", "t2i"]},
    ),
    "vit_sie_all.yml": (
        "person/vit_clipreid.yml",
        {"MODEL.SIE_CAMERA": True, "MODEL.SIE_COE": 1.0, "MODEL.SIE_MODE": "all"},
    ),
    "vit_sie_cls.yml": (
        "person/vit_clipreid.yml",
        {"MODEL.SIE_CAMERA": True, "MODEL.SIE_COE": 1.0},
    ),
    "vit_olp.yml": ("person/vit_clipreid.yml", {"MODEL.STRIDE_SIZE": [12, 12]}),
    "vit_stage1_average.yml": ("person/vit_clipreid.yml", {"SOLVER.STAGE1.MODE": "average"}),
    "vit_m1.yml": ("person/vit_clipreid.yml", {"MODEL.PROMPT_N_CTX": 1}),
    "vit_m8.yml": ("person/vit_clipreid.yml", {"MODEL.PROMPT_N_CTX": 8}),
}


def test_every_ablation_config_is_listed():
    found = {os.path.basename(p) for p in glob.glob(_cfg_path("person/ablations/*.yml"))}
    assert found == set(ABLATIONS)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_changes_only_its_variable(name):
    base, changes = ABLATIONS[name]
    a = _ours_flat(load_cfg(_cfg_path(f"person/ablations/{name}")))
    b = _ours_flat(load_cfg(_cfg_path(base)))
    differ = {k: a[k] for k in a if a[k] != b[k] and k != "OUTPUT_DIR"}
    assert differ == changes
    assert a["OUTPUT_DIR"] != b["OUTPUT_DIR"]


def _registry_cells():
    for table in TABLES.values():
        for row in table.rows:
            for col, cell in zip(table.columns, row.cells, strict=True):
                if cell is not None:
                    yield table.key, col.dataset, cell.config


def test_every_registry_row_names_an_existing_config():
    cells = list(_registry_cells())
    assert len(cells) >= 50
    for key, dataset, config in cells:
        assert os.path.isfile(os.path.join(ROOT, config)), (key, config)
        cfg = load_cfg(os.path.join(ROOT, config), ["DATASETS.NAMES", dataset])
        assert list(cfg.DATASETS.NAMES) == [dataset]


def test_every_paper_config_is_in_the_registry():
    used = {config for _, _, config in _registry_cells()}
    paper = {
        os.path.relpath(p, ROOT).replace(os.sep, "/")
        for p in SHIPPED
        if os.sep + "demo" + os.sep not in p
    }
    assert paper - {f"configs/{rel}" for rel in UNTABULATED} == used
