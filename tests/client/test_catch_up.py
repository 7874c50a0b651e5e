"""A client process that missed rounds catches up exactly: the server resends every update from the base,
combined (factored or dense, whichever is smaller)."""

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from pollinate import protocol as wire
from pollinate.aggregation import LoraFactors, stack
from pollinate.client.app import sync_updates
from pollinate.config import RunConfig
from pollinate.methods.lora.method import LoraTrainee
from pollinate.methods.lora.update import LowRankUpdate
from pollinate.methods.lora.variants import FreshAdapter
from pollinate.strategies import build_strategy

CFG = RunConfig.from_run_config({"model": "tiny-llama", "strategy": "flora", "num-clients": 2,
                                 "lora.ranks": "4,2", "eval-examples": 8})


def _node() -> LoraTrainee:
    return LoraTrainee(CFG, 4, FreshAdapter())


def _round_update(node: LoraTrainee, seed: int) -> LowRankUpdate:
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for rank in (4, 2):
        state = {}
        for name, w in node.adapter.base_weights(node.model).items():
            # LoRA-sized factors: a merged round moves weights by about 1e-3
            state[f"{name}.lora_A.weight"] = 0.03 * torch.randn(rank, w.shape[1], generator=gen)
            state[f"{name}.lora_B.weight"] = 0.01 * torch.randn(w.shape[0], rank, generator=gen)
        clients.append(LoraFactors.from_state(state, alpha=16.0))
    return LowRankUpdate(stack(clients, [3.0, 1.0]))


def test_a_stale_process_asks_and_then_matches_the_server(flower_task: None) -> None:
    server, client = _node(), _node()
    strategy = build_strategy(CFG)
    for seed in (1, 2, 3):  # three rounds merged on the server while the client was away
        update = _round_update(server, seed)
        strategy.commit(update)
        server.merge(update)
    config = ConfigRecord({**CFG.to_run_config(), wire.ROUND: 4})
    stale = strategy.node_message(7, wire.to_record({}), config, since=2)  # the server believed v2
    assert not sync_updates(client, strategy.method, stale)  # a combined update from v2 cannot apply to v0
    ask = Message(RecordDict({wire.METRICS: MetricRecord({wire.CATCH_UP: 1, wire.BASE_VERSION: 0})}),
                  reply_to=stale)
    assert sync_updates(client, strategy.method, strategy.catch_up(ask, wire.to_record({}), config))
    assert client.version == 3
    for name, w in server.adapter.base_weights(server.model).items():
        assert float((client.adapter.base_weights(client.model)[name] - w).abs().max()) <= 1e-6
    # Another client of the same process then gets the v3 message: nothing is merged twice.
    again = strategy.node_message(8, wire.to_record({}), config, since=0)
    assert sync_updates(client, strategy.method, again) and client.version == 3


def test_a_catch_up_resends_from_the_base_whatever_version_was_reported(flower_task: None) -> None:
    strategy = build_strategy(CFG)
    node = _node()
    for seed in (1, 2, 3):
        strategy.commit(_round_update(node, seed))
    config = ConfigRecord({**CFG.to_run_config(), wire.ROUND: 4})
    stale = strategy.node_message(7, wire.to_record({}), config, since=2)
    ask = Message(RecordDict({wire.METRICS: MetricRecord({wire.CATCH_UP: 1, wire.BASE_VERSION: 1})}),
                  reply_to=stale)
    resend = wire.config_of(strategy.catch_up(ask, wire.to_record({}), config))
    assert (resend[wire.BASE_FROM], resend[wire.BASE_TO]) == (0, 3)  # any process can rebuild from it
