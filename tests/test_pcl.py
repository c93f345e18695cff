"""PCL-CLIP: loss, centroid memory, head variant, frozen patch embedding, recipe, end to end."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import test_clipreid
import train_clipreid
from configs.config import ConfigError, load_cfg
from loss import (
    PCLLoss,
    build_pcl_loss,
    hard_centroid_update,
    pcl_loss,
    pid_centroids,
    sequential_centroid_update,
)
from model import build_model, get_arch
from model.loading import CheckpointMismatchError, load_reid_checkpoint
from processor.recipes import PCLCLIP, RECIPES, register_recipe
from solver.optimizer import build_optimizer
from tests.clip_fixtures import make_cfg
from tests.conftest import ROOT, run_in_fork
from tests.conftest import tiny_run_opts as _opts

PCL = ["MODEL.METHOD", "pcl", "MODEL.FREEZE_PATCH_EMBED", "True"]


# ----------------------------------------------------------------------------------------------
# Loss and memory (pure functions against hand computations and python loops).
def test_pcl_loss_hand_worked_value():
    # x = (3, 0) normalises to (1, 0); cosines to the centroids (1, 0), (0, 1) are 1 and 0, so
    # with t = 0.5 the logits are (2, 0) and the loss is log(1 + e^-2).
    feats = torch.tensor([[3.0, 0.0]])
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = pcl_loss(feats, centroids, torch.tensor([0]), temperature=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    wrong = pcl_loss(feats, centroids, torch.tensor([1]), temperature=0.5)
    assert wrong.item() == pytest.approx(2.0 + math.log1p(math.exp(-2.0)), rel=1e-6)


def test_pcl_loss_matches_brute_force_and_leaves_centroids_without_grad():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 5, generator=g, requires_grad=True)
    centroids = F.normalize(torch.randn(4, 5, generator=g), dim=1).requires_grad_(True)
    pids = torch.tensor([0, 0, 1, 2, 3, 3])
    tau = 0.05
    loss = pcl_loss(feats, centroids, pids, tau)
    total = 0.0
    for i in range(6):
        x = feats[i].tolist()
        norm = math.sqrt(sum(v * v for v in x))
        logits = [
            sum(a / norm * b for a, b in zip(x, c, strict=True)) / tau for c in centroids.tolist()
        ]
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - logits[int(pids[i])]
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert centroids.grad is None


def _loop_update(centroids, feats, pids, m):
    """Reference: per identity, a python loop picking the lowest-cosine instance."""
    c = [row[:] for row in centroids.tolist()]
    xs = []
    for row in feats.tolist():
        n = math.sqrt(sum(v * v for v in row))
        xs.append([v / n for v in row])
    for pid in sorted(set(pids.tolist()), reverse=True):  # order must not matter
        members = [i for i, p in enumerate(pids.tolist()) if p == pid]
        cos = [sum(a * b for a, b in zip(xs[i], c[pid], strict=True)) for i in members]
        hard = xs[members[cos.index(min(cos))]]
        new = [m * a + (1 - m) * b for a, b in zip(c[pid], hard, strict=True)]
        n = math.sqrt(sum(v * v for v in new))
        c[pid] = [v / n for v in new]
    return torch.tensor(c)


@pytest.mark.parametrize("momentum", [0.2, 0.0, 0.7, 1.0])
def test_hard_centroid_update_matches_python_loop(momentum):
    g = torch.Generator().manual_seed(1)
    centroids = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    feats = torch.randn(9, 4, generator=g) * 3.0  # unnormalised on purpose
    pids = torch.tensor([2, 0, 2, 5, 0, 2, 1, 5, 5])  # pids 3 and 4 absent
    before = centroids.clone()
    got = hard_centroid_update(centroids, feats, pids, momentum)
    torch.testing.assert_close(got, _loop_update(centroids, feats, pids, momentum))
    assert torch.equal(centroids, before)  # pure: the input is not modified
    torch.testing.assert_close(got[[3, 4]], before[[3, 4]], rtol=0, atol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(6))


def test_hard_centroid_update_takes_the_lowest_cosine_and_the_first_on_ties():
    c = torch.tensor([[1.0, 0.0]])
    # Cosines 0.6, 0.6, 0.9: the first of the two hardest instances moves the centroid.
    feats = torch.tensor([[0.6, 0.8], [0.6, -0.8], [0.9, math.sqrt(1 - 0.81)]])
    got = hard_centroid_update(c, feats, torch.tensor([0, 0, 0]), momentum=0.2)
    expected = F.normalize(0.2 * c[0] + 0.8 * feats[0], dim=0)
    torch.testing.assert_close(got[0], expected)
    easiest = F.normalize(0.2 * c[0] + 0.8 * feats[2], dim=0)
    assert not torch.allclose(got[0], easiest)


def _clustercontrast_cm_update(centroids, feats, pids, m):
    """ClusterContrast's CM backward update, as published: instance by instance, in order."""
    features = centroids.clone().double()
    inputs = F.normalize(feats.double(), dim=1)
    for x, y in zip(inputs, pids, strict=True):
        features[y] = m * features[y] + (1.0 - m) * x
        features[y] /= features[y].norm()
    return features.float()


