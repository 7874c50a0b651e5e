"""Memory budgets: sizes in human units, and a heap that gives freed memory back in small pages.

A budget is a byte count a client declares: in simulation one per client in the run config
(``memory.budgets = "8GB,4GB,2GB,1.5GB"``), in deployment in the node config
(``memory-budget=1.5GB``). Units are decimal (kB, MB, GB, TB: powers of 1000) or binary (KiB, MiB,
GiB, TiB: powers of 1024); a plain number is bytes. Pure Python: no torch, no Flower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import re

__all__ = ["budget_list", "disable_huge_pages", "format_size", "limit_heap_retention", "parse_size"]

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
"""Unit suffixes, lower-cased. Bare K/M/G/T are decimal, like kB/MB/GB/TB."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_EXAMPLES = "use e.g. 1.5GB, 800MiB"
_MAX_BYTES = 2**62  # far above any real machine; keeps the value an int64 everywhere


def parse_size(text: str | int | float, key: str) -> int:
    """Parse a memory size into bytes.

    Parameters
    ----------
    text : str, int or float
        ``"1.5GB"``, ``"800 MiB"``, ``"2g"``, ``"1073741824"``; a number is bytes.
    key : str
        The configuration key the value came from, named in every error.

    Returns
    -------
    int
        The size in bytes, rounded down to a whole byte, at least 1.

    Raises
    ------
    ValueError
        If ``text`` is not a size, or is zero or negative.
    """
    if isinstance(text, bool):  # a bool is an int to Python, never a size to a user
        raise ValueError(f"{key}: {text!r} is not a size; {_EXAMPLES}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"{key}: {text!r} is negative; a memory size must be greater than 0")
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            if re.match(r"^\s*-\s*\d", str(text)):
                raise ValueError(f"{key}: {text!r} is negative; a memory size must be greater than 0")
            raise ValueError(f"{key}: {text!r} is not a size; {_EXAMPLES}")
        value, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key}: {text!r} is not a size; {_EXAMPLES}")
    size = round(value * _UNITS[unit])  # 4.35 * 10**9 is 4349999999.9999995 in binary floats
    if size <= 0:
        raise ValueError(f"{key}: {text!r} is zero; a memory size must be greater than 0")
    if size > _MAX_BYTES:
        raise ValueError(f"{key}: {text!r} is too large; {_EXAMPLES}")
    return size


def format_size(n: int, *, up: bool = False) -> str:
    """A byte count in decimal units with at most three significant digits: ``"1.5 GB"``, ``"538 MB"``.

    Parameters
    ----------
    n : int
        Bytes (negative values keep their sign).
    up : bool, default False
        Round up instead of to nearest, so that the printed size is never below ``n`` (for a minimum
        a user must give).

    Returns
    -------
    str
        ``"<number> <unit>"`` with B, kB, MB, GB or TB; trailing zeros dropped.
    """
    sign, value, unit = ("-" if n < 0 else ""), float(abs(int(n))), "B"
    for larger in ("kB", "MB", "GB", "TB"):
        if _three_digits(value, up) < 1000:
            break
        value, unit = value / 1000, larger
    if unit == "B":
        return f"{sign}{abs(int(n))} B"
    shown = _three_digits(value, up)
    digits = max(0, 2 - int(math.floor(math.log10(shown))))
    text = f"{shown:.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")  # 1.50 -> 1.5, 2.00 -> 2; never 300 -> 3
    return f"{sign}{text} {unit}"


def _three_digits(value: float, up: bool) -> float:
    """``value`` rounded (or rounded up) to three significant digits."""
    if value <= 0:
        return 0.0
    scale = 10.0 ** (2 - math.floor(math.log10(value)))  # 1.234 -> 100, 538.2 -> 1
    scaled = value * scale
    return (math.ceil(scaled - 1e-9) if up else round(scaled)) / scale


def budget_list(text: str, key: str = "memory.budgets") -> list[int]:
    """Parse a comma-separated list of sizes, one per client.

    Parameters
    ----------
    text : str
        ``"8GB,4GB,2GB,1.5GB"``; empty or blank means no budgets.
    key : str, default ``"memory.budgets"``
        The configuration key, named in every error.

    Returns
    -------
    list of int
        Bytes, in the order given.

    Raises
    ------
    ValueError
        If an entry is empty or not a positive size.
    """
    if not text.strip():
        return []
    items = text.split(",")
    sizes = []
    for i, item in enumerate(items):
        if not item.strip():
            raise ValueError(f"{key}: {text!r} has an empty entry at position {i + 1}; "
                             f"give sizes separated by commas, e.g. 8GB,4GB,1.5GB")
        sizes.append(parse_size(item.strip(), key))
    return sizes


_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, now fixed instead of growing to 32 MiB
_PR_SET_THP_DISABLE = 41  # prctl option number in linux/prctl.h


def limit_heap_retention() -> bool:
    """Make glibc give every large freed block back to the system at once, in small pages.

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so the
    per-layer tensors of a training step come from the heap, which fragments and stays resident: the
    measured peak of a LoRA step was 25-55% above what the tensors need (SmolLM2, MiniLM). A fixed
    threshold of 128 KiB maps each tensor of at least that size on its own and unmaps it when freed,
    so the peak follows what the planner estimates. The price is system time: every fresh page is a
    page fault (SmolLM2, batch 2 x 128: about 0.8 s more CPU per step, +40%). Use it where a memory
    budget must hold; call once per process, before the model is loaded. It also calls
    :func:`disable_huge_pages`.

    Returns
    -------
    bool
        True when glibc accepted the setting; False elsewhere (musl, macOS), where nothing changes.
    """
    disable_huge_pages()
    libc = _libc()
    try:
        return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except AttributeError:
        return False


def disable_huge_pages() -> bool:
    """Ask Linux not to back this process with transparent huge pages.

    Where a host's THP mode is ``always``, the kernel may map anonymous memory in 2 MiB pages at a fault
    and khugepaged may later merge sparsely used ranges into them, so the interpreter's heap and the
    tails of tensor mappings can become resident in full, by an amount that depends on the host and on
    timing, not on the plan. Opting out rules that out and costs nothing where the mode is ``madvise``
    or ``never`` (as on the development machines, where it changed no measured peak). The setting holds
    for the whole process and its children.

    Returns
    -------
    bool
        True when the kernel accepted it; False off Linux or on a kernel without the setting.
    """
    libc = _libc()
    try:
        zero = ctypes.c_ulong(0)
        return libc is not None and libc.prctl(_PR_SET_THP_DISABLE, ctypes.c_ulong(1), zero, zero, zero) == 0
    except AttributeError:
        return False


def _libc() -> ctypes.CDLL | None:
    """The C library, or None where there is none to load."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None
