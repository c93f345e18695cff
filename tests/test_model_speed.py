"""Speed options of the image encoder change neither values nor names.

MODEL.GRAD_CHECKPOINTING (activation checkpointing, ViT and ResNet, BatchNorm statistics
included), MODEL.CHANNELS_LAST and ``compile_image_encoder`` (MODEL.COMPILE; torch.compile:
inductor where a C compiler exists, plus the AOTAutograd path for training gradients) are each
compared with the plain model built from the same seed.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from loss.build import build_loss
from model import build_model
from tests.clip_fixtures import make_cfg

ARCHS = ("ViT-T-16-test", "RN-T-test")
NUM_CLASSES = 4


def _pair(name: str, **overrides: object):
    """(plain model, model with ``overrides``), same seed, training mode, stage-2 trainable."""
    models = []
    for extra in ({}, overrides):
        torch.manual_seed(0)
        model = build_model(make_cfg(name, **extra), NUM_CLASSES, 1, 1)
        model.set_trainable("image")
        models.append(model.train())
    return models


def _batch(model: nn.Module, size=(256, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, *size, generator=gen)
    return images.to(memory_format=model.input_memory_format), torch.arange(8) // 2


def _stage2_loss(model: nn.Module, images: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """ID + triplet + i2tce loss of one batch, as ``loss.build`` builds them."""
    criterion = build_loss(make_cfg(), NUM_CLASSES)
    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(NUM_CLASSES, model.feature_dims.proj, generator=gen, dtype=images.dtype)
    return sum(criterion(model(images), pids, text_bank=bank).values())


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(plain, other, atol, rtol=0.0, dtype=torch.float32):
    """Same loss, parameter gradients and buffers after one forward/backward of both models."""
    plain.to(dtype)
    other.to(dtype)
    images, pids = _batch(plain)
    images = images.to(dtype)
    loss_a = _stage2_loss(plain, images, pids)
    loss_b = _stage2_loss(other, images.to(memory_format=other.input_memory_format), pids)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_b, loss_a, atol=atol, rtol=rtol)
    ga, gb = _grads(plain), _grads(other)
    assert ga.keys() == gb.keys() and all(g is not None for g in ga.values())
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=atol, rtol=rtol, msg=name)
    buffers = dict(plain.named_buffers())
    for name, value in other.named_buffers():  # BatchNorm running statistics and counters
        torch.testing.assert_close(value, buffers[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("name", ARCHS)
def test_grad_checkpointing_same_loss_grads_and_bn_stats(name):
    plain, ckpt = _pair(name, MODEL__GRAD_CHECKPOINTING=True)
    assert ckpt.image_encoder.grad_checkpointing and not plain.image_encoder.grad_checkpointing
    enc = ckpt.image_encoder
    block = enc.transformer.resblocks[0] if name.startswith("ViT") else enc.layer1[0]
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    _assert_same_step(plain, ckpt, atol=1e-6, rtol=1e-5)  # the same kernels, run twice
    assert len(calls) == 2  # forward, then recomputed in the backward pass
    if name.startswith("RN"):
        bn = enc.layer1[0].bn1
        assert int(bn.num_batches_tracked) == 1 and bn.track_running_stats  # updated once


def test_grad_checkpointing_inactive_without_grad():
    _, ckpt = _pair("RN-T-test", MODEL__GRAD_CHECKPOINTING=True)
    calls = []
    ckpt.image_encoder.layer1[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        ckpt(_batch(ckpt)[0])
    assert len(calls) == 1


@pytest.mark.parametrize("name", ARCHS)
def test_channels_last_same_values_and_keys(name):
    plain, nhwc = _pair(name, MODEL__CHANNELS_LAST=True)
    assert plain.input_memory_format == torch.contiguous_format
    assert nhwc.input_memory_format == torch.channels_last
    weights = [p for p in nhwc.image_encoder.parameters() if p.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not nhwc.image_encoder.conv1.weight.is_contiguous()
    assert list(nhwc.state_dict()) == list(plain.state_dict())
    images = _batch(plain)[0]
    with torch.no_grad():
        want = plain.eval()(images)
        got = nhwc.eval()(images.to(memory_format=torch.channels_last))
    # fp32 NHWC kernels round differently (BatchNorm statistics above all): features agree to
    # ~1e-5; in fp64 the two layouts give the same loss, gradients and BN statistics.
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    _assert_same_step(plain.train(), nhwc.train(), atol=1e-10, dtype=torch.float64)
    assert nhwc.image_encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # A channels-last checkpoint loads into the plain layout.
    plain.load_state_dict(nhwc.state_dict())
    assert plain.image_encoder.conv1.weight.is_contiguous()


@pytest.mark.parametrize("name", ARCHS)
def test_compiled_training_step_matches_eager(name):
    """The AOTAutograd path of torch.compile (forward and backward graphs, no C compiler)."""
    plain, compiled = _pair(name)
    counter = CompileCounterWithBackend("aot_eager")
    compiled.compile_image_encoder(backend=counter)
    _assert_same_step(plain, compiled, atol=1e-5, rtol=1e-4)
    assert counter.frame_count >= 1
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor needs a C compiler (no `cc`)")
def test_inductor_compiled_encoder_matches_eager_and_keeps_checkpoint_keys():
    """The default torch.compile backend (inductor-generated C++ here) gives the eager features
    (a small input keeps the CPU compilation short); the state dict has no ``_orig_mod.``
    prefix. ``build_model`` leaves MODEL.COMPILE to the training entry (traceable for export)."""
    size = [32, 32]
    cfg = make_cfg("ViT-T-16-test", INPUT__SIZE_TRAIN=size, INPUT__SIZE_TEST=size)
    torch.manual_seed(0)
    plain = build_model(cfg, NUM_CLASSES, 1, 1).eval()
    cfg.MODEL.COMPILE = True
    torch.manual_seed(0)
    compiled = build_model(cfg, NUM_CLASSES, 1, 1).eval()
    assert compiled.image_encoder._compiled_call_impl is None
    compiled.compile_image_encoder()
    assert compiled.image_encoder._compiled_call_impl is not None
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain(images)
        got = compiled(images)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    keys = list(compiled.state_dict())
    assert keys == list(plain.state_dict()) and not any("_orig_mod" in k for k in keys)
