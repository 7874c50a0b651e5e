"""Fed-SB end to end and its invariants (docs/methods.md, "Fed-SB"): the server's R is the weighted mean
of the clients', A and B are identical on every node, the payload is r² per layer whatever the number of
clients, and federated and server initialisation agree on the same examples."""

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict
from safetensors.torch import load_file

from pollinate import protocol as wire
from pollinate import workload
from pollinate.aggregation import normalised_weights
from pollinate.cli import main
from pollinate.config import RunConfig
from pollinate.methods.lora_sb.method import STATE_FILE, FrozenFactors, LoraSbMethod, LoraSbTrainee
from pollinate.protocol import ClientReport
from pollinate.server.rundir import RunDir
from pollinate.strategies import FedSb, build_strategy

RANK = 4
SETTINGS = ["model=tiny-llama", "strategy=fedsb", "num-clients=3", "rounds=2", "local-steps=2",
            "eval-examples=8", f"fedsb.rank={RANK}", "fedsb.init-examples=8", "save-updates=true"]


def _simulate(tmp_path: Path, *extra: str) -> Path:
    run = tmp_path / "run"
    assert main(["simulate", "--set", *SETTINGS, *extra, "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _simulate(tmp_path_factory.mktemp("fedsb"))


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in RunDir(run).events() if e["event"] == kind]


def test_the_servers_r_is_the_weighted_mean_of_the_clients(run: Path) -> None:
    folder = run / "checkpoints" / "round-0002"
    manifest = json.loads((folder / "manifest.json").read_text())
    nodes = manifest["accepted_nodes"]
    assert len(nodes) == 3 and manifest["method"] == "lora_sb"
    p = normalised_weights([manifest["weights"][str(n)] for n in nodes])
    clients = [load_file(str(folder / f"update-{n}.safetensors")) for n in nodes]
    server = load_file(str(folder / STATE_FILE))
    assert set(server) == set(clients[0]) and all(k.endswith(".sb_R") for k in server)
    for key, value in server.items():
        mean = sum(pk * c[key].double() for pk, c in zip(p, clients, strict=True))
        torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-5)
    # exact in the model too: B (Σ p R_k) A == Σ p B R_k A, with A and B from the checkpoint's update
    factors = FrozenFactors.from_flat(load_file(str(folder / "updates.safetensors"))).factors
    name = next(iter(factors))
    a, b, _ = (t.double() for t in factors[name])
    merged = b @ server[f"{name}.sb_R"].double() @ a
    torch.testing.assert_close(merged, sum(pk * b @ c[f"{name}.sb_R"].double() @ a
                                           for pk, c in zip(p, clients, strict=True)), rtol=0, atol=1e-5)


def test_a_and_b_are_bit_identical_on_every_node_in_every_round(run: Path) -> None:
    clients = _events(run, "client")
    assert len(clients) == 6 and not _events(run, "rejected")
    server = json.loads((run / "checkpoints" / "round-0002" / "manifest.json").read_text())
    assert {e["base_fingerprint"] for e in clients} == {server["base_fingerprint"]}  # exactly equal
    assert {e["base_version"] for e in clients} == {1}


def test_the_payload_is_r_squared_per_layer(run: Path) -> None:
    layers = 2 * 4  # tiny-llama: 2 layers × q, k, v, o
    payload = 4 * RANK * RANK * layers
    for e in _events(run, "client"):
        assert payload < e["bytes_up"] < payload + 600 * layers  # npy headers, one per array
    down = [e["bytes_down"] for e in _events(run, "client") if e["round"] == 2]
    assert all(payload < d < payload + 600 * layers for d in down)  # round 2: only R travels down


def test_the_payload_does_not_grow_with_the_number_of_clients() -> None:
    strategy = build_strategy(RunConfig.from_run_config(
        {"model": "tiny-llama", "strategy": "fedsb", "num-clients": 5, "fedsb.rank": RANK}))
    assert isinstance(strategy, FedSb)
    gen = torch.Generator().manual_seed(0)
    state = {f"m{i}.sb_R": torch.randn(RANK, RANK, generator=gen) for i in range(3)}

    def report(k: int) -> ClientReport:
        upload = {key: v + k for key, v in state.items()}
        return ClientReport(node=k, examples=k + 1, loss=1.0, seconds=0.0, plan={}, method_figures={},
                            peak=0, process_peak=0, baseline=0, budget=None, estimate=0, examples_seen=0,
                            tokens_seen=0, bytes_up=0, bytes_down=0, version=1, fingerprint=0.0,
                            upload=upload)

    sizes = [sum(v.numel() for v in strategy.combine([report(k) for k in range(n)]).state.values())
             for n in (2, 5)]
    assert sizes == [3 * RANK * RANK] * 2


