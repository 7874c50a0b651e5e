"""Federated evaluation (``eval-split = "clients"``): every node holds back a slice of its own data, never
trains on it, evaluates the global model on it, and the server reports the mean weighted by examples."""

import json
import math
from pathlib import Path

import pytest
from datasets import Dataset
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from pollinate import protocol as wire
from pollinate import workload
from pollinate.cli import main
from pollinate.client import app
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, encode_dataset
from pollinate.server.global_model import EVAL_BATCH, GlobalModel
from pollinate.server.loop import eval_failure
from pollinate.strategies import build_strategy
from pollinate.training import evaluate

CFG = RunConfig.from_run_config({"model": "tiny-llama", "num-clients": 2, "local-steps": 2,
                                 "eval-examples": 8, "eval-split": "clients", "eval-fraction": 0.3})


@pytest.mark.parametrize(("rows", "held"), [(2, 1), (7, 2), (10, 3), (100, 30)])
def test_a_node_holds_back_its_fraction_and_never_trains_on_it(rows: int, held: int) -> None:
    share = Dataset.from_dict({"prompt": [f"q{i}" for i in range(rows)], "response": ["a"] * rows})
    train, heldout = workload.client_split(CFG, share)
    assert len(heldout) == held and len(train) == rows - held
    assert not set(train["prompt"]) & set(heldout["prompt"])
    assert workload.client_split(CFG, share)[1]["prompt"] == heldout["prompt"]  # the same every round
    other = RunConfig.from_run_config({"model": "tiny-llama"})
    assert workload.client_split(other, share) == (share, share)


def test_a_node_with_one_example_cannot_hold_one_back() -> None:
    with pytest.raises(ValueError, match=r"^eval-split: 'clients' needs at least 2 examples on every node"):
        workload.client_split(CFG, Dataset.from_dict({"prompt": ["q"], "response": ["a"]}))


@pytest.mark.parametrize(("settings", "message"), [
    (["eval-fraction=0"], "eval-fraction: 0.0 is not allowed; give a fraction in (0, 1)"),
    (["eval-fraction=1.5"], "eval-fraction: 1.5 is not allowed; give a fraction in (0, 1)"),
    (["eval-split=clients", "eval-dataset=rotten-tomatoes"],
     "eval-dataset: 'rotten-tomatoes' is not allowed; with eval-split = \"clients\" the nodes evaluate"),
    (["eval-split=devices"], "eval-split: 'devices' is not allowed; allowed: held-out, validation, clients"),
])
def test_bad_settings_get_one_line(simulate_error: object, settings: list[str], message: str) -> None:
    args = [a for s in settings for a in ("--set", s)]
    assert message in simulate_error(["--set", "model=tiny-llama", *args])  # type: ignore[operator]


def _reply(metrics: dict[str, float]) -> Message:
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), dst_node_id=0, message_type="evaluate")


@pytest.mark.parametrize(("metrics", "reason"), [
    ({wire.NUM_EXAMPLES: 3, wire.EVAL_LOSS: 1.5}, None),
    ({wire.NUM_EXAMPLES: 3, wire.EVAL_LOSS: 1.5, wire.ACCURACY: 0.5}, None),
    ({wire.NUM_EXAMPLES: 3, wire.EVAL_LOSS: math.nan}, "eval loss nan is not a finite number >= 0"),
    ({wire.NUM_EXAMPLES: 3, wire.EVAL_LOSS: -1.0}, "eval loss -1.0 is not a finite number >= 0"),
    ({wire.NUM_EXAMPLES: 0, wire.EVAL_LOSS: 1.0}, "num-examples 0 is not a whole number from 1 to 50"),
    ({wire.NUM_EXAMPLES: 10**6, wire.EVAL_LOSS: 1.0},
     "num-examples 1000000 is not a whole number from 1 to 50"),
    ({wire.NUM_EXAMPLES: 3, wire.EVAL_LOSS: 1.0, wire.ACCURACY: 2.0}, "accuracy 2.0 is outside [0, 1]"),
])
def test_a_bad_evaluation_reply_is_left_out_with_its_reason(
        flower_task: None, metrics: dict[str, float], reason: str | None) -> None:
    assert eval_failure(_reply(metrics), max_examples=50) == reason


