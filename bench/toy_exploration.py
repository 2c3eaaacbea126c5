"""Does the outcome of an exploration row follow its source image? (docs/collect.md)

    .venv/bin/python bench/toy_exploration.py \\
        [--explore outputs/toy/collect_explore/dataset] [--source outputs/toy/collect/dataset]

For every row of an exploration collect (``exploration_images``), finds the source image the row
mixed in (``ExplorationSource.choose``, the same keyed draw) and prints, per γ bin, the share of
rows the judge accepts when the source image was accepted vs rejected. Needs no model: the
source's verdicts are in its rows.
"""

from __future__ import annotations

import argparse
import json

import datasets
import numpy as np

from noisealign.data.exploration import ExplorationSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explore", default="outputs/toy/collect_explore/dataset")
    parser.add_argument("--source", default="outputs/toy/collect/dataset")
    parser.add_argument("--bins", type=int, default=4)
    args = parser.parse_args()
    explore = datasets.load_from_disk(args.explore)
    recipe = json.load(open(f"{args.explore}/../recipe.json"))["fingerprint"]
    gamma_max = float(recipe["exploration_gamma"])
    source = ExplorationSource(args.source, pipe=None, gamma_max=gamma_max)
    verdict = np.asarray(datasets.load_from_disk(args.source)["overall"])
    rows = explore.select_columns(["prompt_id", "seed", "overall", "exploration_gamma"])
    table = []
    for row in rows:
        index, gamma = source.choose(row["prompt_id"], row["seed"])
        assert abs(gamma - row["exploration_gamma"]) < 1e-5, (
            "not the exploration source of these rows"
        )
        table.append((gamma, verdict[index], row["overall"]))
    a = np.asarray(table)
    print(
        f"source images right: {verdict.mean():.3f}; exploration rows right: {a[:, 2].mean():.3f}"
    )
    print("| γ of the row | rows | P(right | source right) | P(right | source wrong) |")
    print("|---|---|---|---|")
    edges = np.linspace(0, gamma_max, args.bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (a[:, 0] >= lo) & (a[:, 0] < hi)
        ok, bad = a[m & (a[:, 1] == 1), 2].mean(), a[m & (a[:, 1] == 0), 2].mean()
        print(f"| [{lo:.2f}, {hi:.2f}) | {m.sum()} | {ok:.3f} | {bad:.3f} |")


if __name__ == "__main__":
    main()