def test_federated_and_server_initialisation_agree_on_the_same_examples() -> None:
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "strategy": "fedsb", "num-clients": 2,
                                     "fedsb.rank": RANK, "fedsb.init-examples": 6, "eval-examples": 8})
    method = LoraSbMethod(cfg)
    server = method.server()
    examples = method.calibration_examples(server)
    on_server = method.factors(server.gradient_sums(examples))
    clients = [LoraSbTrainee(cfg), LoraSbTrainee(cfg)]  # two nodes, the examples split between them
    parts = [c.gradient_sums(examples[i::2]) for i, c in enumerate(clients)]
    federated = method.factors({k: parts[0][k] + parts[1][k] for k in parts[0]})
    for name, (a, b, r0) in on_server.factors.items():
        fa, fb, fr = federated.factors[name]
        torch.testing.assert_close(fa, a, rtol=0, atol=1e-5)
        torch.testing.assert_close(fb, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(fr, r0, rtol=1e-5, atol=1e-8)


def test_the_calibration_slice_is_no_clients_and_not_held_out() -> None:
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "strategy": "fedsb", "num-clients": 3,
                                     "fedsb.init-examples": 10, "eval-examples": 8})
    calibration, pool = workload.pools(cfg, 10)
    _, heldout = workload.splits(cfg)
    key = lambda ds: {(r["prompt"], r["response"]) for r in ds}  # noqa: E731
    held = key(calibration)
    assert len(calibration) == 10 and not held & key(heldout)
    assert not any(held & key(share) for share in workload.shares(cfg, 10))


def test_federated_initialisation_runs_end_to_end(tmp_path: Path) -> None:
    run = _simulate(tmp_path, "fedsb.init=federated", "rounds=1")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "lora_sb" and summary["rounds_completed"] == 1
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"]


@pytest.mark.parametrize(("setting", "message"), [
    ("fedsb.rank=65", r"^fedsb\.rank: 65 is not allowed; it must be at most \d+"),
    ("fedsb.init-examples=0", r"^fedsb\.init-examples: 0 is not allowed"),
    ("fedsb.init-examples=100000", r"^fedsb\.init-examples: 100000 is not allowed; the training pool has"),
    ("fedsb.init=clients", r"^fedsb\.init: 'clients' is not allowed; allowed: server, federated$"),
    ("lora.ranks=4,2,2", r"^lora\.ranks: '4,2,2' is not allowed with strategy 'fedsb'"),
])
def test_bad_settings_get_one_line(setting: str, message: str,
                                   simulate_error: Callable[[list[str]], str]) -> None:
    err = simulate_error(["--set", *SETTINGS, setting]).removeprefix("pollinate: error: ")
    assert re.match(message, err), err


def test_a_setup_answer_that_is_not_a_sum_per_target_is_left_out(flower_task: None) -> None:
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "strategy": "fedsb", "fedsb.init": "federated",
                                     "fedsb.rank": RANK, "eval-examples": 8})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FedSb)
    server = strategy.method.server()
    good = {name: torch.full_like(layer.base.weight, 0.5) for name, layer in server.layers.items()}
    first = next(iter(good))

    def answer(node: int, sums: dict[str, torch.Tensor]) -> Message:
        ask = Message(RecordDict(), dst_node_id=node, message_type="query")
        return Message(RecordDict({wire.ARRAYS: wire.to_record(sums)}), reply_to=ask)

    answers = [answer(1, good), answer(2, good),
               answer(3, {**good, first: good[first][:1]}),  # a wrong shape
               answer(4, {k: v for k, v in good.items() if k != first}),  # a target missing
               answer(5, {**good, first: torch.full_like(good[first], float("nan"))})]
    total = strategy.add_up(server, answers)
    assert all(torch.equal(total[k], 2 * good[k]) for k in good)  # the two good answers alone
    assert [node for node, _ in strategy.setup_rejections] == [3, 4, 5]
    assert "shape" in strategy.setup_rejections[0][1] and "NaN" in strategy.setup_rejections[2][1]
