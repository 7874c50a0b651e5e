"""End to end: a real Flower simulation (Ray) of the real apps with a tiny model."""

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from pollinate import models

REQUIRED_SUMMARY = {"strategy", "method", "model", "task", "num_clients", "rounds_completed",
                    "initial_eval", "final_eval", "bytes_up_total", "bytes_down_total",
                    "wall_seconds", "rejected_updates"}
CLIENT_KEYS = {"node_id", "method", "num_examples", "train_loss", "peak_mem_bytes", "budget_bytes",
               "bytes_up", "bytes_down", "train_seconds"}


@pytest.fixture(scope="module")
def run(tiny_run: Path) -> Path:
    """tests/server/conftest.py's run (tiny-llama, 3 clients, 2 rounds), shared with the report's tests."""
    return tiny_run


def test_run_folder_is_complete(run: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.html", "LATEST",
                 "eval.png", "bytes.png", "memory.png"):
        assert (run / name).is_file(), name
    assert (run / "LATEST").read_text().strip() == "checkpoints/round-0002"
    for r in (1, 2):
        manifest = json.loads((run / f"checkpoints/round-{r:04d}/manifest.json").read_text())
        assert manifest["round"] == r and len(manifest["accepted_nodes"]) == 3


def test_summary_and_metrics(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) >= REQUIRED_SUMMARY
    assert summary["rounds_completed"] == 2 and summary["num_clients"] == 3
    assert math.isfinite(summary["final_eval"]["loss"]) and "perplexity" in summary["final_eval"]
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    clients = [e for e in events if e["event"] == "client"]
    assert len(clients) == 6 and all(set(e) >= CLIENT_KEYS for e in clients)
    assert all(math.isfinite(e["train_loss"]) and e["bytes_up"] > 0 for e in clients)
    assert summary["bytes_up_total"] == sum(e["bytes_up"] for e in clients)
    assert [e["round"] for e in events if e["event"] == "evaluate"] == [0, 1, 2]


def test_bytes_up_match_the_adapter_size(run: Path) -> None:
    """What a client sends is its adapter: fp32 numbers plus a small serialisation header."""
    adapter = load_file(str(run / "checkpoints/round-0002/adapter_model.safetensors"))
    payload = 4 * sum(t.numel() for t in adapter.values())
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for e in (e for e in events if e["event"] == "client"):
        assert payload <= e["bytes_up"] <= payload * 1.10 + 8192


def test_checkpoint_loads_with_peft(run: Path) -> None:
    base, _ = models.load_model("tiny-llama", "generation", seed=0)
    model = PeftModel.from_pretrained(base, run / "checkpoints/round-0002")
    saved = load_file(str(run / "checkpoints/round-0002/adapter_model.safetensors"))
    b = next(k for k in saved if "lora_B" in k)
    assert torch.count_nonzero(saved[b]) > 0  # the clients' training reached the global adapter
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
