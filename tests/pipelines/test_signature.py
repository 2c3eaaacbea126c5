import json

import pytest

from noisealign.errors import PipelineError
from noisealign.pipelines import check_compatible, pipeline_signature


def test_sd_signature(tiny_sd):
    sig = pipeline_signature(tiny_sd)
    assert sig == {
        "pipeline_class": "StableDiffusionPipeline",
        "text_encoder_class": "CLIPTextModel",
        "text_embed_dim": 32,
        "text_length": 77,
        "pooled_dim": None,
        "latent_channels": 4,
        "default_latent_size": [16, 16],
        "vae_scale_factor": 2,
        "tokenizer_vocab_size": len(tiny_sd.tokenizer),
    }
    assert json.loads(json.dumps(sig)) == sig


def test_sdxl_signature(tiny_sdxl):
    sig = pipeline_signature(tiny_sdxl)
    assert sig["pipeline_class"] == "StableDiffusionXLPipeline"
    assert sig["text_encoder_class"] == "CLIPTextModel+CLIPTextModelWithProjection"
    assert (sig["text_embed_dim"], sig["pooled_dim"], sig["text_length"]) == (64, 32, 77)


def test_check_compatible(tiny_sd, tiny_sdxl):
    sd, xl = pipeline_signature(tiny_sd), pipeline_signature(tiny_sdxl)
    check_compatible(json.loads(json.dumps(sd)), sd, "policy 'p'")
    with pytest.raises(PipelineError) as info:
        check_compatible(sd, xl, "reward model 'reward_models/toy'")
    message = str(info.value)
    assert message.startswith(
        "reward model 'reward_models/toy' was built for a different pipeline ("
    )
    assert (
        "pipeline_class: expected 'StableDiffusionPipeline', got 'StableDiffusionXLPipeline'"
        in message
    )
    assert "text_embed_dim: expected 32, got 64" in message
    assert "pooled_dim: expected None, got 32" in message
    assert "latent_channels" not in message
    with pytest.raises(PipelineError, match="text_length: expected 77, got missing"):
        check_compatible(sd, {k: v for k, v in sd.items() if k != "text_length"}, "policy")
