"""CLIP-ReID (two stages), its one-stage variant (paper Tab. 5) and the fine-tuned baseline."""

from __future__ import annotations

import logging
from typing import Any

import torch
from yacs.config import CfgNode

from loss.build import build_loss
from processor.common import autocast
from processor.recipes.base import Recipe, register_recipe, trainable_parameters
from processor.stage1 import build_prompt_settings
from solver.optimizer import build_optimizer

logger = logging.getLogger(__name__)

TEXT_BANK_BATCH = 256  # IDs per text-encoder pass when the text bank is computed


@torch.no_grad()
def compute_text_bank(
    model: torch.nn.Module, num_classes: int, batch: int, device: torch.device, amp_dtype: str
) -> torch.Tensor:
    """Text features of every training ID, computed once (the text side is frozen in stage 2).

    Args:
        model: the ReID model (``encode_text``).
        num_classes: number of training IDs C.
        batch: IDs per text-encoder pass.
        device: where the model runs.
        amp_dtype: autocast precision on CUDA.

    Returns:
        float32 [C, E] on ``device``.
    """
    chunks = []
    for start in range(0, num_classes, batch):
        ids = torch.arange(start, min(start + batch, num_classes), device=device)
        with autocast(device, amp_dtype):
            chunks.append(model.encode_text(ids).float())
    return torch.cat(chunks)


@register_recipe("baseline")
class Baseline(Recipe):
    """The fine-tuned CLIP baseline: ID and triplet losses on the image encoder, no text side."""

    def build_criterion(self, cfg: CfgNode, num_classes: int) -> torch.nn.Module:
        return build_loss(cfg, num_classes, with_text=self.with_text)


@register_recipe("clipreid")
class CLIPReID(Baseline):
    """CLIP-ReID: stage 1 learns the ID prompts, stage 2 fine-tunes the image encoder.

    Stage 2 adds the text losses against a bank of every ID's (frozen) text feature, computed
    once when stage 2 starts.
    """

    with_text = True
    stages = (1, 2)

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, data: Any, device: torch.device):
        super().__init__(cfg, model, data, device)
        self.amp_dtype = cfg.MODEL.AMP_DTYPE
        self.prompt = build_prompt_settings(cfg)
        self.bank: torch.Tensor | None = None

    def build_optimizer(self, cfg: CfgNode, stage: int = 2) -> torch.optim.Optimizer:
        if stage == 2:
            return super().build_optimizer(cfg, stage)
        # Stage 1: only the prompt tokens; the text tower accumulates no gradient.
        self.model.set_trainable("prompts")
        return build_optimizer(cfg, trainable_parameters(self.model), stage=1)

    def start(self) -> None:
        if not self.criterion.text_losses:
            return
        self.bank = compute_text_bank(
            self.model, int(self.model.num_classes), TEXT_BANK_BATCH, self.device, self.amp_dtype
        )
        logger.info("[stage2] text bank of %d IDs %s", self.bank.shape[0], tuple(self.bank.shape))

    def losses(
        self,
        out: Any,
        pids: torch.Tensor,
        text_pids: torch.Tensor | None,
        text_feats: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        if self.bank is None:
            return self.criterion(out, pids)
        return self.criterion(
            out, pids, text_bank=self.bank, batch_text_feats=self.bank[pids], batch_text_pids=pids
        )

    @torch.no_grad()
    def accuracy(self, out: Any, pids: torch.Tensor) -> float | None:
        if self.bank is None:
            return super().accuracy(out, pids)
        # Image-to-text accuracy: the ID whose text feature the image's projection is closest to.
        logits = out.proj.float() @ self.bank.t()
        return (logits.argmax(1) == pids).float().mean().item()


@register_recipe("clipreid_one_stage")
class CLIPReIDOneStage(CLIPReID):
    """One-stage CLIP-ReID (paper Tab. 5): prompts and image encoder train together.

    The prompts train at the stage-1 learning rate and weight decay, in their own parameter group;
    the text losses use the batch IDs' prompt features computed with gradients in the forward.
    """

    stages = (2,)
    trainable = "image+prompts"

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, data: Any, device: torch.device):
        super().__init__(cfg, model, data, device)
        self.prompt_lr = float(cfg.SOLVER.STAGE1.BASE_LR)
        self.prompt_weight_decay = float(cfg.SOLVER.STAGE1.WEIGHT_DECAY)

    def build_optimizer(self, cfg: CfgNode, stage: int = 2) -> torch.optim.Optimizer:
        self.model.set_trainable(self.trainable)
        named = trainable_parameters(self.model)
        prompts = [(n, p) for n, p in named if n.startswith("prompt_learner.")]
        optimizer = build_optimizer(
            cfg, [(n, p) for n, p in named if not n.startswith("prompt_learner.")], stage=2
        )
        optimizer.add_param_group(
            {
                "params": [p for _, p in prompts],
                "param_names": [n for n, _ in prompts],
                "lr": self.prompt_lr,
                "weight_decay": self.prompt_weight_decay,
            }
        )
        return optimizer

    def start(self) -> None:
        """No text bank: the prompts change every step."""

    def text_pids(self, pids: torch.Tensor) -> torch.Tensor | None:
        return torch.unique(pids) if self.criterion.text_losses else None

    def losses(
        self,
        out: Any,
        pids: torch.Tensor,
        text_pids: torch.Tensor | None,
        text_feats: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        if text_feats is None:
            return self.criterion(out, pids)
        return self.criterion(
            out, pids, text_bank=None, batch_text_feats=text_feats, batch_text_pids=text_pids
        )
