"""Process-group helpers: rank queries, rank-0 gating and the one place a device is chosen."""

from __future__ import annotations

import torch
import torch.distributed as dist


def get_rank() -> int:
    """Return this process's rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Return the number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0: the process that writes logs, metrics and checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if get_world_size() > 1:
        dist.barrier()


def resolve_device(spec: str) -> torch.device:
    """Turn ``MODEL.DEVICE`` into a ``torch.device``.

    Args:
        spec: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.

    Returns:
        The device the entry script moves the model and batches to.

    Raises:
        RuntimeError: CUDA was asked for but is not available.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE = {spec!r} but CUDA is not available here; use MODEL.DEVICE auto or cpu"
        )
    return device
