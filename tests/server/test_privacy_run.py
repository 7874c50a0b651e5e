"""Differential privacy in real simulations (tiny-llama, 3 clients with equal iid shares)."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pollinate.cli import main
from pollinate.privacy.accountant import Accountant
from pollinate.privacy.settings import DpSettings

pytestmark = pytest.mark.slow

# 3 iid shares of 333 examples each: weighting by examples is uniform weighting, as under DP
TINY = ["model=tiny-llama", "num-clients=3", "partitioner=iid", "local-steps=3", "eval-examples=16",
        "lr=0.005", "rounds=2", "fedkseed.seeds=256"]


def simulate(path: Path, *settings: str) -> dict[str, Any]:
    assert main(["simulate", "--run-dir", str(path), "--set", *TINY, *settings]) == 0
    return dict(json.loads((path / "summary.json").read_text()))


def events(path: Path, kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == kind]


def final(path: Path) -> dict[str, torch.Tensor]:
    folder = path / (path / "LATEST").read_text().strip()
    tensors = load_file(folder / "state.safetensors")
    if (folder / "updates.safetensors").exists():
        tensors.update({f"update.{k}": v for k, v in load_file(folder / "updates.safetensors").items()})
    return tensors


@pytest.mark.parametrize("strategy", ["fedit", "fedkseed"])
def test_without_noise_and_clipping_dp_runs_equal_plain_runs(strategy: str, tmp_path: Path) -> None:
    """dp.noise-multiplier 0 and a clip above every update: the release is the plain mean, to round-off
    (the mean is taken as received + Σ(upload − received) / n in fp64 instead of Σ upload / n)."""
    simulate(tmp_path / "plain", f"strategy={strategy}")
    summary = simulate(tmp_path / "dp", f"strategy={strategy}", "dp.mode=central", "dp.noise-multiplier=0",
                       "dp.clip=1e9")
    plain, private = final(tmp_path / "plain"), final(tmp_path / "dp")
    assert plain.keys() == private.keys() and plain
    for key, value in plain.items():
        scale = max(1.0, float(value.abs().max()))
        assert float((private[key] - value).abs().max()) / scale <= 1e-6, key
    assert summary["epsilon"] is None and summary["dp_mode"] == "central"  # no noise: ε is infinite
    assert all(e["dp_clipped"] == 0 for e in events(tmp_path / "dp", "train"))


def test_target_epsilon_stops_the_run_and_resume_keeps_the_account(tmp_path: Path) -> None:
    """Round 1, then a resumed run to round 3 under a target that round 3 would exceed: ε on every
    train line, a clean stop before round 3, the last committed round stands."""
    dp = ["strategy=fedsb", "dp.mode=central", "dp.noise-multiplier=0.8", "dp.clip=0.05"]
    accountant = Accountant(DpSettings(mode="central", noise_multiplier=0.8), 3, 3)
    target = (accountant.epsilon(2) + accountant.epsilon(3)) / 2
    run = tmp_path / "run"
    simulate(run, *dp, "rounds=1", f"dp.target-epsilon={target}")
    assert main(["simulate", "--resume", str(run), "--set", "rounds=3"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    trains = events(run, "train")
    assert [e["round"] for e in trains] == [1, 2]
    assert [e["epsilon"] for e in trains] == pytest.approx([accountant.epsilon(1), accountant.epsilon(2)])
    [stopped] = events(run, "stopped")
    assert stopped["round"] == 3 and f"{accountant.epsilon(3):.3f}" in stopped["reason"]
    assert summary["rounds_completed"] == 2 and summary["dp_rounds"] == 2
    assert summary["epsilon"] == pytest.approx(accountant.epsilon(2))
    assert summary["delta"] == pytest.approx(1 / 3)
    assert summary["stopped"] == stopped["reason"]
    assert (run / "LATEST").read_text().strip() == "checkpoints/round-0002"


def test_local_dp_noises_every_seed_on_the_device(tmp_path: Path) -> None:
    """FedKSeed under local DP: each client uploads K dense per-seed sums, noised before they leave."""
    run = tmp_path / "run"
    summary = simulate(run, "strategy=fedkseed", "dp.mode=local", "dp.noise-multiplier=1.0", "dp.clip=1.0")
    clients = events(run, "client")
    assert len(clients) == 6 and all(e["bytes_up"] >= 4 * 256 for e in clients)
    accountant = Accountant(DpSettings(mode="local", noise_multiplier=1.0), 3, 3)
    assert summary["epsilon"] == pytest.approx(accountant.epsilon(2))
    updates = load_file(run / "checkpoints/round-0002/updates.safetensors")
    assert all(int((v != 0).sum()) == v.numel() for v in updates.values())  # noise on every seed
