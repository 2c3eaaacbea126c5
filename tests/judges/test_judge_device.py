"""Model judges built without a device land on this process's device (accelerate's PartialState)."""

import pytest
import torch
from accelerate import PartialState

import noisealign.judges.clip as clip_module
import noisealign.judges.vlm as vlm_module
from noisealign.judges import build_judge


@pytest.fixture
def judge_model(request, tiny_clip_folder, tiny_vlm_folders):
    name = request.param
    return name, str(tiny_clip_folder if name == "clip" else tiny_vlm_folders["qwen2_vl"])


@pytest.mark.parametrize("judge_model", ["clip", "vlm"], indirect=True)
def test_judge_without_a_device_takes_the_process_device(judge_model, monkeypatch):
    name, model = judge_model
    # 'meta' is a device nothing but the process state names: a judge that picked CUDA-or-CPU
    # on its own (as on 8 GPUs, where every rank then loaded onto cuda:0) would not get it
    rank_device = torch.device("meta")

    class RankState:
        device = rank_device

    monkeypatch.setattr(clip_module, "PartialState", RankState)
    monkeypatch.setattr(vlm_module, "PartialState", RankState)
    judge = build_judge(name, model=model)
    assert judge.device == rank_device
    assert {p.device for p in judge.model.parameters()} == {rank_device}
    explicit = build_judge(name, model=model, device="cpu")  # a recipe's device still wins
    assert {p.device for p in explicit.model.parameters()} == {torch.device("cpu")}


@pytest.mark.parametrize("judge_model", ["clip", "vlm"], indirect=True)
def test_judge_device_is_the_real_partial_state_device(judge_model):
    name, model = judge_model
    judge = build_judge(name, model=model)
    assert judge.device == PartialState().device
    assert {p.device for p in judge.model.parameters()} == {PartialState().device}
