"""Shared test set-up: one intra-op thread per pytest-xdist worker (two workers share two cores)."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
