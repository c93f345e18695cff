"""CLIP text encoder fed with token embeddings (for learnable prompts).

open_clip's text tower only accepts token ids; CoOp-style prompts need to feed embeddings in which
some positions are learnable vectors. ``TextEncoder`` reuses the tower's modules (positional
embedding, causal transformer, ln_final, text projection) under their OpenAI names and pools the
EOT position, exactly as CLIP does for token ids.

The input may be shorter than the context length L: the first ``n`` positional embeddings and the
top-left ``n x n`` block of the causal mask are used. Because the mask is causal, the features at
positions ``< n`` equal those of the full-length input whatever the dropped positions hold, so a
prompt cut right after its EOT token gives CLIP's text feature at a fraction of the cost.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TextEncoder"]


class TextEncoder(nn.Module):
    """Text transformer over prompt embeddings.

    State-dict keys: ``positional_embedding``, ``transformer.*``, ``ln_final.*``,
    ``text_projection`` (the official CLIP-ReID ``text_encoder.*`` layout).

    Args:
        transformer: open_clip text ``Transformer`` (causal blocks).
        positional_embedding: [L, D] parameter.
        ln_final: final LayerNorm.
        text_projection: [D, E] parameter (used as ``x @ text_projection``).
        attn_mask: [L, L] additive causal mask (-inf above the diagonal), or ``None`` to build it.
    """

    def __init__(
        self,
        transformer: nn.Module,
        positional_embedding: nn.Parameter,
        ln_final: nn.Module,
        text_projection: nn.Parameter,
        attn_mask: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.positional_embedding = positional_embedding
        self.ln_final = ln_final
        self.text_projection = text_projection
        length = positional_embedding.shape[0]
        if attn_mask is None:
            device = positional_embedding.device
            attn_mask = torch.full((length, length), float("-inf"), device=device).triu(1)
        # Derived from the context length: not part of checkpoints, but moved by .to().
        self.register_buffer("attn_mask", attn_mask.clone(), persistent=False)
        self._seq_first = not getattr(transformer, "batch_first", True)

    @classmethod
    def from_open_clip(cls, clip_model: nn.Module) -> TextEncoder:
        """Take the text modules of an ``open_clip.CLIP`` (shared, not copied).

        Args:
            clip_model: open_clip CLIP model with the OpenAI text layout.

        Returns:
            A ``TextEncoder`` using the same parameters.
        """
        projection = clip_model.text_projection
        if not isinstance(projection, nn.Parameter):
            raise TypeError("Only CLIP text towers with a matrix text_projection are supported")
        return cls(
            clip_model.transformer,
            clip_model.positional_embedding,
            clip_model.ln_final,
            projection,
            getattr(clip_model, "attn_mask", None),
        )

    @property
    def context_length(self) -> int:
        """Number of text positions L (77)."""
        return self.positional_embedding.shape[0]

    @property
    def width(self) -> int:
        """Token-embedding width D."""
        return self.positional_embedding.shape[1]

    @property
    def output_dim(self) -> int:
        """Projected width E."""
        return self.text_projection.shape[1]

    def forward(self, prompts: Tensor, eot_index: Tensor | int) -> Tensor:
        """Encode prompt embeddings.

        Args:
            prompts: [B, n, D] token embeddings (prefix, learnable tokens, suffix), ``n <= L``;
                ``n`` may stop right after the EOT token (see the module docstring).
            eot_index: position of the end-of-text token (``< n``): an int, or a LongTensor [B]
                or [1] (e.g. ``token_ids.argmax(-1)``; EOT has the largest id).

        Returns:
            Text features [B, E] (unnormalised, like CLIP's ``encode_text``).

        Raises:
            ValueError: more than L positions.
        """
        n = prompts.shape[1]
        if n > self.context_length:
            raise ValueError(
                f"prompts have {n} positions but the text encoder has {self.context_length}"
            )
        x = prompts + self.positional_embedding[:n].to(prompts.dtype)
        mask = self.attn_mask[:n, :n].to(x.dtype)
        if self._seq_first:
            x = self.transformer(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        else:
            x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        if isinstance(eot_index, int):
            pooled = x[:, eot_index]
        else:
            index = eot_index.to(x.device).expand(x.shape[0])
            pooled = x[torch.arange(x.shape[0], device=x.device), index]
        return pooled @ self.text_projection.to(pooled.dtype)
