"""The runner works where torch and transformers cannot even be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Runs in a fresh interpreter: importing torch, transformers or peft raises, then the runner's CLI runs
# and must not have pulled any of them in.
_BLOCKED_RUN = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ImportError(f"{name} is not installed on this device")
        return None

sys.meta_path.insert(0, NoTorch())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the block does not work")
from pollinate.edge.cli import main
code = main(sys.argv[1:])
assert not {"torch", "transformers", "peft"} & set(sys.modules), "a heavy module was imported"
raise SystemExit(code)
"""


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCKED_RUN, *argv], capture_output=True, text=True,
                          timeout=120, check=False)


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
