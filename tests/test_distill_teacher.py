"""distill with a teacher: a k-step reward model labels fresh noises of the training prompts."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from noisealign import distill
from noisealign.data.feedback import split_by_prompt
from noisealign.distillation import teacher as teacher_module
from noisealign.errors import ConfigError, DataError
from noisealign.noise import batch_noise
from noisealign.pipelines import encode_prompts, load_pipeline
from noisealign.rewards import load_reward_model
from noisealign.rewards.features import step_features
from noisealign.testing.feedback import FEEDBACK_PROMPTS

PROMPTS = list(FEEDBACK_PROMPTS)


def args(root, out, *extra):
    return [
        "--dataset",
        str(root / "data"),
        "--pipeline",
        str(root / "sd"),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--max_steps",
        "3",
        "--save_steps",
        "2",
        "--eval_steps",
        "0",
        "--logging_steps",
        "1",
        "--prompts_per_batch",
        "2",
        "--warmup_steps",
        "1",
        "--eval_fraction",
        "0.34",
        "--learning_rate",
        "1e-3",
        "--model_kwargs",
        '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}',
        *extra,
    ]


def student(root, out, *extra):
    return args(
        root,
        out,
        "--teacher",
        str(root / "teacher"),
        "--teacher_seeds",
        "5",
        "--seeds_per_group",
        "2",
        "--feature_batch_size",
        "1",
        *extra,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny SD pipeline, 6 prompts x 4 judged seeds with stored noise, and a k = 1 teacher."""
    from noisealign.testing.feedback import build_feedback_dataset
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("teacher")
    pipe = build_tiny_sd_pipeline(root / "sd")
    build_feedback_dataset(
        pipe, root / "data", PROMPTS, range(4), pipeline=str(root / "sd"), save_noise=True
    )
    distill.main(
        args(root, root / "teacher", "--input_steps", "1", "--input_kind", "x0", "--max_steps", "2")
    )
    return root


def column(root: Path, name: str) -> list:
    import datasets

    return datasets.load_from_disk(str(root / "data"))[name]


def labels(out: Path) -> dict[str, torch.Tensor]:
    blocks = sorted((out / "teacher_labels").glob("block-*.safetensors"))
    parts = [load_file(str(b)) for b in blocks]
    return {k: torch.cat([p[k] for p in parts]) for k in ("token_logits", "overall_logit")}


