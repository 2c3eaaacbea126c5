"""NPNet: the official architecture (checkpoint formats, timm key map, converter) and the improved one."""

import json

import pytest
import torch

from noisealign.errors import ConfigError, DataError, PipelineError
from noisealign.noise import gaussian_stats
from noisealign.policies import (
    POLICIES,
    NoiseProjector,
    NoiseProjectorConfig,
    NPNet,
    NPNetCompat,
    NPNetCompatConfig,
    NPNetConfig,
    apply_policy,
    count_parameters,
    load_policy,
    load_projector,
    project,
)
from noisealign.policies.npnet_convert import (
    load_official_npnet,
    main,
    official_state,
    save_official,
)
from noisealign.policies.swin import timm_to_transformers, transformers_to_timm

SDXL_COMPAT_PARAMETERS = (
    30_470_427  # Swin-T 28.29 M (with its ImageNet head) + SVD 0.92 M + text 1.26 M
)


def tiny_compat(**kw):
    """Compat NPNet with a small Swin and latent; alpha and beta set so every branch counts."""
    torch.manual_seed(0)
    fields = dict(
        resolution=16,
        text_dim=8,
        swin_embed_dim=8,
        swin_depths=[2, 2, 2, 2],
        swin_heads=[1, 2, 2, 4],
    )
    model = NPNetCompat(NPNetCompatConfig(**{**fields, **kw}))
    with torch.no_grad():
        model.alpha.fill_(0.3)
        model.beta.fill_(0.7)
        model.unet_svd.bn.running_mean.normal_()  # unused by forward, but must round-trip
    return model.eval()


def compat_inputs(model, batch=2):
    cfg = model.config
    torch.manual_seed(1)
    return torch.randn(batch, 4, cfg.resolution, cfg.resolution), torch.randn(
        batch, 77, cfg.text_dim
    )


def tiny_npnet(**kw):
    torch.manual_seed(0)
    fields = dict(text_dim=64, hidden_dim=32, depth=1, num_heads=2, patch_size=2)
    return NPNet(NPNetConfig(**{**fields, **kw}))


def trained(model, scale=0.05):
    """The NPNet after its zero heads got random weights, as if trained a little."""
    with torch.no_grad():
        for head in (model.head[1], model.spectral_head[1]):
            head.weight.normal_(0, scale)
        if model.pooled_film is not None:
            model.pooled_film.weight.normal_(0, scale)
    return model.eval()


# ------------------------------------------------------------------------ compatible NPNet
def test_compat_sdxl_size_has_the_official_keys_and_30m_parameters():
    model = NPNetCompat(NPNetCompatConfig())
    n = count_parameters(model)
    print(f"NPNetCompat SDXL parameters: {n:,}")
    assert n == SDXL_COMPAT_PARAMETERS
    official = official_state(model)
    assert set(official) == {"unet_embedding", "unet_svd", "embeeding", "alpha", "beta"}
    emb = official["unet_embedding"]
    for key in (
        "swin.patch_embed.proj.weight",
        "swin.layers.0.blocks.1.attn.qkv.weight",
        "swin.layers.3.downsample.reduction.weight",
        "swin.norm.weight",
        "swin.head.fc.weight",
        "downconv.weight",
        "upconv.bias",
    ):
        assert key in emb, key
    assert "swin.layers.0.downsample.norm.weight" not in emb  # timm >= 0.9: start of stages 1..3
    assert emb["swin.layers.2.blocks.5.attn.qkv.weight"].shape == (3 * 384, 384)
    assert emb["swin.layers.3.blocks.0.attn.relative_position_bias_table"].shape == (169, 24)
    assert emb["upconv.weight"].shape == (4, 7, 1, 1) and emb["downconv.weight"].shape == (
        3,
        4,
        1,
        1,
    )
    svd = official["unet_svd"]
    assert set(svd) == {
        *(f"mlp{i}.{j}.{p}" for i in (1, 2, 4) for j in (0, 2) for p in ("weight", "bias")),
        "mlp3.0.weight",
        "mlp3.0.bias",
        "attention.qkv.weight",
        "attention.proj.weight",
        "attention.proj.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert svd["attention.qkv.weight"].shape == (768, 256) and svd["mlp4.0.weight"].shape == (
        1024,
        256,
    )
    assert official["embeeding"]["linear.weight"].shape == (8, 2048 * 77)
    assert official["alpha"].shape == official["beta"].shape == (1,)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_checkpoint_round_trip_is_bit_exact(tmp_path, suffix):
    model = tiny_compat()
    path = tmp_path / f"npnet{suffix}"
    save_official(model, path)
    loaded = load_official_npnet(path)
    assert loaded.config == model.config and not loaded.training
    noise, embeds = compat_inputs(model)
    with torch.no_grad():
        out = model(noise, embeds)
        assert torch.equal(loaded(noise, embeds), out)
        assert torch.equal(loaded(noise, embeds), out)  # eval: no DropPath, deterministic
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_official_pth_as_the_authors_save_it(tmp_path):
    """alpha/beta leaf tensors with requires_grad, the "embedding" spelling, timm < 0.9 layout."""
    model = tiny_compat()
    official = official_state(model)
    official["alpha"] = official["alpha"].clone().requires_grad_(True)
    official["embedding"] = official.pop("embeeding")
    official["unet_embedding"] = {
        f"swin.{k}": v for k, v in old_timm_layout(strip(official["unet_embedding"])).items()
    }
    official["unet_embedding"] |= {
        k: v for k, v in official_state(model)["unet_embedding"].items() if "conv" in k
    }
    torch.save(official, tmp_path / "old.pth")
    loaded = load_official_npnet(tmp_path / "old.pth")
    noise, embeds = compat_inputs(model, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(noise, embeds), model(noise, embeds))


