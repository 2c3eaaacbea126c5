"""The evaluate stage on the toy pipeline: every method's row with cost, figures, reproducibility,
resume, 2 processes, bad input."""

import json

import pytest
import torch
from PIL import Image

from noisealign import evaluate
from noisealign.errors import ConfigError, DataError, PipelineError
from noisealign.toy import pipeline_path

TIMING = ("seconds_per_image", "peak_memory_mb")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from noisealign.pipelines import pipeline_signature
    from noisealign.policies import NoiseProjector, NoiseProjectorConfig
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("evaluate")
    toy = StableDiffusionPipeline.from_pretrained(pipeline_path())
    torch.manual_seed(0)
    config = NoiseProjectorConfig(
        latent_channels=4,
        text_dim=64,
        hidden_dim=16,
        depth=1,
        num_heads=2,
        patch_size=2,
        pipeline_signature=pipeline_signature(toy),
        pipeline=str(pipeline_path()),
    )
    model = NoiseProjector(config)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)  # as if trained: ε′ differs from ε
    model.save_pretrained(root / "projector")
    tiny = build_tiny_sd_pipeline(root / "tiny_sd")
    config.pipeline_signature, config.text_dim = pipeline_signature(tiny), 32
    NoiseProjector(config).save_pretrained(root / "projector_tiny")
    prompts = root / "prompts.jsonl"
    records = [
        {"prompt_id": "p0", "prompt": "a red circle left of a blue square"},
        {"prompt_id": "p1", "prompt": "a green triangle above a yellow circle"},
        {"prompt_id": "p2", "prompt": "a blue square"},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in records))
    return root


def recipe(root, out, methods=None, *extra):
    methods = methods or {
        "standard": {"type": "standard"},
        "projector": {"type": "policy", "policy": str(root / "projector")},
        "best_of_2": {"type": "best_of_n", "n": 2},
        "early_stop_2": {"type": "early_stop", "n": 2, "stop_step": 2},
        "noise_diffusion": {"type": "noise_diffusion", "rounds": 1, "num_candidates": 2},
    }
    return [
        "--pipeline",
        str(pipeline_path()),
        "--prompt_sets",
        json.dumps({"mini": str(root / "prompts.jsonl")}),
        "--seeds",
        "0:2",
        "--judges",
        "shapes",
        "--methods",
        json.dumps(methods),
        "--num_inference_steps",
        "4",
        "--batch_size",
        "4",
        "--grid_prompts",
        "2",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--num_threads",
        "1",
        *extra,
    ]


def numbers(report):
    """report.json without the measured timings, which differ run to run."""
    methods = report["prompt_sets"]["mini"]["methods"]
    return [{k: v for k, v in m.items() if k not in TIMING} for m in methods]


