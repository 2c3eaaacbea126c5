"""The unet_lora reward model: shapes, LoRA-only training, precision, checkpointing, round trip."""

from types import SimpleNamespace

import pytest
import torch

from noisealign.distillation import stage
from noisealign.errors import ConfigError
from noisealign.losses.reward import reward_loss
from noisealign.pipelines import encode_prompts, pipeline_signature
from noisealign.rewards import build_reward_model, load_reward_model
from noisealign.rewards.unet_backbone import UNetRewardModel


def build(pipe, folder, **fields):
    sig = pipeline_signature(pipe)
    torch.manual_seed(0)
    return build_reward_model(
        "unet_lora",
        pipeline=folder,
        latent_channels=4,
        text_dim=sig["text_embed_dim"],
        pooled_dim=sig["pooled_dim"],
        vae_scale_factor=sig["vae_scale_factor"],
        hidden_dim=16,
        depth=1,
        num_heads=2,
        lora_rank=2,
        pipeline_signature=sig,
        **fields,
    )


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
            out.token_logits,
            out.overall_logit,
            torch.rand(4, 77),
            emb.mask,
            torch.tensor([1.0, 0.0, 0.0, 1.0]),
            torch.tensor([0, 1, 0, 1]),
        )
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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sdxl"])
def test_backbone_is_frozen_half_precision_checkpointed_and_keeps_sdpa(which, dtype, request):
    pipe, folder = request.getfixturevalue(which)
    model = build(pipe, folder, backbone_dtype=dtype)
    for name, param in model.named_parameters():
        if name.startswith("encoder.") and "lora_" not in name:
            assert not param.requires_grad and param.dtype == getattr(torch, dtype), name
        else:  # LoRA adapters and heads train in float32
            assert param.requires_grad and param.dtype == torch.float32, name
    flags = {
        n: m.gradient_checkpointing
        for n, m in model.encoder.named_modules()
        if hasattr(m, "gradient_checkpointing")
    }
    assert all(flags.values())
    blocks = [f"down_blocks.{i}" for i in range(len(model.encoder.down_blocks))] + ["mid_block"]
    assert all(b in flags for b in blocks), sorted(flags)
    processors = {
        n: type(m.processor).__name__
        for n, m in model.encoder.named_modules()
        if n.endswith(("attn1", "attn2"))
    }
    assert {p for n, p in processors.items() if n.endswith("attn1")} == {"AttnProcessor2_0"}
    assert {p for n, p in processors.items() if n.endswith("attn2")} == {"CrossAttentionReader"}
    emb = encode_prompts(pipe, ["a red circle", "a blue square"])
    x = torch.randn(2, 4, 16, 16)
    out = model(x, emb.embeds, emb.mask, emb.pooled)
    assert out.overall_logit.dtype == torch.float32 and torch.isfinite(out.token_logits).all()
    full = build(pipe, folder)(x, emb.embeds, emb.mask, emb.pooled)  # same seed, float32
    torch.testing.assert_close(out.overall_logit, full.overall_logit, atol=0.05, rtol=0)


def _loss(out, mask):
    loss, _ = reward_loss(
        out.token_logits,
        out.overall_logit,
        torch.rand(4, 77, generator=torch.Generator().manual_seed(0)),
        mask,
        torch.tensor([1.0, 0.0, 0.0, 1.0]),
        torch.tensor([0, 1, 0, 1]),
    )
    return loss


def test_lora_trains_on_a_bfloat16_backbone(tiny_sd):
    pipe, folder = tiny_sd
    model = build(pipe, folder, backbone_dtype="bfloat16").train()
    emb = encode_prompts(pipe, ["a red circle", "a blue square"] * 2)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    for step in range(2):  # LoRA's B starts at zero: A gets its first gradient on step 2
        optimizer.zero_grad()
        _loss(model(torch.randn(4, 4, 16, 16), emb.embeds, emb.mask), emb.mask).backward()
        optimizer.step()
        if step == 0:
            assert all(not torch.equal(p, before[n]) for n, p in params.items() if "lora_B" in n)
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in params.items() if p.requires_grad}


def _forward_counting_saved(model, *inputs):
    """The model's output and the elements of the tensors autograd saved for its backward."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(*inputs)
    return out, sum(saved)


def test_gradient_checkpointing_keeps_outputs_and_gradients_and_stores_less(tiny_sdxl):
    pipe, folder = tiny_sdxl
    plain = build(pipe, folder, gradient_checkpointing=False).train()
    checkpointed = build(pipe, folder).train()
    with torch.no_grad():  # non-zero LoRA B, so every adapter is in the graph
        for name, param in plain.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    checkpointed.load_state_dict(plain.state_dict())
    emb = encode_prompts(pipe, ["a red circle", "a blue square"] * 2)
    x = torch.randn(4, 4, 16, 16)
    results = []
    for model in (plain, checkpointed):
        out, saved = _forward_counting_saved(model, x, emb.embeds, emb.mask, emb.pooled)
        _loss(out, emb.mask).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads, saved))
    (out_a, grads_a, saved_a), (out_b, grads_b, saved_b) = results
    torch.testing.assert_close(out_b.token_logits, out_a.token_logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_b.overall_logit, out_a.overall_logit, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_b.values())
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-4)
    # the checkpointed blocks keep only their inputs for the backward pass
    assert saved_b < saved_a / 2, (saved_a, saved_b)


def test_bfloat16_backbone_round_trip_and_a_bad_dtype(tiny_sd, tmp_path):
    pipe, folder = tiny_sd
    model = build(pipe, folder, backbone_dtype="bfloat16").eval()
    model.save_pretrained(tmp_path / "rm")
    loaded = load_reward_model(str(tmp_path / "rm"), expected_signature=pipeline_signature(pipe))
    assert loaded.encoder.conv_in.weight.dtype == torch.bfloat16
    emb = encode_prompts(pipe, ["a red circle"])
    x = torch.randn(1, 4, 16, 16)
    assert torch.equal(
        model(x, emb.embeds, emb.mask).overall_logit, loaded(x, emb.embeds, emb.mask).overall_logit
    )
    with pytest.raises(ConfigError, match="'backbone_dtype' is 'int8'"):
        build(pipe, folder, backbone_dtype="int8")


def test_distill_builds_the_backbone_in_the_recipe_dtype():
    config = SimpleNamespace(
        reward_model="unet_lora",
        pipeline="p",
        torch_dtype="float16",
        input_steps=0,
        input_kind="latent",
        model_kwargs={},
    )
    rows = SimpleNamespace(num_inference_steps=0, guidance_scale=0.0)
    signature = {
        "latent_channels": 4,
        "text_embed_dim": 32,
        "pooled_dim": None,
        "vae_scale_factor": 2,
    }
    assert stage.model_fields(config, rows, signature)["backbone_dtype"] == "float16"
    config.model_kwargs = {"backbone_dtype": "float32"}
    assert stage.model_fields(config, rows, signature)["backbone_dtype"] == "float32"
