"""collect_npd: re-denoise sampling (Theorem E.1), the filter, and the stage end to end on a tiny SD
pipeline."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from noisealign import collect_npd, judges
from noisealign.data.npd import keep_pair, load_noise_pairs
from noisealign.data.shards import ShardStore
from noisealign.errors import DataError
from noisealign.noise import batch_noise, initial_noise
from noisealign.pipelines import encode_prompts, latent_shape, re_denoise

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square left of a yellow triangle"]
PROMPTS += ["a green triangle above a red square"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from noisealign.pipelines import load_pipeline
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("npd")
    build_tiny_sd_pipeline(root / "sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root, load_pipeline(str(root / "sd"))


class CoinJudge:
    """Deterministic pseudo-scores from the image bytes: about half the pairs improve."""

    name = "coin"

    def score(self, images, prompts, concepts=None):
        return [judges.Feedback(overall=(sum(im.tobytes()) % 97) / 96) for im in images]


@pytest.fixture(autouse=True)
def _coin_judge(monkeypatch):
    monkeypatch.setitem(judges.JUDGES, "coin", CoinJudge)


def args(root, out, *extra):
    options = {"--pipeline": root / "sd", "--judge": "coin", "--prompts": root / "prompts.txt"}
    options |= {"--seeds": "0:3", "--redenoise_steps": 4, "--num_inference_steps": 2}
    options |= {"--batch_size": 2, "--chunk_size": 2, "--report_to": "none", "--output_dir": out}
    return [str(x) for option in options.items() for x in option] + list(extra)


# ---- re-denoise sampling -------------------------------------------------------------------
def test_re_denoise_is_the_identity_without_a_cfg_gap_and_linear_in_the_gap(tiny):
    """Theorem E.1: x′_T − x_T ∝ (ω_l − ω_w)·(ε(c) − ε(∅)) at first order; ≈ 0 when ω_l = ω_w."""
    _, pipe = tiny
    emb = encode_prompts(pipe, PROMPTS[:2])
    x = batch_noise(["a", "b"], [0, 0], latent_shape(pipe))

    def golden(omega_l, omega_w):
        guidance = dict(guidance_denoise=omega_l, guidance_invert=omega_w)
        return re_denoise(pipe, x, emb, num_inference_steps=50, **guidance)

    assert (golden(5.5, 1.0) - x).abs().mean() > 1e-3  # the gap moves the noise
    # measured on this pipeline: the DDIM round trip misses by 0.014 (max) at 50 steps
    assert (golden(3.0, 3.0) - x).abs().max() < 0.05
    reference = golden(1.0, 1.0)  # the same round trip without guidance: its error cancels below
    gap2, gap4 = golden(3.0, 1.0) - reference, golden(5.0, 1.0) - reference
    assert gap4.norm() / gap2.norm() == pytest.approx(2.0, rel=0.02)
    assert torch.nn.functional.cosine_similarity(gap2.flatten(), gap4.flatten(), dim=0) > 0.999


@pytest.mark.parametrize(
    "source, target, margin, kept",
    [
        (0.2, 0.5, 0.0, True),
        (0.5, 0.5, 0.0, False),  # equal scores: no improvement
        (0.6, 0.5, 0.0, False),
        (0.2, 0.5, 0.3, False),  # strict: s + m < s′
        (0.2, 0.51, 0.3, True),
        (0.5, 0.5, -0.1, True),  # a negative margin also keeps slightly worse pairs
        (math.nan, 0.9, 0.0, False),  # failed judge
        (0.1, math.nan, -1.0, False),
    ],
)
def test_keep_pair_margin(source, target, margin, kept):
    assert keep_pair(source, target, margin) is kept


# ---- the stage -----------------------------------------------------------------------------
def test_rows_hold_the_keyed_source_its_re_denoised_target_and_the_filter(tiny, tmp_path):
    root, pipe = tiny
    dataset = collect_npd.main(args(root, tmp_path / "out", "--margin", "0.1"))
    assert dataset.num_rows == len(PROMPTS) * 3
    row = dataset.with_format("torch")[4]  # second prompt, seed 1
    assert (row["prompt"], int(row["seed"])) == (PROMPTS[1], 1)
    shape = tuple(row["latent_shape"].tolist())
    assert torch.equal(row["source_noise"], initial_noise(row["prompt_id"], 1, shape))
    emb = encode_prompts(pipe, [PROMPTS[1]])
    guidance = dict(guidance_denoise=5.5, guidance_invert=1.0)
    expected = re_denoise(pipe, row["source_noise"][None], emb, num_inference_steps=4, **guidance)
    assert torch.allclose(row["target_noise"], expected[0], atol=1e-5)
    assert not torch.allclose(row["target_noise"], row["source_noise"])
    for r in dataset:
        assert r["kept"] == keep_pair(r["source_score"], r["target_score"], 0.1)
    assert 0 < sum(dataset["kept"]) < dataset.num_rows
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["keep_rate"] == pytest.approx(sum(dataset["kept"]) / dataset.num_rows)
    assert json.loads(row["pipeline_signature"])["text_embed_dim"] == 32
    pairs = load_noise_pairs(tmp_path / "out")  # the output folder works as well as dataset/
    assert pairs.num_rows == sum(dataset["kept"]) and pairs.latent_shape == shape


def test_interrupted_run_resumes_to_identical_rows(tiny, tmp_path, monkeypatch):
    root, _ = tiny
    reference = collect_npd.main(args(root, tmp_path / "reference"))
    written = []
    original = ShardStore.write_shard

    def dying_write(self, rows, features):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")  # as if the process died after two shards
        written.append(original(self, rows, features))
        return written[-1]

    monkeypatch.setattr(ShardStore, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        collect_npd.main(args(root, tmp_path / "out"))
    monkeypatch.setattr(ShardStore, "write_shard", original)
    assert len(list((tmp_path / "out" / "shards").glob("shard-*"))) == 2
    resumed = collect_npd.main(args(root, tmp_path / "out"))
    assert resumed.to_list() == reference.to_list()


def test_other_recipe_in_output_dir_is_refused(tiny, tmp_path):
    root, _ = tiny
    collect_npd.main(args(root, tmp_path / "out"))
    with pytest.raises(DataError, match=r"different recipe \(differs in: guidance_denoise\)"):
        collect_npd.main(args(root, tmp_path / "out", "--guidance_denoise", "7.0"))
    overwrite = ("--guidance_denoise", "7.0", "--overwrite_output_dir", "true")
    redone = collect_npd.main(args(root, tmp_path / "out", *overwrite))
    assert set(redone["guidance_denoise"]) == {7.0}


def test_failed_judge_rows_are_never_kept(tiny, tmp_path, monkeypatch):
    class Broken:
        name = "broken"

        def score(self, images, prompts, concepts=None):
            raise RuntimeError("judge down")

    monkeypatch.setitem(judges.JUDGES, "broken", Broken)
    root, _ = tiny
    broken = ("--judge", "broken", "--judge_retries", "0", "--seeds", "0:1")
    dataset = collect_npd.main(args(root, tmp_path / "out", *broken))
    assert all(dataset["failed"]) and not any(dataset["kept"])
    assert set(dataset["error"]) == {"RuntimeError: judge down"}
    with pytest.raises(DataError, match="no usable pair"):
        load_noise_pairs(tmp_path / "out")


@pytest.mark.slow
def test_sigkill_and_restart_gives_the_rows_of_an_uninterrupted_run(tiny, tmp_path):
    root, _ = tiny
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # the coin judge lives in this process only: the subprocesses use the shapes judge

    def command(out):
        shapes = ("--judge", "shapes", "--seeds", "0:6")
        return [sys.executable, "-m", "noisealign.collect_npd", *args(root, out, *shapes)]

    cmd = command(tmp_path / "killed")
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, **quiet)
    deadline = time.time() + 120
    while (
        time.time() < deadline and len(list((tmp_path / "killed" / "shards").glob("shard-*"))) < 2
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "dataset").exists()
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode == 0
    assert (
        subprocess.run(
            command(tmp_path / "reference"), cwd=ROOT, env=env, capture_output=True
        ).returncode
        == 0
    )
    killed = datasets.load_from_disk(str(tmp_path / "killed" / "dataset")).to_list()
    assert killed == datasets.load_from_disk(str(tmp_path / "reference" / "dataset")).to_list()
    assert len(killed) == len(PROMPTS) * 6
