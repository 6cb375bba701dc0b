"""Shared pytest set-up: offline hub, no analytics, pinned threads, seeded RNGs."""

import os

# Set before anything imports huggingface_hub / gradio: a stray hub id otherwise costs ~25 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run tiny models: one intra-op thread per process. Two OpenMP threads on tiny matrices mostly spin (measured up
# to 10x slower per step on the 2-core CI machine), and subprocess tests (2-process DDP) would oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
