"""Session fixtures: tiny checkpoints and the bundles exported from them (each export takes seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edge_helpers import make_run, random_delta


@pytest.fixture(scope="session")
def edge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge")


@pytest.fixture(scope="session")
def gen_run(edge_dir: Path) -> Path:
    """A tiny-llama run with round 1 (rank 4, alpha 8, q/v) and round 2 (rank 6, alpha 12, v at rank 3)."""
    run = edge_dir / "gen-run"
    delta = random_delta(0)  # both rounds trained on a base with the same merged updates
    make_run(run, round_=2, rank=6, alpha=12.0, adapter_seed=2, rank_pattern={"v_proj": 3}, base_delta=delta)
    make_run(run, round_=1, base_delta=delta)  # LATEST -> round 1
    return run


@pytest.fixture(scope="session")
def merged_bundle(edge_dir: Path, gen_run: Path) -> Path:
    from pollinate.edge.export import export_bundle

    export_bundle(gen_run, edge_dir / "gen-merged", adapter_mode="merged")
    return edge_dir / "gen-merged"


@pytest.fixture(scope="session")
def separate_bundle(edge_dir: Path, gen_run: Path) -> Path:
    from pollinate.edge.export import export_bundle

    export_bundle(gen_run / "checkpoints" / "round-0001", edge_dir / "gen-separate", adapter_mode="separate")
    return edge_dir / "gen-separate"


@pytest.fixture(scope="session")
def round2_adapter(edge_dir: Path, gen_run: Path, separate_bundle: Path) -> Path:
    """Round 2's adapter as a file for the separate bundle (a different rank: the base is not re-exported)."""
    from pollinate.edge.adapters import export_adapter

    return export_adapter(gen_run / "checkpoints" / "round-0002", separate_bundle, edge_dir / "round-0002")


@pytest.fixture(scope="session")
def cls_run(edge_dir: Path) -> Path:
    run = edge_dir / "cls-run"
    run.mkdir()
    data = run / "moods.jsonl"  # the run's dataset names the three classes
    rows = [{"text": f"text {i}", "label": mood} for i, mood in enumerate(["sad", "happy", "angry"] * 2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_run(run, model="tiny-bert", task="classification", num_labels=3, dataset=str(data))
    return run


@pytest.fixture(scope="session")
def cls_bundle(edge_dir: Path, cls_run: Path) -> Path:
    from pollinate.edge.export import export_bundle

    export_bundle(cls_run, edge_dir / "cls-separate", adapter_mode="separate")  # the head is an input too
    return edge_dir / "cls-separate"
