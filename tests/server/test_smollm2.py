"""Slow: the real SmolLM2-135M-Instruct federated for one round; the held-out loss must drop."""

import json
from pathlib import Path

import pytest

from pollinate.cli import main


@pytest.mark.slow
def test_one_round_on_smollm2_lowers_the_eval_loss(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = main(["simulate", "--run-dir", str(run), "--set", "num-clients=2", "--set", "rounds=1",
                 "--set", "local-steps=6", "--set", "eval-examples=16"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m-instruct" and summary["rounds_completed"] == 1
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"] - 0.05
    assert summary["sample"]["fine_tuned"]  # the fine-tuned model answers something