@pytest.mark.slow
def test_every_method_has_a_row_with_cost_and_the_figures_are_written(folders, tmp_path):
    report = evaluate.main(recipe(folders, tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == json.loads(
        json.dumps(report)
    )
    rows = {m["name"]: m for m in report["prompt_sets"]["mini"]["methods"]}
    assert list(rows) == ["standard", "projector", "best_of_2", "early_stop_2", "noise_diffusion"]
    standard, best = rows["standard"], rows["best_of_2"]
    assert (standard["difference"], standard["win_rate"], standard["images"]) == (0.0, 0.5, 6)
    assert (standard["denoising_steps"], standard["judge_calls"]) == (4, 0)
    assert (best["denoising_steps"], best["judge_calls"]) == (8, 2)
    # N·k + (T − k) steps for early stop
    assert (rows["early_stop_2"]["denoising_steps"], rows["early_stop_2"]["judge_calls"]) == (
        2 * 2 + 2,
        2,
    )
    # best-of-N keeps candidate 0 (the standard noise) unless the same judge prefers another
    assert best["difference"] >= 0 and best["losses"] == 0
    assert all(m["seconds_per_image"] > 0 and m["peak_memory_mb"] >= 0 for m in rows.values())
    text = (tmp_path / "a" / "report.md").read_text()
    assert all(f"| {name} |" in text for name in rows)
    grid = Image.open(tmp_path / "a" / "grid_mini.png")
    assert grid.size == (220 + 5 * 128, 16 + 2 * (128 + 16))
    assert Image.open(tmp_path / "a" / "cost_mini.png").size == (720, 480)
    # the same recipe in another folder gives the same numbers
    again = evaluate.main(recipe(folders, tmp_path / "b"))
    assert numbers(again) == numbers(report)


@pytest.mark.slow
def test_height_and_width_size_every_methods_images(folders, tmp_path):
    methods = {
        "standard": {"type": "standard"},
        "early_stop_2": {"type": "early_stop", "n": 2, "stop_step": 2, "preview": "linear"},
        "noise_diffusion": {"type": "noise_diffusion", "rounds": 1, "num_candidates": 2},
    }
    size = ("--height", "48", "--width", "64")
    report = evaluate.main(recipe(folders, tmp_path / "a", methods, *size))
    rows = report["prompt_sets"]["mini"]["methods"]
    assert [m["images"] for m in rows] == [6, 6, 6]
    tiles = sorted((tmp_path / "a" / "rows").rglob("*.png"))  # each method's images
    assert {p.parent.name for p in tiles} == set(methods)
    assert {Image.open(p).size for p in tiles} == {(64, 48)}
    # a folder of the default size is another recipe
    with pytest.raises(DataError, match=r"differs in: height, width"):
        evaluate.main(recipe(folders, tmp_path / "a", methods))


def test_rerun_skips_finished_methods_and_redoes_a_missing_one(folders, tmp_path):
    methods = {"standard": {"type": "standard"}, "best_of_2": {"type": "best_of_n", "n": 2}}
    first = evaluate.main(recipe(folders, tmp_path, methods))
    rows = tmp_path / "rows" / "mini"
    kept = (rows / "standard.json").stat().st_mtime_ns
    (rows / "best_of_2.json").unlink()  # as if killed while running best_of_2
    second = evaluate.main(recipe(folders, tmp_path, methods))
    assert (rows / "standard.json").stat().st_mtime_ns == kept
    assert (rows / "best_of_2.json").is_file()
    assert numbers(second) == numbers(first)


@pytest.mark.slow
def test_two_processes_write_the_report_of_one_and_a_rerun_in_one_finishes_it(folders, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    methods = {
        "standard": {"type": "standard"},
        "projector": {"type": "policy", "policy": str(folders / "projector_tiny")},
        "best_of_2": {"type": "best_of_n", "n": 2},
        "early_stop_2": {"type": "early_stop", "n": 2, "stop_step": 2},
        "noise_diffusion": {"type": "noise_diffusion", "rounds": 1, "num_candidates": 2},
    }

    def tiny(out):  # 3 prompts x 2 seeds in batches of 4 and 2
        return recipe(folders, out, methods, "--pipeline", str(folders / "tiny_sd"))

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
        "29547",
        "src/noisealign/evaluate.py",
    ]
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        launch + tiny(tmp_path / "two"),
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "process 1 takes 5" in done.stdout  # really two ranks, 5 of the 10 batches each
    one = json.loads(json.dumps(evaluate.main(tiny(tmp_path / "one"))))
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    # alignment, concept accuracy, win rates, Δ and their intervals, steps, judge calls
    assert numbers(two) == numbers(one)
    assert [m["name"] for m in two["prompt_sets"]["mini"]["methods"]] == list(methods)
    for label in methods:
        rows = [
            json.loads((tmp_path / r / "rows" / "mini" / f"{label}.json").read_text())["rows"]
            for r in ("one", "two")
        ]
        assert rows[1] == rows[0] and len(rows[0]) == 6
    assert not list((tmp_path / "two" / "rows").rglob("*.parts"))
    grids = [Image.open(tmp_path / r / "grid_mini.png").tobytes() for r in ("one", "two")]
    assert grids[1] == grids[0]
    # the same folder in one process: finished methods read back, the missing one redone
    (tmp_path / "two" / "rows" / "mini" / "best_of_2.json").unlink()
    assert numbers(json.loads(json.dumps(evaluate.main(tiny(tmp_path / "two"))))) == numbers(one)


def test_bad_recipes_fail_clearly_and_touch_nothing(folders, tmp_path):
    with pytest.raises(
        ConfigError, match="methods.fancy: unknown type 'magic'; choose one of standard, policy"
    ):
        evaluate.main(
            recipe(
                folders,
                tmp_path / "a",
                {"standard": {"type": "standard"}, "fancy": {"type": "magic"}},
            )
        )
    with pytest.raises(ConfigError, match="methods needs a 'standard' entry"):
        evaluate.main(recipe(folders, tmp_path / "b", {"b": {"type": "best_of_n"}}))
    with pytest.raises(
        ConfigError, match=r"methods.b \(best_of_n\): .*unexpected keyword argument 'm'"
    ):
        evaluate.main(
            recipe(
                folders,
                tmp_path / "c",
                {"standard": {"type": "standard"}, "b": {"type": "best_of_n", "m": 2}},
            )
        )
    with pytest.raises(ConfigError, match="stop_step must be in 1..3"):
        evaluate.main(
            recipe(
                folders,
                tmp_path / "d",
                {"standard": {"type": "standard"}, "e": {"type": "early_stop", "stop_step": 4}},
            )
        )
    with pytest.raises(PipelineError, match="text_embed_dim"):
        evaluate.main(
            recipe(
                folders,
                tmp_path / "e",
                {
                    "standard": {"type": "standard"},
                    "p": {"type": "policy", "policy": str(folders / "projector_tiny")},
                },
            )
        )
    with pytest.raises(DataError, match="prompt file .* does not exist"):
        evaluate.main(recipe(folders, tmp_path / "f", None, "--prompt_sets", '{"x": "nope.jsonl"}'))


@pytest.mark.slow
def test_another_recipe_in_the_same_folder_is_refused(folders, tmp_path):
    methods = {"standard": {"type": "standard"}}
    evaluate.main(recipe(folders, tmp_path, methods))
    before = (tmp_path / "report.json").read_bytes()
    with pytest.raises(DataError, match=r"different recipe \(differs in: guidance_scale\)"):
        evaluate.main(recipe(folders, tmp_path, methods, "--guidance_scale", "3"))
    assert (tmp_path / "report.json").read_bytes() == before


@pytest.mark.slow
def test_wandb_gets_the_metrics_table_and_a_table_of_images(folders, tmp_path):
    # a process of its own, as a user runs it: wandb keeps process-wide state from earlier runs
    import os
    import subprocess
    import sys

    methods = {"standard": {"type": "standard"}, "best_of_2": {"type": "best_of_n", "n": 2}}
    args = recipe(folders, tmp_path, methods)
    args[args.index("--report_to") + 1] = "wandb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "noisealign.evaluate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    media = tmp_path / "wandb"
    samples = list(media.rglob("mini/samples_*.table.json"))
    assert len(samples) == 1 and list(media.rglob("mini/table_*.table.json"))
    table = json.loads(samples[0].read_text())
    assert table["columns"] == ["prompt", "seed", "standard", "best_of_2"]
    assert len(table["data"]) == 2 and table["data"][0][0] == "a red circle left of a blue square"


def test_unset_prompt_split_evaluates_the_heldout_rows_of_a_split_file(folders, tmp_path):
    prompts = tmp_path / "split.jsonl"
    rows = [
        {"prompt_id": "t0", "prompt": "a red circle", "split": "train"},
        {"prompt_id": "e0", "prompt": "a blue square", "split": "eval"},
        {"prompt_id": "t1", "prompt": "a green triangle", "split": "train"},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    args = recipe(folders, tmp_path / "out", {"standard": {"type": "standard"}})
    args[args.index("--prompt_sets") + 1] = json.dumps({"mini": str(prompts)})
    report = evaluate.main([*args, "--grid_prompts", "1"])
    assert report["prompt_sets"]["mini"]["prompts"] == 1
    saved = json.loads((tmp_path / "out" / "rows" / "mini" / "standard.json").read_text())
    assert {r["prompt_id"] for r in saved["rows"]} == {"e0"}
