"""The run folder: config.json, metrics.jsonl, summary.json and atomically committed checkpoints.

Layout (README, "The run folder"): ``config.json``, ``metrics.jsonl`` (one event per line),
``summary.json``, ``checkpoints/round-NNNN/`` (the server trainee's files, the updates merged so far and
``manifest.json`` naming the method), ``LATEST`` (the name of the last committed round: writing it is the
commit point), ``report.html`` and its plots.

Recovery (:meth:`RunDir.recover`, before a run resumes): leftovers of killed writers are deleted, the
checkpoint ``LATEST`` names is verified against its manifest's hashes (the one before it when it does not
verify, and so on), and everything newer than the checkpoint chosen is discarded: later round folders and
their lines in metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollinate.files import MANIFEST_FILE, TMP_MARK, atomic_write, fsync_dir, sha256_file

__all__ = ["CheckpointError", "Recovery", "RunDir", "atomic_write", "sha256_file", "unverified"]

_ROUND_FOLDER = re.compile(r"round-(\d{4,})")


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written (the last committed one is intact) or read back."""


def round_of(folder: Path) -> int | None:
    """The round of a checkpoint folder's name (round-0003 -> 3), or None for any other name."""
    found = _ROUND_FOLDER.fullmatch(folder.name)
    return int(found.group(1)) if found else None


def unverified(folder: Path) -> str | None:
    """Why ``folder`` is not a whole checkpoint (its manifest unreadable, a file missing or changed),
    or None when every file its manifest names has the hash the manifest gives."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{folder.name}: no readable manifest ({type(err).__name__}: {err})"
    for name, digest in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{folder.name}: {name} is missing"
        if sha256_file(path) != digest:
            return f"{folder.name}: {name} does not match its hash in the manifest"
    return None


@dataclass
class Recovery:
    """What :meth:`RunDir.recover` found: the checkpoint to resume from and what it passed over."""

    checkpoint: Path | None
    """The newest checkpoint that verifies, at or before the one LATEST names (None: start afresh)."""
    skipped: list[str] = field(default_factory=list)
    """Why each newer checkpoint was not used."""
    discarded: list[str] = field(default_factory=list)
    """Round folders deleted because they are newer than the checkpoint chosen."""

    @property
    def round(self) -> int:
        """The last committed round (0: none)."""
        return 0 if self.checkpoint is None else round_of(self.checkpoint) or 0


class RunDir:
    """One run's folder; every write is atomic, events are appended and flushed line by line.

    Opening one changes nothing in it (a reader may open the folder of a run still going); the server
    calls :meth:`remove_temp_files` (or :meth:`recover`) at start-up.
    """

    def __init__(self, path: Path, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = path
        self.on_event = on_event
        """Called with each event once its line is in metrics.jsonl (an experiment tracker)."""
        self.checkpoints = path / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def remove_temp_files(self) -> None:
        """Leftovers of a writer killed mid-write are never read: the server deletes them at start-up."""
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
        if self.on_event is not None:
            self.on_event(event)

    def events(self) -> list[dict[str, Any]]:
        """Every line of metrics.jsonl, in order (a last line cut short by a kill is left out)."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        events = []
        for number, line in enumerate(lines, 1):
            try:
                events.append(json.loads(line))
            except ValueError:
                if number < len(lines):
                    raise
        return events

    def commit_checkpoint(self, server_round: int, write: Callable[[Path], None],
                          manifest: dict[str, Any]) -> Path:
        """Write a round's checkpoint into a temporary folder, move it into place, then LATEST.

        Raises CheckpointError (the temporary folder removed, LATEST untouched) when the disk refuses.
        """
        name = f"round-{server_round:04d}"
        final, tmp = self.checkpoints / name, self.checkpoints / f"{name}{TMP_MARK}{os.getpid()}"
        try:
            tmp.mkdir()
            write(tmp)
            for path in tmp.iterdir():  # the files' bytes are on disk before the manifest names them
                _fsync_file(path)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write(tmp / MANIFEST_FILE,
                         json.dumps({**manifest, "round": server_round, "files": files},
                                    indent=2, sort_keys=True).encode())
            if final.exists():  # committing a round again replaces it wholly
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.checkpoints)
            atomic_write(self.path / "LATEST", f"checkpoints/{name}\n".encode())
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest_checkpoint()
            raise CheckpointError(
                f"the checkpoint of round {server_round} could not be written ({err}); the last committed "
                f"checkpoint is {'still ' + str(last) if last else 'none'}, and a resumed run starts after it"
            ) from err
        return final

    def latest_checkpoint(self) -> Path | None:
        """The folder LATEST points to, or None before the first commit."""
        latest = self.path / "LATEST"
        return self.path / latest.read_text().strip() if latest.exists() else None

    def round_folders(self) -> list[Path]:
        """Every checkpoint folder, oldest first (committed or left by a killed run)."""
        folders = [p for p in self.checkpoints.iterdir() if p.is_dir() and round_of(p) is not None]
        return sorted(folders, key=lambda p: round_of(p) or 0)

    def recover(self) -> Recovery:
        """Choose the checkpoint to resume from and discard everything newer (see the module's text).

        LATEST is the commit point, so a folder newer than the one it names was never committed; when
        LATEST is missing or names no checkpoint folder, every folder is a candidate, newest first.
        """
        self.remove_temp_files()
        try:
            named = self.latest_checkpoint()
        except OSError:
            named = None
        newest = round_of(named) if named is not None else None
        found = Recovery(None)
        for folder in reversed(self.round_folders()):
            if newest is not None and (round_of(folder) or 0) > newest:
                continue
            reason = unverified(folder)
            if reason is None:
                found.checkpoint = folder
                break
            found.skipped.append(reason)
        for folder in self.round_folders():
            if (round_of(folder) or 0) > found.round:
                shutil.rmtree(folder)
                found.discarded.append(folder.name)
        if found.checkpoint is None:
            (self.path / "LATEST").unlink(missing_ok=True)
        else:
            atomic_write(self.path / "LATEST", f"checkpoints/{found.checkpoint.name}\n".encode())
        kept = [e for e in self.events() if int(e["round"]) <= found.round and found.checkpoint is not None]
        atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n"
                                                          for e in kept).encode())
        return found


def _fsync_file(path: Path) -> None:
    """Make a file's bytes durable."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
