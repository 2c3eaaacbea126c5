"""notebooks/quickstart.ipynb runs top to bottom (its fast variant) against the installed package."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch):
    monkeypatch.setenv("NOISEALIGN_FAST", "1")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    namespace: dict = {}
    for i, cell in enumerate(code):
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)
    # it compared both noises on the same prompts and seeds and looked at ε′'s statistics
    assert set(namespace["scores"]) == {"standard", "projected"}
    assert len(namespace["scores"]["projected"]) == len(namespace["prompts"]) == 4
    assert namespace["sheet"].size == (2 * 96, 96 * 4)
    assert namespace["stats"].is_gaussian().all()
    # only the package is imported: no training logic of its own
    source = "".join("".join(c["source"]) for c in code)
    assert "optimizer" not in source and "backward" not in source
