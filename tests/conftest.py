"""Test set-up: run Triton kernels in the interpreter when no GPU is present (design.md §6).

TRITON_INTERPRET must be set before triton is first imported, hence at conftest import time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only spins against the rest of the CI."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    """The offline test tokenizer of tests/train_fixtures.py."""
    from train_fixtures import make_tokenizer

    return make_tokenizer()
