import torch

from noisealign.testing.pipelines import (
    TINY_VOCAB,
    build_tiny_sd_pipeline,
    build_tiny_sdxl_pipeline,
)


def test_weights_depend_only_on_seed():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = (
        build_tiny_sd_pipeline(seed=1),
        build_tiny_sd_pipeline(seed=1),
        build_tiny_sd_pipeline(seed=2),
    )
    assert torch.equal(torch.rand(1), before)  # global RNG untouched
    wa, wb, wc = (p.unet.conv_in.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_sizes_and_vocabulary():
    pipe = build_tiny_sdxl_pipeline()
    assert 1e6 <= sum(p.numel() for p in pipe.unet.parameters()) <= 2e6
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    assert len(TINY_VOCAB) >= 100
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert tokenizer.tokenize("a red circle left of the photo") == [
            "a</w>",
            "red</w>",
            "circle</w>",
            "left</w>",
            "of</w>",
            "the</w>",
            "photo</w>",
        ]
    assert pipe.scheduler.config.steps_offset == 1
