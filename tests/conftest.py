"""Test-session settings shared by every test file."""

import os

import torch

# Parallel workers (pytest -n) each get one intra-op thread: two workers with two threads each on a
# two-core machine oversubscribe it, which made some CPU kernels ten times slower in our runs.
# Child processes that tests start inherit the setting through OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
