"""Model tests: parity with open_clip, ReID grid/stride/SIE changes, heads, prompts, stages."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from torch import nn

from model import ReIDModel, ReIDTrainOutput, build_model, get_arch
from model.clip.arch import create_clip
from model.clip.tokenizer import tokenize
from model.clip.vision import ResNetReIDEncoder, resize_pos_embed
from model.prompt_learner import PromptLearner, format_prompt_template
from tests.clip_fixtures import (
    PERSON_IDS,
    VEHICLE_IDS,
    X_ID,
    make_cfg,
    random_openai_state_dict,
    reference_clip,
)

PROMPT = "A photo of a X X X X person."


def _model(
    name: str = "ViT-T-16-test",
    num_classes: int = 5,
    cams: int = 3,
    views: int = 2,
    seed: int = 0,
    **overrides: object,
) -> ReIDModel:
    torch.manual_seed(seed)
    return build_model(make_cfg(name, **overrides), num_classes, cams, views)


# ----------------------------------------------------------------------------------------------
# Parity with open_clip's own forward on identical OpenAI-format weights (224x224, stride 16).
@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    out = {}
    for name in ("ViT-T-16-test", "RN-T-test"):
        arch = get_arch(name)
        weights = tmp / f"{name}.pt"
        torch.save(random_openai_state_dict(arch, seed=3), weights)
        (tmp / f"{name}.json").write_text(json.dumps(arch.open_clip_config()))
        open_clip.add_model_config(tmp / f"{name}.json")
        ref = open_clip.create_model(name, pretrained=str(weights), force_quick_gelu=True).eval()
        out[name] = (weights, ref)
    return out


def test_vit_image_parity_with_open_clip(parity_setup):
    weights, ref = parity_setup["ViT-T-16-test"]
    cfg = make_cfg(
        MODEL__PRETRAIN_PATH=str(weights),
        MODEL__PRETRAIN_TAG="openai",
        INPUT__SIZE_TRAIN=[224, 224],
        INPUT__SIZE_TEST=[224, 224],
    )
    model = build_model(cfg, 4, 1, 1).eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.encode_image_proj(x)
        theirs = ref.encode_image(x)
        gelu = open_clip.create_model("ViT-T-16-test", pretrained=str(weights)).eval()
        gelu_out = gelu.encode_image(x)
    assert ours.shape == (3, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The comparison is sensitive: the same weights with plain GELU give other features.
    assert (gelu_out - theirs).abs().max() > 1e-3


def test_vit_text_parity_with_open_clip(parity_setup):
    weights, ref = parity_setup["ViT-T-16-test"]
    cfg = make_cfg(MODEL__PRETRAIN_PATH=str(weights), MODEL__PRETRAIN_TAG="openai")
    model = build_model(cfg, 4, 1, 1).eval()
    with torch.no_grad():
        # The learnable tokens set to the embedding of "X" make the prompt the real sentence.
        model.prompt_learner.cls_ctx.copy_(ref.token_embedding.weight[X_ID].expand(4, 4, -1))
        ours = model.encode_text(torch.tensor([0, 3]))
        theirs = ref.encode_text(open_clip.tokenize([PROMPT]))
    torch.testing.assert_close(ours, theirs.expand(2, -1), atol=1e-5, rtol=0)


def test_resnet_parity_with_open_clip_at_clip_stride(parity_setup):
    weights, ref = parity_setup["RN-T-test"]
    from model.weights import create_pretrained_clip

    clip_model = create_pretrained_clip(get_arch("RN-T-test"), "openai", str(weights))
    encoder = ResNetReIDEncoder(clip_model.visual, (224, 224), last_stride=2).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(encoder(x).proj, ref.encode_image(x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Token grid, positional-embedding resize, overlapping patches.
def _bilinear_by_hand(grid: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize of [h, w, D] with half-pixel centres (align_corners False), by loops."""
    in_h, in_w, _ = grid.shape

    def taps(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    out = torch.empty(out_h, out_w, grid.shape[2], dtype=torch.float64)
    for y in range(out_h):
        y0, y1, fy = taps(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, fx = taps(x, in_w, out_w)
            top = (1 - fx) * grid[y0, x0] + fx * grid[y0, x1]
            bottom = (1 - fx) * grid[y1, x0] + fx * grid[y1, x1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


@pytest.mark.parametrize(
    ("src", "dst"), [((14, 14), (16, 8)), ((14, 14), (21, 10)), ((7, 7), (16, 8))]
)
def test_pos_embed_resize_is_plain_bilinear(src, dst):
    pos = torch.randn(1 + src[0] * src[1], 6, dtype=torch.float64)
    out = resize_pos_embed(pos, src, dst)
    expected = _bilinear_by_hand(pos[1:].reshape(src[0], src[1], 6), *dst).reshape(-1, 6)
    assert out.shape == (1 + dst[0] * dst[1], 6)
    torch.testing.assert_close(out[0], pos[0])
    torch.testing.assert_close(out[1:], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("stride", "grid", "tokens"),
    [((16, 16), (16, 8), 129), ((12, 12), (21, 10), 211), ((16, 12), (16, 10), 161)],
)
def test_token_counts_follow_stride(stride, grid, tokens):
    model = _model(MODEL__STRIDE_SIZE=list(stride)).eval()
    enc = model.image_encoder
    assert enc.patch_size == 16 and enc.conv1.stride == stride
    assert enc.grid == grid and enc.num_tokens == tokens
    assert enc.positional_embedding.shape == (tokens, 64)
    with torch.no_grad():
        tok = enc.embed(torch.randn(2, 3, 256, 128))
    assert tok.shape == (2, tokens, 64)


def test_pretrained_pos_embed_is_resized_from_checkpoint_grid(tmp_path):
    arch = get_arch("ViT-T-16-test")
    sd = random_openai_state_dict(arch, seed=5)
    torch.save(sd, tmp_path / "w.pt")
    cfg = make_cfg(
        MODEL__PRETRAIN_PATH=str(tmp_path / "w.pt"),
        MODEL__PRETRAIN_TAG="openai",
        MODEL__STRIDE_SIZE=[12, 12],
    )
    model = build_model(cfg, 3, 1, 1)
    src = sd["visual.positional_embedding"].double()
    expected = _bilinear_by_hand(src[1:].reshape(14, 14, -1), 21, 10).reshape(210, -1)
    pos = model.image_encoder.positional_embedding.detach().double()
    torch.testing.assert_close(pos[0], src[0])
    torch.testing.assert_close(pos[1:], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.image_encoder.conv1.weight, sd["visual.conv1.weight"])


def test_input_size_mismatch_names_the_config_keys():
    model = _model().eval()
    with pytest.raises(ValueError, match="INPUT.SIZE_TRAIN") as err:
        model(torch.randn(1, 3, 384, 128))
    assert "MODEL.STRIDE_SIZE" in str(err.value) and "24x8" in str(err.value)
    with pytest.raises(ValueError, match="INPUT.SIZE_TEST"):
        build_model(make_cfg(INPUT__SIZE_TEST=[384, 128]), 3, 1, 1)


def test_resnet_feature_maps_and_attnpool_grid():
    model = _model("RN-T-test").eval()
    enc = model.image_encoder
    first = enc.layer4[0]
    assert isinstance(first.avgpool, nn.Identity) and isinstance(first.downsample[0], nn.Identity)
    with torch.no_grad():
        x3, x4 = enc.feature_maps(torch.randn(2, 3, 256, 128))
    assert x3.shape == (2, 128, 16, 8) and x4.shape == (2, 256, 16, 8)
    assert enc.attnpool.positional_embedding.shape == (129, 256)
    with pytest.raises(ValueError, match="INPUT.SIZE_TRAIN"):
        model(torch.randn(1, 3, 256, 256))
    # Parameter names are OpenAI's: identical to open_clip's ModifiedResNet keys.
    fresh = reference_clip(get_arch("RN-T-test")).visual.state_dict()
    assert set(enc.state_dict()) == set(fresh)


def test_vit_encoder_keeps_openai_names():
    model = _model()
    fresh = reference_clip(get_arch("ViT-T-16-test")).visual.state_dict()
    assert set(model.image_encoder.state_dict()) == set(fresh)


# ----------------------------------------------------------------------------------------------
# Feature widths.
@pytest.mark.parametrize(("name", "dim"), [("ViT-B-16", 1280), ("RN50", 3072)])
def test_full_size_eval_width_from_spec_and_meta_forward(name, dim):
    arch = get_arch(name)
    dims = arch.feature_dims()
    assert dims.final + dims.proj == dim
    with torch.device("meta"):
        clip_model = create_clip(arch)
    model = ReIDModel(clip_model, arch, 751, (256, 128), num_cameras=6, sie_camera=True).eval()
    feats = model(torch.empty(2, 3, 256, 128, device="meta"))
    assert feats.shape == (2, dim)
    sd = model.state_dict()
    visual = [k for k in sd if k.startswith("image_encoder.")]
    # OpenAI's visual key counts: 152 (ViT-B/16) and 339 (RN50, BatchNorm counters included).
    assert len(visual) == {"ViT-B-16": 152, "RN50": 339}[name]
    assert sd["prompt_learner.cls_ctx"].shape == (751, 4, 512)
    assert sd["prompt_learner.token_prefix"].shape == (1, 5, 512)
    assert sd["prompt_learner.token_suffix"].shape == (1, 68, 512)
    if name == "ViT-B-16":
        assert sd["image_encoder.positional_embedding"].shape == (129, 768)
        assert sd["cv_embed"].shape == (6, 768)
        assert sd["text_encoder.text_projection"].shape == (512, 512)
    else:
        assert sd["image_encoder.attnpool.positional_embedding"].shape == (129, 2048)
        assert sd["text_encoder.text_projection"].shape == (512, 1024)


@pytest.mark.parametrize("name", ["ViT-T-16-test", "RN-T-test"])
def test_tiny_variant_outputs_match_spec(name):
    model = _model(name, num_classes=7)
    dims = get_arch(name).feature_dims()
    x = torch.randn(4, 3, 256, 128)
    out = model(x)
    assert isinstance(out, ReIDTrainOutput)
    assert [s.shape for s in out.cls_scores] == [(4, 7), (4, 7)]
    assert [f.shape for f in out.feats] == [(4, dims.last), (4, dims.final), (4, dims.proj)]
    assert out.proj is out.feats[2]
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, dims.final + dims.proj) == (4, model.feat_dim)


# ----------------------------------------------------------------------------------------------
# Heads.
def test_heads_init_and_forward_composition():
    model = _model(num_classes=40)
    for bn in (model.bottleneck, model.bottleneck_proj):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
        assert not bn.bias.requires_grad and bn.weight.requires_grad
    for fc in (model.classifier, model.classifier_proj):
        assert fc.bias is None
        assert 0.0008 < fc.weight.std().item() < 0.0012
    x = torch.randn(6, 3, 256, 128)
    out = model(x)
    f, fp = out.feats[1], out.feats[2]
    torch.testing.assert_close(out.cls_scores[0], model.classifier(model.bottleneck(f)))
    torch.testing.assert_close(out.cls_scores[1], model.classifier_proj(model.bottleneck_proj(fp)))
    model.eval()
    with torch.no_grad():
        feats = model.image_features(x)
        torch.testing.assert_close(model(x), torch.cat([feats.final, feats.proj], 1))
        torch.testing.assert_close(model.encode_image(x), model(x))
        model.neck_feat = "after"
        after = torch.cat([model.bottleneck(feats.final), model.bottleneck_proj(feats.proj)], 1)
        torch.testing.assert_close(model.encode_image(x), after)
    # The eval-mode BNNeck is an affine map of the running stats, not the identity.
    assert not torch.allclose(after, torch.cat([feats.final, feats.proj], 1))


def test_f_last_is_cls_after_second_to_last_block():
    model = _model().eval()
    enc = model.image_encoder
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        tokens = enc.embed(x)
        for block in enc.transformer.resblocks[:-1]:
            tokens = block(tokens)
        last = tokens[:, 0]
        final = enc.ln_post(enc.transformer.resblocks[-1](tokens))[:, 0]
        feats = model.image_features(x)
    torch.testing.assert_close(feats.last, last)
    torch.testing.assert_close(feats.final, final)
    torch.testing.assert_close(feats.proj, final @ enc.proj)


# ----------------------------------------------------------------------------------------------
# SIE.
def test_sie_changes_output_only_with_ids():
    plain = _model(seed=1).eval()
    sie = _model(seed=2, MODEL__SIE_CAMERA=True, MODEL__SIE_COE=1.5).eval()
    missing = sie.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["cv_embed"]
    x, cams = torch.randn(3, 3, 256, 128), torch.tensor([0, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(sie.encode_image(x), plain.encode_image(x))
        with_ids = sie.encode_image(x, camids=cams)
        # Camera ids are ignored by a model without SIE.
        torch.testing.assert_close(plain.encode_image(x, camids=cams), plain.encode_image(x))
    assert not torch.allclose(with_ids, plain.encode_image(x))


def test_sie_cls_mode_touches_only_cls_token():
    model = _model(MODEL__SIE_CAMERA=True, MODEL__SIE_COE=2.0).eval()
    enc, x, cams = model.image_encoder, torch.randn(2, 3, 256, 128), torch.tensor([1, 2])
    vec = model.sie_vectors(camids=cams)
    torch.testing.assert_close(vec, 2.0 * model.cv_embed[cams])
    with torch.no_grad():
        base, with_sie = enc.embed(x), enc.embed(x, vec)
        cls = enc.ln_pre(enc.class_embedding + vec + enc.positional_embedding[0])
    torch.testing.assert_close(with_sie[:, 1:], base[:, 1:])
    torch.testing.assert_close(with_sie[:, 0], cls)


def test_sie_all_mode_adds_to_every_token():
    model = _model(MODEL__SIE_CAMERA=True, MODEL__SIE_MODE="all").eval()
    enc, x, cams = model.image_encoder, torch.randn(2, 3, 256, 128), torch.tensor([0, 2])
    vec = model.sie_vectors(camids=cams)
    with torch.no_grad():
        patches = enc.conv1(x).flatten(2).transpose(1, 2)
        cls = enc.class_embedding.expand(2, 1, -1)
        by_hand = enc.ln_pre(torch.cat([cls, patches], 1) + vec[:, None] + enc.positional_embedding)
        torch.testing.assert_close(enc.embed(x, vec), by_hand)


def test_sie_camera_view_index_and_table_shapes():
    both = _model(cams=3, views=4, MODEL__SIE_CAMERA=True, MODEL__SIE_VIEW=True)
    assert both.cv_embed.shape == (12, 64)
    cams, views = torch.tensor([0, 2, 1]), torch.tensor([3, 1, 0])
    torch.testing.assert_close(
        both.sie_vectors(cams, views), 3.0 * both.cv_embed[torch.tensor([3, 9, 4])]
    )
    with pytest.raises(ValueError, match="both"):
        both.sie_vectors(cams, None)
    assert _model(cams=3, views=4, MODEL__SIE_VIEW=True).cv_embed.shape == (4, 64)
    assert _model(cams=3, views=4, MODEL__SIE_CAMERA=True).cv_embed.shape == (3, 64)
    assert _model().cv_embed is None


def test_sie_mean_fallback_by_hand():
    both = _model(cams=3, views=4, MODEL__SIE_CAMERA=True, MODEL__SIE_VIEW=True, MODEL__SIE_COE=2.0)
    t = both.cv_embed.detach()  # rows cam * 4 + view
    cams, views = torch.tensor([0, 2]), torch.tensor([3, 1])
    with torch.no_grad():
        # Neither id: the mean of all 12 rows, one vector for the batch.
        torch.testing.assert_close(
            both.sie_vectors(fallback="mean"), 2.0 * (sum(t[i] for i in range(12)) / 12)[None]
        )
        # Only the camera: the mean over that camera's 4 view rows; only the view: over cameras.
        by_cam = torch.stack([sum(t[c * 4 + v] for v in range(4)) / 4 for c in (0, 2)])
        torch.testing.assert_close(both.sie_vectors(cams, None, "mean"), 2.0 * by_cam)
        by_view = torch.stack([sum(t[c * 4 + v] for c in range(3)) / 3 for v in (3, 1)])
        torch.testing.assert_close(both.sie_vectors(None, views, "mean"), 2.0 * by_view)
        # Both ids given: the fallback changes nothing.
        torch.testing.assert_close(
            both.sie_vectors(cams, views, "mean"), both.sie_vectors(cams, views)
        )
        assert both.sie_vectors(fallback="none") is None
        torch.testing.assert_close(both.mean_sie_vector(), 2.0 * t.mean(0))
    with pytest.raises(ValueError, match="'none', 'mean'"):
        both.sie_vectors(cams, views, "zero")

    cam = _model(MODEL__SIE_CAMERA=True, MODEL__SIE_COE=1.5).eval()
    x = torch.randn(3, 3, 256, 128)
    with torch.no_grad():
        mean = 1.5 * cam.cv_embed.mean(0)
        # The features of the 'mean' fallback are those of the mean vector added to every image.
        by_hand = cam._eval_feature(cam.image_encoder(x, mean.expand(3, -1)))
        torch.testing.assert_close(cam.encode_image(x, sie_fallback="mean"), by_hand)
        no_sie = cam._eval_feature(cam.image_encoder(x))
        torch.testing.assert_close(cam.encode_image(x), no_sie)
        assert not torch.allclose(by_hand, no_sie, atol=1e-4)
    assert _model().mean_sie_vector() is None


def test_resnet_sie_goes_to_attention_pool_only():
    model = _model("RN-T-test", MODEL__SIE_CAMERA=True).eval()
    x, cams = torch.randn(2, 3, 256, 128), torch.tensor([0, 1])
    with torch.no_grad():
        a, b = model.image_features(x), model.image_features(x, camids=cams)
    torch.testing.assert_close(a.last, b.last)
    torch.testing.assert_close(a.final, b.final)
    assert not torch.allclose(a.proj, b.proj)


# ----------------------------------------------------------------------------------------------
# Prompts and text.
@pytest.mark.parametrize(("word", "golden"), [("person", PERSON_IDS), ("vehicle", VEHICLE_IDS)])
def test_prompt_token_ids_are_golden(word, golden):
    text = format_prompt_template("A photo of a {ctx} {cls}.", 4, word)
    assert text == f"A photo of a X X X X {word}."
    ids = tokenize(text)
    assert ids.shape == (1, 77) and ids.dtype == torch.int64
    assert ids[0, :12].tolist() == golden and ids[0, 12:].eq(0).all()


def test_prompt_learner_buffers_and_forward():
    emb = nn.Embedding(49408, 16)
    learner = PromptLearner(10, PROMPT, 4, emb)
    ids = torch.tensor(PERSON_IDS + [0] * 65)
    assert learner.token_prefix.shape == (1, 5, 16) and learner.token_suffix.shape == (1, 68, 16)
    assert learner.cls_ctx.shape == (10, 4, 16)
    assert int(learner.eot_index) == 11
    buffers = dict(learner.named_buffers())
    assert set(buffers) == {"token_prefix", "token_suffix", "tokenized_prompts"}
    assert torch.equal(buffers["tokenized_prompts"][0], ids)
    pids = torch.tensor([7, 2, 7])
    prompts = learner(pids)
    with torch.no_grad():
        full = emb(ids)
    assert prompts.shape == (3, 77, 16)
    torch.testing.assert_close(prompts[:, :5], full[:5].expand(3, -1, -1))
    torch.testing.assert_close(prompts[:, 9:], full[9:].expand(3, -1, -1))
    torch.testing.assert_close(prompts[:, 5:9], learner.cls_ctx[pids])


def test_prompt_learner_init_std_and_validation():
    learner = PromptLearner(300, PROMPT, 4, nn.Embedding(49408, 64))
    assert abs(learner.cls_ctx.std().item() - 0.02) < 0.001
    assert abs(learner.cls_ctx.mean().item()) < 0.001
    with pytest.raises(ValueError, match="exactly 4"):
        PromptLearner(3, "A photo of a X X X person.", 4, nn.Embedding(49408, 8))
    with pytest.raises(ValueError, match="ctx"):
        format_prompt_template("A photo of a {cls}.", 4, "person")


def test_text_pooling_uses_eot_position():
    model = _model().eval()
    te, pl = model.text_encoder, model.prompt_learner
    pids = torch.tensor([1, 4])
    with torch.no_grad():
        prompts = pl(pids)
        x = te.transformer(prompts + te.positional_embedding, attn_mask=te.attn_mask)
        by_hand = te.ln_final(x)[:, 11] @ te.text_projection
        torch.testing.assert_close(model.encode_text(pids), by_hand)
        # Causal mask: the EOT feature does not depend on anything after position 11.
        changed = prompts.clone()
        changed[:, 12:] += 1.0
        torch.testing.assert_close(te(changed, 11), by_hand)


# ----------------------------------------------------------------------------------------------
# Training stages and the baseline.
def test_set_trainable_stage1_only_prompt_tokens():
    model = _model()
    assert model.set_trainable("prompts") == ["prompt_learner.cls_ctx"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_learner.cls_ctx"]
    model.encode_text(torch.tensor([0, 1, 1])).pow(2).sum().backward()
    assert model.prompt_learner.cls_ctx.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if n != "prompt_learner.cls_ctx")


def test_set_trainable_stage2_excludes_text_side():
    model = _model(MODEL__SIE_CAMERA=True)
    names = set(model.set_trainable("image"))
    expected = {
        n
        for n, _ in model.named_parameters()
        if not n.startswith(("prompt_learner.", "text_encoder."))
        and n not in ("bottleneck.bias", "bottleneck_proj.bias")
    }
    assert names == expected
    assert {"image_encoder.conv1.weight", "cv_embed", "classifier.weight"} <= names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert set(model.set_trainable("image+prompts")) == expected | {"prompt_learner.cls_ctx"}


def test_baseline_has_no_text_side():
    model = _model(MODEL__METHOD="baseline")
    assert model.prompt_learner is None and model.text_encoder is None and not model.has_text
    assert not any(k.startswith(("prompt_learner", "text_encoder")) for k in model.state_dict())
    with pytest.raises(RuntimeError, match="baseline"):
        model.encode_text(torch.tensor([0]))
    with pytest.raises(ValueError, match="text side"):
        model.set_trainable("prompts")
    assert "classifier.weight" in model.set_trainable("image")


def test_tiny_vit_is_trainable():
    """A few Adam steps on a fixed batch lower the ID loss (the demo trains this variant)."""
    model = _model(num_classes=4)
    model.set_trainable("image")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(8, 3, 256, 128), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    losses = []
    for _ in range(4):
        out = model(x)
        loss = sum(nn.functional.cross_entropy(s, y) for s in out.cls_scores)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_grad_checkpointing_gives_same_outputs_and_grads():
    model = _model()
    x = torch.randn(2, 3, 256, 128)
    model(x).feats[1].sum().backward()
    ref = model.image_encoder.conv1.weight.grad.clone()
    model.zero_grad()
    model.image_encoder.set_grad_checkpointing(True)
    model(x).feats[1].sum().backward()
    torch.testing.assert_close(model.image_encoder.conv1.weight.grad, ref)
