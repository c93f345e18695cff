"""Seeding. Every epoch re-seeds from (seed, stage, epoch), so a resumed run replays exactly."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices).

    Args:
        seed: any non-negative integer.
    """
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """Derive the seed of one epoch of one stage, independent of what ran before it.

    Args:
        seed: the run seed (``SOLVER.SEED``).
        stage: 1 or 2.
        epoch: 1-based epoch index.

    Returns:
        A seed in [0, 2**31).
    """
    return int(np.random.SeedSequence([int(seed), int(stage), int(epoch)]).generate_state(1)[0]) % (
        2**31
    )


def get_rng_state() -> dict:
    """Capture python, numpy and torch RNG states in a form ``torch.load(weights_only=True)`` reads.

    Returns:
        A dict of plain lists and tensors.
    """
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states captured by :func:`get_rng_state`.

    Args:
        state: the dict returned by :func:`get_rng_state`.
    """
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state[0].numpy().astype(np.uint32), *np_state[1:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
