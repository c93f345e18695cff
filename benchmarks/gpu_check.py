"""One GPU check: tests, training steps, loader, evaluation, a short run, options, as markdown.

Prepared to run once on a machine with one GPU and to write a section for ``docs/benchmarks.md``
plus a JSON file of the raw figures. Sized for about 6 minutes on an H200 (an estimate: it has
not run on a GPU yet); its time limit (420 s of sections) keeps it under 8 minutes.
The sections, in the order they run:

* ``tests``: the ``gpu``-marked tests (``pytest -m gpu``) in a subprocess; pass/fail counts;
* ``train_step``: ``benchmarks/train_step.py``'s figures (images/s, peak memory, MFU, next to
  open_clip's plain tower) for ViT-B/16 and RN50 in fp32, bf16 and fp16 (with the scaler);
* ``amp``: one stage-2 epoch of the real training loop (``processor.stage2.train_stage2``: the
  recipe's losses, its optimizer, ``make_grad_scaler``, the step guard) for each backbone and
  precision from the same weights on the same batches: finite, how many steps the fp16 scaler
  skipped, the epoch's mean loss against fp32;
* ``loader``: images/s of the stage-2 train loader (``datasets.build.build_dataloaders``) with N
  workers against the GPU's step rate from ``train_step`` (is the GPU starved?);
* ``eval``: evaluation and k-reciprocal re-ranking at MSMT17 size on the GPU (time, peak GPU
  memory) on ``benchmarks.eval_scale``'s synthetic features, and equality with the CPU result
  on a query/gallery subset;
* ``two_stage``: about 300 steps of ``processor.train.train`` (ViT-B/16, 256x128, synthetic data,
  the paper's recipe ``configs/person/vit_clipreid.yml`` otherwise): stage-1 epoch time, stage-2
  images/s, and the projected wall time of the paper's MSMT17 recipe;
* ``options``: the training speed options one at a time (RN50 channels-last, ViT-B/16 activation
  checkpointing, ViT-B/16 ``torch.compile``) in bf16, against ``train_step``'s rows.

Each section runs inside its own ``try``: a failure becomes a row of the "Failures" table and the
next section runs. Each has a time budget checked between its units (rows, precisions, worker
counts); the training run is stopped at its budget by a SIGINT (the run's own signal handling
saves and stops at the step's end, or at once during its final evaluation) and reports what it
measured. The results are rewritten after
every section, so a run killed from outside still leaves the finished sections.

``--smoke`` runs the same code on the CPU with tiny models and data (under a minute); the test
suite runs it. Its figures are meaningless; only their presence is checked.

Usage (from the repository root):
    python -m benchmarks.gpu_check --out gpu.md            # also writes gpu.json
    python -m benchmarks.gpu_check --sections eval two_stage --out part.md
    python -m benchmarks.gpu_check --smoke                 # CPU, tiny, prints the markdown
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import eval_scale, train_step
from benchmarks.data_pipeline import environment
from configs.config import load_cfg
from datasets.build import build_dataloaders, build_datasets, build_train_sampler
from datasets.msmt17 import PUBLISHED_STATS as MSMT17
from model.build import build_model
from processor.common import (
    StageControl,
    TrainingInterrupted,
    build_loop_settings,
    make_grad_scaler,
    set_tf32,
)
from processor.evaluate import build_eval_settings
from processor.recipes import get_recipe
from processor.stage2 import train_stage2
from processor.train import train
from solver.scheduler import build_scheduler
from utils.checkpoint import write_json, write_text
from utils.cli import make_parser, parse_args, run_main
from utils.dist import resolve_device
from utils.metrics import EvalResult, evaluate_features
from utils.seed import seed_everything

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_RECIPE = os.path.join(ROOT, "configs", "person", "vit_clipreid.yml")
CNN_RECIPE = os.path.join(ROOT, "configs", "person", "cnn_clipreid.yml")
# The fp16/bf16 epoch's mean loss may differ from fp32's by this fraction (same weights, batches).
AMP_LOSS_TOLERANCE = 0.02
# Device and CPU results agree when mAP, mINP and every CMC value differ by at most this (float32
# distances computed by different kernels may swap near-tied gallery items), ...
METRIC_TOLERANCE = 1e-4
# ... and each query's k nearest (re-ranked) distances by at most this.
DISTANCE_TOLERANCE = {"plain": 1e-4, "rerank": 1e-3}
TOPK = 10
# train_step's speed switches, all off (the options section turns one on at a time).
NO_OPTIONS = {"grad_checkpointing": False, "channels_last": False, "compile": False}
# Seconds an options row with torch.compile needs left to start (compiling a ViT-B/16 training
# step takes about a minute): one unit cannot stop midway, so it must not start late.
COMPILE_MIN_S = 90.0
# Short runs have no learning-rate decay (the recipe's milestones lie beyond their last epoch).
NO_DECAY = ("SOLVER.STAGE2.STEPS", "[]")


@dataclass(frozen=True)
class Sizes:
    """Everything ``--smoke`` shrinks; the defaults are the GPU run's.

    Attributes:
        archs: (MODEL.NAME, recipe YAML) of the two backbones (train_step, amp).
        run_arch: the two-stage run's MODEL.NAME (with ``VIT_RECIPE``).
        dtypes: train_step precisions.
        step_batch: train_step batch.
        step_steps: train_step timed steps.
        step_warmup: train_step untimed steps.
        input_size: INPUT.SIZE_TRAIN/TEST (H, W).
        padding: INPUT.PADDING.
        batch: SOLVER.STAGE1/STAGE2.IMS_PER_BATCH.
        synthetic: DATASETS.SYNTHETIC keys (NUM_IDS, NUM_CAMERAS, IMAGES_PER_ID_CAM, SIZE).
        run_workers: DATALOADER.NUM_WORKERS of the amp and two-stage runs (the recipe's 8).
        loader_workers: worker counts the loader section measures.
        loader_seconds: least timed seconds per worker count.
        loader_batches: least timed batches per worker count.
        eval_size: ``benchmarks.eval_scale.SIZES`` key of the full-size evaluation.
        eval_limit: (queries, gallery) cut of that size (None: all).
        eval_subset: (queries, gallery) of the CPU comparison.
        eval_dim: feature size (CLIP-ReID ViT: 1280).
        run_steps: target stage-1 + stage-2 steps of the two-stage run.
        stage2_share: the part of them spent in stage 2.
        option_rows: (MODEL.NAME, train_step option) pairs of the options section, in order.
        pytest_paths: what ``pytest -m gpu`` collects (None: the files that mark gpu tests).
        time_limit: seconds for the whole check; later sections are skipped past it.
        budgets: seconds per section (checked between its units).
    """

    archs: tuple[tuple[str, str], ...] = (("ViT-B-16", VIT_RECIPE), ("RN50", CNN_RECIPE))
    run_arch: str = "ViT-B-16"
    dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
    step_batch: int = 64
    step_steps: int = 10
    step_warmup: int = 3
    input_size: tuple[int, int] = (256, 128)
    padding: int = 10
    batch: int = 64
    # 500 train IDs x 4 images: a random stage-1 batch of 64 holds about 60 distinct IDs, as on
    # MSMT17 (1,041 IDs: 62), so the text-encoder work per step is alike.
    synthetic: tuple[int, int, int, tuple[int, int]] = (1000, 2, 2, (128, 64))
    run_workers: int = 8
    loader_workers: tuple[int, ...] = (2, 4, 8, 16)
    loader_seconds: float = 3.0
    loader_batches: int = 20
    eval_size: str = "msmt17"
    eval_limit: tuple[int, int] | None = None
    eval_subset: tuple[int, int] = (2000, 10000)
    eval_dim: int = 1280
    run_steps: int = 300
    stage2_share: float = 0.6
    option_rows: tuple[tuple[str, str], ...] = (
        ("RN50", "channels_last"),
        ("ViT-B-16", "grad_checkpointing"),
        ("ViT-B-16", "compile"),  # last: its compilation is the longest unit
    )
    pytest_paths: tuple[str, ...] | None = None
    time_limit: float = 420.0
    budgets: dict[str, float] = field(
        default_factory=lambda: {
            "tests": 60,
            "train_step": 110,
            "amp": 80,
            "loader": 40,
            "eval": 70,
            "two_stage": 150,
            "options": 100,
        }
    )


SMOKE = Sizes(
    archs=(("ViT-T-16-test", VIT_RECIPE), ("RN-T-test", CNN_RECIPE)),
    run_arch="ViT-T-16-test",
    dtypes=("fp32",),
    step_batch=8,
    step_steps=1,
    step_warmup=0,
    input_size=(64, 32),
    padding=4,
    batch=16,
    synthetic=(16, 2, 2, (64, 32)),
    run_workers=0,
    loader_workers=(0, 2),
    loader_seconds=0.2,
    loader_batches=3,
    eval_size="small",
    eval_limit=(240, 1200),
    eval_subset=(60, 300),
    eval_dim=64,
    run_steps=10,
    stage2_share=0.6,
    option_rows=(("RN-T-test", "channels_last"), ("ViT-T-16-test", "grad_checkpointing")),
    time_limit=120.0,
    budgets=dict.fromkeys(Sizes().budgets, 60.0),
)


class SectionSkipped(Exception):
    """A section did not run (its budget or the check's time limit was spent)."""


@dataclass
class Context:
    """What every section gets.

    Attributes:
        device: where the check runs.
        sizes: the sizes of this run.
        data_root: DATASETS.ROOT_DIR of the synthetic data (generated on first use).
        work_dir: scratch folder for run outputs.
        results: the figures so far, by section (later sections read earlier ones).
        deadline: ``time.perf_counter()`` value the running section must finish by.
    """

    device: torch.device
    sizes: Sizes
    data_root: str
    work_dir: str
    results: dict[str, Any] = field(default_factory=dict)
    deadline: float = math.inf

    def remaining(self) -> float:
        """Seconds left of the running section's budget."""
        return self.deadline - time.perf_counter()

    def cfg(self, recipe: str, arch: str, out: str, extra: Sequence[str] = ()) -> Any:
        """A run configuration: the recipe YAML, random weights, the synthetic data, ``extra``.

        Args:
            recipe: the recipe YAML (``VIT_RECIPE`` or ``CNN_RECIPE``).
            arch: MODEL.NAME.
            out: OUTPUT_DIR (under ``work_dir``).
            extra: more ``KEY VALUE`` overrides (they win).

        Returns:
            The frozen, validated configuration.
        """
        s = self.sizes
        num_ids, cams, per_cam, size = s.synthetic
        opts = [
            "MODEL.NAME", arch,
            "MODEL.PRETRAIN_TAG", "none",  # random weights: the check runs offline
            "MODEL.DEVICE", str(self.device),
            "INPUT.SIZE_TRAIN", str(list(s.input_size)),
            "INPUT.SIZE_TEST", str(list(s.input_size)),
            "INPUT.PADDING", str(s.padding),
            "DATASETS.NAMES", "synthetic",
            "DATASETS.ROOT_DIR", self.data_root,
            "DATASETS.SYNTHETIC.NUM_IDS", str(num_ids),
            "DATASETS.SYNTHETIC.NUM_CAMERAS", str(cams),
            "DATASETS.SYNTHETIC.IMAGES_PER_ID_CAM", str(per_cam),
            "DATASETS.SYNTHETIC.SIZE", str(list(size)),
            "DATALOADER.NUM_WORKERS", str(s.run_workers),
            "SOLVER.STAGE1.IMS_PER_BATCH", str(s.batch),
            "SOLVER.STAGE2.IMS_PER_BATCH", str(s.batch),
            "TEST.IMS_PER_BATCH", str(s.batch),
            "OUTPUT_DIR", os.path.join(self.work_dir, out),
            *extra,
        ]  # fmt: skip
        return load_cfg(recipe, opts)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since the last reset: GPU memory allocated by torch on CUDA; elsewhere the
    process's resident-set high-water mark (cumulative over the process).

    Args:
        device: the check's device.

    Returns:
        Gigabytes (1e9 bytes).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def read_metrics(output_dir: str) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (empty when there is none)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def exact_fp32_matmuls() -> Iterator[None]:
    """Within the block, fp32 matrix products are full fp32 (no TF32), as on the CPU."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    """Send the main thread a SIGINT after ``seconds`` unless the block ends first.

    A training run turns it into a checkpoint and :class:`TrainingInterrupted` at the end of
    the running step; elsewhere it raises ``KeyboardInterrupt``. The signal goes to the main
    thread itself (not to the process, whose kernel may hand it to the timer's thread), so a
    blocking call there is interrupted at once.
    """
    main = threading.main_thread().ident
    timer = threading.Timer(max(seconds, 0.0), signal.pthread_kill, (main, signal.SIGINT))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    align = align or "l" + "r" * (len(head) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def gpu_test_files(tests_dir: str) -> list[str]:
    """The test files that mark a test ``gpu`` (what ``pytest -m gpu tests`` would select from).

    Args:
        tests_dir: the tests folder.

    Returns:
        Sorted paths relative to the repository root.
    """
    marker = "pytest.mark.gpu"
    found = []
    for name in sorted(os.listdir(tests_dir)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests_dir, name), encoding="utf-8") as f:
                if marker in f.read():
                    found.append(os.path.relpath(os.path.join(tests_dir, name), ROOT))
    return found


def section_tests(ctx: Context) -> dict:
    """``pytest -q -m gpu`` in a subprocess (its budget is the subprocess's timeout).

    Returns:
        ``command``, ``passed``, ``failed``, ``errors``, ``skipped``, ``time_s``, ``failing``
        (the failed tests' ids) and ``returncode``.
    """
    paths = list(ctx.sizes.pytest_paths or gpu_test_files(os.path.join(ROOT, "tests")))
    xml = os.path.join(ctx.work_dir, "gpu_tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    cmd += ["--junitxml", xml, *paths]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(ctx.remaining(), 1.0)
    )
    elapsed = time.perf_counter() - start
    if not os.path.isfile(xml):
        raise RuntimeError(
            f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-500:]} "
            f"{proc.stderr[-500:]}"
        )
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failing = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "command": "python -m pytest -q -m gpu " + " ".join(paths),
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "time_s": elapsed,
        "failing": failing,
        "returncode": proc.returncode,
    }


def section_train_step(ctx: Context) -> dict:
    """``benchmarks.train_step.run_one`` for every backbone and precision, within the budget.

    TF32 follows ``MODEL.TF32``'s default, as in training. The number of classes is MSMT17's.

    Returns:
        ``rows`` (train_step's rows), ``skipped`` ([arch, dtype] left out for time), ``tf32``.
    """
    s, device = ctx.sizes, ctx.device
    tf32 = bool(load_cfg(None, ()).MODEL.TF32)
    set_tf32(device, tf32)
    rows, skipped = [], []
    for arch, _ in s.archs:
        for dtype in s.dtypes:
            if ctx.remaining() <= 0:
                skipped.append([arch, dtype])
                continue
            rows.append(_step_row(ctx, arch, dtype, NO_OPTIONS))
    return {"rows": rows, "skipped": skipped, "tf32": tf32 and device.type == "cuda"}


def _step_row(ctx: Context, arch: str, dtype: str, options: dict, with_plain: bool = True) -> dict:
    """``train_step.run_one`` at the check's sizes (MSMT17's identity count); frees after."""
    s = ctx.sizes
    row = train_step.run_one(
        arch,
        dtype,
        ctx.device,
        s.step_batch,
        s.step_steps,
        s.step_warmup,
        s.input_size,
        MSMT17["train"].num_ids,
        options,
        with_plain=with_plain,
    )
    _free(ctx.device)
    return row


def section_options(ctx: Context) -> dict:
    """The training speed options on the device, one at a time, against the plain path.

    ``train_step``'s stage-2 step (ours only) with one option on: channels-last for RN50
    (``MODEL.CHANNELS_LAST``), activation checkpointing for ViT-B/16
    (``MODEL.GRAD_CHECKPOINTING``: memory for time), ``torch.compile`` of the image encoder
    (``MODEL.COMPILE``; compiled in the untimed warm-up); in bf16 (the smoke run: its precision).
    The baseline is the ``train_step`` section's row of the same backbone and precision.

    Returns:
        ``rows`` (train_step rows plus ``option`` and, where the baseline was measured,
        ``baseline_images_per_s`` and ``baseline_peak_mem_gb``), ``skipped`` ([arch, option]).
    """
    s, device = ctx.sizes, ctx.device
    dtype = "bf16" if "bf16" in s.dtypes else s.dtypes[0]
    set_tf32(device, bool(load_cfg(None, ()).MODEL.TF32))
    done = ctx.results.get("train_step", {}).get("rows", [])
    baselines = {(r["arch"], r["dtype"]): r for r in done}
    rows, skipped = [], []
    for arch, option in s.option_rows:
        if ctx.remaining() <= (COMPILE_MIN_S if option == "compile" else 0):
            skipped.append([arch, option])
            continue
        row = _step_row(ctx, arch, dtype, {**NO_OPTIONS, option: True}, with_plain=False)
        row["option"] = option
        base = baselines.get((arch, dtype))
        if base is not None:
            row["baseline_images_per_s"] = base["images_per_s"]
            row["baseline_peak_mem_gb"] = base["peak_mem_gb"]
        rows.append(row)
    return {"rows": rows, "skipped": skipped}


def _amp_epoch(ctx: Context, cfg, model, data, init: dict) -> dict:
    """One stage-2 epoch of the recipe from the weights ``init``; its figures."""
    device = ctx.device
    model.load_state_dict(init)
    seed_everything(cfg.SOLVER.SEED)
    recipe = get_recipe(cfg.MODEL.METHOD)(cfg, model, data, device)
    optimizer = recipe.build_optimizer(cfg, 2)
    scheduler = build_scheduler(cfg, optimizer, stage=2)
    scaler = make_grad_scaler(device, cfg.MODEL.AMP_DTYPE)
    loop = build_loop_settings(cfg, 2)
    control = StageControl()
    initial_scale = scaler.get_scale() if scaler.is_enabled() else None
    _reset_peak(device)
    start = time.perf_counter()
    train_stage2(recipe, data.train_stage2, optimizer, scheduler, scaler, loop, control=control)
    _sync(device)
    elapsed = time.perf_counter() - start
    record = [r for r in read_metrics(cfg.OUTPUT_DIR) if r.get("stage") == 2][-1]
    final_scale = scaler.get_scale() if scaler.is_enabled() else None
    # The scaler halves its scale at every step it skips (growth only after 2000 good steps).
    skips = round(math.log2(initial_scale / final_scale)) if final_scale else 0
    return {
        "steps": len(data.train_stage2),
        "scaler": scaler.is_enabled(),
        "final_scale": final_scale,
        "scaler_skips": skips,
        "loss": float(record["loss"]),
        "img_per_s": float(record["img_per_s"]),
        "seconds": elapsed,
        "peak_mem_gb": peak_memory_gb(device),
    }


def section_amp(ctx: Context) -> dict:
    """One stage-2 epoch per backbone and precision (fp32, bf16, fp16) of the real loop.

    Per backbone the model is built once; each precision starts from its initial weights with
    the same seed, so every precision sees the same batches. On the CPU autocast is off (the
    loop runs fp32), so there the precisions agree exactly.

    Returns:
        ``rows``: per (arch, dtype) the epoch's figures, ``loss_rel_diff`` against fp32 and
        ``ok``; ``tolerance``.
    """
    device, rows = ctx.device, []
    for arch, recipe in ctx.sizes.archs:
        base = ctx.cfg(recipe, arch, f"amp_{arch}")
        seed_everything(base.SOLVER.SEED)
        data = build_dataloaders(base)
        next(iter(data.train_stage2))  # start the (persistent) workers before any timing
        model = build_model(base, data.num_classes, data.num_cameras, data.num_views).to(device)
        set_tf32(device, base.MODEL.TF32)
        # On the CPU: a copy on the device would count in every precision's peak memory.
        init = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        reference = None
        for dtype in ("fp32", "bf16", "fp16"):
            row: dict[str, Any] = {"arch": arch, "dtype": dtype}
            if ctx.remaining() <= 0:
                rows.append({**row, "skipped": "time budget spent"})
                continue
            cfg = ctx.cfg(
                recipe,
                arch,
                f"amp_{arch}_{dtype}",
                ["MODEL.AMP_DTYPE", dtype, "SOLVER.STAGE2.MAX_EPOCHS", "1", *NO_DECAY],
            )
            try:
                row.update(_amp_epoch(ctx, cfg, model, data, init))
            except Exception as err:  # noqa: BLE001 - a row of the table, the others still run
                rows.append({**row, "error": f"{type(err).__name__}: {err}", "ok": False})
                continue
            if dtype == "fp32":
                reference = row["loss"]
            diff = abs(row["loss"] - reference) / abs(reference) if reference else None
            row["loss_rel_diff"] = diff
            row["ok"] = math.isfinite(row["loss"]) and (diff is None or diff <= AMP_LOSS_TOLERANCE)
            rows.append(row)
        del model, data, init
        _free(device)
    return {"rows": rows, "tolerance": AMP_LOSS_TOLERANCE}


def loader_rate(loader, seconds: float, batches: int, warmup: int = 2) -> dict:
    """Images per second a loader delivers (workers started and warmed up first).

    Args:
        loader: the stage-2 train loader (its epochs are repeated as needed).
        seconds: least timed seconds.
        batches: least timed batches.
        warmup: batches taken before the clock starts (worker start-up).

    Returns:
        ``img_per_s``, ``batches``, ``seconds``.
    """

    def forever():
        epoch = 0
        while True:
            epoch += 1
            loader.batch_sampler.set_epoch(epoch)
            yield from loader

    it = forever()
    for _ in range(warmup):
        next(it)
    n = images = 0
    start = time.perf_counter()
    while n < batches or time.perf_counter() - start < seconds:
        images += len(next(it)["pids"])
        n += 1
    elapsed = time.perf_counter() - start
    return {"img_per_s": images / elapsed, "batches": n, "seconds": elapsed}


def section_loader(ctx: Context) -> dict:
    """The stage-2 train loader's images/s for each worker count, against the step rate.

    The demand is train_step's images/s of each backbone at the recipe's precision
    (``MODEL.AMP_DTYPE``, fp16; fp32 when train_step ran only that): a loader below it starves
    the GPU.

    Returns:
        ``rows`` (workers, img_per_s, batches, seconds), ``demand`` ({arch: img/s}),
        ``demand_dtype``, ``recipe_workers``, ``starved`` (at the recipe's worker count, None
        without a demand or that count), ``workers_needed`` (the fewest measured workers that
        keep up with the fastest backbone, None if none did), ``cores``.
    """
    s = ctx.sizes
    arch, recipe = s.archs[0]
    recipe_cfg = load_cfg(recipe, ())
    rows = []
    for workers in s.loader_workers:
        if ctx.remaining() <= 0:
            rows.append({"workers": workers, "skipped": "time budget spent"})
            continue
        cfg = ctx.cfg(recipe, arch, "loader", ["DATALOADER.NUM_WORKERS", str(workers)])
        data = build_dataloaders(cfg)
        rows.append(
            {
                "workers": workers,
                **loader_rate(data.train_stage2, s.loader_seconds, s.loader_batches),
            }
        )
        del data
        gc.collect()  # shut the workers down before the next count starts its own
    step_rows = ctx.results.get("train_step", {}).get("rows", [])
    dtype = recipe_cfg.MODEL.AMP_DTYPE
    if not any(r["dtype"] == dtype for r in step_rows):
        dtype = "fp32"
    demand = {r["arch"]: r["images_per_s"] for r in step_rows if r["dtype"] == dtype}
    measured = [r for r in rows if "img_per_s" in r]
    recipe_workers = int(recipe_cfg.DATALOADER.NUM_WORKERS)
    at_recipe = [r for r in measured if r["workers"] == recipe_workers]
    starved = needed = None
    if demand:
        top = max(demand.values())
        if at_recipe:
            starved = at_recipe[0]["img_per_s"] < top
        enough = [r["workers"] for r in measured if r["img_per_s"] >= top]
        needed = min(enough) if enough else None
    return {
        "rows": rows,
        "demand": demand,
        "demand_dtype": dtype,
        "recipe_workers": recipe_workers,
        "starved": starved,
        "workers_needed": needed,
        "cores": os.cpu_count(),
        "source_size": list(s.synthetic[3]),
    }


def compare_results(cpu: EvalResult, dev: EvalResult, kind: str) -> dict:
    """How far a device evaluation is from the CPU one on the same features.

    Args:
        cpu: the CPU result (with top-k lists).
        dev: the device result (with top-k lists).
        kind: 'plain' or 'rerank' (its distance tolerance).

    Returns:
        ``d_mAP``, ``d_mINP``, ``d_cmc`` (largest CMC difference), ``d_topk_dist`` (largest
        difference of the sorted top-k distances), ``same_topk`` (fraction of queries with the
        same top-k list), ``ok``.
    """
    d_map = abs(cpu.mAP - dev.mAP)
    d_minp = abs(cpu.mINP - dev.mINP)
    d_cmc = float(abs(cpu.cmc - dev.cmc).max())
    d_dist = float(abs(cpu.topk_distances - dev.topk_distances).max())
    same = float((cpu.topk_indices == dev.topk_indices).all(axis=1).mean())
    ok = (
        max(d_map, d_minp, d_cmc) <= METRIC_TOLERANCE
        and d_dist <= DISTANCE_TOLERANCE[kind]
        and cpu.num_valid_queries == dev.num_valid_queries
    )
    return {
        "kind": kind,
        "d_mAP": d_map,
        "d_mINP": d_minp,
        "d_cmc": d_cmc,
        "d_topk_dist": d_dist,
        "same_topk": same,
        "ok": bool(ok),
    }


def _summary(result: EvalResult, seconds: float, peak: float) -> dict:
    return {
        "time_s": seconds,
        "peak_mem_gb": peak,
        "mAP": result.mAP,
        "rank1": result.rank(1),
        "mINP": result.mINP,
    }


def section_eval(ctx: Context) -> dict:
    """Evaluation and re-ranking of synthetic MSMT17-size features on the device.

    The settings are a run's (``build_eval_settings``: TEST.EVAL_MEMORY_MB, TEST.MAX_RANK, the
    official re-ranking k1/k2/lambda), with exact fp32 matrix products. First the subset is
    evaluated on the CPU and on the device (plain and re-ranked, the device's warm-up too), then
    the full size on the device; the full re-ranking is skipped only when it would surely overrun
    the budget: when even the subset's device time scaled linearly by Q + G (a lower bound: only
    its neighbour pass grows with (Q + G)^2, and on a GPU that pass is the cheap part) is more
    than the time left.

    Returns:
        ``size``, ``queries``, ``gallery``, ``dim``, ``memory_mb``, ``rerank`` (k1, k2, lambda),
        ``features_gb``, ``agreement`` (two rows of :func:`compare_results`), ``plain`` and
        ``reranked`` (time, peak memory, metrics; or ``skipped``).
    """
    s, device = ctx.sizes, ctx.device
    settings = build_eval_settings(load_cfg(None, ("TEST.RE_RANKING", "True")))
    qf, gf, q_pids, g_pids, q_cams, g_cams = eval_scale.make_features(s.eval_size, s.eval_dim)
    if s.eval_limit:
        nq, ng = s.eval_limit
        qf, q_pids, q_cams = qf[:nq], q_pids[:nq], q_cams[:nq]
        gf, g_pids, g_cams = gf[:ng], g_pids[:ng], g_cams[:ng]
    kwargs = {
        "max_rank": settings.max_rank,
        "feat_norm": settings.feat_norm,
        "memory_budget_mb": settings.memory_mb,
        "show_progress": False,
    }
    rr = settings.rerank
    out: dict[str, Any] = {
        "size": s.eval_size,
        "queries": len(qf),
        "gallery": len(gf),
        "dim": s.eval_dim,
        "memory_mb": settings.memory_mb,
        "rerank": {"k1": rr.k1, "k2": rr.k2, "lambda": rr.lambda_value},
        "subset": list(s.eval_subset),
        "agreement": [],
    }

    def run(q, g, qp, gp, qc, gc_, rerank, keep):
        _sync(device)
        _reset_peak(device)
        start = time.perf_counter()
        result = evaluate_features(q, g, qp, gp, qc, gc_, rerank=rerank, keep_topk=keep, **kwargs)
        _sync(device)
        return result, time.perf_counter() - start, peak_memory_gb(device)

    with exact_fp32_matmuls():
        nq, ng = s.eval_subset
        sub = (qf[:nq], gf[:ng], q_pids[:nq], g_pids[:ng], q_cams[:nq], g_cams[:ng])
        sub_dev = (sub[0].to(device), sub[1].to(device), *sub[2:])
        sub_rerank_s = 0.0
        for kind, rerank in (("plain", None), ("rerank", rr)):
            cpu = run(*sub, rerank, TOPK)[0]
            dev, seconds, _ = run(*sub_dev, rerank, TOPK)
            if kind == "rerank":
                sub_rerank_s = seconds
            out["agreement"].append({**compare_results(cpu, dev, kind), "queries": nq})
        del sub_dev
        q_dev, g_dev = qf.to(device), gf.to(device)
        out["features_gb"] = (q_dev.numel() + g_dev.numel()) * 4 / 1e9
        ids = (q_pids, g_pids, q_cams, g_cams)
        result, seconds, peak = run(q_dev, g_dev, *ids, None, 0)
        out["plain"] = _summary(result, seconds, peak)
        scale = (len(qf) + len(gf)) / (nq + ng)
        projected = sub_rerank_s * scale
        if projected > ctx.remaining():
            out["reranked"] = {
                "skipped": f"at least {projected:.0f} s (subset time x {scale:.0f}) exceeds "
                f"the {max(ctx.remaining(), 0):.0f} s left"
            }
        else:
            result, seconds, peak = run(q_dev, g_dev, *ids, rr, 0)
            out["reranked"] = _summary(result, seconds, peak)
    return out


def _run_epochs(cfg, batch: int, target: int, share: float) -> tuple[int, int, int, int]:
    """Stage-1 and stage-2 epochs that make about ``target`` steps, ``share`` of them stage 2.

    Returns:
        (stage-1 epochs, stage-1 steps per epoch, stage-2 epochs, stage-2 steps per epoch).
    """
    dataset, _ = build_datasets(cfg)  # generates the synthetic data on first use
    pids = [r.pid for r in dataset.train]
    per_s1 = math.ceil(len(pids) / batch)
    sampler = build_train_sampler(
        pids, cfg.DATALOADER.SAMPLER, batch, cfg.DATALOADER.NUM_INSTANCE, 0, 0, 1
    )
    per_s2 = len(sampler)
    e2 = max(2, round(target * share / per_s2))
    e1 = max(2, round((target - e2 * per_s2) / per_s1))
    return e1, per_s1, e2, per_s2


class _CacheTime(logging.Handler):
    """Catches stage 1's 'cached N image features ... in S s' log record."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count: int | None = None
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("[stage1] cached") and len(record.args or ()) >= 3:
            self.count, self.seconds = int(record.args[0]), float(record.args[2])


def project_msmt17(s1_step_s: float, s2_img_per_s: float, cache_img_per_s: float) -> dict:
    """Wall time of the paper's MSMT17 recipe from measured rates.

    T = N / r_cache + E1 * ceil(N / B1) * t1 + E2 * floor(N / B2) * B2 / r2, with N = 32,621
    MSMT17 train images, the recipe's epochs E1, E2 and batches B1, B2
    (``configs/person/vit_clipreid.yml``), r_cache the stage-1 feature-caching rate (images/s),
    t1 the stage-1 step time and r2 the stage-2 images/s. (The P x K sampler drops each
    identity's remainder, so a real stage-2 epoch has slightly fewer batches.) Checkpoints and
    the final evaluation are not counted.

    Args:
        s1_step_s: seconds per stage-1 step.
        s2_img_per_s: stage-2 images per second.
        cache_img_per_s: stage-1 feature-caching images per second.

    Returns:
        ``formula``, the recipe figures, ``cache_s``, ``stage1_s``, ``stage2_s``, ``total_h``.
    """
    recipe = load_cfg(VIT_RECIPE, ())
    n = MSMT17["train"].num_images
    e1, b1 = recipe.SOLVER.STAGE1.MAX_EPOCHS, recipe.SOLVER.STAGE1.IMS_PER_BATCH
    e2, b2 = recipe.SOLVER.STAGE2.MAX_EPOCHS, recipe.SOLVER.STAGE2.IMS_PER_BATCH
    cache = n / cache_img_per_s
    stage1 = e1 * math.ceil(n / b1) * s1_step_s
    stage2 = e2 * (n // b2) * b2 / s2_img_per_s
    return {
        "formula": "N / r_cache + E1 * ceil(N / B1) * t1 + E2 * floor(N / B2) * B2 / r2",
        "N": n,
        "E1": e1,
        "B1": b1,
        "E2": e2,
        "B2": b2,
        "r_cache": cache_img_per_s,
        "t1": s1_step_s,
        "r2": s2_img_per_s,
        "cache_s": cache,
        "stage1_s": stage1,
        "stage2_s": stage2,
        "total_h": (cache + stage1 + stage2) / 3600,
    }


def section_two_stage(ctx: Context) -> dict:
    """About ``run_steps`` steps of ``processor.train.train`` on the synthetic data.

    The paper's ViT recipe (``configs/person/vit_clipreid.yml``: fp16 with the scaler, 8
    workers) with random weights and fewer epochs; checkpoints only at the ends of the stages,
    one evaluation at the end. At the budget a SIGINT stops the run at a step's end (during the
    final evaluation: at once) and the epochs finished so far are reported.

    Returns:
        The run's setup, ``stage1`` (epochs, steps per epoch, epoch times, median ``epoch_s``,
        ``step_s``, ``cache_s``, ``cache_img_per_s``), ``stage2`` (epochs, steps per epoch,
        ``img_per_s`` per epoch and their median after the first), ``wall_s``,
        ``interrupted``, ``final`` (the evaluation summary) and ``projection``
        (:func:`project_msmt17`).
    """
    s, device = ctx.sizes, ctx.device
    base = ctx.cfg(VIT_RECIPE, s.run_arch, "two_stage_plan")
    e1, per_s1, e2, per_s2 = _run_epochs(base, s.batch, s.run_steps, s.stage2_share)
    cfg = ctx.cfg(
        VIT_RECIPE,
        s.run_arch,
        "two_stage",
        [
            "SOLVER.STAGE1.MAX_EPOCHS", str(e1),
            "SOLVER.STAGE1.WARMUP_EPOCHS", "1",
            "SOLVER.STAGE1.CHECKPOINT_PERIOD", str(e1),
            "SOLVER.STAGE2.MAX_EPOCHS", str(e2),
            "SOLVER.STAGE2.WARMUP_ITERS", "1",
            *NO_DECAY,
            "SOLVER.STAGE2.CHECKPOINT_PERIOD", str(e2),
            "SOLVER.STAGE2.EVAL_PERIOD", str(e2),
        ],
    )  # fmt: skip
    out: dict[str, Any] = {
        "arch": s.run_arch,
        "input_size": list(s.input_size),
        "amp_dtype": cfg.MODEL.AMP_DTYPE,
        "workers": cfg.DATALOADER.NUM_WORKERS,
        "batch": s.batch,
        "steps_planned": e1 * per_s1 + e2 * per_s2,
        "interrupted": False,
    }
    catcher = _CacheTime()
    stage1_logger = logging.getLogger("processor.stage1")
    level = stage1_logger.level
    stage1_logger.addHandler(catcher)
    stage1_logger.setLevel(logging.INFO)  # the record is INFO: make sure it is created
    start = time.perf_counter()
    try:
        with interrupt_after(ctx.remaining()):
            out["final"] = train(cfg, device, overwrite=True)
    except (TrainingInterrupted, KeyboardInterrupt) as err:
        out["interrupted"] = f"stopped at the section's budget: {err}"
    finally:
        stage1_logger.removeHandler(catcher)
        stage1_logger.setLevel(level)
    out["wall_s"] = time.perf_counter() - start
    records = read_metrics(cfg.OUTPUT_DIR)
    s1 = [r for r in records if r.get("stage") == 1 and "loss" in r]
    s2 = [r for r in records if r.get("stage") == 2 and "img_per_s" in r]
    # An epoch's time: between its record and the previous one (nothing else runs in between
    # before the last epoch, whose end saves a checkpoint after its record).
    s1_times = [b["time"] - a["time"] for a, b in zip(s1, s1[1:], strict=False)]
    epoch_s = _median(s1_times)
    s2_rates = [float(r["img_per_s"]) for r in s2]
    out["stage1"] = {
        "epochs": e1,
        "epochs_done": len(s1),
        "steps_per_epoch": per_s1,
        "epoch_times_s": s1_times,
        "epoch_s": epoch_s,
        "step_s": epoch_s / per_s1 if epoch_s else None,
        "cache_s": catcher.seconds,
        "cache_img_per_s": catcher.count / catcher.seconds if catcher.seconds else None,
    }
    out["stage2"] = {
        "epochs": e2,
        "epochs_done": len(s2),
        "steps_per_epoch": per_s2,
        "img_per_s_epochs": s2_rates,
        # The first epoch starts the loader workers and warms the GPU kernels up.
        "img_per_s": _median(s2_rates[1:] or s2_rates),
    }
    out["steps_done"] = len(s1) * per_s1 + len(s2) * per_s2
    st1, st2 = out["stage1"], out["stage2"]
    if st1["step_s"] and st2["img_per_s"] and st1["cache_img_per_s"]:
        out["projection"] = project_msmt17(st1["step_s"], st2["img_per_s"], st1["cache_img_per_s"])
    return out


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _render_tests(r: dict) -> str:
    head = ["command", "passed", "failed", "errors", "skipped", "time (s)"]
    row = [f"`{r['command']}`", r["passed"], r["failed"], r["errors"], r["skipped"]]
    text = _table(head, [[*row, _fmt(r["time_s"])]])
    if r["failing"]:
        text += "\n\nFailing: " + ", ".join(f"`{name}`" for name in r["failing"])
    return text


def _render_train_step(r: dict) -> str:
    parts = [train_step.table(r["rows"])] if r["rows"] else []
    if r["rows"]:
        parts.append(
            f"Batch {r['rows'][0]['batch']}, {r['rows'][0]['steps']} timed steps, input "
            f"{r['rows'][0]['size'][0]}x{r['rows'][0]['size'][1]}, peak: "
            f"{r['rows'][0]['peak_source']}; TF32 {'on' if r['tf32'] else 'off'} for fp32."
        )
    if r["skipped"]:
        parts.append("Not run (time budget): " + ", ".join(" ".join(x) for x in r["skipped"]))
    return "\n\n".join(parts)


def _render_options(r: dict) -> str:
    rows = []
    for x in r["rows"]:
        base_rate, base_mem = x.get("baseline_images_per_s"), x.get("baseline_peak_mem_gb")
        rows.append(
            [
                x["arch"],
                x["dtype"],
                x["option"],
                _fmt(x["images_per_s"]),
                _fmt(base_rate),
                _fmt(x["images_per_s"] / base_rate, ".2f") + "x" if base_rate else "-",
                _fmt(x["peak_mem_gb"], ".2f"),
                _fmt(base_mem, ".2f"),
            ]
        )
    head = ["arch", "dtype", "option", "img/s", "img/s without", "speed", "peak GB", "without"]
    parts = [_table(head, rows, "lll" + "r" * 5)] if rows else []
    if r["skipped"]:
        parts.append("Not run (time budget): " + ", ".join(" ".join(x) for x in r["skipped"]))
    return "\n\n".join(parts)


def _render_amp(r: dict) -> str:
    head = ["arch", "dtype", "steps", "scaler", "scaler skips", "final scale", "mean loss"]
    head += ["vs fp32", "img/s", "peak GB", "ok"]
    rows = []
    for x in r["rows"]:
        if "loss" not in x:
            note = x.get("error") or x.get("skipped")
            rows.append([x["arch"], x["dtype"], note, *[""] * 7, _fmt(x.get("ok"))])
            continue
        rows.append(
            [
                x["arch"],
                x["dtype"],
                x["steps"],
                _fmt(x["scaler"]),
                x["scaler_skips"],
                _fmt(x["final_scale"], ".0f"),
                _fmt(x["loss"], ".4f"),
                _fmt(x["loss_rel_diff"], ".2e"),
                _fmt(x["img_per_s"]),
                _fmt(x["peak_mem_gb"], ".2f"),
                _fmt(x["ok"]),
            ]
        )
    note = (
        "One stage-2 epoch of `train_stage2` per row, the same initial weights and batches "
        "(the first row of a backbone also warms the device up: its img/s is lower); "
        f"*vs fp32*: relative difference of the epoch's mean loss (ok: finite and at most "
        f"{r['tolerance']}). *scaler skips*: steps the fp16 scaler dropped (its scale halves "
        "at each)."
    )
    return _table(head, rows, "llrlrrrrrrl") + "\n\n" + note


def _render_loader(r: dict) -> str:
    archs = list(r["demand"])
    head = ["workers", "loader img/s", *[f"{a} {r['demand_dtype']} step img/s" for a in archs]]
    head.append("keeps up")
    rows = []
    for x in r["rows"]:
        if "img_per_s" not in x:
            rows.append([x["workers"], x["skipped"], *[""] * len(archs), ""])
            continue
        demand = [_fmt(r["demand"][a]) for a in archs]
        keeps = _fmt(x["img_per_s"] >= max(r["demand"].values())) if archs else "-"
        rows.append([x["workers"], _fmt(x["img_per_s"]), *demand, keeps])
    h, w = r["source_size"]
    n = r["recipe_workers"]
    verdict = {
        True: f"at the recipe's {n} workers the loader is slower than the fastest step: the GPU "
        "is **starved**",
        False: f"at the recipe's {n} workers the loader keeps up with the fastest step",
        None: f"starvation at the recipe's {n} workers not determined (no step rate, or that "
        "worker count not measured)",
    }[r["starved"]]
    note = (
        f"Stage-2 train loader (P x K batches, train transforms, pinned memory on CUDA "
        f"machines) on the synthetic {h}x{w} JPEGs, {r['cores']} CPU cores; the step rates are "
        f"train_step's. Verdict: {verdict}; fewest measured workers that keep up: "
        f"{_fmt(r['workers_needed'], 'd')}. Larger source images (MSMT17's) decode slower."
    )
    return _table(head, rows) + "\n\n" + note


def _render_eval(r: dict) -> str:
    rows = []
    for name, key in (("evaluation", "plain"), ("re-ranking", "reranked")):
        x = r[key]
        if "skipped" in x:
            rows.append([name, x["skipped"], "", "", "", ""])
            continue
        rows.append(
            [
                name,
                _fmt(x["time_s"], ".2f"),
                _fmt(x["peak_mem_gb"], ".2f"),
                _fmt(100 * x["mAP"], ".2f"),
                _fmt(100 * x["rank1"], ".2f"),
                _fmt(100 * x["mINP"], ".2f"),
            ]
        )
    rr = r["rerank"]
    text = _table(["full size", "time (s)", "peak GB", "mAP", "R1", "mINP"], rows)
    text += (
        f"\n\n{r['queries']:,} queries x {r['gallery']:,} gallery, {r['dim']}-d synthetic "
        f"features (`benchmarks.eval_scale`, {r['features_gb']:.2f} GB on the device), "
        f"TEST.EVAL_MEMORY_MB {r['memory_mb']}, re-ranking k1 {rr['k1']}, k2 {rr['k2']}, "
        f"lambda {rr['lambda']}, exact fp32 products (no TF32).\n\n"
    )
    agree = [
        [
            a["kind"],
            f"{a['queries']} x {r['subset'][1]}",
            _fmt(a["d_mAP"], ".1e"),
            _fmt(a["d_mINP"], ".1e"),
            _fmt(a["d_cmc"], ".1e"),
            _fmt(a["d_topk_dist"], ".1e"),
            _fmt(100 * a["same_topk"], ".2f"),
            "equal" if a["ok"] else "**differs**",
        ]
        for a in r["agreement"]
    ]
    head = ["device vs CPU", "subset", "d mAP", "d mINP", "d CMC", f"d top-{TOPK} dist"]
    head += [f"same top-{TOPK} (%)", "result"]
    text += _table(head, agree, "llrrrrrl")
    text += (
        f"\n\nEqual: mAP, mINP and CMC within {METRIC_TOLERANCE:g} and each query's top-{TOPK} "
        f"distances within {DISTANCE_TOLERANCE['plain']:g} ({DISTANCE_TOLERANCE['rerank']:g} "
        "re-ranked)."
    )
    return text


def _render_two_stage(r: dict) -> str:
    s1, s2 = r["stage1"], r["stage2"]
    rows = [
        ["stage-1 feature caching (s)", _fmt(s1["cache_s"], ".2f")],
        ["stage-1 caching rate (img/s)", _fmt(s1["cache_img_per_s"])],
        [
            f"stage-1 epoch ({s1['steps_per_epoch']} steps), median (s)",
            _fmt(s1["epoch_s"], ".2f"),
        ],
        ["stage-1 step (ms)", _fmt(s1["step_s"] and 1000 * s1["step_s"])],
        [
            f"stage-2 img/s (median of epochs 2..{s2['epochs_done']})",
            _fmt(s2["img_per_s"]),
        ],
        ["stage-2 img/s per epoch", ", ".join(_fmt(v, ".0f") for v in s2["img_per_s_epochs"])],
        ["steps done / planned", f"{r['steps_done']} / {r['steps_planned']}"],
        ["wall time (s)", _fmt(r["wall_s"])],
    ]
    if r.get("final"):
        rows.append(["final mAP (random init, synthetic)", _fmt(100 * r["final"]["mAP"], ".1f")])
    text = _table(["figure", "value"], rows)
    text += (
        f"\n\n{r['arch']} at {r['input_size'][0]}x{r['input_size'][1]}, "
        f"`configs/person/vit_clipreid.yml` ({r['amp_dtype']}, {r['workers']} workers, batch "
        f"{r['batch']}), random weights, {s1['epochs']} + {s2['epochs']} epochs on the synthetic "
        "data, through `processor.train.train`."
    )
    if r["interrupted"]:
        text += f" {r['interrupted']}"
    p = r.get("projection")
    if p:
        text += (
            "\n\nProjected wall time of the paper's MSMT17 recipe: "
            f"`{p['formula']}` with N = {p['N']:,}, E1 = {p['E1']}, B1 = {p['B1']}, "
            f"E2 = {p['E2']}, B2 = {p['B2']}, r_cache = {p['r_cache']:.0f} img/s, "
            f"t1 = {1000 * p['t1']:.1f} ms, r2 = {p['r2']:.0f} img/s: caching "
            f"{p['cache_s']:.0f} s + stage 1 {p['stage1_s'] / 60:.1f} min + stage 2 "
            f"{p['stage2_s'] / 60:.1f} min = **{p['total_h']:.2f} h** (checkpoints and the "
            "final evaluation not counted; real images decode slower than the synthetic ones)."
        )
    return text


@dataclass(frozen=True)
class Section:
    """One part of the check.

    Attributes:
        title: its sub-heading in the markdown.
        run: measures; returns the section's JSON-serialisable figures.
        render: those figures as markdown.
    """

    title: str
    run: Callable[[Context], dict]
    render: Callable[[dict], str]


# The sections in the order they run (later ones read earlier figures: loader reads train_step).
SECTIONS: dict[str, Section] = {
    "tests": Section("gpu-marked tests", section_tests, _render_tests),
    "train_step": Section(
        "Stage-2 training step (benchmarks/train_step.py)", section_train_step, _render_train_step
    ),
    "amp": Section("Mixed precision in the training loop", section_amp, _render_amp),
    "loader": Section("Data loader against the step rate", section_loader, _render_loader),
    "eval": Section("Evaluation and re-ranking at MSMT17 size", section_eval, _render_eval),
    "two_stage": Section(
        "Two-stage run and the MSMT17 projection", section_two_stage, _render_two_stage
    ),
    "options": Section("Training speed options", section_options, _render_options),
}


def device_description(device: torch.device) -> dict:
    """The device and software the figures come from.

    Args:
        device: the check's device.

    Returns:
        ``device`` (the GPU's name from ``torch.cuda.get_device_name``, or 'CPU'),
        ``memory_gb``, ``capability``, ``torch``, ``cuda``, ``cudnn``, ``host``, ``cores``.
    """
    info: dict[str, Any] = {
        "device": "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "host": environment(),
        "cores": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = torch.cuda.get_device_name(device)
        info["memory_gb"] = props.total_memory / 2**30
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def render(results: dict) -> str:
    """The markdown section of a check's results.

    Args:
        results: what :func:`main` returns.

    Returns:
        Markdown text starting with a level-2 heading that names the device.
    """
    h = results["header"]
    gpu = ""
    if "memory_gb" in h:
        gpu = f"{h['device']}, {h['memory_gb']:.0f} GiB, compute capability {h['capability']}; "
    smoke = " (smoke run: tiny models on the CPU, figures meaningless)" if h["smoke"] else ""
    lines = [
        f"## GPU check: {h['device']}{smoke}",
        "",
        f"{gpu}CUDA {h['cuda']}, cuDNN {h['cudnn']}; {h['cores']} CPU cores; {h['host']}. "
        f"`{h['command']}`, {h['date']}, {results['wall_s']:.0f} s in all.",
    ]
    for name in results["order"]:
        lines += ["", f"### {SECTIONS[name].title}", ""]
        if name in results["sections"]:
            lines.append(SECTIONS[name].render(results["sections"][name]))
        else:
            reason = next(
                (f["error"] for f in results["failures"] if f["section"] == name), "not run"
            )
            lines.append(f"Not available: {reason}")
    failures = results["failures"]
    if failures:
        lines += ["", "### Failures", ""]
        rows = [[f["section"], " ".join(f["error"].replace("|", "/").split())] for f in failures]
        lines.append(_table(["section", "error"], rows, "ll"))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Entry
# ---------------------------------------------------------------------------------------------
def _write(results: dict, out: str, json_path: str) -> None:
    if out:
        write_text(out, render(results))
    if json_path:
        write_json(json_path, results)


def run_sections(ctx: Context, order: Sequence[str], limit: float, save: Callable) -> dict:
    """Run the sections in order, each in its own ``try`` and within its budget.

    Args:
        ctx: the shared context (its ``results`` receive each section's figures).
        order: section names.
        limit: seconds for all of them; a section starting later is skipped.
        save: called with the partial results after each section.

    Returns:
        ``{'sections': ..., 'failures': [{'section', 'error', 'traceback'}], 'seconds': {...}}``.
    """
    start = time.perf_counter()
    failures, seconds = [], {}
    for name in order:
        now = time.perf_counter()
        left = start + limit - now
        t0 = now
        try:
            if left <= 0:
                raise SectionSkipped(f"the check's {limit:.0f} s time limit was spent")
            ctx.deadline = now + min(ctx.sizes.budgets[name], left)
            logger.info("gpu_check: %s (budget %.0f s)", name, ctx.remaining())
            ctx.results[name] = SECTIONS[name].run(ctx)
        except Exception as err:  # noqa: BLE001 - one failure row each (Ctrl-C stops the check)
            logger.exception("gpu_check: section %s failed", name)
            failures.append(
                {
                    "section": name,
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            )
        finally:
            _free(ctx.device)
        seconds[name] = time.perf_counter() - t0
        save({"sections": ctx.results, "failures": failures, "seconds": seconds})
    return {"sections": ctx.results, "failures": failures, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the check, write the markdown (or print it) and the JSON of the raw figures.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        ``header`` (device and software), ``order`` (the sections asked for), ``sections``
        (figures by section), ``failures``, ``seconds`` (per section), ``wall_s``.
    """
    p = make_parser(
        __doc__.split("\n\n")[0],
        prog="python -m benchmarks.gpu_check",
        config=None,
        overrides=False,
    )
    p.add_argument("--smoke", action="store_true", help="tiny models and data on the CPU")
    p.add_argument("--device", default="", help="'auto' (default; --smoke: 'cpu'), 'cuda:N'")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--out", default="", help="markdown file (default: print)")
    p.add_argument(
        "--json", default="", help="raw figures (default: --out with .json; neither: none)"
    )
    p.add_argument("--root", default="", help="synthetic data folder (default: a temp dir)")
    p.add_argument(
        "--time-limit", type=float, default=0.0, help="seconds for all sections (default 420)"
    )
    args, _ = parse_args(p, argv, overrides=False)
    sizes = SMOKE if args.smoke else Sizes()
    if args.time_limit > 0:
        sizes = dataclasses.replace(sizes, time_limit=args.time_limit)
    device = resolve_device(args.device or ("cpu" if args.smoke else "auto"))
    json_path = args.json or (os.path.splitext(args.out)[0] + ".json" if args.out else "")
    order = [s for s in SECTIONS if s in args.sections]
    header = {
        **device_description(device),
        "smoke": args.smoke,
        "command": "python -m benchmarks.gpu_check " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    start = time.perf_counter()

    def save(partial: dict) -> None:
        _write(
            {"header": header, "order": order, **partial, "wall_s": time.perf_counter() - start},
            args.out,
            json_path,
        )

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(device, sizes, args.root or os.path.join(tmp, "data"), tmp)
        done = run_sections(ctx, order, sizes.time_limit, save)
    results = {"header": header, "order": order, **done, "wall_s": time.perf_counter() - start}
    _write(results, args.out, json_path)
    if not args.out:
        print(render(results))
    return results


def _cli(argv: list[str]) -> int:
    """The program: log to stderr, exit status 1 when a section failed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return 1 if main(argv)["failures"] else 0


if __name__ == "__main__":
    run_main(_cli)
