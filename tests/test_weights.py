"""Pretrained CLIP weights: local files (archive / state dict), SHA-256, offline errors, tags."""

from __future__ import annotations

import hashlib
import logging
import urllib.error
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from model import build_model, get_arch
from model import weights as W
from model.clip.arch import create_clip
from tests.clip_fixtures import make_cfg, random_openai_state_dict, save_torchscript_archive
from utils.checkpoint import CheckpointFormatError

ARCH = get_arch("ViT-T-16-test")


@pytest.fixture(scope="module")
def tiny_sd():
    return random_openai_state_dict(ARCH, seed=11)


def _features(cfg, x):
    torch.manual_seed(0)  # heads are random; the same seed gives the same heads
    model = build_model(cfg, 3, 1, 1).eval()
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(torch.tensor([0, 2]))


def test_torchscript_archive_and_plain_state_dict_give_same_model(tmp_path, tiny_sd, monkeypatch):
    archive = save_torchscript_archive(ARCH, tiny_sd, tmp_path / "ViT-T.pt")
    monkeypatch.setenv(W.TRUST_ENV, "1")  # a home-made archive: not an OpenAI release
    loaded = W.load_openai_state_dict(archive)
    assert set(loaded) == set(tiny_sd)  # the three integer entries are dropped
    for key, value in tiny_sd.items():
        torch.testing.assert_close(loaded[key].float(), value, msg=key)

    plain = tmp_path / "plain.pt"
    with_ints = dict(
        tiny_sd,
        input_resolution=torch.tensor(224),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    torch.save(with_ints, plain)
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_sd.items()}}, nested)

    x = torch.randn(2, 3, 256, 128)
    results = [
        _features(make_cfg(MODEL__PRETRAIN_PATH=str(p), MODEL__PRETRAIN_TAG="openai"), x)
        for p in (archive, plain, nested)
    ]
    for image, text in results[1:]:
        torch.testing.assert_close(image, results[0][0])
        torch.testing.assert_close(text, results[0][1])
    # The weights really arrived: a random-init model gives other features.
    random_image, _ = _features(make_cfg(), x)
    assert not torch.allclose(random_image, results[0][0])


def test_torchscript_archive_needs_a_known_hash_or_trust(tmp_path, tiny_sd, monkeypatch):
    archive = save_torchscript_archive(ARCH, tiny_sd, tmp_path / "ViT-T.pt")
    jit_loads = []
    real_jit_load = torch.jit.load
    monkeypatch.setattr(
        torch.jit, "load", lambda *a, **k: jit_loads.append(a) or real_jit_load(*a, **k)
    )
    monkeypatch.delenv(W.TRUST_ENV, raising=False)
    cfg = make_cfg(MODEL__PRETRAIN_PATH=str(archive), MODEL__PRETRAIN_TAG="openai")
    with pytest.raises(CheckpointFormatError) as err:
        build_model(cfg, 3, 1, 1)
    msg = str(err.value)
    assert str(archive) in msg and W.sha256_file(archive) in msg and W.TRUST_ENV in msg
    assert jit_loads == []  # refused before anything in it ran
    # The same archive listed as a release (its hash known) loads without trust.
    entry = W.OpenAIWeights(
        f"https://example.invalid/{W.sha256_file(archive)}/ViT-T.pt", W.sha256_file(archive)
    )
    monkeypatch.setitem(W.OPENAI_WEIGHTS, "ViT-T-16-test", entry)
    loaded = W.load_openai_state_dict(archive)
    assert len(jit_loads) == 1 and set(loaded) == set(tiny_sd)
    monkeypatch.delitem(W.OPENAI_WEIGHTS, "ViT-T-16-test")
    with pytest.raises(CheckpointFormatError):
        W.load_openai_state_dict(archive)
    # An explicit trust flag (argument or environment) loads it too.
    assert set(W.load_openai_state_dict(archive, trust=True)) == set(tiny_sd)
    monkeypatch.setenv(W.TRUST_ENV, "1")
    assert set(W.load_openai_state_dict(archive)) == set(tiny_sd)
    assert len(jit_loads) == 3


