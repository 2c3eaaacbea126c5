"""The unet_lora reward model: shapes for SD and SDXL, LoRA-only backbone training, round trip."""

import pytest
import torch

from noisealign.losses.reward import reward_loss
from noisealign.pipelines import encode_prompts, pipeline_signature
from noisealign.rewards import build_reward_model, load_reward_model
from noisealign.rewards.unet_backbone import UNetRewardModel


def build(pipe, folder):
    sig = pipeline_signature(pipe)
    torch.manual_seed(0)
    return build_reward_model(
        "unet_lora", pipeline=folder, latent_channels=4, text_dim=sig["text_embed_dim"],
        pooled_dim=sig["pooled_dim"], vae_scale_factor=sig["vae_scale_factor"], hidden_dim=16,
        depth=1, num_heads=2, lora_rank=2, pipeline_signature=sig,
    )  # fmt: skip


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sdxl"])
def test_shapes_and_pretrained_backbone(which, request):
    pipe, folder = request.getfixturevalue(which)
    model = build(pipe, folder)
    emb = encode_prompts(pipe, ["a red circle", "a blue square"])
    out = model(torch.randn(2, 4, 16, 16), emb.embeds, emb.mask, emb.pooled)
    assert out.token_logits.shape == emb.mask.shape and out.overall_logit.shape == (2,)
    # the frozen backbone starts as the pipeline's UNet; only LoRA and the heads train
    unet = pipe.unet.state_dict()
    assert torch.equal(model.encoder.conv_in.weight, unet["conv_in.weight"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable if n.startswith("encoder."))
    assert any("lora_" in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("encoder.") and "lora_" not in n for n in frozen)


def test_every_trainable_parameter_changes(tiny_sd):
    pipe, folder = tiny_sd
    model = build(pipe, folder).train()
    emb = encode_prompts(pipe, ["a red circle", "a blue square"] * 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    # two steps: LoRA's B starts at zero, so A receives its first gradient on the second step
    for _ in range(2):
        out = model(torch.randn(4, 4, 16, 16), emb.embeds, emb.mask)
        loss, _ = reward_loss(
            out.token_logits, out.overall_logit, torch.rand(4, 77), emb.mask,
            torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 1, 0, 1]),
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unchanged = [
        n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])
    ]
    assert not unchanged


def test_round_trip_without_the_pipeline(tiny_sdxl, tmp_path):
    pipe, folder = tiny_sdxl
    model = build(pipe, folder).eval()
    model.save_pretrained(tmp_path / "rm")
    loaded = load_reward_model(str(tmp_path / "rm"), expected_signature=pipeline_signature(pipe))
    assert isinstance(loaded, UNetRewardModel) and loaded.config.unet_config is not None
    emb = encode_prompts(pipe, ["a red circle"])
    x = torch.randn(1, 4, 16, 16)
    assert torch.equal(
        model(x, emb.embeds, emb.mask, emb.pooled).overall_logit,
        loaded(x, emb.embeds, emb.mask, emb.pooled).overall_logit,
    )
