"""The real peak memory of this process: Linux's resident high-water mark (VmHWM)."""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Reset VmHWM to the current resident size; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS counter (proc(5))
        return True
    except OSError:
        return False


def file_bytes() -> int:
    """Resident pages mapped from files (RssFile: library code and data), in bytes; 0 where unknown.

    How many of them a training step's first run maps is not the plan's: on one machine a freshly
    installed environment mapped 30-55 MB per tiny-model step where an older one mapped 19-26 MB (most
    likely page-cache folio sizes). Measurements report their growth apart."""
    return _status_bytes("RssFile")


def peak_bytes() -> int:
    """VmHWM in bytes (0 where /proc is unavailable)."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    """A kB field of /proc/self/status, in bytes (0 where it is unavailable)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return 0
