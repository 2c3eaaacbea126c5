"""Side-by-side evaluation of noise methods: metrics, method registry, report writing.

The stage is ``noisealign evaluate`` (:mod:`noisealign.evaluate`); this package holds its
parts so they can be used from Python too.
"""

from .metrics import alignment, bootstrap_interval, compare, concept_accuracy
from .report import cost_plot, image_grid, markdown_table, write_report

__all__ = [
    "alignment",
    "bootstrap_interval",
    "compare",
    "concept_accuracy",
    "cost_plot",
    "image_grid",
    "markdown_table",
    "write_report",
]
