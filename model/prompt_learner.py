"""ID-specific learnable prompts (CLIP-ReID stage 1).

A template such as ``"A photo of a X X X X person."`` is tokenized with the CLIP BPE; its
``n_ctx`` "X" placeholders are replaced, for every identity, by learnable vectors
``cls_ctx[pid]`` ([C, M, D], init N(0, 0.02^2)); everything before them (``token_prefix``) and
after them (``token_suffix``, which holds the class word, '.', EOT and padding) is embedded once
with CLIP's token embedding and kept as buffers.

Every prompt of a learner shares the template, so the end-of-text (EOT) token sits at the same
position ``p_eot`` for every identity, and the text transformer's causal mask keeps the positions
after it from changing the EOT feature. ``forward(pids, length=prompt_length)`` therefore returns
only the ``p_eot + 1`` positions the EOT feature depends on (12 of 77 for the default prompt);
the buffers keep their full-context shapes, so checkpoints keep the official layout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.clip.tokenizer import CONTEXT_LENGTH, tokenize, word_token_id

__all__ = ["PromptLearner", "format_prompt_template"]


def format_prompt_template(
    template: str, n_ctx: int, class_word: str, placeholder: str = "X"
) -> str:
    """Fill a prompt template's ``{ctx}`` and ``{cls}`` fields.

    Args:
        template: e.g. ``'A photo of a {ctx} {cls}.'`` (``MODEL.PROMPT_TEMPLATE``).
        n_ctx: number M of learnable tokens (``MODEL.PROMPT_N_CTX``).
        class_word: e.g. ``'person'`` or ``'vehicle'`` (``MODEL.PROMPT_CLASS``).
        placeholder: the word standing for one learnable token.

    Returns:
        The prompt text, e.g. ``'A photo of a X X X X person.'``.

    Raises:
        ValueError: the template has no ``{ctx}`` field or an unknown field.
    """
    if "{ctx}" not in template:
        raise ValueError(
            f"MODEL.PROMPT_TEMPLATE must contain '{{ctx}}' (where the learnable tokens go), "
            f"got {template!r}"
        )
    if n_ctx < 1:
        raise ValueError(f"MODEL.PROMPT_N_CTX must be at least 1, got {n_ctx}")
    try:
        return template.format(ctx=" ".join([placeholder] * n_ctx), cls=class_word)
    except (KeyError, IndexError) as err:
        raise ValueError(
            f"MODEL.PROMPT_TEMPLATE may only use the fields {{ctx}} and {{cls}}: {template!r}"
        ) from err


class PromptLearner(nn.Module):
    """Learnable ID-specific prompt tokens.

    Args:
        num_classes: number C of training identities.
        template: prompt text with exactly ``n_ctx`` consecutive placeholder words, e.g.
            ``'A photo of a X X X X person.'``.
        n_ctx: number M of learnable tokens per identity.
        token_embedding: CLIP token embedding [vocab, D]; used once to embed the fixed parts.
        placeholder: the placeholder word (a single CLIP token).
        context_length: text length L of the text encoder.
        init_std: std of the normal init of ``cls_ctx``.

    Buffers:
        token_prefix [1, p, D], token_suffix [1, L - p - M, D] and tokenized_prompts [1, L]
        (int64 token ids; its argmax is the EOT position used to pool the text features).

    Attributes:
        prompt_length: positions up to and including EOT (``p_eot + 1``), the shortest context
            that gives the full-context text features; recomputed when a state dict is loaded.
    """

    def __init__(
        self,
        num_classes: int,
        template: str,
        n_ctx: int,
        token_embedding: nn.Embedding,
        placeholder: str = "X",
        context_length: int = CONTEXT_LENGTH,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        ids = tokenize(template, context_length)  # [1, L]
        slot = word_token_id(placeholder)
        positions = (ids[0] == slot).nonzero().flatten().tolist()
        start = positions[0] if positions else -1
        if len(positions) != n_ctx or positions != list(range(start, start + n_ctx)):
            raise ValueError(
                f"The prompt {template!r} must contain exactly {n_ctx} consecutive "
                f"{placeholder!r} words (MODEL.PROMPT_N_CTX = {n_ctx}), found {len(positions)}"
            )
        weight = token_embedding.weight
        with torch.no_grad():
            embedded = token_embedding(ids.to(weight.device))  # [1, L, D]
        self.template = template
        self.n_ctx = n_ctx
        self.register_buffer("token_prefix", embedded[:, :start].clone())
        self.register_buffer("token_suffix", embedded[:, start + n_ctx :].clone())
        self.register_buffer("tokenized_prompts", ids.to(weight.device))
        ctx = torch.empty(
            num_classes, n_ctx, weight.shape[1], dtype=weight.dtype, device=weight.device
        )
        self.cls_ctx = nn.Parameter(nn.init.normal_(ctx, std=init_std))
        self.prompt_length = int(ids[0].argmax()) + 1  # from the CPU ids (the buffer may be meta)
        # A loaded state dict may bring other token ids; the length follows them.
        self.register_load_state_dict_post_hook(_refresh_prompt_length)

    @property
    def context_length(self) -> int:
        """Text length L of the full context (77)."""
        return self.tokenized_prompts.shape[1]

    @property
    def num_classes(self) -> int:
        """Number C of identities with learnable tokens."""
        return self.cls_ctx.shape[0]

    @property
    def eot_index(self) -> Tensor:
        """Position of the end-of-text token, LongTensor [1] (EOT has the largest id)."""
        return self.tokenized_prompts.argmax(dim=-1)

    def forward(self, pids: Tensor, length: int | None = None) -> Tensor:
        """Build prompt embeddings for identities.

        Args:
            pids: identity labels, int64 [B], each in [0, C).
            length: number of leading positions to return, from ``prompt_length`` (up to EOT:
                what the text encoder needs) to ``context_length``; ``None`` gives all L.

        Returns:
            Prompt embeddings [B, length, D] = cat(prefix, cls_ctx[pids], suffix)[:, :length].

        Raises:
            ValueError: ``length`` would cut off the EOT token or exceeds the context.
        """
        length = self.context_length if length is None else int(length)
        if not self.prompt_length <= length <= self.context_length:
            raise ValueError(
                f"length must be in [{self.prompt_length}, {self.context_length}] (the prompt "
                f"{self.template!r} ends at position {self.prompt_length - 1}), got {length}"
            )
        ctx = self.cls_ctx[pids.to(self.cls_ctx.device)]
        b = ctx.shape[0]
        num_suffix = length - self.token_prefix.shape[1] - self.n_ctx
        prefix = self.token_prefix.expand(b, -1, -1).to(ctx.dtype)
        suffix = self.token_suffix[:, :num_suffix].expand(b, -1, -1).to(ctx.dtype)
        return torch.cat([prefix, ctx, suffix], dim=1)


def _refresh_prompt_length(module: PromptLearner, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: the EOT position of the loaded token ids."""
    if not module.tokenized_prompts.is_meta:
        module.prompt_length = int(module.tokenized_prompts[0].argmax()) + 1