def test_official_checkpoint_with_another_token_count_needs_text_length(tmp_path):
    model = tiny_compat(text_length=16)
    save_official(model, tmp_path / "toy.pth")
    with pytest.raises(
        DataError, match="128 numbers, not a multiple of 77 tokens; pass text_length"
    ):
        load_official_npnet(tmp_path / "toy.pth")
    loaded = load_official_npnet(tmp_path / "toy.pth", text_length=16)
    noise, embeds = torch.randn(1, 4, 16, 16), torch.randn(1, 16, 8)
    with torch.no_grad():
        assert torch.equal(loaded(noise, embeds), model(noise, embeds))


@pytest.mark.slow
def test_official_sdxl_size_round_trip_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = NPNetCompat(NPNetCompatConfig()).eval()
    with torch.no_grad():
        model.beta.fill_(0.5)
    save_official(model, tmp_path / "sdxl.pth")
    loaded = load_official_npnet(tmp_path / "sdxl.pth")
    noise, embeds = torch.randn(1, 4, 128, 128), torch.randn(1, 77, 2048)
    with torch.no_grad():
        assert torch.equal(loaded(noise, embeds), model(noise, embeds))


def strip(embedding):
    return {k.removeprefix("swin."): v for k, v in embedding.items() if k.startswith("swin.")}


