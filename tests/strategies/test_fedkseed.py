"""FedKSeed end to end (docs/methods.md, "FedKSeed"): the server's model is the weighted mean of the
clients' final models, a node that skipped rounds catches up from the per-seed sums alone, the payload
depends on K and τ only, and bad settings get one line."""

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pollinate.aggregation import normalised_weights
from pollinate.cli import main
from pollinate.config import RunConfig
from pollinate.data import encode_dataset
from pollinate.methods.fedkseed.method import (
    DELTA_FILE,
    PROBABILITIES_KEY,
    FedKSeedMethod,
    SeedSums,
    ZerothOrderTrainee,
    uploaded_entries,
)
from pollinate.methods.fedkseed.zo import shift
from pollinate.protocol import ClientReport, to_record, wire_bytes
from pollinate.server.rundir import RunDir
from pollinate.strategies import FedKSeedPro, build_strategy

SETTINGS = ["model=tiny-llama", "strategy=fedkseed", "num-clients=3", "rounds=2", "eval-examples=8",
            "fedkseed.steps=6", "fedkseed.seeds=64", "fedkseed.lr=0.01", "save-updates=true"]


def _cfg(*extra: str) -> RunConfig:
    return RunConfig.from_run_config(dict(s.split("=", 1) for s in (*SETTINGS, *extra)))


