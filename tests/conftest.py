"""Test set-up: run Triton kernels in the interpreter when no GPU is present (design.md §6).

TRITON_INTERPRET must be set before triton is first imported, hence at conftest import time.
"""
import importlib.metadata
import os
import platform

import pytest
import torch

# The releases CI resolves today decide whether main works: printed first by every run (.ci/run).
REPORTED_DISTRIBUTIONS = ("torch", "triton", "transformers", "peft", "accelerate", "datasets", "kernels",
                          "safetensors", "hypothesis", "trl")

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


def pytest_report_header(config) -> list[str]:
    """One line of resolved versions, so a CI log says which releases a result was measured with."""
    found = []
    for name in REPORTED_DISTRIBUTIONS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return [f"versions: python {platform.python_version()}, " + ", ".join(found)]