@pytest.mark.parametrize("momentum", [0.1, 0.0, 0.5, 1.0])
def test_sequential_centroid_update_matches_clustercontrast(momentum):
    g = torch.Generator().manual_seed(4)
    centroids = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    feats = torch.randn(12, 5, generator=g) * 2.0
    pids = torch.tensor([2, 0, 2, 5, 0, 2, 1, 5, 5, 2, 0, 1])  # 3 and 4 absent; 2 four times
    before = centroids.clone()
    got = sequential_centroid_update(centroids, feats, pids, momentum)
    torch.testing.assert_close(got, _clustercontrast_cm_update(centroids, feats, pids, momentum))
    assert torch.equal(centroids, before)
    torch.testing.assert_close(got[[3, 4]], before[[3, 4]], rtol=0, atol=0)
    if 0 < momentum < 1:
        # Order matters for an identity seen several times, and the update differs from 'hard'.
        flipped = sequential_centroid_update(centroids, feats.flip(0), pids.flip(0), momentum)
        assert not torch.allclose(flipped[2], got[2])
        assert not torch.allclose(hard_centroid_update(centroids, feats, pids, momentum), got)


def test_memory_update_switch_selects_the_update():
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(6, 8, generator=g)
    out = type("Out", (), {"embedding": emb, "cls_scores": [torch.randn(6, 3, generator=g)]})()
    pids = torch.tensor([0, 1, 2, 0, 1, 2])
    for update, fn in (("hard", hard_centroid_update), ("all", sequential_centroid_update)):
        cfg = load_cfg(None, ["MODEL.METHOD", "pcl", "MODEL.MEMORY_UPDATE", update], freeze=False)
        criterion = build_pcl_loss(cfg, num_classes=3)
        bank = criterion.build_memory(torch.randn(6, 8, generator=g), pids)
        criterion.update_memory(out, pids)
        torch.testing.assert_close(criterion.centroids, fn(bank, emb, pids, 0.2))
    with pytest.raises(ConfigError, match="MODEL.MEMORY_UPDATE"):
        load_cfg(None, ["MODEL.METHOD", "pcl", "MODEL.MEMORY_UPDATE", "easy"])


def test_pid_centroids_match_brute_force_mean():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(20, 6)).astype(np.float32)
    pids = np.array([0, 1, 2, 3] * 5)
    rng.shuffle(pids)
    got = pid_centroids(torch.from_numpy(feats), torch.from_numpy(pids), num_classes=4)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for k in range(4):
        mean = unit[pids == k].mean(axis=0)
        np.testing.assert_allclose(got[k].numpy(), mean / np.linalg.norm(mean), rtol=1e-5)
    with pytest.raises(ValueError, match="no feature"):
        pid_centroids(torch.from_numpy(feats), torch.from_numpy(pids), num_classes=5)