def test_student_trains_on_the_teachers_labels_of_fresh_training_noises(tiny, tmp_path):
    out = tmp_path / "out"
    result = distill.main(student(tiny, out))
    train_ids, eval_ids = split_by_prompt(column(tiny, "prompt_id"), 0.34, 2, 0)
    manifest = json.loads((out / "teacher_labels" / "manifest.json").read_text())
    # 5 fresh seeds for each of the 4 training prompts, none of the held-out ones
    plan_ids, plan_seeds = teacher_module.label_plan(train_ids, 5, 1_000_000)
    assert plan_ids == train_ids * 5 and not set(plan_ids) & set(eval_ids)
    assert plan_seeds == [1_000_000 + s for s in range(5) for _ in train_ids]
    assert (manifest["noises"], manifest["prompts"], manifest["first_seed"]) == (20, 4, 1_000_000)
    assert len(list((out / "teacher_labels").glob("block-*"))) == 3  # blocks of 8 noises
    # the stored labels are the teacher's scores of x0 after its one DDIM step
    teacher = load_reward_model(str(tiny / "teacher")).eval()
    pipe = load_pipeline(str(tiny / "sd"))
    got, pick = labels(out), [0, 9, 19]
    ids = [plan_ids[i] for i in pick]
    prompt_of = dict(zip(column(tiny, "prompt_id"), column(tiny, "prompt")))
    emb = encode_prompts(pipe, [prompt_of[p] for p in ids])
    with torch.no_grad():
        x = step_features(
            pipe,
            batch_noise(ids, [plan_seeds[i] for i in pick], (4, 16, 16)),
            emb,
            steps=1,
            kind="x0",
            num_inference_steps=2,
            guidance_scale=teacher.config.guidance_scale,
        )
        want = teacher(x, emb.embeds, emb.mask, emb.pooled)
    torch.testing.assert_close(got["overall_logit"][pick], want.overall_logit, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["token_logits"][pick], want.token_logits, atol=1e-5, rtol=1e-4)
    # batches: 2 groups of at most 2 seeds, and every group brings a seed pair to rank
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert all(h["pairs"] >= 1 for h in result.history)
    # evaluated against the judge on the held-out prompts' real rows, beside the teacher
    assert result.metrics["rows"] == len(eval_ids) * 4 == result.teacher["rows"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["teacher"]["pairs"] == result.teacher["pairs"]
    assert saved["info"]["train_rows"] == 20 and saved["info"]["eval_prompt_ids"] == eval_ids
    card = (out / "README.md").read_text()
    assert "| metric | this model | prompt-only baseline | teacher |" in card
    assert "20 fresh noises (5 seeds per training prompt)" in card


def test_labels_survive_a_killed_run_and_are_checked(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    distill.main(student(tiny, out))
    first = labels(out)
    calls = []
    real = teacher_module._label_block

    def counting(*a, **k):
        calls.append(len(a[4]))
        return real(*a, **k)

    monkeypatch.setattr(teacher_module, "_label_block", counting)
    # a run killed while labelling leaves whole blocks only; the rerun labels the missing one
    (out / "teacher_labels" / "block-00001.safetensors").unlink()
    distill.main(student(tiny, out, "--overwrite_output_dir", "true"))
    assert calls == [8]
    again = labels(out)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # a corrupt block is named, with the fix
    (out / "teacher_labels" / "block-00002.safetensors").write_bytes(b"garbage")
    with pytest.raises(
        DataError, match="block-00002.safetensors' is corrupt .*delete it and rerun"
    ):
        distill.main(student(tiny, out, "--overwrite_output_dir", "true"))
    (out / "teacher_labels" / "block-00002.safetensors").unlink()
    distill.main(student(tiny, out, "--overwrite_output_dir", "true"))
    assert calls == [8, 4]  # the last block holds the remaining 4 noises
    assert all(torch.equal(first[k], labels(out)[k]) for k in first)
    # labels of another plan are refused, nothing is touched
    before = sorted(p.stat().st_mtime_ns for p in (out / "teacher_labels").iterdir())
    with pytest.raises(
        DataError, match="another teacher or plan \\(differs in: noises, plan_sha256\\)"
    ):
        distill.main(
            student(tiny, out, "--teacher_seeds", "4", "--resume_from_checkpoint", "latest")
        )
    assert sorted(p.stat().st_mtime_ns for p in (out / "teacher_labels").iterdir()) == before


def test_bad_teachers_fail_clearly(tiny, tmp_path):
    with pytest.raises(DataError, match="cannot find reward model .*missing"):
        distill.main(student(tiny, tmp_path / "a", "--teacher", str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="'teacher_seeds' must be >= 1"):
        distill.main(student(tiny, tmp_path / "a", "--teacher_seeds", "0"))
    # a teacher distilled with another split saw some of this run's held-out prompts
    other = tmp_path / "leaky"
    assert (
        split_by_prompt(column(tiny, "prompt_id"), 0.34, 2, 3)[1]
        != split_by_prompt(column(tiny, "prompt_id"), 0.34, 2, 0)[1]
    )
    distill.main(args(tiny, other, "--seed", "3", "--max_steps", "1"))
    with pytest.raises(DataError, match="trained on .* of this run's held-out prompts"):
        distill.main(student(tiny, tmp_path / "b", "--teacher", str(other)))
    assert not (tmp_path / "b").exists()
    # the teacher's split, with this run's own initialisation seed, is accepted
    result = distill.main(
        student(
            tiny, tmp_path / "c", "--teacher", str(other), "--split_seed", "3", "--max_steps", "1"
        )
    )
    saved = json.loads((tmp_path / "c" / "metrics.json").read_text())["info"]
    assert saved["split_seed"] == 3 and result.metrics["rows"] == 8


@pytest.mark.slow
def test_two_processes_share_the_labelling_and_get_the_same_labels(tiny, tmp_path):
    import os
    import subprocess
    import sys

    single = tmp_path / "one"
    distill.main(student(tiny, single, "--max_steps", "1"))
    out = tmp_path / "two"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(Path(distill.__file__)),
        *student(tiny, out, "--max_steps", "1"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = labels(single), labels(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(out)


def test_sdxl_teacher_and_student(tmp_path):
    """The teacher path with SDXL-style inputs: pooled embeddings and text_time conditioning."""
    from noisealign.testing.feedback import build_feedback_dataset
    from noisealign.testing.pipelines import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(tmp_path / "sd")  # args() reads the pipeline from <root>/sd
    build_feedback_dataset(
        pipe, tmp_path / "data", PROMPTS, range(2), pipeline=str(tmp_path / "sd")
    )
    distill.main(args(tmp_path, tmp_path / "teacher", "--input_steps", "1", "--max_steps", "1"))
    result = distill.main(student(tmp_path, tmp_path / "out", "--max_steps", "2"))
    assert load_reward_model(str(tmp_path / "out")).config.pooled_dim is not None
    got = labels(tmp_path / "out")
    assert got["token_logits"].shape[0] == got["overall_logit"].shape[0] == 20
    assert torch.isfinite(got["token_logits"]).all() and result.teacher["rows"] == 4
