"""Every shipped SD1.5 / SDXL / SD3 / FLUX recipe dry-runs as a chain (1 process), and a stage on
2 processes.

These run the recipes as written (``recipes/sd15``, ``recipes/sdxl``, ``recipes/sd3``,
``recipes/flux``) through
``noisealign dry_run_chain``: the real stage code on tiny random replicas of the named
pipeline and judge classes, each stage reading the previous stages' dry-run outputs.
"""

import json
import shutil
import time
from pathlib import Path

import pytest

from noisealign.dry_run.chain import chain, run_chain

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
# the pipeline part that denoises: a UNet, or the flow models' transformer
DENOISERS = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


def _reports(dry_run_dir: Path) -> dict[str, dict]:
    reports = [json.loads(p.read_text()) for p in (dry_run_dir / "reports").glob("*.json")]
    return {Path(r["recipe_output_dir"]).name: r for r in reports}


def _untouched_since(folder: Path, started: float) -> bool:
    return not folder.exists() or all(p.stat().st_mtime < started for p in folder.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_shipped_recipes_dry_run_as_a_chain(family, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their prompt files relative to the repository
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    started = time.time()
    run_chain(ROOT / "recipes" / family, str(tmp_path))
    reports = _reports(tmp_path)
    assert sorted(reports) == sorted(r.stem for r in chain(ROOT / "recipes" / family))
    for stage, report in reports.items():
        assert report["problems"] == [] and report["outputs"], stage
        built = {b["role"]: b["class"] for b in report["replicas"]}
        assert built["pipeline"] == PIPELINES[family], stage
        assert Path(report["output_dir"]).is_relative_to(tmp_path)
        (rank,) = report["ranks"]
        role = f"pipeline.{DENOISERS[family]}"
        denoiser = next(m for m in rank["models"] if m["role"] == role)
        # sd15 / sdxl: the recipes' float16, without a GPU; sd3 / flux: their bfloat16
        assert denoiser["dtype"] == "bfloat16", stage
        assert denoiser["device"] == rank["device"] == "cpu", stage
    assert built_judges(reports["collect"])
    assert reports["train_projector"]["changed"]["max_steps"][1] == 2
    if family == "flux":  # FluxPipeline fixes 128x128 latents in __init__; the replicas' 16 here
        assert reports["evaluate"]["changed"]["pipeline.default_sample_size"] == [128, 16]
    assert any("loads as NoiseProjector" in line for line in reports["train_projector"]["outputs"])
    evaluate = json.loads((Path(reports["evaluate"]["output_dir"]) / "report.json").read_text())
    (results,) = evaluate["prompt_sets"].values()
    assert {m["name"] for m in results["methods"]} == set(_recipe_methods(family))
    # the real outputs are never written
    assert _untouched_since(ROOT / "outputs" / family, started)


def built_judges(report: dict) -> dict[str, str]:
    return {b["role"]: b["class"] for b in report["replicas"] if b["role"].startswith("judge")}


def _recipe_methods(family: str) -> list[str]:
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / family / "evaluate.yaml").read_text())
    return list(recipe["methods"])


@pytest.mark.slow
def test_two_process_dry_run_puts_each_ranks_models_on_its_device(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(ROOT / "recipes/sd15/collect.yaml", folder / "collect.yaml")
    run_chain(folder, str(tmp_path / "dr"), num_processes=2, port=29541)
    (report,) = _reports(tmp_path / "dr").values()
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    for rank in report["ranks"]:
        roles = {m["role"]: m for m in rank["models"]}
        assert roles["judge vlm"]["class"] == "VLMJudge.Qwen2_5_VLForConditionalGeneration"
        assert {roles[r]["device"] for r in ("judge vlm", "pipeline.unet")} == {rank["device"]}
    assert built_judges(report) == {"judge vlm": "qwen2_5_vl"}
    # 8 training prompts x 2 seeds
    assert any("dataset of 16 rows" in line for line in report["outputs"])
