"""Memory sizes: parsing human units, printing them, per-client budget lists."""

import subprocess
import sys

import pytest

from pollinate.client.budget import budget_list, format_size, limit_heap_retention, parse_size

KEY = "memory.budgets"


@pytest.mark.parametrize(("text", "expected"), [
    ("1.5GB", 1_500_000_000),
    ("1.5 GB", 1_500_000_000),
    ("1.5gb", 1_500_000_000),
    ("2G", 2_000_000_000),
    ("800MiB", 800 * 2**20),
    ("2 GiB", 2 * 2**30),
    ("512KiB", 512 * 1024),
    ("300 MB", 300_000_000),
    ("64kB", 64_000),
    ("1TB", 10**12),
    ("4.35GB", 4_350_000_000),  # 4.35e9 is not exact in binary: rounded, not truncated
    (".5GB", 500_000_000),
    ("1073741824", 2**30),
    ("1000B", 1000),
    (" 3 MB ", 3_000_000),
    (1_000_000, 1_000_000),
    (2.5e9, 2_500_000_000),
])
def test_parse_size_units(text: str | int | float, expected: int) -> None:
    assert parse_size(text, KEY) == expected


@pytest.mark.parametrize("text", ["1.5XB", "", "GB", "1.5.5GB", "abc", "1,5GB", "1e9", "nan", "5 M B"])
def test_parse_size_rejects_text_that_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match=rf"^{KEY}: .* is not a size; use e\.g\. 1\.5GB, 800MiB$"):
        parse_size(text, KEY)


@pytest.mark.parametrize("text", ["0", "0GB", "0.0000001B", 0, 0.0])
def test_parse_size_rejects_zero(text: str | int | float) -> None:
    with pytest.raises(ValueError, match=rf"^{KEY}: .* is zero; a memory size must be greater than 0$"):
        parse_size(text, KEY)


@pytest.mark.parametrize("text", ["-1GB", "- 2 MB", -5, -0.5])
def test_parse_size_rejects_negative(text: str | int | float) -> None:
    with pytest.raises(ValueError, match=rf"^{KEY}: .* is negative"):
        parse_size(text, KEY)


def test_parse_size_rejects_bool_and_names_the_key() -> None:
    with pytest.raises(ValueError, match="^memory-budget: True is not a size"):
        parse_size(True, "memory-budget")


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1 kB"), (1500, "1.5 kB"), (300_000_000, "300 MB"),
    (538_000_000, "538 MB"), (1_500_000_000, "1.5 GB"), (1_234_567_890, "1.23 GB"),
    (999_999, "1 MB"), (120 * 10**9, "120 GB"), (-2_000_000, "-2 MB"),
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_size_up_never_prints_less_than_the_value() -> None:
    for n in (1_234_567_890, 1_000_000_001, 999_499, 12_345, 702_000_001):
        shown = format_size(n, up=True)
        assert parse_size(shown.replace(" ", ""), "x") >= n
    assert format_size(1_234_567_890, up=True) == "1.24 GB"


def test_format_then_parse_round_trips_within_half_a_percent() -> None:
    for n in (1, 4096, 123_456, 98_765_432, 1_500_000_000, 7 * 2**30):
        assert abs(parse_size(format_size(n).replace(" ", ""), "x") - n) <= 0.005 * n


def test_budget_list() -> None:
    assert budget_list("8GB,4GB,2GB,1.5GB") == [8 * 10**9, 4 * 10**9, 2 * 10**9, 1_500_000_000]
    assert budget_list(" 800MiB , 1GiB ") == [800 * 2**20, 2**30]
    assert budget_list("") == []
    assert budget_list("   ") == []


def test_budget_list_errors_name_the_key_and_the_entry() -> None:
    with pytest.raises(ValueError, match=r"^memory\.budgets: '8GB,,4GB' has an empty entry at position 2"):
        budget_list("8GB,,4GB")
    with pytest.raises(ValueError, match=r"^memory\.budgets: '1\.5XB' is not a size"):
        budget_list("8GB,1.5XB")
    with pytest.raises(ValueError, match=r"^budgets: '0' is zero"):
        budget_list("1GB,0", key="budgets")


def test_limit_heap_retention_is_accepted_on_glibc() -> None:
    assert limit_heap_retention() in (True, False)  # never raises; True on glibc Linux
    assert limit_heap_retention() is limit_heap_retention()  # repeatable


@pytest.mark.skipif(sys.platform != "linux", reason="a Linux process setting")
def test_the_heap_policy_turns_huge_pages_off_for_the_process() -> None:
    code = ("from pollinate.client.budget import limit_heap_retention; limit_heap_retention(); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('THP_enabled')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["THP_enabled:", "0"]
