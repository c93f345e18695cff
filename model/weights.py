"""Pretrained CLIP weights: download with SHA-256 verification, local files, open_clip tags.

Sources, chosen by ``MODEL.PRETRAIN_PATH`` and ``MODEL.PRETRAIN_TAG``:

* ``PRETRAIN_PATH`` set: that local file (OpenAI TorchScript archive, plain state dict with or
  without the three integer entries, or ``.safetensors``). ``PRETRAIN_TAG`` then only says what
  the file is ('openai' by default: QuickGELU; an open_clip tag: that tag's activation).
* ``PRETRAIN_TAG 'openai'``: OpenAI's file for the architecture, downloaded once into the cache
  directory and verified with its full SHA-256 (a cached file that does not match is downloaded
  again; a download that does not match raises).
* another open_clip tag (e.g. 'laion2b_s34b_b88k', 'datacomp_xl_s13b_b90k', 'dfn2b'): fetched by
  open_clip (Hugging Face Hub cache); GELU or QuickGELU from open_clip's pretrained config.
* ``PRETRAIN_TAG 'none'``: random initialisation (the tiny test/demo variants).

Offline, a missing file raises ``WeightsUnavailableError`` naming the file, its URL, where to put
it and which key to set instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from model.clip.arch import CLIPArch, create_clip
from utils.checkpoint import (
    CheckpointFormatError,
    atomic_write,
    is_torchscript_archive,
    read_checkpoint,
    sha256_file,
    strip_wrapper_prefixes,
)

__all__ = [
    "OPENAI_WEIGHTS",
    "TRUST_ENV",
    "OpenAIWeights",
    "WeightsUnavailableError",
    "create_pretrained_clip",
    "default_cache_dir",
    "download_openai_weights",
    "fetch_clip_state_dict",
    "load_clip_state_dict",
    "load_openai_state_dict",
    "sha256_file",
    "uses_quick_gelu",
]

logger = logging.getLogger(__name__)

# Set to 1 to load a TorchScript archive that is not one of OpenAI's releases (it runs code).
TRUST_ENV = "CLIPREID_TRUST_TORCHSCRIPT"
# Entries of OpenAI's TorchScript archives that are not weights.
_OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class OpenAIWeights:
    """One file on OpenAI's CDN; the second-to-last URL segment is the file's SHA-256.

    Attributes:
        url: download URL.
        sha256: full SHA-256 hex digest of the file.
    """

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        """File name in the cache directory (the last URL segment)."""
        return self.url.rsplit("/", 1)[-1]


_CDN = "https://openaipublic.azureedge.net/clip/models"
OPENAI_WEIGHTS: dict[str, OpenAIWeights] = {
    "ViT-B-16": OpenAIWeights(
        f"{_CDN}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    ),
    "RN50": OpenAIWeights(
        f"{_CDN}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
        "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    ),
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (offline, or the source is unreachable)."""


def default_cache_dir() -> Path:
    """Directory for downloaded OpenAI files: ``$CLIPREID_CACHE_DIR`` or ``~/.cache/clip``.

    Returns:
        The directory (not created here). ``~/.cache/clip`` is shared with OpenAI's ``clip``
        package and open_clip, so a file they downloaded is reused.
    """
    env = os.environ.get("CLIPREID_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/clip").expanduser()


def _download(url: str, dst: Path) -> None:
    """Fetch ``url`` into ``dst`` (tests replace this function to simulate being offline)."""
    with urllib.request.urlopen(url, timeout=60) as source, open(dst, "wb") as out:
        shutil.copyfileobj(source, out, length=1 << 20)


def _offline_message(name: str, entry: OpenAIWeights, target: Path, reason: object) -> str:
    return (
        f"Could not download the OpenAI CLIP weights for {name} ({reason}). Download "
        f"{entry.filename} from {entry.url} and put it at {target} (SHA-256 {entry.sha256}), "
        f"or set MODEL.PRETRAIN_PATH to a local copy of the file."
    )


