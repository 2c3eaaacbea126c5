"""Cost of one projector forward relative to one UNet step of an SD1.5-size UNet at 64x64 latents.

    .venv/bin/python bench/projector_speed.py [--threads 1] [--unet_repeats 3] [--device cpu]

Both models are built from configs with random weights (speed depends on the architecture,
not the weights): the SD1.5 ``UNet2DConditionModel`` (860 M parameters) and the default
:class:`~noisealign.policies.NoiseProjector` of ``recipes/sd15/train_projector.yaml``
(text 77x768, latents 4x64x64). One UNet step is counted as ONE batch-1 forward, i.e. without
the CFG doubling — the stricter comparison. Prints one JSON line with median seconds and
the ratio; the target is ratio <= 0.01.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from noisealign.policies import NoiseProjector, NoiseProjectorConfig, count_parameters

# SD1.5's UNet config (stable-diffusion-v1-5 unet/config.json), random weights
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip


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


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unet_repeats", type=int, default=3)
    parser.add_argument("--projector_repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    unet = UNet2DConditionModel(**SD15_UNET).eval().to(args.device)
    if dtype != torch.float32:  # a float32 .to(dtype) warns about modules kept in float32
        unet.to(dtype)
    projector = NoiseProjector(NoiseProjectorConfig()).eval().to(args.device, dtype)
    with torch.no_grad():
        projector.head.weight.normal_(0, 0.02)  # a trained (non-zero) head: the full path runs
    noise = torch.randn(1, 4, 64, 64, device=args.device, dtype=dtype)
    text = torch.randn(1, 77, 768, device=args.device, dtype=dtype)
    t = torch.tensor([999], device=args.device)
    unet_s = timed(lambda: unet(noise, t, encoder_hidden_states=text), args.unet_repeats, args.device)  # fmt: skip
    proj_s = timed(lambda: projector(noise, text), args.projector_repeats, args.device)
    result = {
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "dtype": args.dtype, "threads": args.threads,
        "unet_params_M": round(count_parameters(unet) / 1e6, 1),
        "projector_params_M": round(count_parameters(projector) / 1e6, 3),
        "unet_step_s": round(unet_s, 4), "projector_s": round(proj_s, 5),
        "ratio": round(proj_s / unet_s, 5),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
