"""``pollinate serve`` and ``pollinate agent``: bad input is one line naming what is wrong, before any
process starts."""

import json
from pathlib import Path

import pytest

from pollinate.cli import main
from pollinate.config import RunConfig
from pollinate.deploy.certs import init
from pollinate.deploy.serve import app_pyproject


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init(tmp_path_factory.mktemp("commands") / "certs", nodes=1, sans="localhost,127.0.0.1").path


def one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pollinate: error: "), err
    return err.removeprefix("pollinate: error: ")


def agent_args(certs: Path, tmp_path: Path, **changes: str) -> list[str]:
    data = tmp_path / "mine.jsonl"
    if not data.exists():
        data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    args = {"--certs": str(certs), "--key": str(certs / "nodes/node-1/auth.key"),
            "--superlink": "127.0.0.1:9", "--data": str(data), **changes}
    return ["agent", *[x for pair in args.items() for x in pair]]


def test_agent_bad_input(certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line(capsys, agent_args(certs, tmp_path, **{"--certs": str(tmp_path / "none")}))
    assert line.startswith("--certs: ") and "has no ca.crt" in line
    line = one_line(capsys, agent_args(certs, tmp_path, **{"--key": str(certs / "ca.key")}))
    assert line.startswith("--key: ") and "is not a node key" in line
    assert "does not exist" in one_line(capsys, agent_args(certs, tmp_path, **{"--key": str(tmp_path / "k")}))
    assert one_line(capsys, agent_args(certs, tmp_path, **{"--data": str(tmp_path / "no.jsonl")})).startswith(
        "--data: ")
    odd = tmp_path / "odd.csv"
    odd.write_text("question,answer\nhi,hello\n")
    line = one_line(capsys, agent_args(certs, tmp_path, **{"--data": str(odd)}))
    assert line.startswith("--data: ") and "has neither prompt and response" in line
    line = one_line(capsys, [*agent_args(certs, tmp_path, **{"--data": str(odd)}), "--set", "prompt-field=q"])
    assert "has neither q and response" in line
    assert one_line(capsys, [*agent_args(certs, tmp_path), "--set", "rank=3"]).startswith("--set: 'rank'")
    assert one_line(capsys, [*agent_args(certs, tmp_path), "--memory-budget", "lots"]).startswith(
        "--memory-budget: ")
    line = one_line(capsys, agent_args(certs, tmp_path))  # nothing listens on port 9
    assert line.startswith("--superlink: cannot reach 127.0.0.1:9") and "pollinate serve" in line
    assert one_line(capsys, agent_args(certs, tmp_path, **{"--superlink": "nowhere"})).startswith(
        "--superlink: 'nowhere' is not HOST:PORT")


def test_serve_bad_input(certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["serve", "--state", str(tmp_path / "state"), "--set", "model=tiny-llama"]
    line = one_line(capsys, [*base, "--certs", str(tmp_path / "none")])
    assert line.startswith("--certs: ") and "pollinate certs init" in line
    assert one_line(capsys, [*base, "--certs", str(certs), "--address", "9092"]).startswith("--address: ")
    assert one_line(capsys, [*base, "--certs", str(certs), "--set", "rounds=0"]).startswith("rounds: ")
    assert not (tmp_path / "state").exists()  # nothing was started or written


def test_the_generated_app_carries_the_runs_configuration() -> None:
    import tomllib

    cfg = RunConfig.from_run_config({"model": "tiny-llama", "rounds": 7, "lora.rank": 4, "dp.clip": 0.5,
                                     "data.prompt-field": 'say "hi"'})
    app = tomllib.loads(app_pyproject(cfg))["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "pollinate.server.app:app",
                                 "clientapp": "pollinate.client.app:app"}
    flat = {**{k: v for k, v in app["config"].items() if not isinstance(v, dict)},
            **{f"{t}.{k}": v for t, table in app["config"].items() if isinstance(table, dict)
               for k, v in table.items()}}
    assert RunConfig.from_run_config(flat) == cfg
