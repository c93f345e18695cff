"""Stage-1 speed: this project's prompt encoding vs the official per-sample, full-context one.

Stage 1 trains only the prompt tokens against cached image features, so an epoch is text-encoder
forward + backward passes. Both variants run on the same batches of the same epoch order, from
the same parameters and optimizer state (restored before each variant's step), in one process:

* ours: the text feature is computed once per unique ID of the batch and gathered per sample;
  the text transformer runs over the positions up to the prompt's EOT token only
  (``ReIDModel.encode_text``), then ``loss.build.stage1_loss`` and an optimizer step (what
  ``processor.stage1`` does per iteration);
* official: one prompt per sample at the full 77-token context
  (``text_encoder(prompt_learner(pids), eot)``), same loss and step.

The model is built from the config (``MODEL.NAME``, random weights: ``MODEL.PRETRAIN_TAG
'none'``, nothing downloaded), the features are random ``[N, E]`` and the labels follow the
dataset size given (Market-1501's by default). Only ``--iters`` iterations are timed; the epoch
time is the best (fastest) of them times the epoch's iteration count (best-of, because a shared
machine only ever adds time; the means are reported too). The losses of the two variants are
compared on every iteration (they compute the same function).

Usage:
    python benchmarks/stage1_speed.py                       # ViT-B-16, batch 64, 4 iterations
    python benchmarks/stage1_speed.py --iters 5 --json out.json
    python benchmarks/stage1_speed.py --model ViT-T-16-test --iters 2   # seconds, smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from configs.defaults import get_cfg_defaults  # noqa: E402
from loss.build import stage1_loss  # noqa: E402
from model.build import build_model  # noqa: E402
from model.reid_model import ReIDModel  # noqa: E402
from solver.optimizer import build_optimizer  # noqa: E402

logger = logging.getLogger("benchmarks.stage1_speed")

VARIANTS = ("ours", "official")


def ours_text(model: ReIDModel, pids: torch.Tensor) -> torch.Tensor:
    """Text features [B, E]: one truncated-context encoding per unique ID, gathered per sample."""
    unique, inverse = torch.unique(pids, return_inverse=True)
    return model.encode_text(unique)[inverse]


def official_text(model: ReIDModel, pids: torch.Tensor) -> torch.Tensor:
    """Text features [B, E]: one full-context (77 positions) encoding per sample."""
    prompts = model.prompt_learner(pids)  # length None: the whole context
    return model.text_encoder(prompts, model.prompt_learner.eot_index)


TEXT_FNS: dict[str, Callable[[ReIDModel, torch.Tensor], torch.Tensor]] = {
    "ours": ours_text,
    "official": official_text,
}


def build(name: str, num_ids: int, seed: int = 0) -> tuple[ReIDModel, torch.optim.Optimizer, float]:
    """Stage-1 model and optimizer as the training entry point builds them (random weights).

    Args:
        name: ``MODEL.NAME``.
        num_ids: identities C (rows of the prompt tokens).
        seed: torch seed of the random weights.

    Returns:
        (model with only the prompt tokens trainable, its stage-1 optimizer, MODEL.TEMPERATURE).
    """
    cfg = get_cfg_defaults()
    cfg.MODEL.NAME = name
    cfg.MODEL.PRETRAIN_TAG = "none"
    cfg.MODEL.PROMPT_CLASS = "person"
    torch.manual_seed(seed)
    model = build_model(cfg, num_ids, 1, 1, load_pretrained=False)
    model.set_trainable("prompts")
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return model, build_optimizer(cfg, trainable, stage=1), float(cfg.MODEL.TEMPERATURE)


def run(
    name: str = "ViT-B-16",
    num_ids: int = 751,
    num_images: int = 12936,
    batch: int = 64,
    iters: int = 4,
    warmup: int = 1,
    seed: int = 0,
) -> dict:
    """Time both variants on the first ``warmup + iters`` batches of one epoch.

    Args:
        name: ``MODEL.NAME`` (random weights).
        num_ids: identities C.
        num_images: cached features N (the epoch length is ``ceil(N / batch)`` iterations).
        batch: features per iteration (``SOLVER.STAGE1.IMS_PER_BATCH``).
        iters: timed iterations per variant.
        warmup: untimed iterations per variant first.
        seed: seed of the weights, features and epoch order.

    Returns:
        A dict: per-variant best and mean iteration seconds (``ours_s``, ``ours_mean_s``,
        ``official_s``, ...) and extrapolated epoch seconds (``ours_epoch_s``,
        ``official_epoch_s``), ``speedup`` (of the best times) and ``speedup_mean``, the mean
        number of unique IDs per batch, the largest loss difference between the variants, and
        the setup.
    """
    model, optimizer, temperature = build(name, num_ids, seed)
    gen = torch.Generator().manual_seed(seed)
    dim = model.text_encoder.output_dim
    feats = torch.randn(num_images, dim, generator=gen)
    pids = torch.arange(num_images) % num_ids
    order = torch.randperm(num_images, generator=gen)
    epoch_iters = math.ceil(num_images / batch)
    ctx = model.prompt_learner.cls_ctx
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    uniques, loss_diff = [], 0.0
    for it in range(warmup + iters):
        idx = order[it * batch : (it + 1) * batch]
        f, p = feats[idx], pids[idx]
        start_ctx, start_opt = ctx.detach().clone(), copy.deepcopy(optimizer.state_dict())
        losses = {}
        for variant in VARIANTS:
            with torch.no_grad():
                ctx.copy_(start_ctx)
            optimizer.load_state_dict(copy.deepcopy(start_opt))
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            text = TEXT_FNS[variant](model, p)
            loss = sum(stage1_loss(f, text.float(), p, temperature).values())
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - t0
            losses[variant] = loss.item()
            if it >= warmup:
                times[variant].append(elapsed)
        loss_diff = max(loss_diff, abs(losses["ours"] - losses["official"]))
        uniques.append(int(torch.unique(p).numel()))
        logger.info(
            "it %d: ours %.3fs official %.3fs (%d unique IDs of %d)",
            it,
            *(times[v][-1] if it >= warmup else float("nan") for v in VARIANTS),
            uniques[-1],
            len(p),
        )
    out: dict = {
        "model": name,
        "batch": batch,
        "num_ids": num_ids,
        "num_images": num_images,
        "epoch_iters": epoch_iters,
        "timed_iters": iters,
        "threads": torch.get_num_threads(),
        "context": model.prompt_learner.context_length,
        "prompt_length": model.prompt_learner.prompt_length,
        "mean_unique_ids": sum(uniques) / len(uniques),
        "max_loss_diff": loss_diff,
    }
    for variant in VARIANTS:
        out[f"{variant}_s"] = min(times[variant])
        out[f"{variant}_mean_s"] = sum(times[variant]) / len(times[variant])
        out[f"{variant}_epoch_s"] = out[f"{variant}_s"] * epoch_iters
    out["speedup"] = out["official_s"] / out["ours_s"]
    out["speedup_mean"] = out["official_mean_s"] / out["ours_mean_s"]
    return out


def report(r: dict) -> str:
    """The result as a small table, both variants side by side."""
    return "\n".join(
        [
            f"{r['model']}, batch {r['batch']}, {r['num_images']} features of {r['num_ids']} IDs "
            f"({r['epoch_iters']} it/epoch), {r['timed_iters']} timed it, {r['threads']} threads",
            f"{'variant':<9} {'positions':>9} {'encodings/it':>12} {'best s/it':>9} "
            f"{'mean s/it':>9} {'s/epoch':>8}",
            *(
                f"{v:<9} {pos:>9} {enc:>12.1f} {r[v + '_s']:>9.3f} {r[v + '_mean_s']:>9.3f} "
                f"{r[v + '_epoch_s']:>8.1f}"
                for v, pos, enc in (
                    ("official", r["context"], r["batch"]),
                    ("ours", r["prompt_length"], r["mean_unique_ids"]),
                )
            ),
            f"speed-up {r['speedup']:.2f}x (best), {r['speedup_mean']:.2f}x (mean); largest loss "
            f"difference {r['max_loss_diff']:.2e}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark and print both times and their ratio.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The figures of :func:`run`.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-16", help="MODEL.NAME (random weights)")
    p.add_argument("--num-ids", type=int, default=751, help="identities (Market-1501: 751)")
    p.add_argument("--num-images", type=int, default=12936, help="cached features per epoch")
    p.add_argument("--batch", type=int, default=64, help="SOLVER.STAGE1.IMS_PER_BATCH")
    p.add_argument("--iters", type=int, default=4, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per variant")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.model, args.num_ids, args.num_images, args.batch, args.iters, args.warmup)
    print(report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
