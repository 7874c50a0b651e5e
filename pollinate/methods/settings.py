"""What every method's settings table shares: field keys, one-line errors, target names. Standard library.

A method's table is a frozen dataclass whose fields name their kebab-case key in ``metadata["key"]``;
``pollinate.config`` nests it under the method's table name (``lora.rank``, ``fedsb.rank``).
"""

from __future__ import annotations

from typing import Any

AUTO = "auto"

# Linear layers chosen by `<table>.targets = "auto"`: the attention projections of each family.
DEFAULT_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "bert": ("query", "key", "value"),
}


def key(name: str) -> dict[str, str]:
    """Field metadata naming the field's configuration key."""
    return {"key": name}


def fail(key: str, value: object, allowed: str) -> ValueError:
    """The one-line error every bad configuration value raises."""
    return ValueError(f"{key}: {value!r} is not allowed; {allowed}")


def positive(key: str, value: Any) -> None:
    """Raise the one-line error unless ``value`` > 0."""
    if value <= 0:
        raise fail(key, value, "it must be greater than 0")


def target_list(targets: str, family: str, key: str) -> list[str]:
    """Module names from a comma-separated ``targets``, or the family's defaults for ``"auto"``."""
    if targets != AUTO:
        return [t.strip() for t in targets.split(",") if t.strip()]
    if family not in DEFAULT_TARGETS:
        raise fail(key, AUTO, f"'auto' knows {', '.join(DEFAULT_TARGETS)}; name the modules")
    return list(DEFAULT_TARGETS[family])
