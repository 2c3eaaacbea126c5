"""Candidates from image latents: an earlier collect's images (noisealign.data.image_latents,
noisealign.policies.candidates) as train_projector's ξ."""

from pathlib import Path

import datasets
import pytest
import torch

from noisealign import collect, train_projector
from noisealign.data.image_latents import ImageLatents
from noisealign.errors import DataError
from noisealign.pipelines import load_pipeline, pipeline_signature
from noisealign.policies.candidates import ImageCandidates, WhiteNoise, draw_candidates
from noisealign.rewards import NoiseRewardConfig, NoiseRewardModel

PROMPTS = ["a red circle", "a blue square left of a yellow triangle", "a green triangle"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline(folder)
    return str(folder)


def _args(pipeline, prompts, out, seeds, *extra):
    options = {"--pipeline": pipeline, "--judge": "shapes", "--prompts": prompts, "--seeds": seeds}
    options |= {"--num_inference_steps": 2, "--batch_size": 4, "--chunk_size": 4}
    options |= {"--report_to": "none", "--output_dir": out}
    return [str(x) for option in options.items() for x in option] + list(extra)


@pytest.fixture(scope="module")
def source(tiny_pipeline, tmp_path_factory):
    """A collect run with images (the candidates' source) and its prompt file."""
    root = tmp_path_factory.mktemp("images")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    collect.main(_args(tiny_pipeline, str(prompts), root / "src", "0:2", "--save_images", "true"))
    return root, str(prompts), str(root / "src" / "dataset")


def test_choices_depend_only_on_the_key(tiny_pipeline, source):
    _, _, images = source
    pipe = load_pipeline(tiny_pipeline)
    a, b = ImageLatents(images, pipe), ImageLatents(images, pipe)
    keys = [("toy-x", s) for s in range(20)]
    assert [a.choose(*k) for k in keys] == [b.choose(*k) for k in keys]
    assert len({a.choose(*k) for k in keys}) > 1  # the image varies per key


def test_a_source_without_images_is_refused_before_anything_is_written(
    tiny_pipeline, source, tmp_path
):
    root, prompts, _ = source
    collect.main(_args(tiny_pipeline, prompts, tmp_path / "plain", "0:1"))
    reward = _reward_model(tiny_pipeline, tmp_path)
    out = tmp_path / "out"
    plain = str(tmp_path / "plain" / "dataset")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['image'\].*save_images: true"):
        train_projector.main(_projector_args(tiny_pipeline, reward, prompts, out, plain))
    assert not out.exists()
    with pytest.raises(DataError, match="is not a saved dataset"):
        nope = str(Path(root) / "nope")
        train_projector.main(_projector_args(tiny_pipeline, reward, prompts, out, nope))
    assert not out.exists()


def test_a_source_of_another_size_is_resized_to_the_latent(tiny_pipeline, source):
    _, _, images = source
    src = ImageLatents(images, load_pipeline(tiny_pipeline))
    assert src.latent(0, (4, 8, 8)).shape == (4, 8, 8)


def test_stored_rows_load_as_a_dataset(source):
    _, _, images = source
    assert "image" in datasets.load_from_disk(images).column_names


def test_verdicts_are_the_chosen_images_stored_scores(source):
    _, _, images = source
    src = ImageCandidates(images, None)
    overall = datasets.load_from_disk(images)["overall"]
    ids, seeds = [src.images.table[0]["prompt_id"]] * 2, [0, 1]
    keys = [(ids[0], s) for s in (0, 1, 2, 3)]  # candidate j of seed s: image key s·K + j, K = 2
    expected = [overall[src.images.choose(p, s)] for p, s in keys]
    assert src.verdicts(ids, seeds, 2).tolist() == pytest.approx(expected)


def test_candidates_from_white_noise_and_from_images(tiny_pipeline, source):
    from noisealign.noise import batch_noise

    _, _, images = source
    ref = torch.randn(2, 4, 16, 16)
    table = datasets.load_from_disk(images)
    ids = [table[0]["prompt_id"], table[2]["prompt_id"]]
    white = draw_candidates(WhiteNoise(), ref, ids, [3, 4], 3, 0.1)
    xi = batch_noise([f"{ids[0]}|candidate-{j}" for j in range(3)], [3] * 3, (4, 16, 16))
    torch.testing.assert_close(white[0], 0.9**0.5 * ref[0] + 0.1**0.5 * xi)
    src = ImageCandidates(images, load_pipeline(tiny_pipeline))
    cands = draw_candidates(src, ref, ids, [3, 4], 3, 0.1)
    for b in range(2):
        for j in range(3):
            index = src.images.choose(ids[b], [3, 4][b] * 3 + j)
            assert src.images.table[index]["prompt_id"] == ids[b]  # the sample's own prompt
            z = src.images.latent(index, (4, 16, 16))
            assert z.mean().abs() < 1e-5 and (z.std() - 1).abs() < 1e-5
            torch.testing.assert_close(cands[b, j], 0.9**0.5 * ref[b] + 0.1**0.5 * z)


def _reward_model(tiny_pipeline, tmp_path):
    torch.manual_seed(0)
    sizes = dict(latent_channels=4, text_dim=32, hidden_dim=16, depth=1, num_heads=2)
    signature = pipeline_signature(load_pipeline(tiny_pipeline))
    config = NoiseRewardConfig(**sizes, mlp_ratio=2.0, pipeline_signature=signature)
    NoiseRewardModel(config).save_pretrained(tmp_path / "reward")
    return str(tmp_path / "reward")


def _projector_args(tiny_pipeline, reward, prompts, out, images, *extra):
    options = {"--pipeline": tiny_pipeline, "--reward_model": reward, "--prompts": prompts}
    options |= {"--report_to": "none", "--max_steps": 2, "--save_steps": 2, "--logging_steps": 1}
    options |= {"--batch_size": 2, "--num_candidates": 3, "--output_dir": out}
    options["--projector_kwargs"] = (
        '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2}'
    )
    if images is not None:
        options["--candidate_images"] = images
    return [str(x) for option in options.items() for x in option] + list(extra)


def test_train_projector_with_image_candidates(tiny_pipeline, source, tmp_path):
    _, prompts, images = source
    reward = _reward_model(tiny_pipeline, tmp_path)
    result = train_projector.main(
        _projector_args(tiny_pipeline, reward, prompts, tmp_path / "o", images)
    )
    assert result.history[-1]["candidates/spread"] > 0
    # offline preference pairs: candidates ranked by their source image's collected verdict
    verdicts = ("--rank_by", "verdicts")
    judged = train_projector.main(
        _projector_args(tiny_pipeline, reward, prompts, tmp_path / "j", images, *verdicts)
    )
    assert 0 <= judged.history[-1]["candidates/spread"] <= 1  # verdicts, not logits
    with pytest.raises(Exception, match="needs 'candidate_images'"):
        train_projector.main(
            _projector_args(tiny_pipeline, reward, prompts, tmp_path / "k", None, *verdicts)
        )
    other = tmp_path / "other.txt"
    other.write_text("a red circle\na yellow square\n")
    with pytest.raises(DataError, match="has no image of 1 prompt"):
        train_projector.main(
            _projector_args(tiny_pipeline, reward, str(other), tmp_path / "p", images)
        )
    assert not (tmp_path / "p").exists()