def test_built_pcl_loss_terms_and_memory():
    cfg = load_cfg(None, ["MODEL.METHOD", "pcl", "MODEL.ID_LOSS_WEIGHT", "0.5"], freeze=False)
    criterion = build_pcl_loss(cfg, num_classes=3)
    assert isinstance(criterion, PCLLoss)
    assert (criterion.temperature, criterion.momentum) == (0.05, 0.2)
    g = torch.Generator().manual_seed(3)
    emb, scores = torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g)
    out = type("Out", (), {"embedding": emb, "cls_scores": [scores]})()
    pids = torch.tensor([0, 1, 2, 2])
    with pytest.raises(RuntimeError, match="empty"):
        criterion(out, pids)
    bank = criterion.build_memory(torch.randn(6, 8, generator=g), torch.tensor([0, 1, 2] * 2))
    terms = criterion(out, pids)
    assert set(terms) == {"pcl", "id"}
    torch.testing.assert_close(terms["pcl"], pcl_loss(emb, bank, pids, 0.05))
    smoothed = F.cross_entropy(scores, pids, label_smoothing=0.1)
    torch.testing.assert_close(terms["id"], 0.5 * smoothed)
    criterion.update_memory(out, pids)
    torch.testing.assert_close(criterion.centroids, hard_centroid_update(bank, emb, pids, 0.2))
    cfg.MODEL.ID_LOSS_WEIGHT = 0.0
    no_id = build_pcl_loss(cfg, num_classes=3)
    no_id.build_memory(torch.randn(3, 8, generator=g), torch.tensor([0, 1, 2]))
    assert set(no_id(out, pids)) == {"pcl"}


# ----------------------------------------------------------------------------------------------
# Config, head variant and frozen patch embedding.
def test_pcl_config_resolves_and_checks_the_eval_feature():
    assert load_cfg(None, ["MODEL.METHOD", "pcl"]).TEST.NECK_FEAT == "after"
    assert load_cfg(None, []).TEST.NECK_FEAT == "before"
    with pytest.raises(ConfigError, match="NECK_FEAT"):
        load_cfg(None, ["MODEL.METHOD", "pcl", "TEST.NECK_FEAT", "before"])
    with pytest.raises(ConfigError, match="MEMORY_MOMENTUM"):
        load_cfg(None, ["MODEL.METHOD", "pcl", "MODEL.MEMORY_MOMENTUM", "1.5"])


def _pcl_model(name="ViT-T-16-test", num_classes=5, **overrides):
    torch.manual_seed(0)
    cfg = make_cfg(name, MODEL__METHOD="pcl", TEST__NECK_FEAT="after", **overrides)
    return build_model(cfg, num_classes, 3, 2)


def test_pcl_head_one_classifier_on_the_post_bn_concatenation():
    model = _pcl_model()
    dims = get_arch("ViT-T-16-test").feature_dims()
    width = dims.final + dims.proj
    big = get_arch("ViT-B-16").feature_dims()
    assert big.final + big.proj == 1280  # the paper's 768 + 512
    assert model.feat_dim == width and not model.has_text
    assert model.classifier.weight.shape == (5, width) and model.classifier.bias is None
    keys = model.state_dict().keys()
    assert not any(
        k.startswith(("classifier_proj", "prompt_learner", "text_encoder")) for k in keys
    )
    x = torch.randn(4, 3, 256, 128)
    out = model(x)
    f, fp = out.feats[1], out.feats[2]
    post_bn = torch.cat([model.bottleneck(f), model.bottleneck_proj(fp)], 1)
    torch.testing.assert_close(out.embedding, post_bn)
    assert len(out.cls_scores) == 1
    torch.testing.assert_close(out.cls_scores[0], model.classifier(post_bn))
    model.eval()
    with torch.no_grad():
        feats = model.image_features(x)
        want = torch.cat([model.bottleneck(feats.final), model.bottleneck_proj(feats.proj)], 1)
        got = model.encode_image(x)
    assert got.shape == (4, width)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, torch.cat([feats.final, feats.proj], 1))
    with pytest.raises(ValueError, match="NECK_FEAT"):
        build_model(make_cfg(MODEL__METHOD="pcl"), 5, 3, 2)


