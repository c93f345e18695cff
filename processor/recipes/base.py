"""The recipe of a training method: which model it builds, which stages it runs, what a step does.

Each ``MODEL.METHOD`` is one :class:`Recipe` subclass, registered under its name. The training
loops (:mod:`processor.stage1`, :mod:`processor.stage2`) and the run wiring
(:mod:`processor.train`) ask the recipe, never the method's name:

* class attributes describe the model and the stages (``with_text``, ``head``, ``stages``,
  ``lr_epoch_offset``), read by :func:`model.build.build_model` and :func:`processor.train.train`;
* ``check_cfg`` holds the method's own cross-key rules (called by ``validate_cfg``);
* an instance, built once per run, holds the stage-2 criterion and the per-run state (text bank,
  memory bank) and does the per-epoch and per-step work.

Adding a method is one file with a subclass decorated by ``@register_recipe('name')``, imported
by :mod:`processor.recipes` (or by the user's own code before the config is loaded).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from solver.optimizer import build_optimizer
from utils.registry import Registry

logger = logging.getLogger(__name__)

RECIPES: Registry[type[Recipe]] = Registry("MODEL.METHOD", "training method")


def register_recipe(name: str):
    """Class decorator: register a :class:`Recipe` subclass as ``MODEL.METHOD name``.

    Args:
        name: the ``MODEL.METHOD`` value that selects it.

    Returns:
        The decorator (it sets ``cls.name`` and returns the class).
    """

    def decorate(cls: type[Recipe]) -> type[Recipe]:
        cls.name = name
        return RECIPES.register(name, cls)

    return decorate


def get_recipe(method: str) -> type[Recipe]:
    """The recipe class of ``MODEL.METHOD`` (raises ``UnknownNameError`` listing valid ones)."""
    return RECIPES.get(method)


class Recipe:
    """Base recipe: stage 2 only, image side trained, the criterion of ``build_criterion``.

    Attributes:
        name: the ``MODEL.METHOD`` value (set by :func:`register_recipe`).
        with_text: the model has the prompt learner and text encoder.
        head: model head variant ('clipreid': a classifier per BNNeck; 'pcl': one classifier on
            the concatenated post-BN feature).
        stages: the stages run, in order (1: prompt learning, 2: image-encoder fine-tuning).
        lr_epoch_offset: 1 gives epoch ``k`` the lr of ``k - 1`` (loops that step the scheduler
            at the END of an epoch, as PCL-CLIP's); 0 is CLIP-ReID's order.
        trainable: ``ReIDModel.set_trainable`` selection of stage 2.
        neck_feat: the ``TEST.NECK_FEAT`` the method implies when the config leaves it unset
            (None: the key's default).

    Args:
        cfg: the run configuration (the recipe's own keys are read here, once).
        model: the ReID model built for this recipe.
        data: the ``DataBundle``.
        device: where training runs.
    """

    name: ClassVar[str] = ""
    with_text: ClassVar[bool] = False
    head: ClassVar[str] = "clipreid"
    stages: ClassVar[tuple[int, ...]] = (2,)
    lr_epoch_offset: ClassVar[int] = 0
    trainable: ClassVar[str] = "image"
    neck_feat: ClassVar[str | None] = None

    @classmethod
    def check_cfg(cls, cfg: CfgNode) -> None:
        """Cross-key rules of this method; raise ``ValueError`` naming the keys to change."""
        if cfg.MODEL.PCL_UNSUPERVISED:
            raise ValueError(
                f"MODEL.PCL_UNSUPERVISED needs MODEL.METHOD 'pcl' (got {cls.name!r}): only the "
                "PCL centroid memory trains on cluster pseudo labels"
            )

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, data: Any, device: torch.device):
        self.model = model
        self.data = data
        self.device = device
        self.criterion = self.build_criterion(cfg, data.num_classes)

    def build_criterion(self, cfg: CfgNode, num_classes: int) -> torch.nn.Module:
        """The stage-2 loss; returns named weighted terms."""
        raise NotImplementedError

    def build_optimizer(self, cfg: CfgNode, stage: int = 2) -> torch.optim.Optimizer:
        """Select the parameters a stage trains and build their optimizer.

        Args:
            cfg: the run configuration (``SOLVER.STAGEn``).
            stage: one of ``stages``.

        Returns:
            The optimizer (the base recipe: stage-2 parameter rules over ``trainable``).
        """
        self.model.set_trainable(self.trainable)
        return build_optimizer(cfg, trainable_parameters(self.model), stage=2)

    def start(self) -> None:
        """Work before the first stage-2 epoch of this process (e.g. a text bank)."""

    def start_epoch(self, epoch: int) -> DataLoader | None:
        """Work at the start of a stage-2 epoch, after its seeding.

        Returns:
            A loader that replaces the stage-2 loader from this epoch on, or None.
        """
        return None

    def text_pids(self, pids: torch.Tensor) -> torch.Tensor | None:
        """IDs whose prompts the training forward encodes with gradients (None: no text)."""
        return None

    def losses(
        self,
        out: Any,
        pids: torch.Tensor,
        text_pids: torch.Tensor | None,
        text_feats: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The weighted loss terms of one batch.

        Args:
            out: the model's training output.
            pids: int64 [B] labels.
            text_pids: the IDs of ``text_pids(pids)``, or None.
            text_feats: their prompt features from the training forward, or None.

        Returns:
            Named weighted terms; the loop sums them.
        """
        return self.criterion(out, pids)

    def end_step(self, out: Any, pids: torch.Tensor) -> None:
        """Work after each optimizer step (e.g. a memory update)."""

    def state_dict(self) -> dict[str, Any]:
        """The recipe's mid-epoch state (tensors and plain values), saved on interruption."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> DataLoader | None:
        """Restore :meth:`state_dict` in place of ``start_epoch`` when an epoch resumes.

        Returns:
            A loader that replaces the stage-2 loader, as ``start_epoch`` may return, or None.
        """
        return None

    @torch.no_grad()
    def accuracy(self, out: Any, pids: torch.Tensor) -> float | None:
        """Training accuracy of a batch for the log (None: not meaningful for this method)."""
        return (out.cls_scores[0].argmax(1) == pids).float().mean().item()


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every parameter that requires grad."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
