"""The base-delta downlink: built once per (since, version) and shared by the nodes that need it."""

import torch

from pollinate import protocol as wire
from pollinate.aggregation import Delta
from pollinate.config import RunConfig
from pollinate.methods.lora.update import LowRankUpdate
from pollinate.strategies import build_strategy

CFG = RunConfig.from_run_config({"model": "tiny-llama", "strategy": "flora", "num-clients": 3,
                                 "lora.ranks": "4,2,2"})


def _delta(seed: int) -> LowRankUpdate:
    gen = torch.Generator().manual_seed(seed)
    return LowRankUpdate({"m": Delta(left=torch.randn(6, 2, generator=gen),
                                     right=torch.randn(2, 5, generator=gen))})


def test_nodes_at_one_version_share_one_record_and_old_versions_are_dropped() -> None:
    strategy = build_strategy(CFG)
    empty, since = strategy.base_record(0)  # nothing merged yet: nothing to send
    assert since == 0 and len(empty) == 0
    strategy.history += [_delta(1), _delta(2)]
    first, since = strategy.base_record(0)
    assert since == 0 and strategy.base_record(0)[0] is first  # a second node at version 0: the same record
    behind_one = strategy.base_record(1)[0]
    assert behind_one is not first
    strategy.history.append(_delta(3))
    again = strategy.base_record(0)[0]
    assert again is not first  # a new version is a new record, never a stale one
    assert set(strategy._records) == {(0, 3)}  # records of version 2 are gone
    built = wire.from_record(strategy.build_base_record(0))
    sent = wire.from_record(again)
    assert sent.keys() == built.keys()
    for key in built:
        torch.testing.assert_close(sent[key], built[key], rtol=0, atol=0)
