"""Bad input stops before any training with one line naming the key, the value and what is allowed."""

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pollinate.cli import build_parser, resolve_config

TINY = ["--set", "model=tiny-llama", "--set", "eval-examples=8"]


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
    (["--set", "rounds=2", "lr"], "--set"),  # several items after one flag
    (["--set", "rounds=2 lr"], "--set"),  # several pairs in one string
    (["--set", 'data.prompt-field="my prompt'], "--set"),  # an unclosed quote
    (["--set", "rounds=2 partitioner=random"], "partitioner"),
    (["--set", "rounds=2", "strategy=fedfoo"], "strategy"),
    (["--set", "dp.mode=central", "dp.target-epsilon=0.1"], "dp.target-epsilon"),
    (["--set", "dp.mode=local", "strategy=flora"], "dp.mode"),
    (["--set", "dp.clip=0"], "dp.clip"),
    (["--set", "dp.delta=1"], "dp.delta"),
    (["--set", "eval-dataset=/nowhere/heldout.jsonl"], "eval-dataset"),
    (["--set", "dp.mode=central", "strategy=fedsb", "fedsb.init=federated"], "fedsb.init"),
])
def test_bad_configuration(args: list[str], key: str, simulate_error: Callable[[list[str]], str]) -> None:
    line = simulate_error(TINY + args)
    assert line.startswith(f"pollinate: error: {key}:"), line


def test_missing_data_file_and_field(simulate_error: Callable[[list[str]], str], tmp_path: Path) -> None:
    line = simulate_error([*TINY, "--set", f"dataset={tmp_path / 'absent.jsonl'}"])
    assert "dataset" in line
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"})
                              for i in range(40)))
    line = simulate_error([*TINY, "--set", f"dataset={data}", "--set", "partitioner=iid"])
    assert "data.prompt-field" in line


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "is empty; it needs at least one example with columns prompt, response"),
    (b"prompt,response\n", "has only a header row (prompt, response); it needs at least one"),
    (b"prompt,response\nHi,Caf\xe9\n", "is not UTF-8 text (byte 0xe9 at position 22)"),
])
def test_empty_or_undecodable_data_file(content: bytes, problem: str,
                                        simulate_error: Callable[[list[str]], str], tmp_path: Path) -> None:
    data = tmp_path / "chat.csv"
    data.write_bytes(content)
    line = simulate_error([*TINY, "--set", f"dataset={data}"])
    assert line.startswith(f"pollinate: error: dataset: {str(data)!r} {problem}"), line


@pytest.mark.parametrize("args", [
    ["--set", "rounds=3", "lora.rank=4", 'data.prompt-field="my prompt"'],
    ["--set", "rounds=3", "--set", "lora.rank=4", "--set", 'data.prompt-field="my prompt"'],
    ["--set", 'rounds=3 lora.rank=4 data.prompt-field="my prompt"'],
    ["--set", "rounds=3 lora.rank=4", "--set", "data.prompt-field='my prompt'"],
])
def test_set_takes_several_assignments(args: list[str]) -> None:
    cfg = resolve_config(None, build_parser().parse_args(["simulate", *args]).set, None)
    assert (cfg.rounds, cfg.lora.rank, cfg.data.prompt) == (3, 4, "my prompt")
    assert build_parser().parse_args(["simulate"]).set == []


def test_the_real_command_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pollinate.cli", "simulate", *TINY,
                           "--set", "rounds=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("pollinate: error:")
