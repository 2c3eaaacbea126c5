import logging

import pytest
import torch

from noisealign.pipelines import encode_prompts

PROMPTS = ["a red circle left of a blue square", "a photo of a Cat on the grass", ""]


def test_sd_embeddings_equal_pipeline_encoding(tiny_sd):
    emb = encode_prompts(tiny_sd, PROMPTS)
    expected, _ = tiny_sd.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    assert torch.equal(emb.embeds, expected)
    assert emb.pooled is None
    assert emb.embeds.shape == (3, 77, 32)
    assert len(emb) == 3


def test_sdxl_embeddings_and_pooled(tiny_sdxl):
    emb = encode_prompts(tiny_sdxl, PROMPTS)
    expected, _, pooled, _ = tiny_sdxl.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=False
    )
    assert torch.equal(emb.embeds, expected)
    assert emb.pooled is not None and emb.pooled.shape == (3, 32)
    assert torch.equal(emb.pooled, pooled)
    assert emb.embeds.shape == (3, 77, 64)


def test_offsets_map_tokens_to_substrings(tiny_pipe):
    prompt = PROMPTS[1]
    emb = encode_prompts(tiny_pipe, [prompt])
    tokens, offsets = emb.tokens[0], emb.offsets[0]
    assert len(tokens) == len(offsets) == 77
    words = {tok: prompt[s:e] for tok, (s, e) in zip(tokens, offsets) if e > s}
    assert words["photo</w>"] == "photo"
    assert words["cat</w>"] == "Cat"  # lower-cased token, original characters
    assert words["grass</w>"] == "grass"
    assert tokens[0] == "<|startoftext|>" and offsets[0] == (0, 0)
    assert offsets[-1] == (0, 0)  # padding
    # mask: BOS, 8 words, EOS
    assert emb.mask[0].sum().item() == 10 and emb.mask.dtype == torch.bool


def test_long_prompt_warns_and_is_truncated(tiny_sd, caplog):
    long_prompt = "red " * 100
    with caplog.at_level(logging.WARNING, logger="noisealign.pipelines"):
        emb = encode_prompts(tiny_sd, ["a cat", long_prompt])
    assert emb.truncated == [False, True]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("noisealign")]
    assert any(
        f"'{long_prompt[:60]}' has 102 tokens but the text encoder takes 77; it is truncated" in m
        for m in messages
    )
    assert emb.embeds.shape[1] == 77


def test_empty_prompt_list_raises(tiny_sd):
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(tiny_sd, [])


def test_select_and_to(tiny_sdxl):
    emb = encode_prompts(tiny_sdxl, PROMPTS)
    picked = emb.select([2, 0])
    assert torch.equal(picked.embeds[1], emb.embeds[0]) and torch.equal(
        picked.pooled[0], emb.pooled[2]
    )
    assert picked.tokens == [emb.tokens[2], emb.tokens[0]] and picked.truncated == [False, False]
    half = emb.to(dtype=torch.bfloat16)
    assert half.embeds.dtype == torch.bfloat16 and half.pooled.dtype == torch.bfloat16
    assert half.mask.dtype == torch.bool
