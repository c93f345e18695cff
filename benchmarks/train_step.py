"""Stage-2 training-step throughput, peak memory and model FLOPs utilisation (MFU).

For each architecture and precision, on the device at hand, two steps on the same batch:

* ours: one CLIP-ReID stage-2 step as the training loop runs it: ``ReIDModel`` forward (train
  mode, BNNecks and both classifiers), the loss as ``loss.build.build_loss`` builds it (ID +
  triplet + i2tce against a cached text bank), backward (through a GradScaler for fp16) and the
  optimizer of ``solver.build_optimizer`` (stage-2 groups, fused on CUDA);
* plain: open_clip's own vision tower (same architecture, same input size) forward, a squared
  mean of its output as the loss, backward and an Adam step over its parameters (the same
  implementation rule): the floor a framework around the tower can reach. Its ratio to ours is
  the framework's overhead. For RN50 the plain tower keeps CLIP's last stride 2 (ours uses 1,
  the ReID design, which costs more FLOPs): the FLOP columns show that difference.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one eager step (matrix
products, convolutions and attention, forward and backward; elementwise work is not counted),
with the CPU attention kernels added (torch counts only the CUDA ones). MFU = counted FLOPs per
second / the device's peak: published dense figures for H200/H100/A100 (bf16/fp16 tensor cores;
fp32 steps use the TF32 figure when matmuls may use TF32, else plain fp32), and on a CPU or an
unknown GPU a measured matrix-product rate in the step's precision (``--peak-tflops`` overrides).
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's resident-set
high-water mark elsewhere (cumulative over the run, so only the first row is that row's own).

Usage:
    python benchmarks/train_step.py --device cuda --archs ViT-B-16 RN50 --dtypes fp32 bf16 fp16
    python benchmarks/train_step.py --device cpu --batch 8 --steps 2 --archs ViT-B-16 --dtypes fp32
    python benchmarks/train_step.py --smoke          # tiny archs, 2 steps, seconds on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import open_clip  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

from configs.defaults import get_cfg_defaults  # noqa: E402
from loss.build import build_loss  # noqa: E402
from model.build import build_model  # noqa: E402
from model.clip.arch import get_arch  # noqa: E402
from solver.optimizer import build_optimizer, implementation_kwargs  # noqa: E402

logger = logging.getLogger("benchmarks.train_step")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOKE_ARCHS = ("ViT-T-16-test", "RN-T-test")
NUM_INSTANCE = 4  # images per identity in a P x K batch (DATALOADER.NUM_INSTANCE)

# Published dense peak TFLOPS (no sparsity), matched against torch.cuda.get_device_name() in
# order (the first matching substring wins): tensor-core bf16/fp16, TF32 and plain fp32.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def _cpu_attention_flops() -> dict:
    """FlopCounterMode formulas for the CPU attention kernels (torch registers the CUDA ones)."""
    aten = torch.ops.aten
    mapping = {}
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:

        def fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)

        mapping[forward] = fwd
    if backward is not None:

        def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[backward] = bwd
    return mapping


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of matrix products, convolutions and attention that ``fn()`` runs (eager).

    Args:
        fn: the work to count (e.g. one forward, or one whole training step).

    Returns:
        The total (a multiply-add counts 2).
    """
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as c:
        fn()
    return int(c.get_total_flops())


# ---------------------------------------------------------------------------------------------
# Peak rate
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """Best rate of an ``n x n`` matrix product in ``dtype`` on ``device`` (TFLOPS).

    Args:
        device: where to measure.
        dtype: element type.
        n: matrix size.

    Returns:
        2 n^3 / the fastest of a few timed products, in 1e12 FLOP/s.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def published_peak(device_name: str, key: str) -> float | None:
    """The published dense peak of a GPU by name (:data:`PEAK_TFLOPS`, first match), or None.

    Args:
        device_name: ``torch.cuda.get_device_name()``, e.g. 'NVIDIA H200'.
        key: 'bf16', 'fp16', 'tf32' or 'fp32'.

    Returns:
        TFLOPS, or None for a GPU the table does not know.
    """
    for pattern, figures in PEAK_TFLOPS:
        if pattern in device_name:
            return figures[key]
    return None


def peak_tflops(device: torch.device, dtype_name: str) -> tuple[float, str]:
    """The device's peak rate for a precision, and where the figure comes from.

    Args:
        device: the benchmark device.
        dtype_name: 'fp32', 'bf16' or 'fp16'.

    Returns:
        (TFLOPS, source): a published dense figure of a known GPU, else a measured matrix-product
        rate.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = dtype_name
        if dtype_name == "fp32" and torch.get_float32_matmul_precision() != "highest":
            key = "tf32"
        peak = published_peak(name, key)
        if peak is not None:
            return peak, f"{name} {key} dense (published)"
    rate = measured_matmul_tflops(device, DTYPES[dtype_name])
    return rate, f"measured {dtype_name} matmul"


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def _autocast(device: torch.device, dtype_name: str) -> contextlib.AbstractContextManager:
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype_name])


def _scaler(device: torch.device, dtype_name: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype_name == "fp16")


