"""Every strategy in a real Flower simulation (tiny Llama, 3 clients, 2 rounds): exact rules make the
global model the weighted mean of the clients' models; clients and server hold the same base; bytes
match the formulas."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pollinate import models
from pollinate.aggregation import LoraFactors, from_flat, normalised_weights
from pollinate.cli import main
from pollinate.strategies import strategy_class

ALPHA = 16.0
RANKS = {"fedit": "4,4,4", "ffa": "4,4,4", "fedex": "4,4,4", "flora": "8,4,2", "zeropad": "8,4,2"}
EXACT = ("ffa", "fedex", "flora")
HEADER = 600  # serialisation bytes per array (npy header, object ids)


@pytest.fixture(scope="module", params=list(RANKS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    strategy = request.param
    path = tmp_path_factory.mktemp(strategy) / "run"
    assert main(["simulate", "--run-dir", str(path), "--set", "model=tiny-llama",
                 "--set", f"strategy={strategy}", "--set", f"lora.ranks={RANKS[strategy]}",
                 "--set", "num-clients=3", "--set", "rounds=2", "--set", "local-steps=3",
                 "--set", "lr=0.01", "--set", "eval-examples=8", "--set", "save-updates=true"]) == 0
    return strategy, path


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _base(path: Path, server_round: int) -> dict[str, torch.Tensor]:
    """W0 plus everything merged up to ``server_round``, per adapted module."""
    model, _ = models.load_model("tiny-llama", "generation", seed=0)
    weights = {f"base_model.model.{n[: -len('.weight')]}": p.detach().clone()
               for n, p in model.named_parameters() if n.endswith("_proj.weight")}
    delta_file = path / f"checkpoints/round-{server_round:04d}/updates.safetensors"
    if server_round > 0 and delta_file.exists():
        for name, d in from_flat(load_file(str(delta_file))).items():
            weights[name] += d.matrix()
    return weights


def _global_update(path: Path, r: int) -> dict[str, torch.Tensor]:
    """The server's effective weights after round r minus the base clients trained on in round r."""
    adapter = load_file(str(path / f"checkpoints/round-{r:04d}/adapter_model.safetensors"))
    factors = LoraFactors.from_state(adapter, ALPHA)
    before, after = _base(path, r - 1), _base(path, r)
    return {m: after[m] - before[m] + factors.delta(m) for m in factors.modules}


def _client_mean_update(path: Path, r: int) -> dict[str, torch.Tensor]:
    """Σ_k p_k s_k B_k A_k from the saved updates (A from the global adapter where A is frozen)."""
    folder = path / f"checkpoints/round-{r:04d}"
    manifest = json.loads((folder / "manifest.json").read_text())
    frozen_a = load_file(str(folder / "adapter_model.safetensors"))
    nodes = manifest["accepted_nodes"]
    p = normalised_weights([manifest["weights"][str(n)] for n in nodes])
    total: dict[str, torch.Tensor] = {}
    for pk, node in zip(p, nodes, strict=True):
        state = load_file(str(folder / f"update-{node}.safetensors"))
        if not any("lora_A" in k for k in state):  # FFA: A never leaves the server
            state.update({k: v for k, v in frozen_a.items() if "lora_A" in k})
        factors = LoraFactors.from_state(state, ALPHA)
        for m in factors.modules:
            total[m] = total.get(m, 0) + pk * factors.delta(m)  # type: ignore[operator]
    return total


def test_global_is_the_weighted_mean_of_client_models_when_exact(run: tuple[str, Path]) -> None:
    strategy, path = run
    for r in (1, 2):
        got, want = _global_update(path, r), _client_mean_update(path, r)
        worst = max(float((got[m] - want[m]).abs().max()) for m in want)
        scale = max(float(want[m].abs().max()) for m in want)
        if strategy in EXACT:
            assert worst <= 1e-5, (strategy, r, worst)
        else:  # the baselines differ by far more than round-off
            assert worst / scale > 1e-3, (strategy, r, worst / scale)


def test_clients_trained_on_the_servers_base(run: tuple[str, Path]) -> None:
    strategy, path = run
    events = _events(path)
    assert not [e for e in events if e["event"] in ("rejected", "failed")]
    for r in (1, 2):
        clients = [e for e in events if e["event"] == "client" and e["round"] == r]
        assert len(clients) == 3
        previous = path / f"checkpoints/round-{r - 1:04d}/manifest.json"
        if previous.exists():
            manifest = json.loads(previous.read_text())
            server = manifest["base_fingerprint"]
            assert all(e["base_fingerprint"] == pytest.approx(server, rel=1e-9) for e in clients)
            assert all(e["base_version"] == manifest["base_version"] for e in clients)
            merges = strategy in ("flora", "fedex")
            assert manifest["base_version"] == (r - 1 if merges else 0)
        assert len({e["base_fingerprint"] for e in clients}) == 1


def test_bytes_match_the_formulas(run: tuple[str, Path]) -> None:
    strategy, path = run
    model, _ = models.load_model("tiny-llama", "generation", seed=0)
    shapes = [tuple(p.shape) for n, p in model.named_parameters()
              if "self_attn" in n and n.endswith("_proj.weight")]
    ranks = [int(x) for x in RANKS[strategy].split(",")]
    arrays_up = len(shapes) * (1 if strategy == "ffa" else 2)
    for e in (e for e in _events(path) if e["event"] == "client"):
        formula = strategy_class(strategy).payload_numbers  # type: ignore[attr-defined]
        up, down = formula(shapes, e["rank"], ranks, first_round=e["round"] == 1)
        assert 4 * up <= e["bytes_up"] <= 4 * up + HEADER * arrays_up, (strategy, e)
        assert e["bytes_down"] <= 4 * down + HEADER * 4 * len(shapes), (strategy, e)  # ≤ A, B, L, R
        if e["round"] > 1:  # round 1 sends all-zero B's, which Flower's content addressing sends once
            assert 4 * down <= e["bytes_down"], (strategy, e)


def test_unequal_ranks_are_refused_where_the_rule_needs_equal_ones(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for strategy in ("fedit", "ffa", "fedex"):
        code = main(["simulate", "--run-dir", str(tmp_path / strategy), "--set", "model=tiny-llama",
                     "--set", f"strategy={strategy}", "--set", "lora.ranks=8,4,2",
                     "--set", "num-clients=3", "--set", "eval-examples=8"])
        err = capsys.readouterr().err
        assert code == 2 and "lora.ranks" in err and "flora" in err
