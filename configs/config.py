"""Loading, translating and validating configurations.

One path for every entry point: defaults -> YAML file -> command-line ``KEY VALUE`` pairs ->
``validate_cfg`` -> ``freeze``. The loader accepts every YAML of the official CLIP-ReID
repository unchanged: legacy booleans ('on'/'off', 'yes'/'no') become real booleans, an empty
``DATASETS:`` block is ignored, keys the official code never reads are dropped with one warning,
and the flat ``SOLVER`` block of the baseline YAMLs is read as stage 2 of a baseline run.
"""

from __future__ import annotations

import ast
import difflib
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from configs.defaults import (
    FLAT_SOLVER_KEYS,
    LEGACY_KEYS,
    RANGES,
    get_cfg_defaults,
)
from datasets.build import dataset_options
from datasets.layouts import DATASETS
from datasets.synthetic import SYNTHETIC_MODES
from datasets.transforms import ERASE_MODES, TEST_INTERPOLATIONS
from datasets.vehicleid import VEHICLEID
from loss import MEMORY_UPDATES, SAMPLERS, TEXT_LOSSES
from model.build import check_model_cfg
from model.clip.arch import ARCHS
from model.clip.vision import SIE_MODES
from model.reid_model import NECK_FEATS, SIE_FALLBACKS
from processor.common import AMP_DTYPES
from processor.recipes import RECIPES, get_recipe
from processor.stage1 import STAGE1_MODES
from solver.optimizer import OPTIMIZERS
from solver.scheduler import WARMUP_METHODS
from utils.checkpoint import write_text
from utils.reranking import JACCARD_CONVENTIONS

