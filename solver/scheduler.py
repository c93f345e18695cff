"""Per-epoch learning-rate schedules of the two CLIP-ReID training stages.

Both schedulers share one interface: ``step(epoch)`` is called at the START of every epoch with
``epoch = 1..E`` (the official order: epoch ``k`` trains with the lr of ``t = k``), and
``get_last_lr()``, ``lr_at(epoch)``, ``state_dict()`` and ``load_state_dict()`` are available.
At construction the lr of ``t = 0`` is applied.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler

logger = logging.getLogger(__name__)

__all__ = ["WARMUP_METHODS", "WarmupCosineLR", "WarmupMultiStepLR", "build_scheduler"]

WARMUP_METHODS = ("linear", "constant")


class WarmupCosineLR(CosineLRScheduler):
    """Stage-1 schedule: linear warmup then one cosine cycle, timm's ``CosineLRScheduler``.

    With ``E = max_epochs``, ``W = warmup_epochs`` and base lr ``b`` (of each param group):

    - ``t < W``: ``lr = warmup_lr_init + t * (b - warmup_lr_init) / W``;
    - ``W <= t < E``: ``lr = lr_min + (b - lr_min) * (1 + cos(pi * t / E)) / 2`` (the cosine
      counts from ``t = 0``: no warmup offset, timm's ``warmup_prefix=False``);
    - ``t >= E``: past the single cycle, ``lr = lr_min``.

    Args:
        optimizer: optimizer whose groups' current ``lr`` is the base lr.
        max_epochs: length of the cosine cycle in epochs (``t_initial``).
        lr_min: final learning rate.
        warmup_epochs: number of warmup epochs (``warmup_t``).
        warmup_lr_init: learning rate at ``t = 0``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epochs: int,
        lr_min: float,
        warmup_epochs: int,
        warmup_lr_init: float,
    ) -> None:
        super().__init__(
            optimizer,
            t_initial=max_epochs,
            lr_min=lr_min,
            cycle_limit=1,
            warmup_t=warmup_epochs,
            warmup_lr_init=warmup_lr_init,
            warmup_prefix=False,
            t_in_epochs=True,
        )
        self.last_epoch = 0
        self._last_lr = self.lr_at(0)

    def lr_at(self, epoch: int) -> list[float]:
        """Closed-form learning rate of every param group at ``epoch`` (no side effect).

        Args:
            epoch: epoch index ``t >= 0``.

        Returns:
            One float per param group.
        """
        return list(self._get_lr(epoch))

    def step(self, epoch: int | None = None, metric: float | None = None) -> None:
        """Apply the learning rate of ``epoch`` (call at the start of the epoch).

        Args:
            epoch: epoch index; ``None`` means the previous one plus 1.
            metric: unused (timm interface).
        """
        epoch = self.last_epoch + 1 if epoch is None else int(epoch)
        super().step(epoch, metric)
        self.last_epoch = epoch
        self._last_lr = self.lr_at(epoch)

    def get_last_lr(self) -> list[float]:
        """Learning rate of every param group as set by the last ``step``.

        Returns:
            One float per param group.
        """
        return list(self._last_lr)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule and re-apply the lr of the saved epoch to the optimizer.

        Args:
            state_dict: output of :meth:`state_dict`.
        """
        super().load_state_dict(state_dict)
        self.update_groups(self.lr_at(self.last_epoch))


class WarmupMultiStepLR:
    """Stage-2 (and baseline) schedule: warmup then multi-step decay, stepped per epoch.

    ``lr(e) = b * warm(e) * gamma ** bisect_right(milestones, e)`` for each group's base lr
    ``b``, with ``warm(e) = warmup_factor * (1 - e / W) + e / W`` (linear) or ``warmup_factor``
    (constant) for ``e < W`` and 1 afterwards. ``bisect_right`` counts a milestone epoch itself,
    so the decay applies from the milestone epoch on.

    As in the official code, ``W = warmup_iters`` counts **epochs**, not iterations: the
    official scheduler is stepped once per epoch although its key is named ``WARMUP_ITERS``.

    Args:
        optimizer: optimizer whose groups' current ``lr`` is the base lr.
        milestones: strictly increasing epochs at which the lr is multiplied by ``gamma``.
        gamma: decay factor.
        warmup_factor: lr multiplier at ``e = 0``.
        warmup_iters: warmup length ``W`` in epochs (0 disables warmup).
        warmup_method: ``'linear'`` or ``'constant'``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_factor: float = 0.1,
        warmup_iters: int = 10,
        warmup_method: str = "linear",
    ) -> None:
        milestones = [int(m) for m in milestones]
        if any(b <= a for a, b in pairwise(milestones)):
            raise ValueError(f"milestones must be strictly increasing integers, got {milestones}")
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(
                f"unknown warmup method {warmup_method!r}; valid names: {list(WARMUP_METHODS)}"
            )
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        self.optimizer = optimizer
        self.milestones = milestones
        self.gamma = float(gamma)
        self.warmup_factor = float(warmup_factor)
        self.warmup_iters = int(warmup_iters)
        self.warmup_method = warmup_method
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._last_lr: list[float] = []
        self.step(0)

    def _factor(self, epoch: int) -> float:
        warm = 1.0
        if epoch < self.warmup_iters:
            if self.warmup_method == "constant":
                warm = self.warmup_factor
            else:
                alpha = epoch / self.warmup_iters
                warm = self.warmup_factor * (1.0 - alpha) + alpha
        return warm * self.gamma ** bisect_right(self.milestones, epoch)

    def lr_at(self, epoch: int) -> list[float]:
        """Closed-form learning rate of every param group at ``epoch`` (no side effect).

        Args:
            epoch: epoch index ``e >= 0``.

        Returns:
            One float per param group.
        """
        factor = self._factor(epoch)
        return [base * factor for base in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        """Apply the learning rate of ``epoch`` (call at the start of the epoch).

        Args:
            epoch: epoch index; ``None`` means the previous one plus 1.
        """
        epoch = self.last_epoch + 1 if epoch is None else int(epoch)
        self.last_epoch = epoch
        self._last_lr = self.lr_at(epoch)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        """Learning rate of every param group as set by the last ``step``.

        Returns:
            One float per param group.
        """
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer (torch convention).

        Returns:
            A picklable dict.
        """
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule and re-apply the lr of the saved epoch to the optimizer.

        Args:
            state_dict: output of :meth:`state_dict`.
        """
        self.__dict__.update(state_dict)
        self.step(self.last_epoch)


def build_scheduler(
    cfg: Any, optimizer: torch.optim.Optimizer, stage: int
) -> WarmupCosineLR | WarmupMultiStepLR:
    """Build the per-epoch learning-rate schedule of one training stage.

    Stage 1 reads ``SOLVER.STAGE1.{MAX_EPOCHS, LR_MIN, WARMUP_EPOCHS, WARMUP_LR_INIT}``
    (:class:`WarmupCosineLR`); stage 2 reads ``SOLVER.STAGE2.{STEPS, GAMMA, WARMUP_FACTOR,
    WARMUP_ITERS, WARMUP_METHOD, MAX_EPOCHS}`` (:class:`WarmupMultiStepLR`). Call
    ``scheduler.step(epoch)`` at the start of every epoch, ``epoch = 1..MAX_EPOCHS``.

    Args:
        cfg: yacs config.
        optimizer: the stage's optimizer (from ``build_optimizer``).
        stage: 1 or 2.

    Returns:
        The scheduler, with the lr of epoch 0 already applied.
    """
    if stage == 1:
        scfg = cfg.SOLVER.STAGE1
        return WarmupCosineLR(
            optimizer,
            max_epochs=int(scfg.MAX_EPOCHS),
            lr_min=float(scfg.LR_MIN),
            warmup_epochs=int(scfg.WARMUP_EPOCHS),
            warmup_lr_init=float(scfg.WARMUP_LR_INIT),
        )
    if stage == 2:
        scfg = cfg.SOLVER.STAGE2
        late = [m for m in scfg.STEPS if m > scfg.MAX_EPOCHS]
        if late:
            logger.warning(
                "SOLVER.STAGE2.STEPS %s lie beyond MAX_EPOCHS %d and are never reached",
                late,
                scfg.MAX_EPOCHS,
            )
        return WarmupMultiStepLR(
            optimizer,
            milestones=list(scfg.STEPS),
            gamma=float(scfg.GAMMA),
            warmup_factor=float(scfg.WARMUP_FACTOR),
            warmup_iters=int(scfg.WARMUP_ITERS),
            warmup_method=scfg.WARMUP_METHOD,
        )
    raise ValueError(f"stage must be 1 or 2, got {stage!r}")