def old_timm_layout(new):
    """timm < 0.9 keys: downsample at the end of stages 0..2, ``head``, saved index/mask buffers."""
    old = {}
    for key, value in new.items():
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        old[key.replace("head.fc.", "head.")] = value
        if key.endswith("relative_position_bias_table"):
            old[key.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
            old[key.replace("attn.relative_position_bias_table", "attn_mask")] = torch.zeros(
                64, 49, 49
            )
    return old


def test_timm_key_map_round_trip_both_layouts():
    model = NPNetCompat(NPNetCompatConfig())
    ours = model.unet_embedding.features.state_dict()
    timm_new = transformers_to_timm(ours)
    assert len(timm_new) == len(ours) - 2 * 2 * 12  # q, k, v weight+bias fused into qkv per block
    back = timm_to_transformers(timm_new)
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    assert set(transformers_to_timm(back)) == set(timm_new)
    from_old = timm_to_transformers(old_timm_layout(timm_new))
    assert set(from_old) == set(ours) and all(torch.equal(from_old[k], ours[k]) for k in ours)
    with pytest.raises(DataError, match="unknown timm Swin key 'layers.0.blocks.0.gamma'"):
        timm_to_transformers({"layers.0.blocks.0.gamma": torch.zeros(1)})


def test_pth_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"unet_svd": torch.nn.Linear(2, 2), "alpha": torch.zeros(1)}, path)
    with pytest.raises(DataError, match=r"evil\.pth' holds pickled Python objects.*re-save"):
        load_official_npnet(path)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="corrupt or not a torch file"):
        load_official_npnet(tmp_path / "junk.pth")
    torch.save({"alpha": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(DataError, match="not an official NPNet checkpoint"):
        load_official_npnet(tmp_path / "partial.pth")


def test_converter_writes_a_loadable_folder_and_refuses_overwrite(tmp_path):
    model = tiny_compat()
    save_official(model, tmp_path / "npnet.pth")
    out = tmp_path / "folder"
    main([str(tmp_path / "npnet.pth"), str(out), "--pipeline", "sdxl-base"])
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors"}
    config = json.loads((out / "config.json").read_text())
    assert config["policy_type"] == "npnet_compat" and config["pipeline"] == "sdxl-base"
    loaded = load_policy(str(out))
    assert isinstance(loaded, NPNetCompat) and not loaded.training
    noise, embeds = compat_inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(noise, embeds), model(noise, embeds))
    with pytest.raises(DataError, match="exists; choose another or pass --overwrite"):
        main([str(tmp_path / "npnet.pth"), str(out)])
    main([str(tmp_path / "npnet.pth"), str(out), "--overwrite"])


def test_compat_rejects_other_sizes_and_ignores_mask_and_pooled():
    model = tiny_compat()
    noise, embeds = compat_inputs(model, batch=1)
    with pytest.raises(
        ValueError, match=r"npnet_compat takes noise \(B, 4, 16, 16\).*got \(1, 4, 8, 8\)"
    ):
        model(torch.randn(1, 4, 8, 8), embeds)
    with pytest.raises(ValueError, match=r"noise must be \(B, 4, H, W\)"):
        model(torch.randn(1, 3, 16, 16), embeds)
    with torch.no_grad():
        plain = model(noise, embeds)
        masked = model(noise, embeds, torch.zeros(1, 77, dtype=torch.bool), torch.randn(1, 5))
    assert torch.equal(plain, masked)


def test_compat_gradient_reaches_every_used_parameter():
    model = tiny_compat().train()
    noise, embeds = compat_inputs(model)
    model(noise, embeds).square().mean().backward()
    unused = ("unet_svd.bn.", "unet_embedding.features.head.")  # kept only so the keys load
    for name, p in model.named_parameters():
        if name.startswith(unused):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# -------------------------------------------------------------------------- improved NPNet
def test_identity_at_initialisation_and_small_at_sd15_size():
    noise = torch.randn(2, 4, 16, 16)
    assert torch.equal(tiny_npnet()(noise, torch.randn(2, 16, 64)), noise)
    n = count_parameters(NPNet(NPNetConfig()))
    print(f"NPNet SD1.5 default parameters: {n:,}")
    assert n < 1_000_000


@pytest.mark.parametrize(
    "latent, text, pooled",
    [
        ((4, 16, 16), (16, 64), None),
        ((4, 64, 64), (77, 768), None),
        ((4, 128, 128), (77, 2048), 1280),
        ((8, 15, 9), (7, 64), None),
    ],
)
def test_shapes_toy_sd15_sdxl_and_odd(latent, text, pooled):
    model = trained(tiny_npnet(latent_channels=latent[0], text_dim=text[1], pooled_dim=pooled))
    noise, embeds = torch.randn(2, *latent), torch.randn(2, *text)
    p = None if pooled is None else torch.randn(2, pooled)
    with torch.no_grad():
        out = model(noise, embeds, torch.ones(2, text[0], dtype=torch.bool), p)
        assert out.shape == noise.shape and out.dtype == noise.dtype
        assert torch.equal(out, model(noise, embeds, None, p))  # eval is deterministic
        assert not torch.allclose(out, noise, atol=1e-3)
        bf16 = model.to(torch.bfloat16)(noise.bfloat16(), embeds.bfloat16(), None, p)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == noise.shape


def test_one_npnet_serves_every_latent_size():
    model = trained(tiny_npnet())
    embeds = torch.randn(1, 16, 64)
    with torch.no_grad():
        for size in [(16, 16), (24, 40), (64, 64), (9, 31)]:
            noise = torch.randn(1, 4, *size)
            out = model(noise, embeds)
            assert out.shape == noise.shape and not torch.allclose(out, noise, atol=1e-3)


def test_per_sample_conditioning_and_padding_mask():
    model = trained(tiny_npnet(pooled_dim=16), scale=0.2)
    noise = torch.randn(1, 4, 16, 16).expand(3, -1, -1, -1)
    embeds, pooled = torch.randn(3, 16, 64), torch.randn(3, 16)
    embeds[2], pooled[2] = embeds[0], pooled[0]
    with torch.no_grad():
        out = model(noise, embeds, None, pooled)
        assert not torch.allclose(out[0], out[1], atol=1e-4)  # same noise, two prompts
        assert torch.allclose(out[0], out[2], atol=1e-5)  # same prompt twice
        alone = model(noise[:1], embeds[1:2], None, pooled[1:2])
        assert torch.allclose(out[1], alone[0], atol=1e-5)  # depends on its own prompt only
        mask = torch.zeros(1, 16, dtype=torch.bool)
        mask[:, :5] = True
        changed = embeds[:1].clone()
        changed[:, 5:] = 100.0
        a = model(noise[:1], embeds[:1], mask, pooled[:1])
        assert torch.allclose(a, model(noise[:1], changed, mask, pooled[:1]), atol=1e-5)


def test_spectral_branch_conditions_on_the_prompt():
    model = tiny_npnet()
    with torch.no_grad():
        model.spectral_head[1].weight.normal_(0, 0.2)  # only the spectral branch is "trained"
    noise = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1)
    out = model.eval()(noise, torch.randn(2, 16, 64))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_moment_matched_output_stays_gaussian_unless_disabled():
    model = trained(tiny_npnet(), scale=0.5)
    noise, embeds = torch.randn(4, 4, 32, 32), torch.randn(4, 16, 64)
    with torch.no_grad():
        stats, before = gaussian_stats(model(noise, embeds)), gaussian_stats(noise)
    assert torch.allclose(stats.mean, before.mean, atol=1e-5)
    assert torch.allclose(stats.std, before.std, atol=1e-4)
    raw = trained(tiny_npnet(moment_match=False), scale=0.5)
    with torch.no_grad():
        assert not torch.allclose(gaussian_stats(raw(noise, embeds)).std, before.std, atol=1e-3)


