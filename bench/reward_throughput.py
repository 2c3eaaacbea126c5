"""Reward-model throughput: noises scored per second vs images generated and judged per second.

    OMP_NUM_THREADS=1 .venv/bin/python bench/reward_throughput.py [--part toy|full|all]

Two worlds, each ratio measured within one run (target: >= 1000x):

- ``toy``: the committed reward models ``reward_models/toy`` (k = 0, pure noise) and
  ``reward_models/toy-k3-x0`` (k = 3 CFG UNet steps of the toy pipeline before scoring)
  against the toy pipeline's 20-step, guidance-5 generation plus the ``shapes`` judge, all
  at the same batch size. Prompt embeddings are computed once for both sides (training
  caches them, and generation would reuse them).
- ``full``: random-weight models of real size (speed depends on the architecture, not the
  weights): an SD1.5 ``UNet2DConditionModel`` (one CFG step on a batch of 2 at 64x64
  latents, times 50 steps) plus the SD1.5 VAE decoder, judged by a Qwen2.5-VL-3B-size VLM
  (bf16: fp32 weights would take 15 GB of this 24 GB machine) answering one yes/no question
  about a 512x512 image through ``VLMJudge.yes_probability``; against a reward model of
  ``recipes/sd15/distill.yaml``'s size on 4x64x64 noise with 77x768 embeddings.

Prints one JSON line per part, then a human summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from noisealign.testing.full_size import QWEN25_VL_3B_TEXT, QWEN25_VL_3B_VISION, SD15_UNET, SD15_VAE

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1000.0


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- toy world ------------------------------------------------------------------------
@torch.no_grad()
def toy(batch: int, repeats: int) -> dict:
    from noisealign.data.prompts import load_prompts
    from noisealign.judges import build_judge
    from noisealign.noise import batch_noise
    from noisealign.pipelines import encode_prompts, generate, latent_shape, load_pipeline
    from noisealign.rewards import load_reward_model
    from noisealign.rewards.features import step_features
    from noisealign.toy import pipeline_path

    pipe = load_pipeline(str(pipeline_path()))
    pipe.set_progress_bar_config(disable=True)
    records = load_prompts(ROOT / "recipes/toy/prompts_heldout.jsonl")
    prompts = [records[i % len(records)].prompt for i in range(batch)]
    ids = [records[i % len(records)].prompt_id for i in range(batch)]
    emb = encode_prompts(pipe, prompts)
    noise = batch_noise(ids, list(range(batch)), latent_shape(pipe))
    judge = build_judge("shapes")
    settings = dict(num_inference_steps=20, guidance_scale=5.0)

    def score(model):
        x = step_features(pipe, noise, emb, steps=model.config.input_steps,
                          kind=model.config.input_kind, **settings)  # fmt: skip
        return model(x, emb.embeds, emb.mask, emb.pooled).overall_logit

    k0 = load_reward_model(str(ROOT / "reward_models/toy")).eval()
    k3 = load_reward_model(str(ROOT / "reward_models/toy-k3-x0")).eval()
    k0_s = timed(lambda: score(k0), repeats)
    k3_s = timed(lambda: score(k3), max(1, repeats // 5))
    gen_s = timed(lambda: generate(pipe, emb, noise, **settings), 1)
    images = generate(pipe, emb, noise, **settings)
    judge_s = timed(lambda: judge.score(images, prompts), 1)
    pipeline_rate = batch / (gen_s + judge_s)
    return {
        "part": "toy", "batch": batch, "steps": 20, "guidance": 5.0,
        "reward_k0_noises_per_s": round(batch / k0_s, 1),
        "reward_k3_noises_per_s": round(batch / k3_s, 1),
        "generate_s": round(gen_s, 3), "judge_s": round(judge_s, 3),
        "generate_judge_images_per_s": round(pipeline_rate, 2),
        "ratio_k0": round(batch / k0_s / pipeline_rate, 1),
        "ratio_k3": round(batch / k3_s / pipeline_rate, 1),
    }  # fmt: skip


# ---- full size, random weights ---------------------------------------------------------
def _qwen25_vl_3b_judge(dtype: torch.dtype):
    """A ``VLMJudge`` around a random Qwen2.5-VL-3B-size model, without a 7 GB save/load.

    The processor is the offline tiny one of :mod:`noisealign.testing.vlms` with the real
    model's image settings (14-pixel patches merged 2x2: a 512x512 image is 324 image tokens);
    its small vocabulary still gives one token per word of the question.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from noisealign.judges.vlm import VLMJudge
    from noisealign.judges.vlm_loading import ImageOnlyQwenVLProcessor, answer_token_ids
    from noisealign.testing.vlms import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, _qwen_tokenizer

    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(QWEN25_VL_3B_TEXT, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=QWEN25_VL_3B_VISION, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    # built in bf16 directly: no 15 GB fp32 copy on the way (the default init draws the weights)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)
    judge = VLMJudge.__new__(VLMJudge)
    judge.processor = ImageOnlyQwenVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    judge.tokenizer, judge.model, judge.device = tokenizer, model, torch.device("cpu")
    judge.question = 'Does this figure show "{text}"? Please answer yes or no.'
    judge.yes_ids, judge.no_ids = answer_token_ids(tokenizer, "yes"), answer_token_ids(tokenizer, "no")  # fmt: skip
    return judge, sum(p.numel() for p in model.parameters())


def _reward_seconds(batch: int, repeats: int) -> tuple[float, int]:
    from noisealign.rewards import NoiseRewardConfig, NoiseRewardModel

    # recipes/sd15/distill.yaml's model_kwargs
    reward = NoiseRewardModel(NoiseRewardConfig(
        latent_channels=4, text_dim=768, hidden_dim=256, depth=4, num_heads=8, patch_size=4,
    )).eval()  # fmt: skip
    noise, text = torch.randn(batch, 4, 64, 64), torch.randn(batch, 77, 768)
    mask = torch.ones(batch, 77, dtype=torch.bool)
    return timed(lambda: reward(noise, text, mask), repeats), sum(p.numel() for p in reward.parameters())  # fmt: skip


def _unet_seconds() -> tuple[float, int]:
    """One CFG UNet step: a batch of 2 (unconditional + conditional)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**SD15_UNET).eval()
    latents, cond, t = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768), torch.tensor([999, 999])
    return timed(lambda: unet(latents, t, encoder_hidden_states=cond), 1), sum(p.numel() for p in unet.parameters())  # fmt: skip


def _vae_seconds() -> float:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**SD15_VAE).eval()
    return timed(lambda: vae.decode(torch.randn(1, 4, 64, 64)), 1)


def _judge_seconds() -> tuple[float, int]:
    from PIL import Image

    judge, params = _qwen25_vl_3b_judge(torch.bfloat16)
    image = Image.new("RGB", (512, 512), (120, 80, 200))
    judge.yes_probability([image.resize((56, 56))], ["a red circle"])  # warm-up, 4 image tokens
    start = time.perf_counter()
    judge.yes_probability([image], ["a red circle left of a blue square"])
    return time.perf_counter() - start, params


@torch.no_grad()
def full(batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    reward_s, reward_params = _reward_seconds(batch, repeats)
    unet_s, unet_params = _unet_seconds()
    gc.collect()
    vae_s = _vae_seconds()
    gc.collect()
    judge_s, vlm_params = _judge_seconds()
    gc.collect()
    generate_s = 50 * unet_s + vae_s
    pipeline_rate = 1.0 / (generate_s + judge_s)
    return {
        "part": "full", "reward_batch": batch,
        "reward_params_M": round(reward_params / 1e6, 2), "unet_params_M": round(unet_params / 1e6, 1),
        "vlm_params_M": round(vlm_params / 1e6, 1), "vlm_dtype": "bfloat16",
        "reward_noises_per_s": round(batch / reward_s, 1),
        "unet_cfg_step_s": round(unet_s, 2), "vae_decode_s": round(vae_s, 2),
        "generate_50_steps_s": round(generate_s, 1), "judge_one_question_s": round(judge_s, 2),
        "generate_judge_images_per_s": round(pipeline_rate, 6),
        "ratio": round(batch / reward_s / pipeline_rate, 0),
    }  # fmt: skip


def summary(result: dict) -> str:
    met = lambda r: "met" if r >= TARGET else "NOT met"  # noqa: E731
    if result["part"] == "toy":
        return (
            f"toy world, batch {result['batch']}: reward k=0 {result['reward_k0_noises_per_s']:.0f} noises/s, "
            f"k=3 {result['reward_k3_noises_per_s']:.0f} noises/s; generate (20 steps) + shapes judge "
            f"{result['generate_judge_images_per_s']:.1f} images/s -> ratio k=0 {result['ratio_k0']:.0f}x "
            f"({met(result['ratio_k0'])}), k=3 {result['ratio_k3']:.0f}x ({met(result['ratio_k3'])}) "
            f"vs target >= {TARGET:.0f}x"
        )
    return (
        f"full size (random weights): reward model ({result['reward_params_M']} M params) "
        f"{result['reward_noises_per_s']:.0f} noises/s; SD1.5 UNet CFG step {result['unet_cfg_step_s']} s "
        f"x 50 + VAE {result['vae_decode_s']} s + Qwen2.5-VL-3B-size judge ({result['vlm_params_M']:.0f} M, bf16) "
        f"{result['judge_one_question_s']} s per question = {1 / result['generate_judge_images_per_s']:.0f} s "
        f"per image -> ratio {result['ratio']:.0f}x ({met(result['ratio'])}) vs target >= {TARGET:.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["toy", "full", "all"], default="all")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = ["toy", "full"] if args.part == "all" else [args.part]
    results = []
    for part in parts:
        result = {"toy": toy, "full": full}[part](args.batch, args.repeats)
        result["threads"] = args.threads
        print(json.dumps(result), flush=True)
        results.append(result)
    for result in results:
        print(summary(result))


if __name__ == "__main__":
    main()
