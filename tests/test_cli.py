"""Bad input stops before any training with one line naming the key, the value and what is allowed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate.cli import main

TINY = ["--set", "model=tiny-llama", "--set", "eval-examples=8"]


def _error(capsys: pytest.CaptureFixture[str], args: list[str], tmp_path: Path) -> str:
    code = main(["simulate", "--run-dir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert not (tmp_path / "run").exists()  # nothing ran
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pollinate: error: "), err
    return lines[0]


@pytest.mark.parametrize(("args", "key"), [
    (["--set", "model=no-such-model"], "model"),
    (["--set", "dataset=no-such-dataset"], "dataset"),
    (["--set", "dataset=rotten-tomatoes"], "dataset"),  # a classification set for generation
    (["--set", "task=translation"], "task"),
    (["--set", "task=classification"], "task"),  # tiny-llama cannot classify
    (["--set", "partitioner=random"], "partitioner"),
    (["--set", "strategy=fedfoo"], "strategy"),
    (["--set", "rounds=0"], "rounds"),
    (["--set", "partitioner=dirichlet", "--set", "dirichlet-alpha=0"], "dirichlet-alpha"),
    (["--set", "partitioner=iid", "--set", "num-clients=100000"], "num-clients"),
    (["--set", "lora.targets=not_a_module"], "lora.targets"),
    (["--set", "rounds"], "--set"),
])
def test_bad_configuration(args: list[str], key: str, capsys: pytest.CaptureFixture[str],
                           tmp_path: Path) -> None:
    line = _error(capsys, TINY + args, tmp_path)
    assert line.startswith(f"pollinate: error: {key}:"), line


def test_missing_data_file_and_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, [*TINY, "--set", f"dataset={tmp_path / 'absent.jsonl'}"], tmp_path)
    assert "dataset" in line
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"})
                              for i in range(40)))
    line = _error(capsys, [*TINY, "--set", f"dataset={data}", "--set", "partitioner=iid"], tmp_path)
    assert "data.prompt-field" in line


def test_the_real_command_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pollinate.cli", "simulate", *TINY,
                           "--set", "rounds=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("pollinate: error:")
