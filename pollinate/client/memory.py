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

    How many of them a first run of a code path maps depends on the host's kernel and filesystem
    (fault-around, large folios), not on the plan: measurements report their growth apart."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_bytes() -> int:
    """VmHWM in bytes (0 where /proc is unavailable)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return 0
