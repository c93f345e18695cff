"""Test setup: the repository root on sys.path and fast, deterministic torch settings."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

OFFICIAL_CONFIGS = os.path.join(os.path.dirname(ROOT), "shared", "reference", "official_configs")
