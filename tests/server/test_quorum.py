"""Sampling, quorum and uncommitted rounds in real simulations (reliability.md, scenarios 1-3): a client
whose budget fits no plan answers with an error, the others train, and the quorum decides the commit."""

import json
from pathlib import Path

import pytest

from pollinate.cli import main
from pollinate.config import RunConfig
from pollinate.server.rundir import RunDir
from pollinate.strategies import build_strategy

TINY = ["model=tiny-llama", "num-clients=3", "rounds=2", "local-steps=1", "eval-examples=8",
        "memory.budgets=2GB,2GB,1MB"]  # the third client refuses every round


def _simulate(run: Path, *extra: str) -> dict:
    assert main(["simulate", "--run-dir", str(run), "--set", *TINY, *extra]) == 0
    return json.loads((run / "summary.json").read_text())


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in RunDir(run).events() if e["event"] == kind]


def test_below_quorum_nothing_is_committed(tmp_path: Path) -> None:  # scenario 2
    run = tmp_path / "run"
    summary = _simulate(run, "min-accepted=3")
    trains = _events(run, "train")
    assert [(e["accepted"], e["committed"]) for e in trains] == [(2, False), (2, False)]
    assert all(e["not_committed"] == "quorum not reached: 2 accepted, 3 needed" for e in trains)
    assert summary["rounds_completed"] == 0 and summary["uncommitted_rounds"] == 2
    assert summary["final_eval"] == summary["initial_eval"] and summary["failed_clients"] == 2
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert [e["round"] for e in _events(run, "evaluate")] == [0]  # the global state never changed


def test_a_fraction_quorum_commits_with_the_clients_that_trained(tmp_path: Path) -> None:  # scenarios 1, 3
    run = tmp_path / "run"
    summary = _simulate(run, "min-accepted=0.5")
    assert [(e["accepted"], e["committed"]) for e in _events(run, "train")] == [(2, True), (2, True)]
    assert summary["rounds_completed"] == 2 and summary["uncommitted_rounds"] == 0
    manifest = json.loads((run / "checkpoints" / "round-0002" / "manifest.json").read_text())
    assert len(manifest["accepted_nodes"]) == 2 and len(manifest["rejected_nodes"]) == 1  # 2 + 1 = 3 sampled


def test_clients_per_round_samples_that_many(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _simulate(run, "clients-per-round=2", "memory.budgets=", "rounds=1")
    (train,) = _events(run, "train")
    assert train["sampled"] == 2 and train["accepted"] == 2 and len(_events(run, "client")) == 2


def test_sampling_depends_on_the_seed_and_the_round_alone() -> None:
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "num-clients": 10, "clients-per-round": 4})
    nodes = list(range(100, 110))
    first, again = build_strategy(cfg), build_strategy(cfg)
    draws = [first.sample(r, nodes) for r in (1, 2, 3)]
    assert draws == [again.sample(r, nodes) for r in (1, 2, 3)]  # a resumed run samples the same
    assert all(len(d) == 4 and len(set(d)) == 4 and set(d) <= set(nodes) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # and rounds differ


@pytest.mark.parametrize(("setting", "message"), [
    ("clients-per-round=4", r"^clients-per-round: 4 is not allowed; it must be 0 \(every node\) or at most "
                            r"num-clients \(3\)"),
    ("min-accepted=4", r"^min-accepted: 4\.0 is not allowed; give a fraction in \(0, 1\) or a whole count"),
    ("min-accepted=1.5", r"^min-accepted: 1\.5 is not allowed"),
    ("round-timeout=0", r"^round-timeout: 0\.0 is not allowed"),
    ("robust=median", r"^robust: 'median' is not allowed; allowed: none, clip$"),
    ("update-bound=0.5", r"^update-bound: 0\.5 is not allowed; give 0 \(off\) or a factor above 1$"),
])
def test_bad_sampling_settings_are_one_line(setting: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig.from_run_config(dict(kv.split("=") for kv in ["num-clients=3", setting]))
