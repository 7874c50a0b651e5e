"""File helpers and names that the run folder, the methods and the edge export share. Standard library.

The edge runner imports this (for hashes), so it must stay free of torch and of ``pollinate.server``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TMP_MARK = ".tmp."
"""Part of the name of a file or folder being written; a leftover with it is never read."""

MANIFEST_FILE = "manifest.json"
"""A checkpoint's manifest: the method, the round, the SHA-256 of every file."""

UPDATES_FILE = "updates.safetensors"
"""A checkpoint's updates merged so far, combined into one (the method's ``Update.to_flat``): LoRA's
merged base deltas (FLoRA, FedEx-LoRA), LoRA-SB's frozen A and B."""


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a mix."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