def test_frozen_patch_embedding_does_not_move():
    model = _pcl_model(MODEL__FREEZE_PATCH_EMBED=True)
    model.set_trainable("image")
    assert not model.image_encoder.conv1.weight.requires_grad
    cfg = make_cfg(SOLVER__STAGE2__OPTIMIZER_NAME="SGD", SOLVER__STAGE2__BASE_LR=0.1)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert "image_encoder.conv1.weight" not in dict(params)
    opt = build_optimizer(cfg, params, stage=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(torch.randn(4, 3, 256, 128))
    (out.embedding.pow(2).sum() + out.cls_scores[0].sum()).backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(after["image_encoder.conv1.weight"], before["image_encoder.conv1.weight"])
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert not torch.equal(
        after["image_encoder.positional_embedding"], before["image_encoder.positional_embedding"]
    )
    # Control: without the key the patch embedding trains.
    free = _pcl_model()
    free.set_trainable("image")
    assert free.image_encoder.conv1.weight.requires_grad
    with pytest.raises(ValueError, match="FREEZE_PATCH_EMBED"):
        _pcl_model("RN-T-test", MODEL__FREEZE_PATCH_EMBED=True)


def test_shipped_pcl_config_carries_the_official_recipe():
    cfg = load_cfg(os.path.join(ROOT, "configs", "person", "vit_pcl.yml"))
    m, s2 = cfg.MODEL, cfg.SOLVER.STAGE2
    assert (m.NAME, m.METHOD, m.FREEZE_PATCH_EMBED) == ("ViT-B-16", "pcl", True)
    assert (m.PCL_LOSS_WEIGHT, m.ID_LOSS_WEIGHT, m.PCL_TEMPERATURE) == (1.0, 0.25, 0.05)
    assert m.MEMORY_MOMENTUM == 0.2 and m.IF_LABELSMOOTH and list(m.STRIDE_SIZE) == [16, 16]
    # Batch 256 = 32 identities x 8 images.
    assert s2.IMS_PER_BATCH == 256 and cfg.DATALOADER.NUM_INSTANCE == 8
    # A fixed 200 iterations per epoch (the official SOLVER.ITERS): 12,000 in 60 epochs.
    assert cfg.DATALOADER.ITERS_PER_EPOCH * s2.MAX_EPOCHS == 12000
    assert (s2.OPTIMIZER_NAME, s2.BASE_LR, s2.MOMENTUM) == ("SGD", 3.5e-4, 0.9)
    assert s2.WEIGHT_DECAY == s2.WEIGHT_DECAY_BIAS == 5e-4
    assert s2.BIAS_LR_FACTOR == 1.0 and not s2.LARGE_FC_LR
    assert (s2.MAX_EPOCHS, list(s2.STEPS), s2.GAMMA) == (60, [30, 50], 0.1)
    assert (s2.WARMUP_ITERS, s2.WARMUP_FACTOR, s2.WARMUP_METHOD) == (10, 0.1, "linear")
    assert list(cfg.INPUT.SIZE_TRAIN) == [256, 128] and list(cfg.INPUT.PIXEL_MEAN) == [0.5] * 3
    # PCL-CLIP's transforms: bicubic test resize, Zhong's constant-fill random erasing.
    assert (cfg.INPUT.TEST_INTERPOLATION, cfg.INPUT.RE_MODE, cfg.INPUT.RE_PROB) == (
        "bicubic",
        "constant",
        0.5,
    )
    assert cfg.TEST.NECK_FEAT == "after" and cfg.TEST.FEAT_NORM and cfg.TEST.IMS_PER_BATCH == 64


# ----------------------------------------------------------------------------------------------
# End to end on tiny synthetic data.
def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class _SpyPCL(PCLCLIP):
    """PCL-CLIP that keeps a copy of the memory bank it builds at the start of each epoch."""

    banks: list = []

    def start_epoch(self, epoch):
        # The bank comes from the train set (6 ids x 2 cameras x 2 images) in order.
        assert len(self.data.train_eval.dataset) == 24
        assert isinstance(self.data.train_eval.sampler, torch.utils.data.SequentialSampler)
        replaced = super().start_epoch(epoch)
        self.banks.append(self.criterion.centroids.clone())
        return replaced


@pytest.fixture
def spy_pcl():
    """``MODEL.METHOD pcl_spy``: the PCL recipe with :class:`_SpyPCL`'s bank record."""
    _SpyPCL.banks = []
    register_recipe("pcl_spy")(_SpyPCL)
    yield _SpyPCL.banks
    RECIPES.remove("pcl_spy")


def test_pcl_trains_end_to_end_and_rebuilds_the_bank_every_epoch(tmp_path, spy_pcl):
    banks = spy_pcl
    out = tmp_path / "run"
    extra = [*PCL, "MODEL.METHOD", "pcl_spy"]
    summary = train_clipreid.main(_opts(tmp_path / "data", out, s2=3, extra=extra))
    records = _records(out)
    assert [r["epoch"] for r in records if "memory_bank" in r] == [1, 2, 3]
    train_rows = [r for r in records if "loss" in r]
    assert [r["epoch"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        assert {"pcl", "id"} <= set(r) and "tri" not in r and "i2tce" not in r
        assert r["loss"] == pytest.approx(r["pcl"] + r["id"], rel=1e-6)
    # One bank per epoch, from the current weights (so they differ), unit-norm [C, D].
    assert len(banks) == 3 and not torch.allclose(banks[0], banks[1])
    assert all(b.shape == banks[0].shape for b in banks)
    torch.testing.assert_close(banks[0].norm(dim=1), torch.ones(banks[0].shape[0]))
    # Scheduler stepped as at the end of each epoch: epoch k trains with the lr of k - 1
    # (warmup 1 epoch from factor 0.1 of 1e-3).
    assert [r["lr"] for r in train_rows] == pytest.approx([1e-4, 1e-3, 1e-3])
    weights = out / "ViT-T-16-test_3.pth"
    sd = torch.load(weights, weights_only=True)
    assert "classifier_proj.weight" not in sd
    # test_clipreid.py evaluates the PCL checkpoint to the logged numbers.
    result = test_clipreid.main(
        ["--config_file", str(out / "config.yaml"), "TEST.WEIGHT", str(weights)]
        + ["OUTPUT_DIR", str(tmp_path / "test")]
    )
    assert result["mAP"] == pytest.approx(summary["mAP"], abs=1e-6)


def test_pcl_kill_and_resume_gives_the_same_weights(tmp_path):
    """SIGKILL after a PCL-CLIP step mid-way through epoch 2, then --resume."""
    data = tmp_path / "data"
    assert run_in_fork(_opts(data, tmp_path / "full", s2=2, extra=PCL)) == 0
    killed = _opts(data, tmp_path / "killed", s2=2, extra=PCL)
    assert run_in_fork(killed, "step:5") == -9  # 3 steps an epoch: epoch 2, step 2
    assert run_in_fork([*killed, "SOLVER.RESUME", "auto"]) == 0
    a = torch.load(tmp_path / "full" / "ViT-T-16-test_2.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "ViT-T-16-test_2.pth", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_checkpoint_of_the_other_head_names_the_method_to_set():
    pcl = _pcl_model()
    clipreid = build_model(make_cfg("ViT-T-16-test"), 5, 3, 2)
    with pytest.raises(CheckpointMismatchError, match="MODEL.METHOD 'pcl'"):
        load_reid_checkpoint(clipreid, pcl.state_dict())
    with pytest.raises(CheckpointMismatchError, match="MODEL.METHOD 'clipreid'"):
        load_reid_checkpoint(pcl, clipreid.state_dict())
    load_reid_checkpoint(_pcl_model(), pcl.state_dict())  # same head: loads


def test_pcl_with_camera_sie_trains_the_sie_table(tmp_path):
    """The official PCL-CLIP SIE path never ran (undefined variables); here SIE gets gradients."""
    model = _pcl_model(MODEL__SIE_CAMERA=True, MODEL__SIE_COE=1.0)
    model.set_trainable("image")
    model.train()
    criterion = PCLLoss(1.0, 0.25, 0.05, 0.2, 0.1, num_classes=5)
    feats = torch.nn.functional.normalize(torch.randn(5, model.feat_dim), dim=1)
    criterion.build_memory(feats, torch.arange(5))
    images = torch.randn(4, 3, 256, 128)
    pids, camids = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 0, 2])
    out = model(images, camids=camids)
    sum(criterion(out, pids).values()).backward()
    grad = model.cv_embed.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert grad[1].abs().sum() == 0  # camera 1 is not in the batch
    # And a whole tiny run with camera SIE trains end to end.
    extra = ["MODEL.METHOD", "pcl", "MODEL.SIE_CAMERA", "True", "MODEL.SIE_COE", "1.0"]
    train_clipreid.main(_opts(tmp_path / "data", tmp_path / "out", s1=1, s2=1, extra=extra))
    weights = torch.load(tmp_path / "out" / "ViT-T-16-test_1.pth", weights_only=True)
    assert "cv_embed" in weights
