"""The runner works where torch and transformers cannot even be imported."""

from __future__ import annotations

from pathlib import Path

from edge_helpers import run_without_torch as _run


def test_generate_and_swap_adapters_without_torch(separate_bundle: Path, round2_adapter: Path) -> None:
    done = _run("generate", str(separate_bundle), "hello", "--max-new-tokens", "5", "--adapter",
                str(round2_adapter))
    assert done.returncode == 0, done.stderr
    info = _run("info", str(separate_bundle))
    assert info.returncode == 0 and "adapter_mode: SEPARATE" in info.stdout, info.stderr


def test_classify_without_torch(cls_bundle: Path) -> None:
    done = _run("classify", str(cls_bundle), "some text")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] in ("angry", "happy", "sad")
