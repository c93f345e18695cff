"""Test setup: the repository root on sys.path and fast, deterministic torch settings."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# Tiny models run fastest single-threaded, and a busy machine cannot stall them in thread sync.
torch.set_num_threads(1)
