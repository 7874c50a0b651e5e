"""Experiment tracking: each tracker on a small run's events (killed, resumed, completed), a real
simulation into MLflow, and the one-line refusals."""

import json
import math
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pollinate.cli import main
from pollinate.config import TRACKING, RunConfig
from pollinate.server.rundir import RunDir
from pollinate.server.tracking import TRACKERS, NoTracker, Tracker, build_tracker, figures

CONFIG = RunConfig(model="tiny-llama", rounds=2).to_run_config()
NODES = (101, 202)


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # offline, and not ours to send


def round_events(server_round: int, loss: float) -> list[dict[str, Any]]:
    """A round's lines as the server writes them: two clients, one rejection, train, evaluate."""
    clients = [{"round": server_round, "event": "client", "node_id": node, "method": "lora", "rank": 8,
                "num_examples": 40, "train_loss": loss + 0.5 + i, "peak_mem_bytes": 1000 * (i + 1),
                "estimate_bytes": 1200, "budget_bytes": None, "over_budget": False, "bytes_up": 5000,
                "bytes_down": 6000, "plan": {"rank": 8, "checkpointing": False},
                "base_fingerprint": 0.123} for i, node in enumerate(NODES)]
    return [*clients,
            {"round": server_round, "event": "rejected", "node_id": 303, "check": "numerics",
             "reason": "a value is NaN"},
            {"round": server_round, "event": "train", "sampled": 3, "accepted": 2, "train_loss": loss + 1,
             "bytes_up": 10000, "bytes_down": 12000, "committed": True, "epsilon": 2.5 * server_round},
            {"round": server_round, "event": "evaluate", "loss": loss, "perplexity": math.exp(loss),
             "eval_seconds": 0.5}]


def commit(run_dir: RunDir, server_round: int) -> None:
    def write(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"weights")

    run_dir.commit_checkpoint(server_round, write, {"method": "lora"})


def killed_then_resumed(path: Path, tracking: str) -> RunDir:
    """Round 1 committed, round 2 killed before its checkpoint; then resumed from round 1 to the end."""
    tracker = TRACKERS[tracking]("")
    run_dir = RunDir(path, on_event=tracker.log_event)
    tracker.start(run_dir, CONFIG)
    run_dir.append_event({"round": 0, "event": "evaluate", "loss": 3.0, "perplexity": math.exp(3.0)})
    for event in round_events(1, 2.5):
        run_dir.append_event(event)
    commit(run_dir, 1)
    for event in round_events(2, 9.9):  # lost with the process: no checkpoint of round 2
        run_dir.append_event(event)

    tracker = TRACKERS[tracking]("")
    run_dir = RunDir(path, on_event=tracker.log_event)
    tracker.start(run_dir, {**CONFIG, "resume": True, "rounds": 3})
    recovery = run_dir.recover()
    run_dir.append_event({"round": recovery.round, "event": "resumed", "checkpoint": "round-0001"})
    for event in round_events(2, 2.0):
        run_dir.append_event(event)
    commit(run_dir, 2)
    run_dir.write_json("summary.json", {"rounds_completed": 2, "final_eval": {"loss": 2.0},
                                        "bytes_up_total": 40000, "strategy": "fedit"})
    (path / "report.html").write_text("<html></html>")
    tracker.finish(run_dir)
    return run_dir


def evaluated(run_dir: RunDir) -> dict[int, float]:
    return {e["round"]: e["loss"] for e in run_dir.events() if e["event"] == "evaluate"}


def test_figures_are_every_number_by_path() -> None:
    event = round_events(1, 2.0)[0]
    found = figures(event, "client/101")
    assert found["client/101/train_loss"] == 2.5 and found["client/101/plan/rank"] == 8
    assert found["client/101/plan/checkpointing"] == 0.0 and found["client/101/over_budget"] == 0.0
    assert not {"client/101/budget_bytes", "client/101/method", "client/101/base_fingerprint",
                "client/101/node_id", "client/101/round"} & set(found)


def test_the_tracking_values_are_the_trackers() -> None:
    assert tuple(TRACKERS) == TRACKING


