"""tools/attention.py (attention rollout) and tools/tsne.py on a tiny trained model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_clipreid
from configs.config import load_cfg
from datasets.build import build_datasets
from datasets.image_dataset import read_image
from datasets.transforms import build_test_transform
from model.loading import build_model_from_checkpoint
from tests.conftest import tiny_run_opts
from tools import attention, search, tsne
from utils.drawing import GAP


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny CLIP-ReID run (1 + 1 epochs on the synthetic set): config, weights, model, data."""
    root = tmp_path_factory.mktemp("visual")
    out = root / "run"
    train_clipreid.main(tiny_run_opts(root / "data", out, s1=1, s2=1))
    config, weights = str(out / "config.yaml"), str(out / "ViT-T-16-test_1.pth")
    cfg = load_cfg(config)
    dataset, _ = build_datasets(cfg)
    model = build_model_from_checkpoint(cfg, weights)
    base = ["--config-file", config, "--weights", weights]
    return {"config": config, "cfg": cfg, "model": model, "dataset": dataset, "base": base}


def _images(cfg, paths):
    i = cfg.INPUT
    tf = build_test_transform(i.SIZE_TEST, i.PIXEL_MEAN, i.PIXEL_STD)
    return torch.stack([tf(read_image(str(p))) for p in paths])


# ----------------------------------------------------------------------------------------------
# Attention rollout
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_weights_equal_torch_multihead_attention(batch_first):
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    ours = attention.attention_weights(attn, x)
    _, ref = attn(x, x, x, need_weights=True, average_attn_weights=False)
    assert ours.shape == (3, 4, 5, 5)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_rollout_hand_worked():
    # Block 1: heads [[1, 0], [0, 1]] and [[0, 1], [0, 1]] average to [[.5, .5], [0, 1]]; + I and
    # row-normalised: [[.75, .25], [0, 1]]. Block 2: [[0, 1], [1, 0]] -> [[.5, .5], [.5, .5]].
    # Rollout = A2 @ A1 = [[.375, .625], [.375, .625]].
    w1 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    w2 = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    rollout = attention.attention_rollout([w1, w2])
    torch.testing.assert_close(rollout, torch.tensor([[[0.375, 0.625], [0.375, 0.625]]]))
    with pytest.raises(ValueError, match="at least one"):
        attention.attention_rollout([])


def test_rollout_of_the_trained_model_equals_a_block_by_block_reference(run):
    model, cfg = run["model"], run["cfg"]
    paths = [r.path for r in run["dataset"].query[:3]]
    images = _images(cfg, paths)
    encoder = model.image_encoder
    with torch.no_grad():
        plain = model.image_features(images)
        rollout, maps = attention.image_attention(model, images)
        hooked_again = model.image_features(images)  # hooks removed, nothing changed
        # Reference: run the blocks by hand and ask torch's attention for its weights.
        x = encoder.embed(images)
        ref = None
        for block in encoder.transformer.resblocks:
            y = block.ln_1(x)
            _, w = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
            a = w.mean(1) + torch.eye(x.shape[1])
            a = a / a.sum(-1, keepdim=True)
            ref = a if ref is None else a @ ref
            x = block(x)
    for got, want in zip(plain, hooked_again, strict=True):
        assert torch.equal(got, want)
    assert len(maps) == len(encoder.transformer.resblocks) == 2
    torch.testing.assert_close(rollout, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(3, encoder.num_tokens))


def test_attention_tool_writes_the_grid(run, tmp_path):
    query_dir = str(run["dataset"].query[0].path).rsplit("/", 1)[0]
    out = tmp_path / "att.png"
    argv = [*run["base"], "--images", query_dir, "--max-images", "4", "--tile-height", "48"]
    result = attention.main([*argv, "--out", str(out)])
    assert len(result["paths"]) == 4
    h, w = run["cfg"].INPUT.SIZE_TEST
    grid = run["model"].image_encoder.grid
    rollout = result["rollout"]
    torch.testing.assert_close(rollout.sum(-1), torch.ones(rollout.shape[:2]))
    assert torch.equal(result["maps"], rollout[:, 0, 1:].reshape(4, *grid))
    tile_w = round(48 * w / h)
    with Image.open(out) as img:
        assert img.size == (GAP + 4 * (tile_w + GAP), GAP + 2 * (48 + GAP))
        # The top row is the image itself, the bottom row differs (the map is blended in).
        top = np.asarray(img)[GAP : GAP + 48, GAP : GAP + tile_w].astype(int)
        bottom = np.asarray(img)[2 * GAP + 48 : 2 * GAP + 96, GAP : GAP + tile_w].astype(int)
    with Image.open(result["paths"][0]) as src:
        expected = np.asarray(src.convert("RGB").resize((tile_w, 48), Image.BILINEAR)).astype(int)
    assert np.abs(top - expected).max() <= 1
    assert np.abs(bottom - expected).mean() > 10


