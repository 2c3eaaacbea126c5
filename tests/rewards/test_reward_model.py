"""NoiseRewardModel: shapes for SD and SDXL inputs, training signal, save/load, bad folders."""

import json

import pytest
import torch

from noisealign.errors import ConfigError, DataError, PipelineError
from noisealign.losses.reward import reward_loss
from noisealign.pipelines import encode_prompts, latent_shape, pipeline_signature
from noisealign.rewards import (
    NoiseRewardConfig,
    NoiseRewardModel,
    build_reward_model,
    load_reward_model,
)

SMALL = {"hidden_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}


def model_for(pipe, **extra):
    sig = pipeline_signature(pipe)
    fields = {
        "latent_channels": sig["latent_channels"],
        "text_dim": sig["text_embed_dim"],
        "pooled_dim": sig["pooled_dim"],
        "pipeline_signature": sig,
        **SMALL,
        **extra,
    }
    torch.manual_seed(0)
    return build_reward_model("transformer", **fields)


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sdxl"])
def test_shapes_for_sd_and_sdxl_inputs(which, request):
    pipe, _ = request.getfixturevalue(which)
    emb = encode_prompts(pipe, ["a red circle", "a blue square left of a green star"])
    model = model_for(pipe)
    noise = torch.randn(2, *latent_shape(pipe))
    out = model(noise, emb.embeds, emb.mask, emb.pooled)
    assert out.token_logits.shape == emb.mask.shape and out.overall_logit.shape == (2,)
    assert out.token_logits.dtype == torch.float32
    # any latent size, odd ones included (padded to the patch size)
    out = model(torch.randn(2, 4, 9, 13), emb.embeds, emb.mask, emb.pooled)
    assert out.overall_logit.shape == (2,)
    if emb.pooled is not None:
        with pytest.raises(ValueError, match="needs pooled"):
            model(noise, emb.embeds, emb.mask)


def test_output_depends_on_noise_and_ignores_padding(tiny_sd):
    pipe, _ = tiny_sd
    emb = encode_prompts(pipe, ["a red circle"])
    model = model_for(pipe).eval()
    a, b = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    assert not torch.allclose(
        model(a, emb.embeds, emb.mask).overall_logit, model(b, emb.embeds, emb.mask).overall_logit
    )
    changed = emb.embeds.clone()
    changed[~emb.mask] = 5.0  # padding embeddings are masked out of the token attention
    base = model(a, emb.embeds, emb.mask)
    assert torch.allclose(model(a, changed, emb.mask).overall_logit, base.overall_logit, atol=1e-5)


def test_every_trainable_parameter_changes_after_a_step(tiny_sdxl):
    pipe, _ = tiny_sdxl
    emb = encode_prompts(pipe, ["a red circle", "a blue square", "a red circle", "a blue square"])
    model = model_for(pipe).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(torch.randn(4, 4, 16, 16), emb.embeds, emb.mask, emb.pooled)
    loss, _ = reward_loss(
        out.token_logits,
        out.overall_logit,
        torch.rand(4, emb.mask.shape[1]),
        emb.mask,
        torch.tensor([1.0, 0.0, 0.0, 1.0]),
        torch.tensor([0, 1, 0, 1]),
    )
    loss.backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def test_save_load_round_trip_and_signature_check(tiny_sd, tiny_sdxl, tmp_path):
    pipe, _ = tiny_sd
    model = model_for(pipe, input_steps=2, input_kind="x0", num_inference_steps=4).eval()
    model.save_pretrained(tmp_path / "rm")
    assert {"config.json", "model.safetensors", "README.md"} <= {
        p.name for p in (tmp_path / "rm").iterdir()
    }
    loaded = NoiseRewardModel.from_pretrained(str(tmp_path / "rm"))
    assert loaded.config == model.config
    for (n, p), (m, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(p, q)
    emb = encode_prompts(pipe, ["a red circle"])
    x = torch.randn(1, 4, 16, 16)
    assert torch.equal(
        model(x, emb.embeds, emb.mask).token_logits, loaded(x, emb.embeds, emb.mask).token_logits
    )
    same = load_reward_model(str(tmp_path / "rm"), expected_signature=pipeline_signature(pipe))
    assert same.config.input_steps == 2
    with pytest.raises(PipelineError, match="built for a different pipeline.*text_embed_dim"):
        load_reward_model(str(tmp_path / "rm"), expected_signature=pipeline_signature(tiny_sdxl[0]))


def test_corrupt_or_foreign_folders(tiny_sd, tmp_path):
    pipe, _ = tiny_sd
    model_for(pipe).save_pretrained(tmp_path / "rm")
    with pytest.raises(DataError, match="no config.json"):
        load_reward_model(str(tmp_path))
    (tmp_path / "rm" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="corrupt"):
        load_reward_model(str(tmp_path / "rm"))
    model_for(pipe).save_pretrained(tmp_path / "rm2")
    config = json.loads((tmp_path / "rm2" / "config.json").read_text())
    (tmp_path / "rm2" / "config.json").write_text(
        json.dumps({**config, "hidden_dim": 32, "num_heads": 4})
    )
    with pytest.raises(DataError, match="do not fit its config.json"):
        load_reward_model(str(tmp_path / "rm2"))
    (tmp_path / "rm2" / "config.json").write_text(json.dumps({**config, "architecture": "resnet"}))
    with pytest.raises(DataError, match="architecture 'resnet'; known: transformer, unet_lora"):
        load_reward_model(str(tmp_path / "rm2"))
    (tmp_path / "rm2" / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_reward_model(str(tmp_path / "rm2"))


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="'hidden_dim'"):
        NoiseRewardConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="'input_kind'"):
        NoiseRewardConfig(input_kind="x1")
    with pytest.raises(ConfigError, match="'num_inference_steps'"):
        NoiseRewardConfig(input_steps=3, num_inference_steps=2)
    with pytest.raises(ConfigError, match="known reward models: transformer, unet_lora"):
        build_reward_model("mlp")
    with pytest.raises(ConfigError, match="'model_kwargs' does not fit"):
        build_reward_model("transformer", widht=3)


def test_noise_pool_sees_only_the_pooled_noise(tiny_sd):
    pipe, _ = tiny_sd
    emb = encode_prompts(pipe, ["a red circle"])
    model = model_for(pipe, noise_pool=2, patch_size=1).eval()
    noise = torch.randn(1, 4, 16, 16)
    # a change that keeps every 2x2 block's mean is invisible; one that moves a block mean is not
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(8, 8)
    base = model(noise, emb.embeds, emb.mask).overall_logit
    same = model(noise + checker, emb.embeds, emb.mask).overall_logit
    assert torch.allclose(base, same, atol=1e-5)
    shifted = noise.clone()
    shifted[..., :2, :2] += 1.0
    assert not torch.allclose(base, model(shifted, emb.embeds, emb.mask).overall_logit)
    # odd latent sizes are padded up to the pool
    assert model(torch.randn(2, 4, 9, 13), emb.embeds.expand(2, -1, -1)).overall_logit.shape == (2,)
    with pytest.raises(ConfigError, match="'noise_pool'"):
        NoiseRewardConfig(noise_pool=0)
