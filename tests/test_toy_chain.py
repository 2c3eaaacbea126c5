"""The toy-world chain end to end, reduced for CI: collect → distill → train_projector → evaluate.

Runs the recipes under ``recipes/toy/ci/`` (a few minutes on a 2-core CPU) and asserts that the
trained projector beats the standard noise on the held-out compositions with fixed seeds by a
margin, so a change that breaks the method's effect cannot land. The projector scores its
candidates with the committed k = 3 reward model (``reward_models/toy-k3-x0``): the CI
collect is far too small to distill a reward model that ranks seeds (docs/distill.md), but the
chain still runs collect and distill for real and checks their outputs.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "recipes" / "toy" / "ci"
# measured +0.0195 (10 wins, 5 losses, 241 ties over 64 prompts x 4 seeds; docs/evaluate.md); the margin
# sits below it so that only a real loss of the effect fails
MARGIN = 0.01


def stage(name: str, recipe: Path, out: Path, *extra: str) -> None:
    import importlib

    module = importlib.import_module(f"noisealign.{name}")
    module.main(["--config", str(recipe), "--output_dir", str(out), "--report_to", "none", *extra])


@pytest.mark.slow
def test_reduced_chain_projector_beats_standard_noise_on_heldout(tmp_path):
    import datasets

    stage("collect", CI / "collect.yaml", tmp_path / "collect")
    rows = datasets.load_from_disk(str(tmp_path / "collect" / "dataset"))
    assert len(rows) == 50 * 2 and set(rows["seed"]) == {0, 1}
    stage("distill", CI / "distill.yaml", tmp_path / "distill", "--dataset", str(tmp_path / "collect" / "dataset"))  # fmt: skip
    metrics = json.loads((tmp_path / "distill" / "metrics.json").read_text())
    assert metrics["info"]["rows"] == 100 and 0 <= metrics["model"]["pairwise_accuracy"] <= 1
    assert (tmp_path / "distill" / "model.safetensors").is_file()
    stage("train_projector", CI / "train_projector.yaml", tmp_path / "projector")
    methods = {"standard": {"type": "standard"}, "projector": {"type": "policy", "policy": str(tmp_path / "projector")}}  # fmt: skip
    stage(
        "evaluate", ROOT / "recipes" / "toy" / "evaluate.yaml", tmp_path / "evaluate",
        "--methods", json.dumps(methods), "--seeds", "0:4",
    )  # fmt: skip
    report = json.loads((tmp_path / "evaluate" / "report.json").read_text())
    standard, projector = report["prompt_sets"]["heldout"]["methods"]
    print(json.dumps({k: projector[k] for k in ("alignment", "difference", "difference_ci95", "win_rate", "wins", "ties", "losses")}))  # fmt: skip
    assert standard["alignment"] < 0.3  # the held-out compositions are hard for the toy model
    assert projector["difference"] >= MARGIN, (
        f"projector vs standard on held-out: {projector['difference']:+.3f}, expected >= {MARGIN}"
    )
