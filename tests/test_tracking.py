"""Tracker set-up: wandb files stay in each stage's own output folder, the user's settings win."""

from noisealign.configs import BaseConfig
from noisealign.tracking import start_tracking


class FakeAccelerator:
    def __init__(self):
        self.calls = []

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.calls.append(init_kwargs["wandb"]["dir"])


def test_each_stage_in_one_process_writes_wandb_files_to_its_own_folder(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    accelerator = FakeAccelerator()
    for name in ("first", "second"):
        start_tracking(accelerator, BaseConfig(output_dir=str(tmp_path / name)), "stage")
    assert accelerator.calls == [str(tmp_path / n / "wandb") for n in ("first", "second")]


def test_the_users_wandb_dir_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    accelerator = FakeAccelerator()
    start_tracking(accelerator, BaseConfig(output_dir=str(tmp_path / "run")), "stage")
    assert accelerator.calls == [str(tmp_path / "mine")]


def test_an_fsdp_config_that_runs_as_ddp_says_so(tmp_path, monkeypatch, caplog):
    from noisealign.configs import BaseConfig
    from noisealign.tracking import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for fsdp.yaml
    config = BaseConfig(output_dir=str(tmp_path), report_to="none")
    with caplog.at_level("WARNING", logger="noisealign.tracking"):
        accelerator = make_accelerator(config)
    assert accelerator.distributed_type.value != "FSDP"  # a CPU process
    assert any("asks for FSDP" in r.getMessage() for r in caplog.records)
