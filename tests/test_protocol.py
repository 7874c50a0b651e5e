"""The wire: states survive an ArrayRecord, byte counts cover what Flower serialises."""

import torch

from pollinate import protocol as wire


def test_state_round_trip_keeps_keys_order_and_values() -> None:
    state = {"b.lora_B": torch.randn(6, 2), "a.lora_A": torch.randn(2, 5)}
    back = wire.from_record(wire.to_record(state))
    assert list(back) == list(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_bfloat16_is_sent_as_float32() -> None:
    record = wire.to_record({"w": torch.ones(2, 2, dtype=torch.bfloat16)})
    assert wire.from_record(record)["w"].dtype == torch.float32


def test_wire_bytes_are_payload_plus_small_header() -> None:
    state = {f"layer{i}": torch.randn(64, 8) for i in range(10)}
    payload = 4 * 64 * 8 * 10
    measured = wire.wire_bytes(wire.to_record(state))
    assert payload < measured < payload + 600 * len(state)  # npy header + object ids per array


def test_config_record_carries_the_round() -> None:
    record = wire.config_record({"rounds": 3, "model": "tiny-llama"}, server_round=2)
    assert record[wire.ROUND] == 2
    assert wire.run_config_of(record) == {"rounds": 3, "model": "tiny-llama"}
