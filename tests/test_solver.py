"""Tests of solver/: parameter groups, optimizer choice and the learning-rate schedules.

The schedules are checked against the worked values of the official CLIP-ReID schedules
(stage 1: cosine with warmup; stage 2: warmup multi-step), every listed row, and against the
closed-form formulas written out here for every epoch.
"""

from __future__ import annotations

import copy
import math
from bisect import bisect_right

import pytest
import torch
from torch import nn
from yacs.config import CfgNode as CN

from solver import WarmupCosineLR, WarmupMultiStepLR, build_optimizer, build_scheduler
from solver.optimizer import implementation_kwargs

# ---------------------------------------------------------------------------------------------
# configs (values of the shipped YAML files)
# ---------------------------------------------------------------------------------------------


def _cfg(e1: int = 120, vit: bool = True) -> CN:
    cfg = CN()
    cfg.SOLVER = CN()
    s1 = cfg.SOLVER.STAGE1 = CN()
    s1.OPTIMIZER_NAME = "Adam"
    s1.BASE_LR = 3.5e-4
    s1.WEIGHT_DECAY = 1e-4
    s1.MOMENTUM = 0.9
    s1.MAX_EPOCHS = e1
    s1.LR_MIN = 1e-6
    s1.WARMUP_LR_INIT = 1e-5
    s1.WARMUP_EPOCHS = 5
    s2 = cfg.SOLVER.STAGE2 = CN()
    s2.OPTIMIZER_NAME = "Adam"
    s2.BASE_LR = 5e-6 if vit else 3.5e-4
    s2.BIAS_LR_FACTOR = 2.0
    s2.WEIGHT_DECAY = 1e-4 if vit else 5e-4
    s2.WEIGHT_DECAY_BIAS = 1e-4 if vit else 5e-4
    s2.MOMENTUM = 0.9
    s2.LARGE_FC_LR = False
    s2.STEPS = [30, 50] if vit else [40, 70]
    s2.GAMMA = 0.1
    s2.WARMUP_FACTOR = 0.1 if vit else 0.01
    s2.WARMUP_ITERS = 10
    s2.WARMUP_METHOD = "linear"
    s2.MAX_EPOCHS = 60 if vit else 120
    return cfg


