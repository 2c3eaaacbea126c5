"""Held-out prompts on a chain of tiny stages: rows with split 'eval' never reach a training input.

collect → distill → train_projector, collect_npd, image_npd → train_npnet, on a tiny SD
pipeline and a prompt file whose train and eval rows are interleaved.
"""

import json
import shutil

import datasets
import pytest

from noisealign import (
    collect,
    collect_npd,
    distill,
    image_npd,
    judges,
    train_npnet,
    train_projector,
)
from noisealign.distillation import stage
from noisealign.errors import DataError

ROWS = [
    ("t0", "a red circle", "train"),
    ("e0", "a red square", "eval"),
    ("t1", "a blue square", "train"),
    ("t2", "a green triangle above a red square", "train"),
    ("e1", "a blue circle left of a green triangle", "eval"),
    ("t3", "a yellow circle right of a blue circle", "train"),
]
TRAIN = ["t0", "t1", "t2", "t3"]
EVAL = ["e0", "e1"]
TINY = ["--report_to", "none", "--num_inference_steps", "2"]


class CoinJudge:
    """Deterministic pseudo-scores from the image bytes."""

    name = "coin"

    def score(self, images, prompts, concepts=None):
        return [judges.Feedback(overall=(sum(im.tobytes()) % 97) / 96) for im in images]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("heldout")
    build_tiny_sd_pipeline(root / "sd")
    lines = [json.dumps({"prompt_id": i, "prompt": p, "split": s}) for i, p, s in ROWS]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    collect.main([
        "--pipeline", str(root / "sd"), "--judge", "shapes", "--prompts", str(root / "prompts.jsonl"),
        "--seeds", "0:2", "--batch_size", "8", "--chunk_size", "8", "--save_images", "true",
        "--output_dir", str(root / "collect"), *TINY,
    ])  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        calls = spy(patch, stage, "build_parts")
        distill.main([
            "--dataset", str(root / "collect" / "dataset"), "--pipeline", str(root / "sd"),
            "--output_dir", str(root / "distill"), "--report_to", "none", "--max_steps", "2",
            "--save_steps", "2", "--prompts_per_batch", "2", "--eval_fraction", "0.5",
            "--model_kwargs", '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}',
        ])  # fmt: skip
    (((_, train_rows, eval_rows, *_), _),) = calls
    (root / "distill_rows.json").write_text(
        json.dumps([train_rows.prompt_ids, eval_rows.prompt_ids])
    )
    return root


