"""The image_npd stage: golden-noise pairs from a collect's accepted images, read by train_npnet."""

import json

import datasets
import pytest
import torch

from noisealign import collect, image_npd, train_npnet
from noisealign.data.image_latents import ImageLatents
from noisealign.data.npd import load_noise_pairs
from noisealign.errors import ConfigError, DataError
from noisealign.pipelines import load_pipeline

PROMPTS = ["a red circle", "a blue square left of a yellow triangle", "a green triangle"]


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("image_npd")
    build_tiny_sd_pipeline(root / "sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    options = {"--pipeline": root / "sd", "--judge": "shapes", "--prompts": root / "prompts.txt"}
    options |= {"--seeds": "0:2", "--num_inference_steps": 2, "--batch_size": 6, "--chunk_size": 6}
    options |= {"--report_to": "none", "--output_dir": root / "collect", "--save_images": "true"}
    collect.main(_flags(options))
    return root


def _flags(options: dict) -> list[str]:
    return [str(x) for option in options.items() for x in option]


def _args(root, out, *extra):
    options = {"--dataset": root / "collect" / "dataset", "--pipeline": root / "sd"}
    options |= {"--output_dir": out, "--report_to": "none", "--pairs_per_image": 3}
    return _flags(options) + list(extra)


def test_targets_mix_the_accepted_images_latent_into_fresh_noise(collected, tmp_path):
    # the tiny random pipeline's images are all rejected by the strict judge: accept every row
    out = tmp_path / "npd"
    pairs = image_npd.main(_args(collected, out, "--min_score", "0", "--gamma", "0.2"))
    source_rows = datasets.load_from_disk(str(collected / "collect" / "dataset"))
    assert pairs.num_rows == 3 * source_rows.num_rows
    src = ImageLatents(str(collected / "collect" / "dataset"), load_pipeline(str(collected / "sd")))
    for i, row in enumerate(pairs.select(range(6))):
        z = src.latent(i // 3, row["latent_shape"])  # rows of one image are consecutive
        eps, target = torch.tensor(row["source_noise"]), torch.tensor(row["target_noise"])
        torch.testing.assert_close(target, 0.8**0.5 * eps + 0.2**0.5 * z, atol=1e-5, rtol=1e-5)
        assert row["kept"] and row["prompt_id"] == source_rows[i // 3]["prompt_id"]
        assert row["target_score"] == pytest.approx(source_rows[i // 3]["overall"])
    first = torch.tensor(pairs[0]["source_noise"])
    assert not torch.equal(first, torch.tensor(pairs[1]["source_noise"]))  # fresh noise per pair
    assert abs(float(first.std()) - 1) < 0.2
    assert json.loads((out / "recipe.json").read_text())["fingerprint"]["gamma"] == 0.2
    # the format train_npnet reads, and trains on
    assert load_noise_pairs(out).num_rows == pairs.num_rows
    options = {"--pipeline": collected / "sd", "--dataset": out, "--output_dir": tmp_path / "net"}
    options |= {"--report_to": "none", "--batch_size": 4, "--max_steps": 3, "--save_steps": 3}
    options |= {"--logging_steps": 1, "--eval_fraction": 0.34}
    options["--policy_kwargs"] = '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4}'
    result = train_npnet.main(_flags(options))
    assert [h["step"] for h in result.history] == [1, 2, 3]


def test_bad_inputs_fail_clearly_and_write_nothing(collected, tmp_path):
    out = tmp_path / "npd"
    with pytest.raises(DataError, match="no row of .* has a judge score >= 2.0"):
        image_npd.main(_args(collected, out, "--min_score", "2"))
    assert not out.exists()
    plain = tmp_path / "plain"
    options = {"--pipeline": collected / "sd", "--judge": "shapes"}
    options |= {"--prompts": collected / "prompts.txt", "--seeds": "0:1"}
    options |= {"--num_inference_steps": 2, "--report_to": "none", "--output_dir": plain}
    collect.main(_flags(options))
    with pytest.raises(DataError, match="save_images: true"):
        image_npd.main([*_args(collected, out), "--dataset", str(plain / "dataset")])
    assert not out.exists()
    with pytest.raises(ConfigError, match="'gamma' must be in"):
        image_npd.main(_args(collected, out, "--gamma", "0"))
