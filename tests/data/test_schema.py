"""The collect row schema: one CollectRow gives both the rows and the dataset features."""

import datasets
import numpy as np

from noisealign.data.schema import CollectRow, collect_features, feedback_columns


def _row(**optional):
    feedback = feedback_columns(None, "judge down", ["a", "cat"], [(0, 1), (2, 5)])
    settings = dict(pipeline="p", num_inference_steps=2, guidance_scale=5.0, height=32, width=32)
    return CollectRow(
        prompt_id="p0",
        prompt="a cat",
        seed=3,
        **settings,
        latent_shape=[4, 2, 2],
        judge="shapes",
        **feedback,
        **optional,
    )


def test_rows_carry_exactly_the_feature_columns_in_order():
    plain = _row().to_dict()
    assert list(plain) == list(collect_features((4, 2, 2), save_images=False, save_noise=False))
    noise = np.zeros((4, 2, 2), dtype=np.float32)
    with_noise = _row(noise=noise).to_dict()
    features = collect_features((4, 2, 2), save_images=False, save_noise=True)
    assert list(with_noise) == list(features) and list(features)[-1] == "noise"
    assert "image" in collect_features((4, 2, 2), save_images=True, save_noise=False)


def test_rows_load_as_a_dataset_with_those_features():
    features = collect_features((4, 2, 2), save_images=False, save_noise=True)
    row = _row(noise=np.ones((4, 2, 2), dtype=np.float32)).to_dict()
    table = datasets.Dataset.from_list([row], features=features)
    assert table[0]["failed"] and table[0]["error"] == "judge down"
    assert np.asarray(table[0]["noise"]).shape == (4, 2, 2)
