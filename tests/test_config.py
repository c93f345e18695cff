"""Configuration loading: official YAMLs, legacy values, errors and the saved config."""

import glob
import logging
import os

import pytest
import yaml

from configs.config import (
    ConfigError,
    _flatten,
    _to_dict,
    config_choices,
    load_cfg,
    save_cfg,
)
from configs.defaults import LEGACY_KEYS, get_cfg_defaults
from tests.official_configs import (
    OFFICIAL_FILES,
    STYLE_FILES,
    official_config,
    official_configs_dir,
    write_official_style,
)


def _yaml_file(source: str, rel: str, tmp_path) -> str:
    """An official YAML file ('official', needs the environment variable) or a look-alike."""
    return official_config(rel) if source == "official" else write_official_style(tmp_path)[rel]


def test_official_yamls_are_present():
    folder = official_configs_dir()
    found = sorted(
        os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "*", "*.yml"))
    )
    assert found == sorted(OFFICIAL_FILES) and len(found) == 12


def _check_loads_with_its_values(path):
    with open(path) as f:
        raw = yaml.safe_load(f)
    cfg = load_cfg(path, ["DATASETS.NAMES", "market1501"])
    assert cfg.MODEL.NAME == raw["MODEL"]["NAME"]
    assert list(cfg.INPUT.SIZE_TRAIN) == raw["INPUT"]["SIZE_TRAIN"]
    assert list(cfg.INPUT.PIXEL_MEAN) == raw["INPUT"]["PIXEL_MEAN"]
    assert cfg.MODEL.IF_LABELSMOOTH is (raw["MODEL"]["IF_LABELSMOOTH"] == "on")
    assert cfg.TEST.FEAT_NORM is True and cfg.TEST.NECK_FEAT == "before"
    solver = raw["SOLVER"]
    if "STAGE2" in solver:
        assert cfg.MODEL.METHOD == "clipreid"
        s2 = solver["STAGE2"]
        assert cfg.SOLVER.STAGE1.MAX_EPOCHS == solver["STAGE1"]["MAX_EPOCHS"]
        assert cfg.SOLVER.STAGE1.LR_MIN == pytest.approx(float(solver["STAGE1"]["LR_MIN"]))
    else:
        assert cfg.MODEL.METHOD == "baseline"
        s2 = solver
    assert cfg.SOLVER.STAGE2.BASE_LR == pytest.approx(float(s2["BASE_LR"]))
    assert list(cfg.SOLVER.STAGE2.STEPS) == s2["STEPS"]
    assert cfg.SOLVER.STAGE2.WARMUP_FACTOR == pytest.approx(float(s2["WARMUP_FACTOR"]))
    assert cfg.SOLVER.STAGE2.BIAS_LR_FACTOR == pytest.approx(2.0)
    assert cfg.MODEL.ID_LOSS_WEIGHT == pytest.approx(raw["MODEL"]["ID_LOSS_WEIGHT"])


@pytest.mark.parametrize("rel", OFFICIAL_FILES)
def test_every_official_yaml_loads_with_its_values(rel):
    _check_loads_with_its_values(official_config(rel))


@pytest.mark.parametrize("rel", sorted(STYLE_FILES))
def test_official_style_yaml_loads_with_its_values(rel, tmp_path):
    path = write_official_style(tmp_path)[rel]
    _check_loads_with_its_values(path)
    # The traits the loader handles are really in the file: strings, not YAML booleans/floats.
    raw = yaml.safe_load(open(path))
    assert raw["DATASETS"] is None and raw["TEST"]["FEAT_NORM"] == "yes"
    assert raw["MODEL"]["IF_LABELSMOOTH"] in ("on", "off")
    assert ("STAGE2" in raw["SOLVER"]) == (rel == "person/vit_clipreid.yml")
    if "STAGE1" in raw["SOLVER"]:
        assert raw["SOLVER"]["STAGE1"]["LR_MIN"] == "1e-6"


@pytest.mark.parametrize(
    ("source", "rel"), [("official", "veri/vit_prom.yml"), ("style", "veri/cnn_base.yml")]
)
def test_official_yaml_dataset_from_command_line_and_vehicle_prompt(source, rel, tmp_path):
    path = _yaml_file(source, rel, tmp_path)
    cfg = load_cfg(path, ["DATASETS.NAMES", "veri", "DATASETS.ROOT_DIR", "/d"])
    assert list(cfg.DATASETS.NAMES) == ["veri"] and cfg.DATASETS.ROOT_DIR == "/d"
    assert cfg.MODEL.PROMPT_CLASS == "vehicle"
    assert load_cfg(None, ["DATASETS.NAMES", "msmt17"]).MODEL.PROMPT_CLASS == "person"


@pytest.mark.parametrize(
    ("source", "rel"),
    [("official", "person/vit_clipreid.yml"), ("style", "person/vit_clipreid.yml")],
)
def test_legacy_keys_are_dropped_with_one_warning(source, rel, tmp_path, caplog):
    path = _yaml_file(source, rel, tmp_path)
    with caplog.at_level(logging.WARNING):
        load_cfg(path)
    msgs = [r.getMessage() for r in caplog.records if "never reads" in r.getMessage()]
    assert len(msgs) == 1
    assert "MODEL.PRETRAIN_CHOICE" in msgs[0] and "TEST.EVAL" in msgs[0]
    defined = set(_flatten(_to_dict(get_cfg_defaults())))
    assert not defined & set(LEGACY_KEYS), "a legacy key is also a live key"


@pytest.mark.parametrize(
    "value,expected",
    [("no", False), ("'no'", False), ("yes", True), ("off", False), ("True", True)],
)
def test_legacy_boolean_strings_become_booleans(value, expected):
    cfg = load_cfg(None, ["TEST.FEAT_NORM", value])
    assert cfg.TEST.FEAT_NORM is expected