def spy(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that records each call's (args, result)."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, real(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_collect_and_distill_see_only_training_prompts(chain):
    rows = datasets.load_from_disk(str(chain / "collect" / "dataset"))
    assert sorted(set(rows["prompt_id"])) == TRAIN and rows.num_rows == 4 * 2
    record = json.loads((chain / "collect" / "heldout.json").read_text())
    assert record["heldout_prompt_ids"] == EVAL and record["heldout_split"] == "eval"
    # distill trains on training prompts only, and draws its validation prompts from them
    train_ids, validation_ids = json.loads((chain / "distill_rows.json").read_text())
    assert set(train_ids) | set(validation_ids) == set(TRAIN) and not set(train_ids) & set(validation_ids)  # fmt: skip
    info = json.loads((chain / "distill" / "metrics.json").read_text())["info"]
    assert sorted(set(validation_ids)) == info["eval_prompt_ids"]
    assert info["prompts"] == 4 and info["train_prompts"] + info["eval_prompts"] == 4
    assert info["eval_prompt_ids"] and set(info["eval_prompt_ids"]) <= set(TRAIN)


def test_train_projector_trains_only_on_training_prompts(chain, tmp_path, monkeypatch):
    from noisealign.policies import training

    calls = spy(monkeypatch, train_projector, "read_prompts")  # imported at its top
    train_projector.main([
        "--pipeline", str(chain / "sd"), "--reward_model", str(chain / "distill"),
        "--prompts", str(chain / "prompts.jsonl"), "--output_dir", str(tmp_path / "projector"),
        "--report_to", "none", "--max_steps", "1", "--save_steps", "1", "--batch_size", "2",
        "--num_candidates", "2",
        "--projector_kwargs", '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2}',
    ])  # fmt: skip
    ((_, (ids, texts)),) = calls
    assert ids == TRAIN and texts == [p for i, p, _ in ROWS if i in TRAIN]
    # from the collected dataset instead of the prompt file: the same prompts
    assert training.read_prompts(None, str(chain / "collect" / "dataset"))[0] == TRAIN


def test_noise_pair_stages_see_only_training_prompts(chain, tmp_path, monkeypatch):
    monkeypatch.setitem(judges.JUDGES, "coin", CoinJudge)
    pairs = collect_npd.main([
        "--pipeline", str(chain / "sd"), "--judge", "coin", "--prompts", str(chain / "prompts.jsonl"),
        "--seeds", "0:1", "--redenoise_steps", "2", "--batch_size", "4", "--chunk_size", "4",
        "--output_dir", str(tmp_path / "npd"), *TINY,
    ])  # fmt: skip
    assert sorted(set(pairs["prompt_id"])) == TRAIN
    assert json.loads((tmp_path / "npd" / "heldout.json").read_text())["heldout_prompt_ids"] == EVAL
    image_pairs = image_npd.main([
        "--dataset", str(chain / "collect" / "dataset"), "--pipeline", str(chain / "sd"),
        "--output_dir", str(tmp_path / "image_npd"), "--report_to", "none", "--min_score", "0",
        "--pairs_per_image", "1",
    ])  # fmt: skip
    assert sorted(set(image_pairs["prompt_id"])) == TRAIN
    assert json.loads((tmp_path / "image_npd" / "heldout.json").read_text())["heldout_prompt_ids"] == EVAL  # fmt: skip
    train_npnet.main([
        "--pipeline", str(chain / "sd"), "--dataset", str(tmp_path / "image_npd"),
        "--output_dir", str(tmp_path / "npnet"), "--report_to", "none", "--batch_size", "4",
        "--max_steps", "1", "--save_steps", "1", "--eval_fraction", "0.25",
        "--policy_kwargs", '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4}',
    ])  # fmt: skip
    summary = json.loads((tmp_path / "npnet" / "train_metrics.json").read_text())
    assert sorted(summary["train_prompts"] + summary["eval_prompts"]) == TRAIN


def test_datasets_holding_recorded_heldout_prompts_are_refused_before_any_output(chain, tmp_path):
    # a collect folder whose dataset/ predates its record, e.g. written before 't1' was held out
    stale = tmp_path / "collect"
    shutil.copytree(chain / "collect", stale)
    record = json.loads((stale / "heldout.json").read_text())
    (stale / "heldout.json").write_text(json.dumps({**record, "heldout_prompt_ids": ["e0", "t1"]}))  # fmt: skip
    leak = r"holds rows of 1 held-out prompt\(s\) \(e\.g\. 't1'.*collect it again"
    sd, out = str(chain / "sd"), str(tmp_path / "out")
    with pytest.raises(DataError, match=leak):
        distill.main(["--dataset", str(stale / "dataset"), "--pipeline", sd, "--output_dir", out, "--report_to", "none"])  # fmt: skip
    with pytest.raises(DataError, match=leak):
        train_projector.main(["--dataset", str(stale / "dataset"), "--pipeline", sd, "--reward_model", str(chain / "distill"), "--output_dir", out, "--report_to", "none"])  # fmt: skip
    with pytest.raises(DataError, match=leak):
        image_npd.main(["--dataset", str(stale / "dataset"), "--pipeline", sd, "--output_dir", out, "--report_to", "none", "--min_score", "0"])  # fmt: skip
    assert not (tmp_path / "out").exists()
