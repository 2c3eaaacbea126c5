"""The evaluate stage's outputs: ``report.md``, ``report.json``, an image grid and a cost plot.

``report.json`` holds every number; ``report.md`` the same as one table per prompt set;
``grid_<set>.png`` prompt rows × method columns from the same seed; ``cost_<set>.png`` the
mean alignment of each method against its denoising steps per image; :func:`log_to_tracker`
sends them to wandb.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .metrics import alignment, compare, concept_accuracy

COST_FIELDS = ("denoising_steps", "judge_calls", "seconds_per_image", "peak_memory_mb")


def _interval(values: Sequence[float]) -> str:
    return f"[{values[0]:+.3f}, {values[1]:+.3f}]"


def markdown_table(methods: Sequence[dict]) -> str:
    """One Markdown table: a row per method, alignment / vs-standard / concepts / cost columns."""
    kinds = sorted({k for m in methods for k in m["concept_accuracy"] if k != "all"})
    head = ["method", "alignment", "Δ vs standard [95% CI]", "win rate [95% CI]"]
    head += [f"acc. {k}" for k in kinds] + ["steps/img", "judge calls/img", "s/img", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        acc = m["concept_accuracy"]
        cells = [
            m["name"],
            f"{m['alignment']:.3f}",
            f"{m['difference']:+.3f} {_interval(m['difference_ci95'])}",
            f"{m['win_rate']:.3f} [{m['win_rate_ci95'][0]:.3f}, {m['win_rate_ci95'][1]:.3f}]",
        ]
        cells += [f"{acc[k]:.3f}" if k in acc else "–" for k in kinds]
        cells += [
            f"{m['denoising_steps']:g}",
            f"{m['judge_calls']:g}",
            f"{m['seconds_per_image']:.3f}",
            f"{m['peak_memory_mb']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def image_grid(
    columns: dict[str, list[Image.Image]],
    prompts: Sequence[str],
    scores: dict[str, list[float]],
    cell: int = 128,
) -> Image.Image:
    """Prompt rows × method columns with the method names on top and each image's score below it."""
    label_h, prompt_w = 16, 220
    names = list(columns)
    grid = Image.new(
        "RGB", (prompt_w + cell * len(names), label_h + (cell + label_h) * len(prompts)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        draw.text((prompt_w + j * cell + 2, 2), name[:20], fill="black")
    for i, prompt in enumerate(prompts):
        top = label_h + i * (cell + label_h)
        draw.text((2, top + cell // 2), prompt[:36], fill="black")
        for j, name in enumerate(names):
            image = columns[name][i].convert("RGB").resize((cell, cell), Image.NEAREST)
            grid.paste(image, (prompt_w + j * cell, top))
            draw.text(
                (prompt_w + j * cell + 2, top + cell + 2), f"{scores[name][i]:.2f}", fill="black"
            )
    return grid


def label_offsets(methods: Sequence[dict], gap: float = 10.0, height: float = 210.0) -> list[float]:
    """Vertical label offsets (points) that keep labels of methods at the same cost ≥ ``gap`` apart.

    Each label sits 4 pt above its point unless the label below it (same ``denoising_steps``,
    lower alignment) would overlap; ``height`` is the plot's y extent in points (a 4-inch figure's
    axes), used to turn alignment differences into points.
    """
    values = [m["alignment"] for m in methods]
    span = (max(values) - min(values)) or 1.0
    offsets = [4.0] * len(methods)
    for steps in {m["denoising_steps"] for m in methods}:
        group = sorted(
            (i for i, m in enumerate(methods) if m["denoising_steps"] == steps),
            key=lambda i: values[i],
        )
        previous = None  # label height (points) of the method below
        for i in group:
            at = values[i] / span * height
            if previous is not None and at + 4.0 < previous + gap:
                offsets[i] = previous + gap - at
            previous = at + offsets[i]
    return offsets


def cost_plot(methods: Sequence[dict], path: Path, title: str) -> None:
    """Alignment vs denoising steps per image (log x), one labelled point per method."""
    # imported here: matplotlib is slow to import, and use("Agg") (no display needed) must not
    # switch the backend of a notebook that merely imports this package
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in methods:
        ax.scatter(m["denoising_steps"], m["alignment"], s=30)
    for m, dy in zip(methods, label_offsets(methods)):
        ax.annotate(
            m["name"],
            (m["denoising_steps"], m["alignment"]),
            textcoords="offset points",
            xytext=(4, dy),
            fontsize=8,
        )
    ax.set_xscale("log")
    steps = sorted({m["denoising_steps"] for m in methods})
    ax.set_xticks(steps, [f"{s:g}" for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("denoising steps per image (CFG pair = 1 step)")
    ax.set_ylabel("mean alignment")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temp file + rename), so a killed run never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    os.replace(tmp, path)


def write_report(output_dir: Path, report: dict) -> Path:
    """``report.json`` and ``report.md`` from the stage's report dict; returns the Markdown path."""
    write_json(output_dir / "report.json", report)
    lines = [
        "# noisealign evaluation",
        "",
        f"pipeline `{report['pipeline']}`, judges {', '.join(report['judges'])} "
        f"(alignment columns: `{report['judges'][0]}`), seeds {report['seeds']}, "
        f"{report['num_inference_steps']} steps of `{report['scheduler']}`, "
        f"guidance {report['guidance_scale']}.",
        "Δ and win rate are against `standard` on the same prompts and seeds; intervals are 95% "
        "bootstrap over prompts. Cost columns are per image (a CFG-doubled UNet call = 1 step).",
    ]
    for name, result in report["prompt_sets"].items():
        lines += ["", f"## {name} ({result['prompts']} prompts × {len(report['seeds'])} seeds)", ""]
        lines.append(markdown_table(result["methods"]))
        for judge, values in result.get("other_judges", {}).items():
            lines += [
                "",
                f"Alignment by `{judge}`: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()),
            ]
        lines += ["", f"![grid](grid_{name}.png)", "", f"![alignment vs cost](cost_{name}.png)"]
    path = output_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def summarise(config: Any, records: Sequence[Any], results: dict) -> dict:
    """Metrics of every method on one prompt set, in the recipe's method order.

    ``config`` is the evaluate recipe (its ``judges``, ``methods`` and ``seed``); ``results``
    maps each method's label to its (rows, cost, grid) as the runner merged them.
    """
    primary = config.judges[0]
    standard = next(lab for lab, s in config.methods.items() if s["type"] == "standard")

    def flat(rows: list[dict], judge: str) -> list[dict]:
        return [
            {**r, "overall": r["scores"][judge], "concepts": r["concepts"][judge]} for r in rows
        ]

    base = flat(results[standard][0], primary)
    methods, others = [], {j: {} for j in config.judges[1:]}
    for label, (rows, cost, _grid) in results.items():
        rows1 = flat(rows, primary)
        methods.append(
            {
                "name": label,
                "type": config.methods[label]["type"],
                "settings": config.methods[label],
                "alignment": alignment(rows1),
                "concept_accuracy": concept_accuracy(rows1),
                **compare(rows1, base, seed=config.seed),
                **cost,
                "images": len(rows),
            }
        )
        for judge in others:
            others[judge][label] = alignment(flat(rows, judge))
    summary = {"prompts": len(records), "methods": methods}
    if others:
        summary["other_judges"] = others
    return summary


def write_figures(
    out: Path,
    set_name: str,
    config: Any,
    records: Sequence[Any],
    seed: int,
    results: dict,
    methods: list[dict],
) -> dict:
    """grid_<set>.png and cost_<set>.png; returns the grid's prompts, images and scores."""
    primary = config.judges[0]
    columns, scores = {}, {}
    for label, (rows, _cost, grid) in results.items():
        by_key = {(r["prompt_id"], r["seed"]): r["scores"][primary] for r in rows}
        columns[label] = [grid[(r.prompt_id, seed)] for r in records]
        scores[label] = [by_key[(r.prompt_id, seed)] for r in records]
    prompts = [r.prompt for r in records]
    image_grid(columns, prompts, scores).save(out / f"grid_{set_name}.png")
    cost_plot(methods, out / f"cost_{set_name}.png", f"{set_name}: alignment vs cost ({primary})")
    return {"prompts": prompts, "seed": seed, "images": columns, "scores": scores}


def log_to_tracker(accelerator: Any, out: Path, report: dict, samples: dict) -> None:
    """The metrics table, a table of the grid's images (a row per prompt, a column per method)
    and the figures, to the run's wandb tracker (``accelerator``'s) if it has one."""
    if not accelerator.trackers:
        return
    import wandb  # only when a run logs to wandb: a heavy import, and an optional one

    tracker = accelerator.get_tracker("wandb", unwrap=True)
    for set_name, result in report["prompt_sets"].items():
        columns = ["method", "alignment", "difference", "win_rate", *COST_FIELDS]
        table = wandb.Table(columns=columns)
        for m in result["methods"]:
            table.add_data(*(m[c] if c != "method" else m["name"] for c in columns))
        grid = samples[set_name]
        images = wandb.Table(columns=["prompt", "seed", *grid["images"]])
        for i, prompt in enumerate(grid["prompts"]):
            cells = [
                wandb.Image(grid["images"][m][i], caption=f"{grid['scores'][m][i]:.2f}")
                for m in grid["images"]
            ]
            images.add_data(prompt, grid["seed"], *cells)
        tracker.log(
            {
                f"{set_name}/table": table,
                f"{set_name}/samples": images,
                f"{set_name}/grid": wandb.Image(str(out / f"grid_{set_name}.png")),
                f"{set_name}/alignment_vs_cost": wandb.Image(str(out / f"cost_{set_name}.png")),
                **{f"{set_name}/{m['name']}/alignment": m["alignment"] for m in result["methods"]},
            }
        )
