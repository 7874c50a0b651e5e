"""Run configuration: keys, types, defaults in step with pyproject.toml, one-line errors."""

import tomllib
from pathlib import Path

import pytest

from pollinate.cli import _flatten
from pollinate.config import RunConfig, parse_assignments

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_the_dataclass_defaults() -> None:
    """`flwr run .` and `pollinate simulate` must start from the same configuration."""
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_run_config(_flatten(app_config)) == RunConfig()
    assert set(_flatten(app_config)) == set(RunConfig().to_run_config())


def test_round_trip_and_string_values_from_the_command_line() -> None:
    cfg = RunConfig.from_run_config(parse_assignments(["rounds=5", "lr=3e-4", "lora.rank=16"]))
    assert (cfg.rounds, cfg.lr, cfg.lora.rank) == (5, 3e-4, 16)
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(("items", "expected"), [
    (["rounds=5", "lr=3e-4"], {"rounds": "5", "lr": "3e-4"}),
    (["rounds=5 lr=3e-4"], {"rounds": "5", "lr": "3e-4"}),  # one quoted string, several pairs
    (["  rounds=5\tlr=3e-4  lora.rank=16 "], {"rounds": "5", "lr": "3e-4", "lora.rank": "16"}),
    (["rounds=5 rounds=6", "rounds=7"], {"rounds": "7"}),  # a later key wins
    (['data.prompt-field="my prompt" rounds=2'], {"data.prompt-field": "my prompt", "rounds": "2"}),
    (["data.prompt-field='my prompt'"], {"data.prompt-field": "my prompt"}),
    (['data.prompt-field="say \'hi\'"'], {"data.prompt-field": "say 'hi'"}),
    (['data.prompt-field=""'], {"data.prompt-field": ""}),
    (["dataset=C:\\data\\chat.jsonl"], {"dataset": "C:\\data\\chat.jsonl"}),  # backslashes kept
    (["lora.targets=q_proj,v_proj#x"], {"lora.targets": "q_proj,v_proj#x"}),  # "#" is no comment
    (["a=b=c"], {"a": "b=c"}),
    (["", "  "], {}),
])
def test_assignments_split_like_run_config(items: list[str], expected: dict[str, str]) -> None:
    assert parse_assignments(items) == expected


@pytest.mark.parametrize(("items", "message"), [
    (["rounds"], "--set: 'rounds' is not key=value"),
    (["=5"], "--set: '=5' is not key=value"),
    (["rounds=5 lr"], "--set: 'lr' (in 'rounds=5 lr') is not key=value"),
    (["data.prompt-field=my prompt"], "--set: 'prompt' (in 'data.prompt-field=my prompt')"),
    (['data.prompt-field="my prompt'], "--set: 'data.prompt-field=\"my prompt' has an unclosed"),
    (["data.prompt-field=what's up"], "--set: \"data.prompt-field=what's up\" has an unclosed"),
])
def test_bad_assignment_names_the_item(items: list[str], message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_assignments(["rounds=1", *items])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(("values", "key"), [
    ({"rounds": 0}, "rounds"),
    ({"rounds": "two"}, "rounds"),
    ({"rounds": 1.5}, "rounds"),
    ({"task": "translation"}, "task"),
    ({"partitioner": "random"}, "partitioner"),
    ({"dirichlet-alpha": 0}, "dirichlet-alpha"),
    ({"dirichlet-alpha": -1}, "dirichlet-alpha"),
    ({"num-clients": 0}, "num-clients"),
    ({"lora.rank": 0}, "lora.rank"),
    ({"lora.ranks": "8,x"}, "lora.ranks"),
    ({"no-such-key": 1}, "no-such-key"),
])
def test_bad_values_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError) as err:
        RunConfig.from_run_config(values)
    message = str(err.value)
    assert message.startswith(f"{key}:") and "\n" not in message


def test_per_client_ranks_cycle() -> None:
    lora = RunConfig.from_run_config({"lora.ranks": "8,4,2"}).lora
    assert [lora.rank_for(i) for i in range(4)] == [8, 4, 2, 8]
