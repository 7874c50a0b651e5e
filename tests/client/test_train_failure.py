"""A client whose training raises answers with an error reply naming the failure, stays up, and builds a
fresh trainee for the next instruction (reliability.md, scenario 3)."""

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from pollinate import protocol as wire
from pollinate.client import app
from pollinate.config import RunConfig
from pollinate.methods.lora.method import LoraTrainee
from pollinate.strategies import build_strategy

CFG = RunConfig.from_run_config({"model": "tiny-llama", "num-clients": 2, "local-steps": 1,
                                 "eval-examples": 8})


def test_a_failing_training_is_an_error_reply_and_the_next_one_trains(
        flower_task: None, monkeypatch: pytest.MonkeyPatch) -> None:
    strategy = build_strategy(CFG)
    server = strategy.method.server()
    config = ConfigRecord({**CFG.to_run_config(), wire.ROUND: 1})
    context = Context(run_id=91, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    instruction = strategy.node_message(7, wire.to_record(strategy.method.initial_state(server)), config, 0)

    def broken(self: LoraTrainee, *args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory in the attention backward")

    with monkeypatch.context() as patch:  # a fault inside training, as a device's allocator would raise
        patch.setattr(LoraTrainee, "train", broken)
        failed = app.train(instruction, context)
        first = [t for k, t in app.STATE.trainees.items() if k.run == 91]
    assert failed.has_error() and failed.error.code == wire.TRAIN_FAILED
    assert failed.error.reason == "training failed: RuntimeError: out of memory in the attention backward"
    assert not first  # the trainee that failed is gone

    answered = app.train(instruction, context)  # the node stayed up: the next instruction trains
    assert not answered.has_error()
    assert wire.metric(wire.metrics_of(answered), wire.NUM_EXAMPLES) > 0
