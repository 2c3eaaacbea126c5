"""The committed toy pipeline: loads with plain diffusers, generates, and is judged well."""

from __future__ import annotations

import json

import torch
from diffusers import StableDiffusionPipeline

from noisealign.noise import batch_noise
from noisealign.toy import pipeline_path
from noisealign.toy.grammar import prompt_records
from noisealign.toy.models import LATENT_SHAPE


def test_committed_folder_is_small_and_safetensors_only():
    folder = pipeline_path()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [
        None,
        None,
    ]
    assert "Baseline" in (folder / "README.md").read_text()


def test_loads_with_plain_from_pretrained_and_generates():
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 16
    records = prompt_records("single")[:4]
    latents = batch_noise([r["prompt_id"] for r in records], [0] * 4, LATENT_SHAPE)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        [r["prompt"] for r in records],
        latents=latents,
        num_inference_steps=4,
        guidance_scale=5.0,
        output_type="np",
    )
    assert out.images.shape == (4, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()
    # same noise, same image: generation is a deterministic function of the noise
    again = pipe(
        [r["prompt"] for r in records],
        latents=latents,
        num_inference_steps=4,
        guidance_scale=5.0,
        output_type="np",
    )
    assert (out.images == again.images).all()
