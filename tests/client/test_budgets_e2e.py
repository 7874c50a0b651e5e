"""Memory budgets in a real simulation (MiniLM): each client's plan fits its budget and differs by
budget, the measured peak stays within it, and a budget too small for any plan is refused by that
client alone."""

import json
from pathlib import Path

import pytest

from pollinate.cli import main

BUDGETS = ["1GB", "300MB", "200MB", "100MB"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("budgets") / "run"
    assert main(["simulate", "--run-dir", str(path), "--set", "model=minilm-l6",
                 "--set", "task=classification", "--set", "partitioner=iid", "--set", "num-clients=4",
                 "--set", "rounds=1", "--set", "local-steps=2", "--set", "batch-size=16",
                 "--set", "eval-examples=32", "--set", f"memory.budgets={','.join(BUDGETS)}"]) == 0
    return path


def _events(path: Path, kind: str) -> list[dict]:
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_each_plan_fits_its_budget_and_differs(run: Path) -> None:
    clients = sorted(_events(run, "client"), key=lambda e: -e["budget_bytes"])
    assert [e["budget_bytes"] for e in clients] == [10**9, 3 * 10**8, 2 * 10**8]
    plans = [json.dumps(e["plan"], sort_keys=True) for e in clients]
    assert len(set(plans)) == 3
    for e in clients:
        assert e["estimate_bytes"] <= e["budget_bytes"]
        assert 0 < e["peak_mem_bytes"] <= e["budget_bytes"], e
        assert not e["over_budget"]
        assert e["process_peak_bytes"] == e["peak_mem_bytes"] + e["runtime_baseline_bytes"]
        assert e["plan"]["micro_batch"] * e["plan"]["grad_accum"] == 16  # effective batch kept


def test_a_budget_too_small_is_refused_and_the_round_goes_on(run: Path) -> None:
    (failed,) = _events(run, "failed")
    assert "memory-budget: 100 MB is too small" in failed["reason"] and "needs at least" in failed["reason"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["failed_clients"] == 1
    assert summary["over_budget_clients"] == 0
    assert (run / "memory.png").stat().st_size > 0


@pytest.mark.parametrize("budgets", ["1.5XB", "0GB", "-2GB"])
def test_unreadable_budgets_stop_before_training(budgets: str, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    code = main(["simulate", "--run-dir", str(tmp_path / "r"), "--set", "model=tiny-llama",
                 "--set", f"memory.budgets={budgets}"])
    assert code == 2 and capsys.readouterr().err.startswith("pollinate: error: memory.budgets:")
