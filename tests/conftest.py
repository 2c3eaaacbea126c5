"""Test-wide settings: offline hub, no wandb network, small thread pools."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# tiny models gain nothing from more threads, and a busy 2-core machine loses a lot
torch.set_num_threads(1)
