"""The collect stage end to end on a tiny SD pipeline with the programmatic shapes judge."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from noisealign import collect, judges
from noisealign.cli import main as cli_main
from noisealign.errors import DataError, JudgeError, PipelineError
from noisealign.noise import initial_noise

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red circle",
    "a blue square left of a yellow triangle",
    "a green triangle above a red square",
    "a yellow circle right of a blue circle",
]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline(folder)
    return str(folder)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def args(pipeline, prompts, out, *extra):
    return [
        "--pipeline",
        pipeline,
        "--judge",
        "shapes",
        "--prompts",
        prompts,
        "--seeds",
        "0:3",
        "--num_inference_steps",
        "2",
        "--batch_size",
        "4",
        "--chunk_size",
        "4",
        "--report_to",
        "none",
        "--output_dir",
        str(out),
        *extra,
    ]


def test_collect_rows_schema_and_token_alignment(tiny_pipeline, prompt_file, tmp_path):
    dataset = collect.main(
        args(tiny_pipeline, prompt_file, tmp_path / "out", "--save_noise", "true")
    )
    assert dataset.num_rows == len(PROMPTS) * 3
    on_disk = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    assert on_disk.num_rows == dataset.num_rows
    for column in (
        "prompt_id",
        "prompt",
        "seed",
        "judge",
        "overall",
        "token_scores",
        "token_mask",
        "concepts",
        "num_inference_steps",
        "guidance_scale",
        "noise",
        "failed",
    ):
        assert column in on_disk.column_names
    row = on_disk[4]  # second prompt, seed 1
    assert (row["prompt"], row["seed"]) == (PROMPTS[1], 1)
    assert 0.0 <= row["overall"] <= 1.0 and not row["failed"]
    # the stored noise is exactly the keyed noise, so it need not be stored
    assert torch.equal(
        torch.tensor(row["noise"]), initial_noise(row["prompt_id"], 1, row["latent_shape"])
    )
    # scores sit on the pipeline's own tokens: scored words, never padding or specials
    scored = {tok for tok, m in zip(row["tokens"], row["token_mask"]) if m}
    assert {"blue</w>", "square</w>", "yellow</w>", "triangle</w>"} <= scored
    assert not any(m for tok, m in zip(row["tokens"], row["token_mask"]) if tok.startswith("<|"))
    assert len(row["token_scores"]) == len(row["tokens"]) == len(row["token_mask"])


def test_rerun_is_a_no_op_and_extends_with_new_seeds(tiny_pipeline, prompt_file, tmp_path):
    first = collect.main(args(tiny_pipeline, prompt_file, tmp_path / "out"))
    shards = sorted(p.name for p in (tmp_path / "out" / "shards").iterdir())
    again = collect.main(args(tiny_pipeline, prompt_file, tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == shards
    assert again.to_list() == first.to_list()
    more = collect.main(args(tiny_pipeline, prompt_file, tmp_path / "out") + ["--seeds", "0:4"])
    assert more.num_rows == len(PROMPTS) * 4
    assert more.filter(lambda r: r["seed"] < 3).to_list() == first.to_list()


class FlakyJudge:
    """Raises on every prompt that mentions 'blue'; the shapes judge otherwise."""

    name = "flaky"

    def __init__(self):
        self.inner = judges.build_judge("shapes")

    def score(self, images, prompts, concepts=None):
        if any("blue" in p for p in prompts):
            raise RuntimeError("judge server said no")
        return self.inner.score(images, prompts, concepts)


def test_failing_judge_marks_rows_and_run_completes(
    tiny_pipeline, prompt_file, tmp_path, monkeypatch, caplog
):
    caplog.set_level("INFO")
    monkeypatch.setitem(judges.JUDGES, "flaky", FlakyJudge)
    dataset = collect.main(
        args(tiny_pipeline, prompt_file, tmp_path / "out")
        + ["--judge", "flaky", "--judge_retries", "1"]
    )
    failed = dataset.filter(lambda r: r["failed"])
    assert failed.num_rows == 2 * 3  # two prompts mention blue, three seeds each
    assert set(failed["error"]) == {"RuntimeError: judge server said no"}
    assert all(s != s for s in failed["overall"])  # NaN, so no stage mistakes it for a score
    assert dataset.num_rows - failed.num_rows == 2 * 3
    assert "6 failed judge rows" in caplog.text


def test_bad_inputs_raise_clear_errors(tiny_pipeline, prompt_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(JudgeError, match="unknown judge 'nope'; known judges: .*shapes"):
        collect.main(args(tiny_pipeline, prompt_file, out) + ["--judge", "nope"])
    with pytest.raises(DataError, match="prompt file 'missing.txt' does not exist"):
        collect.main(args(tiny_pipeline, "missing.txt", out))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no prompts"):
        collect.main(args(tiny_pipeline, str(empty), out))
    (tmp_path / "not-a-pipeline").mkdir()  # beside out: a folder holding out is refused first
    with pytest.raises(PipelineError, match="is not a diffusers pipeline folder"):
        collect.main(args(str(tmp_path / "not-a-pipeline"), prompt_file, out))


def test_other_recipe_in_output_dir_is_refused_and_kept(tiny_pipeline, prompt_file, tmp_path):
    out = tmp_path / "out"
    first = collect.main(args(tiny_pipeline, prompt_file, out))
    with pytest.raises(DataError, match=r"different recipe \(differs in: guidance_scale\)"):
        collect.main(args(tiny_pipeline, prompt_file, out) + ["--guidance_scale", "2.0"])
    assert datasets.load_from_disk(str(out / "dataset")).to_list() == first.to_list()
    redone = collect.main(
        args(tiny_pipeline, prompt_file, out)
        + ["--guidance_scale", "2.0", "--overwrite_output_dir", "true"]
    )
    assert set(redone["guidance_scale"]) == {2.0}


class AnythingJudge:
    """Accepts any prompt (the shapes judge only parses its own grammar)."""

    name = "anything"

    def score(self, images, prompts, concepts=None):
        return [judges.Feedback(overall=0.5) for _ in prompts]


def test_long_prompt_warns_truncation(tiny_pipeline, tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(judges.JUDGES, "anything", AnythingJudge)
    path = tmp_path / "long.txt"
    path.write_text("a red circle " + "and a blue square " * 30 + "\n")
    dataset = collect.main(
        args(tiny_pipeline, str(path), tmp_path / "out") + ["--judge", "anything", "--seeds", "0:1"]
    )
    assert dataset.num_rows == 1
    assert "truncated" in caplog.text


def test_cli_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: p\njudge: shapes\nprompts: x.txt\noutput_dir: o\nbatch_sise: 3\n")
    with pytest.raises(SystemExit) as exc:
        cli_main(["collect", "--config", str(recipe)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli_main(["nostage"])
    assert exc.value.code == 2
    assert "unknown stage 'nostage'" in capsys.readouterr().err


def _run(cmd, env_extra=None, **kwargs):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        **(env_extra or {}),
    }
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _rows(path):
    return datasets.load_from_disk(str(path / "dataset")).to_list()


@pytest.mark.slow
def test_sigkill_and_restart_gives_every_key_once(tiny_pipeline, prompt_file, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "noisealign.collect", *args(tiny_pipeline, prompt_file, out)]
    cmd += ["--seeds", "0:12", "--chunk_size", "2", "--batch_size", "2"]
    for delay_shards in (1, 3):  # kill twice, after different amounts of finished work
        proc = _run(cmd)
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "shards").glob("shard-*"))) < delay_shards:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "dataset").exists()
    finished = _run(cmd)
    assert finished.wait(timeout=300) == 0, finished.stdout.read()
    rows = _rows(out)
    keys = [(r["prompt_id"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(PROMPTS) * 12
    reference = tmp_path / "reference"
    ref = _run(
        [
            sys.executable,
            "-m",
            "noisealign.collect",
            *args(tiny_pipeline, prompt_file, reference),
            "--seeds",
            "0:12",
            "--chunk_size",
            "2",
            "--batch_size",
            "2",
        ]
    )
    assert ref.wait(timeout=300) == 0
    assert rows == _rows(reference)


@pytest.mark.slow
def test_two_processes_write_the_same_rows_as_one(tiny_pipeline, prompt_file, tmp_path):
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
        "--main_process_port",
        "29517",
        "src/noisealign/collect.py",
    ]
    two = _run(
        launch + args(tiny_pipeline, prompt_file, tmp_path / "two"), {"ACCELERATE_USE_CPU": "1"}
    )
    output = two.communicate(timeout=300)[0]
    assert two.returncode == 0, output
    assert "process 1 takes" in output  # really two ranks
    one = _run(
        [
            sys.executable,
            "-m",
            "noisealign.collect",
            *args(tiny_pipeline, prompt_file, tmp_path / "one"),
        ]
    )
    assert one.wait(timeout=300) == 0
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")
    recipe = json.loads((tmp_path / "two" / "recipe.json").read_text())
    assert recipe["fingerprint"]["judge"] == "shapes"


@pytest.mark.parametrize(
    "pipeline_builder, arch, method",
    [
        ("build_tiny_sd_pipeline", "qwen2_5_vl", "concepts"),
        ("build_tiny_sdxl_pipeline", "llava", "caption"),
    ],
)
def test_real_recipe_code_paths_with_tiny_models(tmp_path, pipeline_builder, arch, method):
    """recipes/sd15 (SD + Qwen2.5-VL concepts) and recipes/sdxl (SDXL + LLaVA caption) on tiny
    models."""
    from noisealign.testing import pipelines as tiny_pipelines
    from noisealign.testing.vlms import build_tiny_vlm

    getattr(tiny_pipelines, pipeline_builder)(tmp_path / "pipe")
    judge_folder = build_tiny_vlm(arch, tmp_path / "judge")
    recipe = ROOT / "recipes" / ("sd15" if arch == "qwen2_5_vl" else "sdxl") / "collect.yaml"
    dataset = collect.main(
        [
            "--config",
            str(recipe),
            "--pipeline",
            str(tmp_path / "pipe"),
            "--prompts",
            str(ROOT / "recipes/tiny/prompts.txt"),
            "--judge_kwargs",
            json.dumps({"model": str(judge_folder), "method": method}),
            "--seeds",
            "0:2",
            "--num_inference_steps",
            "2",
            "--torch_dtype",
            "float32",
            "--batch_size",
            "4",
            "--report_to",
            "none",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert dataset.num_rows == 8 and not any(dataset["failed"])
    assert set(dataset["judge"]) == {f"vlm:judge:{method}"}
    row = dataset[2]  # "a blue square left of a yellow triangle", seed 0
    assert 0 <= row["overall"] <= 1
    scored = [tok for tok, m in zip(row["tokens"], row["token_mask"]) if m]
    assert {"blue</w>", "square</w>", "left</w>", "of</w>"} <= set(scored)
    assert len({round(s, 6) for s, m in zip(row["token_scores"], row["token_mask"]) if m}) > 1


def test_wandb_offline_run_stays_in_output_dir(tiny_pipeline, prompt_file, tmp_path, monkeypatch):
    for var in (
        "WANDB_DIR",
        "WANDB_CACHE_DIR",
        "WANDB_DATA_DIR",
        "WANDB_CONFIG_DIR",
        "WANDB_ARTIFACT_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    argv = args(tiny_pipeline, prompt_file, out)
    argv[argv.index("--report_to") + 1] = "wandb"
    collect.main(argv + ["--log_images", "2", "--seeds", "0:1"])
    runs = list((out / "wandb").rglob("offline-run-*"))
    assert runs, "no offline wandb run under output_dir"
    logged = b"".join(p.read_bytes() for p in runs[0].rglob("*.wandb"))
    assert b"collect/samples" in logged and b"collect/images_per_s" in logged