def test_attention_tool_errors(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        attention.main(["--help"])
    assert exit_.value.code == 0 and "--images" in capsys.readouterr().out
    with pytest.raises(search.SearchError, match=r"--images .*nowhere.* does not exist"):
        attention.main([*run["base"], "--images", str(tmp_path / "nowhere"), "--out", "x.png"])
    rn_cfg = load_cfg(None, ["MODEL.NAME", "RN-T-test", "MODEL.PRETRAIN_TAG", "none"])
    from model.build import build_model

    rn = build_model(rn_cfg, 3, 1, 1, load_pretrained=False)
    with pytest.raises(search.SearchError, match="need a ViT image encoder"):
        attention.image_attention(rn.eval(), torch.zeros(1, 3, 256, 128))


def test_attention_of_an_sie_model_without_ids_uses_the_fallback():
    from model.build import build_model

    cfg = load_cfg(None, ["MODEL.NAME", "ViT-T-16-test", "MODEL.PRETRAIN_TAG", "none",
                          "MODEL.SIE_CAMERA", "True", "INPUT.SIZE_TEST", "[64, 32]",
                          "INPUT.SIZE_TRAIN", "[64, 32]"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, 3, 4, 1, load_pretrained=False).eval()
    with torch.no_grad():  # every camera row the same: the mean row is camera 0's
        model.cv_embed.copy_(model.cv_embed[0].expand_as(model.cv_embed) * 5)
    images = torch.randn(2, 3, 64, 32)
    cam0, _ = attention.image_attention(model, images, camids=torch.zeros(2, dtype=torch.long))
    mean, _ = attention.image_attention(model, images, sie_fallback="mean")
    none, _ = attention.image_attention(model, images)
    torch.testing.assert_close(mean, cam0)
    assert not torch.allclose(none, cam0, atol=1e-4)
    assert model.missing_sie_ids(None, None) == ["camids"]
    assert model.missing_sie_ids(torch.zeros(1), None) == []


def test_attention_tool_on_an_sie_model_without_camid(tmp_path, caplog):
    from configs.config import save_cfg
    from model.build import build_model

    opts = ["MODEL.NAME", "ViT-T-16-test", "MODEL.PRETRAIN_TAG", "none", "MODEL.SIE_CAMERA",
            "True", "INPUT.SIZE_TEST", "[64, 32]", "INPUT.SIZE_TRAIN", "[64, 32]"]  # fmt: skip
    cfg = load_cfg(None, opts)
    torch.manual_seed(1)
    model = build_model(cfg, 3, 4, 1, load_pretrained=False).eval()
    config, weights = tmp_path / "config.yaml", tmp_path / "w.pth"
    save_cfg(cfg, str(config))
    torch.save(model.state_dict(), weights)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 32, 3), np.uint8)).save(folder / f"{i}.png")
    argv = ["--config-file", str(config), "--weights", str(weights), "--images", str(folder)]
    with caplog.at_level("WARNING"):
        result = attention.main([*argv, "--out", str(tmp_path / "a.png")])
    assert "without camids: using the SIE fallback 'mean'" in caplog.text
    images = _images(cfg, result["paths"])
    mean, _ = attention.image_attention(model, images, sie_fallback="mean")
    none, _ = attention.image_attention(model, images)
    torch.testing.assert_close(result["rollout"], mean)
    assert not torch.allclose(result["rollout"], none, atol=1e-5)
    # One camera id per image, from the file names 0.png and 1.png.
    per_image = attention.main(
        [*argv, "--camid-pattern", r"(\d)\.png", "--out", str(tmp_path / "b.png")]
    )
    cams, _ = attention.image_attention(model, images, camids=torch.tensor([0, 1]))
    torch.testing.assert_close(per_image["rollout"], cams)


