"""FedIT through Flower messages: the weighted mean of every tensor; error replies are skipped."""

import pytest
import torch
from flwr.app import Error, Message, MetricRecord, RecordDict

from pollinate import protocol as wire
from pollinate.config import RunConfig
from pollinate.strategies import FedIt, build_strategy

CFG = RunConfig.from_run_config({"model": "tiny-llama", "num-clients": 3})


@pytest.fixture(autouse=True)
def _inside_a_run(flower_task: None) -> None:
    """Every message here is built as if inside a run."""


def _reply(state: dict[str, torch.Tensor], n: int, loss: float) -> Message:
    ask = Message(RecordDict(), dst_node_id=7, message_type="train")
    metrics = MetricRecord({wire.NUM_EXAMPLES: n, wire.TRAIN_LOSS: loss})
    return Message(RecordDict({wire.ARRAYS: wire.to_record(state), wire.METRICS: metrics}),
                   reply_to=ask)


def test_aggregate_train_is_the_weighted_mean() -> None:
    a = {"x.lora_A": torch.tensor([[1.0, 3.0]]), "x.lora_B": torch.tensor([[2.0]])}
    b = {"x.lora_A": torch.tensor([[5.0, 7.0]]), "x.lora_B": torch.tensor([[6.0]])}
    failed = Message(Error(code=0, reason="boom"),
                     reply_to=Message(RecordDict(), dst_node_id=8, message_type="train"))
    strategy = build_strategy(CFG)
    assert isinstance(strategy, FedIt)
    arrays, metrics = strategy.aggregate_train(1, [_reply(a, 3, 1.0), _reply(b, 1, 3.0), failed])
    assert arrays is not None and metrics is not None
    avg = wire.from_record(arrays)
    torch.testing.assert_close(avg["x.lora_A"], torch.tensor([[2.0, 4.0]]))  # (3a + b) / 4
    torch.testing.assert_close(avg["x.lora_B"], torch.tensor([[3.0]]))
    assert metrics[wire.TRAIN_LOSS] == 1.5 and metrics[wire.NUM_EXAMPLES] == 4


def test_no_good_reply_means_no_update() -> None:
    failed = Message(Error(code=0, reason="boom"),
                     reply_to=Message(RecordDict(), dst_node_id=8, message_type="train"))
    assert build_strategy(CFG).aggregate_train(1, [failed]) == (None, None)


def test_a_non_finite_aggregate_is_not_committed() -> None:
    from pollinate.protocol import ClientReport
    from pollinate.strategies.base import NotCommitted

    bad = {"x.lora_A": torch.tensor([[float("nan"), 3.0]]), "x.lora_B": torch.tensor([[2.0]])}
    strategy = build_strategy(CFG)
    with pytest.raises(NotCommitted, match=r"NaN or infinite values \(x\.lora_A\)"):
        strategy.aggregate([ClientReport.of(_reply(bad, 3, 1.0))])
    assert strategy.version == 0 and not strategy.node_versions  # nothing was recorded
