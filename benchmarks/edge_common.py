"""Helpers of the edge benchmarks: the fixed prompt, timing, and running one measurement per process.

Each measurement script (``edge_latency.py``, ``edge_fidelity.py``, ``edge_adapters.py``) times one
backend in its own process and prints one JSON object on its last line of output; ``edge_bench.py``
starts them, collects the objects and writes ``benchmarks/results/edge.json`` and
``docs/benchmarks-edge.md``. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"

PROMPT_TOKENS = 64
NEW_TOKENS = 32
# A plain English text, long enough for 64 tokens with any tokenizer; cut to exactly PROMPT_TOKENS ids.
PROMPT_TEXT = (
    "Federated learning trains a shared model across many devices that keep their data at home. "
    "Each device fine-tunes a small adapter on what it has seen, sends only that adapter to a server, "
    "and the server averages the adapters into a better global model, round after round, until it "
    "answers questions well. Bees do much the same with pollen, carrying a little from flower to flower."
)


def prompt_ids(tokenizer_json: Path) -> list[int]:
    """The benchmark prompt as exactly :data:`PROMPT_TOKENS` ids of a ``tokenizer.json``."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(PROMPT_TEXT, add_special_tokens=False).ids
    assert len(ids) >= PROMPT_TOKENS, len(ids)
    return list(ids[:PROMPT_TOKENS])


def emit(result: dict[str, Any]) -> None:
    """Print the measurement as the last line of output, for the driver."""
    print(json.dumps(result), flush=True)


def run_worker(script: str, args: Sequence[str], timeout: float = 3600) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` in a fresh process; return the JSON object of its last line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCH_DIR / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def cpu_times() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def busy_since(start: tuple[float, float]) -> float:
    """Mean busy CPU cores, machine-wide, since ``start = cpu_times()``."""
    busy, total = cpu_times()
    return round((busy - start[0]) / max(total - start[1], 1e-9) * (os.cpu_count() or 1), 2)


def busy_cores(seconds: float = 1.0) -> float:
    """Mean busy CPU cores over the next ``seconds``: how disturbed a timing would be."""
    start = cpu_times()
    time.sleep(seconds)
    return busy_since(start)