def download_openai_weights(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return OpenAI's weight file for an architecture, downloading it if needed.

    A cached file is used only if its full SHA-256 matches; otherwise it is downloaded again.
    The download goes to a temporary file that replaces the target only after verification.

    Args:
        name: key of ``OPENAI_WEIGHTS`` ('ViT-B-16' or 'RN50').
        cache_dir: directory of the cached files (default ``default_cache_dir()``).

    Returns:
        Path of the verified file.

    Raises:
        ValueError: no OpenAI file is known for ``name``.
        WeightsUnavailableError: the download failed (e.g. offline).
        RuntimeError: the downloaded file's SHA-256 does not match.
    """
    if name not in OPENAI_WEIGHTS:
        raise ValueError(
            f"No OpenAI CLIP weights for MODEL.NAME {name!r} (known: {', '.join(OPENAI_WEIGHTS)}). "
            f"Use MODEL.PRETRAIN_TAG 'none' for random initialisation."
        )
    entry = OPENAI_WEIGHTS[name]
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = directory / entry.filename
    if target.is_file():
        if sha256_file(target) == entry.sha256:
            return target
        logger.warning("%s exists but its SHA-256 does not match; downloading it again", target)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsUnavailableError(_offline_message(name, entry, target, err)) from err

    def fetch_verified(tmp: str) -> None:
        try:
            _download(entry.url, Path(tmp))
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise WeightsUnavailableError(_offline_message(name, entry, target, err)) from err
        digest = sha256_file(tmp)
        if digest != entry.sha256:
            raise RuntimeError(
                f"Downloaded {entry.url} but its SHA-256 is {digest}, expected {entry.sha256}; "
                f"the file was discarded"
            )

    logger.info("Downloading %s to %s", entry.url, target)
    atomic_write(target, fetch_verified)  # the file appears only once verified
    return target


def _known_release(digest: str) -> str | None:
    """Name of the OpenAI release whose file has this SHA-256, if any."""
    return next((name for name, e in OPENAI_WEIGHTS.items() if e.sha256 == digest), None)


def _load_torchscript(path: Path, trust: bool | None) -> dict[str, Tensor]:
    """State dict of a TorchScript archive that is a known OpenAI release or explicitly trusted."""
    if trust is None:
        trust = os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")
    if not trust:
        digest = sha256_file(path)
        if _known_release(digest) is None:
            raise CheckpointFormatError(
                f"MODEL.PRETRAIN_PATH {str(path)!r} is a TorchScript archive whose SHA-256 "
                f"{digest} is not one of OpenAI's CLIP releases ({', '.join(OPENAI_WEIGHTS)}); "
                f"loading an archive runs the code inside it, so it was not loaded. Use "
                f"OpenAI's file (MODEL.PRETRAIN_TAG 'openai' downloads and verifies it), a state "
                f"dict or .safetensors file, or set {TRUST_ENV}=1 if you trust this archive"
            )
    with warnings.catch_warnings():
        # torch.jit is deprecated but it is the only reader of OpenAI's archives.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def load_openai_state_dict(path: str | Path, trust: bool | None = None) -> dict[str, Tensor]:
    """Read CLIP weights in OpenAI's key layout from a local file.

    Accepts OpenAI's TorchScript archives (only the state dict is used), plain state dicts
    (optionally nested under 'state_dict' and/or with 'module.' prefixes) and ``.safetensors``
    files. The three integer entries of the archives are dropped; dtypes are kept (fp16 tensors
    are cast when copied into the fp32 model). State dicts are read as plain data
    (``utils.checkpoint.read_checkpoint``); an archive is loaded only when its SHA-256 is one of
    ``OPENAI_WEIGHTS`` or it is trusted, since loading one runs its code.

    Args:
        path: the file (``MODEL.PRETRAIN_PATH``).
        trust: load a TorchScript archive whatever its hash; None reads the
            ``CLIPREID_TRUST_TORCHSCRIPT`` environment variable ('1' trusts).

    Returns:
        ``{key: tensor}`` with keys such as ``visual.conv1.weight`` and ``token_embedding.weight``.

    Raises:
        FileNotFoundError: the file does not exist.
        utils.checkpoint.CheckpointFormatError: an unknown, untrusted TorchScript archive, or a
            file that is not a state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MODEL.PRETRAIN_PATH {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = dict(load_file(str(path), device="cpu"))
    elif is_torchscript_archive(path):
        state_dict = _load_torchscript(path, trust)
    else:
        obj = read_checkpoint(path, "MODEL.PRETRAIN_PATH", "CLIP weights (a state dict)")
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointFormatError(
                f"MODEL.PRETRAIN_PATH {str(path)!r} holds a {type(obj).__name__}, not a state dict"
            )
        state_dict = obj
    state_dict = strip_wrapper_prefixes(state_dict)
    for key in _OPENAI_INT_KEYS:
        state_dict.pop(key, None)
    return state_dict


def uses_quick_gelu(arch: CLIPArch, tag: str) -> bool:
    """Activation of the weights named by a pretrained tag.

    Args:
        arch: architecture spec.
        tag: ``MODEL.PRETRAIN_TAG``.

    Returns:
        True for OpenAI weights and random init (OpenAI's architecture); for other open_clip
        tags, open_clip's ``quick_gelu`` flag of that tag.
    """
    tag = tag.lower()
    if tag in ("openai", "none"):
        return True
    return bool(_open_clip_cfg(arch, tag).get("quick_gelu", False))


def _open_clip_cfg(arch: CLIPArch, tag: str) -> dict:
    cfg = open_clip.get_pretrained_cfg(arch.open_clip_name, tag) if arch.open_clip_name else {}
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch.open_clip_name or "")
        valid = ", ".join(["openai", "none", *[t for t in tags if t != "openai"]])
        raise ValueError(
            f"Unknown MODEL.PRETRAIN_TAG {tag!r} for MODEL.NAME {arch.name!r}. Valid: {valid}."
        )
    return cfg


def fetch_clip_state_dict(
    arch: CLIPArch,
    tag: str = "openai",
    path: str = "",
    cache_dir: str | Path | None = None,
) -> tuple[dict[str, Tensor] | None, bool]:
    """Resolve ``MODEL.PRETRAIN_PATH`` / ``MODEL.PRETRAIN_TAG`` into a state dict.

    Args:
        arch: architecture spec.
        tag: 'openai', another open_clip tag of the architecture, or 'none'.
        path: local weight file; overrides the download (the tag still gives the activation).
        cache_dir: directory for OpenAI downloads (open_clip tags use open_clip's cache).

    Returns:
        (state dict in OpenAI key layout, or ``None`` for random init; QuickGELU flag).

    Raises:
        ValueError: unknown tag, or a path together with tag 'none'.
        WeightsUnavailableError: the weights cannot be downloaded.
    """
    tag = (tag or "none").lower()
    if path:
        if tag == "none":
            raise ValueError(
                "MODEL.PRETRAIN_PATH is set but MODEL.PRETRAIN_TAG is 'none'; set the tag to "
                "'openai' (or the open_clip tag the file comes from) or clear the path"
            )
        quick = uses_quick_gelu(arch, tag)
        logger.info("Loading CLIP weights from %s (QuickGELU %s)", path, quick)
        return load_openai_state_dict(path), quick
    if tag == "none":
        return None, True
    if tag == "openai":
        if arch.name not in OPENAI_WEIGHTS:
            raise ValueError(
                f"No OpenAI CLIP weights for MODEL.NAME {arch.name!r}; set MODEL.PRETRAIN_TAG "
                f"'none' (random init) or MODEL.PRETRAIN_PATH"
            )
        file = download_openai_weights(arch.name, cache_dir)
        return load_openai_state_dict(file, trust=True), True  # verified by its SHA-256
    cfg = _open_clip_cfg(arch, tag)
    quick = bool(cfg.get("quick_gelu", False))
    try:
        file = open_clip.download_pretrained(cfg)
    except Exception as err:  # network, hub and file errors all mean "not available here"
        source = cfg.get("hf_hub") or cfg.get("url")
        raise WeightsUnavailableError(
            f"Could not fetch the open_clip weights {arch.open_clip_name}:{tag} from {source} "
            f"({err}). Download them (a Hugging Face Hub repository '{cfg.get('hf_hub', '')}' "
            f"goes to the Hugging Face cache) or set MODEL.PRETRAIN_PATH to a local copy and "
            f"keep MODEL.PRETRAIN_TAG {tag!r}."
        ) from err
    if not file:
        raise WeightsUnavailableError(f"open_clip has no download source for {tag!r}")
    return load_openai_state_dict(file), quick


def load_clip_state_dict(
    clip_model: nn.Module, state_dict: dict[str, Tensor], arch_name: str = ""
) -> tuple[list[str], list[str]]:
    """Copy CLIP weights into an ``open_clip.CLIP`` and report what did not fit.

    Missing and unexpected keys are logged as warnings (BatchNorm ``num_batches_tracked``
    counters, which some files omit, are not reported); shape mismatches raise.

    Args:
        clip_model: target model (pre-training grid, OpenAI key layout).
        state_dict: OpenAI-layout state dict.
        arch_name: ``MODEL.NAME``, for error messages.

    Returns:
        (missing keys, unexpected keys).

    Raises:
        ValueError: no key matches (e.g. a ReID checkpoint was given), or shapes differ.
    """
    own = clip_model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k not in _OPENAI_INT_KEYS}
    if not set(own) & set(state_dict):
        sample = ", ".join(sorted(state_dict)[:3])
        raise ValueError(
            f"None of the weight file's keys ({sample}, ...) are CLIP keys. A CLIP-ReID "
            f"checkpoint is loaded with TEST.WEIGHT / load_reid_checkpoint, not "
            f"MODEL.PRETRAIN_PATH."
        )
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ValueError(
            f"The CLIP weights do not fit MODEL.NAME {arch_name!r} ({len(bad)} shape "
            f"mismatches, e.g. {'; '.join(bad[:3])}). Check MODEL.NAME and MODEL.PRETRAIN_PATH."
        )
    result = clip_model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    if missing:
        logger.warning(
            "CLIP weights: %d missing keys left at init: %s", len(missing), ", ".join(missing[:10])
        )
    if unexpected:
        logger.warning(
            "CLIP weights: %d unexpected keys ignored: %s",
            len(unexpected),
            ", ".join(unexpected[:10]),
        )
    return missing, unexpected


def create_pretrained_clip(
    arch: CLIPArch,
    tag: str = "openai",
    path: str = "",
    cache_dir: str | Path | None = None,
) -> nn.Module:
    """Build open_clip's CLIP for an architecture and load its pretrained weights.

    Args:
        arch: architecture spec.
        tag: ``MODEL.PRETRAIN_TAG``.
        path: ``MODEL.PRETRAIN_PATH``.
        cache_dir: directory for OpenAI downloads.

    Returns:
        ``open_clip.CLIP`` (fp32, CPU, training mode) at the pre-training grid, with the
        activation the weights were trained with.
    """
    state_dict, quick_gelu = fetch_clip_state_dict(arch, tag, path, cache_dir)
    clip_model = create_clip(arch, quick_gelu=quick_gelu)
    if state_dict is not None:
        load_clip_state_dict(clip_model, state_dict, arch.name)
    return clip_model
