"""Test-wide settings: offline, one torch thread, Ray and Flower state in temporary folders."""

import os
import tempfile
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="pollinate-ray-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def flower_task() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; give a test outside a run one."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]
