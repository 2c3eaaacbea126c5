"""Exploration rows: image latents of an earlier collect mixed into the noise (noisealign.data.exploration)."""

from pathlib import Path

import datasets
import pytest
import torch

from noisealign import collect
from noisealign.data.exploration import ExplorationSource
from noisealign.errors import DataError
from noisealign.noise import initial_noise
from noisealign.pipelines import load_pipeline

PROMPTS = ["a red circle", "a blue square left of a yellow triangle", "a green triangle"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline(folder)
    return str(folder)


def _args(pipeline, prompts, out, seeds, *extra):
    return [
        "--pipeline", pipeline, "--judge", "shapes", "--prompts", prompts, "--seeds", seeds,
        "--num_inference_steps", "2", "--batch_size", "4", "--chunk_size", "4",
        "--report_to", "none", "--output_dir", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def source(tiny_pipeline, tmp_path_factory):
    """A collect run with images (the exploration source) and its prompt file."""
    root = tmp_path_factory.mktemp("explore")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    collect.main(_args(tiny_pipeline, str(prompts), root / "src", "0:2", "--save_images", "true"))
    return root, str(prompts), str(root / "src" / "dataset")


def test_rows_store_the_mixed_noise_they_were_generated_from(tiny_pipeline, source):
    root, prompts, images = source
    out = root / "explored"
    dataset = collect.main(
        _args(tiny_pipeline, prompts, out, "5:8", "--exploration_images", images,
              "--exploration_gamma", "0.5")
    )  # fmt: skip
    assert {"noise", "exploration_gamma"} <= set(dataset.column_names)
    gammas = torch.tensor(dataset["exploration_gamma"])
    assert bool((gammas >= 0).all() and (gammas <= 0.5).all()) and gammas.std() > 0
    pipe = load_pipeline(tiny_pipeline)
    src = ExplorationSource(images, pipe, 0.5)
    for row in dataset.select(range(3)):
        eps = initial_noise(row["prompt_id"], row["seed"], row["latent_shape"])
        index, gamma = src.choose(row["prompt_id"], row["seed"])
        # an image of the same prompt, with the stored γ
        assert src.table[index]["prompt_id"] == row["prompt_id"]
        assert gamma == pytest.approx(row["exploration_gamma"], rel=1e-6)
        z = src.latent(index, row["latent_shape"])
        assert z.mean().abs() < 1e-5 and (z.std() - 1).abs() < 1e-5
        expected = (1 - gamma) ** 0.5 * eps + gamma**0.5 * z
        torch.testing.assert_close(torch.tensor(row["noise"]), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(torch.tensor(row["noise"]), eps, atol=1e-3)


def test_choices_depend_only_on_the_key(tiny_pipeline, source):
    _, _, images = source
    pipe = load_pipeline(tiny_pipeline)
    a, b = ExplorationSource(images, pipe, 0.2), ExplorationSource(images, pipe, 0.2)
    keys = [("toy-x", s) for s in range(20)]
    assert [a.choose(*k) for k in keys] == [b.choose(*k) for k in keys]
    assert len({a.choose(*k)[1] for k in keys}) == len(keys)  # γ varies per key
    noise = torch.randn(2, 4, 16, 16)
    mixed, gammas = a.mix(noise, ["toy-x", "toy-x"], [0, 1])
    again, _ = b.mix(noise, ["toy-x", "toy-x"], [0, 1])
    assert torch.equal(mixed, again) and len(gammas) == 2


def test_a_source_without_images_is_refused_before_anything_is_written(
    tiny_pipeline, source, tmp_path
):
    root, prompts, _ = source
    collect.main(_args(tiny_pipeline, prompts, tmp_path / "plain", "0:1"))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"lacks column\(s\) \['image'\].*save_images: true"):
        collect.main(
            _args(tiny_pipeline, prompts, out, "0:1",
                  "--exploration_images", str(tmp_path / "plain" / "dataset"))
        )  # fmt: skip
    assert not out.exists()
    with pytest.raises(DataError, match="is not a saved dataset"):
        collect.main(
            _args(
                tiny_pipeline, prompts, out, "0:1", "--exploration_images", str(Path(root) / "nope")
            )
        )
    assert not out.exists()


def test_a_source_of_another_size_is_resized_to_the_latent(tiny_pipeline, source):
    _, _, images = source
    src = ExplorationSource(images, load_pipeline(tiny_pipeline), 0.2)
    assert src.latent(0, (4, 8, 8)).shape == (4, 8, 8)


def test_exploration_settings_enter_the_fingerprint():
    base = ["--pipeline", "p", "--judge", "shapes", "--prompts", "x.txt", "--output_dir", "o"]
    from noisealign.configs import parse_config

    plain = parse_config(collect.CollectConfig, base)
    explored = parse_config(collect.CollectConfig, [*base, "--exploration_images", "d"])
    assert "exploration_images" not in plain.fingerprint()  # older folders still resume
    assert explored.fingerprint()["exploration_images"] == "d" and explored.save_noise
    with pytest.raises(Exception, match="exploration_gamma"):
        parse_config(collect.CollectConfig, [*base, "--exploration_gamma", "1.5"])


def test_stored_rows_load_as_a_dataset(source):
    _, _, images = source
    assert "image" in datasets.load_from_disk(images).column_names


def test_verdicts_are_the_chosen_images_stored_scores(source):
    _, _, images = source
    src = ExplorationSource(images, None, 0.1)
    overall = datasets.load_from_disk(images)["overall"]
    ids, seeds = [src.table[0]["prompt_id"]] * 4, [0, 1, 2, 3]
    expected = [overall[src.choose(p, s)[0]] for p, s in zip(ids, seeds)]
    assert src.verdicts(ids, seeds).tolist() == pytest.approx(expected)


def test_smooth_noise_is_keyed_unit_variance_and_low_frequency():
    from noisealign.losses.preference import lag1_autocorrelation
    from noisealign.noise import smooth_noise

    x = smooth_noise(["a", "b", "c"], [0, 1, 2], (4, 16, 16), 4)
    assert x.shape == (3, 4, 16, 16)
    assert torch.equal(x[1:2], smooth_noise(["b"], [1], (4, 16, 16), 4))  # batch-independent
    flat = x.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(3), atol=1e-5, rtol=0)
    rho_h, rho_v = lag1_autocorrelation(x)
    assert bool((rho_h > 0.8).all() and (rho_v > 0.8).all())  # white noise: ~0
    with pytest.raises(ValueError, match="grid must be >= 1"):
        smooth_noise(["a"], [0], (4, 16, 16), 0)


def test_candidates_from_smooth_fields_and_from_images(tiny_pipeline, source):
    from noisealign.noise import smooth_noise
    from noisealign.policies.training import draw_candidates

    _, _, images = source
    ref = torch.randn(2, 4, 16, 16)
    table = datasets.load_from_disk(images)
    ids = [table[0]["prompt_id"], table[2]["prompt_id"]]
    smooth = draw_candidates(ref, ids, [3, 4], 3, 0.1, grid=4)
    xi = smooth_noise([f"{ids[0]}|candidate-{j}" for j in range(3)], [3] * 3, (4, 16, 16), 4)
    torch.testing.assert_close(smooth[0], 0.9**0.5 * ref[0] + 0.1**0.5 * xi)
    src = ExplorationSource(images, load_pipeline(tiny_pipeline), 0.1)
    cands = draw_candidates(ref, ids, [3, 4], 3, 0.1, source=src)
    for b in range(2):
        for j in range(3):
            index, _ = src.choose(ids[b], [3, 4][b] * 3 + j)
            assert src.table[index]["prompt_id"] == ids[b]  # an image of the sample's own prompt
            z = src.latent(index, (4, 16, 16))
            torch.testing.assert_close(cands[b, j], 0.9**0.5 * ref[b] + 0.1**0.5 * z)


def test_train_projector_with_image_candidates(tiny_pipeline, source, tmp_path):
    from noisealign import train_projector
    from noisealign.pipelines import pipeline_signature
    from noisealign.rewards import NoiseRewardConfig, NoiseRewardModel

    _, prompts, images = source
    torch.manual_seed(0)
    config = NoiseRewardConfig(
        latent_channels=4, text_dim=32, hidden_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
        pipeline_signature=pipeline_signature(load_pipeline(tiny_pipeline)),
    )  # fmt: skip
    NoiseRewardModel(config).save_pretrained(tmp_path / "reward")
    common = [
        "--pipeline", tiny_pipeline, "--reward_model", str(tmp_path / "reward"),
        "--report_to", "none", "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1",
        "--batch_size", "2", "--num_candidates", "3", "--candidate_images", images,
        "--projector_kwargs", '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2}',
    ]  # fmt: skip
    result = train_projector.main(
        [*common, "--prompts", prompts, "--output_dir", str(tmp_path / "o")]
    )
    assert result.history[-1]["candidates/spread"] > 0
    # offline preference pairs: candidates ranked by their source image's collected verdict
    judged = train_projector.main(
        [*common, "--prompts", prompts, "--output_dir", str(tmp_path / "j"), "--candidate_scores", "source_judge"]
    )  # fmt: skip
    assert 0 <= judged.history[-1]["candidates/spread"] <= 1  # verdicts, not logits
    with pytest.raises(Exception, match="needs 'candidate_images'"):
        train_projector.main(
            [*common[:-4], *common[-2:], "--prompts", prompts, "--output_dir", str(tmp_path / "k"),
             "--candidate_scores", "source_judge"]
        )  # fmt: skip
    other = tmp_path / "other.txt"
    other.write_text("a red circle\na yellow square\n")
    with pytest.raises(DataError, match="has no image of 1 prompt"):
        train_projector.main(
            [*common, "--prompts", str(other), "--output_dir", str(tmp_path / "p")]
        )
    assert not (tmp_path / "p").exists()
