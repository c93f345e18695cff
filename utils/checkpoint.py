"""File I/O: atomic writes of every file the project produces, and the one safe checkpoint reader.

Writes: checkpoints, configs, JSON results and tables go to a temporary file beside the target,
are flushed to disk, then moved over it with ``os.replace``: a crash leaves the old file or the
new one, never half of one.

Reads: :func:`read_checkpoint` loads with ``torch.load(weights_only=True)`` only, so a file can
hold tensors, numbers, strings and plain containers and nothing that runs code. This project's
checkpoints and the official CLIP-ReID ones are all of that kind. A file that is not a checkpoint
(truncated, a YAML config, an image, a TorchScript archive) fails with one message naming the
file, the option that named it and what was expected.

torch is imported inside the functions that need it: the config loader and the run-planning tools
write their files through this module without loading torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from utils.faults import fault_point

__all__ = [
    "CHECKPOINT_EXPECTED",
    "TRAINING_KEYS",
    "WRAPPER_PREFIXES",
    "CheckpointFormatError",
    "atomic_write",
    "is_torchscript_archive",
    "load_training_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "sha256_file",
    "strip_wrapper_prefixes",
    "write_json",
    "write_text",
]

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
CHECKPOINT_EXPECTED = (
    "a .pth file written by torch.save holding a state dict or a dict with a 'model' entry"
)
# What a training checkpoint (OUTPUT_DIR/last.pth) must hold to resume a run.
TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "stage", "epoch", "rng")


class CheckpointFormatError(ValueError):
    """A file given as a checkpoint cannot be used as one; the message names it and the fix."""


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Create or replace ``path`` atomically.

    ``write`` writes the content to the temporary path it is given (in the same folder, so the
    final ``os.replace`` is a rename on one filesystem); the file is flushed to disk and then
    moved over ``path``. If ``write`` raises, the temporary file is removed and ``path`` is left
    as it was.

    Args:
        path: destination file; its folder is created.
        write: called once with the temporary file's path.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers never share a temporary file
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the rename makes it visible
        finally:
            os.close(fd)
        fault_point("write")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write`).

    Args:
        path: destination file; its folder is created.
        text: the content.
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (see :func:`atomic_write`).

    Args:
        path: destination file; its folder is created.
        obj: a JSON-serialisable object.
        indent: JSON indentation.
    """
    write_text(path, json.dumps(obj, indent=indent))


