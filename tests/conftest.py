"""Test-wide settings: offline, one torch thread, Ray and Flower state in temporary folders."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="pollinate-ray-"))

import torch  # noqa: E402

torch.set_num_threads(1)
