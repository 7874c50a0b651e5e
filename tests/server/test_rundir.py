"""The run folder: atomic writes, checkpoints committed by LATEST, leftovers removed."""

import json
import os
from pathlib import Path

from pollinate.server.rundir import RunDir, atomic_write


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_checkpoint_commit_writes_manifest_and_latest(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.commit_checkpoint(1, lambda d: (d / "adapter.bin").write_bytes(b"x"), {"strategy": "fedit"})
    path = run.commit_checkpoint(2, lambda d: (d / "adapter.bin").write_bytes(b"y"), {})
    assert run.latest_checkpoint() == path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["round"] == 2 and set(manifest["files"]) == {"adapter.bin"}


def test_leftover_temp_files_are_removed_at_start_up(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    (run.path / f"summary.json.tmp.{os.getpid()}").write_text("half")
    (run.checkpoints / "round-0003.tmp.123").mkdir()
    RunDir(run.path)
    assert not list(run.path.rglob("*.tmp.*"))


def test_events_append_and_read_back(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_event({"round": 0, "event": "evaluate", "loss": 2.0})
    run.append_event({"round": 1, "event": "train", "bytes_up": 10})
    assert [e["event"] for e in run.events()] == ["evaluate", "train"]