def test_a_refused_evaluation_is_left_out_with_its_reason(flower_task: None) -> None:
    refused = Message(Error(code=wire.REFUSED, reason="memory-budget: no plan fits"),
                      reply_to=_reply({}))
    assert eval_failure(refused, max_examples=50) == "memory-budget: no plan fits"


def _context(node_config: dict[str, str], run_id: int) -> Context:
    return Context(run_id=run_id, node_id=7, node_config=dict(node_config), state=RecordDict(),
                   run_config={})


def test_a_device_evaluates_on_its_held_back_rows_and_trains_on_the_rest(flower_task: None,
                                                                           tmp_path: Path) -> None:
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(10)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    strategy = build_strategy(CFG)
    state = wire.to_record(strategy.method.initial_state(strategy.method.server()))
    config = ConfigRecord({**CFG.to_run_config(), wire.ROUND: 1})
    node = _context({"data-path": str(data)}, run_id=311)
    trained = app.train(strategy.node_message(7, state, config, 0), node)
    assert wire.metric(wire.metrics_of(trained), wire.NUM_EXAMPLES) == 7
    evaluated = app.evaluate_share(strategy.node_message(7, state, config, 0, "evaluate"), node)
    assert not evaluated.has_error(), evaluated.error.reason if evaluated.has_error() else ""
    metrics = wire.metrics_of(evaluated)
    assert wire.metric(metrics, wire.NUM_EXAMPLES) == 3
    assert math.isfinite(wire.metric(metrics, wire.EVAL_LOSS, math.nan))
    assert wire.metric(metrics, wire.BASE_VERSION) == 0


@pytest.mark.slow
def test_simulation_reports_the_weighted_mean_of_the_nodes(tmp_path: Path) -> None:
    """Classification loss is a mean per example, so the nodes' mean weighted by examples before round 1
    equals the starting model evaluated on the union of their held-back slices."""
    settings = {"model": "tiny-bert", "task": CLASSIFICATION, "num-clients": 3, "rounds": 2,
                "partitioner": "iid", "local-steps": 2, "eval-examples": 8, "eval-split": "clients",
                "eval-fraction": 0.25}
    path = tmp_path / "run"
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    assert main(["simulate", "--run-dir", str(path), *args]) == 0
    events = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "evaluate"]
    assert [e["round"] for e in evals] == [0, 1, 2]
    cfg = RunConfig.from_run_config(settings)
    slices = [workload.client_split(cfg, share)[1] for share in workload.shares(cfg)]
    for e in evals:
        assert (e["eval_on"], e["nodes"], e["evaluated"]) == ("clients", 3, 3)
        assert e["examples"] == sum(len(s) for s in slices) and e["bytes_down"] > 0
        assert math.isfinite(e["loss"]) and 0 <= e["accuracy"] <= 1
    clients = [e for e in events if e["event"] == "client"]
    assert sum(e["num_examples"] for e in clients if e["round"] == 1) == sum(
        len(share) - len(s) for share, s in zip(workload.shares(cfg), slices, strict=True))
    model = GlobalModel(cfg, build_strategy(cfg).method)
    union = [x for s in slices for x in encode_dataset(s, model.tokenizer, cfg.task, cfg.max_seq_len)]
    start = evaluate(model.model, union, batch_size=EVAL_BATCH, pad_id=model.tokenizer.pad_token_id,
                     classification=True)
    assert evals[0]["loss"] == pytest.approx(start["loss"], rel=1e-5)
    assert evals[0]["accuracy"] == pytest.approx(start["accuracy"])
    summary = json.loads((path / "summary.json").read_text())
    assert summary["final_eval"]["loss"] == pytest.approx(evals[-1]["loss"])
