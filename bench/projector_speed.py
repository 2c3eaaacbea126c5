"""Cost of one policy forward (projector, NPNet, compatible NPNet) relative to one UNet step.

    .venv/bin/python bench/projector_speed.py [--threads 1] [--unet_repeats 3] [--device cpu] [--unet sd15|sdxl]

All models are built from configs with random weights (speed depends on the architecture, not
the weights). The reference is one batch-1 UNet forward, i.e. one step without the CFG
doubling — the stricter comparison: the SD1.5 ``UNet2DConditionModel`` (860 M parameters) at
4x64x64 by default, or the SDXL UNet (2.6 B) at 4x128x128 with ``--unet sdxl`` (too slow for
a CPU; for a GPU). Each policy is timed at its own pipeline's shapes:

- ``projector``: default :class:`~noisealign.policies.NoiseProjector` of
  ``recipes/sd15/train_projector.yaml``, SD1.5 (4x64x64, text 77x768);
- ``npnet_sd15``: default :class:`~noisealign.policies.NPNet`, SD1.5 shapes;
- ``npnet_sdxl``: :class:`~noisealign.policies.NPNet` for SDXL (4x128x128, text 77x2048, pooled 1280);
- ``npnet_compat_sdxl``: :class:`~noisealign.policies.NPNetCompat`, the official SDXL NPNet.

Prints one JSON line: median seconds and the ratio to the UNet step per policy (target: the
projector <= 0.01). ``projector_s`` / ``ratio`` keep the projector's figures at the top level.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from noisealign.policies import (
    NoiseProjector,
    NoiseProjectorConfig,
    NPNet,
    NPNetCompat,
    NPNetCompatConfig,
    NPNetConfig,
    count_parameters,
)
from noisealign.testing.full_size import SD15_UNET, SDXL_UNET


def timed(fn, repeats: int, device: str) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def trained(policy: torch.nn.Module) -> torch.nn.Module:
    """Every all-zero parameter (zero-initialised heads, FiLM, alpha/beta) made non-zero, as if trained."""
    with torch.no_grad():
        for p in policy.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return policy


def policies(device: str, dtype: torch.dtype) -> dict[str, tuple[torch.nn.Module, tuple]]:
    """name -> (policy, forward args) at that policy's pipeline shapes, batch 1."""

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    sd = (rand(1, 4, 64, 64), rand(1, 77, 768))
    xl = (rand(1, 4, 128, 128), rand(1, 77, 2048))
    models = {
        "projector": (NoiseProjector(NoiseProjectorConfig()), sd),
        "npnet_sd15": (NPNet(NPNetConfig()), sd),
        "npnet_sdxl": (
            NPNet(NPNetConfig(text_dim=2048, pooled_dim=1280)),
            (*xl, None, rand(1, 1280)),
        ),  # fmt: skip
        "npnet_compat_sdxl": (NPNetCompat(NPNetCompatConfig()), xl),
    }
    return {k: (trained(m).eval().to(device, dtype), a) for k, (m, a) in models.items()}


def unet_step(kind: str, dev: str, dtype: torch.dtype, repeats: int) -> tuple[float, int]:
    """Median seconds of one batch-1 UNet forward at its pipeline's shapes, and its parameters."""
    xl = kind == "sdxl"
    unet = UNet2DConditionModel(**(SDXL_UNET if xl else SD15_UNET)).eval().to(dev)
    if dtype != torch.float32:  # a float32 .to(dtype) warns about modules kept in float32
        unet.to(dtype)
    side, text = (128, 2048) if xl else (64, 768)
    noise = torch.randn(1, 4, side, side, device=dev, dtype=dtype)
    cond = torch.randn(1, 77, text, device=dev, dtype=dtype)
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, device=dev, dtype=dtype), "time_ids": torch.randn(1, 6, device=dev, dtype=dtype)}} if xl else {}  # fmt: skip
    t = torch.tensor([999], device=dev)
    seconds = timed(lambda: unet(noise, t, encoder_hidden_states=cond, **extra), repeats, dev)
    return seconds, count_parameters(unet)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unet_repeats", type=int, default=3)
    parser.add_argument("--projector_repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--unet", default="sd15", choices=["sd15", "sdxl"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, dev = getattr(torch, args.dtype), args.device
    unet_s, unet_params = unet_step(args.unet, dev, dtype, args.unet_repeats)
    result = {
        "device": dev if dev != "cuda" else torch.cuda.get_device_name(), "dtype": args.dtype,
        "threads": args.threads, "unet": args.unet, "unet_params_M": round(unet_params / 1e6, 1),
        "unet_step_s": round(unet_s, 4), "policies": {},
    }  # fmt: skip
    for name, (policy, inputs) in policies(dev, dtype).items():
        seconds = timed(lambda: policy(*inputs), args.projector_repeats, dev)  # noqa: B023
        result["policies"][name] = {
            "params_M": round(count_parameters(policy) / 1e6, 3),
            "noise_shape": list(inputs[0].shape), "seconds": round(seconds, 5),
            "ratio": round(seconds / unet_s, 5),
        }  # fmt: skip
    result["projector_s"] = result["policies"]["projector"]["seconds"]
    result["ratio"] = result["policies"]["projector"]["ratio"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
