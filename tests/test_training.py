"""The one training loop (noisealign.training) on a linear model: hooks, logging, clipping,
step-keyed and epoch data, checkpoints, and a resume that replays the uninterrupted run."""

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from noisealign.checkpointing import checkpoints, resolve_checkpoint
from noisealign.configs import BaseConfig
from noisealign.data.feedback import PromptBatchSampler
from noisealign.errors import ConfigError
from noisealign.training import (
    Checkpointing,
    EpochData,
    TrainerSettings,
    TrainParts,
    every,
    start_state,
    train,
    trainer_default,
)

X = torch.linspace(-1, 1, 24).view(12, 2)
Y = X @ torch.tensor([[2.0], [-1.0]]) + 0.5


class Linear(torch.nn.Linear):
    """A model with a ``config`` dataclass, as the checkpoints record it."""

    @dataclasses.dataclass
    class Config:
        size: int = 2

    def __init__(self) -> None:
        super().__init__(2, 1)
        self.config = self.Config()


def parts_for(out, *, epochs: bool, max_steps=6, max_grad_norm=0.0, hooks=()):
    """A fresh accelerator (it saves the models it prepared) and the parts of one run."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    if epochs:
        sampler = PromptBatchSampler(range(len(X)), 4, shuffle=True, seed=3)
        loader = DataLoader(TensorDataset(X, Y), batch_sampler=sampler)
        model, optimizer, loader, scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        data = EpochData(loader, sampler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        data = lambda step: (X[step % 12 :][:4], Y[step % 12 :][:4])  # noqa: E731

    def step(batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {"mse": loss.item()}

    def log(record):
        if record.step % 2:
            return None  # odd steps keep nothing
        entry = {"step": record.step, "epoch": record.epoch, **record.metrics}
        if record.grad_norm is not None:
            entry["grad_norm"] = float(record.grad_norm)
        return entry

    plan = Checkpointing(str(out), {"size": 2}, every=2, keep=0)
    return accelerator, TrainParts(
        model,
        optimizer,
        scheduler,
        step,
        data,
        max_steps,
        log,
        max_grad_norm,
        hooks=list(hooks),
        checkpoints=plan,
        name="test",
    )


def run(accelerator, parts, state=None):
    return train(accelerator, parts, state or {"step": 0, "batches": 0})


@pytest.mark.parametrize("epochs", [True, False])
def test_resume_replays_the_uninterrupted_run(tmp_path, epochs):
    accelerator, full = parts_for(tmp_path / "full", epochs=epochs)
    history = run(accelerator, full)
    assert [h["step"] for h in history] == [2, 4, 6]  # what log kept
    if epochs:  # 3 batches per epoch: steps 4-6 are the second epoch
        assert [h["epoch"] for h in history] == [0, 1, 1]
    names = [p.name for p in checkpoints(tmp_path / "full")]
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    run(*parts_for(tmp_path / "cut", epochs=epochs, max_steps=4))
    accelerator, resumed = parts_for(tmp_path / "cut", epochs=epochs)
    path = resolve_checkpoint(str(tmp_path / "cut"), "latest")
    state = start_state(accelerator, _config(tmp_path / "cut"), path, resumed.checkpoints)
    assert state == {"step": 4, "batches": 4}
    assert run(accelerator, resumed, state) == history[2:]
    weights = [p.detach() for p in full.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights, resumed.model.parameters()))


def test_hooks_run_on_their_steps_and_clipping_only_measures_at_inf(tmp_path):
    calls = []
    hooks = [every(2, calls.append, before=6), every(0, calls.append)]
    inf = float("inf")
    history = run(*parts_for(tmp_path / "a", epochs=False, max_grad_norm=inf, hooks=hooks))
    assert calls == [2, 4]  # every 2 steps, below 6; a period of 0 never runs
    assert all(h["grad_norm"] > 0 for h in history)
    unclipped = run(*parts_for(tmp_path / "b", epochs=False))
    assert [h["mse"] for h in unclipped] == [h["mse"] for h in history]
    assert all("grad_norm" not in h for h in unclipped)  # 0: no clipping, no norm


def test_trainer_settings_mix_into_a_stage_config_with_its_own_defaults():
    @dataclasses.dataclass
    class StageConfig(TrainerSettings, BaseConfig):
        save_steps: int = trainer_default("save_steps", 7)
        learning_rate: float = trainer_default("learning_rate", 0.5)
        """Another help text."""

    fields = {f.name: f for f in dataclasses.fields(StageConfig)}
    assert StageConfig(output_dir="o").save_steps == 7
    assert fields["save_steps"].metadata["help"].startswith("Checkpoint")  # help kept
    assert fields["save_steps"].metadata["min"] == 1  # and the limits
    assert fields["learning_rate"].metadata["help"] == "Another help text."
    assert list(fields)[0] == "output_dir"  # BaseConfig's fields first
    with pytest.raises(ConfigError, match="save_steps"):
        StageConfig(output_dir="o", save_steps=0)


def _config(out):
    return BaseConfig(output_dir=str(out))