def test_tensorboard_holds_every_round_once(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = killed_then_resumed(tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(run_dir.path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: {s.step: s.value for s in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert scalars["eval/loss"] == pytest.approx(evaluated(run_dir))  # round 2 of the killed run purged
    assert [s.step for s in events.Scalars("eval/loss")] == [0, 1, 2]
    assert scalars["train/epsilon"] == pytest.approx({1: 2.5, 2: 5.0})
    assert scalars["train/rejected"] == {1: 1.0, 2: 1.0}
    assert scalars["client/202/peak_mem_bytes"] == {1: 2000.0, 2: 2000.0}
    assert scalars["summary/final_eval/loss"] == {2: 2.0}
    texts = {tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
             for tag in events.Tags()["tensors"]}
    assert "| strategy | 'fedit' |" in texts["config/text_summary"]
    assert str(run_dir.path / "report.html") in texts["results/text_summary"]


def test_mlflow_run_in_the_run_folder(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = killed_then_resumed(tmp_path / "run", "mlflow")
    client = MlflowClient(f"sqlite:///{run_dir.path / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((run_dir.path / "tracking.json").read_text())["run_id"]
    experiment = client.get_experiment_by_name("pollinate").experiment_id
    assert [r.info.run_id for r in client.search_runs(experiment)] == [run_id]  # resumed: the same run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/loss"))
    # metrics.jsonl's rounds, and the killed run's round 2 (9.9): MLflow cannot delete a step
    assert history == sorted([*evaluated(run_dir).items(), (2, 9.9)])
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "client/101/train_loss")
                  ) == [(1, 3.0), (2, 2.5), (2, 10.4)]
    assert run.data.metrics["train/rejected"] == 1 and run.data.metrics["summary/bytes_up_total"] == 40000
    assert run.data.params["strategy"] == "fedit" and run.data.params["rounds"] == "2"
    assert run.data.tags["resumed.rounds"] == "3"
    artefacts = {a.path for a in client.list_artifacts(run_id)}
    assert artefacts >= {"report.html", "summary.json", "metrics.jsonl", "checkpoints"}
    saved = [a.path for a in client.list_artifacts(run_id, "checkpoints/round-0002")]
    assert "checkpoints/round-0002/adapter_model.safetensors" in saved
    assert "checkpoints/round-0002/manifest.json" in saved


@pytest.mark.slow  # a Flower simulation on Ray, about 20 s
def test_simulation_logs_into_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    path = tmp_path / "run"
    code = main(["simulate", "--run-dir", str(path), "--set", "model=tiny-llama", "num-clients=2",
                 "rounds=2", "local-steps=2", "eval-examples=8", "tracking=mlflow"])
    assert code == 0
    client = MlflowClient(f"sqlite:///{path / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((path / "tracking.json").read_text())["run_id"]
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "eval/loss")}
    assert logged == pytest.approx(evaluated(RunDir(path)))
    assert sorted(logged) == [0, 1, 2]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["tracking"] == "mlflow"
    assert sum(name.startswith("client/") and name.endswith("/train_loss") for name in run.data.metrics) == 2
    artefacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.html", "summary.json"} <= artefacts
    saved = {a.path for a in client.list_artifacts(run_id, "checkpoints/round-0002")}
    assert "checkpoints/round-0002/adapter_model.safetensors" in saved


@pytest.mark.parametrize(("setting", "message"), [
    ("tracking=wandb", "tracking: 'wandb' is not allowed; allowed: none, tensorboard, mlflow"),
    ("tracking-uri=http://localhost:5000", "tracking-uri: 'http://localhost:5000' is not allowed; only "
                                           'tracking = "mlflow" logs to a URI'),
])
def test_bad_value_is_one_line(setting: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pollinate: error: {message}") and err.count("\n") == 1


@pytest.fixture
def without_libraries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Importing either library fails, as where the tracking extra is not installed."""
    for name in ("mlflow", "mlflow.tracking", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    yield


@pytest.mark.usefixtures("without_libraries")
@pytest.mark.parametrize("tracking", ["tensorboard", "mlflow"])
def test_missing_extra_is_one_line(tracking: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=rf"^tracking: '{tracking}' needs the {tracking} package, which is "
                                         r"not installed; pip install 'pollinate\[tracking\]'$"):
        build_tracker(RunConfig(tracking=tracking))
    assert main(["simulate", "--set", f"tracking={tracking}", "model=tiny-llama"]) == 2  # before any model
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.usefixtures("without_libraries")
def test_none_imports_neither(tmp_path: Path) -> None:
    tracker: Tracker = build_tracker(RunConfig())
    assert isinstance(tracker, NoTracker)
    run_dir = RunDir(tmp_path, on_event=tracker.log_event)
    tracker.start(run_dir, CONFIG)
    run_dir.append_event(round_events(1, 2.0)[-1])
    tracker.finish(run_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_unreachable_server_is_refused_at_start() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(ValueError) as err:
        build_tracker(RunConfig(tracking="mlflow", tracking_uri=uri))
    assert str(err.value).startswith(f"tracking-uri: {uri!r} does not answer (")
    assert "leave tracking-uri empty" in str(err.value) and "\n" not in str(err.value)
