"""CLIP BPE tokenizer access (open_clip's copy of OpenAI's tokenizer and vocabulary)."""

from __future__ import annotations

import open_clip
import torch

__all__ = ["CONTEXT_LENGTH", "EOT_ID", "SOT_ID", "tokenize", "word_token_id"]

CONTEXT_LENGTH = 77
SOT_ID = 49406
EOT_ID = 49407


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Tokenize texts with the CLIP BPE: [SOT] ids [EOT], zero-padded.

    Unlike ``open_clip.tokenize`` (which truncates silently), a text that does not fit raises.

    Args:
        texts: one text or a list of texts.
        context_length: output length L (77 for CLIP).

    Returns:
        Token ids, int64 [N, L].

    Raises:
        ValueError: a text needs more than ``context_length`` tokens.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    # Tokenize into a generous length first to detect texts that open_clip would truncate.
    wide = open_clip.tokenize(texts, context_length=max(4 * context_length, 1024))
    lengths = (wide != 0).sum(dim=1)
    too_long = [t for t, n in zip(texts, lengths.tolist(), strict=True) if n > context_length]
    if too_long:
        raise ValueError(
            f"Text needs more than {context_length} tokens (including SOT/EOT): {too_long[0]!r}"
        )
    return wide[:, :context_length].contiguous()


def word_token_id(word: str) -> int:
    """The single BPE token id of a word (e.g. 343 for 'X', 2533 for 'person').

    Args:
        word: a word that the tokenizer maps to exactly one token.

    Returns:
        Its token id.

    Raises:
        ValueError: the word is split into several tokens (or none).
    """
    ids = tokenize(word)[0]
    body = ids[1 : int((ids != 0).sum()) - 1]
    if body.numel() != 1:
        raise ValueError(f"{word!r} is not a single CLIP token (it gives {body.tolist()})")
    return int(body[0])