def test_unknown_key_names_closest_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_cfg(None, ["MODEL.SIE_CAMRA", "True"])
    assert "MODEL.SIE_CAMERA" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_cfg(None, ["SOLVER.STAGE2.BASE_LRR", "1e-3"])
    assert "SOLVER.STAGE2.BASE_LR" in str(err.value)


def test_invalid_choice_lists_valid_values():
    with pytest.raises(ConfigError) as err:
        load_cfg(None, ["MODEL.NAME", "resnet50"])
    msg = str(err.value)
    for name in config_choices()["MODEL.NAME"]:
        assert name in msg


def test_type_errors_and_pairs():
    with pytest.raises(ConfigError, match="SOLVER.STAGE2.STEPS"):
        load_cfg(None, ["SOLVER.STAGE2.STEPS", "abc"])
    with pytest.raises(ConfigError, match="pairs"):
        load_cfg(None, ["MODEL.NAME"])
    cfg = load_cfg(None, ["SOLVER.STAGE2.BIAS_LR_FACTOR", "3", "MODEL.STRIDE_SIZE", "[12, 12]"])
    assert isinstance(cfg.SOLVER.STAGE2.BIAS_LR_FACTOR, float)
    assert list(cfg.MODEL.STRIDE_SIZE) == [12, 12]


def test_grid_mismatch_between_train_and_test_size():
    with pytest.raises(ConfigError, match="INPUT.SIZE_TEST"):
        load_cfg(None, ["INPUT.SIZE_TEST", "[384, 128]"])


def test_center_loss_is_refused():
    with pytest.raises(ConfigError, match="center"):
        load_cfg(None, ["MODEL.METRIC_LOSS_TYPE", "triplet_center"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_cfg(None, ["DATASETS.NAMES", "['market1501', 'dukemtmc']", "TEST.FEAT_NORM", "no"])
    path = str(tmp_path / "run" / "config.yaml")
    save_cfg(cfg, path)
    again = load_cfg(path)
    assert again == cfg
    assert list(again.DATASETS.NAMES) == ["market1501", "dukemtmc"]


def test_defaults_is_a_fresh_clone():
    a = get_cfg_defaults()
    a.MODEL.NAME = "RN50"
    assert get_cfg_defaults().MODEL.NAME == "ViT-B-16"


def test_every_key_has_a_comment():
    src = open(os.path.join(os.path.dirname(__file__), "..", "configs", "defaults.py")).read()
    lines = src.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("_C.") and " = " in line and "CN()" not in line:
            assert lines[i - 1].lstrip().startswith("#"), f"no comment above: {line}"


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yml").write_text("MODEL:\n  NAME: RN50\n  SIE_COE: 1.0\n")
    (tmp_path / "child.yml").write_text("_BASE_: base.yml\nMODEL:\n  SIE_COE: 2.0\n")
    cfg = load_cfg(str(tmp_path / "child.yml"))
    assert cfg.MODEL.NAME == "RN50" and cfg.MODEL.SIE_COE == 2.0
    (tmp_path / "loop.yml").write_text("_BASE_: loop.yml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_cfg(str(tmp_path / "loop.yml"))


def test_registered_names_become_valid_config_values():
    """Components own their vocabulary: a newly registered arch or method loads in a config."""
    import dataclasses

    from model.clip.arch import ARCHS, get_arch, register_arch
    from processor.recipes import RECIPES, Recipe, register_recipe

    with pytest.raises(ConfigError, match="MODEL.NAME"):
        load_cfg(None, ["MODEL.NAME", "ViT-T-16-mine"])
    with pytest.raises(ConfigError, match="MODEL.METHOD"):
        load_cfg(None, ["MODEL.METHOD", "my_method"])
    register_arch(dataclasses.replace(get_arch("ViT-T-16-test"), name="ViT-T-16-mine"))
    register_recipe("my_method")(type("MyRecipe", (Recipe,), {}))
    try:
        cfg = load_cfg(None, ["MODEL.NAME", "ViT-T-16-mine", "MODEL.METHOD", "my_method"])
        assert (cfg.MODEL.NAME, cfg.MODEL.METHOD) == ("ViT-T-16-mine", "my_method")
        assert "my_method" in config_choices()["MODEL.METHOD"]
    finally:
        ARCHS.remove("ViT-T-16-mine")
        RECIPES.remove("my_method")


def test_every_numeric_key_has_a_range_and_violations_name_the_key():
    """No numeric key escapes the range check; values that used to fail late fail at load."""
    from configs.config import _in_range
    from configs.defaults import RANGES

    flat = _flatten(_to_dict(get_cfg_defaults()))

    def numeric(v):
        items = v if isinstance(v, (list, tuple)) else [v]
        return bool(items) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in items
        )

    assert {k for k, v in flat.items() if numeric(v)} == set(RANGES)
    for key, value in (("SOLVER.STAGE2.BASE_LR", "-0.1"), ("TEST.IMS_PER_BATCH", "0")):
        with pytest.raises(ConfigError, match=rf"{key} = .* is out of range"):
            load_cfg(None, [key, value])
    with pytest.raises(ConfigError, match=r"INPUT.PIXEL_STD = \[0.5, 0.0, 0.5\]"):
        load_cfg(None, ["INPUT.PIXEL_STD", "[0.5, 0.0, 0.5]"])
    cases = [(0.0, "[0, 1)", True), (1.0, "[0, 1)", False), (0.0, "(0, 1)", False)]
    cases += [(1.0, "(0, 1]", True), (0.0, "> 0", False), (0.0, ">= 0", True), (-1, ">= 0", False)]
    for value, rule, expected in cases:
        assert _in_range(value, rule) is expected, (value, rule)