class _Bench:
    """A model, its step, and the pieces the measurements need."""

    def __init__(
        self,
        step: Callable[[], torch.Tensor],
        forward: Callable[[], object],
        module: nn.Module,
    ) -> None:
        self.step, self.forward, self.module = step, forward, module


def ours_bench(
    arch_name: str,
    images: torch.Tensor,
    pids: torch.Tensor,
    num_classes: int,
    dtype_name: str,
    options: dict[str, bool],
) -> _Bench:
    """A stage-2 step of the project's model, loss and optimizer (random weights).

    Args:
        arch_name: ``MODEL.NAME``.
        images: [B, 3, H, W] on the device.
        pids: [B] P x K labels on the device.
        num_classes: identities C (classifier and text-bank rows).
        dtype_name: autocast precision ('fp32': none).
        options: ``grad_checkpointing`` / ``channels_last`` / ``compile`` switches.

    Returns:
        The benchmark handle (step returns the loss).
    """
    device = images.device
    cfg = get_cfg_defaults()
    cfg.MODEL.NAME = arch_name
    cfg.MODEL.PRETRAIN_TAG = "none"
    cfg.MODEL.PROMPT_CLASS = "person"
    cfg.INPUT.SIZE_TRAIN = cfg.INPUT.SIZE_TEST = [int(images.shape[2]), int(images.shape[3])]
    cfg.MODEL.GRAD_CHECKPOINTING = options.get("grad_checkpointing", False)
    cfg.MODEL.CHANNELS_LAST = options.get("channels_last", False)
    model = build_model(cfg, num_classes, 1, 1, load_pretrained=False).to(device)
    model.set_trainable("image")
    model.train()
    criterion = build_loss(cfg, num_classes)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, trainable, stage=2)
    scaler = _scaler(device, dtype_name)
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(num_classes, model.feature_dims.proj, generator=gen).to(device)
    batch = images.to(memory_format=model.input_memory_format)

    def forward():
        with _autocast(device, dtype_name):
            return criterion(model(batch), pids, text_bank=bank)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = sum(forward().values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return _Bench(step, forward, model)


def plain_bench(arch_name: str, images: torch.Tensor, dtype_name: str) -> _Bench:
    """open_clip's vision tower alone: forward, squared-mean loss, backward, Adam step.

    Args:
        arch_name: ``MODEL.NAME`` (its open_clip config; random weights, QuickGELU as OpenAI).
        images: [B, 3, H, W] on the device.
        dtype_name: autocast precision.

    Returns:
        The benchmark handle.
    """
    device = images.device
    arch = get_arch(arch_name)
    cfg = arch.open_clip_config()
    h, w = int(images.shape[2]), int(images.shape[3])
    if arch.kind == "vit":
        cfg["vision_cfg"]["image_size"] = (h, w)
    visual = open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=cfg["vision_cfg"],
        text_cfg=cfg["text_cfg"],
        quick_gelu=True,
    ).visual
    if arch.kind == "resnet":
        # CLIP's ResNet (last stride 2): an h/32 x w/32 map; the pool embedding sized to it.
        pool = visual.attnpool
        rows = (h // 32) * (w // 32) + 1
        pool.positional_embedding = nn.Parameter(
            torch.randn(rows, pool.positional_embedding.shape[1]) * 0.02
        )
    visual = visual.to(device).train()
    params = list(visual.parameters())
    impl = implementation_kwargs(torch.optim.Adam, {p.device.type for p in params})
    optimizer = torch.optim.Adam(params, lr=1e-6, **impl)
    scaler = _scaler(device, dtype_name)

    def forward():
        with _autocast(device, dtype_name):
            return visual(images)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = forward().float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return _Bench(step, forward, visual)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def measure(bench: _Bench, device: torch.device, steps: int, warmup: int, compile_: bool) -> dict:
    """FLOPs (one eager forward and one eager step), then timed steps.

    Args:
        bench: the model's handle.
        device: where it runs.
        steps: timed steps.
        warmup: untimed steps before them (after the counted eager step).
        compile_: compile the image encoder (ours) before the warm-up steps.

    Returns:
        ``forward_flops``, ``step_flops``, ``step_s`` (mean), ``peak_mem_gb``.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    forward_flops = count_flops(bench.forward)
    step_flops = count_flops(bench.step)  # also the first warm-up step
    if compile_:
        if hasattr(bench.module, "compile_image_encoder"):
            bench.module.compile_image_encoder()
        else:
            bench.module.compile()
    for _ in range(warmup):
        bench.step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = bench.step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"the step's loss is {loss.item()}")
    return {
        "forward_flops": forward_flops,
        "step_flops": step_flops,
        "step_s": elapsed / steps,
        "peak_mem_gb": _peak_memory_gb(device),
    }


def run_one(
    arch: str,
    dtype_name: str,
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    size: Sequence[int],
    num_classes: int,
    options: dict[str, bool],
    peak_override: float = 0.0,
    with_plain: bool = True,
) -> dict:
    """Both benchmarks for one architecture and precision; one result row.

    Args:
        with_plain: also measure the plain open_clip tower (False: ours only).

    Returns:
        A dict with the setup, ``images_per_s``, ``step_s``, ``peak_mem_gb``, ``forward_flops``,
        ``step_flops``, ``achieved_tflops``, ``mfu`` and (``with_plain``) the same figures of the
        plain tower prefixed ``plain_``, plus ``overhead`` (plain images/s over ours); the peak
        used.
    """
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, int(size[0]), int(size[1]), generator=gen).to(device)
    pids = (torch.arange(batch) // NUM_INSTANCE).to(device)
    if peak_override > 0:
        peak, source = peak_override, "--peak-tflops"
    else:
        peak, source = peak_tflops(device, dtype_name)
    row: dict = {
        "arch": arch,
        "dtype": dtype_name,
        "device": str(device),
        "batch": batch,
        "steps": steps,
        "size": [int(size[0]), int(size[1])],
        "peak_tflops": peak,
        "peak_source": source,
        **{k: bool(v) for k, v in options.items()},
    }
    # One bench on the device at a time: each peak memory is its own.
    builders = {
        "": lambda: ours_bench(arch, images, pids, num_classes, dtype_name, options),
        "plain_": lambda: plain_bench(arch, images, dtype_name),
    }
    if not with_plain:
        del builders["plain_"]
    for prefix, build in builders.items():
        torch.manual_seed(0)
        bench = build()
        m = measure(bench, device, steps, warmup, bool(options.get("compile", False)))
        rate = m["step_flops"] / m["step_s"] / 1e12
        row.update(
            {
                f"{prefix}images_per_s": batch / m["step_s"],
                f"{prefix}step_s": m["step_s"],
                f"{prefix}peak_mem_gb": m["peak_mem_gb"],
                f"{prefix}forward_flops": m["forward_flops"],
                f"{prefix}step_flops": m["step_flops"],
                f"{prefix}achieved_tflops": rate,
                f"{prefix}mfu": rate / peak,
            }
        )
        del bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if with_plain:
        row["overhead"] = row["plain_images_per_s"] / row["images_per_s"]
    logger.info(
        "%s %s %s: %.1f img/s (plain %s)",
        arch,
        dtype_name,
        ", ".join(k for k, v in options.items() if v) or "no options",
        row["images_per_s"],
        f"{row['plain_images_per_s']:.1f}" if with_plain else "not measured",
    )
    return row


def table(rows: Sequence[dict]) -> str:
    """Rows as a Markdown table (ours next to the plain tower)."""
    head = (
        "| arch | dtype | batch | img/s | plain img/s | overhead | step GFLOP | plain GFLOP "
        "| MFU | plain MFU | peak mem GB | plain peak GB |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['dtype']} | {r['batch']} | {r['images_per_s']:.1f} | "
            f"{r['plain_images_per_s']:.1f} | {r['overhead']:.2f}x | {r['step_flops'] / 1e9:.1f} | "
            f"{r['plain_step_flops'] / 1e9:.1f} | {100 * r['mfu']:.1f}% | "
            f"{100 * r['plain_mfu']:.1f}% | {r['peak_mem_gb']:.2f} | {r['plain_peak_mem_gb']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark and print a table.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        One dict per (arch, dtype) (see :func:`run_one`).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:N'")
    p.add_argument("--batch", type=int, default=64, help="images per step (P x K, K = 4)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the counted one")
    p.add_argument(
        "--archs", nargs="+", default=None, help="MODEL.NAME values (default ViT-B-16 RN50)"
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=list(DTYPES),
        help="precisions (default fp32 bf16 fp16; --smoke: fp32)",
    )
    p.add_argument("--size", nargs=2, type=int, default=[256, 128], help="input H W")
    p.add_argument("--num-classes", type=int, default=751, help="identities (Market-1501: 751)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="device peak for the MFU (default: published table / measured matmul)",
    )
    p.add_argument("--grad-checkpointing", action="store_true", help="MODEL.GRAD_CHECKPOINTING")
    p.add_argument("--channels-last", action="store_true", help="MODEL.CHANNELS_LAST")
    p.add_argument("--compile", action="store_true", help="MODEL.COMPILE (both models)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny archs (default), batch 8, 2 steps, fp32"
    )
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke:
        args.archs = args.archs or list(SMOKE_ARCHS)
        args.batch, args.steps, args.warmup = 8, 2, 0
    archs = args.archs or ["ViT-B-16", "RN50"]
    dtypes = args.dtypes or (["fp32"] if args.smoke else list(DTYPES))
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.batch % NUM_INSTANCE:
        raise SystemExit(f"--batch must be a multiple of {NUM_INSTANCE} (P x K batches)")
    options = {
        "grad_checkpointing": args.grad_checkpointing,
        "channels_last": args.channels_last,
        "compile": args.compile,
    }
    rows = [
        run_one(
            arch,
            dtype,
            device,
            args.batch,
            args.steps,
            args.warmup,
            args.size,
            args.num_classes,
            options,
            args.peak_tflops,
        )
        for arch in archs
        for dtype in dtypes
    ]
    print(table(rows))
    print(f"device {device} ({rows[0]['peak_source']}), torch {torch.__version__}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
