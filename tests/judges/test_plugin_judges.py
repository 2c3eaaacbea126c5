"""Outside judges come in through the 'noisealign.judges' entry-point group of an installed
distribution."""

import sys

import pytest

from noisealign import judges
from noisealign.errors import JudgeError

MODULE = """
class MineJudge:
    name = "mine"

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def score(self, images, prompts, concepts=None):
        raise NotImplementedError


def factory(**kwargs):
    return MineJudge(**kwargs)
"""


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A folder on sys.path holding my_judges.py and its my_judges-0.1.dist-info, as pip leaves
    them."""
    site = tmp_path / "site"
    info = site / "my_judges-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "my_judges.py").write_text(MODULE)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my_judges\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[noisealign.judges]\nmine = my_judges:factory\n")
    monkeypatch.delitem(sys.modules, "my_judges", raising=False)
    return site


def test_installed_entry_point_judge_is_listed_and_built(installed_plugin, monkeypatch):
    # read the installed distributions once before the new one appears: a cached scan of
    # sys.path must not hide a distribution installed since
    assert "mine" not in judges.available_judges()
    monkeypatch.syspath_prepend(str(installed_plugin))
    assert "mine" in judges.available_judges()
    assert "mine" not in judges.JUDGES  # found through the entry point, not the built-in dict
    judge = judges.build_judge("mine", threshold=0.9)
    assert type(judge).__module__ == "my_judges" and judge.threshold == 0.9
    with pytest.raises(JudgeError, match=r"judge 'mine' does not accept judge_kwargs \['colour'\]"):
        judges.build_judge("mine", colour="red")


def test_unknown_judge_names_the_installed_ones_and_the_entry_point_group(
    installed_plugin, monkeypatch
):
    monkeypatch.syspath_prepend(str(installed_plugin))
    with pytest.raises(
        JudgeError,
        match=(
            r"unknown judge 'mien'; known judges: .*\bmine\b.*'noisealign.judges' entry-point "
            r"group"
        ),
    ):
        judges.build_judge("mien")
