"""Reading collected feedback for distill: required columns, skipped rows, the prompt split,
batches."""

import math

import datasets
import numpy as np
import pytest
import torch

from noisealign.data.feedback import (
    FeedbackDataset,
    PromptBatchSampler,
    clean_feedback,
    load_feedback,
    split_by_prompt,
)
from noisealign.errors import DataError
from noisealign.noise import initial_noise

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


@pytest.fixture(scope="module")
def rows():
    from noisealign.testing.feedback import build_feedback_rows
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    return build_feedback_rows(build_tiny_sd_pipeline(), PROMPTS, range(3))


def save(rows, path, noise=True):
    from noisealign.data.schema import collect_features

    rows = [dict(r) for r in rows]
    if not noise:
        for r in rows:
            r.pop("noise")
    datasets.Dataset.from_list(
        rows, features=collect_features((4, 16, 16), False, noise)
    ).save_to_disk(str(path))
    return path


def test_missing_columns_are_named(rows, tmp_path):
    dataset = datasets.Dataset.from_list(
        [{k: v for k, v in r.items() if k not in ("token_mask", "failed", "noise")} for r in rows]
    )
    dataset.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match="lacks the columns token_mask, failed that distill needs"):
        load_feedback(tmp_path / "d")
    with pytest.raises(DataError, match="does not exist; run the collect stage"):
        load_feedback(tmp_path / "nope")


def test_failed_and_nonfinite_rows_are_skipped_and_counted(rows, tmp_path, caplog):
    bad = [dict(r) for r in rows]
    bad[0] = {**bad[0], "failed": True, "overall": math.nan, "error": "judge down"}
    bad[1] = {**bad[1], "token_scores": [math.nan] * len(bad[1]["token_scores"])}
    noise = np.array(bad[4]["noise"])
    noise[0, 0, 0] = np.inf
    bad[4] = {**bad[4], "noise": noise}
    bad[5] = {**bad[5], "overall": math.inf}
    caplog.set_level("WARNING")
    cleaned = clean_feedback(load_feedback(save(bad, tmp_path / "d")))
    assert len(cleaned) == len(rows) - 4
    assert cleaned.skipped_failed == 1 and cleaned.skipped_nonfinite == [1, 4, 5]
    assert "skipped 3 rows with NaN/Inf in scores or noise: rows [1, 4, 5]" in caplog.text
    assert "skipped 1 failed judge rows" in caplog.text
    assert torch.isfinite(cleaned.token_targets).all() and torch.isfinite(cleaned.noise).all()


def test_split_is_by_prompt_and_refuses_too_few_prompts(rows):
    ids = [r["prompt_id"] for r in rows]
    train, held = split_by_prompt(ids, 0.25, 1, seed=0)
    assert len(held) == 1 and len(train) == 3 and not set(train) & set(held)
    assert split_by_prompt(ids, 0.25, 1, seed=0) == (train, held)
    with pytest.raises(DataError, match="4 usable prompts, too few for 4 held-out prompts"):
        split_by_prompt(ids, 0.25, 4, seed=0)


def test_dataset_rederives_noise_and_batches_hold_whole_prompts(rows, tmp_path):
    cleaned = clean_feedback(load_feedback(save(rows, tmp_path / "d", noise=False)))
    assert cleaned.noise is None
    order = sorted(set(cleaned.prompt_ids))
    data = FeedbackDataset(cleaned, range(len(cleaned)), order)
    item = data[2]
    assert torch.equal(
        item["inputs"], initial_noise(cleaned.prompt_ids[2], cleaned.seeds[2], (4, 16, 16))
    )
    sampler = PromptBatchSampler(data.prompt, prompts_per_batch=3, shuffle=True, seed=1)
    batches = list(sampler)
    assert [len(b) for b in batches] == [9, 3]
    assert sorted(i for b in batches for i in b) == list(range(len(data)))
    for batch in batches:  # every prompt of a batch brings all 3 of its seeds
        counts = {data.prompt[i]: 0 for i in batch}
        for i in batch:
            counts[data.prompt[i]] += 1
        assert set(counts.values()) == {3}
    assert list(sampler) == batches
    sampler.use_epoch(1)
    assert list(sampler) != batches


def test_sampler_splits_large_prompt_groups():
    """seeds_per_group bounds a prompt's share of a batch; each epoch still visits every row
    once."""
    groups = [p for p in range(5) for _ in range(10)]  # 5 prompts x 10 seeds
    sampler = PromptBatchSampler(
        groups, prompts_per_batch=3, shuffle=True, seed=2, seeds_per_group=4
    )
    batches = list(sampler)
    assert len(sampler) == len(batches) == 5  # 5 x ceil(10 / 4) = 15 groups, 3 per batch
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert all(len(b) <= 3 * 4 for b in batches)
    for batch in batches:  # groups of one prompt: at most 4 seeds of it per group
        counts = {}
        for i in batch:
            counts[groups[i]] = counts.get(groups[i], 0) + 1
        assert max(counts.values()) <= 3 * 4 and sum(counts.values()) == len(batch)
    assert list(sampler) == batches  # reproducible from (seed, epoch)
    first = [sorted(b) for b in batches]
    sampler.use_epoch(1)
    assert [sorted(b) for b in sampler] != first  # seeds are regrouped each epoch
    whole = PromptBatchSampler(groups, prompts_per_batch=3, shuffle=True, seed=2)
    assert [len(b) for b in whole] == [30, 20]  # seeds_per_group 0 keeps whole prompts
