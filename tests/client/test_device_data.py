"""A deployed node trains on its own data file (``--node-config data-path=...``), never on a share of a
built-in dataset; a bad file is refused with one line and the node stays up."""

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from pollinate import protocol as wire
from pollinate import workload
from pollinate.client import app
from pollinate.config import RunConfig
from pollinate.strategies import build_strategy

CFG = RunConfig.from_run_config({"model": "tiny-llama", "num-clients": 2, "local-steps": 2,
                                 "eval-examples": 8})


def instruction(cfg: RunConfig) -> Message:
    strategy = build_strategy(cfg)
    state = strategy.method.initial_state(strategy.method.server())
    config = ConfigRecord({**cfg.to_run_config(), wire.ROUND: 1})
    return strategy.node_message(7, wire.to_record(state), config, 0)


def context(node_config: dict[str, str], run_id: int) -> Context:
    return Context(run_id=run_id, node_id=7, node_config=dict(node_config), state=RecordDict(),
                   run_config={})


def test_a_device_trains_on_its_own_file_and_never_on_a_share(
        flower_task: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(7)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = instruction(CFG)

    def no_share(*args: object, **kwargs: object) -> None:
        raise AssertionError("a device with data-path read a share of the run's dataset")

    monkeypatch.setattr(workload, "shares", no_share)
    monkeypatch.setattr(workload, "pools", no_share)
    reply = app.train(message, context({"data-path": str(data), "prompt-field": "question",
                                        "response-field": "answer"}, run_id=301))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = wire.metrics_of(reply)
    assert wire.metric(metrics, wire.NUM_EXAMPLES) == 7
    assert wire.metric(metrics, wire.EXAMPLES_SEEN) == 2 * CFG.batch_size


@pytest.mark.parametrize(("content", "node_config", "reason"), [
    (None, {}, "node config: give data-path"),
    (None, {"data-path": "{missing}"}, "data-path: "),
    ('{"prompt": "hi", "reply": "hello"}\n', {}, "response-field: 'response' is not a column"),
    ('{"question": "hi"}\n', {"prompt-field": "question"}, "response-field: 'response' is not a column"),
    (None, {"memory-budget": "lots"}, "memory-budget"),
])
def test_a_bad_device_file_is_refused_in_one_line(
        content: str | None, node_config: dict[str, str], reason: str, flower_task: None,
        tmp_path: Path) -> None:
    data = tmp_path / "device.jsonl"
    if content is not None:
        data.write_text(content)
    config = {k: v.replace("{missing}", str(tmp_path / "nowhere.jsonl")) for k, v in node_config.items()}
    if content is not None or "memory-budget" in config:
        config["data-path"] = str(data)
    reply = app.train(instruction(CFG), context(config, run_id=302))
    assert reply.has_error() and reply.error.code == wire.REFUSED
    assert reason in reply.error.reason and "\n" not in reply.error.reason


def test_device_labels_become_the_runs(tmp_path: Path) -> None:
    """A classification file's labels, by name or by index, map onto the run's label names."""
    cfg = RunConfig.from_run_config({"model": "tiny-bert", "task": "classification", "eval-examples": 8})
    assert workload.splits(cfg)[0].features["label"].names == ["negative", "positive"]
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\ngreat film,positive\nawful,negative\nfine,positive\n")
    share = workload.device_share(cfg, str(data), {})
    assert share.features["label"].names == ["negative", "positive"] and share["label"] == [1, 0, 1]
    by_index = tmp_path / "indexed.jsonl"
    by_index.write_text('{"review": "great", "y": 1}\n{"review": "bad", "y": 0}\n')
    share = workload.device_share(cfg, str(by_index), {"text": "review", "label": "y"})
    assert share["label"] == [1, 0] and share["text"] == ["great", "bad"]
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("text,label\nhm,neutral\n")
    with pytest.raises(ValueError, match=r"^data-path: .* has the label 'neutral', which is not one of the "
                                         r"run's labels \(negative, positive\)"):
        workload.device_share(cfg, str(foreign), {})
