"""Test set-up: run Triton kernels in the interpreter when no GPU is present (DESIGN §6).

TRITON_INTERPRET must be set before triton is first imported, hence at conftest import time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