def test_gradient_reaches_every_trainable_parameter():
    model = trained(tiny_npnet(pooled_dim=16)).train()
    noise, embeds = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 64)
    target = torch.randn_like(noise)
    (model(noise, embeds, None, torch.randn(2, 16)) - target).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs_and_configs_fail_clearly():
    model = tiny_npnet()
    with pytest.raises(ValueError, match=r"noise must be \(B, 4, H, W\).*got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), torch.randn(2, 16, 64))
    with pytest.raises(ValueError, match=r"embeds must be \(2, L, 64\).*got \(2, 16, 32\)"):
        model(torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32))
    with pytest.raises(ValueError, match="takes no pooled"):
        model(torch.randn(2, 4, 8, 8), torch.randn(2, 16, 64), None, torch.randn(2, 4))
    with pytest.raises(ConfigError, match="'hidden_dim'"):
        NPNetConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="'policy_type' must be 'npnet'"):
        NPNetConfig(policy_type="npnet_compat")


# --------------------------------------------------------------------- one policy interface
def test_load_policy_dispatches_on_policy_type(tmp_path):
    projector = NoiseProjector(NoiseProjectorConfig(text_dim=64, hidden_dim=32, depth=1))
    npnet = trained(tiny_npnet())
    projector.save_pretrained(tmp_path / "projector")
    npnet.save_pretrained(tmp_path / "npnet")
    assert "policy_type" not in json.loads((tmp_path / "projector" / "config.json").read_text())
    assert isinstance(load_policy(str(tmp_path / "projector")), NoiseProjector)
    assert isinstance(load_projector(str(tmp_path / "npnet")), NPNet)
    loaded = load_policy(str(tmp_path / "npnet"))
    assert type(loaded) is POLICIES["npnet"] and not loaded.training
    noise, embeds = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 64)
    with torch.no_grad():
        assert torch.equal(loaded(noise, embeds), npnet(noise, embeds))


def test_load_policy_errors(tmp_path):
    trained(tiny_npnet()).save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    (tmp_path / "p" / "config.json").write_text(json.dumps({**config, "policy_type": "golden"}))
    with pytest.raises(
        DataError, match="policy_type 'golden'; known: noise_projector, npnet, npnet_compat"
    ):
        load_policy(str(tmp_path / "p"))
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    (tmp_path / "p" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"policy weights .*model.safetensors. are corrupt"):
        load_policy(str(tmp_path / "p"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no config.json or model.safetensors"):
        load_policy(str(tmp_path / "empty"))


def test_apply_policy_with_an_npnet_on_a_tiny_pipeline(tmp_path):
    from noisealign.pipelines import encode_prompts, pipeline_signature
    from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

    sd = build_tiny_sd_pipeline()
    model = trained(tiny_npnet(text_dim=32, pipeline_signature=pipeline_signature(sd)))
    model.save_pretrained(tmp_path / "n")
    policy = load_policy(str(tmp_path / "n"), sd)
    prompts = ["a red circle", "a blue square"]
    projected, standard = apply_policy(sd, policy, prompts, [0, 1], return_standard=True)
    assert projected.shape == standard.shape == (2, 4, 16, 16)
    assert not torch.allclose(projected, standard)
    with pytest.raises(PipelineError, match="text_embed_dim: expected 32, got 64"):
        load_policy(str(tmp_path / "n"), build_tiny_sdxl_pipeline())
    bad = standard.clone()
    bad[1, 0, 0, 0] = float("nan")
    emb = encode_prompts(sd, prompts)
    with pytest.raises(ValueError, match=r"input noise contains NaN or Inf \(samples \[1\]\)"):
        project(policy, bad, emb)