def _simulate(tmp_path: Path, *extra: str) -> Path:
    run = tmp_path / "run"
    assert main(["simulate", "--set", *SETTINGS, *extra, "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _simulate(tmp_path_factory.mktemp("fedkseed"))


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in RunDir(run).events() if e["event"] == kind]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's adapter by the trainee's tensor names (peft saves them without ``.default``)."""
    saved = load_file(str(folder / "adapter_model.safetensors"))
    return {re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k): v for k, v in saved.items()}


def test_the_servers_model_is_the_weighted_mean_of_the_clients_final_models(run: Path) -> None:
    """Round 1 from the shared start: each client's final model is its steps replayed one by one (fp64)."""
    folder = run / "checkpoints" / "round-0001"
    manifest = json.loads((folder / "manifest.json").read_text())
    nodes = manifest["accepted_nodes"]
    assert len(nodes) == 3 and manifest["method"] == "fedkseed"
    p = normalised_weights([manifest["weights"][str(n)] for n in nodes])
    cfg = _cfg()
    start = ZerothOrderTrainee(cfg)
    finals = []
    for node in nodes:
        index, grads = uploaded_entries(load_file(str(folder / f"update-{node}.safetensors")))
        assert index.numel() == cfg.fedkseed.steps
        params = [t.detach().double().clone() for t in start.params]
        for i, g in zip(index.tolist(), grads.tolist(), strict=True):
            shift(params, start.seeds[i], -cfg.fedkseed.lr * g)
        finals.append(params)
    server = _adapter(folder)
    assert set(server) == set(start.trained)
    moved = 0.0
    for j, name in enumerate(start.trained):
        mean = sum(pk * f[j] for pk, f in zip(p, finals, strict=True))
        torch.testing.assert_close(server[name].double(), mean, rtol=0, atol=1e-5)
        moved = max(moved, float((server[name].double() - start.params[j].double()).abs().max()))
    assert moved > 1e-4  # the round moved the model


def test_full_parameters_keep_the_weighted_mean_too(tmp_path: Path) -> None:
    """Every weight moves (clients undo by replay); the server's w0 + delta is the clients' weighted mean."""
    run = _simulate(tmp_path, "fedkseed.params=full", "rounds=1")
    folder = run / "checkpoints" / "round-0001"
    manifest = json.loads((folder / "manifest.json").read_text())
    nodes = manifest["accepted_nodes"]
    assert len(nodes) == 3 and manifest["export"] == {"base_delta": DELTA_FILE, "adapter": False,
                                                      "prompt_state": None, "unsupported": None,
                                                      "merge_unsupported": None}
    p = normalised_weights([manifest["weights"][str(n)] for n in nodes])
    cfg = _cfg("fedkseed.params=full")
    start = ZerothOrderTrainee(cfg)
    finals = []
    for node in nodes:
        index, grads = uploaded_entries(load_file(str(folder / f"update-{node}.safetensors")))
        params = [t.detach().double().clone() for t in start.params]
        for i, g in zip(index.tolist(), grads.tolist(), strict=True):
            shift(params, start.seeds[i], -cfg.fedkseed.lr * g)
        finals.append(params)
    delta = load_file(str(folder / DELTA_FILE))
    for j, (name, w0) in enumerate(start.trained.items()):
        module, _, kind = name.rpartition(".")
        server = w0.double() + delta[f"{module}.D" if kind == "weight" else f"{name}.D"].double()
        mean = sum(pk * f[j] for pk, f in zip(p, finals, strict=True))
        torch.testing.assert_close(server, mean, rtol=0, atol=1e-5)


def test_a_client_steps_as_its_record_says_and_comes_back(run: Path) -> None:
    """The trainee's own final weights equal its record replayed step by step; train() undoes them."""
    cfg = _cfg()
    method = FedKSeedMethod(cfg)
    plan = method.candidates(method.dims(), 0)[0]
    trainee = method.client(plan)
    from pollinate import workload

    examples = encode_dataset(workload.shares(cfg)[0], trainee.tokenizer, cfg.task, plan.seq_len)
    start = [t.detach().double().clone() for t in trainee.params]
    _, index, grads = trainee.descend(examples, method.spec(plan), seed=4)
    expected = [t.clone() for t in start]
    for i, g in zip(index.tolist(), grads.tolist(), strict=True):
        shift(expected, trainee.seeds[i], -cfg.fedkseed.lr * g)
    for got, want in zip(trainee.params, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    held = [t.detach().clone() for t in trainee.params]  # as if this were the version it was sent
    trainee.train(examples, method.spec(plan), seed=5)
    for got, want in zip(trainee.params, held, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_node_that_skipped_rounds_catches_up_from_the_sums(run: Path) -> None:
    """A fresh node merges every update as one combined update and holds the server's model."""
    folder = run / "checkpoints" / "round-0002"
    combined = SeedSums.from_flat(load_file(str(folder / "updates.safetensors")), span=2)
    assert tuple(combined.sums.shape) == (64,)
    late = ZerothOrderTrainee(_cfg())
    late.merge(combined)
    assert late.version == 2
    server = _adapter(folder)
    for name, tensor in late.trained.items():
        torch.testing.assert_close(tensor, server[name], rtol=0, atol=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "fedkseed" and summary["rounds_completed"] == 2


def test_bytes_per_round_are_pairs_up_and_k_sums_down(run: Path) -> None:
    clients = _events(run, "client")
    assert len(clients) == 6 and not _events(run, "rejected")
    ups = {e["bytes_up"] for e in clients}
    assert len(ups) == 1 and 8 * 6 < ups.pop() < 8 * 6 + 1024  # τ pairs plus the record's framing
    later = [e["bytes_down"] for e in clients if e["round"] == 2]
    assert all(4 * 64 < b < 4 * 64 + 1024 for b in later)  # K sums


@pytest.mark.parametrize("model", ["tiny-llama", "smollm2-135m-instruct"])
def test_the_payload_depends_on_k_and_tau_only(model: str) -> None:
    """200 steps over 4096 seeds: 1,600 B of pairs up and 16,384 B of sums down, on any model."""
    cfg = RunConfig.from_run_config({"model": model, "strategy": "fedkseed", "fedkseed.steps": 200,
                                     "fedkseed.seeds": 4096})
    trainee = ZerothOrderTrainee(cfg)
    index = torch.randint(4096, (200,))
    trainee.load({"seed_index": index.to(torch.int32), "seed_grad": torch.randn(200)}, seed=0)
    up = wire_bytes(to_record(trainee.upload()))
    down = wire_bytes(to_record(SeedSums(torch.randn(4096)).to_flat()))
    assert 1600 <= up <= 1600 + 1024 and 16384 <= down <= 16384 + 1024  # plus Flower's framing
    assert max(up, down) <= 18_432  # the goal, each way


def test_pro_sends_probabilities_within_a_ratio_of_e() -> None:
    strategy = build_strategy(_cfg("strategy=fedkseed-pro"))
    assert isinstance(strategy, FedKSeedPro)
    upload = {"seed_index": torch.tensor([1, 1, 5, 9], dtype=torch.int32),
              "seed_grad": torch.tensor([4.0, -2.0, 0.5, 5000.0])}
    report = ClientReport(node=1, examples=10, loss=1.0, seconds=1.0, plan={}, method_figures={}, peak=0,
                          process_peak=0, baseline=0, budget=None, estimate=0, examples_seen=0,
                          tokens_seen=0, bytes_up=0, bytes_down=0, version=0, fingerprint=0.0,
                          upload=upload)
    done = strategy.combine([report])
    p = done.state[PROBABILITIES_KEY]
    assert p.shape == (64,) and float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(p.max() / p.min()) <= torch.e * (1 + 1e-5)
    assert p[9] > p[1] > p[5] > p[0]  # 5000 clipped to 1000, still the largest mean |g|
    assert done.update is not None and float(done.update.sums[1]) == pytest.approx(2.0)


def test_pro_runs_end_to_end(tmp_path: Path) -> None:
    run = _simulate(tmp_path, "strategy=fedkseed-pro", "rounds=2", "save-updates=false")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["method"] == "fedkseed"
    second = [e for e in _events(run, "client") if e["round"] == 2]
    assert all(b > 2 * 4 * 64 for b in (e["bytes_down"] for e in second))  # sums and probabilities


@pytest.mark.parametrize(("setting", "message"), [
    ("fedkseed.seeds=0", r"^fedkseed\.seeds: 0 is not allowed; it must be greater than 0$"),
    ("fedkseed.steps=0", r"^fedkseed\.steps: 0 is not allowed; it must be greater than 0$"),
    ("fedkseed.epsilon=0", r"^fedkseed\.epsilon: 0(\.0)? is not allowed; it must be greater than 0$"),
    ("fedkseed.lr=-1", r"^fedkseed\.lr: -1(\.0)? is not allowed; it must be greater than 0$"),
    ("fedkseed.params=half", r"^fedkseed\.params: 'half' is not allowed; allowed: lora, full$"),
    ("lora.ranks=4,2,2", r"^lora\.ranks: '4,2,2' is not allowed with strategy 'fedkseed'"),
])
def test_bad_settings_get_one_line(setting: str, message: str,
                                   simulate_error: Callable[[list[str]], str]) -> None:
    err = simulate_error(["--set", *SETTINGS, setting]).removeprefix("pollinate: error: ")
    assert re.match(message, err), err



@pytest.mark.parametrize(("model", "task"), [("tiny-llama", "generation"), ("tiny-bert", "classification")])
def test_full_parameters_export_merged_and_refuse_separate(model: str, task: str, tmp_path: Path) -> None:
    """Every weight moves; the merged bundle computes the replayed model; no adapter to ship."""
    import numpy as np

    from pollinate.edge.export import export_bundle
    from pollinate.edge.runtime import EdgeModel

    run = _simulate(tmp_path, f"model={model}", f"task={task}", "fedkseed.params=full", "rounds=1",
                    "num-clients=2", "save-updates=false")
    with pytest.raises(ValueError, match=r"^--adapters: 'separate' is not allowed for this checkpoint; "
                                         r"its method \(fedkseed\) trained every weight"):
        export_bundle(run, tmp_path / "separate", adapter_mode="separate")
    edge = EdgeModel(export_bundle(run, tmp_path / "bundle") and tmp_path / "bundle")
    cfg = _cfg(f"model={model}", f"task={task}", "fedkseed.params=full", "num-clients=2")
    replayed = ZerothOrderTrainee(cfg)
    folder = run / "checkpoints" / "round-0001"
    update = SeedSums.from_flat(load_file(str(folder / "updates.safetensors")))
    assert float(update.sums.abs().sum()) > 0
    replayed.merge(update)
    ids = np.array([[5, 17, 33, 2, 9, 41]], dtype=np.int64)
    mask = np.ones_like(ids)
    with torch.no_grad():
        want = replayed.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    got = edge.logits(ids, mask)
    np.testing.assert_allclose(got.reshape(want.shape), want.numpy(), rtol=0, atol=1e-3)