class _TinyReID(nn.Module):
    """Parameter names as in the ReID model: bias / classifier substrings matter."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = nn.Linear(4, 4)
        self.bottleneck = nn.BatchNorm1d(4)
        self.classifier = nn.Linear(4, 3, bias=False)
        self.classifier_proj = nn.Linear(4, 3)
        self.attn_in_proj_bias = nn.Parameter(torch.zeros(4))


def _named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _stage1_setup(cfg: CN) -> tuple[torch.optim.Optimizer, WarmupCosineLR]:
    ctx = nn.Parameter(torch.zeros(4, 8))
    opt = build_optimizer(cfg, [("prompt_learner.cls_ctx", ctx)], stage=1)
    return opt, build_scheduler(cfg, opt, stage=1)


def _stage2_setup(cfg: CN) -> tuple[torch.optim.Optimizer, WarmupMultiStepLR]:
    opt = build_optimizer(cfg, _named(_TinyReID()), stage=2)
    return opt, build_scheduler(cfg, opt, stage=2)


def _lr_by_name(opt: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    return {
        name: (g["lr"], g["weight_decay"]) for g in opt.param_groups for name in g["param_names"]
    }


def _rounding_tol(value: str) -> float:
    """Half a unit in the last printed digit of a value such as '3.815e-5'."""
    mantissa, exponent = value.lower().split("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    # The extra 0.1 % absorbs floating-point ties such as 1.7675e-4 printed as 1.767e-4.
    return 0.5 * 10.0 ** (int(exponent) - decimals) * 1.001


# ---------------------------------------------------------------------------------------------
# stage 1: cosine with warmup
# ---------------------------------------------------------------------------------------------


def _stage1_closed_form(t: int, e: int, base: float = 3.5e-4) -> float:
    lr_min, init, warm = 1e-6, 1e-5, 5
    if t < warm:
        return init + t * (base - init) / warm
    if t < e:
        return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / e))
    return lr_min


# Reference rows: (epoch as a function of E, printed value for E=120, for E=60).
STAGE1_ROWS = [
    (lambda e: 1, "7.8e-5", "7.8e-5"),
    (lambda e: 2, "1.46e-4", "1.46e-4"),
    (lambda e: 3, "2.14e-4", "2.14e-4"),
    (lambda e: 4, "2.82e-4", "2.82e-4"),
    (lambda e: 5, "3.49e-4", "3.44e-4"),
    (lambda e: e // 4, "2.99e-4", "2.99e-4"),
    (lambda e: e // 2, "1.76e-4", "1.76e-4"),
    (lambda e: 3 * e // 4, "5.21e-5", "5.21e-5"),
    (lambda e: e - 1, "1.06e-6", "1.24e-6"),
]


@pytest.mark.parametrize("e1", [120, 60])
def test_stage1_schedule_matches_worked_values(e1: int) -> None:
    opt, sched = _stage1_setup(_cfg(e1))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)  # warmup_lr_init at construction
    lrs = {}
    for epoch in range(1, e1 + 1):
        sched.step(epoch)
        lrs[epoch] = sched.get_last_lr()[0]
        assert opt.param_groups[0]["lr"] == lrs[epoch]
    for epoch_of, v120, v60 in STAGE1_ROWS:
        printed = v120 if e1 == 120 else v60
        t = epoch_of(e1)
        assert abs(lrs[t] - float(printed)) <= _rounding_tol(printed), (t, lrs[t], printed)
    assert lrs[e1] == 1e-6  # t = E: past the single cycle, exactly lr_min
    for epoch, lr in lrs.items():
        assert lr == pytest.approx(_stage1_closed_form(epoch, e1), rel=1e-12, abs=0), epoch


def test_stage1_one_group_per_tensor() -> None:
    params = [
        ("prompt_learner.cls_ctx", nn.Parameter(torch.zeros(3))),
        ("x.bias", nn.Parameter(torch.zeros(2))),
    ]
    opt = build_optimizer(_cfg(), params, stage=1)
    assert isinstance(opt, torch.optim.Adam)
    assert len(opt.param_groups) == 2
    for (name, p), group in zip(params, opt.param_groups, strict=True):
        assert group["params"] == [p] and group["param_names"] == [name]
        # no bias rule in stage 1: every tensor gets BASE_LR and WEIGHT_DECAY
        assert group["lr"] == 3.5e-4 and group["weight_decay"] == 1e-4


# ---------------------------------------------------------------------------------------------
# stage 2: warmup multi-step
# ---------------------------------------------------------------------------------------------


def _stage2_closed_form(e: int, base: float, wf: float, steps: list[int], w: int = 10) -> float:
    warm = wf * (1 - e / w) + e / w if e < w else 1.0
    return base * warm * 0.1 ** bisect_right(steps, e)


# Reference rows: (epochs, printed value, exact). Exact rows are plateaus that the formula
# gives without rounding (base, base / 10, base / 100).
STAGE2_VIT_ROWS = [
    ([1], "9.5e-7", False),
    ([2], "1.4e-6", False),
    ([5], "2.75e-6", False),
    ([9], "4.55e-6", False),
    (range(10, 30), "5e-6", True),
    (range(30, 50), "5e-7", True),
    (range(50, 61), "5e-8", True),
]
STAGE2_CNN_ROWS = [
    ([1], "3.815e-5", False),
    ([2], "7.28e-5", False),
    ([5], "1.767e-4", False),
    ([9], "3.153e-4", False),
    (range(10, 40), "3.5e-4", True),
    (range(40, 70), "3.5e-5", True),
    (range(70, 121), "3.5e-6", True),
]


@pytest.mark.parametrize("vit", [True, False], ids=["vit", "cnn"])
def test_stage2_schedule_matches_worked_values(vit: bool) -> None:
    cfg = _cfg(vit=vit)
    s2 = cfg.SOLVER.STAGE2
    opt, sched = _stage2_setup(cfg)
    assert opt.param_groups[0]["group_name"] == "default"
    bias_idx = [i for i, g in enumerate(opt.param_groups) if g["group_name"] == "bias"]
    assert len(bias_idx) == 1
    # constructor applies e = 0: base * WARMUP_FACTOR
    assert opt.param_groups[0]["lr"] == pytest.approx(s2.BASE_LR * s2.WARMUP_FACTOR, rel=1e-12)
    lrs = {}
    for epoch in range(1, s2.MAX_EPOCHS + 1):
        sched.step(epoch)
        last = sched.get_last_lr()
        lrs[epoch] = last[0]
        assert [g["lr"] for g in opt.param_groups] == last
        # bias groups follow the same curve at BIAS_LR_FACTOR x
        assert last[bias_idx[0]] == pytest.approx(2.0 * last[0], rel=1e-12)
        want = _stage2_closed_form(epoch, s2.BASE_LR, s2.WARMUP_FACTOR, list(s2.STEPS))
        assert last[0] == pytest.approx(want, rel=1e-12), epoch
    for epochs, printed, exact in STAGE2_VIT_ROWS if vit else STAGE2_CNN_ROWS:
        for epoch in epochs:
            if exact:
                assert lrs[epoch] == pytest.approx(float(printed), rel=1e-12), epoch
            else:
                assert abs(lrs[epoch] - float(printed)) <= _rounding_tol(printed), epoch


def test_stage2_constant_warmup() -> None:
    cfg = _cfg()
    cfg.SOLVER.STAGE2.WARMUP_METHOD = "constant"
    _, sched = _stage2_setup(cfg)
    for epoch in range(12):
        want = 5e-6 * (0.1 if epoch < 10 else 1.0)
        assert sched.lr_at(epoch)[0] == pytest.approx(want, rel=1e-12)


def test_stage2_scheduler_rejects_bad_arguments() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="increasing"):
        WarmupMultiStepLR(opt, milestones=[50, 30])
    with pytest.raises(ValueError, match="linear"):
        WarmupMultiStepLR(opt, milestones=[30], warmup_method="exp")
    with pytest.raises(ValueError, match="stage"):
        build_scheduler(_cfg(), opt, stage=3)


def test_stage2_bias_and_large_fc_lr_groups() -> None:
    cfg = _cfg()
    model = _TinyReID()
    model.bottleneck.bias.requires_grad_(False)  # BNNeck: BN bias frozen, filtered by caller
    for large_fc in (False, True):
        cfg.SOLVER.STAGE2.LARGE_FC_LR = large_fc
        cfg.SOLVER.STAGE2.WEIGHT_DECAY_BIAS = 3e-4
        opt = build_optimizer(cfg, _named(model), stage=2)
        got = _lr_by_name(opt)
        base, wd = 5e-6, 1e-4
        # Official rules, written out per name: bias -> lr x BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS;
        # LARGE_FC_LR -> 'classifier' params get 2 x BASE_LR (weight decay unchanged).
        want = {
            "image_encoder.weight": (base, wd),
            "image_encoder.bias": (2 * base, 3e-4),
            "bottleneck.weight": (base, wd),
            "classifier.weight": (2 * base if large_fc else base, wd),
            "classifier_proj.weight": (2 * base if large_fc else base, wd),
            "classifier_proj.bias": (2 * base, 3e-4),
            "attn_in_proj_bias": (2 * base, 3e-4),
        }
        assert got.keys() == want.keys()
        for name, (lr, decay) in want.items():
            assert got[name][0] == pytest.approx(lr, rel=1e-12), name
            assert got[name][1] == pytest.approx(decay, rel=1e-12), name
        assert opt.param_groups[0]["group_name"] == "default"


def test_stage2_adam_uses_group_lr_and_coupled_decay() -> None:
    # One Adam step moves each parameter by about lr (sign of the gradient): proves the group
    # lr is what the optimizer applies. Coupled L2: torch Adam, not AdamW.
    cfg = _cfg()
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = build_optimizer(cfg, [("layer.bias", b), ("layer.weight", w)], stage=2)
    assert type(opt) is torch.optim.Adam
    assert not opt.param_groups[0].get("decoupled_weight_decay", False)
    (w.sum() + b.sum()).backward()
    opt.step()
    torch.testing.assert_close(
        1 - w.detach(), torch.full((3,), 5e-6, dtype=torch.float64), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        1 - b.detach(), torch.full((3,), 1e-5, dtype=torch.float64), rtol=1e-4, atol=0
    )


@pytest.mark.parametrize("stage", [1, 2])
def test_optimizer_choice(stage: int) -> None:
    cfg = _cfg()
    scfg = cfg.SOLVER.STAGE1 if stage == 1 else cfg.SOLVER.STAGE2
    params = [("w", nn.Parameter(torch.zeros(2)))]
    scfg.OPTIMIZER_NAME = "AdamW"
    assert type(build_optimizer(cfg, params, stage)) is torch.optim.AdamW
    scfg.OPTIMIZER_NAME = "SGD"
    sgd = build_optimizer(cfg, params, stage)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.9
    scfg.OPTIMIZER_NAME = "Adadelta"
    with pytest.raises(ValueError, match=r"'Adam', 'AdamW', 'SGD'"):
        build_optimizer(cfg, params, stage)


def test_optimizer_errors_on_empty_or_frozen_params() -> None:
    with pytest.raises(ValueError, match=r"set_trainable\('prompts'\)"):
        build_optimizer(_cfg(), [], stage=1)
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="frozen_w"):
        build_optimizer(_cfg(), [("frozen_w", frozen)], stage=2)
    with pytest.raises(ValueError, match="stage"):
        build_optimizer(_cfg(), [("w", nn.Parameter(torch.zeros(1)))], stage=0)


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_scheduler_state_dict_round_trip(stage: int) -> None:
    cfg = _cfg(e1=60)
    setup = _stage1_setup if stage == 1 else _stage2_setup
    n_epochs = 60
    opt_a, sched_a = setup(cfg)
    for epoch in range(1, 21):
        sched_a.step(epoch)
    opt_state = copy.deepcopy(opt_a.state_dict())
    sched_state = copy.deepcopy(sched_a.state_dict())
    rest_a = []
    for epoch in range(21, n_epochs + 1):
        sched_a.step(epoch)
        rest_a.append(sched_a.get_last_lr())

    # Resume into fresh objects: the loaded scheduler re-applies the saved epoch's lr, and
    # the remaining sequence is identical.
    opt_b, sched_b = setup(cfg)
    opt_b.load_state_dict(opt_state)
    sched_b.load_state_dict(sched_state)
    assert sched_b.last_epoch == 20
    assert [g["lr"] for g in opt_b.param_groups] == sched_b.get_last_lr()
    assert sched_b.get_last_lr() == sched_b.lr_at(20)
    rest_b = []
    for epoch in range(21, n_epochs + 1):
        sched_b.step(epoch)
        rest_b.append(sched_b.get_last_lr())
    assert rest_b == rest_a

    # Scheduler state alone into a fresh optimizer also restores the optimizer's lr.
    opt_c, sched_c = setup(cfg)
    sched_c.load_state_dict(copy.deepcopy(sched_state))
    assert [g["lr"] for g in opt_c.param_groups] == sched_c.lr_at(20)


def test_step_without_epoch_advances_by_one() -> None:
    _, s1 = _stage1_setup(_cfg(e1=60))
    _, s2 = _stage2_setup(_cfg())
    for sched in (s1, s2):
        sched.step()
        sched.step()
        assert sched.last_epoch == 2
        assert sched.get_last_lr() == sched.lr_at(2)


# ---------------------------------------------------------------------------------------------
# optimizer implementation (fused / foreach / default)
# ---------------------------------------------------------------------------------------------


class _NoFused(torch.optim.Optimizer):
    """An optimizer signature without ``fused`` (as Adam before torch 2.0)."""

    def __init__(self, params, lr: float = 1e-3, foreach: bool | None = None) -> None:
        super().__init__(params, {"lr": lr, "foreach": foreach})


class _Plain(torch.optim.Optimizer):
    """An optimizer with neither ``fused`` nor ``foreach``."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_implementation_rule_follows_devices_and_signature(cls) -> None:
    assert implementation_kwargs(cls, ["cuda", "cuda"]) == {"fused": True}
    assert implementation_kwargs(cls, {"cpu"}) == {}
    assert implementation_kwargs(cls, {"cuda", "cpu"}) == {}  # mixed devices: torch decides
    assert implementation_kwargs(cls, set()) == {}
    assert implementation_kwargs(_NoFused, {"cuda"}) == {"foreach": True}
    assert implementation_kwargs(_Plain, {"cuda"}) == {}


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_cpu_params_get_the_default_implementation(name: str) -> None:
    cfg = _cfg()
    cfg.SOLVER.STAGE2.OPTIMIZER_NAME = name
    opt = build_optimizer(cfg, [("w", nn.Parameter(torch.zeros(2)))], stage=2)
    assert not opt.param_groups[0]["fused"] and not opt.param_groups[0]["foreach"]


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_fused_step_equals_default_step(name: str) -> None:
    """What CUDA parameters get (``fused=True``) computes the default update: checked on the CPU,
    where torch >= 2.4 has the fused kernels, over several steps with the stage-2 groups."""
    cfg = _cfg()
    cfg.SOLVER.STAGE2.OPTIMIZER_NAME = name
    cfg.SOLVER.STAGE2.LARGE_FC_LR = True  # three groups: default, bias, classifier
    gen = torch.Generator().manual_seed(0)
    init = {n: torch.randn(4, 3, generator=gen) for n in ("a.weight", "a.bias", "classifier.w")}
    grads = [{n: torch.randn(4, 3, generator=gen) for n in init} for _ in range(3)]
    fused = implementation_kwargs(getattr(torch.optim, name), {"cuda"})
    assert fused == {"fused": True}
    results = []
    for impl in (None, fused):
        params = {n: nn.Parameter(v.clone()) for n, v in init.items()}
        opt = build_optimizer(cfg, list(params.items()), stage=2, implementation=impl)
        assert len(opt.param_groups) == 3
        assert all(bool(g["fused"]) == (impl is not None) for g in opt.param_groups)
        for step in grads:
            for n, p in params.items():
                p.grad = step[n].clone()
            opt.step()
        results.append({n: p.detach() for n, p in params.items()})
    for n in init:
        assert not torch.equal(results[0][n], init[n])
        torch.testing.assert_close(results[1][n], results[0][n], atol=1e-6, rtol=1e-5)