def save_checkpoint(state: Any, path: str | Path) -> None:
    """Write a checkpoint atomically with ``torch.save`` (rank 0 only).

    Store only tensors, numbers, strings and plain containers of them (a config as
    ``cfg.dump()`` text, not the node): :func:`read_checkpoint` refuses anything else.

    Args:
        state: the object to save.
        path: destination file; its folder is created.
    """
    import torch

    from utils.dist import is_main_process

    if not is_main_process():
        return
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    logger.info("saved %s", path)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def is_torchscript_archive(path: str | Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; torch.save files have none.

    Args:
        path: an existing file.

    Returns:
        True for a TorchScript archive (e.g. OpenAI's CLIP weight files).
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _file_kind(path: Path) -> str | None:
    """What a file that is not a checkpoint looks like, from its first bytes (None: unknown)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return None  # a zip archive or a pickle: torch.save's two formats
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\0" in text:
        return None
    yaml_like = path.suffix.lower() in (".yml", ".yaml") or re.match(r"\s*[A-Z_]+\s*:", text)
    return "a text file (a YAML config?)" if yaml_like else "a text file"


def read_checkpoint(
    path: str | Path, source: str = "checkpoint", expected: str = CHECKPOINT_EXPECTED
) -> Any:
    """Load a checkpoint on the CPU, safely: tensors, numbers, strings and containers only.

    Args:
        path: the file.
        source: the option or config key that named it (e.g. 'TEST.WEIGHT'), for the messages.
        expected: what the file should be, in words, for the messages.

    Returns:
        The stored object.

    Raises:
        FileNotFoundError: the file does not exist (names it and ``source``).
        CheckpointFormatError: not a loadable checkpoint: truncated or damaged, another kind of
            file, a TorchScript archive, or Python objects other than plain data (refused
            without running them).
    """
    import torch

    path = Path(path).expanduser()
    where = f"{source} {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    kind = _file_kind(path)
    if kind is not None:
        raise CheckpointFormatError(f"{where} is {kind}, not a checkpoint: expected {expected}")
    if is_torchscript_archive(path):
        raise CheckpointFormatError(
            f"{where} is a TorchScript archive (such as OpenAI's CLIP weights), not a "
            f"checkpoint: expected {expected}. Pretrained CLIP weights go in MODEL.PRETRAIN_PATH"
        )
    try:
        with warnings.catch_warnings():
            # A pickle of another protocol than torch.save's is refused below if it is unsafe.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise CheckpointFormatError(
                f"{where} cannot be read as plain data (truncated, damaged, another kind of "
                f"file, or Python objects, which are not loaded): expected {expected}"
            ) from None
        raise CheckpointFormatError(
            f"{where} holds Python objects ({found.group(1)}) besides tensors, numbers, "
            f"strings and containers; it was not loaded, since loading such objects can run "
            f"code. Expected {expected}. If you made the file yourself from trusted code, "
            f"save plain data instead (a state dict; a config as cfg.dump() text)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        reason = str(err).split(". ")[0]
        raise CheckpointFormatError(
            f"{where} cannot be read ({reason}; truncated or damaged?): expected {expected}"
        ) from None


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Full SHA-256 hex digest of a file, read in chunks.

    Args:
        path: file to hash.
        chunk_size: bytes per read.

    Returns:
        64 lowercase hex characters.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the ``module.`` / ``_orig_mod.`` prefixes that model wrappers add to keys.

    Args:
        state_dict: ``{key: value}``; any mix of prefixed and plain keys.

    Returns:
        A new dict with every leading wrapper prefix removed from every key (in any order and
        number, e.g. 'module._orig_mod.x' -> 'x').
    """
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def load_training_checkpoint(path: str | Path, source: str = "SOLVER.RESUME") -> dict[str, Any]:
    """Read and check a training checkpoint (``OUTPUT_DIR/last.pth``) before a run resumes.

    Args:
        path: the file.
        source: the option or key that named it, for the messages.

    Returns:
        The checkpoint dict: model, optimizer, scheduler, scaler, stage, epoch, rng (and config,
        metrics when present).

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointFormatError: not readable (see :func:`read_checkpoint`), not a training
            checkpoint (a weights-only file, say), or its model weights hold NaN or Inf.
    """
    import torch

    where = f"{source} {str(path)!r}"
    ckpt = read_checkpoint(path, source, "a training checkpoint (OUTPUT_DIR/last.pth)")
    missing = [k for k in TRAINING_KEYS if not isinstance(ckpt, Mapping) or k not in ckpt]
    if missing:
        raise CheckpointFormatError(
            f"{where} is not a training checkpoint: it lacks {', '.join(missing)}. Resume from "
            "OUTPUT_DIR/last.pth; the {MODEL.NAME}_{epoch}.pth files hold weights only "
            "(evaluate them with TEST.WEIGHT)"
        )
    model = ckpt["model"]
    if not isinstance(model, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in model.values()
    ):
        raise CheckpointFormatError(f"{where}: its 'model' entry is not a state dict of tensors")
    if ckpt["stage"] not in (1, 2) or not isinstance(ckpt["epoch"], int) or ckpt["epoch"] < 0:
        raise CheckpointFormatError(
            f"{where}: stage {ckpt['stage']!r} / epoch {ckpt['epoch']!r} are not a stage (1 or "
            "2) and a finished epoch count"
        )
    bad = [
        k for k, v in model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise CheckpointFormatError(
            f"{where}: the model weights hold NaN or Inf ({', '.join(bad[:5])}): training "
            f"diverged before stage {ckpt['stage']} epoch {ckpt['epoch']} was saved. Resume from "
            "an earlier checkpoint, or start again with a lower learning rate"
        )
    return dict(ckpt)