logger = logging.getLogger(__name__)

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A configuration file, key or value is invalid; the message says what to change."""


def config_choices() -> dict[str, list]:
    """The valid values of every key that takes a fixed set of choices.

    Each set is owned by the component that implements it (a registry or a constant next to the
    code), so a name registered by a user (``register_arch``, ``register_recipe``) is valid here.

    Returns:
        Key -> valid values.
    """
    return {
        "MODEL.NAME": ARCHS.names(),
        "MODEL.METHOD": RECIPES.names(),
        "MODEL.SIE_MODE": list(SIE_MODES),
        "MODEL.AMP_DTYPE": list(AMP_DTYPES),
        "MODEL.MEMORY_UPDATE": list(MEMORY_UPDATES),
        "MODEL.CLUSTER_JACCARD": list(JACCARD_CONVENTIONS),
        "INPUT.RE_MODE": list(ERASE_MODES),
        "INPUT.TEST_INTERPOLATION": list(TEST_INTERPOLATIONS),
        "DATALOADER.SAMPLER": list(SAMPLERS),
        "DATASETS.VEHICLEID_TEST_SIZE": list(VEHICLEID.test_sizes),
        "DATASETS.SYNTHETIC.MODE": list(SYNTHETIC_MODES),
        "SOLVER.STAGE1.OPTIMIZER_NAME": list(OPTIMIZERS),
        "SOLVER.STAGE2.OPTIMIZER_NAME": list(OPTIMIZERS),
        "SOLVER.STAGE1.MODE": list(STAGE1_MODES),
        "SOLVER.STAGE2.WARMUP_METHOD": list(WARMUP_METHODS),
        "TEST.NECK_FEAT": list(NECK_FEATS),
        "TEST.SIE_FALLBACK": list(SIE_FALLBACKS),
    }


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping into ``{'A.B.C': value}``."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _all_keys(cfg: CN) -> list[str]:
    return list(_flatten(_to_dict(cfg)).keys())


def _to_dict(cfg: CN) -> dict:
    return {k: _to_dict(v) if isinstance(v, CN) else v for k, v in cfg.items()}


def _decode(value: Any) -> Any:
    """Decode a string the way yacs does: a Python literal when it parses as one."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Convert ``value`` to the type of ``default`` or raise a ConfigError naming key and source."""
    value = _decode(value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        if key in ("DATASETS.NAMES", "DATASETS.TEST_NAMES") and isinstance(value, str):
            return [value]
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    raise ConfigError(
        f"{source}: {key} = {value!r} has type {type(value).__name__}, "
        f"expected {type(default).__name__} like the default {default!r}"
    )


def _closest(key: str, keys: Sequence[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    near += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in near]
    near += [k for k in difflib.get_close_matches(leaf, keys, n=3, cutoff=0.5) if k not in near]
    return ", ".join(near[:4]) if near else "none"


def _translate(flat: dict[str, Any], source: str, legacy: dict[str, Any]) -> dict[str, Any]:
    """Map official spellings to this project's keys; collect legacy keys into ``legacy``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in LEGACY_KEYS:
            legacy[key] = value
            continue
        parts = key.split(".")
        if len(parts) == 2 and parts[0] == "SOLVER" and parts[1] in FLAT_SOLVER_KEYS:
            key = f"SOLVER.STAGE2.{parts[1]}"
            out.setdefault("__flat_solver__", True)
        out[key] = value
    return out


def _check_legacy_values(legacy: dict[str, Any], source: str) -> None:
    metric = str(legacy.get("MODEL.METRIC_LOSS_TYPE", "triplet"))
    if "center" in metric:
        raise ConfigError(
            f"{source}: MODEL.METRIC_LOSS_TYPE = {metric!r}: center loss is not provided "
            "(the official code never applies it); use 'triplet'"
        )


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r} (check --config_file)")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {data!r}")
    # An empty section (e.g. the official YAMLs' bare 'DATASETS:') is YAML null: nothing to set.
    return {k: v for k, v in data.items() if v is not None}


def _file_layers(path: str, seen: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """A YAML file and the files it inherits from with ``_BASE_`` (base first)."""
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: _BASE_ inheritance loops back to itself")
    data = _read_yaml(path)
    base = data.pop("_BASE_", None)
    layers = []
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        layers = _file_layers(base_path, (*seen, real))
    return [*layers, (_flatten(data), path)]


def _opts_to_flat(opts: Sequence[str]) -> dict[str, Any]:
    if len(opts) % 2:
        raise ConfigError(
            f"command-line overrides come in KEY VALUE pairs; got an odd count: {list(opts)}"
        )
    return {opts[i]: opts[i + 1] for i in range(0, len(opts), 2)}


def _merge(cfg: CN, flat: dict[str, Any], source: str) -> None:
    keys = _all_keys(cfg)
    for key, value in flat.items():
        if key == "__flat_solver__":
            continue
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, CN) or part not in node:
                node = None
                break
            node = node[part]
        if node is None or not isinstance(node, CN) or parts[-1] not in node:
            raise ConfigError(
                f"{source}: unknown key {key!r}; closest valid keys: {_closest(key, keys)}"
            )
        default = node[parts[-1]]
        if isinstance(default, CN):
            raise ConfigError(f"{source}: {key!r} is a section, not a key; set its children")
        node[parts[-1]] = _coerce(key, value, default, source)


def _resolve(cfg: CN, explicit: set[str]) -> None:
    """Fill keys whose default depends on others (recorded in the saved config.yaml)."""
    if not cfg.MODEL.PROMPT_CLASS:
        # The datasets' own class word; 'vehicle' only when every dataset is of vehicles.
        options = dataset_options(cfg)
        words = {DATASETS.get(n).class_word(options) for n in cfg.DATASETS.NAMES if n in DATASETS}
        cfg.MODEL.PROMPT_CLASS = "vehicle" if words == {"vehicle"} else "person"
    if cfg.MODEL.METHOD in RECIPES and "TEST.NECK_FEAT" not in explicit:
        # A method may imply its eval feature (PCL-CLIP: the post-BN feature, no pre-BN variant).
        cfg.TEST.NECK_FEAT = get_recipe(cfg.MODEL.METHOD).neck_feat or cfg.TEST.NECK_FEAT


def _in_range(value: float, rule: str) -> bool:
    """Whether ``value`` satisfies a :data:`configs.defaults.RANGES` rule."""
    if rule.startswith((">=", ">")):
        bound = float(rule.lstrip(">= "))
        return value >= bound if rule.startswith(">=") else value > bound
    low, high = (float(v) for v in rule[1:-1].split(","))
    above = value >= low if rule[0] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return above and below


def check_ranges(cfg: CN) -> None:
    """Check every numeric key against its range (each element of a list key).

    Args:
        cfg: a merged configuration.

    Raises:
        ConfigError: naming the key, its value and the valid range.
    """
    for key, rule in RANGES.items():
        section, _, leaf = key.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = node[part]
        value = node[leaf]
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(_in_range(float(v), rule) for v in values):
            raise ConfigError(f"{key} = {value!r} is out of range: it must be {rule}")


def validate_cfg(cfg: CN) -> None:
    """Check choices and cross-key constraints.

    Args:
        cfg: a merged configuration.

    Raises:
        ConfigError: naming the key, its value and the valid values or what to change.
    """
    check_ranges(cfg)
    for key, allowed in config_choices().items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node not in allowed:
            near = difflib.get_close_matches(str(node), [str(a) for a in allowed], n=1, cutoff=0.4)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{key} = {node!r} is not valid{hint}; valid values: {list(allowed)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.MODEL.DEVICE):
        raise ConfigError(
            f"MODEL.DEVICE = {cfg.MODEL.DEVICE!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    if not cfg.DATASETS.NAMES:
        raise ConfigError("DATASETS.NAMES is empty: name at least one dataset")
    for key in ("NAMES", "TEST_NAMES"):
        for name in cfg.DATASETS[key]:
            if name not in DATASETS:
                message = DATASETS.unknown_message(name)  # worded for DATASETS.NAMES
                raise ConfigError(message.replace("DATASETS.NAMES", f"DATASETS.{key}", 1))
    repeated = sorted({n for n in cfg.DATASETS.TEST_NAMES if cfg.DATASETS.TEST_NAMES.count(n) > 1})
    if repeated:
        raise ConfigError(f"DATASETS.TEST_NAMES lists {repeated} more than once; list each once")
    for key in ("INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST", "MODEL.STRIDE_SIZE"):
        value = cfg[key.split(".")[0]][key.split(".")[1]]
        if len(value) != 2:
            raise ConfigError(f"{key} = {list(value)}: expected two positive integers [H, W]")
    k = cfg.DATALOADER.NUM_INSTANCE
    batch, parts = cfg.SOLVER.STAGE2.IMS_PER_BATCH, cfg.SOLVER.STAGE2.GRAD_ACCUM_STEPS
    if cfg.DATALOADER.SAMPLER == "softmax_triplet" and (k < 2 or batch % k):
        raise ConfigError(
            f"SOLVER.STAGE2.IMS_PER_BATCH = {batch} must be a multiple "
            f"of DATALOADER.NUM_INSTANCE = {k} (>= 2) for P x K batches"
        )
    unit = k if cfg.DATALOADER.SAMPLER == "softmax_triplet" else 1
    if batch % (parts * unit):
        raise ConfigError(
            f"SOLVER.STAGE2.IMS_PER_BATCH = {batch} does not split into "
            f"SOLVER.STAGE2.GRAD_ACCUM_STEPS = {parts} micro-batches"
            + (f" of whole identities (DATALOADER.NUM_INSTANCE = {k})" if unit > 1 else "")
        )
    if cfg.DATALOADER.CAMERA_AWARE and cfg.DATALOADER.SAMPLER != "softmax_triplet":
        raise ConfigError(
            "DATALOADER.CAMERA_AWARE shapes P x K batches: it needs DATALOADER.SAMPLER "
            f"'softmax_triplet', not {cfg.DATALOADER.SAMPLER!r}"
        )
    bad = sorted(set(cfg.SOLVER.STAGE2.TEXT_LOSSES) - set(TEXT_LOSSES))
    if bad:
        raise ConfigError(
            f"SOLVER.STAGE2.TEXT_LOSSES has unknown entries {bad}; valid: {list(TEXT_LOSSES)}"
        )
    try:
        # The components' own cross-key rules, written once next to the code they protect.
        check_model_cfg(cfg)
        get_recipe(cfg.MODEL.METHOD).check_cfg(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def load_cfg(config_file: str | None = None, opts: Sequence[str] = (), freeze: bool = True) -> CN:
    """Build the run configuration: defaults, then the YAML file, then ``KEY VALUE`` overrides.

    Args:
        config_file: path of a YAML file (this project's or an official CLIP-ReID one), or None.
        opts: flat list ``[KEY, VALUE, KEY, VALUE, ...]`` of command-line overrides.
        freeze: freeze the result (entry scripts do; tests may want it mutable).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: unknown key (with the closest valid keys), wrong type, invalid choice.
    """
    cfg = get_cfg_defaults()
    legacy: dict[str, Any] = {}
    explicit: set[str] = set()
    layers = []
    if config_file:
        layers.extend(_file_layers(config_file))
    if opts:
        layers.append((_opts_to_flat(list(opts)), "command line"))
    for flat, source in layers:
        translated = _translate(flat, source, legacy)
        _check_legacy_values(legacy, source)
        if translated.pop("__flat_solver__", False) and "MODEL.METHOD" not in translated:
            # A flat SOLVER block is the official baseline recipe (train.py): one stage.
            if "MODEL.METHOD" not in explicit:
                translated["MODEL.METHOD"] = "baseline"
        _merge(cfg, translated, source)
        explicit |= set(translated)
    if legacy:
        logger.warning(
            "ignored %d key(s) that the official code defines but never reads: %s",
            len(legacy),
            "; ".join(f"{k} ({LEGACY_KEYS[k]})" for k in sorted(legacy)),
        )
    _resolve(cfg, explicit)
    validate_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def save_cfg(cfg: CN, path: str) -> None:
    """Write the resolved configuration as YAML (loadable again with ``load_cfg``), atomically.

    Args:
        cfg: the configuration to save.
        path: destination file; its folder is created.
    """
    write_text(path, cfg.dump())