# ----------------------------------------------------------------------------------------------
# t-SNE
def test_tsne_rows_equal_the_extracted_features(run, tmp_path):
    out = tmp_path / "tsne.png"
    result = tsne.main(
        [*run["base"], "--pids", "4", "0", "2", "--max-per-id", "3", "--out", str(out)]
    )
    inputs, coords = result["inputs"], result["coords"]
    assert inputs.kind == "text"  # auto: the CLIP-ReID model has text features
    assert inputs.anchor_pids.tolist() == [0, 2, 4]
    train = {r.path: r.pid for r in run["dataset"].train}
    counts = {p: sum(1 for v in train.values() if v == p) for p in (0, 2, 4)}
    assert {p: int((inputs.pids == p).sum()) for p in (0, 2, 4)} == {
        p: min(3, n) for p, n in counts.items()
    }
    assert [train[p] for p in inputs.paths] == inputs.pids.tolist()
    # Image rows: normalised f_proj of each image; anchor rows: normalised text features.
    model = run["model"]
    with torch.no_grad():
        proj = model.image_features(_images(run["cfg"], inputs.paths)).proj
        text = model.encode_text(torch.tensor([0, 2, 4]))
    np.testing.assert_allclose(inputs.feats, F.normalize(proj, dim=1).numpy(), atol=1e-5)
    np.testing.assert_allclose(inputs.anchors, F.normalize(text, dim=1).numpy(), atol=1e-5)
    # The embedding is t-SNE of exactly these rows (same seed and settings).
    direct = np.concatenate([F.normalize(proj, dim=1).numpy(), F.normalize(text, dim=1).numpy()])
    np.testing.assert_allclose(coords, tsne.embed_tsne(direct, seed=0), atol=1e-3)
    # The drawn points are the embedding: per identity its images, then its star.
    fig = tsne.tsne_figure(inputs, coords)
    offsets = [c.get_offsets() for c in fig.axes[0].collections]
    n_img = len(inputs.feats)
    for k, pid in enumerate([0, 2, 4]):
        np.testing.assert_allclose(offsets[2 * k], coords[:n_img][inputs.pids == pid])
        np.testing.assert_allclose(offsets[2 * k + 1], coords[n_img + k : n_img + k + 1])
    with Image.open(out) as img:
        assert img.size == (640, 560)


def test_tsne_centroid_anchors_equal_the_mean_features(run, tmp_path):
    out = tmp_path / "c.png"
    argv = [*run["base"], "--num-ids", "3", "--seed", "5", "--anchors", "centroids"]
    inputs = tsne.main([*argv, "--out", str(out)])["inputs"]
    assert inputs.kind == "centroids" and len(inputs.anchor_pids) == 3
    with torch.no_grad():
        feats = run["model"].encode_image(_images(run["cfg"], inputs.paths)).double().numpy()
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(inputs.feats, feats, atol=1e-5)
    for k, pid in enumerate(inputs.anchor_pids):
        mean = feats[inputs.pids == pid].mean(0)
        np.testing.assert_allclose(inputs.anchors[k], mean / np.linalg.norm(mean), atol=1e-5)
    # The same seed draws the same identities.
    again = tsne.main([*argv, "--out", str(out)])["inputs"]
    assert again.anchor_pids.tolist() == inputs.anchor_pids.tolist()
    assert out.stat().st_size > 1000


def test_tsne_errors(run, tmp_path):
    with pytest.raises(search.SearchError, match=r"--pids \[99\] are not training labels"):
        tsne.main([*run["base"], "--pids", "99", "--out", str(tmp_path / "x.png")])
    with pytest.raises(search.SearchError, match="--num-ids must be in 1..6"):
        tsne.main([*run["base"], "--num-ids", "7", "--out", str(tmp_path / "x.png")])
    # The baseline has no text side: text anchors are refused, auto falls back to centroids.
    argv = [*run["base"], "MODEL.METHOD", "baseline", "--num-ids", "2"]
    with pytest.raises(search.SearchError, match="use --anchors centroids"):
        tsne.main([*argv, "--anchors", "text", "--out", str(tmp_path / "x.png")])
    assert tsne.main([*argv, "--out", str(tmp_path / "x.png")])["inputs"].kind == "centroids"
