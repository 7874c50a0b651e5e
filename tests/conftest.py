"""Test-wide settings: offline, one torch thread, Ray and Flower state in temporary folders."""

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

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


@pytest.fixture
def simulate_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Callable[[list[str]], str]:
    """Run ``pollinate simulate`` with arguments that must fail before anything starts; its one line.

    Checks the exit code 2, that no run folder was made, and that stderr is a single
    ``pollinate: error: ...`` line, which it returns.
    """
    from pollinate.cli import main

    def run(args: list[str]) -> str:
        code = main(["simulate", "--run-dir", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert not (tmp_path / "run").exists()  # nothing ran
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pollinate: error: "), err
        return lines[0]

    return run
