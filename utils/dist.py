"""Process-group helpers: rank queries, rank-0 gating and the one place a device is chosen."""

from __future__ import annotations

import os
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


def init_distributed(spec: str) -> torch.device:
    """Join the process group that ``torchrun`` describes and pick this rank's device.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised and this is :func:`resolve_device`.
    Otherwise the group is built from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) with NCCL on CUDA and Gloo on the CPU, and a CUDA run puts
    each rank on ``cuda:LOCAL_RANK`` (one GPU per process, whatever index ``spec`` names).

    Args:
        spec: ``MODEL.DEVICE`` ('auto', 'cpu', 'cuda', 'cuda:N'; 'mps' is single-process only).

    Returns:
        The device this rank trains on.

    Raises:
        RuntimeError: CUDA was asked for but is not available, fewer GPUs than local ranks, or
            a multi-process run on a device without a collective backend (mps).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(spec)
    if world_size <= 1:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise RuntimeError(f"MODEL.DEVICE {spec!r} has no multi-process backend; use cuda or cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return device


def cleanup() -> None:
    """Leave the process group set up by :func:`init_distributed` (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Send a picklable object from rank ``src`` to every rank (identity without a group).

    Every rank must call this (it is a collective); the value passed on other ranks is ignored.

    Args:
        obj: the object on ``src``.
        src: the sending rank.

    Returns:
        ``src``'s object, on every rank.
    """
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order (identity without a group).

    Args:
        tensor: [B, ...], the same shape on every rank (no gradient flows back).

    Returns:
        [W * B, ...] on the input's device.
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. BatchNorm running statistics) to every rank, in place.

    A collective: every rank must call it. No-op without a process group.

    Args:
        module: the same architecture on every rank.
        src: the sending rank.
    """
    if get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)
