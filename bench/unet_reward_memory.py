"""Memory of one unet_lora training step at SDXL size (recipes/sdxl/distill.yaml's model).

    OMP_NUM_THREADS=1 .venv/bin/python bench/unet_reward_memory.py [--device meta|cuda]
        [--batch 8 16 32] [--dtype float16]

The reward model is built from SDXL base's UNet config with random weights (memory depends
on the architecture, not the weights; nothing is downloaded), with 4x128x128 noise, 77x2048
prompt embeddings and 1280-d pooled embeddings.

- ``meta`` (default, any machine, seconds): no computation. Reports the weights' bytes and the
  bytes autograd saves in the forward pass for the backward pass, with and without gradient
  checkpointing. This is an estimate and a lower bound on the peak: the backward pass adds
  one checkpointed block's recomputed activations, the gradients and the optimizer's state.
  Without checkpointing it overstates a GPU: on meta tensors self-attention runs PyTorch's
  math SDPA kernel, which saves the N x N attention matrices that the flash and
  memory-efficient CUDA kernels do not.
- ``cuda``: one forward and backward pass and an AdamW step on the GPU, and the measured
  ``torch.cuda.max_memory_allocated``.

Prints one JSON line per batch size and checkpointing setting.
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers import UNet2DConditionModel

from noisealign.rewards.unet_backbone import BACKBONE_DTYPES, UNetRewardConfig, UNetRewardModel
from noisealign.testing.full_size import SDXL_UNET

GIB = 2**30
# recipes/sdxl/distill.yaml's model_kwargs
RECIPE = dict(lora_rank=16, lora_alpha=16, hidden_dim=256, depth=2, num_heads=8)


def build(device: str, dtype: str, checkpointing: bool) -> UNetRewardModel:
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
        config = UNetRewardConfig(
            unet_config={k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
            text_dim=2048, pooled_dim=1280, backbone_dtype=dtype,
            gradient_checkpointing=checkpointing, **RECIPE,
        )  # fmt: skip
        del unet
        return UNetRewardModel(config).train()


def step(model: UNetRewardModel, batch: int, device: str) -> tuple[int, torch.Tensor]:
    """Bytes autograd saved in the forward pass (weights aside), and the loss on random inputs."""
    with torch.device(device):
        noise, embeds = torch.randn(batch, 4, 128, 128), torch.randn(batch, 77, 2048)
        pooled = torch.randn(batch, 1280)
    saved = []
    params = {id(p) for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in params and id(tensor._base) not in params:  # weights are not extra
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(noise, embeds, None, pooled)
    return sum(saved), out.overall_logit.mean() + out.token_logits.mean()


def measure(device: str, dtype: str, batch: int, checkpointing: bool) -> dict:
    model = build(device, dtype, checkpointing)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    saved, loss = step(model, batch, device)
    loss.backward()
    if device != "meta":
        optimizer.step()
    row = {
        "device": device, "backbone_dtype": dtype, "batch": batch,
        "gradient_checkpointing": checkpointing, "weights_gib": round(weights / GIB, 2),
        "trainable_params_m": round(trainable / 1e6, 2),
        "saved_for_backward_gib": round(saved / GIB, 2),
    }  # fmt: skip
    if device == "cuda":
        row["measured_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("meta", "cuda"), default="meta")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--dtype", choices=tuple(BACKBONE_DTYPES), default="float16")
    args = parser.parse_args()
    for batch in args.batch:
        for checkpointing in (True, False):
            print(json.dumps(measure(args.device, args.dtype, batch, checkpointing)), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