def test_weights_file_of_the_wrong_kind_names_the_key(tmp_path):
    (tmp_path / "cfg.yml").write_text("MODEL:\n  NAME: RN50\n")
    with pytest.raises(CheckpointFormatError, match=r"MODEL.PRETRAIN_PATH '.*cfg.yml' is a text"):
        W.load_openai_state_dict(tmp_path / "cfg.yml")


def test_loaded_parameters_equal_the_file(tmp_path, tiny_sd):
    torch.save(tiny_sd, tmp_path / "w.pt")
    clip_model = W.create_pretrained_clip(ARCH, "openai", str(tmp_path / "w.pt"))
    state = clip_model.state_dict()
    for key, value in tiny_sd.items():
        torch.testing.assert_close(state[key], value, msg=key)
    assert isinstance(clip_model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_missing_and_unexpected_keys_are_logged(tmp_path, tiny_sd, caplog):
    partial = {k: v for k, v in tiny_sd.items() if k != "ln_final.weight"}
    partial["extra.weight"] = torch.zeros(3)
    torch.save(partial, tmp_path / "w.pt")
    with caplog.at_level(logging.WARNING, logger="model.weights"):
        W.create_pretrained_clip(ARCH, "openai", str(tmp_path / "w.pt"))
    text = caplog.text
    assert "1 missing" in text and "ln_final.weight" in text
    assert "1 unexpected" in text and "extra.weight" in text


def test_wrong_architecture_and_reid_checkpoint_are_rejected(tmp_path):
    rn = random_openai_state_dict(get_arch("RN-T-test"), seed=1)
    with pytest.raises(ValueError, match="MODEL.NAME 'ViT-T-16-test'"):
        W.load_clip_state_dict(create_clip(ARCH), rn, ARCH.name)
    with pytest.raises(ValueError, match="TEST.WEIGHT"):
        W.load_clip_state_dict(create_clip(ARCH), {"image_encoder.proj": torch.zeros(64, 32)})


def test_sha256_file_matches_hashlib(tmp_path):
    data = b"abc" * 100_000
    (tmp_path / "f").write_bytes(data)
    assert W.sha256_file(tmp_path / "f", chunk_size=4096) == hashlib.sha256(data).hexdigest()
    (tmp_path / "g").write_bytes(b"abc")
    # FIPS 180-2 test vector.
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert W.sha256_file(tmp_path / "g") == expected


def test_openai_table_hashes_are_in_the_urls():
    assert W.OPENAI_WEIGHTS["ViT-B-16"].sha256.startswith("5806e77cd80f8b59")
    assert W.OPENAI_WEIGHTS["RN50"].sha256.startswith("afeb0e10f9e5a86d")
    for entry in W.OPENAI_WEIGHTS.values():
        assert entry.url.split("/")[-2] == entry.sha256 and len(entry.sha256) == 64
        assert entry.filename == entry.url.split("/")[-1]


GOOD, BAD = b"good weights", b"corrupted weights"


@pytest.fixture
def fake_entry(monkeypatch):
    sha = hashlib.sha256(GOOD).hexdigest()
    entry = W.OpenAIWeights(f"https://example.invalid/clip/{sha}/Fake.pt", sha)
    monkeypatch.setitem(W.OPENAI_WEIGHTS, "Fake", entry)
    calls = []

    def install(payload: bytes | Exception):
        def fake_download(url: str, dst: Path) -> None:
            calls.append(url)
            if isinstance(payload, Exception):
                raise payload
            Path(dst).write_bytes(payload)

        monkeypatch.setattr(W, "_download", fake_download)
        return calls

    return entry, install


def test_cached_file_with_right_hash_is_reused(tmp_path, fake_entry):
    entry, install = fake_entry
    calls = install(BAD)
    (tmp_path / "Fake.pt").write_bytes(GOOD)
    assert W.download_openai_weights("Fake", tmp_path) == tmp_path / "Fake.pt"
    assert calls == []


def test_cached_file_with_wrong_hash_is_downloaded_again(tmp_path, fake_entry):
    entry, install = fake_entry
    calls = install(GOOD)
    (tmp_path / "Fake.pt").write_bytes(BAD)
    path = W.download_openai_weights("Fake", tmp_path)
    assert calls == [entry.url] and path.read_bytes() == GOOD


def test_download_with_wrong_hash_raises_and_keeps_nothing(tmp_path, fake_entry):
    entry, install = fake_entry
    install(BAD)
    with pytest.raises(RuntimeError, match="SHA-256"):
        W.download_openai_weights("Fake", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_offline_error_names_file_url_and_keys(tmp_path, fake_entry):
    entry, install = fake_entry
    install(urllib.error.URLError("no network"))
    with pytest.raises(W.WeightsUnavailableError) as err:
        W.download_openai_weights("Fake", tmp_path / "cache")
    msg = str(err.value)
    for part in ("Fake.pt", entry.url, str(tmp_path / "cache" / "Fake.pt"), "MODEL.PRETRAIN_PATH"):
        assert part in msg


def test_build_offline_with_openai_tag(tmp_path, monkeypatch):
    def offline(url, dst):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(W, "_download", offline)
    monkeypatch.setenv("CLIPREID_CACHE_DIR", str(tmp_path))
    arch = get_arch("ViT-B-16")
    with pytest.raises(W.WeightsUnavailableError, match="ViT-B-16.pt") as err:
        W.fetch_clip_state_dict(arch, "openai")
    assert W.OPENAI_WEIGHTS["ViT-B-16"].url in str(err.value)


def test_open_clip_tag_offline(monkeypatch):
    def offline(cfg, *args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(W.WeightsUnavailableError) as err:
        W.fetch_clip_state_dict(get_arch("ViT-B-16"), "laion2b_s34b_b88k")
    assert "laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in str(err.value)
    assert "MODEL.PRETRAIN_PATH" in str(err.value)


@pytest.mark.parametrize(
    ("tag", "quick"),
    [
        ("openai", True),
        ("laion2b_s34b_b88k", False),
        ("datacomp_xl_s13b_b90k", False),
        ("dfn2b", True),
        ("none", True),
    ],
)
def test_activation_follows_the_weights(tag, quick, tmp_path, tiny_sd):
    arch = get_arch("ViT-B-16")
    assert W.uses_quick_gelu(arch, tag) is quick
    if tag != "none":
        # With a local file the tag still says which activation the file needs.
        torch.save({"x": torch.zeros(1)}, tmp_path / "w.pt")
        _, flag = W.fetch_clip_state_dict(arch, tag, str(tmp_path / "w.pt"))
        assert flag is quick
    act = create_clip(ARCH, quick_gelu=quick).visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(act, QuickGELU) is quick


def test_tag_and_path_validation(tmp_path):
    with pytest.raises(ValueError, match="dfn2b"):
        W.fetch_clip_state_dict(get_arch("ViT-B-16"), "no_such_tag")
    with pytest.raises(ValueError, match="PRETRAIN_TAG 'none'"):
        W.fetch_clip_state_dict(ARCH, "openai")
    with pytest.raises(ValueError, match="PRETRAIN_PATH"):
        W.fetch_clip_state_dict(ARCH, "none", str(tmp_path / "w.pt"))
    with pytest.raises(FileNotFoundError, match="MODEL.PRETRAIN_PATH"):
        W.fetch_clip_state_dict(ARCH, "openai", str(tmp_path / "missing.pt"))
    assert W.fetch_clip_state_dict(ARCH, "none") == (None, True)
