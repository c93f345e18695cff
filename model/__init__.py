"""Model: CLIP towers with the ReID changes, prompt learner, the ReID model and its builders."""

from model.build import build_model
from model.clip.arch import CLIPArch, FeatureDims, get_arch, list_archs, register_arch
from model.loading import (
    CheckpointLoadReport,
    CheckpointMismatchError,
    extract_state_dict,
    load_reid_checkpoint,
)
from model.prompt_learner import PromptLearner, format_prompt_template
from model.reid_model import ReIDModel, ReIDTrainOutput
from model.weights import WeightsUnavailableError, create_pretrained_clip

__all__ = [
    "CLIPArch",
    "CheckpointLoadReport",
    "CheckpointMismatchError",
    "FeatureDims",
    "PromptLearner",
    "ReIDModel",
    "ReIDTrainOutput",
    "WeightsUnavailableError",
    "build_model",
    "create_pretrained_clip",
    "extract_state_dict",
    "format_prompt_template",
    "get_arch",
    "list_archs",
    "load_reid_checkpoint",
    "register_arch",
]
