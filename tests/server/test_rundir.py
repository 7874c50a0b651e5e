"""The run folder: atomic writes, checkpoints committed by LATEST, leftovers removed, recovery at start-up
(reliability.md, scenarios 5 and 7: a writer killed at random, a full disk)."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from pollinate.files import TMP_MARK
from pollinate.server.rundir import RunDir, atomic_write, unverified


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
    RunDir(run.path)  # a reader changes nothing
    assert len(list(run.path.rglob("*.tmp.*"))) == 2
    RunDir(run.path).remove_temp_files()
    assert not list(run.path.rglob("*.tmp.*"))


def test_events_append_and_read_back(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_event({"round": 0, "event": "evaluate", "loss": 2.0})
    run.append_event({"round": 1, "event": "train", "bytes_up": 10})
    assert [e["event"] for e in run.events()] == ["evaluate", "train"]


def _commit(run: RunDir, server_round: int, payload: bytes = b"x") -> Path:
    return run.commit_checkpoint(server_round, lambda d: (d / "state.bin").write_bytes(payload), {})


def test_recovery_falls_back_past_a_checkpoint_that_does_not_verify(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    for r in (1, 2, 3):
        _commit(run, r, bytes([r]) * 10)
        run.append_event({"round": r, "event": "train"})
    (run.checkpoints / "round-0003" / "state.bin").write_bytes(b"flipped")
    found = RunDir(run.path).recover()
    assert found.round == 2
    assert found.skipped == ["round-0003: state.bin does not match its hash in the manifest"]
    assert found.discarded == ["round-0003"] and run.latest_checkpoint() == run.checkpoints / "round-0002"
    assert [e["round"] for e in run.events()] == [1, 2]  # the lines of discarded rounds go too


def test_recovery_discards_a_folder_that_latest_never_named(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    _commit(run, 1)
    _commit(run, 2)
    (run.path / "LATEST").write_text("checkpoints/round-0001\n")  # killed before LATEST moved on
    found = run.recover()
    assert found.round == 1 and found.skipped == [] and found.discarded == ["round-0002"]


def test_recovery_without_any_checkpoint_starts_afresh(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_event({"round": 0, "event": "evaluate", "loss": 2.0})
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"round": 1, "ev')  # a line cut short by a kill
    assert run.recover().checkpoint is None and run.events() == []


WRITER = """
import os, sys
from pathlib import Path
from pollinate.server.rundir import RunDir
run = RunDir(Path(sys.argv[1]))
r = run.recover().round
while True:
    r += 1
    run.commit_checkpoint(r, lambda d: [(d / n).write_bytes(os.urandom(s)) for n, s in
                                        (("adapter.safetensors", 4 << 20), ("head.bin", 1000))], {})
"""


def test_a_checkpoint_writer_killed_at_random_leaves_every_commit_readable(tmp_path: Path) -> None:  # 5
    path, rng, mid_write, rounds = tmp_path / "run", random.Random(0), 0, [0]
    for _ in range(100):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        time.sleep(rng.uniform(0.05, 0.3))
        writer.kill()
        writer.wait()
        mid_write += bool(list(path.rglob(f"*{TMP_MARK}*")))
        found = RunDir(path).recover()  # start-up: leftovers deleted, LATEST verified
        assert not list(path.rglob(f"*{TMP_MARK}*"))
        assert found.skipped == [], found.skipped  # LATEST always named a whole checkpoint
        assert found.round >= rounds[-1]  # committed rounds never go back
        rounds.append(found.round)
    assert mid_write >= 20, mid_write  # most kills landed while a file was being written
    assert rounds[-1] >= 50


DISK_FULL = """
import resource, signal, sys
from pathlib import Path
from pollinate.server.rundir import CheckpointError, RunDir
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
run = RunDir(Path(sys.argv[1]))
run.commit_checkpoint(1, lambda d: (d / "state.bin").write_bytes(b"1" * 1000), {})
try:
    run.commit_checkpoint(2, lambda d: (d / "state.bin").write_bytes(b"2" * (2 << 20)), {})
except CheckpointError as err:
    print(err)
    sys.exit(3)
"""


def test_a_full_disk_leaves_the_previous_checkpoint_and_says_so(tmp_path: Path) -> None:  # scenario 7
    path = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", DISK_FULL, str(path)], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("the checkpoint of round 2 could not be written ([Errno 27] File too large")
    assert f"the last committed checkpoint is still {path / 'checkpoints' / 'round-0001'}" in done.stdout
    run = RunDir(path)
    assert run.latest_checkpoint() == run.checkpoints / "round-0001"
    assert unverified(run.checkpoints / "round-0001") is None
    assert [p.name for p in run.checkpoints.iterdir()] == ["round-0001"]
    assert not list(path.rglob(f"*{TMP_MARK}*"))
