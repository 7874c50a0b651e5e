"""A real simulated run, shared by the tests that read a finished run folder."""

from pathlib import Path

import pytest

from pollinate.cli import main


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pollinate simulate`` with tiny-llama: 3 clients, 2 rounds (a Flower simulation on Ray, ~20 s)."""
    path = tmp_path_factory.mktemp("sim") / "run"
    code = main(["simulate", "--run-dir", str(path), "--set", "model=tiny-llama",
                 "--set", "num-clients=3", "--set", "rounds=2", "--set", "local-steps=4",
                 "--set", "eval-examples=16", "--set", "lr=0.005"])
    assert code == 0
    return path
