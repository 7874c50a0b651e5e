"""The run folder: config.json, metrics.jsonl, summary.json and atomically committed checkpoints.

Layout (README, "The run folder"): ``config.json``, ``metrics.jsonl`` (one event per line),
``summary.json``, ``checkpoints/round-NNNN/`` (the server trainee's files, the updates merged so far and
``manifest.json`` naming the method), ``LATEST`` (the name of the last committed round: writing it is the
commit point), ``report.html`` and its plots.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pollinate.files import MANIFEST_FILE, TMP_MARK, atomic_write, fsync_dir, sha256_file

__all__ = ["RunDir", "atomic_write", "sha256_file"]


class RunDir:
    """One run's folder; every write is atomic, events are appended and flushed line by line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._remove_temp_files()

    def _remove_temp_files(self) -> None:
        """Leftovers of a writer killed mid-write are never read: delete them at start-up."""
        for leftover in [*self.path.glob(f"*{TMP_MARK}*"), *self.checkpoints.glob(f"*{TMP_MARK}*")]:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def write_json(self, name: str, obj: Any) -> None:
        """``name`` (e.g. config.json) as indented JSON, atomically."""
        atomic_write(self.path / name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def append_event(self, event: dict[str, Any]) -> None:
        """One line of metrics.jsonl; each line carries ``round`` and ``event``."""
        assert "round" in event and "event" in event, event
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(event, sort_keys=True) + "\n")
            f.flush()

    def events(self) -> list[dict[str, Any]]:
        """Every line of metrics.jsonl, in order."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def commit_checkpoint(self, server_round: int, write: Callable[[Path], None],
                          manifest: dict[str, Any]) -> Path:
        """Write a round's checkpoint into a temporary folder, move it into place, then LATEST."""
        name = f"round-{server_round:04d}"
        final, tmp = self.checkpoints / name, self.checkpoints / f"{name}{TMP_MARK}{os.getpid()}"
        tmp.mkdir()
        write(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write(tmp / MANIFEST_FILE,
                     json.dumps({**manifest, "round": server_round, "files": files},
                                indent=2, sort_keys=True).encode())
        if final.exists():  # committing a round again replaces it wholly
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.checkpoints)
        atomic_write(self.path / "LATEST", f"checkpoints/{name}\n".encode())
        return final

    def latest_checkpoint(self) -> Path | None:
        """The folder LATEST points to, or None before the first commit."""
        latest = self.path / "LATEST"
        return self.path / latest.read_text().strip() if latest.exists() else None
