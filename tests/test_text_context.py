"""Prompt encoding at the truncated context (positions up to EOT) equals the full 77 positions.

Every shipped config's prompt (template and class word, read through the config loader) is
checked with M = 1, 4 and 8 learnable tokens, on the tiny test CLIP and on the real ViT-B-16 text
tower shapes (context 77, width 512, 12 layers; random weights, nothing downloaded), against the
project's own full-context path and against open_clip's ``encode_text`` of the same sentence.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import open_clip
import pytest
import torch

from configs.config import load_cfg
from model import build_model, get_arch
from model.clip.arch import create_clip
from model.clip.text import TextEncoder
from model.prompt_learner import PromptLearner, format_prompt_template
from tests.clip_fixtures import X_ID, make_cfg
from tests.conftest import ROOT

N_CTX = (1, 4, 8)
ATOL = 1e-5


def _shipped_prompts() -> list[tuple[str, str]]:
    """(MODEL.PROMPT_TEMPLATE, MODEL.PROMPT_CLASS) of every shipped YAML, resolved."""
    found = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yml"), recursive=True)):
        cfg = load_cfg(path)
        found.add((cfg.MODEL.PROMPT_TEMPLATE, cfg.MODEL.PROMPT_CLASS))
    return sorted(found)


SHIPPED = _shipped_prompts()


def test_shipped_prompts_cover_both_class_words():
    assert {word for _, word in SHIPPED} == {"person", "vehicle"}


@pytest.fixture(scope="module")
def vit_b16_text_clip():
    """open_clip CLIP with ViT-B-16's text tower (a one-layer narrow vision tower: unused)."""
    arch = dataclasses.replace(
        get_arch("ViT-B-16"), vision_layers=1, vision_width=64, vision_head_width=32
    )
    assert (arch.text_context_length, arch.text_width, arch.text_layers) == (77, 512, 12)
    torch.manual_seed(0)
    return create_clip(arch).eval()


def _learner(clip_model, template: str, word: str, n_ctx: int, num_classes: int = 6):
    text = format_prompt_template(template, n_ctx, word)
    torch.manual_seed(n_ctx)
    return text, PromptLearner(num_classes, text, n_ctx, clip_model.token_embedding)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("n_ctx", N_CTX)
@pytest.mark.parametrize(("template", "word"), SHIPPED)
def test_truncated_equals_full_context_vit_b16_text_tower(vit_b16_text_clip, template, word, n_ctx):
    clip_model = vit_b16_text_clip
    text, learner = _learner(clip_model, template, word, n_ctx)
    encoder = TextEncoder.from_open_clip(clip_model)
    ids = open_clip.tokenize([text])
    eot = int(ids.argmax())
    assert learner.prompt_length == eot + 1 == int((ids != 0).sum())
    pids = torch.tensor([0, 5, 2])
    with torch.no_grad():
        short = learner(pids, length=learner.prompt_length)
        full = learner(pids)
        assert short.shape[1] == eot + 1 and full.shape[1] == 77
        ours_short = encoder(short, eot)
        ours_full = encoder(full, eot)
        assert _max_diff(ours_short, ours_full) < ATOL
        # The learnable tokens set to the embedding of 'X' make the prompt the real sentence:
        # open_clip's own full-context encode_text is the reference.
        learner.cls_ctx.copy_(clip_model.token_embedding.weight[X_ID].expand_as(learner.cls_ctx))
        sentence = encoder(learner(pids, length=learner.prompt_length), eot)
        theirs = clip_model.encode_text(ids)
    assert ours_full.abs().max() > 0.1  # features of a non-trivial size: 1e-5 is a real bound
    assert _max_diff(sentence, theirs.expand_as(sentence)) < ATOL


@pytest.mark.parametrize("n_ctx", N_CTX)
@pytest.mark.parametrize(("template", "word"), SHIPPED)
def test_encode_text_truncates_and_keeps_features_and_grads(template, word, n_ctx):
    cfg = make_cfg(
        MODEL__PROMPT_TEMPLATE=template, MODEL__PROMPT_CLASS=word, MODEL__PROMPT_N_CTX=n_ctx
    )
    torch.manual_seed(1)
    model = build_model(cfg, 5, 1, 1)
    model.set_trainable("prompts")
    pl, te = model.prompt_learner, model.text_encoder
    eot = int(pl.eot_index)
    assert pl.prompt_length == eot + 1 < 77
    pids = torch.tensor([4, 0, 4, 2])
    seen = []
    forward = te.forward

    def spy(prompts, eot_index):
        seen.append(prompts.shape[1])
        return forward(prompts, eot_index)

    te.forward = spy
    ours = model.encode_text(pids)
    te.forward = forward
    assert seen == [eot + 1]
    (ours**2).sum().backward()
    grad_short = pl.cls_ctx.grad.clone()
    pl.cls_ctx.grad = None
    full = te(pl(pids), pl.eot_index)
    (full**2).sum().backward()
    assert _max_diff(ours, full) < ATOL
    # Gradients reach ~100 here: fp32 rounding of the two paths (as large as each path's own
    # error against fp64) is bounded relative to their scale.
    scale = grad_short.abs().max().item()
    assert scale > 1.0
    assert _max_diff(grad_short, pl.cls_ctx.grad) < ATOL * scale


def test_state_dict_layout_unchanged_and_length_follows_loaded_ids():
    torch.manual_seed(0)
    model = build_model(make_cfg(), 3, 1, 1)
    pl = model.prompt_learner
    sd = model.state_dict()
    assert sd["prompt_learner.token_suffix"].shape == (1, 77 - 5 - 4, 64)
    assert sd["prompt_learner.tokenized_prompts"].shape == (1, 77)
    assert pl.prompt_length == 12
    # Token ids of a longer prompt (same shapes): the EOT position moves and the length follows.
    longer = PromptLearner(3, "A photo of a X X X X tall person.", 4, torch.nn.Embedding(49408, 64))
    sd["prompt_learner.tokenized_prompts"] = longer.tokenized_prompts.clone()
    model.load_state_dict(sd)
    assert pl.prompt_length == 13


def test_prompt_length_bounds_are_checked():
    torch.manual_seed(0)
    model = build_model(make_cfg(), 3, 1, 1)
    pl, te = model.prompt_learner, model.text_encoder
    pids = torch.tensor([0])
    with pytest.raises(ValueError, match=r"length must be in \[12, 77\]"):
        pl(pids, length=11)
    with pytest.raises(ValueError, match=r"length must be in"):
        pl(pids, length=78)
    assert pl(pids, length=30).shape == (1, 30, 64)
    with pytest.raises(ValueError, match="78 positions"):
        te(torch.zeros(1, 78, 64), 11)
