"""Optimizers of the two CLIP-ReID training stages."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["OPTIMIZERS", "build_optimizer", "implementation_kwargs", "stage2_param_groups"]

_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "SGD": torch.optim.SGD,
}
OPTIMIZERS = tuple(_CLASSES)
_GROUP_ORDER = ("default", "bias", "classifier", "classifier_bias")


def stage2_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    base_lr: float,
    weight_decay: float,
    bias_lr_factor: float,
    weight_decay_bias: float,
    large_fc_lr: bool,
) -> list[dict[str, Any]]:
    """Per-parameter learning rate and weight decay of the second stage (and the baseline).

    Rules, in the official order: every parameter gets ``base_lr`` and ``weight_decay``; a name
    containing ``'bias'`` gets ``base_lr * bias_lr_factor`` and ``weight_decay_bias``; with
    ``large_fc_lr`` a name containing ``'classifier'`` gets ``base_lr * 2`` (overriding the bias
    lr, keeping its weight decay). No decay exclusion for norms or embeddings (as the official).
    Parameters with equal (lr, weight decay) share one group, which keeps the optimizer's fused
    multi-tensor update to a few launches. Groups are ordered default, bias, classifier,
    classifier bias, so group 0 follows the ``BASE_LR`` curve whenever a plain parameter exists
    (what the training log prints).

    Args:
        named_params: ``(name, parameter)`` pairs.
        base_lr: base learning rate.
        weight_decay: weight decay of non-bias parameters.
        bias_lr_factor: learning-rate multiplier of bias parameters.
        weight_decay_bias: weight decay of bias parameters.
        large_fc_lr: double the learning rate of classifier parameters.

    Returns:
        Param-group dicts with keys ``params`` (list of ``(name, parameter)``), ``lr``,
        ``weight_decay`` and ``group_name``.
    """
    groups: dict[tuple[float, float, str], dict[str, Any]] = {}
    for name, param in named_params:
        lr, wd, kind = base_lr, weight_decay, "default"
        if "bias" in name:
            lr, wd, kind = base_lr * bias_lr_factor, weight_decay_bias, "bias"
        if large_fc_lr and "classifier" in name:
            lr, kind = base_lr * 2.0, f"classifier_{kind}" if kind == "bias" else "classifier"
        key = (lr, wd, kind)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr, "weight_decay": wd, "group_name": kind}
        groups[key]["params"].append((name, param))
    order = {kind: i for i, kind in enumerate(_GROUP_ORDER)}
    return sorted(groups.values(), key=lambda g: order[g["group_name"]])


def implementation_kwargs(
    optimizer_cls: type[torch.optim.Optimizer], device_types: Iterable[str]
) -> dict[str, bool]:
    """Which torch.optim implementation to ask for, given where the parameters live.

    Rule: every parameter on CUDA and this torch's optimizer takes ``fused`` -> ``fused=True``
    (one kernel per step for all tensors; it also unscales inside the kernel under a
    GradScaler); every parameter on CUDA without ``fused`` support -> ``foreach=True``
    (multi-tensor kernels); anything else (CPU, mixed devices) -> torch's default. The update
    is the same arithmetic in every implementation, up to floating-point rounding.

    Args:
        optimizer_cls: e.g. ``torch.optim.Adam``.
        device_types: device types of the parameters (``{p.device.type for p in params}``).

    Returns:
        ``{'fused': True}``, ``{'foreach': True}`` or ``{}``: keyword arguments of the class.
    """
    types = set(device_types)
    if types != {"cuda"}:
        return {}
    accepted = inspect.signature(optimizer_cls.__init__).parameters
    if "fused" in accepted:
        return {"fused": True}
    return {"foreach": True} if "foreach" in accepted else {}


def _make_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
    momentum: float,
    impl: dict[str, bool] | None = None,
) -> torch.optim.Optimizer:
    if name not in _CLASSES:
        raise ValueError(f"unknown OPTIMIZER_NAME {name!r}; valid names: {list(OPTIMIZERS)}")
    impl = impl or {}
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)
    # torch Adam couples L2 (decay added to the gradient), as the official code; AdamW decouples.
    return _CLASSES[name](groups, lr=lr, weight_decay=weight_decay, **impl)


def build_optimizer(
    cfg: Any,
    named_params: list[tuple[str, nn.Parameter]],
    stage: int,
    implementation: dict[str, bool] | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer of one training stage.

    Stage 1 reads ``SOLVER.STAGE1.{OPTIMIZER_NAME, BASE_LR, WEIGHT_DECAY, MOMENTUM}`` and puts
    every tensor in its own group with ``BASE_LR`` / ``WEIGHT_DECAY`` (in CLIP-ReID that is only
    the prompt context). Stage 2 reads ``SOLVER.STAGE2.{OPTIMIZER_NAME, BASE_LR, WEIGHT_DECAY,
    BIAS_LR_FACTOR, WEIGHT_DECAY_BIAS, LARGE_FC_LR, MOMENTUM}`` with the rules of
    :func:`stage2_param_groups`. Every group keeps the parameter names (``param_names``) for
    logging and checkpoint inspection. The implementation (fused, multi-tensor or default)
    follows :func:`implementation_kwargs` for the parameters' devices, so build the optimizer
    after moving the model to its device.

    Args:
        cfg: yacs config.
        named_params: ``(name, parameter)`` pairs of the trainable parameters; the caller
            filters on ``requires_grad`` (e.g. after ``model.set_trainable('image')``).
        stage: 1 or 2.
        implementation: ``{'fused': True}``, ``{'foreach': True}`` or ``{}`` instead of the
            rule's choice (to compare implementations).

    Returns:
        A ``torch.optim.Adam``, ``AdamW`` or ``SGD`` instance.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    named_params = list(named_params)
    if not named_params:
        raise ValueError(
            f"no trainable parameters for stage {stage}: did you call "
            f"model.set_trainable({'prompts' if stage == 1 else 'image'!r})?"
        )
    frozen = [name for name, p in named_params if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"{len(frozen)} parameter(s) passed to the stage-{stage} optimizer do not require "
            f"grad (e.g. {frozen[:3]}); pass only trainable parameters"
        )
    scfg = cfg.SOLVER.STAGE1 if stage == 1 else cfg.SOLVER.STAGE2
    if stage == 2 and not isinstance(scfg.LARGE_FC_LR, bool):
        raise TypeError(f"SOLVER.STAGE2.LARGE_FC_LR must be a bool, got {scfg.LARGE_FC_LR!r}")
    name = scfg.OPTIMIZER_NAME
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown OPTIMIZER_NAME {name!r}; valid names: {list(OPTIMIZERS)}")
    base_lr = float(scfg.BASE_LR)
    weight_decay = float(scfg.WEIGHT_DECAY)
    if stage == 1:
        groups = [
            {
                "params": [(pname, p)],
                "lr": base_lr,
                "weight_decay": weight_decay,
                "group_name": "default",
            }
            for pname, p in named_params
        ]
    else:
        groups = stage2_param_groups(
            named_params,
            base_lr=base_lr,
            weight_decay=weight_decay,
            bias_lr_factor=float(scfg.BIAS_LR_FACTOR),
            weight_decay_bias=float(scfg.WEIGHT_DECAY_BIAS),
            large_fc_lr=scfg.LARGE_FC_LR,
        )
    impl = implementation
    if impl is None:
        impl = implementation_kwargs(_CLASSES[name], {p.device.type for _, p in named_params})
    optimizer = _make_optimizer(name, groups, base_lr, weight_decay, float(scfg.MOMENTUM), impl)
    for group in optimizer.param_groups:
        logger.info(
            "stage %d %s%s group %r: %d tensor(s), lr %.3g, weight decay %.3g",
            stage,
            name,
            f" ({next(iter(impl))})" if impl else "",
            group["group_name"],
            len(group["params"]),
            group["lr"],
            group["weight_decay"],
        )
    return optimizer
