"""Prompt embeddings exactly as the pipeline conditions on them, with the tokens' character offsets.

The offsets are the bridge between a judge's part scores (character spans of the prompt) and
the per-token embeddings that the reward model and the policy see.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..errors import PipelineError
from ..noise import check_strings
from .adapters import adapter_for, denoiser

logger = logging.getLogger(__name__)


@dataclass
class PromptEmbeddings:
    """A batch of encoded prompts.

    Attributes:
        embeds: ``(B, L, D)`` the per-token embeddings the pipeline conditions on.
        pooled: ``(B, P)`` pooled text embeddings (SDXL's ``text_embeds``, SD3's pooled
            projections, FLUX's CLIP pooled output), ``None`` for SD.
        mask: ``(B, L)`` bool attention mask of the pipeline's first tokenizer (SD3: of its
            CLIP tokenizer, then of its T5 tokenizer; FLUX: of its T5 tokenizer).
        tokens: B lists of L token strings.
        offsets: B lists of L ``(start, end)`` character offsets into the prompt; ``(0, 0)`` for
            special and padding tokens.
        truncated: per prompt, whether it was longer than the text encoder's limit.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor
    tokens: list[list[str]]
    offsets: list[list[tuple[int, int]]]
    truncated: list[bool]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def select(self, indices: Sequence[int]) -> PromptEmbeddings:
        """The rows ``indices`` (in that order, repeats allowed)."""
        idx = list(indices)
        index = torch.tensor(idx, dtype=torch.long)
        return PromptEmbeddings(
            embeds=self.embeds[index.to(self.embeds.device)],
            pooled=None if self.pooled is None else self.pooled[index.to(self.pooled.device)],
            mask=self.mask[index.to(self.mask.device)],
            tokens=[self.tokens[i] for i in idx],
            offsets=[self.offsets[i] for i in idx],
            truncated=[self.truncated[i] for i in idx],
        )

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> PromptEmbeddings:
        """Move the float tensors to ``device`` / ``dtype``; the bool mask only changes device."""
        return replace(
            self,
            embeds=self.embeds.to(device=device, dtype=dtype),
            pooled=None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
        )


def _tokenize(
    tokenizer: Any, limit: int, prompts: list[str]
) -> tuple[list[list[str]], list[list[tuple[int, int]]], torch.Tensor, list[bool]]:
    """Tokens, character offsets and attention mask of one tokenizer's encoding padded to
    ``limit``, and which prompts overflow it."""
    batch = tokenizer(
        prompts,
        padding="max_length",
        max_length=limit,
        truncation=True,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    counts = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    truncated = [n > limit for n in counts]
    for prompt, n, cut in zip(prompts, counts, truncated):
        if cut:
            logger.warning(
                "prompt '%s' has %d tokens but the text encoder takes %d; it is truncated",
                prompt[:60],
                n,
                limit,
            )
    tokens = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in batch["input_ids"]]
    offsets = [[(int(s), int(e)) for s, e in row.tolist()] for row in batch["offset_mapping"]]
    return tokens, offsets, batch["attention_mask"].bool(), truncated


def check_pipe(pipe: object) -> None:
    """:class:`PipelineError` unless ``pipe`` is a loaded diffusers pipeline of a supported
    family."""
    if not isinstance(pipe, DiffusionPipeline):
        raise PipelineError(
            f"'pipe' is a {type(pipe).__name__}, not a diffusers pipeline; load one with "
            "noisealign.pipelines.load_pipeline(folder)"
        )
    adapter_for(pipe)  # a supported family, or its PipelineError


def encode_prompts(pipe: DiffusionPipeline, prompts: Sequence[str]) -> PromptEmbeddings:
    """Encode ``prompts`` with the pipeline's own ``encode_prompt`` (no CFG).

    The embeddings are bit-identical to those ``pipe(prompt)`` conditions on; tokens, offsets
    and mask come from the first tokenizer, padded to its max length like the embeddings (for
    SD3: the CLIP tokenizer's 77 positions, then the T5 tokenizer's 256, as in its joint
    sequence, :mod:`noisealign.pipelines.sd3`; for FLUX: the T5 tokenizer's 512,
    :mod:`noisealign.pipelines.flux`).

    Example:
        >>> emb = encode_prompts(pipe, ["a red circle"])  # doctest: +SKIP
        >>> emb.embeds.shape  # (1, 77, D)  # doctest: +SKIP

    Raises:
        PipelineError: ``pipe`` is not a pipeline of a supported family.
        ConfigError: ``prompts`` is a bare string, empty, or holds a non-string.
    """
    check_pipe(pipe)
    prompts = check_strings(prompts, "prompts")
    adapter = adapter_for(pipe)
    # one stream for SD / SDXL; SD3's joint sequence is its CLIP tokens, then its T5 tokens
    streams = [
        _tokenize(tokenizer, limit, prompts) for tokenizer, limit in adapter.token_streams(pipe)
    ]
    with torch.no_grad():
        embeds, pooled = adapter.encode(pipe, prompts)
    rows = range(len(prompts))
    return PromptEmbeddings(
        embeds=embeds,
        pooled=pooled,
        mask=torch.cat([mask for _, _, mask, _ in streams], dim=1),
        tokens=[[t for tokens, _, _, _ in streams for t in tokens[i]] for i in rows],
        offsets=[[o for _, offsets, _, _ in streams for o in offsets[i]] for i in rows],
        truncated=[any(cut[i] for _, _, _, cut in streams) for i in rows],
    )


# pipe -> {(device, dtype): (embeds, pooled)}; weak so a dropped pipeline frees its cache
_NEGATIVE_CACHE: weakref.WeakKeyDictionary[
    Any, dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]]
]
_NEGATIVE_CACHE = weakref.WeakKeyDictionary()


def negative_embeddings(
    pipe: DiffusionPipeline,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(embeds (1, L, D), pooled (1, P) | None)`` that ``pipe(prompt)`` uses as its unconditional
    branch.

    The empty prompt's encoding (SD) or zeros (SDXL with ``force_zeros_for_empty_prompt``);
    ``(None, None)`` for FLUX, which runs no unconditional branch; cached per pipeline, device
    and dtype because collect calls this for every batch.
    """
    key = (str(pipe._execution_device), denoiser(pipe).dtype)
    per_pipe = _NEGATIVE_CACHE.setdefault(pipe, {})
    if key not in per_pipe:
        with torch.no_grad():
            per_pipe[key] = adapter_for(pipe).encode_negative(pipe)
    return per_pipe[key]
