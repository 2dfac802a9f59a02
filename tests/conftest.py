"""Shared test setup: the repo root on sys.path, and one torch thread per test module.

Tiny models gain nothing from threads, and on a busy 2-core CPU OpenMP threads oversubscribe and crawl;
subprocesses started by the CLI tests get OMP_NUM_THREADS=1 for the same reason."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
