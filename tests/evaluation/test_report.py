import json

import pytest
from PIL import Image

from noisealign.evaluation.report import (
    cost_plot,
    image_grid,
    label_offsets,
    markdown_table,
    write_report,
)


def method(name, alignment, steps):
    return {
        "name": name,
        "type": "x",
        "alignment": alignment,
        "difference": alignment - 0.2,
        "difference_ci95": [-0.1, 0.3],
        "win_rate": 0.6,
        "win_rate_ci95": [0.5, 0.7],
        "concept_accuracy": {"all": 0.5, "object": 0.75},
        "denoising_steps": steps,
        "judge_calls": 0,
        "seconds_per_image": 0.01,
        "peak_memory_mb": 12.0,
    }


def test_markdown_table_has_a_row_per_method_with_cost():
    table = markdown_table([method("standard", 0.2, 20), method("best_of_4", 0.6, 80)])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "acc. object" in lines[0] and "steps/img" in lines[0]
    assert lines[3].startswith(
        "| best_of_4 | 0.600 | +0.400 [-0.100, +0.300] | 0.600 [0.500, 0.700] | 0.750 | 80 |"
    )


def test_grid_size_and_cost_plot(tmp_path):
    red = Image.new("RGB", (32, 32), "red")
    grid = image_grid(
        {"a": [red, red], "b": [red, red]}, ["p1", "p2"], {"a": [1, 0], "b": [0, 1]}, cell=64
    )
    assert grid.size == (220 + 2 * 64, 16 + 2 * (64 + 16))
    assert grid.getpixel((220 + 64 + 10, 16 + 10)) == (255, 0, 0)
    cost_plot([method("standard", 0.2, 20), method("b", 0.6, 80)], tmp_path / "c.png", "t")
    assert Image.open(tmp_path / "c.png").size == (720, 480)


def test_cost_plot_labels_of_close_methods_at_one_cost_do_not_overlap():
    methods = [
        method("standard", 0.195, 20),
        method("npnet", 0.188, 20),
        method("best", 0.5, 80),
        method("p", 0.3, 20),
    ]
    offsets = label_offsets(methods, gap=10, height=210)
    span = 0.5 - 0.188
    label = [m["alignment"] / span * 210 + dy for m, dy in zip(methods, offsets)]
    # npnet is the lowest at its cost, best is alone at its cost, p is far above standard
    assert offsets[1] == offsets[2] == offsets[3] == 4.0
    assert label[0] - label[1] == pytest.approx(10.0)  # standard's label pushed above npnet's


def test_write_report(tmp_path):
    report = {
        "pipeline": "p",
        "judges": ["shapes"],
        "seeds": [0, 1],
        "num_inference_steps": 20,
        "scheduler": "euler",
        "guidance_scale": 5.0,
        "prompt_sets": {"heldout": {"prompts": 3, "methods": [method("standard", 0.2, 20)]}},
    }
    path = write_report(tmp_path, report)
    assert "## heldout (3 prompts × 2 seeds)" in path.read_text()
    assert "seeds [0, 1], 20 steps of `euler`, guidance 5.0." in path.read_text()
    assert json.loads((tmp_path / "report.json").read_text()) == report
