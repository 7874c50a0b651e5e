"""Helpers of the edge tests: tiny federated checkpoints built directly with peft, and their reference.

A checkpoint here is what the server writes: ``RUN/config.json`` naming the base model, task and
seed, ``RUN/checkpoints/round-NNNN/`` holding the peft adapter, and ``RUN/LATEST``. The LoRA factors
are drawn from a seeded generator (B non-zero), so the adapter changes the model's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import load_file, save_file

from pollinate.models import load_model

GENERATION_TARGETS = ["q_proj", "v_proj"]
CLASSIFICATION_TARGETS = ["query", "value"]


def make_run(run: Path, *, model: str = "tiny-llama", task: str = "generation", seed: int = 0,
             rank: int = 4, alpha: float = 8.0, round_: int = 1, adapter_seed: int = 1,
             targets: list[str] | None = None, num_labels: int = 3,
             rank_pattern: dict[str, int] | None = None, dataset: str = "auto", std: float = 0.2,
             base_delta: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a run folder with one checkpoint of random LoRA factors; returns the checkpoint folder."""
    base, _ = load_model(model, task, num_labels=num_labels, seed=seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, rank_pattern=rank_pattern or {},
        target_modules=targets or (GENERATION_TARGETS if task == "generation" else CLASSIFICATION_TARGETS),
        task_type=TaskType.CAUSAL_LM if task == "generation" else TaskType.SEQ_CLS)
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(adapter_seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:  # LoRA factors and a trained classifier head
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    checkpoint = run / "checkpoints" / f"round-{round_:04d}"
    peft_model.save_pretrained(str(checkpoint))
    if base_delta is not None:  # what a strategy merged into the base during the federation
        save_file(base_delta, str(checkpoint / "updates.safetensors"))
    (checkpoint / "manifest.json").write_text(json.dumps(  # as the server writes it: the method's view
        {"method": "lora", "round": round_, "export": {"base_delta": "updates.safetensors"}}))
    run_config = {"model": model, "task": task, "seed": seed, "lora.rank": rank, "lora.alpha": alpha,
                  "dataset": dataset}
    (run / "config.json").write_text(json.dumps(run_config))
    (run / "LATEST").write_text(f"checkpoints/{checkpoint.name}\n")
    return checkpoint


def random_delta(seed: int) -> dict[str, torch.Tensor]:
    """A base delta for tiny-llama: dense on layer 0's q_proj, rank 2 on layer 1's v_proj."""
    g = torch.Generator().manual_seed(seed)
    return {"base_model.model.model.layers.0.self_attn.q_proj.D": torch.randn(64, 64, generator=g) * 0.05,
            "base_model.model.model.layers.1.self_attn.v_proj.L": torch.randn(32, 2, generator=g) * 0.2,
            "base_model.model.model.layers.1.self_attn.v_proj.R": torch.randn(2, 64, generator=g) * 0.2}


def load_reference(checkpoint: Path, *, model: str = "tiny-llama", task: str = "generation",
                   seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    """The PyTorch reference: the base model with the checkpoint's peft adapter, unmerged."""
    from peft import PeftModel

    base, _ = load_model(model, task, num_labels=num_labels, seed=seed)
    delta_file = checkpoint / "updates.safetensors"
    if delta_file.is_file():  # W += D, or W += L R, per module
        flat = load_file(str(delta_file))
        with torch.no_grad():
            for key, value in flat.items():
                name, part = key.removeprefix("base_model.model.").rsplit(".", 1)
                if part != "R":
                    delta = value if part == "D" else value @ flat[key[:-1] + "R"]
                    base.get_submodule(name).weight.add_(delta)
    return PeftModel.from_pretrained(base, str(checkpoint)).eval()


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


def run_without_torch(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m pollinate.edge ARGV`` in a fresh interpreter where torch, transformers and peft cannot
    be imported; fails if the runner imported any of them."""
    return subprocess.run([sys.executable, "-c", _BLOCKED_RUN, *argv], capture_output=True, text=True,
                          timeout=120, check=False)
